"""The one place for timing and memory measurement: synchronize, time, summarise, peak memory.

GPU work is asynchronous, so a wall-clock reading is only meaningful after
:func:`synchronize`. ROCm builds of torch drive AMD GPUs through the ``torch.cuda`` API, so
every ``cuda`` branch here also covers ROCm (HIP). Warm-up rounds (compile, autotune, allocator
growth) are the caller's to drop before collecting values for :class:`Stats`.
"""

from __future__ import annotations

import gc
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
import psutil
import torch

from medqa_core.results.failure import OomFailure

_GIB = 2**30


def synchronize(device: torch.device) -> None:
    """Wait until all queued work on ``device`` has finished.

    Args:
        device: The device to wait for; CPU work is already synchronous, so this is a no-op there.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # hipDeviceSynchronize on ROCm builds


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window for :func:`peak_memory_gib`.

    Args:
        device: The device whose allocator peak is reset; a no-op on CPU, where the torch
            allocator does not track peaks (use :func:`host_peak_rss_gib`).
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak memory allocated by torch tensors on ``device`` since the last reset.

    Args:
        device: The device to query.

    Returns:
        The peak in GiB on a GPU, or ``None`` on CPU: device memory is not tracked there, and
        reporting 0 would read as a measurement. Host memory is reported by :func:`host_rss_gib`
        and :func:`host_peak_rss_gib`.
    """
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / _GIB


def memory_allocated_gib(device: torch.device) -> float | None:
    """Device memory held by tensors right now, in GiB; None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.memory_allocated(device) / _GIB


def host_rss_gib() -> float:
    """Current resident set size of this process.

    Returns:
        RSS in GiB.
    """
    return psutil.Process().memory_info().rss / _GIB


def host_peak_rss_gib() -> float:
    """Highest resident set size this process has reached since it started.

    The kernel keeps this high-water mark, so unlike GPU peak memory it cannot be reset.

    Returns:
        Peak RSS in GiB.
    """
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is KiB on Linux but bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return max_rss * scale / _GIB


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements, in the unit of the values it was built from.

    Median and IQR are what we compare: they ignore the occasional slow round (GC, clock
    boost, another process) that would drag a mean.
    """

    median: float
    iqr: float
    mean: float
    min: float
    max: float
    n: int

    @classmethod
    def from_values(cls, values: Sequence[float]) -> Stats:
        """Summarise a list of measurements.

        Args:
            values: One value per timed round, warm-up rounds already dropped.

        Returns:
            The summary; IQR is p75 - p25 with numpy's default linear interpolation.

        Raises:
            ValueError: ``values`` is empty.
        """
        if len(values) == 0:
            raise ValueError("Stats.from_values needs at least one value; got an empty sequence")
        array = np.asarray(values, dtype=np.float64)
        p25, p50, p75 = np.percentile(array, [25, 50, 75])
        # Plain floats so the dataclass serialises with json without a custom encoder.
        return cls(
            median=float(p50),
            iqr=float(p75 - p25),
            mean=float(array.mean()),
            min=float(array.min()),
            max=float(array.max()),
            n=int(array.size),
        )


class Timer:
    """Context manager measuring the wall-clock time of its block on ``device``.

    The device is synchronized on entry, so queued earlier work is not billed to the block,
    and on exit, so the block's own queued GPU work is. If the block raises, nothing is
    recorded and the exception propagates.

    Example::

        with Timer(device) as timer:
            model(batch)
        seconds = timer.elapsed_s
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._start: float | None = None
        self._elapsed_s: float | None = None

    def __enter__(self) -> Self:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            # Synchronizing after a failed kernel can raise a second, unrelated-looking error
            # that would hide the real one (e.g. an OOM the caller wants to record).
            return
        synchronize(self.device)
        assert self._start is not None  # __enter__ always ran first
        self._elapsed_s = time.perf_counter() - self._start

    @property
    def elapsed_s(self) -> float:
        """Seconds the block took.

        Raises:
            RuntimeError: The block has not finished, or it raised.
        """
        if self._elapsed_s is None:
            raise RuntimeError("Timer.elapsed_s is only set after the with-block finishes without an exception")
        return self._elapsed_s


def free_device_memory(device: torch.device) -> None:
    """Return unreferenced memory: cycles first (tracebacks, closures hold tensors), then the CUDA/HIP cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# How allocators say they ran out, lower-cased: CUDA's and HIP's caching allocators ("CUDA out of memory",
# "HIP out of memory"), HIP's error name, and torch's CPU allocator ("DefaultCPUAllocator: can't allocate
# memory: you tried to allocate ... bytes. Error code 12 (Cannot allocate memory)").
OOM_MESSAGES = ("out of memory", "hiperroroutofmemory", "can't allocate memory", "cannot allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Tell whether an exception is the device (or, on CPU, the host) running out of memory.

    Used so an OOM becomes a recorded result instead of a crash, on every backend.

    Args:
        exc: The caught exception.

    Returns:
        True for ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``, CUDA and ROCm), for Python's
        ``MemoryError`` (a host allocation that failed), and for a ``RuntimeError`` whose message is one of
        :data:`OOM_MESSAGES`: how HIP and torch's CPU allocator (``DefaultCPUAllocator: can't allocate
        memory``) report it.
    """
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    message = str(exc).lower()
    return any(m in message for m in OOM_MESSAGES)


def oom_failure(exc: BaseException, phase: str, device: torch.device) -> OomFailure:
    """The record of an out-of-memory: what ran, the error's first line and the memory in use at the time
    (device, where it has an allocator, and the host's resident memory).

    The one builder of a run record's ``failure`` and a bench case's ``extra_info["oom"]``
    (:class:`medqa_core.results.failure.OomFailure`). Call it inside the ``except`` block, while the failed
    step's tensors are still referenced: the memory read is the memory at the time.

    Args:
        exc: the error :func:`is_oom` recognised.
        phase: what was running ("fine-tune", "timed round 3", ...).
        device: where it ran out.

    Returns:
        The failure, kind "oom".
    """
    lines = str(exc).strip().splitlines()
    return OomFailure(phase=phase, message=lines[0] if lines else type(exc).__name__,
                      memory_allocated_gib=memory_allocated_gib(device), peak_mem_gib=peak_memory_gib(device),
                      host_rss_gib=host_rss_gib())
