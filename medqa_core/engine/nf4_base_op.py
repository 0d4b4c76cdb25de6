"""The frozen 4-bit base's matmul as a ``torch.library`` custom op: the ``base_custom_op`` training lever.

bitsandbytes runs a 4-bit layer's matmul through ``MatMul4Bit``, a ``torch.autograd.Function``. Dynamo traces
it as ``autograd_function_apply``, which AOTAutograd's cache does not accept: every compiled graph bypasses
that cache, so a run whose compile cache is warm still traces each forward and backward joint graph again
(docs/performance.md, "Compile once per machine"). Here the same computation is a custom op with its backward
registered on it, which the cache accepts:

- forward: bitsandbytes' own ``gemm_4bit`` op, called as ``MatMul4Bit.forward`` calls it (double-quantized
  absmax included);
- backward: ``grad @ dequantize_4bit(W)``, the weight dequantized again as ``MatMul4Bit.backward`` does
  (nothing kept from the forward; the frozen weight gets no gradient).

So the numbers are bitsandbytes' (tests/test_nf4_base_op.py: the same loss and gradients, bit for bit). The
default (TrainConfig.base_custom_op) since an H100 run of the 7B preset showed its step time equal to bitsandbytes'
path and its warm compile phase within the 10 s target (docs/performance.md); ``+base_custom_op=false`` goes
back.
"""

from __future__ import annotations

from typing import Any

import torch

_NAMESPACE = "medqa_parity"


def _state(shape: list[int], absmax: torch.Tensor, blocksize: int, quant_type: str, dtype: torch.dtype,
           absmax_8bit: torch.Tensor | None, absmax_code: torch.Tensor | None,
           absmax_offset: torch.Tensor | None) -> Any:
    """bitsandbytes' QuantState from the op's arguments (nested: 8-bit absmax codes over 256-blocks)."""
    from bitsandbytes.functional import QuantState

    if absmax_8bit is None:
        return QuantState(absmax=absmax, shape=torch.Size(shape), blocksize=blocksize, quant_type=quant_type,
                          dtype=dtype)
    nested = QuantState(absmax=absmax, code=absmax_code, blocksize=256, dtype=torch.float32)
    return QuantState(absmax=absmax_8bit, shape=torch.Size(shape), blocksize=blocksize, quant_type=quant_type,
                      dtype=dtype, offset=absmax_offset, state2=nested)


@torch.library.custom_op(f"{_NAMESPACE}::nf4_base_matmul", mutates_args=())
def nf4_base_matmul(x: torch.Tensor, packed: torch.Tensor, shape: list[int], absmax: torch.Tensor, blocksize: int,
                    quant_type: str, dtype: torch.dtype, absmax_8bit: torch.Tensor | None,
                    absmax_code: torch.Tensor | None, absmax_offset: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T`` of a 4-bit weight ``packed`` [N, K] (``shape``) by bitsandbytes' ``gemm_4bit``."""
    return torch.ops.bitsandbytes.gemm_4bit(x, packed.view(-1, 1), shape, absmax, blocksize, quant_type, None,
                                            absmax_8bit, absmax_code, absmax_offset)


@nf4_base_matmul.register_fake
def _(x, packed, shape, absmax, blocksize, quant_type, dtype, absmax_8bit, absmax_code, absmax_offset):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op(f"{_NAMESPACE}::nf4_base_input_grad", mutates_args=())
def nf4_base_input_grad(grad: torch.Tensor, packed: torch.Tensor, shape: list[int], absmax: torch.Tensor,
                        blocksize: int, quant_type: str, dtype: torch.dtype, absmax_8bit: torch.Tensor | None,
                        absmax_code: torch.Tensor | None, absmax_offset: torch.Tensor | None) -> torch.Tensor:
    """``grad @ W``: the weight dequantized again, as bitsandbytes' ``MatMul4Bit.backward`` computes it."""
    from bitsandbytes.functional import dequantize_4bit

    state = _state(shape, absmax, blocksize, quant_type, dtype, absmax_8bit, absmax_code, absmax_offset)
    return torch.matmul(grad, dequantize_4bit(packed.view(-1, 1), state).to(grad.dtype))


@nf4_base_input_grad.register_fake
def _(grad, packed, shape, absmax, blocksize, quant_type, dtype, absmax_8bit, absmax_code, absmax_offset):
    return grad.new_empty(*grad.shape[:-1], shape[1])


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.weight_args = inputs[1:]  # packed and its quantization state: nothing of the activations is kept


def _backward(ctx: Any, grad: torch.Tensor) -> tuple:
    return (nf4_base_input_grad(grad, *ctx.weight_args),) + (None,) * len(ctx.weight_args)


nf4_base_matmul.register_autograd(_backward, setup_context=_setup_context)


def _op_args(layer: torch.nn.Module) -> tuple:
    """The op's weight arguments of a bitsandbytes ``Linear4bit``."""
    qs = layer.weight.quant_state
    if qs.nested:
        return (layer.weight.data, list(qs.shape), qs.state2.absmax, qs.blocksize, qs.quant_type, qs.dtype,
                qs.absmax, qs.state2.code, qs.offset)
    return layer.weight.data, list(qs.shape), qs.absmax, qs.blocksize, qs.quant_type, qs.dtype, None, None, None


def set_custom_op_base(model: torch.nn.Module, on: bool) -> int:
    """Run every bitsandbytes 4-bit layer's matmul through :func:`nf4_base_matmul` (``on``), or as before.

    Layers with a bias keep bitsandbytes' path (its kernel adds the bias inside; Mistral's layers have none).

    Returns:
        How many layers were switched.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.bias is None:
            if on:
                module.forward = _custom_op_forward(module)
            else:
                module.__dict__.pop("forward", None)  # the class's forward again
            count += 1
    return count


def _custom_op_forward(layer: torch.nn.Module):
    from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

    def forward(x: torch.Tensor) -> torch.Tensor:
        # As Linear4bit.forward: the weight's quant state put back where a wrapper dropped it (FSDP turns the
        # Params4bit into a plain Parameter), the input in the layer's compute dtype, the caller's dtype back.
        fix_4bit_weight_quant_state_from_module(layer)
        return nf4_base_matmul(x.to(layer.compute_dtype or x.dtype), *_op_args(layer)).to(x.dtype)

    return forward
