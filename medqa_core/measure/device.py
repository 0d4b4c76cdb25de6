"""The device and the machine's hardware facts, in one place: backend and device resolution, CPU model and
instruction-set flags, host and card memory.

The fingerprint records these facts, numerics chooses the compute dtype from them and the run sizes its memory
promise with them; none of those probes hardware on its own. Everything here is computed on call: importing
this module reads no file and probes no hardware.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import psutil
import torch

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "cuda", "rocm", "cpu")
_BUILD_NAMES = {"cuda": "CUDA", "rocm": "ROCm"}
# CPU flags (x86 /proc/cpuinfo "flags", Arm "Features") that mean native bf16 arithmetic.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# Flags worth keeping in a fingerprint: the ones that decide which CPU kernels run and how fast.
RELEVANT_CPU_FLAGS = frozenset({
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "avx_vnni",  # x86
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm",  # Arm
})
_CPUINFO = Path("/proc/cpuinfo")
_GIB = 2**30


class BackendError(ValueError):
    """A requested backend is unknown or not what the installed torch build provides."""


def detect_backend() -> str:
    """Name the backend torch can use in this process.

    ROCm builds of torch expose AMD GPUs through the ``torch.cuda`` API; ``torch.version.hip``
    is what tells the two apart.

    Returns:
        ``"cuda"``, ``"rocm"`` or ``"cpu"``.
    """
    if not torch.cuda.is_available():
        return "cpu"
    return "cuda" if torch.version.hip is None else "rocm"


def _torch_build() -> str:
    return f"torch {torch.__version__} (torch.version.cuda={torch.version.cuda}, torch.version.hip={torch.version.hip})"


def _backend_mismatch_message(requested: str, detected: str) -> str:
    build = _torch_build()
    if detected != "cpu":
        other = "cuda" if requested == "rocm" else "rocm"
        return (
            f"backend {requested!r} requested, but the installed {build} is a {_BUILD_NAMES[detected]} build; "
            f"install a {_BUILD_NAMES[requested]} build of torch, or use backend {other!r} or 'auto'"
        )
    has_toolkit = torch.version.hip is not None if requested == "rocm" else torch.version.cuda is not None
    if has_toolkit:
        visible = "HIP_VISIBLE_DEVICES" if requested == "rocm" else "CUDA_VISIBLE_DEVICES"
        return (
            f"backend {requested!r} requested and the installed {build} supports it, but "
            f"torch.cuda.is_available() is False; check the GPU driver and {visible}, or use backend 'cpu'"
        )
    return (
        f"backend {requested!r} requested, but the installed {build} has no GPU support; "
        f"install a {_BUILD_NAMES[requested]} build of torch, or use backend 'cpu' or 'auto'"
    )


def resolve_device(backend: str = "auto") -> torch.device:
    """Turn a backend name into the torch device to run on.

    Args:
        backend: One of ``"auto"`` (use what :func:`detect_backend` finds), ``"cuda"``,
            ``"rocm"`` or ``"cpu"``.

    Returns:
        ``torch.device("cuda")`` for CUDA and ROCm (same API), else ``torch.device("cpu")``.

    Raises:
        BackendError: ``backend`` is not a valid name, or names a GPU backend the installed
            torch build cannot use; the message names the torch build and what to do.
    """
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid backends are {', '.join(map(repr, BACKENDS))}")
    if backend == "cpu":
        return torch.device("cpu")
    detected = detect_backend()
    if backend == "auto":
        return torch.device("cpu" if detected == "cpu" else "cuda")
    if detected != backend:
        raise BackendError(_backend_mismatch_message(backend, detected))
    return torch.device("cuda")


def cpu_model(cpuinfo: Path = _CPUINFO) -> str | None:
    """The CPU's model name from /proc/cpuinfo, else ``platform.processor()``, else None."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        logger.debug("cannot read %s (%s); using platform.processor()", cpuinfo, e)
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name" and value.strip():
            return value.strip()
    # Empty string on many Linux machines, so it becomes None rather than a blank model.
    return platform.processor() or None


def ram_gib() -> float:
    """The host's total memory in GiB."""
    return psutil.virtual_memory().total / _GIB


def cpu_isa_flags(cpuinfo: Path = _CPUINFO) -> frozenset[str]:
    """The CPU's instruction-set flags (x86 ``flags``, Arm ``Features``), empty where unreadable."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        logger.debug("cannot read %s: %s", cpuinfo, e)
        return frozenset()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def relevant_cpu_flags(flags: frozenset[str] | None = None) -> list[str]:
    """The fingerprint's share of :func:`cpu_isa_flags`: SIMD, bf16/fp16 and matrix-unit flags, sorted."""
    return sorted((cpu_isa_flags() if flags is None else flags) & RELEVANT_CPU_FLAGS)


def cpu_has_native_bf16(flags: frozenset[str], capability: str | None = None) -> bool:
    """Whether bf16 runs natively: a bf16 flag, and (on x86) torch not capped below its AVX512 kernels.

    ``capability`` is ``torch.backends.cpu.get_cpu_capability()`` (``ATEN_CPU_CAPABILITY=avx2`` caps it):
    with the AVX2 or default kernels bf16 is converted element by element even on a CPU that has it.
    """
    capped = capability in ("DEFAULT", "NO AVX", "AVX2")
    return bool(flags & NATIVE_BF16_FLAGS) and not (capped and platform.machine() in ("x86_64", "AMD64"))


def gpu_name(device: torch.device) -> str | None:
    """The card's name as torch reports it ("NVIDIA H100 80GB HBM3", "AMD Instinct MI300X"); None on CPU."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def device_memory_gib(device: torch.device) -> float | None:
    """The card's total memory in GiB as torch reports it (CUDA and ROCm); None on CPU."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / _GIB
