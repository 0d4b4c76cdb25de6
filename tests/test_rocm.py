"""The ROCm branches that run without an AMD GPU, with ``torch.version.hip`` faked (nothing here ran on ROCm).

What the fakes cannot show (a HIP kernel running, bitsandbytes' ROCm build quantizing, amdsmi's real counter)
is listed in docs/rocm.md as not run.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from medqa_core.engine.model import MIN_BNB_ROCM, ModelLoadError, _check_bnb
from medqa_core.engine.numerics import resolve_numerics
from medqa_core.measure.ceilings import EnergyMeter
from medqa_core.measure.device import detect_backend

# Imported before any test fakes a ROCm build: bitsandbytes probes the GPU architecture on import.
bitsandbytes = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
GPU = torch.device("cuda", 0)  # a device object needs no GPU; nothing is allocated on it below


@pytest.fixture
def rocm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.41133")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_rocm_build_is_detected_as_rocm(rocm) -> None:
    assert detect_backend() == "rocm"


@pytest.mark.parametrize(("version", "refused"), [("0.49.1", True), ("0.50.0", False), ("0.50.2", False)])
def test_bitsandbytes_floor_on_rocm(rocm, monkeypatch: pytest.MonkeyPatch, version: str, refused: bool) -> None:
    monkeypatch.setattr(bitsandbytes, "__version__", version)
    if refused:
        expected = f"bitsandbytes {version} on ROCm: 4-bit gave NaNs before {MIN_BNB_ROCM}"
        with pytest.raises(ModelLoadError, match=expected):
            _check_bnb(GPU)
    else:
        _check_bnb(GPU)


def test_the_floor_is_rocm_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(bitsandbytes, "__version__", "0.45.0")
    _check_bnb(GPU)  # CUDA: 4-bit was sound before 0.50


@pytest.mark.parametrize(("native", "expected"), [(True, "bfloat16"), (False, "float16")])
def test_auto_dtype_on_an_amd_gpu(rocm, monkeypatch: pytest.MonkeyPatch, native: bool, expected: str) -> None:
    # MI250/MI300 compute bf16 natively; an MI100 (gfx908) does not, and gets fp16 with a gradient scaler.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "AMD Instinct MI100")
    numerics = resolve_numerics("auto", GPU)
    assert numerics.compute_dtype == expected
    assert ("lacks native bf16" in numerics.reason) == (not native)


def _fake_amdsmi(monkeypatch: pytest.MonkeyPatch, count: dict) -> list[str]:
    calls: list[str] = []
    fake = types.ModuleType("amdsmi")
    fake.AmdSmiException = type("AmdSmiException", (Exception,), {})
    fake.amdsmi_get_energy_count = lambda handle: (calls.append(handle), count)[1]
    fake.amdsmi_shut_down = lambda: calls.append("shut down")
    monkeypatch.setitem(sys.modules, "amdsmi", fake)
    monkeypatch.setattr(torch.cuda, "_get_amdsmi_handler", lambda device=None: "handle-0", raising=False)
    return calls


@pytest.mark.parametrize("key", ["energy_accumulator", "power"])  # ROCm 6.2+ bindings, and ROCm 6.0-6.1's name
def test_energy_through_amdsmi(rocm, monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    calls = _fake_amdsmi(monkeypatch, {key: 2_000_000, "counter_resolution": 15.3})
    with EnergyMeter(GPU) as meter:
        assert meter.source == "amdsmi" and meter.available
        assert meter.read_j() == pytest.approx(2_000_000 * 15.3 / 1e6)  # microjoules per count
    assert calls[0] == "handle-0" and calls[-1] == "shut down"


def test_no_amdsmi_is_reported_not_raised(rocm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "amdsmi", None)  # an import of it fails
    with EnergyMeter(GPU) as meter:
        assert not meter.available and "amdsmi not importable" in meter.reason


def test_rocm_runs_carry_the_not_validated_note(tiny_session, rocm) -> None:
    import dataclasses

    from medqa_core.run import ROCM_NOTE, _notes

    session = dataclasses.replace(tiny_session, device=GPU)
    assert ROCM_NOTE in _notes(session)
