"""bitsandbytes' NF4 storage read and dequantized inside our Triton kernels (``nf4_matmul``'s modes): the packed bytes
and scales of whole quantization blocks loaded from HBM, a block's absmax (double quantization included), and each
weight ``float32(code[q] * absmax)`` rounded to the compute dtype, exactly bitsandbytes' ``dequantize_4bit``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from medqa_core.engine.kernels.common import round_to_dtype


@triton.jit
def _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, mask,
               BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The float32 absmax of quantization blocks ``block`` (0 where masked)."""
    return _nf4_scale_at(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, block, mask, BLOCKSIZE2,
                         DOUBLE_QUANT)


@triton.jit
def _nf4_scale_at(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, at, block, mask,
                  BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """:func:`_nf4_scale` of blocks ``block`` (bitsandbytes' index, which picks the absmax2 group) whose absmax
    lies at ``at`` (v22's tiled order; ``block`` in bitsandbytes')."""
    if DOUBLE_QUANT:
        code8 = tl.load(absmax_ptr + at, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2_ptr + code8) * tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=mask, other=0.0)
        return tl.where(mask, scale + tl.load(offset_ptr), 0.0)
    else:
        return tl.load(absmax_ptr + at, mask=mask, other=0.0)


@triton.jit
def _nf4_load(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, b0, blocks_per_row, stride_qn,
              G: tl.constexpr, HB: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The packed bytes [BLOCK_N, G, HB] (int32) and float32 scales [BLOCK_N, G, 1] of quantization blocks
    ``b0 .. b0 + G - 1`` of rows ``offs_n`` (rows of whole blocks): every load from HBM, none of the code lookups.

    Byte h of a block holds columns 2h (high nibble) and 2h + 1 (low nibble). The G blocks of a row are G * HB
    consecutive bytes: one contiguous load a row, and one scale a row and block.
    """
    offs_g = tl.arange(0, G)
    offs_h = tl.arange(0, HB)
    byte = (b0 + offs_g)[None, :, None] * HB + offs_h[None, None, :]  # [1, G, HB]
    q = tl.load(q_ptr + offs_n[:, None, None] * stride_qn + byte, mask=n_mask[:, None, None],
                other=0).to(tl.int32)  # [BN, G, HB]
    block = offs_n[:, None] * blocks_per_row + (b0 + offs_g)[None, :]  # [BN, G]
    scale = _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, n_mask[:, None], BLOCKSIZE2,
                       DOUBLE_QUANT)
    return q, scale[:, :, None]


@triton.jit
def _nf4_decode(code_ptr, table, q, scale, dtype: tl.constexpr, SHARED_TABLE: tl.constexpr,
                EMULATE: tl.constexpr):
    """Even and odd columns of bytes ``q`` [BN, G, HB] scaled by ``scale``: two [BN, G, HB] tiles in ``dtype``
    (float32 holding ``dtype``'s values under EMULATE), 0 on masked rows. Two lookups in the 16-entry code table:
    global-memory loads (64 bytes, one cache line, so a warp's lookups do not diverge), or with SHARED_TABLE
    ``tl.gather`` from ``table`` (the same 16 values, loaded once; Triton stages it in shared memory), which
    drops each lookup's 64-bit address arithmetic (v5, sm_90a SASS: docs/decode.md)."""
    if SHARED_TABLE:
        shape: tl.constexpr = q.shape
        flat = tl.reshape(q, (shape[0] * shape[1] * shape[2],))
        code_even = tl.reshape(tl.gather(table, flat >> 4, 0), shape)
        code_odd = tl.reshape(tl.gather(table, flat & 15, 0), shape)
    else:
        code_even = tl.load(code_ptr + (q >> 4))
        code_odd = tl.load(code_ptr + (q & 15))
    return round_to_dtype(code_even * scale, dtype, EMULATE), round_to_dtype(code_odd * scale, dtype, EMULATE)


@triton.jit
def _nf4_blocks(q_ptr, absmax_ptr, code_ptr, table, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, b0,
                blocks_per_row, stride_qn, dtype: tl.constexpr, G: tl.constexpr, HB: tl.constexpr,
                BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SHARED_TABLE: tl.constexpr,
                EMULATE: tl.constexpr):
    """Quantization blocks ``b0 .. b0 + G - 1`` of rows ``offs_n``, loaded and decoded: even and odd columns,
    two [BLOCK_N, G, HB] tiles (see :func:`_nf4_load` and :func:`_nf4_decode`)."""
    q, scale = _nf4_load(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, b0, blocks_per_row,
                         stride_qn, G, HB, BLOCKSIZE2, DOUBLE_QUANT)
    return _nf4_decode(code_ptr, table, q, scale, dtype, SHARED_TABLE, EMULATE)


@triton.jit
def _nf4_iteration(q_ptr, absmax_ptr, code_ptr, table, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, it, it1,
                   q_next, scale_next, blocks_per_row, stride_qn, dtype: tl.constexpr, G: tl.constexpr,
                   HB: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, PREFETCH: tl.constexpr,
                   SHARED_TABLE: tl.constexpr, EMULATE: tl.constexpr):
    """Iteration ``it``'s quantization blocks, decoded (even and odd columns), and the loads the next one decodes.

    With PREFETCH, software pipelining by hand (Triton pipelines only loops with a tl.dot, and there it routes the
    code-table lookups through shared memory): ``q_next, scale_next`` are this iteration's bytes and scales, loaded
    one iteration earlier (:func:`_nf4_first_loads`), and the next iteration's load here, while these decode; the
    last iteration reloads its own blocks instead of reading past the range. Without, they pass through.
    """
    if PREFETCH:
        q, scale = q_next, scale_next
        q_next, scale_next = _nf4_load(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask,
                                       tl.minimum(it + 1, it1 - 1) * G, blocks_per_row, stride_qn, G, HB,
                                       BLOCKSIZE2, DOUBLE_QUANT)
        w_even, w_odd = _nf4_decode(code_ptr, table, q, scale, dtype, SHARED_TABLE, EMULATE)
    else:
        w_even, w_odd = _nf4_blocks(q_ptr, absmax_ptr, code_ptr, table, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                    n_mask, it * G, blocks_per_row, stride_qn, dtype, G, HB, BLOCKSIZE2,
                                    DOUBLE_QUANT, SHARED_TABLE, EMULATE)
    return w_even, w_odd, q_next, scale_next


@triton.jit
def _nf4_first_loads(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, it0, blocks_per_row,
                     stride_qn, G: tl.constexpr, HB: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                     DOUBLE_QUANT: tl.constexpr, PREFETCH: tl.constexpr):
    """What :func:`_nf4_iteration` takes at the first iteration: with PREFETCH its bytes and scales, else zeros."""
    if PREFETCH:
        return _nf4_load(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, it0 * G,
                         blocks_per_row, stride_qn, G, HB, BLOCKSIZE2, DOUBLE_QUANT)
    else:
        return 0, 0.0


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
