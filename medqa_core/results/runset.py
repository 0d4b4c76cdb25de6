"""Run-set files: N fine-tunes of one configuration from N seeds, plus the first seed once more, named in one file.

Pure data (no torch): reports, gates and ``check`` read run sets anywhere. ``medqa-parity run --repeats N``
writes one after the N + 1 run records it names.

Fields of a run-set file:
    schema_version   int, SCHEMA_VERSION of the writer; another version is refused on load.
    kind             "runset".
    created_utc      ISO-8601 time the file was written.
    fingerprint      the machine (machine_fingerprint() of the set's first record).
    config           RunConfig.to_dict() of the first run (runs differ only in config.train.seed).
    seeds            the N training seeds (adapter init, data order, dropout), in run order.
    runs             one {path, seed, role} per record: role "seed" for the N, "repeat" for the first seed's
                     second run (the same-seed floor); path relative to this file's folder.
    eval_curve       {every, questions}: how each run's eval curve was scored, or null.
    target_loss_nats the eval-loss target of time to target.
    load_s           wall seconds of loading (and preset generation) for the whole set: the model loads once.
    summary          compare.runsets.SetSummary.as_dict(): accuracy and eval-loss spreads of the seed runs, the
                     same-seed repeat, time to target. Derived from the records: readers recompute it.
    notes            plain-language caveats.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medqa_core.results.record import RecordError, RunRecord, load_record, write_json_atomic

SCHEMA_VERSION = 1
KIND = "runset"
ROLES = ("seed", "repeat")


class RunSetError(ValueError):
    """A run-set file cannot be read, or names a record that cannot be."""


@dataclass(frozen=True)
class RunSetEntry:
    """One run of a set: its record's path (relative to the set file's folder), seed and role."""

    path: str
    seed: int
    role: str


@dataclass(frozen=True)
class RunSet:
    """A run-set file's content (see the module docstring for the fields)."""

    fingerprint: dict[str, Any]
    config: dict[str, Any]
    seeds: tuple[int, ...]
    runs: tuple[RunSetEntry, ...]
    target_loss_nats: float
    eval_curve: dict[str, Any] | None = None
    load_s: float | None = None
    summary: dict[str, Any] | None = None
    notes: tuple[str, ...] = ()
    kind: str = KIND
    created_utc: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class LoadedRun:
    """A run of a set with its record read: the entry, the record, and the record's resolved path."""

    entry: RunSetEntry
    record: RunRecord
    path: Path


def runset_filename(runset: RunSet) -> str:
    stamp = runset.created_utc.replace("-", "").replace(":", "").replace("+0000", "Z")
    backend = runset.fingerprint.get("backend", "unknown")
    model = str(runset.config.get("model", {}).get("preset") or "model").replace(os.sep, "_")
    path = runset.config.get("model", {}).get("path")
    if path:
        model = Path(path).name.replace(os.sep, "_") or "model"
    return f"{stamp}_runset_{model}_{backend}_{secrets.token_hex(4)}.json"


def save_runset(runset: RunSet, folder: str | Path) -> Path:
    """Write ``runset`` under ``folder`` with a fresh, unique name (atomically); returns its path."""
    path = Path(folder) / runset_filename(runset)
    write_json_atomic(path, runset.to_dict())
    return path


def relative_path(record_path: str | Path, runset_folder: str | Path) -> str:
    """A record's path as a run-set file in ``runset_folder`` stores it (relative, so the tree can move)."""
    return os.path.relpath(Path(record_path).resolve(), Path(runset_folder).resolve())


def runset_from_dict(d: Any, where: str = "run set") -> RunSet:
    """Rebuild a run set; ``where`` names the source in error messages.

    Raises:
        RunSetError: not a run set, another schema version, missing or mistyped fields.
    """
    if not isinstance(d, dict) or d.get("kind") != KIND:
        raise RunSetError(f"{where}: not a run-set file (no \"kind\": \"{KIND}\"); give the file "
                          "`medqa-parity run --repeats N` wrote")
    found = d.get("schema_version")
    if found != SCHEMA_VERSION:
        raise RunSetError(f"{where}: schema_version {found!r}, expected {SCHEMA_VERSION}; it was written by another "
                          "version of medqa-parity")
    try:
        runs = tuple(RunSetEntry(str(r["path"]), int(r["seed"]), str(r["role"])) for r in d["runs"])
        bad = [r.role for r in runs if r.role not in ROLES]
        if bad:
            raise RunSetError(f"{where}: run role {bad[0]!r}; expected one of {', '.join(ROLES)}")
        return RunSet(fingerprint=dict(d["fingerprint"]), config=dict(d["config"]),
                      seeds=tuple(int(s) for s in d["seeds"]), runs=runs,
                      target_loss_nats=float(d["target_loss_nats"]), eval_curve=d.get("eval_curve"),
                      load_s=d.get("load_s"), summary=d.get("summary"), notes=tuple(d.get("notes", ())),
                      created_utc=str(d["created_utc"]))
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, RunSetError):
            raise
        raise RunSetError(f"{where}: malformed field ({type(e).__name__}: {e}); each run needs path, seed and "
                          "role") from e


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RunSetError(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, RecursionError) as e:
        raise RunSetError(f"{path}: not JSON ({e})") from e


def read_runset(path: str | Path) -> RunSet:
    """Read a run-set file without the records it names (see :func:`load_runset` for those).

    Raises:
        RunSetError: unreadable, not a run set, or another schema version; names the file.
    """
    path = Path(path)
    return runset_from_dict(read_json(path), str(path))


def is_runset_file(path: str | Path) -> bool:
    """Whether ``path`` holds a run-set file (a JSON object of kind "runset"); False for anything else."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(d, dict) and d.get("kind") == KIND


def load_runset(path: str | Path) -> tuple[RunSet, tuple[LoadedRun, ...]]:
    """Read a run-set file and every record it names.

    Returns:
        The set and its runs, in the file's order.

    Raises:
        RunSetError: the file or a record it names cannot be read; the message names both.
    """
    path = Path(path)
    runset = runset_from_dict(read_json(path), str(path))
    loaded = []
    for entry in runset.runs:
        record_path = (path.parent / entry.path) if not Path(entry.path).is_absolute() else Path(entry.path)
        try:
            record = load_record(record_path)
        except RecordError as e:
            raise RunSetError(f"{path}: run of seed {entry.seed} ({entry.role}): {e}") from e
        loaded.append(LoadedRun(entry, record, record_path))
    return runset, tuple(loaded)
