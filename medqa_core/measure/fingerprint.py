"""Machine fingerprint carried by every run record and every pytest-benchmark file.

Everything here is computed on call: importing this module probes no hardware, runs no
subprocess and reads no file. Each probe is a small private function that records ``None``
when its source is absent (no GPU, no git, no NVML) instead of raising, so a fingerprint can
always be written next to a result.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import psutil
import torch

from medqa_core.engine.config import BACKENDS as VALID_BACKENDS
from medqa_core.engine.numerics import relevant_cpu_flags

logger = logging.getLogger(__name__)


# Distributions whose versions change the numbers we report; looked up by distribution name.
TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "accelerate",
    "mistral-common",
    "safetensors",
    "numpy",
    "pytest-benchmark",
    "medqa-parity",
)

_GIB = 2**30
# A hung git (network filesystem, credential prompt) must not stall a benchmark run.
_GIT_TIMEOUT_S = 5.0
_CPUINFO = Path("/proc/cpuinfo")
_NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
_AMDGPU_VERSION = Path("/sys/module/amdgpu/version")
_BUILD_NAMES = {"cuda": "CUDA", "rocm": "ROCm"}


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
    if backend not in VALID_BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; valid backends are {', '.join(map(repr, VALID_BACKENDS))}")
    if backend == "cpu":
        return torch.device("cpu")
    detected = detect_backend()
    if backend == "auto":
        return torch.device("cpu" if detected == "cpu" else "cuda")
    if detected != backend:
        raise BackendError(_backend_mismatch_message(backend, detected))
    return torch.device("cuda")


def _cpu_model(cpuinfo: Path = _CPUINFO) -> str | None:
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


def _ram_gib() -> float:
    return psutil.virtual_memory().total / _GIB


def _cudnn_version() -> int | None:
    # On ROCm builds this is the MIOpen version; None on CPU-only builds.
    if not torch.backends.cudnn.is_available():
        return None
    return torch.backends.cudnn.version()


def _parse_nvidia_proc_version(text: str) -> str | None:
    # First line is "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 ..." for the
    # proprietary module and "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release
    # Build ..." for the open one, so take the first dotted number after "Kernel Module".
    match = re.search(r"Kernel Module\b.*?\s(\d+(?:\.\d+)+)\s", text)
    if match:
        return match.group(1)
    first_line = text.strip().splitlines()[0].strip() if text.strip() else ""
    return first_line or None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        logger.debug("cannot read %s: %s", path, e)
        return None


def _nvml_driver_version() -> str | None:
    try:
        import pynvml  # provided by nvidia-ml-py; optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError as e:
        logger.debug("NVML could not report the driver version: %s", e)
        return None
    # Older pynvml releases return bytes.
    return version.decode() if isinstance(version, bytes) else str(version)


def _driver_version(backend: str) -> str | None:
    if backend == "cuda":
        version = _nvml_driver_version()
        if version is not None:
            return version
        text = _read_text(_NVIDIA_PROC_VERSION)
        return _parse_nvidia_proc_version(text) if text is not None else None
    if backend == "rocm":
        text = _read_text(_AMDGPU_VERSION)
        return (text.strip() or None) if text is not None else None
    return None


def _gpu_fields(device: torch.device, backend: str) -> dict[str, Any]:
    fields: dict[str, Any] = dict.fromkeys(
        ("gpu_name", "gpu_memory_gib", "gpu_arch", "gpu_multiprocessors", "gpu_count", "driver_version")
    )
    if device.type != "cuda":
        return fields
    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    # ROCm reports compute capability as a placeholder; the gfx target (e.g. "gfx90a:sramecc+:xnack-")
    # is what identifies the chip.
    arch = getattr(props, "gcnArchName", None) if backend == "rocm" else None
    fields.update(
        gpu_name=props.name,
        gpu_memory_gib=props.total_memory / _GIB,
        gpu_arch=arch or f"{props.major}.{props.minor}",
        gpu_multiprocessors=props.multi_processor_count,
        gpu_count=torch.cuda.device_count(),
        driver_version=_driver_version(backend),
    )
    return fields


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError) as e:
        # Not a checkout, no commits yet, git missing or hung: the record says None.
        logger.debug("git %s in %s failed: %s", " ".join(args), cwd, e)
        return None
    return result.stdout


def _git_info(source_dir: Path) -> tuple[str | None, bool | None]:
    stated = os.environ.get("MEDQA_PARITY_GIT_COMMIT")
    if stated:
        # The launcher says which commit it copied (e.g. to a GPU host, whose copy may carry a stale .git):
        # its word wins; whether that copy was clean is then unknown.
        return stated, None
    head = _git(["rev-parse", "HEAD"], source_dir)
    commit = head.strip() if head is not None else None
    if commit is not None and not re.fullmatch(r"[0-9a-f]{40}", commit):
        logger.debug("git rev-parse HEAD gave %r, not a commit hash", commit)
        commit = None
    if commit is None:  # not a checkout, or git missing
        return None, None
    status = _git(["status", "--porcelain"], source_dir)
    dirty = bool(status.strip()) if status is not None else None
    return commit, dirty


def machine_fingerprint(device: torch.device | None = None) -> dict[str, Any]:
    """Describe the machine, software and source tree a result was produced on.

    Args:
        device: The device the run uses; ``None`` means ``resolve_device("auto")``. GPU fields
            are filled only for a ``cuda`` device (CUDA or ROCm) and are ``None`` otherwise.

    Returns:
        A JSON-serialisable dict: ``backend``, ``python_version``, ``platform``, ``hostname``,
        ``cpu_model``, ``cpu_flags`` (SIMD, bf16/fp16 and matrix-unit flags), ``cpu_capability`` (the ATen
        kernels torch runs: AVX2, AVX512, ...), ``cpu_cores_physical``, ``cpu_cores_logical``, ``ram_gib``,
        ``torch_version``, ``torch_cuda``, ``torch_hip``, ``cudnn_version``, ``gpu_name``,
        ``gpu_memory_gib``, ``gpu_arch`` (compute capability such as ``"9.0"``, or the gfx target
        on ROCm), ``gpu_multiprocessors``, ``gpu_count``, ``driver_version``, ``packages``
        (distribution name -> version or ``None``), ``git_commit`` (40 hex digits or ``None``)
        and ``git_dirty`` (``None`` outside a git checkout).

    Raises:
        BackendError: ``device`` is neither a CPU nor a CUDA/ROCm device.
    """
    if device is None:
        device = resolve_device("auto")
    if device.type == "cuda":
        backend = detect_backend()
    elif device.type == "cpu":
        backend = "cpu"
    else:
        raise BackendError(
            f"cannot fingerprint device {device}; supported device types are 'cuda' (CUDA/ROCm) and 'cpu'"
        )
    commit, dirty = _git_info(Path(__file__).resolve().parent)
    return {
        "backend": backend,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        # The ISA flags that decide which CPU kernels run (bf16 native or emulated), and the kernels torch picked.
        "cpu_flags": relevant_cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_gib": _ram_gib(),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass; store plain str
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "cudnn_version": _cudnn_version(),
        **_gpu_fields(device, backend),
        "packages": _package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
