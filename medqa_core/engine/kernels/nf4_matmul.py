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
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl


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
def _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
               BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The float32 absmax of quantization blocks ``block`` (0 where masked)."""
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + code8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def _nf4_block(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, b,
               blocks_per_row, stride_qn, dtype: tl.constexpr, HB: tl.constexpr, BLOCKSIZE2: tl.constexpr,
               DOUBLE_QUANT: tl.constexpr, EMULATE: tl.constexpr):
    """Quantization block ``b`` of rows ``offs_n`` (rows of whole blocks): its even and odd columns, two
    [BLOCK_N, HB] tiles in ``dtype`` (float32 holding ``dtype``'s values under EMULATE), 0 on masked rows.

    Byte h of a block holds columns 2h (high nibble) and 2h + 1 (low nibble): one contiguous load of HB bytes a
    row, and two lookups in the 16-entry code table (64 bytes, one cache line, so a warp's lookups do not
    diverge).
    """
    offs_h = tl.arange(0, HB)
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + (b * HB + offs_h)[None, :], mask=n_mask[:, None],
                other=0).to(tl.int32)
    scale = _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n * blocks_per_row + b, n_mask,
                       BLOCKSIZE2, DOUBLE_QUANT)[:, None]
    w_even = _round(tl.load(code_ptr + (q >> 4)) * scale, dtype, EMULATE)
    w_odd = _round(tl.load(code_ptr + (q & 15)) * scale, dtype, EMULATE)
    return w_even, w_odd


@triton.jit
def _nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, k, N, K,
                 BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """Weights [BLOCK_N, len(k)] of any shape (odd K, blocks that straddle rows), each from its flat index."""
    mask = (offs_n[:, None] < N) & (k[None, :] < K)
    flat = offs_n[:, None].to(tl.int64) * K + k[None, :]
    byte = tl.load(q_ptr + flat // 2, mask=mask, other=0).to(tl.int32)
    q = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    scale = _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, flat // BLOCKSIZE, mask, BLOCKSIZE2,
                       DOUBLE_QUANT)
    return tl.where(mask, tl.load(code_ptr + q) * scale, 0.0)


@triton.jit
def _dot(x, w, acc, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """acc + x @ w^T: x [BM, J], w [BN, J]; float32 products of ``dtype`` values (exact), float32 sums."""
    if EMULATE:
        return tl.dot(x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
    elif dtype == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # not TF32: bitsandbytes' fp32 is exact
    else:
        return tl.dot(x.to(dtype), tl.trans(w), acc)


@triton.jit
def _nf4_matmul_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       bias_ptr, t_ptr, b_ptr, out_ptr,
                       M, N, K, stride_xm, stride_qn, stride_tm, stride_bn, stride_om, blocks_per_row,
                       BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                       ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       EMULATE: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_row = x_ptr + offs_m[:, None] * stride_xm
    if ALIGNED:
        # Rows of whole quantization blocks: G blocks an iteration (BLOCK_K columns), one scale per row and block.
        HB: tl.constexpr = BLOCKSIZE // 2
        G: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_h = tl.arange(0, HB)
        if BLOCK_M == 1:
            part = tl.zeros((BLOCK_N, HB), dtype=tl.float32)  # summed across lanes once, after the loop
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for b0 in range(0, blocks_per_row, G):
            for g in tl.static_range(G):
                b = b0 + g
                w_even, w_odd = _nf4_block(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                           offs_n, n_mask, b, blocks_per_row, stride_qn, dtype, HB, BLOCKSIZE2,
                                           DOUBLE_QUANT, EMULATE)
                col = b * BLOCKSIZE + 2 * offs_h
                x_even = tl.load(x_row + col[None, :], mask=m_mask[:, None], other=0.0)  # [BM, HB]
                x_odd = tl.load(x_row + col[None, :] + 1, mask=m_mask[:, None], other=0.0)
                if BLOCK_M == 1:
                    part += w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(
                        tl.float32)
                else:
                    acc = _dot(x_even, w_even, acc, dtype, EMULATE)
                    acc = _dot(x_odd, w_odd, acc, dtype, EMULATE)
        if BLOCK_M == 1:
            acc = tl.sum(part, axis=1)
    else:
        HALF: tl.constexpr = BLOCK_K // 2
        offs_j = tl.arange(0, HALF)
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_even = k0 + 2 * offs_j
            w_even = _round(_nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                         k_even, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT), dtype, EMULATE)
            w_odd = _round(_nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                        k_even + 1, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT), dtype, EMULATE)
            x_even = tl.load(x_row + k_even[None, :], mask=m_mask[:, None] & (k_even[None, :] < K), other=0.0)
            x_odd = tl.load(x_row + k_even[None, :] + 1, mask=m_mask[:, None] & (k_even[None, :] + 1 < K),
                            other=0.0)
            if BLOCK_M == 1:
                prod = w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(tl.float32)
                acc += tl.sum(prod, axis=1)
            else:
                acc = _dot(x_even, w_even, acc, dtype, EMULATE)
                acc = _dot(x_odd, w_odd, acc, dtype, EMULATE)
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
        else:
            acc = _dot(_round(t, dtype, EMULATE), b.to(tl.float32) if EMULATE else b.to(dtype), acc, dtype, EMULATE)
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

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def aligned(self) -> bool:
        """Rows of whole quantization blocks (the fast path): a row starts a block and a byte."""
        return self.in_features % self.blocksize == 0 and self.in_features % 2 == 0


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


@dataclass(frozen=True)
class TileConfig:
    """A kernel launch's tile shape and warps. ``block_k``: columns an iteration (whole quantization blocks on
    the aligned path, rounded to divide a row's blocks)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Tiles measured best by bench/profile_nf4_kernel.py --sweep, per device name: a JSON list of
# {"rows": bucket, "n": N, "k": K, "config": {...}}. MEDQA_NF4_TILES names another file (a fresh sweep).
TUNED_TILES = Path(__file__).with_name("nf4_tiles.json")


def row_bucket(rows: int) -> int:
    """The row counts that share a tile: 1 (GEMV), then 16, 32, 64, ... (the dot's BLOCK_M)."""
    return 1 if rows == 1 else max(16, triton.next_power_of_2(rows))


@functools.cache
def _tuned(device_name: str, path: str) -> dict[tuple[int, int, int], TileConfig]:
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        table = json.loads(file.read_text())
        return {(e["rows"], e["n"], e["k"]): TileConfig(**e["config"]) for e in table.get(device_name, [])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a tile table ({type(e).__name__}: {e}); "
                         "write it with bench/profile_nf4_kernel.py --sweep --tiles-out") from e


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def tile_config(rows: int, out_features: int, in_features: int, device: torch.device) -> TileConfig:
    """The tile for ``rows`` x ``out_features`` outputs over ``in_features``: the swept best for this device and
    shape where bench/profile_nf4_kernel.py --sweep measured one, else a default.

    The default: one row is a GEMV (BLOCK_M 1, products summed in registers); more rows use tensor-core dots,
    which need 16 rows.
    """
    if interpreting():
        return TileConfig(1 if rows == 1 else 16, 16, 128, 1, 1)
    path = os.environ.get("MEDQA_NF4_TILES") or str(TUNED_TILES)
    tuned = _tuned(_device_name(device), path).get((row_bucket(rows), out_features, in_features))
    if tuned:
        return tuned
    if rows == 1:
        return TileConfig(1, 16 if out_features <= 4096 else 32, 512, 4, 2)
    return TileConfig(min(64, row_bucket(rows)), 64, 256, 4, 2)


def _blocks_per_iteration(weight: NF4Weight, block_k: int) -> int:
    """BLOCK_K of the aligned path: the most whole blocks, up to ``block_k`` columns, that divide a row's."""
    per_row = weight.in_features // weight.blocksize
    g = max(1, block_k // weight.blocksize)
    while per_row % g:
        g //= 2
    return g * weight.blocksize


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
    cfg = config or tile_config(rows, n, k, x.device)
    aligned = weight.aligned
    block_k = _blocks_per_iteration(weight, cfg.block_k) if aligned else max(16, cfg.block_k)
    rank = 0 if lora_a is None else int(lora_a.shape[0])
    t = lora_down(x2, lora_a, scaling) if rank else out  # out: an unused pointer when rank is 0
    b = lora_b if rank else out
    dq = weight.double_quant
    grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(rows, cfg.block_m))
    _nf4_matmul_kernel[grid](
        x2, weight.packed, weight.absmax, weight.code,
        weight.absmax2 if dq else weight.code, weight.code2 if dq else weight.code,
        weight.offset if dq else weight.code, bias if bias is not None else out, t, b, out,
        rows, n, k, x2.stride(0), k // 2, t.stride(0), b.stride(0), out.stride(0), k // weight.blocksize,
        BLOCKSIZE=weight.blocksize, BLOCKSIZE2=weight.blocksize2, DOUBLE_QUANT=dq, ALIGNED=aligned,
        HAS_BIAS=bias is not None, RANK=rank, RANK_PAD=max(16, triton.next_power_of_2(max(rank, 1))),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k,
        EMULATE=interpreting(), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out.reshape(*lead, n)
