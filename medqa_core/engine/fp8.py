"""fp8 matmuls for the frozen 4-bit base: the ``fp8`` training lever.

What runs in fp8: the base layers' forward matmul (``x @ W^T``) and the input-gradient matmul of their backward
(``grad @ W``). LoRA, norms, the optimizer state and the loss stay as they are, and the base has no weight
gradient. Each matmul quantizes both operands with **per-row amax scaling** (each row of the activations or
gradients, each output channel of the weight for the forward and each input channel for the backward gets its own
float32 scale, ``amax / fp8_max``) and multiplies through ``torch._scaled_mm`` with those row-wise scales,
accumulating in float32 and writing bf16. The 4-bit weight is dequantized (bitsandbytes' own dequantize) and cast
each call, as bitsandbytes' bf16 path dequantizes it each call; nothing extra is kept for the backward.

Why ``torch._scaled_mm`` and not torchao's float8 training: torchao's ``Float8Linear`` swaps ``nn.Linear``
modules that own a high-precision weight and trains it; the base here is a bitsandbytes 4-bit layer with no such
weight and no weight gradient, so only the scaled matmul itself is of use, and PyTorch has it.

The format follows the hardware (:func:`fp8_formats`): OCP e4m3fn (forward) and e5m2 (gradients) on NVIDIA
(sm_89 and newer) and OCP AMD parts (gfx950: MI350/MI355X); e4m3fnuz/e5m2fnuz on gfx942 (MI300X), which computes
only the "fnuz" variants (no negative zero, no infinities, exponent bias one higher: max 240 instead of 448).
Elsewhere it is refused before the model loads. ``emulate=True`` (tests, and a format this device does not
compute) casts with PyTorch's real fp8 casts and multiplies the dequantized values in float32: the rounding of
each format is real, only the matmul is emulated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"e4m3fn": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e4m3fnuz": torch.float8_e4m3fnuz,
          "e5m2fnuz": torch.float8_e5m2fnuz}
OCP, FNUZ = ("e4m3fn", "e5m2"), ("e4m3fnuz", "e5m2fnuz")  # (forward operands, gradients)


class Fp8Unavailable(ValueError):
    """fp8 matmuls cannot run on this device."""


@dataclass(frozen=True)
class Fp8Formats:
    """The fp8 formats a run uses: recorded in the run record and the bench file."""

    forward: str  # activations and weights: e4m3fn or e4m3fnuz
    gradient: str  # output gradients in the backward: e5m2 or e5m2fnuz
    scaling: str = "per-row amax (activation rows, weight output channels; input channels in the backward)"
    emulated: bool = False  # casts real, matmul in float32 from the dequantized fp8 values


def fp8_formats(device: torch.device, emulate: bool = False, formats: tuple[str, str] | None = None) -> Fp8Formats:
    """The fp8 formats ``device`` computes, or the ``formats`` asked for under emulation.

    Raises:
        Fp8Unavailable: no fp8 tensor cores here (CPU, NVIDIA before sm_89, AMD before gfx942), with what to do.
    """
    if emulate:
        forward, gradient = formats or OCP
        return Fp8Formats(forward, gradient, emulated=True)
    if device.type != "cuda":
        raise Fp8Unavailable(f"fp8 matmuls need a GPU with fp8 tensor cores ({device.type} here); train without "
                             "the fp8 lever (drop +fp8=true)")
    if torch.version.hip:
        arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
        if arch == "gfx942":
            return Fp8Formats(*FNUZ)
        if arch.startswith("gfx95"):
            return Fp8Formats(*OCP)
        raise Fp8Unavailable(f"{arch} has no fp8 tensor cores (gfx942 and gfx950 have); train without the fp8 lever")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise Fp8Unavailable(f"{torch.cuda.get_device_name(device)} (sm_{major}{minor}) has no fp8 tensor cores "
                             "(sm_89 and newer have); train without the fp8 lever")
    return Fp8Formats(*OCP)


def run_formats(device: torch.device, fp8: bool, emulate: str | None) -> Fp8Formats | None:
    """What a run's fp8 settings (TrainConfig.fp8, .fp8_emulate) run on ``device``: None where both are off.

    Raises:
        Fp8Unavailable: ``fp8`` on a device without fp8 tensor cores (an emulated format runs anywhere).
    """
    if emulate:
        return fp8_formats(device, emulate=True, formats=FNUZ if emulate == "fnuz" else OCP)
    return fp8_formats(device) if fp8 else None


def quantize_rows(t: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``t`` [R, C] as fp8 rows and their float32 scales [R, 1]: ``t ~= q * scale``, each row's amax at the
    format's largest value. An all-zero row gets scale 1."""
    dtype = DTYPES[fmt]
    amax = t.detach().abs().amax(dim=1, keepdim=True).float()  # [R, 1]
    scale = torch.where(amax > 0, amax / torch.finfo(dtype).max, torch.ones_like(amax))
    q = (t.float() / scale).clamp(torch.finfo(dtype).min, torch.finfo(dtype).max).to(dtype)
    return q, scale


def scaled_matmul(a: torch.Tensor, b: torch.Tensor, a_fmt: str, b_fmt: str, out_dtype: torch.dtype,
                  emulate: bool) -> torch.Tensor:
    """``a @ b^T`` for a [M, K] and b [N, K], both quantized by rows: [M, N] in ``out_dtype``."""
    aq, sa = quantize_rows(a, a_fmt)
    bq, sb = quantize_rows(b, b_fmt)
    if emulate:
        return ((aq.float() * sa) @ (bq.float() * sb).T).to(out_dtype)
    # _scaled_mm wants A row-major and B column-major: bq [N, K] row-major, so bq.t() is [K, N] column-major.
    return torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.view(1, -1), out_dtype=out_dtype)


class Fp8BaseMatmul(torch.autograd.Function):
    """``x @ W^T`` of a frozen 4-bit base layer in fp8, and ``grad @ W`` in its backward (no weight gradient)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: torch.nn.Module, formats: Fp8Formats) -> torch.Tensor:
        weight = _dequantized(layer)  # [N, K]
        ctx.layer, ctx.formats = layer, formats
        x2 = x.reshape(-1, x.shape[-1])
        out = scaled_matmul(x2, weight, formats.forward, formats.forward, x.dtype, formats.emulated)
        return out.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        weight = _dequantized(ctx.layer)  # again, as bitsandbytes' backward does: nothing was kept
        g2 = grad.reshape(-1, grad.shape[-1])  # [M, N]
        f = ctx.formats
        grad_x = scaled_matmul(g2, weight.t().contiguous(), f.gradient, f.forward, grad.dtype, f.emulated)
        return grad_x.reshape(*grad.shape[:-1], weight.shape[1]), None, None


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(layer.weight.data, layer.weight.quant_state)


def set_fp8_base(model: torch.nn.Module, formats: Fp8Formats | None) -> int:
    """Run every bitsandbytes 4-bit layer's matmul in fp8 (``formats``), or as before (None).

    Returns:
        How many layers were switched.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if formats is None:
                module.__dict__.pop("forward", None)  # the class's forward again
            else:
                module.forward = _fp8_forward(module, formats)
            count += 1
    return count


def _fp8_forward(layer: torch.nn.Module, formats: Fp8Formats):
    def forward(x: torch.Tensor) -> torch.Tensor:
        out = Fp8BaseMatmul.apply(x.to(layer.compute_dtype or x.dtype), layer, formats)
        if layer.bias is not None:
            out = out + layer.bias.to(out.dtype)
        return out.to(x.dtype)

    return forward
