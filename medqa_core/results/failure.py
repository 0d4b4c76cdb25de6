"""What stopped a job or a bench case: one typed failure (out of memory, a failed write, a signal), the same in
both kinds of file.

A run record keeps it under ``failure``; a bench case under ``extra_info["oom"]``. Both are written
with :meth:`OomFailure.to_dict` and read with :meth:`OomFailure.from_dict`, so readers never look for
keys that only one writer used. No torch here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

OOM = "oom"
# What stops a job: out of memory; a write that failed (full disk, I/O error: run.py); a signal (preemption.py).
FAILURE_KINDS = (OOM, "write", "interrupted")


class FailureError(ValueError):
    """A saved failure cannot be read: a field is missing or of the wrong type."""


@dataclass(frozen=True)
class OomFailure:
    """What stopped a job: an out-of-memory error with the memory in use when it happened, a failed write, or a
    signal. Bench cases only ever record out of memory.

    Attributes:
        phase: what was running ("fine-tune", "evaluate (before)", "timed round 3", ...).
        message: the error's first line.
        memory_allocated_gib: device memory allocated at the time; None on CPU.
        peak_mem_gib: device peak since the last reset; None on CPU.
        host_rss_gib: host resident memory at the time (out of memory only; None in files older than that).
        kind: one of FAILURE_KINDS (kept in the file so a reader tells failures apart).
    """

    phase: str
    message: str
    memory_allocated_gib: float | None = None
    peak_mem_gib: float | None = None
    host_rss_gib: float | None = None
    kind: str = OOM

    def __post_init__(self) -> None:
        if self.kind not in FAILURE_KINDS:
            raise FailureError(f"failure kind {self.kind!r}: known kinds are {', '.join(FAILURE_KINDS)}")

    @property
    def text(self) -> str:
        """E.g. "out of memory during fine-tune (CUDA out of memory. Tried to allocate ...)"."""
        what = {OOM: "out of memory", "write": "a write failed", "interrupted": "interrupted"}[self.kind]
        return f"{what} during {self.phase} ({self.message})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "failure") -> OomFailure:
        """Read a failure as either writer saved it.

        Bench files of case schema 1 named the phase ``during``; it is read as ``phase``.

        Args:
            d: the saved mapping.
            where: names the source in errors ("file.json: test_x[sdpa]: oom").

        Returns:
            The failure.

        Raises:
            FailureError: not a mapping, no phase or message, or a memory figure that is not a number.
        """
        if not isinstance(d, Mapping):
            raise FailureError(f"{where}: expected an object with phase and message, got {type(d).__name__}")
        phase = d.get("phase", d.get("during"))
        message = d.get("message", d.get("error"))  # schema 1 readers looked for "error"
        if not isinstance(phase, str) or not isinstance(message, str):
            raise FailureError(f"{where}: phase {phase!r} and message {message!r} must be text")
        kind = str(d.get("kind", OOM))
        if kind not in FAILURE_KINDS:
            raise FailureError(f"{where}: failure kind {kind!r}: known kinds are {', '.join(FAILURE_KINDS)}")
        figures: dict[str, float | None] = {}
        for key in ("memory_allocated_gib", "peak_mem_gib", "host_rss_gib"):
            value = d.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                      or not math.isfinite(value)):
                raise FailureError(f"{where}: {key} = {value!r} is not a finite number of GiB")
            figures[key] = None if value is None else float(value)
        return cls(phase=phase, message=message, kind=kind, **figures)
