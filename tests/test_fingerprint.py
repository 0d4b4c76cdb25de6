"""Tests for medqa_core.measure.fingerprint: backend detection, device resolution, the fingerprint dict."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from medqa_core.measure import device, fingerprint
from medqa_core.measure.device import BackendError, detect_backend, resolve_device
from medqa_core.measure.fingerprint import machine_fingerprint

cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts CPU-machine behaviour; a GPU is visible")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")

GPU_FIELDS = ("gpu_name", "gpu_memory_gib", "gpu_arch", "gpu_multiprocessors", "gpu_count", "driver_version")


def _fake_torch_build(monkeypatch: pytest.MonkeyPatch, available: bool, cuda: str | None, hip: str | None) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.version, "cuda", cuda)
    monkeypatch.setattr(torch.version, "hip", hip)


@pytest.mark.parametrize(
    ("available", "cuda", "hip", "expected"),
    [
        (True, "12.4", None, "cuda"),
        (True, None, "6.2.41133", "rocm"),
        (False, "12.4", None, "cpu"),
        (False, None, None, "cpu"),
    ],
)
def test_detect_backend_tells_cuda_from_rocm_by_torch_version_hip(
    monkeypatch: pytest.MonkeyPatch, available: bool, cuda: str | None, hip: str | None, expected: str
) -> None:
    _fake_torch_build(monkeypatch, available, cuda, hip)
    assert detect_backend() == expected


@cpu_only
def test_detect_backend_is_cpu_here() -> None:
    assert detect_backend() == "cpu"
    assert resolve_device("auto") == torch.device("cpu")


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")


@cpu_only
@pytest.mark.parametrize("backend", ["cuda", "rocm"])
def test_resolve_device_gpu_on_cpu_build_names_the_torch_build(backend: str) -> None:
    with pytest.raises(BackendError) as info:
        resolve_device(backend)
    message = str(info.value)
    assert backend in message
    assert str(torch.__version__) in message
    assert f"torch.version.cuda={torch.version.cuda}" in message
    assert f"torch.version.hip={torch.version.hip}" in message


def test_resolve_device_rocm_on_cuda_build_says_it_is_a_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_build(monkeypatch, available=True, cuda="12.4", hip=None)
    with pytest.raises(BackendError, match=r"torch\.version\.cuda=12\.4.*is a CUDA build; install a ROCm build"):
        resolve_device("rocm")
    assert resolve_device("cuda") == torch.device("cuda")


def test_resolve_device_cuda_build_without_visible_gpu_points_at_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch_build(monkeypatch, available=False, cuda="12.4", hip=None)
    with pytest.raises(BackendError, match="CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda")


def test_resolve_device_rejects_unknown_backend_naming_valid_ones() -> None:
    with pytest.raises(BackendError, match="bogus") as info:
        resolve_device("bogus")
    for valid in ("auto", "cuda", "rocm", "cpu"):
        assert repr(valid) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_fingerprint_is_json_serialisable_and_round_trips() -> None:
    fp = machine_fingerprint(torch.device("cpu"))
    assert json.loads(json.dumps(fp)) == fp


def test_fingerprint_on_cpu_device() -> None:
    fp = machine_fingerprint(torch.device("cpu"))
    assert fp["backend"] == "cpu"
    for field in GPU_FIELDS:
        assert fp[field] is None, field
    assert fp["torch_version"] == str(torch.__version__)
    assert fp["torch_cuda"] == torch.version.cuda
    assert fp["torch_hip"] == torch.version.hip
    assert fp["cpu_cores_logical"] >= 1
    assert fp["ram_gib"] > 0


@cpu_only
def test_fingerprint_default_device_is_cpu_here() -> None:
    fp = machine_fingerprint()
    assert fp["backend"] == "cpu"
    assert fp["gpu_name"] is None


def test_fingerprint_package_versions() -> None:
    packages = machine_fingerprint(torch.device("cpu"))["packages"]
    assert set(packages) == set(fingerprint.TRACKED_PACKAGES)
    # The distribution's metadata may drop the local build tag ("2.11.0" for torch 2.11.0+cu130).
    assert packages["torch"].split("+")[0] == str(torch.__version__).split("+")[0]
    assert packages["pytest-benchmark"] is not None  # installed: this test session uses it


def test_fingerprint_git_commit_is_none_or_full_hash() -> None:
    fp = machine_fingerprint(torch.device("cpu"))
    assert fp["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", fp["git_commit"])
    assert fp["git_dirty"] is None or isinstance(fp["git_dirty"], bool)


def test_fingerprint_rejects_unsupported_device_type() -> None:
    with pytest.raises(BackendError, match="meta"):
        machine_fingerprint(torch.device("meta"))


def test_git_info_outside_a_checkout_is_none(tmp_path: Path) -> None:
    assert fingerprint._git_info(tmp_path) == (None, None)


@needs_git
def test_git_info_reads_commit_and_dirty_state(tmp_path: Path) -> None:
    def git(*args: str) -> str:
        identity = ["-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
        return subprocess.run(
            ["git", *identity, *args], cwd=tmp_path, check=True, capture_output=True, text=True
        ).stdout

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    git("add", "a.txt")
    git("commit", "-q", "-m", "first")
    head = git("rev-parse", "HEAD").strip()

    assert fingerprint._git_info(tmp_path) == (head, False)
    (tmp_path / "a.txt").write_text("two\n")
    assert fingerprint._git_info(tmp_path) == (head, True)


def test_stated_commit_wins_over_a_copied_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A GPU host's copy of the tree can carry a stale .git: the launcher's MEDQA_PARITY_GIT_COMMIT is believed.
    stated = "a" * 40
    monkeypatch.setenv("MEDQA_PARITY_GIT_COMMIT", stated)
    assert fingerprint._git_info(Path(fingerprint.__file__).parent) == (stated, None)
    monkeypatch.delenv("MEDQA_PARITY_GIT_COMMIT")
    assert fingerprint._git_info(tmp_path) == (None, None)


def test_cpu_model_reads_model_name_from_cpuinfo(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert device.cpu_model(cpuinfo) == "AMD EPYC 9654 96-Core Processor"


def test_cpu_model_falls_back_to_platform_processor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device.platform, "processor", lambda: "aarch64")
    assert device.cpu_model(tmp_path / "missing") == "aarch64"
    monkeypatch.setattr(device.platform, "processor", lambda: "")
    assert device.cpu_model(tmp_path / "missing") is None


def test_parse_nvidia_proc_version() -> None:
    # Format of /proc/driver/nvidia/version on an R535 driver.
    text = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
        "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
    )
    assert fingerprint._parse_nvidia_proc_version(text) == "535.104.05"
    # Open kernel module, as read on an H100 machine with driver 580.159.04.
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (nixbld@)  \n"
    assert fingerprint._parse_nvidia_proc_version(open_module) == "580.159.04"
    assert fingerprint._parse_nvidia_proc_version("") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_fingerprint_on_gpu_fills_gpu_fields() -> None:
    fp = machine_fingerprint(torch.device("cuda"))
    assert fp["backend"] in ("cuda", "rocm")
    assert fp["gpu_name"]
    assert fp["gpu_memory_gib"] > 0
    assert fp["gpu_count"] >= 1
    assert json.loads(json.dumps(fp)) == fp
