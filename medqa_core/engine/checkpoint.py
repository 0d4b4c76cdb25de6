"""Training checkpoints: LoRA adapter, optimizer, scheduler, RNG states, progress; atomic, self-verifying; last K kept.

A checkpoint is a folder ``step-000040/`` holding

- ``adapter_model.safetensors`` and ``adapter_config.json`` (peft),
- ``optim.pt``: optimizer and scheduler state (tensors and numbers only, loaded with ``weights_only=True``),
- ``rng.safetensors``: the torch RNG states of every device,
- ``state.json``: progress, config, Python RNG,
- ``manifest.json``, written last: every other file's size and sha256, and the adapter's tensor names,
  dtypes and shapes.

It is written in a temporary folder ``.step-000040-<host>-<pid>-<random>``, every file fsynced, then renamed
into place and the parent folder fsynced: a crash leaves the previous checkpoint as the newest complete one,
and the temporary folder is removed by the next checkpoint write once its writer is dead. One job at a time
writes a checkpoint folder: it holds an exclusive ``flock`` on ``.lock`` in it (:func:`lock_checkpoints`),
which the kernel releases when the process ends, however it ends. Resuming verifies the newest checkpoint against
its manifest and against the model's LoRA parameters (names and shapes) before anything is loaded into the
model; a damaged one is skipped with one warning naming the file and what is wrong, and the newest valid
one is used. Checkpoints of schema 1 (written before manifests) still resume: they are verified by
loading every file and matching the adapter with the model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import secrets
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from medqa_core.measure.timing import is_oom
from medqa_core.results.storage import (
    WriteError,
    apply_umask,
    fsync_dir,
    fsync_file,
    is_write_failure,
    pid_alive,
    safetensors_tensors,
    sha256_file,
    write_error,
)

logger = logging.getLogger(__name__)

CHECKPOINT_SCHEMA_VERSION = 2  # 2: with manifest.json; 1: without (still resumed, verified by loading)
READABLE_SCHEMA_VERSIONS = (1, 2)
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
ADAPTER_FILE = "adapter_model.safetensors"
OPTIM_FILE = "optim.pt"
RNG_FILE = "rng.safetensors"
CHECKPOINT_FILES = (ADAPTER_FILE, "adapter_config.json", OPTIM_FILE, RNG_FILE, STATE_FILE)
LOCK_FILE = ".lock"
_NAME = re.compile(r"step-(\d+)")
# A temporary folder: .step-000040-<host>-<pid>-<random>; before the host and pid were in it, .step-000040-<random>.
_TEMP = re.compile(r"\.step-\d+-(?:(?P<host>.+)-(?P<pid>\d+)-)?[0-9a-f]+")


class CheckpointError(ValueError):
    """No checkpoint can be resumed: none there, none valid, or one written under other settings."""


class CheckpointWriteError(WriteError):
    """The checkpoint after ``step`` of ``steps`` could not be written (a full disk, an I/O error)."""

    def __init__(self, error: WriteError, step: int, steps: int) -> None:
        super().__init__(error.path, error.reason, error.free_bytes)
        self.step, self.steps = step, steps


class _Damaged(Exception):
    """One checkpoint fails verification; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class TrainProgress:
    """Where training stood after ``step`` optimizer steps (the data order follows from seed and step)."""

    step: int
    examples_seen: int
    loss_per_step: tuple[float, ...]
    step_time_s: tuple[float, ...]
    step_tokens: tuple[int, ...]
    # Under torchrun: each step's per-rank wall times and real tokens (empty in one process and in older checkpoints).
    rank_step_time_s: tuple[tuple[float, ...], ...] = ()
    rank_step_tokens: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class _State:
    """A checkpoint's state.json, read and checked (against the manifest where there is one)."""

    progress: TrainProgress
    config: dict[str, Any]
    python_rng: list[Any]
    manifest: dict[str, Any] | None  # None: schema 1, written before manifests


def _rng_tensors() -> dict[str, torch.Tensor]:
    """torch RNG states as uint8 tensors, for safetensors (no pickle in a checkpoint)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):  # every device (HIP on ROCm)
            tensors[f"cuda.{i}"] = state
    return tensors


def _set_rng_state(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def checkpoint_step(path: Path) -> int | None:
    """The step of a checkpoint folder named ``step-000040``; None for any other name."""
    match = _NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest first.

    Each was renamed into place once complete; whether it is still intact is for :func:`load_checkpoint`
    to verify. Temporary ``.step-*`` folders and other names are left out.
    """
    try:
        found = [(step, p) for p in root.iterdir() if p.is_dir() and (step := checkpoint_step(p)) is not None]
    except (FileNotFoundError, NotADirectoryError):  # none yet, or gone while read (a job's write probe removes
        return []                                    # the folder it made; a reader polling it must not fail)
    return [p for _, p in sorted(found)]


def _host() -> str:
    return socket.gethostname().replace(os.sep, "_") or "host"


def temp_writer(path: Path) -> tuple[str, int] | None:
    """(host, pid) of the job writing a temporary ``.step-*`` folder; None for one named before they were."""
    match = _TEMP.fullmatch(path.name)
    if match is None or match["pid"] is None:
        return None
    return match["host"], int(match["pid"])


def remove_stale_temps(root: Path) -> list[Path]:
    """Delete temporary ``.step-*`` folders left by a checkpoint write that was killed.

    A folder whose writer still runs on this host is left alone; so is one written from another host (sharing
    the folder over a network), whose process cannot be checked from here. Folders named before writers were
    (no host and pid) are removed: jobs that wrote them did not lock the folder and are long gone.

    Returns:
        The folders removed.
    """
    stale = []
    for path in root.glob(".step-*"):
        writer = temp_writer(path)
        if not path.is_dir() or (writer is not None and (writer[0] != _host() or pid_alive(writer[1]))):
            continue
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed %s, left by an interrupted checkpoint write", path)
        stale.append(path)
    return stale


class CheckpointLock:
    """One job's hold on a checkpoint folder: an exclusive ``flock`` on its ``.lock`` file.

    The kernel drops the lock when the file is closed or the process ends (``kill -9`` included), so a lock
    is never stale. The file holds the holder's pid, host, start time, command and settings, for the message
    another job gets. Use as a context manager or call :meth:`release`.
    """

    def __init__(self, root: Path, fd: int | None) -> None:
        self.root, self._fd = root, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays, empty of meaning
            self._fd = None

    def __enter__(self) -> CheckpointLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder_text(fd: int, root: Path, config: dict[str, Any]) -> str:
    """Who holds the lock, from its file: "pid 4242 on node-1 since 2026-12-05T19:48:46+00:00 (medqa-parity
    train ...), settings differing from this job's: train.lr: there 0.001, here 0.0002"."""
    holder: dict[str, Any] = {}
    for _ in range(20):  # the holder writes the file right after taking the lock
        try:
            holder = json.loads(os.pread(fd, 1 << 20, 0).decode("utf-8"))
        except (OSError, ValueError):
            holder = {}
        if isinstance(holder, dict) and holder.get("pid"):
            break
        time.sleep(0.05)
    if not isinstance(holder, dict) or not holder.get("pid"):
        return "a job that has not said which (its lock file is empty)"
    text = f"pid {holder['pid']} on {holder.get('host', '?')} since {holder.get('started_utc', '?')}"
    if holder.get("command"):
        text += f" ({holder['command']})"
    theirs = holder.get("config")
    if isinstance(theirs, dict):
        diffs = [d.replace(": checkpoint ", ": there ").replace(", now ", ", here ")
                 for d in _config_diff(theirs, config)]
        text += (", settings differing from this job's: " + "; ".join(diffs)) if diffs else ", the same settings"
    return text


def lock_checkpoints(root: Path, config: dict[str, Any], command: str = "") -> CheckpointLock:
    """Take the checkpoint folder ``root`` for this job, or refuse at once when another job has it.

    Args:
        root: the checkpoint folder (created if needed).
        config: this job's checkpoint settings (see :func:`load_checkpoint`), written for the other job's message.
        command: this job's command line, likewise.

    Returns:
        The lock, held until released or until the process ends.

    Raises:
        CheckpointError: another live job holds the folder; the message names its pid, host, start, command
            and the settings that differ.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks; one job per folder is then the user's to keep
        logger.warning("%s: checkpoint folder not locked (no fcntl on this system)", root)
        return CheckpointLock(root, None)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder_text(fd, root, config)
        os.close(fd)
        raise CheckpointError(f"{root}: in use by another job, {holder}; wait for it to finish, or give this job "
                              "another --checkpoint-dir") from None
    except BaseException:
        os.close(fd)
        raise
    me = {"pid": os.getpid(), "host": _host(), "started_utc": datetime.now(UTC).isoformat(timespec="seconds"),
          "command": command, "config": config}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
    return CheckpointLock(root, fd)


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file()}
    tensors = {name: {"dtype": dtype, "shape": list(shape)}
               for name, (dtype, shape) in sorted(safetensors_tensors(folder / ADAPTER_FILE).items())}
    manifest = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "files": files, "adapter_tensors": tensors}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1), encoding="utf-8")


def save_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: TrainProgress, config: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint under ``root`` (manifest last, fsynced, renamed into place); keep the newest ``keep``.

    The checkpoint just written is never pruned, so a damaged newer one left by an earlier run cannot
    push it out.

    Returns:
        The checkpoint folder.

    Raises:
        WriteError: a file could not be written (a full disk, an I/O error); the temporary folder is removed
            and the checkpoints before it are as they were.
    """
    final = root / f"step-{progress.step:06d}"
    tmp = root / f".{final.name}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(root)
        tmp.mkdir()  # under the user's umask (mkdtemp would make it 0700)
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json (+ README.md)
        (tmp / "README.md").unlink(missing_ok=True)  # peft's model card for the Hub: not part of a checkpoint
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / OPTIM_FILE)
        save_file(_rng_tensors(), tmp / RNG_FILE)
        state = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "config": config, "progress": asdict(progress),
                 "python_rng": random.getstate()}
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        apply_umask(tmp)  # safetensors writes 0600
        _write_manifest(tmp)
        for path in tmp.iterdir():
            fsync_file(path)
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_write_failure(e):  # a full disk, an I/O error: named, nothing half left
            raise write_error(final, e) from e
        raise
    others = [p for p in list_checkpoints(root) if p != final]
    for old in others[:max(len(others) - (keep - 1), 0)]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


# ---- verification ------------------------------------------------------------------------------


def _read_json(folder: Path, name: str) -> dict[str, Any]:
    try:
        data = json.loads((folder / name).read_bytes().decode("utf-8"))
    except FileNotFoundError as e:
        raise _Damaged(f"{name}: missing") from e
    except OSError as e:
        raise _Damaged(f"{name}: cannot read ({e.strerror})") from e
    except UnicodeDecodeError as e:
        raise _Damaged(f"{name}: not UTF-8 (byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise _Damaged(f"{name}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    except (ValueError, RecursionError) as e:
        raise _Damaged(f"{name}: unreadable JSON ({str(e)[:120]})") from e
    if not isinstance(data, dict):
        raise _Damaged(f"{name}: a JSON {type(data).__name__}, expected an object")
    return data


def _check_file(folder: Path, name: str, entry: dict[str, Any]) -> None:
    """``folder/name`` has the size and sha256 the manifest recorded."""
    path = folder / name
    if not path.is_file():
        raise _Damaged(f"{name}: missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        hint = " (truncated)" if size < entry["bytes"] else ""
        raise _Damaged(f"{name}: {size} bytes, the manifest says {entry['bytes']}{hint}")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise _Damaged(f"{name}: contents differ from the manifest (sha256 {digest[:12]}..., "
                       f"manifest {entry['sha256'][:12]}...)")


def _tensor_diff(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str) -> str | None:
    """The first difference of two {tensor name: shape} maps, in words; None when they are equal."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing:
        return f"tensor {missing[0]} missing ({len(missing)} of the {len(expected)} in {what})"
    if extra:
        return f"tensor {extra[0]} is not in {what} ({len(extra)} such)"
    for name in sorted(found):
        if tuple(found[name]) != tuple(expected[name]):
            return f"tensor {name} has shape {list(found[name])}, in {what} {list(expected[name])}"
    return None


def _read_state(path: Path) -> _State:
    """state.json (checked against manifest.json where the checkpoint has one), without touching the model.

    Raises:
        _Damaged: naming the file and the problem.
    """
    manifest = None
    if (path / MANIFEST_FILE).exists():
        manifest = _read_json(path, MANIFEST_FILE)
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                for e in files.values()) or not isinstance(manifest.get("adapter_tensors"), dict):
            raise _Damaged(f"{MANIFEST_FILE}: malformed (needs files with bytes and sha256, and adapter_tensors)")
        unlisted = [name for name in CHECKPOINT_FILES if name not in files]
        if unlisted:
            raise _Damaged(f"{MANIFEST_FILE}: does not list {', '.join(unlisted)}")
        _check_file(path, STATE_FILE, files[STATE_FILE])
    state = _read_json(path, STATE_FILE)
    version = state.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise _Damaged(f"{STATE_FILE}: checkpoint schema_version {version!r}, expected one of "
                       f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))} (written by another version of medqa-parity)")
    if version >= 2 and manifest is None:
        raise _Damaged(f"{MANIFEST_FILE}: missing (it is written last, so the checkpoint is incomplete)")
    try:
        p = state["progress"]
        progress = TrainProgress(int(p["step"]), int(p["examples_seen"]), tuple(float(x) for x in p["loss_per_step"]),
                                 tuple(float(x) for x in p["step_time_s"]), tuple(int(x) for x in p["step_tokens"]),
                                 tuple(tuple(float(x) for x in step) for step in p.get("rank_step_time_s", ())),
                                 tuple(tuple(int(x) for x in step) for step in p.get("rank_step_tokens", ())))
        config, python_rng = state["config"], state["python_rng"]
        version_, internal, gauss = python_rng
        random.Random().setstate((version_, tuple(internal), gauss))  # a throwaway generator: is it a state?
    except (KeyError, TypeError, ValueError) as e:
        raise _Damaged(f"{STATE_FILE}: malformed ({type(e).__name__}: {e})") from e
    if not isinstance(config, dict):
        raise _Damaged(f"{STATE_FILE}: config is not an object")
    if not (len(progress.loss_per_step) == len(progress.step_time_s) == len(progress.step_tokens) == progress.step):
        raise _Damaged(f"{STATE_FILE}: {len(progress.loss_per_step)} losses recorded for step {progress.step}")
    if {len(progress.rank_step_time_s), len(progress.rank_step_tokens)} - {0, progress.step}:
        raise _Damaged(f"{STATE_FILE}: {len(progress.rank_step_time_s)} per-rank step times recorded for step "
                       f"{progress.step}")
    return _State(progress, config, python_rng, manifest)


def _config_diff(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """Each field of ``expected`` that ``found`` holds otherwise ("train.lr: checkpoint 0.0002, now 0.001").

    Fields only ``found`` has are not compared: older checkpoints stored settings (max_steps, eval_limit)
    that may now change on resume.
    """
    diffs = []
    for key in sorted(expected):
        a, b = found.get(key), expected[key]
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def _check_config(path: Path, state: _State, config: dict[str, Any], n_steps: int | None) -> None:
    diffs = _config_diff(state.config, config)
    if diffs:
        raise CheckpointError(f"{path}: written by another config; " + "; ".join(diffs)
                              + "; resume with the checkpoint's settings, or start a new run without --resume")
    if n_steps is not None and state.progress.step > n_steps:
        raise CheckpointError(f"{path}: at step {state.progress.step}, past the {n_steps} steps this run asks for; "
                              f"resume with --max-steps {state.progress.step} or more")


def _optim_problem(saved: Any, optimizer: torch.optim.Optimizer) -> str | None:
    """Why the saved optimizer state does not fit ``optimizer``'s parameters, or None."""
    try:
        groups, states = saved["optimizer"]["param_groups"], saved["optimizer"]["state"]
        if "last_epoch" not in saved["scheduler"]:
            return "no scheduler state"
        ids = [i for g in groups for i in g["params"]]
    except (KeyError, TypeError) as e:
        return f"not an optimizer and scheduler state ({type(e).__name__}: {e})"
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if len(ids) != len(params):
        return f"state for {len(ids)} parameters, the optimizer has {len(params)}"
    for i, param in zip(ids, params, strict=True):
        for key, value in states.get(i, {}).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
                return f"{key} of parameter {i} has shape {list(value.shape)}, the parameter {list(param.shape)}"
    return None


def _loaded(name: str, load: Any) -> Any:
    """``load()`` of one file; any failure to read it (not out of memory) names the file."""
    try:
        return load()
    except Exception as e:
        if is_oom(e):
            raise
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise _Damaged(f"{name}: unreadable ({type(e).__name__}: {first})") from e


def _verify(path: Path, state: _State, model: Any, optimizer: torch.optim.Optimizer,
            device: torch.device) -> tuple[dict[str, torch.Tensor], Any, dict[str, torch.Tensor]]:
    """Every file of one checkpoint, checked and read: (adapter tensors, optimizer state, RNG tensors).

    Nothing is loaded into the model or optimizer here, so a damaged checkpoint changes nothing.
    """
    from peft import get_peft_model_state_dict

    manifest = state.manifest
    if manifest is not None:
        listed = {k: v for k, v in manifest["adapter_tensors"].items() if isinstance(v, dict)}
        try:
            header = safetensors_tensors(path / ADAPTER_FILE)
        except (OSError, ValueError):
            header = None  # unreadable: the size and sha256 checks below say how
        if header is not None:
            problem = _tensor_diff({k: s for k, (_, s) in header.items()},
                                   {k: tuple(v.get("shape", ())) for k, v in listed.items()}, "the manifest")
            problem = problem or next((f"tensor {k} is {d}, in the manifest {listed[k].get('dtype')}"
                                       for k, (d, _) in sorted(header.items()) if d != listed[k].get("dtype")), None)
            if problem:
                raise _Damaged(f"{ADAPTER_FILE}: {problem}")
        for name, entry in manifest["files"].items():
            if name != STATE_FILE:
                _check_file(path, name, entry)
    else:  # schema 1: as much as loading can prove
        for name in CHECKPOINT_FILES:
            if not (path / name).is_file():
                raise _Damaged(f"{name}: missing")
        for name in (ADAPTER_FILE, RNG_FILE):
            try:
                safetensors_tensors(path / name)
            except ValueError as e:
                raise _Damaged(f"{name}: {e}") from e
    adapter = _loaded(ADAPTER_FILE, lambda: load_file(path / ADAPTER_FILE, device=str(device)))
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    problem = _tensor_diff({k: tuple(v.shape) for k, v in adapter.items()}, expected, "the model's LoRA parameters")
    if problem:
        raise _Damaged(f"{ADAPTER_FILE}: {problem}")
    optim = _loaded(OPTIM_FILE, lambda: torch.load(path / OPTIM_FILE, map_location=device, weights_only=True))
    problem = _optim_problem(optim, optimizer)
    if problem:
        raise _Damaged(f"{OPTIM_FILE}: {problem}")
    rng = _loaded(RNG_FILE, lambda: load_file(path / RNG_FILE))
    torch_state = rng.get("torch")
    if torch_state is None or torch_state.dtype != torch.uint8 or torch_state.shape != torch.get_rng_state().shape:
        raise _Damaged(f"{RNG_FILE}: no torch RNG state of the expected shape")
    return adapter, optim, rng


def check_resume(root: Path, config: dict[str, Any], n_steps: int | None = None) -> Path:
    """Before the model loads: may this run resume from ``root``? Reads only state.json (and the manifest).

    Args:
        config: the settings a checkpoint must share with this run (see :func:`load_checkpoint`).
        n_steps: this run's optimizer steps; a checkpoint past them is refused.

    Returns:
        The newest checkpoint whose state.json is intact (the files are verified by :func:`load_checkpoint`).

    Raises:
        CheckpointError: no checkpoint, none with an intact state.json, another config (each field named),
            or a checkpoint past ``n_steps``.
    """
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        raise CheckpointError(f"{root}: no checkpoint to resume from (no step-* folder); "
                              "write some with --checkpoint-dir first")
    problems = []
    for path in reversed(checkpoints):
        try:
            state = _read_state(path)
        except _Damaged as e:  # named once, when load_checkpoint skips it, or in the error below
            problems.append(f"{path.name}: {e}")
            continue
        _check_config(path, state, config, n_steps)
        return path
    raise CheckpointError(f"{root}: no valid checkpoint to resume from ({'; '.join(problems)})")


def load_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    config: dict[str, Any], n_steps: int | None = None) -> TrainProgress:
    """Restore the newest valid checkpoint under ``root`` into model, optimizer, scheduler and RNGs.

    Newest first, each checkpoint is verified (manifest: sizes, sha256, adapter tensors; the adapter's
    tensor names and shapes against the model's LoRA parameters; optimizer state against the optimizer)
    before anything is loaded; a damaged one is skipped with one warning naming the file.

    Args:
        config: the training-relevant settings of this run; each field must equal the checkpoint's.
        n_steps: this run's optimizer steps; a checkpoint past them is refused.

    Raises:
        CheckpointError: no checkpoint, none valid (each one's problem listed), another config (each field
            that differs named), or a checkpoint past ``n_steps``.
    """
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        raise CheckpointError(f"{root}: no checkpoint to resume from (no step-* folder); "
                              "write some with --checkpoint-dir first")
    problems = []
    for path in reversed(checkpoints):
        try:
            state = _read_state(path)
            _check_config(path, state, config, n_steps)  # the user's to fix: refused, not skipped
            device = next(p.device for p in model.parameters() if p.requires_grad)
            adapter, optim, rng = _verify(path, state, model, optimizer, device)
        except _Damaged as e:
            logger.warning("checkpoint %s skipped: %s", path, e)
            problems.append(f"{path.name}: {e}")
            continue
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, adapter)
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        _set_rng_state(rng, state.python_rng)
        if state.manifest is None:
            logger.info("checkpoint %s has no manifest (schema 1): verified by loading its files", path)
        logger.info("resuming from %s (step %d)", path, state.progress.step)
        return state.progress
    raise CheckpointError(f"{root}: no valid checkpoint to resume from ({'; '.join(problems)})")
