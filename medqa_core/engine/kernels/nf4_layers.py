"""Our NF4 kernels in place of bitsandbytes' 4-bit layers (and their peft LoRA) while a decoder runs.

:class:`NF4Swap` finds every bitsandbytes ``Linear4bit`` of a model, bare or inside a peft LoRA layer, and
builds one :class:`FusedNF4Linear` for each, or for each group of siblings that read the same input (q/k/v,
gate/up: one launch), once. ``with swap:`` puts an :class:`NF4Sibling` in each layer's place and puts the
originals back on exit, so the model is unchanged outside the block and the same wrapper objects come back each
time (torch.compile's guards stay valid).

A wrapper runs :func:`medqa_core.engine.kernels.nf4_matmul.nf4_matmul` through a ``torch.library`` custom op, which
torch.compile keeps as one opaque call and a CUDA/HIP graph records as its one launch. Above ``max_rows``
rows (a prefill) it calls the original layer, since bitsandbytes' dequantize + cuBLAS GEMM is then
compute-bound and fast.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medqa_core.engine.kernels.nf4_compile import CompileJob
from medqa_core.engine.kernels.nf4_matmul import choose_tile, nf4_matmul, siblings_unfit
from medqa_core.engine.kernels.nf4_weight import (
    NF4Weight,
    TiledNF4,
    float32_scales,
    nf4_weight,
    scale_layout,
    tile_nf4,
    weight_layout,
)

logger = logging.getLogger(__name__)

# Rows a decode step can have: batch x 1 token. Prefill rows (batch x prompt) go to bitsandbytes.
DEFAULT_MAX_ROWS = 64


@torch.library.custom_op("medqa_parity::nf4_linear", mutates_args=())
def nf4_linear(x: torch.Tensor, packed: list[torch.Tensor], absmax: list[torch.Tensor], code: torch.Tensor,
               absmax2: list[torch.Tensor], code2: torch.Tensor | None, offset: list[torch.Tensor],
               bias: torch.Tensor | None, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, blocksize: int,
               blocksize2: int, out_features: list[int], in_features: int, scaling: list[float],
               tiled_packed: list[torch.Tensor], tiled_absmax: list[torch.Tensor], tiled_order: list[int]
               ) -> torch.Tensor:
    """The custom op: x [..., K] -> [..., sum(out_features)] in x's dtype, one or several sibling weights side by
    side (see nf4_matmul); ``absmax2`` and ``offset`` empty without double quantization; ``tiled_*`` (v22:
    :class:`TiledNF4`, ``tiled_order`` its block_k and parts) empty without tiled copies."""
    weights = [NF4Weight(packed=p, absmax=a, code=code, blocksize=blocksize, out_features=n, in_features=in_features,
                         absmax2=absmax2[i] if absmax2 else None, code2=code2 if absmax2 else None,
                         offset=offset[i] if absmax2 else None, blocksize2=blocksize2,
                         tiled=TiledNF4(tiled_packed[i], tiled_absmax[i], *tiled_order) if tiled_order else None)
               for i, (p, a, n) in enumerate(zip(packed, absmax, out_features, strict=True))]
    return nf4_matmul(x, weights, bias, lora_a, lora_b, scaling)


@nf4_linear.register_fake
def _(x, packed, absmax, code, absmax2, code2, offset, bias, lora_a, lora_b, blocksize, blocksize2,
      out_features, in_features, scaling, tiled_packed, tiled_absmax, tiled_order):
    return x.new_empty(*x.shape[:-1], sum(out_features))


def _is_lora_4bit(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return hasattr(module, "lora_A") and isinstance(getattr(module, "base_layer", None), bnb.nn.Linear4bit)


def _is_nf4(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return _is_lora_4bit(module) or (isinstance(module, bnb.nn.Linear4bit)
                                     and module.weight.quant_state.quant_type == "nf4")


# Layers of one parent that read the same input, so one launch can compute them together (Llama, Mistral, Qwen:
# attention's q/k/v, the MLP's gate/up)
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class FusedNF4Linear(torch.nn.Module):
    """One or several bitsandbytes ``Linear4bit`` layers that read the same input (each with its one active LoRA
    adapter, if any) computed by one launch of our kernel: their outputs side by side.

    Args:
        layers: the bitsandbytes layers, or the peft LoRA layers around them; several must be alike (all adapted
            with one rank, or none; all with a bias, or none; weights one launch can take: ``siblings_unfit``).
        max_rows: more rows than this go to the layers themselves.

    Raises:
        ValueError: a LoRA layer this kernel cannot fuse (several adapters, DoRA, merged), or layers not alike.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], max_rows: int) -> None:
        super().__init__()
        self.originals = list(layers)
        self.max_rows = max_rows
        bases = [layer.base_layer if _is_lora_4bit(layer) else layer for layer in layers]
        self.compute_dtype = bases[0].compute_dtype or bases[0].weight.quant_state.dtype
        self.weights = [nf4_weight(base.weight) for base in bases]
        if scale_layout() == "float32":  # v20's A/B: the scales decoded here, once, not in every launch's loop
            self.weights = [float32_scales(w) for w in self.weights]
        self.sizes = [w.out_features for w in self.weights]
        why_not = _unalike(layers, bases, self.compute_dtype) or siblings_unfit(self.weights)
        if why_not:
            raise ValueError(f"{', '.join(type(layer).__name__ for layer in layers)}: not one launch: {why_not}")
        self.bias = None if bases[0].bias is None else torch.cat([base.bias.detach() for base in bases])
        self.lora_a: torch.Tensor | None = None
        self.lora_b: torch.Tensor | None = None
        self.scaling = [1.0] * len(layers)
        if _is_lora_4bit(layers[0]):
            names = [_adapter(layer) for layer in layers]
            # Under autocast, peft runs LoRA's matmuls in the compute dtype: the kernel reads these copies.
            adapted = list(zip(layers, names, strict=True))
            self.lora_a = torch.cat([layer.lora_A[name].weight.detach() for layer, name in adapted]).to(
                self.compute_dtype)  # [S * r, K]
            self.lora_b = torch.cat([layer.lora_B[name].weight.detach() for layer, name in adapted]).to(
                self.compute_dtype)  # [N, r]
            self.scaling = [float(layer.scaling[name]) for layer, name in adapted]
        if weight_layout() == "tiled":  # v22's A/B: copies in the order of the tile a launch of max_rows takes
            w = self.weights[0]
            tile = choose_tile(max_rows, w, self.compute_dtype, w.packed.device, out_features=sum(self.sizes),
                               lora=self.lora_a is not None)
            self.weights = [tile_nf4(w, tile) for w in self.weights]

    @property
    def bytes_read(self) -> int:
        """Bytes a launch reads besides its input: packed weights, their scales, LoRA's matrices, the bias."""
        tensors = [t for w in self.weights for t in (*((w.tiled.packed, w.tiled.absmax) if w.tiled else
                                                       (w.packed, w.absmax)), w.absmax2, w.offset) if t is not None]
        tensors += [t for t in (self.lora_a, self.lora_b, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weights
        dq = w[0].double_quant
        out = torch.ops.medqa_parity.nf4_linear(
            x.to(self.compute_dtype), [v.packed for v in w], [v.absmax for v in w], w[0].code,
            [v.absmax2 for v in w] if dq else [], w[0].code2, [v.offset for v in w] if dq else [],
            None if self.bias is None else self.bias.to(self.compute_dtype), self.lora_a, self.lora_b, w[0].blocksize,
            w[0].blocksize2, self.sizes, w[0].in_features, self.scaling,
            [v.tiled.packed for v in w] if w[0].tiled else [], [v.tiled.absmax for v in w] if w[0].tiled else [],
            [w[0].tiled.block_k, w[0].tiled.parts] if w[0].tiled else [])
        return out.to(x.dtype)


def _adapter(layer: torch.nn.Module) -> str:
    """The one plain active adapter of a peft LoRA layer.

    Raises:
        ValueError: several, or one that is merged, disabled or DoRA.
    """
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(adapters) != 1 or layer.merged or layer.disable_adapters or adapters[0] in getattr(
            layer, "lora_variant", {}):
        raise ValueError(f"{type(layer).__name__}: only one plain (not merged, not DoRA) active adapter is "
                         f"fused, found {adapters}")
    return adapters[0]


def _unalike(layers: Sequence[torch.nn.Module], bases: Sequence[torch.nn.Module], dtype: torch.dtype) -> str | None:
    """Why sibling layers cannot share a launch's LoRA, bias and compute dtype, or None."""
    if len({_is_lora_4bit(layer) for layer in layers}) > 1:
        return "some carry a LoRA adapter, some not"
    if _is_lora_4bit(layers[0]) and len({layer.lora_A[_adapter(layer)].weight.shape[0] for layer in layers}) > 1:
        return "their LoRA ranks differ"
    if len({base.bias is None for base in bases}) > 1:
        return "some have a bias, some not"
    if any((base.compute_dtype or base.weight.quant_state.dtype) != dtype for base in bases):
        return "their compute dtypes differ"
    return None


class _Pending:
    """A sibling group's outputs not yet taken, and the input they were computed from."""

    def __init__(self) -> None:
        self.input: torch.Tensor | None = None
        self.outputs: dict[int, torch.Tensor] = {}


class NF4Sibling(torch.nn.Module):
    """One layer's place while the swap holds: its part of its group's launch (:class:`FusedNF4Linear`).

    The first of a group called with an input runs the launch for all of them and keeps the others' outputs; a
    sibling then called with that same tensor takes its own, so the model calls each layer as before (q, k, v in
    turn) and the group costs one launch. A sibling called with another input (a model that feeds them
    differently) runs the launch again: slower, never wrong. Above ``max_rows`` rows (a prefill) or in training,
    the layer itself runs.
    """

    def __init__(self, group: FusedNF4Linear, index: int, pending: _Pending) -> None:
        super().__init__()
        self.group = group
        self.index = index
        self._pending = pending

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group, pending = self.group, self._pending
        if x.numel() // x.shape[-1] > group.max_rows or group.originals[self.index].training:
            return group.originals[self.index](x)
        if pending.input is x and self.index in pending.outputs:
            out = pending.outputs.pop(self.index)
            if not pending.outputs:
                pending.input = None  # every sibling served: hold no tensor past the step
            return out
        outs = group(x).split(group.sizes, dim=-1)
        pending.outputs = {i: out for i, out in enumerate(outs) if i != self.index}
        pending.input = x if pending.outputs else None
        return outs[self.index]


@dataclass(frozen=True)
class SwapInfo:
    """What an :class:`NF4Swap` replaced: recorded beside decode figures."""

    kernel: str  # "triton-nf4 (medqa_core.engine.kernels)": the name bench files record, kept as it was
    layers: int  # 4-bit layers computed by our kernel
    lora_layers: int  # of which carry a LoRA adapter, fused into the same call
    max_rows: int
    launches: int  # our kernel's launches a forward: sibling layers (q/k/v, gate/up) share one
    tiled_launches: int = 0  # of which read tiled copies of their weights (v22, MEDQA_NF4_LAYOUT=tiled)
    tiled_bytes: int = 0  # the copies' bytes on the device, beside bitsandbytes' own (which prefill reads)


class NF4Swap:
    """Our kernel in place of each bitsandbytes 4-bit layer of ``model``, inside ``with``.

    Sibling layers (:data:`SIBLINGS`) that are alike run as one launch (:class:`NF4Sibling`); the others one
    launch each.

    Args:
        model: a transformers model (peft-wrapped or not) with bitsandbytes NF4 layers.
        max_rows: rows per call up to which our kernel runs (decode); above it the original layer.
        siblings: join sibling layers into one launch (False: one launch a layer, as before v10).

    Raises:
        ValueError: no NF4 layer, or a LoRA layer this kernel cannot fuse (several adapters, DoRA, merged).
    """

    def __init__(self, model: torch.nn.Module, max_rows: int = DEFAULT_MAX_ROWS, siblings: bool = True) -> None:
        self._slots: list[tuple[torch.nn.Module, str, torch.nn.Module, NF4Sibling]] = []
        self._groups: list[FusedNF4Linear] = []
        position = {id(module): i for i, module in enumerate(model.modules())}
        named: list[tuple[int, str, FusedNF4Linear]] = []
        stack = [model]
        while stack:
            parent = stack.pop()
            layers = {name: child for name, child in parent.named_children() if _is_nf4(child)}
            stack.extend(child for name, child in parent.named_children() if name not in layers)
            for names, group in _groups(parent, layers, max_rows, siblings):
                pending = _Pending()
                self._groups.append(group)
                named.append((position[id(layers[names[0]])], "+".join(names), group))
                self._slots.extend((parent, name, layers[name], NF4Sibling(group, i, pending))
                                   for i, name in enumerate(names))
        if not self._slots:
            raise ValueError("no bitsandbytes NF4 layer in the model: nothing for the NF4 kernel to run")
        # A decoder layer calls its layers in the order it registers them (q/k/v, o, gate/up, down), so module
        # order is launch order: what lines a profile's kernels up with their layers (trace.time_by_launch).
        self.launches = tuple((name, group.bytes_read) for _, name, group in sorted(named, key=lambda t: t[0]))
        lora = sum(len(group.sizes) for group in self._groups if group.lora_a is not None)
        self.info = SwapInfo(kernel="triton-nf4 (medqa_core.engine.kernels)", layers=len(self._slots), lora_layers=lora,
                             max_rows=max_rows, launches=len(self._groups),
                             tiled_launches=sum(group.weights[0].tiled is not None for group in self._groups),
                             tiled_bytes=sum(t.numel() * t.element_size() for group in self._groups
                                             for w in group.weights if w.tiled
                                             for t in (w.tiled.packed, w.tiled.absmax)))

    def compile_jobs(self, rows: int) -> list[CompileJob]:
        """The distinct launches a forward of ``rows`` rows makes (one per shape: the 7B's 128 launches are four),
        for :func:`medqa_core.engine.kernels.nf4_compile.compile_ahead`."""
        jobs = []
        for group in self._groups:
            w = group.weights[0]
            tile = choose_tile(rows, w, group.compute_dtype, w.packed.device, out_features=sum(group.sizes),
                               lora=group.lora_a is not None)
            rank = 0 if group.lora_a is None else group.lora_a.shape[0] // len(group.sizes)
            jobs.append(CompileJob(tile, rows, tuple(group.sizes), w.in_features, rank, w.blocksize, w.double_quant,
                                   str(group.compute_dtype).removeprefix("torch."), group.bias is not None,
                                   w.reads_tiled(tile)))
        return list(dict.fromkeys(jobs))

    def modes(self, rows: int) -> str:
        """The kernel modes the launches run at ``rows`` rows, with their counts (e.g. ``"mma x96, mma prmt
        x32"``, :attr:`TileConfig.inner_loop`): recorded beside decode figures, so a file says which inner loop
        produced them."""
        counts = Counter(choose_tile(rows, group.weights[0], group.compute_dtype, group.weights[0].packed.device,
                                     out_features=sum(group.sizes), lora=group.lora_a is not None).inner_loop
                         for group in self._groups)
        return ", ".join(f"{mode} x{count}" for mode, count in counts.most_common())

    def __enter__(self) -> NF4Swap:
        for parent, name, _, sibling in self._slots:
            setattr(parent, name, sibling)
        return self

    def __exit__(self, *exc: Any) -> None:
        for parent, name, original, _ in self._slots:
            setattr(parent, name, original)


def _groups(parent: torch.nn.Module, layers: dict[str, torch.nn.Module], max_rows: int,
            siblings: bool) -> list[tuple[tuple[str, ...], FusedNF4Linear]]:
    """``parent``'s NF4 layers as launch groups: each complete set of :data:`SIBLINGS` that can share a launch,
    every other layer alone (with why a set could not share, logged)."""
    groups: list[tuple[tuple[str, ...], FusedNF4Linear]] = []
    for names in SIBLINGS if siblings else ():
        if not set(names) <= layers.keys():
            continue
        try:
            groups.append((names, FusedNF4Linear([layers[name] for name in names], max_rows)))
        except ValueError as e:
            logger.info("NF4 kernel: %s.%s one launch each (%s)", type(parent).__name__, "/".join(names), e)
    joined = {name for names, _ in groups for name in names}
    return groups + [((name,), FusedNF4Linear([layer], max_rows)) for name, layer in layers.items()
                     if name not in joined]
