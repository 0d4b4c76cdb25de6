"""Mode ``gemv`` of ``nf4_matmul`` (v7): one row of x against int32 words of W, a word a lane.

The packed bytes are read as int32 words (two a lane, halves of one block, 64 words an iteration), so a weight
costs a shift and mask folded into the code-table lookup's address, the scale multiply, the round to the compute
dtype (one ``cvt.rn.bf16x2.f32`` on NVIDIA) and an FMA; x is read by each warp as [G, W, 8] and split in
registers, R rows of W a lane share it. Portable: no lane count is assumed.
"""

from __future__ import annotations

import triton
import triton.language as tl

from medqa_core.engine.kernels.common import round_to_dtype
from medqa_core.engine.kernels.nf4_decode import _nf4_scale


@triton.jit
def _round_to(p, dtype: tl.constexpr, ROUND_ASM: tl.constexpr, EMULATE: tl.constexpr):
    """float32 ``p`` rounded to ``dtype`` and kept as float32 (what a multiply-add with x takes).

    ROUND_ASM (NVIDIA, bf16): one ``cvt.rn.bf16x2.f32`` with a zero low half, whose 32 bits are the rounded value as
    float32; Triton's cast is a convert and a shift back (two instructions a weight). Elsewhere the cast, the same
    round to nearest even."""
    if ROUND_ASM:
        bits = tl.inline_asm_elementwise("{ .reg .f32 z; mov.f32 z, 0f00000000; cvt.rn.bf16x2.f32 $0, $1, z; }",
                                         "=r,f", [p], dtype=tl.uint32, is_pure=True, pack=1)
        return bits.to(tl.float32, bitcast=True)
    else:
        return round_to_dtype(p, dtype, EMULATE).to(tl.float32)


@triton.jit
def _gemv_codes(words, table):
    """The eight weights' codes of every packed word [R, NW, G, W] (element e of a word: byte e // 2, the high
    nibble for even e), from one ``tl.gather`` of the table: eight would each stage the table in shared memory
    between two barriers. The shifts and masks fold into the lookups' byte addresses."""
    n0 = (words >> 4) & 15
    n1 = words & 15
    n2 = (words >> 12) & 15
    n3 = (words >> 8) & 15
    n4 = (words >> 20) & 15
    n5 = (words >> 16) & 15
    n6 = (words >> 28) & 15
    n7 = (words >> 24) & 15
    # [..., a, b, c] holds element 4a + 2b + c (tl.join adds the last dimension), as x's [..., 2, 2, 2] does
    nib = tl.join(tl.join(tl.join(n0, n4), tl.join(n2, n6)), tl.join(tl.join(n1, n5), tl.join(n3, n7)))
    shape: tl.constexpr = nib.shape
    flat: tl.constexpr = shape[0] * shape[1] * shape[2] * shape[3] * 8
    return _split222(tl.reshape(tl.gather(table, tl.reshape(nib, (flat,)), 0), shape))


@triton.jit
def _gemv_fma(code, scale, x_e, part, dtype: tl.constexpr, ROUND_ASM: tl.constexpr, EMULATE: tl.constexpr):
    """part + w * x: the weight ``round(code * scale)`` as bitsandbytes dequantizes it, x [NW, G, W]."""
    return part + _round_to(code * scale, dtype, ROUND_ASM, EMULATE) * x_e[None, :, :, :]


@triton.jit
def _split222(t):
    """t [..., 2, 2, 2] -> its eight [...] slices, element 4a + 2b + c at [..., a, b, c], element 0 first
    (tl.split in registers: the eight are one lane's)."""
    e0246, e1357 = tl.split(t)
    e04, e26 = tl.split(e0246)
    e15, e37 = tl.split(e1357)
    e0, e4 = tl.split(e04)
    e2, e6 = tl.split(e26)
    e1, e5 = tl.split(e15)
    e3, e7 = tl.split(e37)
    return e0, e1, e2, e3, e4, e5, e6, e7


@triton.jit
def _nf4_gemv(x_row_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, pid_n, N, it0, it1,
              blocks_per_row, stride_qn, dtype: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
              NUM_WARPS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
              DOUBLE_QUANT: tl.constexpr, PREFETCH: tl.constexpr, ROUND_ASM: tl.constexpr, EMULATE: tl.constexpr):
    """x's row ``x_row_ptr`` times rows ``pid_n * BLOCK_N ..`` of W over iterations [it0, it1) of G quantization
    blocks: [BLOCK_N // NUM_WARPS, NUM_WARPS] float32 (row ``pid_n * BLOCK_N + i * NUM_WARPS + j`` at [i, j]).

    v7's GEMV. The packed bytes are read as int32 words, eight weights each (bitsandbytes' byte order, element 2i
    in the high nibble of byte i), so each weight is one shift and mask, not a byte extract first; its position in
    the word is a compile-time shift. The tiles are [R, NUM_WARPS, G, W] (W words a block): a lane holds one
    word (G x W = 32 lanes at 256 columns an iteration), a warp a row at a time, R rows in registers (Triton puts
    the warps on the dimension after the lanes', so the rows' order is r * NUM_WARPS + warp).
    x is read as [NUM_WARPS, G, W, 8], each warp its own copy, so a lane loads the eight x values of its word
    (16 bytes) and splits them in registers: no layout change through shared memory. With PREFETCH the next
    iteration's words and scales are loaded before this one's decode.
    """
    W: tl.constexpr = BLOCKSIZE // 8  # words a quantization block
    # Words a lane holds of each block: 2 where G blocks of W words are 64 words (two halves of a block a lane:
    # one scale for both, half the scale loads a weight), else 1.
    V: tl.constexpr = 2 if G * W == 64 else 1
    WL: tl.constexpr = W // V
    R: tl.constexpr = BLOCK_N // NUM_WARPS
    words_ptr = q_ptr.to(tl.pointer_type(tl.int32))
    offs_n = pid_n * BLOCK_N + tl.reshape(tl.arange(0, BLOCK_N), (R, NUM_WARPS))
    n_mask = offs_n < N
    offs_g = tl.arange(0, G)
    # A half's words in a scrambled order (any permutation, the same for x): Triton then sees no contiguity and
    # gives each lane one word, lanes along the row (a warp's load still covers whole 32-byte sectors).
    offs_w = (tl.arange(0, WL) * 3) % WL if WL > 2 else tl.arange(0, WL)
    table = tl.load(code_ptr + tl.arange(0, 16))
    row_words = (words_ptr + offs_n[:, :, None, None] * (stride_qn // 4) + offs_g[None, None, :, None] * W
                 + offs_w[None, None, None, :])
    x_row = (x_row_ptr + tl.zeros((NUM_WARPS, 1, 1, 1), dtype=tl.int32) + offs_g[None, :, None, None] * BLOCKSIZE
             + offs_w[None, None, :, None] * 8 + tl.arange(0, 8)[None, None, None, :])
    part = tl.zeros((R, NUM_WARPS, G, WL), dtype=tl.float32)
    lo_next, hi_next, scale_next = _gemv_loads(row_words, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                               n_mask, it0 * G, blocks_per_row, W, V, BLOCKSIZE2, DOUBLE_QUANT)
    for it in range(it0, it1):
        if PREFETCH:
            lo, hi, scale = lo_next, hi_next, scale_next
            lo_next, hi_next, scale_next = _gemv_loads(row_words, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                                       offs_n, n_mask, tl.minimum(it + 1, it1 - 1) * G,
                                                       blocks_per_row, W, V, BLOCKSIZE2, DOUBLE_QUANT)
        else:
            lo, hi, scale = _gemv_loads(row_words, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask,
                                        it * G, blocks_per_row, W, V, BLOCKSIZE2, DOUBLE_QUANT)
        x_it = x_row + it * G * BLOCKSIZE
        part = _gemv_words(lo, table, scale, tl.load(x_it).to(tl.float32), part, dtype, ROUND_ASM, EMULATE)
        if V == 2:
            part = _gemv_words(hi, table, scale, tl.load(x_it + WL * 8).to(tl.float32), part, dtype, ROUND_ASM,
                               EMULATE)
    return tl.sum(tl.sum(part, axis=3), axis=2)


@triton.jit
def _gemv_words(words, table, scale, x8, part, dtype: tl.constexpr, ROUND_ASM: tl.constexpr,
                EMULATE: tl.constexpr):
    """part + the products of words [R, NW, G, WL] (eight weights each) with their x values x8 [NW, G, WL, 8]."""
    shape: tl.constexpr = x8.shape
    x0, x1, x2, x3, x4, x5, x6, x7 = _split222(tl.reshape(x8, (shape[0], shape[1], shape[2], 2, 2, 2)))
    c0, c1, c2, c3, c4, c5, c6, c7 = _gemv_codes(words, table)
    part = _gemv_fma(c0, scale, x0, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c1, scale, x1, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c2, scale, x2, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c3, scale, x3, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c4, scale, x4, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c5, scale, x5, part, dtype, ROUND_ASM, EMULATE)
    part = _gemv_fma(c6, scale, x6, part, dtype, ROUND_ASM, EMULATE)
    return _gemv_fma(c7, scale, x7, part, dtype, ROUND_ASM, EMULATE)


@triton.jit
def _gemv_loads(row_words, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, b0, blocks_per_row,
                W: tl.constexpr, V: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr):
    """The GEMV's loads from HBM for blocks b0 .. b0 + G - 1: the first and (V 2) second half of their words
    [R, NW, G, W // V] (int32), and their scales [R, NW, G, 1]."""
    lo = tl.load(row_words + b0 * W, mask=n_mask[:, :, None, None], other=0)
    if V == 2:
        hi = tl.load(row_words + b0 * W + W // 2, mask=n_mask[:, :, None, None], other=0)
    else:
        hi = lo
    offs_g = tl.arange(0, row_words.shape[2])
    block = offs_n[:, :, None] * blocks_per_row + (b0 + offs_g)[None, None, :]
    scale = _nf4_scale(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, block, n_mask[:, :, None], BLOCKSIZE2,
                       DOUBLE_QUANT)
    return lo, hi, scale[:, :, :, None]
