"""Fused NF4 matmul in Triton: ``x @ W^T (+ bias) (+ scaling * (x @ A^T) @ B^T)`` straight from bitsandbytes'
packed 4-bit weights, without writing the dequantized weight.

It reads bitsandbytes' own storage, so a model quantized by bitsandbytes needs no repacking:

- ``packed``: two 4-bit codes a byte over the row-major flat weight ``W[N, K]``, element ``2i`` in the high
  nibble of byte ``i``, element ``2i + 1`` in the low one;
- ``absmax``: one scale per ``blocksize`` consecutive flat elements (float32), or with double quantization one
  uint8 code per block, dequantized as ``code2[absmax] * absmax2[block // blocksize2] + offset``;
- the weight element is ``float32(code[q] * absmax)`` cast to the compute dtype, exactly bitsandbytes'
  ``dequantize_4bit``; the products accumulate in float32.

So the only difference from bitsandbytes' dequantize + matmul is the order of the float32 sums: outputs agree
within the rounding of the output dtype (tests/test_nf4_kernel.py states the tolerance).

Nothing assumes a warp width: Triton maps each tile onto the device's warps (32 lanes on NVIDIA, 64-wide
wavefronts on CDNA), and every shape is a Python-chosen block size, not a lane count. The same source runs on
ROCm's Triton; it has not run on an AMD GPU here (docs/decode.md says what has).

Two kernels:

- :func:`_nf4_matmul_kernel`: one program per ``BLOCK_N`` outputs and ``BLOCK_M`` rows; at one row it is a
  GEMV (products summed in registers), above it a small-M GEMM (``tl.dot``). Its epilogue adds the bias and
  LoRA's up-projection ``t @ B^T``, so an adapted layer's output is written once.
- :func:`_lora_down_kernel`: ``t = scaling * x @ A^T`` ([M, r], float32), LoRA's down-projection, one program
  per row block and rank.

An adapted layer thus costs two launches (bitsandbytes + peft: the 4-bit matmul, two small GEMMs with their
split-K reductions, and the scale and add).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# K columns a tile covers: whole quantization blocks of each row (bitsandbytes' NF4 blocks are 32..4096 elements).
DEFAULT_TILE_K = 256


def interpreting() -> bool:
    """Triton's CPU interpreter is on (tests): kernels then run on CPU tensors, one fixed config."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _lora_down_kernel(x_ptr, a_ptr, t_ptr, M, K, stride_xm, stride_am, stride_tm, scaling,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    # t[m, r] = scaling * sum_k x[m, k] * A[r, k]: program (row block, r).
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        k_mask = k < K
        a = tl.load(a_ptr + r * stride_am + k, mask=k_mask, other=0.0).to(tl.float32)  # [BK]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)  # [BM, BK]
        acc += tl.sum(x * a[None, :], axis=1)
    tl.store(t_ptr + offs_m * stride_tm + r, acc * scaling, mask=m_mask)


@triton.jit
def _round(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (round to nearest even).

    On a GPU a plain cast. Triton's CPU interpreter truncates float32 -> bf16 and multiplies bf16 dots as raw
    integers, so there (EMULATE) the rounding is done on the bits and the value stays float32: the kernel then
    computes the same numbers as on a GPU, with float32 dots.
    """
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def _nf4_weight_tile(q_ptr, absmax_ptr, pair_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                     offs_n, k0, N, K, dtype: tl.constexpr,
                     BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                     ALIGNED: tl.constexpr, HALF: tl.constexpr, EMULATE: tl.constexpr):
    """Dequantized weights of rows ``offs_n`` at columns ``k0 + 2j`` (even) and ``k0 + 2j + 1`` (odd), j < HALF.

    Returns two [BLOCK_N, HALF] tiles in ``dtype`` (float32 holding ``dtype``'s values under EMULATE);
    out-of-range elements are 0.
    """
    offs_j = tl.arange(0, HALF)
    n_mask = offs_n < N
    if ALIGNED:
        # K is a multiple of BLOCKSIZE and the tile is G whole quantization blocks of each row: one scale per
        # (row, block), and the two codes of a byte are this tile's even and odd columns. Tiles are [BN, G, HB]
        # (HB bytes a block), flattened to [BN, HALF] at the end: flat byte g * HB + h is columns k0 + 2(g*HB + h)
        # and k0 + 2(g*HB + h) + 1.
        G: tl.constexpr = HALF * 2 // BLOCKSIZE
        HB: tl.constexpr = BLOCKSIZE // 2
        offs_g = tl.arange(0, G)
        offs_h = tl.arange(0, HB)
        row_byte = (offs_n * K + k0) // 2  # [BN]
        byte = row_byte[:, None, None] + (offs_g * HB)[None, :, None] + offs_h[None, None, :]  # [BN, G, HB]
        g_mask = n_mask[:, None] & (k0 + offs_g * BLOCKSIZE < K)[None, :]  # [BN, G]
        mask = g_mask[:, :, None] & (offs_h < HB)[None, None, :]
        q = tl.load(q_ptr + byte, mask=mask, other=0).to(tl.int32)
        # One gather for both codes: the byte's entry holds float32 bits of code[hi] (high word), code[lo] (low).
        pair = tl.load(pair_ptr + q)  # int64
        w_even = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        w_odd = (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True)
        block = ((offs_n * K + k0) // BLOCKSIZE)[:, None] + offs_g[None, :]  # [BN, G]
        if DOUBLE_QUANT:
            code8 = tl.load(absmax_ptr + block, mask=g_mask, other=0).to(tl.int32)
            scale = tl.load(code2_ptr + code8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=g_mask, other=0.0)
            scale = scale + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=g_mask, other=0.0)
        w_even = _round(tl.where(mask, w_even * scale[:, :, None], 0.0), dtype, EMULATE)
        w_odd = _round(tl.where(mask, w_odd * scale[:, :, None], 0.0), dtype, EMULATE)
        w_even = tl.reshape(w_even, (w_even.shape[0], HALF))
        w_odd = tl.reshape(w_odd, (w_odd.shape[0], HALF))
    else:
        # Any shape (odd K, blocks that straddle rows): each element from its own flat index.
        k_even = k0 + 2 * offs_j
        w_even = _nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k_even, N, K,
                              BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        w_even = _round(w_even, dtype, EMULATE)
        w_odd = _nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k_even + 1, N,
                             K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT)
        w_odd = _round(w_odd, dtype, EMULATE)
    return w_even, w_odd


@triton.jit
def _nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k, N, K,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    mask = (offs_n[:, None] < N) & (k[None, :] < K)
    flat = offs_n[:, None].to(tl.int64) * K + k[None, :]  # [BN, HALF]
    byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    block = flat // BLOCKSIZE
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + code8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return tl.where(mask, tl.load(code_ptr + q) * scale, 0.0)


@triton.jit
def _nf4_matmul_kernel(x_ptr, q_ptr, absmax_ptr, pair_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       bias_ptr, t_ptr, b_ptr, out_ptr,
                       M, N, K, stride_xm, stride_tm, stride_bn, stride_om,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    HALF: tl.constexpr = BLOCK_K // 2
    dtype = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, HALF)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w_even, w_odd = _nf4_weight_tile(q_ptr, absmax_ptr, pair_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                         offs_n, k0, N, K, dtype, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, ALIGNED, HALF,
                                         EMULATE)
        k_even = k0 + 2 * offs_j
        x_row = x_ptr + offs_m[:, None] * stride_xm
        x_even = tl.load(x_row + k_even[None, :], mask=m_mask[:, None] & (k_even[None, :] < K), other=0.0)
        x_odd = tl.load(x_row + k_even[None, :] + 1, mask=m_mask[:, None] & (k_even[None, :] + 1 < K), other=0.0)
        if BLOCK_M == 1:
            # GEMV: the row's products in float32, summed over the tile.
            prod = w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(tl.float32)
            acc += tl.sum(prod, axis=1)
        elif EMULATE:
            acc = tl.dot(x_even.to(tl.float32), tl.trans(w_even), acc, input_precision="ieee")
            acc = tl.dot(x_odd.to(tl.float32), tl.trans(w_odd), acc, input_precision="ieee")
        else:
            acc = tl.dot(x_even.to(dtype), tl.trans(w_even), acc)
            acc = tl.dot(x_odd.to(dtype), tl.trans(w_odd), acc)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        if BLOCK_M == 1:
            acc += bias
        else:
            acc += bias[None, :]
    if RANK > 0:
        # LoRA's up-projection: + t @ B^T, t = scaling * x @ A^T from _lora_down_kernel.
        offs_r = tl.arange(0, RANK_PAD)
        r_mask = offs_r < RANK
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :], mask=n_mask[:, None] & r_mask[None, :],
                    other=0.0)  # [BN, R]
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0)  # [BM, R], float32
        if BLOCK_M == 1:
            acc += tl.sum(b.to(tl.float32) * _round(t, dtype, EMULATE).to(tl.float32), axis=1)
        elif EMULATE:
            acc = tl.dot(_round(t, dtype, EMULATE), tl.trans(b.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(t.to(dtype), tl.trans(b.to(dtype)), acc)
    result = _round(acc, dtype, EMULATE).to(dtype)
    if BLOCK_M == 1:
        tl.store(out_ptr + offs_m * stride_om + offs_n, result, mask=n_mask)
    else:
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], result,
                 mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class NF4Weight:
    """bitsandbytes' packed NF4 weight ``[N, K]`` and what dequantizes it, as the kernel reads it.

    Build it with :func:`nf4_weight` from a ``bitsandbytes.nn.Params4bit``: the tensors are the layer's own
    (no copy), plus a 2 KiB table of code pairs.
    """

    packed: torch.Tensor  # uint8, [N * K / 2] (rounded up)
    absmax: torch.Tensor  # float32 [blocks], or uint8 [blocks] with double quantization
    code: torch.Tensor  # float32 [16]: the NF4 levels
    pair_table: torch.Tensor  # int64 [256]: float32 bits of code[byte >> 4] << 32 | code[byte & 15]
    blocksize: int
    out_features: int
    in_features: int
    absmax2: torch.Tensor | None = None  # float32: the scales of the absmax codes (double quantization)
    code2: torch.Tensor | None = None  # float32 [256]: their 8-bit dynamic map
    offset: torch.Tensor | None = None  # float32 [1]: added to every dequantized absmax
    blocksize2: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 [256]: for each byte, the float32 bits of ``code[byte >> 4]`` (high word) and ``code[byte & 15]``."""
    byte = torch.arange(256, device=code.device)
    bits = code.float().contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    return (bits[byte >> 4] << 32) | bits[byte & 15]


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
    return NF4Weight(packed=packed, absmax=state.absmax, code=code, pair_table=pair_table(code),
                     blocksize=int(state.blocksize), out_features=out_features, in_features=in_features, **kwargs)


@dataclass(frozen=True)
class TileConfig:
    """A kernel launch's tile shape and warps."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


def _tile_k(weight: NF4Weight, block_k: int = DEFAULT_TILE_K) -> tuple[int, bool]:
    """BLOCK_K and whether the fast (aligned) path applies: rows of whole blocks, a tile of whole blocks."""
    aligned = weight.in_features % weight.blocksize == 0 and weight.in_features % 2 == 0
    return (max(block_k, weight.blocksize) if aligned else 64), aligned


@functools.cache
def tile_config(rows: int, out_features: int, block_k: int, interpreted: bool) -> TileConfig:
    """The tile for ``rows`` x ``out_features`` outputs.

    One row is a GEMV (BLOCK_M 1, products summed in registers); more rows use tensor-core dots, which need 16.
    Enough programs along N to fill the device (about 4 per multiprocessor on a 132-SM H100) at one row.
    """
    if interpreted:
        return TileConfig(1 if rows == 1 else 16, 16, block_k, 1, 1)
    if rows == 1:
        block_n = 16 if out_features <= 4096 else 32
        return TileConfig(1, block_n, block_k, 4, 4)
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    block_n = 32 if rows <= 16 else 64
    return TileConfig(block_m, block_n, block_k, 4, 4)


def lora_down(x: torch.Tensor, lora_a: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * x @ A^T`` in float32: [M, r] from x [M, K] and A [r, K]."""
    rows, k = x.shape
    rank = lora_a.shape[0]
    t = torch.empty(rows, rank, device=x.device, dtype=torch.float32)
    block_m = 1 if rows == 1 else 16
    grid = (triton.cdiv(rows, block_m), rank)
    _lora_down_kernel[grid](x, lora_a, t, rows, k, x.stride(0), lora_a.stride(0), t.stride(0), float(scaling),
                            BLOCK_M=block_m, BLOCK_K=min(1024, triton.next_power_of_2(k)))
    return t


def nf4_matmul(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None = None,
               lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
               scaling: float = 1.0, config: TileConfig | None = None) -> torch.Tensor:
    """``x @ W^T + bias + scaling * (x @ A^T) @ B^T`` for x [..., K], in x's dtype, W dequantized in registers.

    Args:
        x: activations [..., K] (bf16, fp16 or fp32).
        weight: the packed NF4 weight [N, K].
        bias: [N] or None.
        lora_a, lora_b: LoRA's A [r, K] and B [N, r], or None for the base layer alone.
        scaling: LoRA's alpha / r.
        config: a tile shape (tests); None picks one for the shape.

    Returns:
        [..., N] in x's dtype.
    """
    n, k = weight.out_features, weight.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out.reshape(*lead, n)
    block_k, aligned = _tile_k(weight, config.block_k if config else 128 if interpreting() else DEFAULT_TILE_K)
    cfg = config or tile_config(1 if rows == 1 else rows, n, block_k, interpreting())
    rank = 0 if lora_a is None else int(lora_a.shape[0])
    t = lora_down(x2, lora_a, scaling) if rank else out  # out: an unused pointer when rank is 0
    b = lora_b if rank else out
    dq = weight.double_quant
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m))
    _nf4_matmul_kernel[grid](
        x2, weight.packed, weight.absmax, weight.pair_table, weight.code,
        weight.absmax2 if dq else weight.code, weight.code2 if dq else weight.code,
        weight.offset if dq else weight.code, bias if bias is not None else out, t, b, out,
        rows, n, k, x2.stride(0), t.stride(0), b.stride(0), out.stride(0),
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, DOUBLE_QUANT=dq, ALIGNED=aligned,
        HAS_BIAS=bias is not None, RANK=rank, RANK_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        EMULATE=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.reshape(*lead, n)
