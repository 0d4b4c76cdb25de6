"""The gate's thresholds: how much worse a candidate may be, read from one TOML table.

The defaults are :class:`Thresholds`' own (the parity ones are the report's, from compare/parity.py): their
one home. A project overrides them in ``[tool.medqa-parity.gate]`` of the nearest pyproject.toml or of the
file ``--config`` names (this project's CI: ``.ci/gate.toml``, the one file its CI thresholds live in);
``--threshold NAME=VALUE`` overrides one key.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa_core.compare.inputs import CompareError
from medqa_core.compare.metrics import MEMORY_KEYS as MEMORY
from medqa_core.compare.metrics import SPEED_KEYS as SPEED
from medqa_core.compare.parity import ALPHA, DEFAULT_KL_TOLERANCE_NATS, DEFAULT_MARGIN_PP, Tolerances

CONFIG_TABLE = ("tool", "medqa-parity", "gate")


class GateError(CompareError):
    """Bad input: a file that cannot be read, bad thresholds, or runs that cannot be compared."""


@dataclass(frozen=True)
class Thresholds:
    """How much worse the candidate may be before the gate fails.

    Attributes:
        speed_pct: allowed drop of a throughput, percent of the baseline (> 0).
        memory_pct: allowed growth of peak memory, percent of the baseline (> 0).
        accuracy_pp: allowed drop of accuracy, percentage points (> 0).
        parity_margin_pp: equivalence margin of the parity verdict (TOST), percentage points.
        kl_nats: highest mean KL divergence of same-weights scores in the parity verdict.
        alpha: significance level of the speed, accuracy and parity tests.
        machine_pct: speed is not compared where every machine ceiling both runs measured (matmul
            FLOP/s, copy bandwidth) moved by more than this percent (> 0); None: not checked.
        metric_pct: per-metric overrides of speed_pct / memory_pct, by metric key
            (e.g. ``(("decode_tokens_per_s", 30.0),)``); set as ``<metric>_pct``.
        skip: metric keys, or "speed", "memory", "accuracy", "parity", not gated.
        allow_missing: metric keys, or "speed", "memory", whose figure may be missing or non-finite in a
            matched case: listed as not compared (and counted) instead of failing.
    """

    speed_pct: float = 10.0
    memory_pct: float = 10.0
    accuracy_pp: float = 2.0
    parity_margin_pp: float = DEFAULT_MARGIN_PP  # the parity verdict's own defaults (compare/parity.py)
    kl_nats: float = DEFAULT_KL_TOLERANCE_NATS
    alpha: float = ALPHA
    machine_pct: float | None = None
    metric_pct: tuple[tuple[str, float], ...] = ()
    skip: tuple[str, ...] = ()
    allow_missing: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("speed_pct", "memory_pct", "accuracy_pp", "parity_margin_pp"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise GateError(f"threshold {name}={value!r}: give the allowed change as a positive number "
                                f"(e.g. {name}=10 fails on a change of more than 10 in the bad direction)")
        m = self.machine_pct
        if m is not None and not (isinstance(m, int | float) and math.isfinite(m) and m > 0):
            raise GateError(f"threshold machine_pct={m!r}: give a positive percent (e.g. machine_pct=10 leaves speed "
                            "not compared where every ceiling the runs measured moved by more than 10%)")
        if not (isinstance(self.kl_nats, int | float) and self.kl_nats >= 0):
            raise GateError(f"threshold kl_nats={self.kl_nats!r}: must be >= 0 nats")
        if not (isinstance(self.alpha, int | float) and 0 < self.alpha < 1):
            raise GateError(f"threshold alpha={self.alpha!r}: must be between 0 and 1 (e.g. 0.05)")
        for key, value in self.metric_pct:
            if key not in (*SPEED, *MEMORY):
                raise GateError(f"threshold {key}_pct: no metric {key!r}; per-metric thresholds exist for "
                                f"{', '.join(f'{k}_pct' for k in (*SPEED, *MEMORY))}")
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise GateError(f"threshold {key}_pct={value!r}: give the allowed change as a positive number")
        known = {*SPEED, *MEMORY, "speed", "memory", "accuracy", "parity"}
        for name, values in (("skip", self.skip), ("allow_missing", self.allow_missing)):
            unknown = [s for s in values if s not in known]
            if unknown:
                raise GateError(f"{name}: unknown {', '.join(map(repr, unknown))}; use speed, memory, accuracy, "
                                f"parity or a metric key ({', '.join((*SPEED, *MEMORY))})")

    def pct(self, metric: str) -> float:
        """The percent threshold of one speed or memory metric (its override, else its kind's)."""
        overrides = dict(self.metric_pct)
        if metric in overrides:
            return overrides[metric]
        return self.speed_pct if metric in SPEED else self.memory_pct

    def gated(self, kind: str, metric: str | None = None) -> bool:
        """Whether checks of ``kind`` (and ``metric``) are gated, i.e. not in ``skip``."""
        return kind not in self.skip and (metric is None or metric not in self.skip)

    def missing_ok(self, kind: str, metric: str) -> bool:
        """Whether a missing or non-finite figure of ``metric`` is listed as not compared rather than failed."""
        return kind in self.allow_missing or metric in self.allow_missing

    @property
    def tolerances(self) -> Tolerances:
        """The parity verdict's tolerances."""
        return Tolerances(margin_pp=self.parity_margin_pp, kl_nats=self.kl_nats, alpha=self.alpha)



def find_pyproject(start: str | Path) -> Path | None:
    """The nearest pyproject.toml in ``start`` or a folder above it.

    Args:
        start: where to begin (usually the working directory).

    Returns:
        Its path, or None when there is none up to the root.
    """
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def read_gate_table(path: str | Path) -> dict[str, Any]:
    """The ``[tool.medqa-parity.gate]`` table of a pyproject.toml, or of another TOML file such as
    this project's ``.ci/gate.toml`` (empty when it has none).

    Args:
        path: the TOML file.

    Returns:
        The table's keys and values.

    Raises:
        GateError: the file is missing, unreadable or not TOML, or the entry is not a table.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise GateError(f"{path}: cannot read ({e.strerror}); give --config a TOML file with a "
                        f"[{'.'.join(CONFIG_TABLE)}] table (pyproject.toml, .ci/gate.toml)") from e
    except tomllib.TOMLDecodeError as e:
        raise GateError(f"{path}: not TOML ({e})") from e
    table: Any = doc
    for key in CONFIG_TABLE:
        table = table.get(key, {}) if isinstance(table, dict) else None
    if not isinstance(table, dict):
        raise GateError(f"{path}: [{'.'.join(CONFIG_TABLE)}] is not a table")
    return table


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings from the command line as threshold values.

    Args:
        items: e.g. ``["speed_pct=40", "memory_pct=25"]``.

    Returns:
        Name -> float.

    Raises:
        GateError: an item without ``=`` or with a value that is not a number.
    """
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError as e:
            raise GateError(f"--threshold {item!r}: expected NAME=NUMBER, e.g. speed_pct=10 or accuracy_pp=2") from e
    return out


def thresholds_from_mapping(values: Mapping[str, Any], where: str = "thresholds") -> Thresholds:
    """Build thresholds from pyproject keys and command-line overrides (unknown names are refused).

    Args:
        values: e.g. ``{"speed_pct": 10, "decode_tokens_per_s_pct": 30, "skip": ["parity"]}``.
        where: named in error messages (the file, or "--threshold").

    Returns:
        The thresholds; keys not given keep their defaults.

    Raises:
        GateError: an unknown name or a bad value.
    """
    lists = ("skip", "allow_missing")
    plain = {f.name for f in dataclasses.fields(Thresholds)} - {"metric_pct", *lists}
    kwargs: dict[str, Any] = {}
    per_metric: dict[str, float] = {}
    for name, value in values.items():
        if name in plain:
            kwargs[name] = value
        elif name in lists:
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise GateError(f"{where}: {name} must be a list of names, e.g. {name} = [\"parity\"]")
            kwargs[name] = tuple(value)
        elif name.endswith("_pct") and name.removesuffix("_pct") in (*SPEED, *MEMORY):
            per_metric[name.removesuffix("_pct")] = value
        else:
            known = sorted(plain) + [f"{k}_pct" for k in (*SPEED, *MEMORY)] + list(lists)
            raise GateError(f"{where}: unknown threshold {name!r}; known: {', '.join(known)}")
    for name, value in kwargs.items():
        if name not in lists and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise GateError(f"{where}: {name} = {value!r} is not a number")
    return Thresholds(**kwargs, metric_pct=tuple(sorted(per_metric.items())))


def load_thresholds(config: str | Path | None, overrides: Sequence[str], start: str | Path = ".") -> Thresholds:
    """Thresholds from ``--config`` (or the nearest pyproject.toml above ``start``), then ``--threshold``.

    Args:
        config: a pyproject.toml given on the command line, or None to search.
        overrides: ``NAME=VALUE`` items; they win over the file.
        start: where the search for pyproject.toml begins.

    Returns:
        The thresholds (defaults for keys given nowhere).

    Raises:
        GateError: unreadable config, unknown names, bad values.
    """
    path = Path(config) if config is not None else find_pyproject(start)
    table = read_gate_table(path) if path is not None else {}
    where = str(path) if path is not None else "defaults"
    file_values = thresholds_from_mapping(table, where)  # checked alone, so an error names the file
    merged = {**table, **parse_overrides(overrides)}
    return file_values if not overrides else thresholds_from_mapping(merged, "--threshold")
