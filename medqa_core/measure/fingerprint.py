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

from medqa_core.measure.device import (
    BackendError,
    cpu_model,
    detect_backend,
    ram_gib,
    relevant_cpu_flags,
    resolve_device,
)

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
_NVIDIA_PROC_VERSION = Path("/proc/driver/nvidia/version")
_AMDGPU_VERSION = Path("/sys/module/amdgpu/version")


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
        "cpu_model": cpu_model(),
        # The ISA flags that decide which CPU kernels run (bf16 native or emulated), and the kernels torch picked.
        "cpu_flags": relevant_cpu_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "ram_gib": ram_gib(),
        "torch_version": str(torch.__version__),  # TorchVersion is a str subclass; store plain str
        "torch_cuda": torch.version.cuda,
        "torch_hip": torch.version.hip,
        "cudnn_version": _cudnn_version(),
        **_gpu_fields(device, backend),
        "packages": _package_versions(),
        "git_commit": commit,
        "git_dirty": dirty,
    }
