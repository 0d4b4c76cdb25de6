"""bitsandbytes' packed NF4 weight as our kernels read it (:class:`NF4Weight`, from the layer's own tensors), and
the two copies an A/B switch makes of it when the layers are swapped in: the block scales decoded to float32
(v20, ``MEDQA_NF4_SCALES``) and the packed words in an MMA tile's order (v22, ``MEDQA_NF4_LAYOUT``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from medqa_core.engine.kernels.nf4_tiles import TileConfig, mma_parts


@dataclass(frozen=True)
class TiledNF4:
    """v22: a weight's packed words and block scales copied into the order one MMA tile shape reads them
    (:func:`tile_nf4`), for launches of that shape (``block_k``, and ``parts``: the blocks a lane's words span an
    iteration, :func:`mma_parts`)."""

    packed: torch.Tensor  # uint8 (int32 words): per 16-row tile and iteration, lane 4g + t's words of row g, then g + 8
    absmax: torch.Tensor  # the absmax (codes): of each 16-row tile, block by block, its 16 rows side by side
    block_k: int
    parts: int


@dataclass(frozen=True)
class NF4Weight:
    """bitsandbytes' packed NF4 weight ``[N, K]`` and what dequantizes it, as the kernel reads it.

    Build it with :func:`nf4_weight` from a ``bitsandbytes.nn.Params4bit``: the tensors are the layer's own
    (no copy).
    """

    packed: torch.Tensor  # uint8, [N * K / 2] (rounded up)
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor  # float32 [16]: the NF4 levels
    blocksize: int
    out_features: int
    in_features: int
    absmax2: torch.Tensor | None = None  # float32: the scales of the absmax codes (double quantization)
    code2: torch.Tensor | None = None  # float32 [256]: their 8-bit dynamic map
    offset: torch.Tensor | None = None  # float32 [1]: added to every dequantized absmax
    blocksize2: int = 256
    tiled: TiledNF4 | None = None  # v22: the words and absmax in one MMA tile's order too (MEDQA_NF4_LAYOUT=tiled)

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    def reads_tiled(self, cfg: TileConfig) -> bool:
        """Whether launches of tile ``cfg`` read this weight's tiled copy (v22): one made for that MMA order."""
        return (self.tiled is not None and cfg.kernel_mode == "mma"
                and (self.tiled.block_k, self.tiled.parts) == (cfg.block_k, mma_parts(cfg, self.blocksize)))

    @property
    def aligned(self) -> bool:
        """Rows of whole quantization blocks (the fast path): a row starts a block and a byte, and the packed bytes
        can be read as int32 words (the GEMV's loads); else every mode takes the any-shape path."""
        return (self.in_features % self.blocksize == 0 and self.in_features % 8 == 0
                and self.packed.data_ptr() % 4 == 0)  # the GEMV reads int32 words


def nf4_weight(param: torch.Tensor) -> NF4Weight:
    """The :class:`NF4Weight` of a bitsandbytes ``Params4bit`` (its ``quant_state`` read, not copied).

    Raises:
        ValueError: not an NF4-quantized parameter.
    """
    state = getattr(param, "quant_state", None)
    if state is None or state.quant_type != "nf4":
        raise ValueError("not an NF4 bitsandbytes weight (quant_state missing or not nf4)")
    out_features, in_features = (int(s) for s in state.shape)
    packed = param.data.view(torch.uint8).reshape(-1)
    code = state.code.to(device=packed.device, dtype=torch.float32)
    nested = bool(getattr(state, "nested", False))
    kwargs = {}
    if nested:
        inner = state.state2
        kwargs = dict(absmax2=inner.absmax.float(), code2=inner.code.float().to(packed.device),
                      offset=torch.as_tensor(state.offset, dtype=torch.float32, device=packed.device).reshape(1),
                      blocksize2=int(inner.blocksize))
    return NF4Weight(packed=packed, absmax=state.absmax, code=code, blocksize=int(state.blocksize),
                     out_features=out_features, in_features=in_features, **kwargs)


# v20, an A/B switch (off by default): the block scales decoded once, when the layers are swapped in
SCALE_LAYOUTS = ("nested", "float32")


def scale_layout() -> str:
    """How our decode launches read the weights' block scales, from ``MEDQA_NF4_SCALES``: ``"nested"`` (the
    default: bitsandbytes' double-quantized absmax as it is, each block's 8-bit code, its ``code2`` level and its
    group's ``absmax2`` loaded in the K loop) or ``"float32"`` (:func:`float32_scales`: one 4-byte load a block,
    four times the scale bytes of the 8-bit codes, the two-level lookup gone from the loop).

    Raises:
        ValueError: another value.
    """
    return _ab_switch("MEDQA_NF4_SCALES", SCALE_LAYOUTS)


def _ab_switch(name: str, choices: tuple[str, ...]) -> str:
    """Environment variable ``name``'s value, one of ``choices`` (the first where unset).

    Raises:
        ValueError: another value, named with the choices.
    """
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def float32_scales(w: NF4Weight) -> NF4Weight:
    """``w`` with its double-quantized absmax decoded into float32 blocks, ``code2[code] * absmax2[group] +
    offset`` (a multiply, then an add, as bitsandbytes' ``dequantize_4bit`` decodes them): the kernel then reads
    them as a weight without double quantization. ``w`` itself if it has none. New tensors (4 bytes a block)."""
    if not w.double_quant:
        return w
    group = torch.arange(w.absmax.numel(), device=w.absmax.device) // w.blocksize2
    scales = w.code2[w.absmax.long()] * w.absmax2[group]
    return dataclasses.replace(w, absmax=scales + w.offset, absmax2=None, code2=None, offset=None)


# v22, an A/B switch (off by default): the packed words and block scales also copied, when the layers are swapped in,
# into the order the MMA tile of their launches reads them
WEIGHT_LAYOUTS = ("bitsandbytes", "tiled")


def weight_layout() -> str:
    """Where our decode launches read the packed weights from, ``MEDQA_NF4_LAYOUT``: ``"bitsandbytes"`` (the
    default: its own order, row by row, where a warp's 16 rows of an iteration lie ``K / 2`` bytes apart and each
    row's absmax code in a sector of its own) or ``"tiled"`` (:func:`tile_nf4`: a copy in the order of the tile the
    launch takes at the decoder's batch, a warp's loads of an iteration one contiguous run; as many bytes again on
    the GPU).

    Raises:
        ValueError: another value.
    """
    return _ab_switch("MEDQA_NF4_LAYOUT", WEIGHT_LAYOUTS)


def tile_nf4(w: NF4Weight, cfg: TileConfig) -> NF4Weight:
    """``w`` with its packed words and absmax also in the order launches of MMA tile ``cfg`` read them
    (``w.tiled``; v22), ``w`` itself where that mode does not take it (rows not of whole blocks, K not of whole
    iterations). A permutation of bitsandbytes' words and absmax, nothing decoded: every value is theirs. New
    tensors, the rows padded to a multiple of 16 (zeros, never stored)."""
    if cfg.kernel_mode != "mma" or not w.aligned or w.in_features % cfg.block_k:
        return w
    n, k = w.out_features, w.in_features
    parts = mma_parts(cfg, w.blocksize)
    per_part = cfg.block_k // 32 // parts  # a lane's consecutive words of a row in each part (the kernel's WP)
    tiles = triton.cdiv(n, 16)
    words = torch.nn.functional.pad(w.packed.view(torch.int32).reshape(n, k // 8), (0, 0, 0, 16 * tiles - n))
    # word j + per_part * (t + 4 * p) of iteration i of row 16 T + 8 h + g (a row's words in the kernel's reading:
    # lane t's per_part words of each part p) to [T, i, g, t, h, p, j]: lane 4g + t's words of rows g, g + 8 in turn
    words = words.reshape(tiles, 2, 8, k // cfg.block_k, parts, 4, per_part).permute(0, 3, 2, 5, 1, 4, 6)
    blocks = k // w.blocksize
    absmax = torch.nn.functional.pad(w.absmax.reshape(n, blocks), (0, 0, 0, 16 * tiles - n))
    absmax = absmax.reshape(tiles, 16, blocks).transpose(1, 2)  # [T, block, row]
    return dataclasses.replace(w, tiled=TiledNF4(words.contiguous().view(torch.uint8).reshape(-1),
                                                 absmax.contiguous().reshape(-1), cfg.block_k, parts))
