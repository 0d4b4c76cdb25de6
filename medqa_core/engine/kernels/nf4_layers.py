"""Our NF4 kernels in place of bitsandbytes' 4-bit layers (and their peft LoRA) while a decoder runs.

:class:`NF4Swap` finds every bitsandbytes ``Linear4bit`` of a model, bare or inside a peft LoRA layer, and
builds one :class:`FusedNF4Linear` for each, once. ``with swap:`` puts them in their parents' places and puts
the originals back on exit, so the model is unchanged outside the block and the same wrapper objects come
back each time (torch.compile's guards stay valid).

A wrapper runs :func:`medqa_core.engine.kernels.nf4_matmul.nf4_matmul` through a ``torch.library`` custom op, which
torch.compile keeps as one opaque call and a CUDA/HIP graph records as its one launch. Above ``max_rows``
rows (a prefill) it calls the original layer, since bitsandbytes' dequantize + cuBLAS GEMM is then
compute-bound and fast.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from medqa_core.engine.kernels.nf4_matmul import NF4Weight, choose_tile, nf4_matmul, nf4_weight

logger = logging.getLogger(__name__)

# Rows a decode step can have: batch x 1 token. Prefill rows (batch x prompt) go to bitsandbytes.
DEFAULT_MAX_ROWS = 64


@torch.library.custom_op("medqa_parity::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
               absmax2: torch.Tensor | None, code2: torch.Tensor | None,
               offset: torch.Tensor | None, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
               lora_b: torch.Tensor | None, blocksize: int, blocksize2: int, out_features: int, in_features: int,
               scaling: float) -> torch.Tensor:
    """The custom op: x [..., K] -> [..., N] in x's dtype (see nf4_matmul)."""
    weight = NF4Weight(packed=packed, absmax=absmax, code=code, blocksize=blocksize,
                       out_features=out_features, in_features=in_features, absmax2=absmax2, code2=code2,
                       offset=offset, blocksize2=blocksize2)
    return nf4_matmul(x, weight, bias, lora_a, lora_b, scaling)


@nf4_linear.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, bias, lora_a, lora_b, blocksize, blocksize2,
      out_features, in_features, scaling):
    return x.new_empty(*x.shape[:-1], out_features)


def _is_lora_4bit(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit)


class FusedNF4Linear(torch.nn.Module):
    """A bitsandbytes ``Linear4bit`` (with its one active LoRA adapter, if any) computed by our kernel.

    Args:
        layer: the bitsandbytes layer, or the peft LoRA layer around one.
        max_rows: more rows than this go to ``layer`` itself.
    """

    def __init__(self, layer: torch.nn.Module, max_rows: int) -> None:
        super().__init__()
        lora = _is_lora_4bit(layer)
        base = layer.base_layer if lora else layer
        self.original = layer
        self.max_rows = max_rows
        self.compute_dtype = base.compute_dtype or base.weight.quant_state.dtype
        w = nf4_weight(base.weight)
        self.nf4 = w
        self.bias = base.bias
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.scaling = 1.0
        if lora:
            adapters = [a for a in layer.active_adapters if a in layer.lora_A]
            if len(adapters) != 1 or layer.merged or layer.disable_adapters or adapters[0] in getattr(
                    layer, "lora_variant", {}):
                raise ValueError(f"{type(layer).__name__}: only one plain (not merged, not DoRA) active adapter is "
                                 f"fused, found {adapters}")
            name = adapters[0]
            # Under autocast, peft runs LoRA's matmuls in the compute dtype: the kernel reads these copies.
            self.lora_a = layer.lora_A[name].weight.detach().to(self.compute_dtype)  # [r, K]
            self.lora_b = layer.lora_B[name].weight.detach().to(self.compute_dtype)  # [N, r]
            self.scaling = float(layer.scaling[name])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // x.shape[-1] > self.max_rows or self.original.training:
            return self.original(x)
        w = self.nf4
        out = torch.ops.medqa_parity.nf4_linear(
            x.to(self.compute_dtype), w.packed, w.absmax, w.code, w.absmax2, w.code2, w.offset,
            None if self.bias is None else self.bias.to(self.compute_dtype), self.lora_a, self.lora_b, w.blocksize,
            w.blocksize2, w.out_features, w.in_features, self.scaling)
        return out.to(x.dtype)


@dataclass(frozen=True)
class SwapInfo:
    """What an :class:`NF4Swap` replaced: recorded beside decode figures."""

    kernel: str  # "triton-nf4 (medqa_core.engine.kernels)": the name bench files record, kept as it was
    layers: int  # 4-bit layers computed by our kernel
    lora_layers: int  # of which carry a LoRA adapter, fused into the same call
    max_rows: int


class NF4Swap:
    """Our kernel in place of each bitsandbytes 4-bit layer of ``model``, inside ``with``.

    Args:
        model: a transformers model (peft-wrapped or not) with bitsandbytes NF4 layers.
        max_rows: rows per call up to which our kernel runs (decode); above it the original layer.

    Raises:
        ValueError: no NF4 layer, or a LoRA layer this kernel cannot fuse (several adapters, DoRA, merged).
    """

    def __init__(self, model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        import bitsandbytes as bnb

        self._slots: list[tuple[torch.nn.Module, str, torch.nn.Module, FusedNF4Linear]] = []
        stack = [model]
        while stack:
            parent = stack.pop()
            for name, child in parent.named_children():
                if _is_lora_4bit(child) or (isinstance(child, bnb.nn.Linear4bit)
                                            and child.weight.quant_state.quant_type == "nf4"):
                    self._slots.append((parent, name, child, FusedNF4Linear(child, max_rows)))
                else:
                    stack.append(child)
        if not self._slots:
            raise ValueError("no bitsandbytes NF4 layer in the model: nothing for the NF4 kernel to run")
        lora = sum(1 for *_, fused in self._slots if fused.lora_a is not None)
        self.info = SwapInfo(kernel="triton-nf4 (medqa_core.engine.kernels)", layers=len(self._slots), lora_layers=lora,
                             max_rows=max_rows)

    def modes(self, rows: int) -> str:
        """The kernel modes the layers run at ``rows`` rows, with their counts (e.g. ``"mma x224"``): recorded
        beside decode figures, so a file says which inner loop produced them."""
        counts = Counter(choose_tile(rows, fused.nf4, fused.compute_dtype, fused.nf4.packed.device).kernel_mode
                         for *_, fused in self._slots)
        return ", ".join(f"{mode} x{count}" for mode, count in counts.most_common())

    def __enter__(self) -> NF4Swap:
        for parent, name, _, fused in self._slots:
            setattr(parent, name, fused)
        return self

    def __exit__(self, *exc: Any) -> None:
        for parent, name, original, _ in self._slots:
            setattr(parent, name, original)
