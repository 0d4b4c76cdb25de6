"""The fp8 lever on CPU: the casts and scaling of both vendors' formats, the emulated base matmul and its
backward against bf16, and the refusal where no fp8 tensor cores exist."""

from __future__ import annotations

import pytest
import torch

from medqa_core.engine.fp8 import (
    DTYPES,
    Fp8BaseMatmul,
    Fp8Unavailable,
    fp8_formats,
    quantize_rows,
    run_formats,
    scaled_matmul,
    set_fp8_base,
)


def test_the_two_e4m3_formats_are_not_the_same_format() -> None:
    # OCP e4m3fn (NVIDIA, MI350) reaches 448; gfx942's e4m3fnuz (one more exponent bias) 240, with no -0.
    assert torch.finfo(DTYPES["e4m3fn"]).max == 448 and torch.finfo(DTYPES["e4m3fnuz"]).max == 240
    x = torch.tensor([300.0, -0.0, 1e-3])
    # Past its range a plain cast gives 288 in e4m3fn and NaN in e4m3fnuz (no infinities): quantize_rows clamps.
    assert x.to(DTYPES["e4m3fn"]).float()[0] == 288 and x.to(DTYPES["e4m3fnuz"]).float()[0].isnan()
    assert torch.signbit(x.to(DTYPES["e4m3fn"]).float()[1]) and not torch.signbit(x.to(DTYPES["e4m3fnuz"]).float()[1])


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz", "e5m2", "e5m2fnuz"])
def test_rows_are_scaled_to_the_formats_largest_value(fmt) -> None:
    t = torch.randn(6, 64) * torch.tensor([1e-3, 1, 10, 1e3, 0, 5]).unsqueeze(1)  # rows of every size, one of zeros
    q, scale = quantize_rows(t, fmt)
    top = torch.finfo(DTYPES[fmt]).max
    amax = q.float().abs().amax(dim=1)
    assert torch.equal(amax[[0, 1, 2, 3, 5]], torch.full((5,), top)) and amax[4] == 0 and scale[4] == 1
    rel = ((q.float() * scale - t).norm(dim=1) / t.norm(dim=1).clamp(min=1e-30))[[0, 1, 2, 3, 5]]
    assert rel.max() < (0.04 if fmt.startswith("e4m3") else 0.08)  # 3 or 2 mantissa bits


@pytest.mark.parametrize("formats", [("e4m3fn", "e5m2"), ("e4m3fnuz", "e5m2fnuz")])
def test_the_fp8_base_matmul_and_its_input_gradient_track_bf16(formats) -> None:
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit

    gen = torch.Generator().manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 48, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.load_state_dict({"weight": torch.randn(48, 64, generator=gen)})
    layer = layer.to("cpu")  # quantizes on the move to the device
    x = torch.randn(2, 5, 64, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    w = dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    fmt = fp8_formats(torch.device("cpu"), emulate=True, formats=formats)
    out = Fp8BaseMatmul.apply(x, layer, fmt)
    ref = x.float() @ w.float().T
    assert out.dtype == torch.bfloat16 and out.shape == (2, 5, 48)
    assert ((out.float() - ref).norm() / ref.norm()) < 0.06
    grad = torch.randn(2, 5, 48, generator=gen, dtype=torch.bfloat16)
    out.backward(grad)
    ref_grad = grad.float() @ w.float()
    assert ((x.grad.float() - ref_grad).norm() / ref_grad.norm()) < 0.08
    # The two vendors' formats round differently: the same inputs give different outputs.
    other = fp8_formats(torch.device("cpu"), emulate=True, formats=("e4m3fn", "e5m2") if formats[0].endswith("uz")
                        else ("e4m3fnuz", "e5m2fnuz"))
    assert not torch.equal(out, Fp8BaseMatmul.apply(x.detach(), layer, other))


def test_set_fp8_base_switches_every_4bit_layer_and_back(tiny_session) -> None:
    model = tiny_session.model
    x = torch.randint(3, 1000, (1, 8))
    with torch.no_grad():
        before = model(input_ids=x).logits
        n = set_fp8_base(model, fp8_formats(torch.device("cpu"), emulate=True))
        fp8 = model(input_ids=x).logits
        assert set_fp8_base(model, None) == n == 14  # 2 layers x 7 projections
        after = model(input_ids=x).logits
    assert torch.equal(before, after) and not torch.equal(before, fp8)
    assert ((fp8.float() - before.float()).norm() / before.float().norm()) < 0.1


def test_fp8_is_refused_on_a_device_without_fp8_tensor_cores() -> None:
    with pytest.raises(Fp8Unavailable, match=r"need a GPU with fp8 tensor cores \(cpu here\)"):
        fp8_formats(torch.device("cpu"))


def test_the_emulated_matmul_is_the_scaled_product() -> None:
    a, b = torch.randn(4, 32), torch.randn(8, 32)
    out = scaled_matmul(a, b, "e4m3fn", "e4m3fn", torch.float32, emulate=True)
    aq, sa = quantize_rows(a, "e4m3fn")
    bq, sb = quantize_rows(b, "e4m3fn")
    torch.testing.assert_close(out, (aq.float() * sa) @ (bq.float() * sb).T)


def test_the_fp8_lever_is_refused_before_the_model_loads(tmp_path) -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medqa_core.cli", "train", "--backend", "cpu", "--profile",
                           "default+fp8=true", "--model", str(tmp_path / "no-model-here"), "--results",
                           str(tmp_path / "r")], capture_output=True, text=True, timeout=300)
    # The model folder does not exist: the fp8 refusal comes first, in one line, with exit 2.
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == ("medqa-parity: error: fp8 matmuls need a GPU with fp8 tensor cores (cpu here); "
                                   "train without the fp8 lever (drop +fp8=true)")


@pytest.mark.parametrize(("emulate", "pair"), [("ocp", ("e4m3fn", "e5m2")), ("fnuz", ("e4m3fnuz", "e5m2fnuz"))])
def test_an_emulated_vendor_format_runs_anywhere_and_says_so(emulate, pair) -> None:
    formats = run_formats(torch.device("cpu"), fp8=False, emulate=emulate)
    assert (formats.forward, formats.gradient) == pair and formats.emulated
    assert run_formats(torch.device("cpu"), fp8=False, emulate=None) is None


def test_fp8_emulate_takes_only_the_two_vendor_formats() -> None:
    from medqa_core.engine.config import ConfigError, apply_named_settings

    assert apply_named_settings("default+fp8_emulate=fnuz").fp8_emulate == "fnuz"
    with pytest.raises(ConfigError, match="unknown fp8_emulate 'e4m3'; choose one of ocp, fnuz"):
        apply_named_settings("default+fp8_emulate=e4m3")
