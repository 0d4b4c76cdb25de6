"""Mode ``mma`` of ``nf4_matmul`` (v8 to v11, NVIDIA only): 1 to 8 rows of x against W on the tensor cores.

Each warp multiplies 16-row tiles of W with the rows of x (``mma.sync.m16n8k16``, x's rows as its 8 columns,
float32 accumulators), decoding the weights straight into the MMA's operand registers: a lane reads int32 words of
W rows g and g + 8 over its own consecutive columns, a code is one ``shfl.sync`` from the lane that holds that
level (v11/v12's ``lookup``: some rows or all by byte permutes instead), and two rounded weights are one ``cvt.rn``
(v12's ``block_scale``: the levels unscaled, each block's sums scaled after the MMAs).
Inline PTX (the lane and warp indices too), so ``nf4_matmul.mma_unfit`` keeps it to NVIDIA GPUs of sm_80 on;
Triton's interpreter emulates every instruction (``EMULATE``), which is what the CPU tests run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from medqa_core.engine.kernels.common import lora_waiter_finished, round_to_dtype, wait_for_inputs, wait_for_lora
from medqa_core.engine.kernels.nf4_decode import _nf4_scale_at

UNROLL = tl.constexpr(2)  # iterations a pass of the compiled K loop makes (bench/inspect_nf4_kernel.py divides by it)


@triton.jit
def _lanes(NUM_WARPS: tl.constexpr, EMULATE: tl.constexpr):
    """(lane, warp) of each of a program's 32 * NUM_WARPS threads, one tensor element each. On the GPU read from
    the hardware (``%laneid``, ``%tid.x``), so the MMA fragments of :func:`_nf4_mma` rest on no assumption about how
    Triton lays a tensor over lanes; under the interpreter the element's index."""
    i = tl.arange(0, 32 * NUM_WARPS)
    if EMULATE:
        return i % 32, i // 32
    else:
        lane = tl.inline_asm_elementwise("mov.u32 $0, %laneid;", "=r,r", [i], dtype=tl.int32, is_pure=True, pack=1)
        tid = tl.inline_asm_elementwise("mov.u32 $0, %tid.x;", "=r,r", [i], dtype=tl.int32, is_pure=True, pack=1)
        return lane, tid // 32


@triton.jit
def _shfl(value, source):
    """``shfl.sync.idx``: int32 ``value`` of lane ``source`` of the warp (the low 5 bits of ``source``)."""
    return tl.inline_asm_elementwise("shfl.sync.idx.b32 $0, $1, $2, 0x1f, 0xffffffff;", "=r,r,r", [value, source],
                                     dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _mma_code(table, index, EMULATE: tl.constexpr):
    """The NF4 level of 4-bit code ``index & 15`` (float32). On the GPU one ``shfl.sync`` from the lane that holds
    it: lane L holds level L & 15 (``table``, a register a lane), and shfl reads only the low 5 bits of its lane
    index, so ``index`` may carry the word's higher nibbles unmasked. Interpreter: a gather from the 16 levels."""
    if EMULATE:
        return tl.gather(table, index & 15, 0)
    else:
        return _shfl(table, index).to(tl.float32, bitcast=True)


@triton.jit
def _mma_pair(lo, hi, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """float32 ``lo`` and ``hi`` rounded to ``dtype`` (nearest even) and packed in 32 bits, lo in the low half: one
    MMA operand register (one ``cvt.rn`` for both on the GPU)."""
    if EMULATE:
        if dtype == tl.bfloat16:
            lo_bits = round_to_dtype(lo, dtype, True).to(tl.uint32, bitcast=True) >> 16
            hi_bits = round_to_dtype(hi, dtype, True).to(tl.uint32, bitcast=True)
        else:
            lo_bits = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
            hi_bits = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return (hi_bits | lo_bits).to(tl.int32, bitcast=True)
    elif dtype == tl.bfloat16:
        return tl.inline_asm_elementwise("cvt.rn.bf16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise("cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _mma_unpair(pair, dtype: tl.constexpr):
    """The two float32 values (low half, high half) of a packed ``dtype`` pair (the interpreter's MMA)."""
    bits = pair.to(tl.uint32, bitcast=True)
    if dtype == tl.bfloat16:
        return (bits << 16).to(tl.float32, bitcast=True), (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    else:
        lo = (bits & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        return lo, (bits >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _fragment_row(left, right, dtype: tl.constexpr, NUM_WARPS: tl.constexpr):
    """[NUM_WARPS, 8, 16]: row g of a 16-column fragment from lane 4g + t's pairs, columns 2t, 2t + 1 (``left``)
    and 2t + 8, 2t + 9 (``right``)."""
    l0, l1 = _mma_unpair(left, dtype)
    r0, r1 = _mma_unpair(right, dtype)
    cols_lo = tl.reshape(tl.join(l0, l1), (NUM_WARPS, 8, 8))
    cols_hi = tl.reshape(tl.join(r0, r1), (NUM_WARPS, 8, 8))
    return tl.reshape(tl.permute(tl.join(cols_lo, cols_hi), (0, 1, 3, 2)), (NUM_WARPS, 8, 16))


@triton.jit
def _stack_rows(top, bottom):
    """[W, 8, C] twice -> [W, 16, C], ``top`` rows 0-7."""
    w: tl.constexpr = top.shape[0]
    c: tl.constexpr = top.shape[2]
    return tl.reshape(tl.permute(tl.join(top, bottom), (0, 3, 1, 2)), (w, 16, c))


@triton.jit
def _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, dtype: tl.constexpr, NUM_WARPS: tl.constexpr):
    """What ``mma.sync.m16n8k16`` computes, on whole warps' registers ([32 * NUM_WARPS] each, lane 4g + t):
    A [16, 16] (a0: row g, columns 2t, 2t + 1; a1: row g + 8; a2, a3: columns + 8), B [16, 8] (b0: rows 2t, 2t + 1 of
    column g; b1: rows + 8), C and D [16, 8] (c0, c1: row g, columns 2t, 2t + 1; c2, c3: row g + 8). float32 products
    of the 16-bit values (exact) summed in float32."""
    a = _stack_rows(_fragment_row(a0, a2, dtype, NUM_WARPS), _fragment_row(a1, a3, dtype, NUM_WARPS))  # [W, 16, 16]
    b_t = _fragment_row(b0, b1, dtype, NUM_WARPS)  # [W, 8 (column n), 16 (k)]
    c = _stack_rows(tl.reshape(tl.join(c0, c1), (NUM_WARPS, 8, 8)), tl.reshape(tl.join(c2, c3), (NUM_WARPS, 8, 8)))
    d = c + tl.sum(a[:, :, None, :] * b_t[:, None, :, :], axis=3)  # [W, 16, 8]
    top, bottom = tl.split(tl.permute(tl.reshape(d, (NUM_WARPS, 2, 8, 8)), (0, 2, 3, 1)))
    d0, d1 = tl.split(tl.reshape(top, (NUM_WARPS, 8, 4, 2)))
    d2, d3 = tl.split(tl.reshape(bottom, (NUM_WARPS, 8, 4, 2)))
    lanes: tl.constexpr = 32 * NUM_WARPS
    return (tl.reshape(d0, (lanes,)), tl.reshape(d1, (lanes,)), tl.reshape(d2, (lanes,)),
            tl.reshape(d3, (lanes,)))


@triton.jit
def _mma(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, dtype: tl.constexpr, NUM_WARPS: tl.constexpr,
         EMULATE: tl.constexpr):
    """D = A @ B + C, one ``mma.sync.aligned.m16n8k16`` a warp (float32 accumulators; see :func:`_mma_emulated`
    for the fragments)."""
    if EMULATE:
        return _mma_emulated(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3, dtype, NUM_WARPS)
    elif dtype == tl.bfloat16:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)
    else:
        return tl.inline_asm_elementwise(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {$0, $1, $2, $3}, {$4, $5, $6, $7}, {$8, $9}, "
            "{$10, $11, $12, $13};", "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", [a0, a1, a2, a3, b0, b1, c0, c1, c2, c3],
            dtype=(tl.float32, tl.float32, tl.float32, tl.float32), is_pure=True, pack=1)


@triton.jit
def _pick(t, i: tl.constexpr):
    """Column ``i`` of an integer tensor [L, C] whose rows are each one lane's registers: a register chosen at
    compile time (the selects fold away)."""
    return tl.sum(tl.where(tl.arange(0, t.shape[1])[None, :] == i, t, 0), axis=1)


@triton.jit
def _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row, block, blocks_per_row,
              BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TILED: tl.constexpr):
    """The float32 scale of quantization block ``block`` of W row ``row`` (uint32 indices). TILED (v22,
    ``nf4_weight.tile_nf4``): the absmax codes of a 16-row tile's rows lie side by side, block by block, so a
    warp's 16 rows read one sector where bitsandbytes' order puts each in its own."""
    index = row * blocks_per_row + block  # bitsandbytes' order: also what picks the absmax2 group
    at = index
    if TILED:
        at = (row // 16) * (blocks_per_row * 16) + block * 16 + row % 16
    return _nf4_scale_at(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, at, index, True, BLOCKSIZE2, DOUBLE_QUANT)


@triton.jit
def _tiled_word(row, col, words_per_row, WL: tl.constexpr, PARTS: tl.constexpr):
    """v22: where a lane's first word of W row ``row`` at column ``col`` lies in the tiled order
    (``nf4_weight.tile_nf4``): of each 16-row tile, iteration by iteration, lane 4g + t's WL words of row g then its
    WL of row g + 8 (uint32 indices). The row's part is loop-invariant (hoisted); an iteration adds the column's."""
    BLOCK_K: tl.constexpr = 32 * WL
    iterations = words_per_row // (4 * WL)
    row_part = ((row // 16) * iterations * 32 + (row % 8) * 4) * (2 * WL) + ((row // 8) % 2) * WL
    # lane column t's column offset in the iteration is t * 8 * WL / PARTS: its words start 2 * WL * t further on
    return row_part + (col // BLOCK_K) * (64 * WL) + (col % BLOCK_K) * PARTS // 4


@triton.jit
def _mma_loads(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h, col, blocks_per_row,
               words_per_row, WL: tl.constexpr, PARTS: tl.constexpr, BLOCKSIZE: tl.constexpr,
               BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, SCALES: tl.constexpr = True,
               TILED: tl.constexpr = False):
    """An iteration's loads from HBM for one 16-row tile of :func:`_nf4_mma`: a lane's WL int32 words of rows
    ``row_g`` and ``row_h`` (rows that exist: no masks) from column ``col`` on, inside one quantization block, as
    tuples of [lanes, 4] loads (one where WL is 4 or less), and their two scales. PARTS 2 (block scale over two
    blocks an iteration): the words are WL / 2 from ``col`` in each of the two blocks, and a scale [lanes, 2] a row
    (``tl.join``: both in the lane). SCALES False (v13, the scales a group ahead: :func:`_group_scales`): zeros in
    their place, no load. TILED (v22): the same words from the tiled copy, where a lane's words of both rows are
    side by side and a warp's 1 KB (at 128 columns) one contiguous run."""
    WP: tl.constexpr = WL // PARTS
    CW: tl.constexpr = 4 if WL > 4 else WL  # words a load: Triton lays [lanes, 8] over two lanes (v21)
    # unsigned: the indices are never negative, and a signed division by a power of two costs a sign fix-up
    word = col.to(tl.uint32) // 8
    block = col.to(tl.uint32) // BLOCKSIZE
    if TILED:
        # One base a lane: row g + 8's words follow row g's, WL words on (a constant off one pointer, not a second
        # address). ``& ~8`` keeps a row clamped to N - 1 (a lane past N, whose results are not stored) on a g row
        # of the last tile, so its h words are that tile's, in bounds; past N inside the tile lie the copy's zeros.
        row_w = row_g.to(tl.uint32) & 0xFFFFFFF7
        base_g = words_ptr + tl.multiple_of(_tiled_word(row_w, col.to(tl.uint32), words_per_row, WL, PARTS), CW)
        base_h = base_g + WL
    else:
        first_g = tl.multiple_of(row_g * words_per_row + word, WP)
        first_h = tl.multiple_of(row_h * words_per_row + word, WP)
    words_g = ()  # WL // CW tensors [lanes, CW]
    words_h = ()
    for c in tl.static_range(WL // CW):
        i = c * CW + tl.arange(0, CW)
        if TILED:
            offs = i[None, :]  # the lane's words in the order they are read
            at_g, at_h = base_g[:, None] + offs, base_h[:, None] + offs
        else:
            offs = ((i % WP) + (i // WP) * (BLOCKSIZE // 8))[None, :]
            at_g, at_h = words_ptr + first_g[:, None] + offs, words_ptr + first_h[:, None] + offs
        words_g = words_g + (tl.load(at_g),)
        words_h = words_h + (tl.load(at_h),)
    if SCALES:
        rg = row_g.to(tl.uint32)
        rh = row_h.to(tl.uint32)
        scale_g = _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rg, block, blocks_per_row, BLOCKSIZE2,
                            DOUBLE_QUANT, TILED)
        scale_h = _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rh, block, blocks_per_row, BLOCKSIZE2,
                            DOUBLE_QUANT, TILED)
        if PARTS == 2:
            scale_g = tl.join(scale_g, _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rg, block + 1,
                                                 blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED))
            scale_h = tl.join(scale_h, _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, rh, block + 1,
                                                 blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED))
    else:
        scale_g = tl.zeros((row_g.shape[0],), dtype=tl.float32)
        if PARTS == 2:
            scale_g = tl.join(scale_g, scale_g)
        scale_h = scale_g
    return words_g, words_h, scale_g, scale_h


@triton.jit
def _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h, group, t, blocks_per_row,
                  BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr, TILED: tl.constexpr = False):
    """v13: the scales of a group of 4 quantization blocks of rows ``row_g`` and ``row_h`` (4 * BLOCKSIZE
    columns), lane t holding block ``4 * group + t`` of each (the row's last where that is past it). The four lanes
    of a row load one block each, once a group, where v12 loaded the same scale in all four, every iteration:
    :func:`_lane_scale` hands each iteration its block's."""
    block = tl.minimum(group * 4 + t, blocks_per_row - 1).to(tl.uint32)
    scale_g = _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g.to(tl.uint32), block, blocks_per_row,
                        BLOCKSIZE2, DOUBLE_QUANT, TILED)
    scale_h = _scale_of(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_h.to(tl.uint32), block, blocks_per_row,
                        BLOCKSIZE2, DOUBLE_QUANT, TILED)
    return scale_g, scale_h


@triton.jit
def _lane_scale(scales, source, warp, EMULATE: tl.constexpr):
    """The scale lane ``source`` of the same warp holds in ``scales`` (:func:`_group_scales`): one ``shfl``."""
    if EMULATE:
        return tl.gather(scales, warp * 32 + source, 0)
    else:
        return _shfl(scales.to(tl.int32, bitcast=True), source).to(tl.float32, bitcast=True)


@triton.jit
def _iteration_scales(ahead_g, ahead_h, it, t, lane, warp, WL: tl.constexpr, PARTS: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCKSIZE: tl.constexpr, EMULATE: tl.constexpr):
    """The scales :func:`_mma_loads` gives for iteration ``it``, from its group's (:func:`_group_scales`): the
    lane's block of the group (of each part) is held by lane ``(lane & ~3) | block``."""
    IPG: tl.constexpr = 4 * BLOCKSIZE // BLOCK_K  # iterations a group
    WP: tl.constexpr = WL // PARTS
    block = ((it % IPG) * BLOCK_K + t * (8 * WP)) // BLOCKSIZE
    scale_g = _lane_scale(ahead_g, (lane & ~3) | block, warp, EMULATE)
    scale_h = _lane_scale(ahead_h, (lane & ~3) | block, warp, EMULATE)
    if PARTS == 2:
        scale_g = tl.join(scale_g, _lane_scale(ahead_g, (lane & ~3) | (block + 1), warp, EMULATE))
        scale_h = tl.join(scale_h, _lane_scale(ahead_h, (lane & ~3) | (block + 1), warp, EMULATE))
    return scale_g, scale_h


@triton.jit
def _mma_x_word(xw_ptr, x_row, col, x_words_per_row, offset: tl.constexpr):
    """A lane's x values of the 8 columns from ``col + offset`` on of x row ``x_row``: [lanes, 4] int32 words of
    two values each (bf16/fp16 pairs, the MMA's B registers as loaded), one 16-byte load. One tensor a word, each
    [lanes, 4]: Triton then gives each lane its own row (v8's layout). One [WL, lanes, 4] tensor was laid out
    differently by Triton 3.6 (lanes over the words too), which put the MMAs' operands in other lanes."""
    return tl.load(xw_ptr + tl.multiple_of(x_row * x_words_per_row + col // 2 + offset // 2, 4)[:, None]
                   + tl.arange(0, 4)[None, :])


@triton.jit
def _mma_x_loads(xw_ptr, x_row, col, x_words_per_row, WL: tl.constexpr, PARTS: tl.constexpr,
                 BLOCKSIZE: tl.constexpr):
    """The x words of an iteration (:func:`_mma_x_word`), a tuple of WL (v21: up to 8, at block_k 256): the columns
    of the weight words :func:`_mma_loads` gives."""
    WP: tl.constexpr = WL // PARTS
    words = ()
    for i in tl.static_range(WL):
        words = words + (_mma_x_word(xw_ptr, x_row, col, x_words_per_row, 8 * (i % WP) + (i // WP) * BLOCKSIZE),)
    return words


@triton.jit
def _mma_x_blocks(xw_ptr, x_rows, col, x_words_per_row, WL: tl.constexpr, PARTS: tl.constexpr,
                  BLOCKSIZE: tl.constexpr):
    """:func:`_mma_x_loads` for each of a program's blocks of 8 x rows (``x_rows``: a tuple, a lane's row in
    each): a tuple of their words."""
    blocks = ()
    for j in tl.static_range(len(x_rows)):
        blocks = blocks + (_mma_x_loads(xw_ptr, x_rows[j], col, x_words_per_row, WL, PARTS, BLOCKSIZE),)
    return blocks


@triton.jit
def _zero_blocks(like, XB: tl.constexpr):
    """XB blocks of four float32 accumulators (a tuple of 4-tuples), zero."""
    blocks = ()
    for _j in tl.static_range(XB):
        blocks = blocks + ((tl.zeros_like(like), tl.zeros_like(like), tl.zeros_like(like), tl.zeros_like(like)),)
    return blocks


@triton.jit
def _mma_weights(word_g, word_h, shift: tl.constexpr, table, scale_g, scale_h, dtype: tl.constexpr,
                 EMULATE: tl.constexpr):
    """One A operand register of rows g and g + 8: the weights of the nibbles at bits ``shift + 4`` and ``shift``
    of their words (bitsandbytes' element 2i is byte i's high nibble: these are two consecutive columns), each
    ``round(code * absmax)`` as bitsandbytes dequantizes it."""
    row_g = _mma_pair(_mma_code(table, word_g >> (shift + 4), EMULATE) * scale_g,
                      _mma_code(table, word_g >> shift, EMULATE) * scale_g, dtype, EMULATE)
    row_h = _mma_pair(_mma_code(table, word_h >> (shift + 4), EMULATE) * scale_h,
                      _mma_code(table, word_h >> shift, EMULATE) * scale_h, dtype, EMULATE)
    return row_g, row_h


@triton.jit
def _mma_levels(word, shift: tl.constexpr, levels_lo, levels_hi, EMULATE: tl.constexpr):
    """One A operand register of one row with ``block_scale`` (v12): the levels of the nibbles at bits
    ``shift + 4`` (low half) and ``shift`` of ``word``, rounded to the MMA's dtype and unscaled. Two ``shfl`` from
    the lanes that hold them (``levels_lo``: a level's bits in the low half, ``levels_hi`` in the high) and an OR:
    no multiply, no ``cvt``. Interpreter: gathers from the 16 levels."""
    if EMULATE:
        return tl.gather(levels_lo, (word >> (shift + 4)) & 15, 0) | tl.gather(levels_hi, (word >> shift) & 15, 0)
    else:
        return _shfl(levels_lo, word >> (shift + 4)) | _shfl(levels_hi, word >> shift)


@triton.jit
def _prmt(a, b, selector, EMULATE: tl.constexpr):
    """``prmt.b32``: byte k of the result is byte ``n & 7`` of the 8 bytes ``b:a`` (a's are 0-3), n the selector's
    nibble k; where n's bit 3 is set, that byte's sign bit repeated instead. int32 tensors of one shape."""
    if EMULATE:
        a = a.to(tl.uint32, bitcast=True)
        b = b.to(tl.uint32, bitcast=True)
        sel = selector.to(tl.uint32, bitcast=True)
        out = tl.zeros_like(a)
        for k in tl.static_range(4):
            nibble = (sel >> (4 * k)) & 15
            shift = 8 * (nibble & 3)
            byte = tl.where((nibble & 7) < 4, a >> shift, b >> shift) & 0xFF
            byte = tl.where((nibble & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)
            out = out | (byte << (8 * k))
        return out.to(tl.int32, bitcast=True)
    else:
        return tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, selector], dtype=tl.int32,
                                         is_pure=True, pack=1)


@triton.jit
def _byte_planes(scale, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15, dtype: tl.constexpr,
                 EMULATE: tl.constexpr):
    """One row's block as a table in registers: the 16 weights ``round(level * scale)`` it can hold (bitsandbytes'
    dequantization, levels ``l0..l15``), as 4 registers of their low bytes (4 levels each) and 4 of their high
    bytes, which :func:`_mma_weights_prmt` indexes with byte permutes."""
    p0 = _mma_pair(l0 * scale, l1 * scale, dtype, EMULATE)
    p1 = _mma_pair(l2 * scale, l3 * scale, dtype, EMULATE)
    p2 = _mma_pair(l4 * scale, l5 * scale, dtype, EMULATE)
    p3 = _mma_pair(l6 * scale, l7 * scale, dtype, EMULATE)
    p4 = _mma_pair(l8 * scale, l9 * scale, dtype, EMULATE)
    p5 = _mma_pair(l10 * scale, l11 * scale, dtype, EMULATE)
    p6 = _mma_pair(l12 * scale, l13 * scale, dtype, EMULATE)
    p7 = _mma_pair(l14 * scale, l15 * scale, dtype, EMULATE)
    lo_bytes = tl.zeros_like(p0) + 0x6420  # bytes 0, 2 of each pair: the low bytes of two weights each
    hi_bytes = tl.zeros_like(p0) + 0x7531
    return (_prmt(p0, p1, lo_bytes, EMULATE), _prmt(p2, p3, lo_bytes, EMULATE), _prmt(p4, p5, lo_bytes, EMULATE),
            _prmt(p6, p7, lo_bytes, EMULATE), _prmt(p0, p1, hi_bytes, EMULATE), _prmt(p2, p3, hi_bytes, EMULATE),
            _prmt(p4, p5, hi_bytes, EMULATE), _prmt(p6, p7, hi_bytes, EMULATE))


@triton.jit
def _mma_weights_prmt(word, shift: tl.constexpr, lo0, lo1, lo2, lo3, hi0, hi1, hi2, hi3, EMULATE: tl.constexpr):
    """The two A operand registers of one row that :func:`_mma_weights` gives for bytes ``shift // 8`` and
    ``shift // 8 + 1`` of ``word``, from the row's byte planes (:func:`_byte_planes`) by ALU byte permutes instead
    of one ``shfl`` a weight: the four codes' low and high bytes from levels 0-7 and 8-15, each code's bit 3
    choosing, then paired as the MMA takes them (a byte's high nibble is the lower column)."""
    codes = word >> shift
    index = codes & 0x7777  # the four codes' low 3 bits: a byte of 8 each
    # 0xFF in the bytes whose code is 8-15, 0 in the others: each selector nibble is the code's bit 3 twice (bits 3
    # and 0; bits 1-2 are the next code's), so codes 8-15 repeat the sign of an odd byte (0x80) and codes 0-7 take
    # an even one (0). One bit-select and one permute.
    shifted = codes >> 3
    upper = shifted ^ ((codes ^ shifted) & 0x8888)  # a bit-select: codes' bits 3, the rest from codes >> 3
    sign_bytes = tl.zeros_like(word) - 0x7FFF8000  # 0x80008000
    choose = _prmt(sign_bytes, sign_bytes, upper, EMULATE)
    lo = (_prmt(lo0, lo1, index, EMULATE) & ~choose) | (_prmt(lo2, lo3, index, EMULATE) & choose)
    hi = (_prmt(hi0, hi1, index, EMULATE) & ~choose) | (_prmt(hi2, hi3, index, EMULATE) & choose)
    # columns of byte shift // 8: its high nibble (code 1) in the low half; of the next byte: codes 3 then 2
    return (_prmt(lo, hi, tl.zeros_like(word) + 0x4051, EMULATE),
            _prmt(lo, hi, tl.zeros_like(word) + 0x6273, EMULATE))


@triton.jit
def _mma_tile(words_g, words_h, scale_g, scale_h, xs, table, levels_lo, levels_hi, acc, g0, g1,
              g2, g3, g4, g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7, W0: tl.constexpr, WN: tl.constexpr,
              CW: tl.constexpr, dtype: tl.constexpr, NUM_WARPS: tl.constexpr, PRMT_ROWS: tl.constexpr,
              BLOCK_SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """One iteration of one 16-row tile, its words W0 .. W0 + WN - 1 (``words_g/h``: tuples of CW words a load):
    two MMAs a word (k 16 each) and x block on the lane's words of rows g and g + 8 and each block's x words of the
    same columns (``xs``, a tuple of :func:`_mma_x_loads`), into that block's accumulators (``acc``, a tuple of
    4-tuples; returned). v18: the weights are decoded once for all the blocks. PRMT_ROWS 1: row g + 8's weights
    from its byte planes ``h0..h7`` (ALU permutes, :func:`_byte_planes`), row g's by ``shfl`` (the load/store
    pipe); 2: row g's from ``g0..g7`` too. BLOCK_SCALE: the levels unscaled (``levels_lo/hi`` by ``shfl``, or the
    planes of the levels), the caller scales the sums.
    """
    for i in tl.static_range(W0, W0 + WN):
        word_g = _pick(words_g[i // CW], i % CW)
        word_h = _pick(words_h[i // CW], i % CW)
        for half in tl.static_range(2):
            # columns 8i + 4 half + (0, 1): byte 2 half; + (2, 3): byte 2 half + 1 (lookups that a row's byte
            # permutes replace are unused: the compiler drops them)
            if BLOCK_SCALE:
                a0 = _mma_levels(word_g, 16 * half, levels_lo, levels_hi, EMULATE)
                a2 = _mma_levels(word_g, 16 * half + 8, levels_lo, levels_hi, EMULATE)
                a1 = _mma_levels(word_h, 16 * half, levels_lo, levels_hi, EMULATE)
                a3 = _mma_levels(word_h, 16 * half + 8, levels_lo, levels_hi, EMULATE)
            else:
                a0, a1 = _mma_weights(word_g, word_h, 16 * half, table, scale_g, scale_h, dtype, EMULATE)
                a2, a3 = _mma_weights(word_g, word_h, 16 * half + 8, table, scale_g, scale_h, dtype, EMULATE)
            if PRMT_ROWS >= 1:
                a1, a3 = _mma_weights_prmt(word_h, 16 * half, h0, h1, h2, h3, h4, h5, h6, h7, EMULATE)
            if PRMT_ROWS == 2:
                a0, a2 = _mma_weights_prmt(word_g, 16 * half, g0, g1, g2, g3, g4, g5, g6, g7, EMULATE)
            summed = ()
            for j in tl.static_range(len(acc)):
                x_word = xs[j][i]
                c = acc[j]
                summed = summed + (_mma(a0, a1, a2, a3, _pick(x_word, 2 * half), _pick(x_word, 2 * half + 1), c[0],
                                        c[1], c[2], c[3], dtype, NUM_WARPS, EMULATE),)
            acc = summed
    return acc


@triton.jit
def _mma_iteration(words_g, words_h, scale_g, scale_h, xs, table, levels_lo, levels_hi, acc,
                   l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15, q0, q1, q2, q3, q4, q5, q6,
                   q7, WL: tl.constexpr, PARTS: tl.constexpr, dtype: tl.constexpr, NUM_WARPS: tl.constexpr,
                   PRMT_ROWS: tl.constexpr, BLOCK_SCALE: tl.constexpr, EMULATE: tl.constexpr):
    """:func:`_mma_tile` with the byte planes it needs: BLOCK_SCALE, the launch's planes of the unscaled levels
    ``q0..q7``, and each block's MMAs (PARTS an iteration) from zero, their sums scaled into ``acc`` (a row's block
    scale, one FFMA an accumulator); otherwise each iteration's planes of the rows' blocks (built here, where
    PRMT_ROWS asks)."""
    CW: tl.constexpr = 4 if WL > 4 else WL  # words a load (:func:`_mma_loads`)
    if BLOCK_SCALE:
        WP: tl.constexpr = WL // PARTS
        zero = _zero_blocks(acc[0][0], len(acc))
        if PARTS == 2:
            sg0, sg1 = tl.split(scale_g)
            sh0, sh1 = tl.split(scale_h)
        else:
            sg0, sg1, sh0, sh1 = scale_g, scale_g, scale_h, scale_h
        for p in tl.static_range(PARTS):
            sg = sg0 if p == 0 else sg1
            sh = sh0 if p == 0 else sh1
            e = _mma_tile(words_g, words_h, scale_g, scale_h, xs, table, levels_lo, levels_hi, zero, q0, q1, q2, q3,
                          q4, q5, q6, q7, q0, q1, q2, q3, q4, q5, q6, q7, p * WP, WP, CW, dtype, NUM_WARPS, PRMT_ROWS,
                          BLOCK_SCALE, EMULATE)
            scaled = ()
            for j in tl.static_range(len(acc)):
                c = acc[j]
                ej = e[j]
                scaled = scaled + ((c[0] + ej[0] * sg, c[1] + ej[1] * sg, c[2] + ej[2] * sh, c[3] + ej[3] * sh),)
            acc = scaled
    else:  # (one return, at the end: Triton traces the code after a return inside an if)
        if PRMT_ROWS >= 1:
            h0, h1, h2, h3, h4, h5, h6, h7 = _byte_planes(scale_h, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11,
                                                          l12, l13, l14, l15, dtype, EMULATE)
        else:
            h0, h1, h2, h3, h4, h5, h6, h7 = q0, q1, q2, q3, q4, q5, q6, q7  # unused
        if PRMT_ROWS == 2:
            g0, g1, g2, g3, g4, g5, g6, g7 = _byte_planes(scale_g, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11,
                                                          l12, l13, l14, l15, dtype, EMULATE)
        else:
            g0, g1, g2, g3, g4, g5, g6, g7 = q0, q1, q2, q3, q4, q5, q6, q7  # unused
        acc = _mma_tile(words_g, words_h, scale_g, scale_h, xs, table, levels_lo, levels_hi, acc, g0, g1, g2, g3, g4,
                        g5, g6, g7, h0, h1, h2, h3, h4, h5, h6, h7, 0, WL, CW, dtype, NUM_WARPS, PRMT_ROWS, BLOCK_SCALE,
                        EMULATE)
    return acc



@triton.jit
def _lora_t_pairs(t_ptr, x_row, k, stride_tm, RANK: tl.constexpr, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """LoRA's t as the MMA's B operand: x row ``x_row``'s ranks ``k, k + 1`` (b0) and ``k + 8, k + 9`` (b1), rounded
    to ``dtype`` (ranks from RANK on: 0)."""
    row = t_ptr + x_row * stride_tm
    # .cg: from L2, where the LoRA programs wrote t, never a stale L1 line.
    v0 = tl.load(row + k, mask=k < RANK, other=0.0, cache_modifier=".cg")
    v1 = tl.load(row + k + 1, mask=k + 1 < RANK, other=0.0, cache_modifier=".cg")
    v2 = tl.load(row + k + 8, mask=k + 8 < RANK, other=0.0, cache_modifier=".cg")
    v3 = tl.load(row + k + 9, mask=k + 9 < RANK, other=0.0, cache_modifier=".cg")
    return _mma_pair(v0, v1, dtype, EMULATE), _mma_pair(v2, v3, dtype, EMULATE)


@triton.jit
def _lora_b_pairs(b_ptr, row_g, row_h, k, stride_bn, RANK: tl.constexpr, dtype: tl.constexpr,
                  EMULATE: tl.constexpr):
    """LoRA's B [N, RANK] as the MMA's A operand: rows ``row_g`` (a0: ranks k, k + 1; a2: k + 8, k + 9) and
    ``row_h`` (a1, a3), as ``dtype`` pairs (ranks from RANK on: 0)."""
    g = b_ptr + row_g * stride_bn + k
    h = b_ptr + row_h * stride_bn + k
    g0 = tl.load(g, mask=k < RANK, other=0.0).to(tl.float32)
    g1 = tl.load(g + 1, mask=k + 1 < RANK, other=0.0).to(tl.float32)
    g8 = tl.load(g + 8, mask=k + 8 < RANK, other=0.0).to(tl.float32)
    g9 = tl.load(g + 9, mask=k + 9 < RANK, other=0.0).to(tl.float32)
    h0 = tl.load(h, mask=k < RANK, other=0.0).to(tl.float32)
    h1 = tl.load(h + 1, mask=k + 1 < RANK, other=0.0).to(tl.float32)
    h8 = tl.load(h + 8, mask=k + 8 < RANK, other=0.0).to(tl.float32)
    h9 = tl.load(h + 9, mask=k + 9 < RANK, other=0.0).to(tl.float32)
    return (_mma_pair(g0, g1, dtype, EMULATE), _mma_pair(h0, h1, dtype, EMULATE), _mma_pair(g8, g9, dtype, EMULATE),
            _mma_pair(h8, h9, dtype, EMULATE))


@triton.jit
def _mma_store(part, n0, out_g, M, N, c0, c1, c2, c3):
    """A tile's accumulators into the float32 partial [M, N]: D[m, n] = W row m . x row n, so c0, c1 are W row
    ``out_g`` against x rows n0, n0 + 1 and c2, c3 W row ``out_g + 8``."""
    out_h = out_g + 8
    tl.store(part + n0 * N + out_g, c0, mask=(n0 < M) & (out_g < N))
    tl.store(part + (n0 + 1) * N + out_g, c1, mask=(n0 + 1 < M) & (out_g < N))
    tl.store(part + n0 * N + out_h, c2, mask=(n0 < M) & (out_h < N))
    tl.store(part + (n0 + 1) * N + out_h, c3, mask=(n0 + 1 < M) & (out_h < N))


@triton.jit
def _nf4_mma(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, partial_ptr, t_ptr, b_ptr,
             lora_counter_ptr, pid_n, pid_m, pid_k, M, N, K, it0, it1, blocks_per_row, stride_xm, stride_tm, stride_bn,
             output_tiles, dtype: tl.constexpr, BLOCK_K: tl.constexpr,
             TILES: tl.constexpr, NUM_WARPS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
             DOUBLE_QUANT: tl.constexpr, PREFETCH: tl.constexpr, PRMT_ROWS: tl.constexpr, BLOCK_SCALE: tl.constexpr,
             SCALES_AHEAD: tl.constexpr, RANK: tl.constexpr, LORA_RANKS: tl.constexpr, PDL: tl.constexpr,
             XB: tl.constexpr, EMULATE: tl.constexpr, TILED: tl.constexpr = False):
    """Rows ``pid_n * 16 * TILES * NUM_WARPS ..`` of W times x rows ``pid_m * 8 * XB ..`` over iterations [it0, it1) of
    BLOCK_K columns, on the tensor cores: written, float32, to ``partial_ptr[pid_k, m, n]``; with LoRA (RANK), the
    first of the output tile's K splits adds ``t @ B^T`` first.

    v8 (NVIDIA: mma.sync and shfl.sync; the interpreter emulates both). Each warp computes TILES 16-row tiles of W
    against up to 8 rows of x with ``mma.sync.m16n8k16`` (float32 accumulators), x's rows as the MMA's 8 columns,
    so 1 to 8 rows cost the same. A lane (g, t) = (lane // 4, lane % 4) decodes W rows g and g + 8 of each tile
    over its own 8 * WL consecutive columns of each iteration (WL int32 words a row: one load each), and its x
    words are those columns of x row g. The dot product does not care which k a column is called inside the MMA,
    so the lane's columns 4j .. 4j + 3 are MMA j's k = 2t, 2t + 1, 2t + 8, 2t + 9 for both A and B: the weights go
    into operand registers as they are decoded, and x's bf16 pairs are its B registers as loaded. A weight costs a
    shift, a ``shfl`` (the code table lives one level a lane), a multiply by its scale and half a ``cvt.rn`` pair:
    no float32 FMA, no layout change, no shared memory.

    v9: TILES (1 or 2) tiles a warp share each x word they load (x is loaded twice the weights' bytes a tile,
    from L1), and with PREFETCH x is loaded an iteration ahead with the words (v8 loaded it just before its MMAs:
    Nsight Compute's top stall on an H100).

    v11 (PRMT_ROWS 1): one ``shfl`` a weight held the L1/TEX data pipe at 75% while DRAM ran at 31% (v10 on an
    H200), so row g + 8's weights come from ALU byte permutes on a table of its block's 16 rounded weights
    (:func:`_byte_planes`, built each iteration), row g's by ``shfl`` as before: the lookups split across two pipes.
    v12: PRMT_ROWS 2, both rows by permutes (no ``shfl``); BLOCK_SCALE, the MMAs on the unscaled levels and each
    block's sums scaled by the rows' block scales, which drops a multiply and half a ``cvt`` a weight and, with
    permutes, builds the planes once (an iteration of several blocks, PARTS: a lane's words are WP in each, so
    that an MMA's 16 columns lie in one block).

    v13 (SCALES_AHEAD): an iteration loaded each row's scale in all four lanes of the row, three dependent loads
    (absmax code, code2, absmax2) of 8 rows' lines each, where the words are two: most of the L1 wavefronts
    once the lookups left the load/store pipe. Now the four lanes of a row load the scales of 4 consecutive blocks
    (a group) once, one each (:func:`_group_scales`; with PREFETCH the next group's), and an iteration takes its
    block's scale by one ``shfl`` a row (:func:`_iteration_scales`); the launch splits K in whole groups. The same
    float32 scales: bitwise v12's results.

    v16 (RANK): LoRA's up-projection ``t @ B^T`` is one more MMA a 16 ranks, B's rows as A (W's rows g, g + 8) and
    t's rows as B (x's rows), into the same accumulators, by the K split 0 of each output tile once the LoRA
    programs are done. Until v15 the epilogue did it on a [BM, BN] tile, each rank picked out of [BM, R] and
    [BN, R] tiles by a cross-lane sum: 32 shared-memory round trips and barriers in a row at the end of every
    output tile. The products of the rounded t and B are exact either way; the float32 sums take another order.

    v17 (PDL, Hopper on): launched as a programmatic dependent of the kernel before it, a program loads its first
    iteration's weights and its first group's scales, which no kernel writes, while that kernel finishes, and
    waits for it (:func:`wait_for_inputs`) only before it loads x. A launch's first loads were a dependent chain
    (absmax code, then its code2 level; the words) every program paid before its first MMA: most of a 4-iteration
    program of o_proj's tiles.

    v18 (XB): a program takes XB blocks of 8 x rows (16 to 64 rows of decode at batch 16-64), each its own
    accumulators and x words, and decodes each weight once for all of them: XB MMAs a decoded operand, where a
    program per 8 rows decoded every weight again, and the dot tiles (v3-v6) decoded through shared memory at
    about 10 instructions a weight.
    """
    WL: tl.constexpr = BLOCK_K // 32  # int32 words a lane reads of each of its rows an iteration
    # block scale over several blocks an iteration: a lane's words in each (the MMAs of a block sum one scale)
    PARTS: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_SCALE and BLOCK_K > BLOCKSIZE else 1  # 1 or 2 (mma_unfit)
    WP: tl.constexpr = WL // PARTS  # a lane's consecutive words
    IPG: tl.constexpr = 4 * BLOCKSIZE // BLOCK_K  # SCALES_AHEAD: iterations a group of 4 blocks
    SCALES_EACH: tl.constexpr = not SCALES_AHEAD  # the scales loaded with the words, every iteration (v8-v12)
    lane, warp = _lanes(NUM_WARPS, EMULATE)
    g = lane // 4
    t = lane % 4
    # The lane's output rows: W rows g and g + 8 of each of its warp's TILES tiles (16 rows apart)
    out_g = pid_n * (16 * TILES * NUM_WARPS) + warp * (16 * TILES) + g
    # Rows past N and x rows past M read the last one instead (no masks on the loads; their results are not stored)
    row_g = tl.minimum(out_g, N - 1)
    row_h = tl.minimum(out_g + 8, N - 1)
    x_rows = ()  # lane g's x row of each block of 8: the MMA's column g
    for j in tl.static_range(XB):
        x_rows = x_rows + (tl.minimum(pid_m * (8 * XB) + 8 * j + g, M - 1),)
    if EMULATE:
        table = tl.load(code_ptr + tl.arange(0, 16))
    else:
        table = tl.load(code_ptr + (lane & 15)).to(tl.int32, bitcast=True)
    if BLOCK_SCALE:  # the levels rounded to dtype, as the low or high half of a register (lane L: level L & 15)
        level = table if EMULATE else table.to(tl.float32, bitcast=True)
        levels_lo = _mma_pair(level, tl.zeros_like(level), dtype, EMULATE)
        levels_hi = _mma_pair(tl.zeros_like(level), level, dtype, EMULATE)
    else:
        levels_lo, levels_hi = table, table  # unused
    # the 16 levels, each in every lane (the byte planes' tables; unused otherwise, and then not loaded). The
    # address carries lane // 32 (0, but not to ptxas): levels it cannot prove uniform stay in the lanes' registers,
    # where a permute reads them, not in uniform registers copied back before each permute (v12's first compile).
    levels = code_ptr + lane // 32
    l0, l1, l2, l3 = tl.load(levels), tl.load(levels + 1), tl.load(levels + 2), tl.load(levels + 3)
    l4, l5, l6, l7 = tl.load(levels + 4), tl.load(levels + 5), tl.load(levels + 6), tl.load(levels + 7)
    l8, l9, l10, l11 = tl.load(levels + 8), tl.load(levels + 9), tl.load(levels + 10), tl.load(levels + 11)
    l12, l13, l14, l15 = tl.load(levels + 12), tl.load(levels + 13), tl.load(levels + 14), tl.load(levels + 15)
    words_ptr = q_ptr.to(tl.pointer_type(tl.int32))
    xw_ptr = x_ptr.to(tl.pointer_type(tl.int32))
    words_per_row = K // 8
    x_words_per_row = stride_xm // 2
    zero = tl.zeros((32 * NUM_WARPS,), dtype=tl.float32)
    acc = _zero_blocks(zero, XB)  # each x block's accumulators: W rows g, g + 8 against its rows 2t, 2t + 1
    one = tl.full((32 * NUM_WARPS,), 1.0, dtype=tl.float32)
    # the planes of the unscaled levels (BLOCK_SCALE with permutes: the launch's one table; otherwise unused)
    q0, q1, q2, q3, q4, q5, q6, q7 = _byte_planes(one, l0, l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13,
                                                  l14, l15, dtype, EMULATE)
    if TILES == 2:  # the second tile: W rows 16 further on
        row_g2 = tl.minimum(out_g + 16, N - 1)
        row_h2 = tl.minimum(out_g + 24, N - 1)
        acc2 = _zero_blocks(zero, XB)
    if SCALES_AHEAD:  # it0 starts a group (the launch splits K in whole groups), whose first iteration loads
        # ``ahead`` (or, with PREFETCH, takes ``next``, loaded here). Each name starts as a tensor of its own: names
        # bound to one tensor before a loop were carried through it as one value (Triton 3.6, compiled; the
        # interpreter keeps them apart), which gave every group the next group's scales on the H100 (session 43).
        ahead_g, ahead_h = tl.zeros_like(zero), tl.zeros_like(zero)
        next_g, next_h = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h, it0 // IPG, t,
                                       blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED)
        if TILES == 2:
            ahead_g2, ahead_h2 = tl.zeros_like(zero), tl.zeros_like(zero)
            next_g2, next_h2 = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g2, row_h2,
                                             it0 // IPG, t, blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED)
    if PREFETCH:  # the first iteration's loads: the weights' (and the scales above) before x's wait
        col0 = it0 * BLOCK_K + t * (8 * WP)
        wg_next, wh_next, sg_next, sh_next = _mma_loads(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                                        row_g, row_h, col0, blocks_per_row, words_per_row, WL,
                                                        PARTS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
        if TILES == 2:
            wg2_next, wh2_next, sg2_next, sh2_next = _mma_loads(words_ptr, absmax_ptr, absmax2_ptr, code2_ptr,
                                                                offset_ptr, row_g2, row_h2, col0, blocks_per_row,
                                                                words_per_row, WL, PARTS, BLOCKSIZE,
                                                                BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
        wait_for_inputs(PDL)
        xs_next = _mma_x_blocks(xw_ptr, x_rows, col0, x_words_per_row, WL, PARTS, BLOCKSIZE)
    else:
        wait_for_inputs(PDL)
    # unrolled twice: the prefetched registers of one iteration are the next one's without a copy between them
    for it in tl.range(it0, it1, loop_unroll_factor=UNROLL):
        col = it * BLOCK_K + t * (8 * WP)  # the lane's first column this iteration
        if PREFETCH:
            # This iteration's loads were made one earlier; the next one's are made here, before the decode (the
            # last iteration reloads its own columns instead of reading past the range).
            words_g, words_h, scale_g, scale_h = wg_next, wh_next, sg_next, sh_next
            xs = xs_next
            if TILES == 2:
                words_g2, words_h2, scale_g2, scale_h2 = wg2_next, wh2_next, sg2_next, sh2_next
            col_load = tl.minimum(it + 1, it1 - 1) * BLOCK_K + t * (8 * WP)
            wg_next, wh_next, sg_next, sh_next = _mma_loads(
                words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h, col_load, blocks_per_row,
                words_per_row, WL, PARTS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
            xs_next = _mma_x_blocks(xw_ptr, x_rows, col_load, x_words_per_row, WL, PARTS, BLOCKSIZE)
            if TILES == 2:
                wg2_next, wh2_next, sg2_next, sh2_next = _mma_loads(
                    words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g2, row_h2, col_load,
                    blocks_per_row, words_per_row, WL, PARTS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
        else:
            words_g, words_h, scale_g, scale_h = _mma_loads(
                words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h, col, blocks_per_row,
                words_per_row, WL, PARTS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
            xs = _mma_x_blocks(xw_ptr, x_rows, col, x_words_per_row, WL, PARTS, BLOCKSIZE)
            if TILES == 2:
                words_g2, words_h2, scale_g2, scale_h2 = _mma_loads(
                    words_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g2, row_h2, col, blocks_per_row,
                    words_per_row, WL, PARTS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, SCALES_EACH, TILED)
        if SCALES_AHEAD:
            if it % IPG == 0:  # a group's first iteration: its scales (loaded a group earlier with PREFETCH)
                if PREFETCH:
                    ahead_g, ahead_h = next_g, next_h
                    next_group = tl.minimum(it // IPG + 1, (it1 - 1) // IPG)
                    next_g, next_h = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h,
                                                   next_group, t, blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED)
                    if TILES == 2:
                        ahead_g2, ahead_h2 = next_g2, next_h2
                        next_g2, next_h2 = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g2,
                                                         row_h2, next_group, t, blocks_per_row, BLOCKSIZE2,
                                                         DOUBLE_QUANT, TILED)
                else:
                    ahead_g, ahead_h = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g, row_h,
                                                     it // IPG, t, blocks_per_row, BLOCKSIZE2, DOUBLE_QUANT, TILED)
                    if TILES == 2:
                        ahead_g2, ahead_h2 = _group_scales(absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, row_g2,
                                                           row_h2, it // IPG, t, blocks_per_row, BLOCKSIZE2,
                                                           DOUBLE_QUANT, TILED)
            scale_g, scale_h = _iteration_scales(ahead_g, ahead_h, it, t, lane, warp, WL, PARTS, BLOCK_K, BLOCKSIZE,
                                                 EMULATE)
            if TILES == 2:
                scale_g2, scale_h2 = _iteration_scales(ahead_g2, ahead_h2, it, t, lane, warp, WL, PARTS, BLOCK_K,
                                                       BLOCKSIZE, EMULATE)
        acc = _mma_iteration(words_g, words_h, scale_g, scale_h, xs, table, levels_lo, levels_hi, acc, l0, l1, l2,
                             l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15, q0, q1, q2, q3, q4, q5, q6,
                             q7, WL, PARTS, dtype, NUM_WARPS, PRMT_ROWS, BLOCK_SCALE, EMULATE)
        if TILES == 2:
            acc2 = _mma_iteration(words_g2, words_h2, scale_g2, scale_h2, xs, table, levels_lo, levels_hi, acc2, l0,
                                  l1, l2, l3, l4, l5, l6, l7, l8, l9, l10, l11, l12, l13, l14, l15, q0, q1, q2, q3,
                                  q4, q5, q6, q7, WL, PARTS, dtype, NUM_WARPS, PRMT_ROWS, BLOCK_SCALE, EMULATE)
    if RANK > 0:
        if pid_k == 0:
            wait_for_lora(lora_counter_ptr, LORA_RANKS)
            for r0 in tl.static_range(0, RANK, 16):
                k = r0 + 2 * t  # the lane's ranks k, k + 1, k + 8, k + 9, as it holds k of W's columns
                b_pairs = _lora_b_pairs(b_ptr, row_g, row_h, k, stride_bn, RANK, dtype, EMULATE)
                if TILES == 2:
                    b_pairs2 = _lora_b_pairs(b_ptr, row_g2, row_h2, k, stride_bn, RANK, dtype, EMULATE)
                summed = ()
                summed2 = ()
                for j in tl.static_range(XB):
                    t0, t1 = _lora_t_pairs(t_ptr, x_rows[j], k, stride_tm, RANK, dtype, EMULATE)
                    c = acc[j]
                    summed = summed + (_mma(b_pairs[0], b_pairs[1], b_pairs[2], b_pairs[3], t0, t1, c[0], c[1], c[2],
                                            c[3], dtype, NUM_WARPS, EMULATE),)
                    if TILES == 2:
                        d = acc2[j]
                        summed2 = summed2 + (_mma(b_pairs2[0], b_pairs2[1], b_pairs2[2], b_pairs2[3], t0, t1, d[0],
                                                  d[1], d[2], d[3], dtype, NUM_WARPS, EMULATE),)
                acc = summed
                if TILES == 2:
                    acc2 = summed2
            lora_waiter_finished(lora_counter_ptr, output_tiles)
    part = partial_ptr + pid_k * M * N
    for j in tl.static_range(XB):
        n0 = pid_m * (8 * XB) + 8 * j + 2 * t  # the lane's x rows of block j: the MMA's columns 2t, 2t + 1
        c = acc[j]
        _mma_store(part, n0, out_g, M, N, c[0], c[1], c[2], c[3])
        if TILES == 2:
            d = acc2[j]
            _mma_store(part, n0, out_g + 16, M, N, d[0], d[1], d[2], d[3])
