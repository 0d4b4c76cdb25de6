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

Nothing assumes a warp width but the ``mma`` mode (below), which only NVIDIA GPUs run: Triton maps each tile onto
the device's warps (32 lanes on NVIDIA, 64-wide wavefronts on CDNA), and every shape is a Python-chosen block
size, not a lane count. The same source runs on ROCm's Triton; it has not run on an AMD GPU here (docs/decode.md
says what has).

One kernel, :func:`_nf4_matmul_kernel`, one launch per layer, adapted or not, or per group of up to three sibling
layers that read the same x (v10: q/k/v, gate/up; their weights side by side as segments, each tile inside one):

- with LoRA, its first ``r`` programs compute LoRA's down-projection ``t = scaling * x @ A^T`` ([M, r], float32),
  one rank each, and count themselves done (a release atomic);
- every other program computes ``BLOCK_M`` rows x ``BLOCK_N`` outputs over its share of K. Its epilogue adds the
  bias and LoRA's up-projection ``t @ B^T`` (after an acquire check that t is done: the LoRA programs have lower
  indices, so they were dispatched first and are short; the check rarely waits), so an adapted layer's output
  is written once. The last tile to finish sets the counters back. A :class:`TileConfig` picks the inner loop
  (``mode``) and the K split:

  - ``mma`` (v8 to v11, 1 to 8 rows of x a tile, NVIDIA only; ``nf4_mma.py``): each warp multiplies 16-row
    tiles of W with the rows of x on the tensor cores (``mma.sync.m16n8k16``, x's rows as its 8 columns, float32
    accumulators), decoding the weights straight into the MMA's operand registers: a lane reads int32 words of W
    rows g and g + 8 over its own consecutive columns, a code is one ``shfl.sync`` from the lane that holds that
    level, and two rounded weights are one ``cvt.rn``. Inline PTX (the lane and warp indices too), so
    :func:`mma_unfit` keeps it to NVIDIA GPUs of sm_80 on (Triton's interpreter emulates it); the lanes' results
    go to the split-K buffer and come back as a tile for the shared epilogue.
  - ``gemv`` (v7, one row of x a tile; ``nf4_gemv.py``): the packed bytes read as int32 words, a word a lane (two,
    halves of one block, at 64 words an iteration), so a weight costs a shift and mask folded into the code-table
    lookup's address, the scale multiply, the round to the compute dtype (one ``cvt.rn.bf16x2.f32`` on NVIDIA)
    and an FMA; x is read by each warp as [G, W, 8] and split in registers, R rows of W a lane share it.
  - ``fma``: each [BLOCK_N, BLOCK_K] weight tile is dequantized once and multiplied into all BLOCK_M rows by
    broadcast multiply-adds into a float32 [BLOCK_M, BLOCK_N, G, HB] accumulator, reduced across lanes once
    after the loop. At BLOCK_M 1 this was the GEMV to v6; for a few rows it avoids tl.dot's 16-row minimum. With
    ``prefetch`` the next iteration's bytes and scales are loaded before this one's are decoded (Triton
    software-pipelines only loops with a ``tl.dot``).
  - ``dot``: G whole quantization blocks dequantized as one [BLOCK_N, BLOCK_K] tile in natural column order
    (even and odd nibbles joined), x loaded [BLOCK_M, BLOCK_K], one ``tl.dot`` with K = BLOCK_K. With the code
    table in registers' reach (``shared_table``, a ``tl.gather``) and no ``prefetch``, Triton software-pipelines
    the loop over ``num_stages`` (cp.async copies of bytes, scales and x); otherwise the loop is kept out of its
    pipelining (which would route global code-table lookups through shared memory) and ``prefetch`` pipelines
    the HBM loads by hand.
  - ``dot_swap``: the same tiles as ``(W @ x^T)^T``: the weight is the MMA's A operand (from registers) and its M
    is BLOCK_N, so Hopper's wgmma (M 64 a warpgroup) applies at 16 rows, where ``x @ W^T`` compiles to mma.sync.
  - ``split_k`` > 1: the K loop (whole quantization blocks) is cut into ``split_k`` near-equal ranges, one program
    each. Each writes its float32 partial to a [split_k, M, N] buffer; the last of a tile's programs to arrive
    (an acq_rel atomic counter per output tile) sums the partials in index order 0, 1, ..., so the result does
    not depend on which program finished last, sets the counter back to 0 and runs the epilogue once. One launch,
    not a second reduce kernel: inside a CUDA graph a launch costs microseconds against a GEMV of 6-30 us. No
    float32 atomics on the output: their order, and so the bits, would vary run to run.

An adapted layer thus costs one launch (v5 and before: two, the down-projection a kernel of its own;
bitsandbytes + peft: the 4-bit matmul, two small GEMMs with their split-K reductions, and the scale and add).

Scratch for split-K, LoRA and CUDA graphs: the partials and t come from ``torch.empty`` per call (the caching
allocator, or the graph's pool while capturing); the counters are kept zeroed int32 buffers per device and purpose
(:func:`medqa_core.engine.kernels.common.arrival_counters`), since ``torch.zeros`` per call would add a memset
launch, so calls must not run on two streams of one device at once. A capture that needs a bigger buffer than any
warm-up made gets its own, zeroed by the graph.

The weight as the kernel reads it is ``nf4_weight.py``'s; which tile a launch takes, measured per device, is
``nf4_tiles.py``'s. Every version is compiled for sm_90a and gfx942 here (bench/inspect_nf4_kernel.py) before it
runs on a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from medqa_core.engine.kernels.common import (
    arrival_counters,
    dot_nt,
    interpreting,
    let_dependents_launch,
    lora_waiter_finished,
    programmatic_launch,
    round_to_dtype,
    wait_for_inputs,
    wait_for_lora,
)
from medqa_core.engine.kernels.nf4_decode import _nf4_element, _nf4_first_loads, _nf4_iteration
from medqa_core.engine.kernels.nf4_gemv import _nf4_gemv
from medqa_core.engine.kernels.nf4_mma import _nf4_mma
from medqa_core.engine.kernels.nf4_tiles import (
    LOOKUPS,
    TileConfig,
    has_mma,
    pdl_fits,
    portable_tile,
    tile_config,
)
from medqa_core.engine.kernels.nf4_weight import NF4Weight


@triton.jit
def _lora_down_rows(x_ptr, a_ptr, r, offs_m, m_mask, k_lo, k_hi, stride_xm, stride_am, scaling,
                    BLOCK_M: tl.constexpr, LORA_BLOCK_K: tl.constexpr):
    """LoRA's down-projection for rank ``r``, rows ``offs_m`` and columns [k_lo, k_hi): ``scaling * x @ A[r]^T``
    over those columns, [BLOCK_M] float32."""
    offs_k = tl.arange(0, LORA_BLOCK_K)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, LORA_BLOCK_K):
        k = k0 + offs_k
        k_mask = k < k_hi
        a = tl.load(a_ptr + r * stride_am + k, mask=k_mask, other=0.0).to(tl.float32)  # [LBK]
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)  # [BM, LBK]
        acc += tl.sum(x * a[None, :], axis=1)
    return acc * scaling


@triton.jit
def _epilogue(acc, offs_m, offs_n, m_mask, n_mask, bias_ptr, t_ptr, b_ptr, out_ptr, lora_counter_ptr, output_tiles,
              M, stride_tm, stride_bn, stride_om, HAS_BIAS: tl.constexpr, RANK: tl.constexpr,
              RANK_PAD: tl.constexpr, LORA_RANKS: tl.constexpr, DOT: tl.constexpr, EMULATE: tl.constexpr):
    """out = round(acc [BM, BN] + bias + t @ B^T): the one output write, after any split-K reduction."""
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RANK > 0:
        # LoRA's up-projection: + t @ B^T, t = scaling * x @ A^T from this launch's first programs (each rank's K
        # in LORA_SPLIT chunks, summed in chunk order by the rank's last; LORA_RANKS ranks in all), rounded to the
        # compute dtype as peft's autocast matmuls round it. Those programs were dispatched before this one (in
        # index order, as CUTLASS's stream-K fix-up also relies on) and are short, so t is almost always written by
        # the time a tile gets here: the wait is a check that rarely spins.
        offs_r = tl.arange(0, RANK_PAD)
        r_mask = offs_r < RANK
        # B waits on nothing: loaded before the wait, not after it, so its L2 round trip is not one more link in
        # the launch's last tile's chain (v15; v14 loaded each rank's column after t)
        b = tl.load(b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BN, R]
        wait_for_lora(lora_counter_ptr, LORA_RANKS)
        # .cg: from L2, where the LoRA programs wrote t, never a stale L1 line.
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0, cache_modifier=".cg")  # [BM, R]
        t = round_to_dtype(t, dtype, EMULATE)
        if DOT:
            acc = dot_nt(t, b.to(tl.float32) if EMULATE else b.to(dtype), acc, dtype, EMULATE)
        else:
            # A rank at a time: with the [BM, BN, R] products held at once, the MMA GEMV's tiles took 92-122
            # registers with LoRA against 71-80 without (compiled traces 20261207T0456Z, 20261207T0451Z). Each
            # rank's column is picked by a masked sum, a reduction across lanes: what the MMA tiles no longer do
            # (v16, in nf4_mma._nf4_mma); loading each rank's columns in the tile's layout instead hoisted every
            # load and took 255 registers (compiled for sm_90a).
            up = tl.zeros_like(acc)
            for r in tl.static_range(RANK):
                t_r = tl.sum(tl.where(offs_r[None, :] == r, t, 0.0), axis=1)  # [BM]
                b_r = tl.sum(tl.where(offs_r[None, :] == r, b.to(tl.float32), 0.0), axis=1)  # [BN]
                up += t_r[:, None] * b_r[None, :]
            acc += up
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], round_to_dtype(acc, dtype, EMULATE).to(dtype),
             mask=m_mask[:, None] & n_mask[None, :])
    if RANK > 0:
        lora_waiter_finished(lora_counter_ptr, output_tiles)


@triton.jit
def _nf4_matmul_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                       q_s1_ptr, absmax_s1_ptr, absmax2_s1_ptr, offset_s1_ptr, q_s2_ptr, absmax_s2_ptr, absmax2_s2_ptr,
                       offset_s2_ptr,
                       bias_ptr, a_ptr, t_ptr, b_ptr, out_ptr, partial_ptr, counter_ptr, lora_counter_ptr,
                       M, N0, N1, N2, K, stride_xm, stride_qn, stride_am, stride_tm, stride_bn, stride_om,
                       blocks_per_row, iterations, scaling0, scaling1, scaling2, lora_chunk,
                       SEGMENTS: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                       DOUBLE_QUANT: tl.constexpr,
                       ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
                       LORA_BLOCK_M: tl.constexpr, LORA_BLOCK_K: tl.constexpr, LORA_SPLIT: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr,
                       SWAP: tl.constexpr, PREFETCH: tl.constexpr, SHARED_TABLE: tl.constexpr,
                       SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, GEMV: tl.constexpr, MMA: tl.constexpr,
                       PRMT_ROWS: tl.constexpr, BLOCK_SCALE: tl.constexpr, SCALES_AHEAD: tl.constexpr,
                       ROUND_ASM: tl.constexpr, NUM_WARPS: tl.constexpr, PDL: tl.constexpr,
                       EMULATE: tl.constexpr, TILED: tl.constexpr = False):
    # SEGMENTS (1 to 3) weights of the same K side by side, one launch: their outputs are columns [0, N0),
    # [N0, N0 + N1), [N0 + N1, N0 + N1 + N2) of out (sibling layers that read the same x: q/k/v, gate/up). A tile
    # lies in one segment, whose pointers it takes; everything it writes (output, split-K partials and counters)
    # is that segment's own region, so inside a segment the code is that of one weight.
    # Programs 0 .. SEGMENTS * RANK * LORA_SPLIT - 1 (with LoRA): rank pid // LORA_SPLIT (segment rank // RANK's)
    # of LoRA's down-projection t = scaling * x @ A^T for every row, over chunk pid % LORA_SPLIT of K, into that
    # chunk's partial; the rank's last chunk sums them into chunk 0's and counts the rank done. The rest: program
    # SEGMENTS * RANK * LORA_SPLIT + (pid_k * m_tiles + pid_m) * n_tiles + pid_n computes outputs
    # [BLOCK_M, BLOCK_N] over iterations [it0, it1) of BLOCK_K columns, the pid_k-th of SPLIT_K near-equal ranges
    # of whole quantization blocks; t @ B^T is added by its epilogue (by K split 0's MMAs on the MMA tiles). So an
    # adapted layer (or a group of siblings) is one launch.
    pid = tl.program_id(0)
    n_tiles0 = tl.cdiv(N0, BLOCK_N)
    n_tiles1 = tl.cdiv(N1, BLOCK_N)
    n_tiles2 = tl.cdiv(N2, BLOCK_N)
    n_tiles = n_tiles0 + n_tiles1 + n_tiles2  # N1, N2 are 0 below 2 and 3 segments
    m_tiles = tl.cdiv(M, BLOCK_M)
    tile = pid
    if RANK > 0:  # (without LoRA the branch is not compiled at all)
        tile = pid - SEGMENTS * RANK * LORA_SPLIT
        if tile < 0:
            wait_for_inputs(PDL)  # x
            r = pid // LORA_SPLIT
            chunk = pid % LORA_SPLIT
            k_lo = chunk * lora_chunk
            k_hi = tl.minimum(K, k_lo + lora_chunk)
            scaling = scaling0
            if SEGMENTS > 1:
                if r >= RANK:
                    scaling = scaling1
                if SEGMENTS > 2:
                    if r >= 2 * RANK:
                        scaling = scaling2
            for m0 in range(0, M, LORA_BLOCK_M):
                offs_lm = m0 + tl.arange(0, LORA_BLOCK_M)
                lm_mask = offs_lm < M
                t_r = _lora_down_rows(x_ptr, a_ptr, r, offs_lm, lm_mask, k_lo, k_hi, stride_xm, stride_am, scaling,
                                      LORA_BLOCK_M, LORA_BLOCK_K)
                tl.store(t_ptr + (chunk * M + offs_lm) * stride_tm + r, t_r, mask=lm_mask)
            tl.debug_barrier()  # every lane's t stored before the release below
            if LORA_SPLIT > 1:
                # The rank's last chunk to arrive sums its LORA_SPLIT partials in chunk order into chunk 0's, so
                # a waiter loads t once, not once a chunk (v16: the chunks' loads held registers in every tile).
                arrived = tl.atomic_add(lora_counter_ptr + 2 + r, 1, sem="acq_rel", scope="gpu")
                if arrived == LORA_SPLIT - 1:
                    for m0 in range(0, M, LORA_BLOCK_M):
                        offs_lm = m0 + tl.arange(0, LORA_BLOCK_M)
                        lm_mask = offs_lm < M
                        total = tl.zeros((LORA_BLOCK_M,), dtype=tl.float32)
                        for c in tl.static_range(LORA_SPLIT):
                            # .cg: from L2, where the other programs' partials are, never a stale L1 line.
                            total += tl.load(t_ptr + (c * M + offs_lm) * stride_tm + r, mask=lm_mask, other=0.0,
                                             cache_modifier=".cg")
                        tl.store(t_ptr + offs_lm * stride_tm + r, total, mask=lm_mask)
                    tl.atomic_xchg(lora_counter_ptr + 2 + r, 0, sem="relaxed", scope="gpu")
                    tl.debug_barrier()  # every lane's t stored before the release below
                    tl.atomic_add(lora_counter_ptr, 1, sem="release", scope="gpu")
            else:
                tl.atomic_add(lora_counter_ptr, 1, sem="release", scope="gpu")
    if tile >= 0:
        pid_n = tile % n_tiles
        pid_m = (tile // n_tiles) % m_tiles
        pid_k = tile // (n_tiles * m_tiles)
        n_seg = N0
        if SEGMENTS > 1:  # the tile's segment: its weight, and its part of every output buffer
            n_base = 0
            tile_base = 0
            seg = 0
            if pid_n >= n_tiles0:
                q_ptr, absmax_ptr, absmax2_ptr, offset_ptr = q_s1_ptr, absmax_s1_ptr, absmax2_s1_ptr, offset_s1_ptr
                n_seg, n_base, tile_base, seg = N1, N0, n_tiles0, 1
            if SEGMENTS > 2:
                if pid_n >= n_tiles0 + n_tiles1:
                    q_ptr, absmax_ptr, absmax2_ptr, offset_ptr = q_s2_ptr, absmax_s2_ptr, absmax2_s2_ptr, offset_s2_ptr
                    n_seg, n_base, tile_base, seg = N2, N0 + N1, n_tiles0 + n_tiles1, 2
            pid_n -= tile_base
            out_ptr += n_base
            bias_ptr += n_base
            b_ptr += n_base * stride_bn
            t_ptr += seg * RANK
            partial_ptr += SPLIT_K * M * n_base
            counter_ptr += m_tiles * tile_base
        _nf4_tile(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, t_ptr, b_ptr,
                  out_ptr, partial_ptr, counter_ptr, lora_counter_ptr, pid_n, pid_m, pid_k,
                  tl.cdiv(n_seg, BLOCK_N), m_tiles, n_tiles * m_tiles, M, n_seg, K, stride_xm, stride_qn, stride_tm,
                  stride_bn, stride_om, blocks_per_row, iterations, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, ALIGNED,
                  HAS_BIAS, RANK, RANK_PAD, SEGMENTS * RANK, BLOCK_M, BLOCK_N, BLOCK_K, DOT,
                  SWAP, PREFETCH, SHARED_TABLE, SPLIT_K, NUM_STAGES, GEMV, MMA, PRMT_ROWS, BLOCK_SCALE, SCALES_AHEAD,
                  ROUND_ASM, NUM_WARPS, PDL, EMULATE, TILED)


@triton.jit
def _nf4_tile(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, bias_ptr, t_ptr, b_ptr,
              out_ptr, partial_ptr, counter_ptr, lora_counter_ptr, pid_n, pid_m, pid_k, n_tiles, m_tiles, output_tiles,
              M, N, K, stride_xm, stride_qn, stride_tm, stride_bn, stride_om, blocks_per_row, iterations,
              BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
              ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, RANK: tl.constexpr, RANK_PAD: tl.constexpr,
              LORA_RANKS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, DOT: tl.constexpr, SWAP: tl.constexpr, PREFETCH: tl.constexpr,
              SHARED_TABLE: tl.constexpr, SPLIT_K: tl.constexpr, NUM_STAGES: tl.constexpr, GEMV: tl.constexpr,
              MMA: tl.constexpr, PRMT_ROWS: tl.constexpr, BLOCK_SCALE: tl.constexpr, SCALES_AHEAD: tl.constexpr,
              ROUND_ASM: tl.constexpr,
              NUM_WARPS: tl.constexpr,
              PDL: tl.constexpr,
              EMULATE: tl.constexpr, TILED: tl.constexpr = False):
    """One output tile of :func:`_nf4_matmul_kernel`: its K range, then the epilogue (after split-K's reduction).
    ``n_tiles`` and ``N`` are its segment's; ``output_tiles`` counts the launch's. PDL: the MMA tiles load their
    first weights before they wait for x (:func:`wait_for_inputs`), the others wait first."""
    dtype = out_ptr.dtype.element_ty
    # Triton software-pipelines the K loop over NUM_STAGES (cp.async copies of the packed bytes, scales and x,
    # several iterations in flight) where the code table is shared (its lookups are gathers, not loads it would
    # route through shared memory), nothing is prefetched by hand, and the tile asks for 3 stages or more; every
    # tile measured before v6 had 1 or 2 and keeps its unpipelined loop.
    LOOP_STAGES: tl.constexpr = NUM_STAGES if SHARED_TABLE and not PREFETCH and NUM_STAGES >= 3 else 1
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    n_mask = offs_n < N
    if SCALES_AHEAD:  # ranges of whole groups of 4 quantization blocks (nf4_mma._group_scales)
        IPG: tl.constexpr = 4 * BLOCKSIZE // BLOCK_K
        groups = tl.cdiv(iterations, IPG)
        it0 = pid_k * groups // SPLIT_K * IPG
        it1 = tl.minimum((pid_k + 1) * groups // SPLIT_K * IPG, iterations)
    else:
        it0 = pid_k * iterations // SPLIT_K
        it1 = (pid_k + 1) * iterations // SPLIT_K
    if not MMA:
        wait_for_inputs(PDL)  # (the MMA tiles wait after their first weight loads)
    if MMA:
        # Written to partial[pid_k]; read back as a [BLOCK_M, BLOCK_N] tile below (a lane's results are not where
        # Triton's tile layout has them).
        _nf4_mma(x_ptr, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, partial_ptr, t_ptr, b_ptr,
                 lora_counter_ptr, pid_n, pid_m, pid_k, M, N, K, it0, it1, blocks_per_row, stride_xm, stride_tm,
                 stride_bn, output_tiles, dtype, BLOCK_K, BLOCK_N // (16 * NUM_WARPS), NUM_WARPS, BLOCKSIZE,
                 BLOCKSIZE2, DOUBLE_QUANT, PREFETCH, PRMT_ROWS, BLOCK_SCALE, SCALES_AHEAD, RANK, LORA_RANKS,
                 PDL, BLOCK_M // 8, EMULATE, TILED)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # unused: the tile comes from partial
    elif ALIGNED:
        # Rows of whole quantization blocks: G blocks an iteration (BLOCK_K columns), one scale per row and block.
        HB: tl.constexpr = BLOCKSIZE // 2
        G: tl.constexpr = BLOCK_K // BLOCKSIZE
        offs_g = tl.arange(0, G)
        offs_h = tl.arange(0, HB)
        table = tl.load(code_ptr + tl.arange(0, 16))  # the code table, once (read only with SHARED_TABLE)
        if GEMV:
            acc = tl.reshape(_nf4_gemv(x_ptr + pid_m * stride_xm, q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr,
                                       offset_ptr, pid_n, N, it0, it1, blocks_per_row, stride_qn, dtype, BLOCK_N, G,
                                       NUM_WARPS, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT, PREFETCH, ROUND_ASM, EMULATE),
                             (1, BLOCK_N))
        elif DOT:
            # The G blocks as one [BN, BLOCK_K] tile in natural column order (even and odd columns interleaved),
            # so each tl.dot has K = BLOCK_K.
            # SWAP: out^T = W @ x^T, the weight tile as the MMA's A operand (from registers): its M is BLOCK_N,
            # so Hopper's wgmma (M 64 a warpgroup) applies at 16 rows, where x @ W^T falls back to mma.sync.
            offs_k = tl.arange(0, BLOCK_K)
            x_row = x_ptr + offs_m[:, None] * stride_xm
            if SWAP:
                acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            q_next, scale_next = _nf4_first_loads(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                                  n_mask, it0, blocks_per_row, stride_qn, G, HB, BLOCKSIZE2,
                                                  DOUBLE_QUANT, PREFETCH)
            # Without the shared table the loop stays out of Triton's pipelining (LOOP_STAGES 1): with a tl.dot in
            # it, the pipeliner turns every load into cp.async through shared memory, the code-table lookups too
            # (one 4-byte gather a weight; seen in the sm_90a TTGIR), and the v3 dot tiles ran 10x slower than
            # bitsandbytes on an H100. PREFETCH pipelines the HBM loads by hand instead, as in the fma path.
            for it in tl.range(it0, it1, num_stages=LOOP_STAGES):
                b0 = it * G
                w_even, w_odd, q_next, scale_next = _nf4_iteration(
                    q_ptr, absmax_ptr, code_ptr, table, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, it, it1,
                    q_next, scale_next, blocks_per_row, stride_qn, dtype, G, HB, BLOCKSIZE2, DOUBLE_QUANT, PREFETCH,
                    SHARED_TABLE, EMULATE)
                w = tl.reshape(tl.join(w_even, w_odd), (BLOCK_N, BLOCK_K))  # [BN, G, HB, 2] -> [BN, BK]
                x = tl.load(x_row + (b0 * BLOCKSIZE + offs_k)[None, :], mask=m_mask[:, None], other=0.0)  # [BM, BK]
                if SWAP:
                    acc_t = dot_nt(w, x, acc_t, dtype, EMULATE)
                else:
                    acc = dot_nt(x, w, acc, dtype, EMULATE)
            if SWAP:
                acc = tl.trans(acc_t)
        else:
            # Broadcast multiply-adds: each weight tile dequantized once for BLOCK_M rows (BLOCK_M 1: a GEMV).
            # Products accumulate elementwise (the GEMV: summed over each block's bytes, within a thread); the
            # reduction across lanes comes after the loop.
            x_row = x_ptr + offs_m[:, None, None] * stride_xm
            col = offs_g[None, :, None] * BLOCKSIZE + 2 * offs_h[None, None, :]  # [1, G, HB]: even columns
            offs_2 = tl.arange(0, 2)
            if BLOCK_M == 1:  # the GEMV: one float32 sum per weight byte's position, reduced after the loop
                part = tl.zeros((BLOCK_N, G, HB), dtype=tl.float32)
            else:
                part = tl.zeros((BLOCK_M, BLOCK_N, G, HB), dtype=tl.float32)
            q_next, scale_next = _nf4_first_loads(q_ptr, absmax_ptr, absmax2_ptr, code2_ptr, offset_ptr, offs_n,
                                                  n_mask, it0, blocks_per_row, stride_qn, G, HB, BLOCKSIZE2,
                                                  DOUBLE_QUANT, PREFETCH)
            for it in tl.range(it0, it1, num_stages=LOOP_STAGES):
                b0 = it * G
                w_even, w_odd, q_next, scale_next = _nf4_iteration(
                    q_ptr, absmax_ptr, code_ptr, table, absmax2_ptr, code2_ptr, offset_ptr, offs_n, n_mask, it, it1,
                    q_next, scale_next, blocks_per_row, stride_qn, dtype, G, HB, BLOCKSIZE2, DOUBLE_QUANT, PREFETCH,
                    SHARED_TABLE, EMULATE)
                if BLOCK_M == 1:
                    # x's columns as (even, odd) pairs, one contiguous load split in two, and the products summed
                    # over each block's bytes at once, into [BN, G]: so the dequantized weights stay in the
                    # registers their bytes were loaded into and x (BN times smaller) is what gets moved between
                    # layouts. Two strided x loads and a [BN, G, HB] accumulator moved every weight through shared
                    # memory each iteration instead (sm_90a TTGIR and PTX, docs/decode.md).
                    x_pair = tl.load(x_ptr + pid_m * stride_xm + b0 * BLOCKSIZE + offs_g[:, None, None] * BLOCKSIZE
                                     + 2 * offs_h[None, :, None] + offs_2[None, None, :])  # [G, HB, 2]; pid_m < M
                    x_even, x_odd = tl.split(x_pair)  # [G, HB] each
                    # Two chained multiply-adds a byte (one FMA a weight), not a product, an FMA and an add.
                    part = part + w_even.to(tl.float32) * x_even.to(tl.float32)[None, :, :]
                    part = part + w_odd.to(tl.float32) * x_odd.to(tl.float32)[None, :, :]
                else:
                    x_even = tl.load(x_row + b0 * BLOCKSIZE + col, mask=m_mask[:, None, None], other=0.0)  # [BM, G, HB]
                    x_odd = tl.load(x_row + b0 * BLOCKSIZE + col + 1, mask=m_mask[:, None, None], other=0.0)
                    part += (x_even.to(tl.float32)[:, None, :, :] * w_even.to(tl.float32)[None, :, :, :]
                             + x_odd.to(tl.float32)[:, None, :, :] * w_odd.to(tl.float32)[None, :, :, :])
            if BLOCK_M == 1:
                acc = tl.sum(tl.sum(part, axis=2), axis=1)[None, :]
            else:
                acc = tl.sum(tl.sum(part, axis=3), axis=2)
    else:
        # Any shape: each weight from its flat index, BLOCK_K columns an iteration.
        HALF: tl.constexpr = BLOCK_K // 2
        offs_j = tl.arange(0, HALF)
        x_row = x_ptr + offs_m[:, None] * stride_xm
        if DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        else:
            part2 = tl.zeros((BLOCK_M, BLOCK_N, HALF), dtype=tl.float32)
        for it in range(it0, it1):
            k_even = it * BLOCK_K + 2 * offs_j
            w_even = round_to_dtype(_nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                                 offs_n, k_even, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT), dtype,
                                    EMULATE)
            w_odd = round_to_dtype(_nf4_element(q_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr,
                                                offs_n, k_even + 1, N, K, BLOCKSIZE, BLOCKSIZE2, DOUBLE_QUANT), dtype,
                                   EMULATE)
            x_even = tl.load(x_row + k_even[None, :], mask=m_mask[:, None] & (k_even[None, :] < K), other=0.0)
            x_odd = tl.load(x_row + k_even[None, :] + 1, mask=m_mask[:, None] & (k_even[None, :] + 1 < K),
                            other=0.0)
            if DOT:
                acc = dot_nt(x_even, w_even, acc, dtype, EMULATE)
                acc = dot_nt(x_odd, w_odd, acc, dtype, EMULATE)
            else:
                part2 += (x_even.to(tl.float32)[:, None, :] * w_even.to(tl.float32)[None, :, :]
                          + x_odd.to(tl.float32)[:, None, :] * w_odd.to(tl.float32)[None, :, :])
        if not DOT:
            acc = tl.sum(part2, axis=2)
    let_dependents_launch(PDL)
    EPILOGUE_RANK: tl.constexpr = 0 if MMA else RANK  # the MMA tiles added LoRA's up-projection already
    mn_mask = m_mask[:, None] & n_mask[None, :]
    tile = offs_m[:, None] * N + offs_n[None, :]  # [BM, BN]
    if SPLIT_K == 1:
        if MMA:
            tl.debug_barrier()  # every lane's results stored before any lane reads the tile
            acc = tl.load(partial_ptr + tile, mask=mn_mask, other=0.0, cache_modifier=".cg")
        _epilogue(acc, offs_m, offs_n, m_mask, n_mask, bias_ptr, t_ptr, b_ptr, out_ptr, lora_counter_ptr,
                  output_tiles, M, stride_tm, stride_bn, stride_om, HAS_BIAS, EPILOGUE_RANK, RANK_PAD, LORA_RANKS, DOT,
                  EMULATE)
    else:
        # Deterministic split-K: each program writes its float32 partial to partial[pid_k, M, N]; the last of the
        # tile's SPLIT_K programs to arrive (an acq_rel counter) sums the partials in index order 0..SPLIT_K-1,
        # whichever program that is, resets the counter for the next call, and writes the output once.
        if not MMA:  # (the MMA path stored its partial already)
            tl.store(partial_ptr + pid_k * M * N + tile, acc, mask=mn_mask)
        tl.debug_barrier()  # every lane's partial stored before the release below
        counter = counter_ptr + pid_m * n_tiles + pid_n
        arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                # .cg: from L2, where the other programs' partials are, never a stale L1 line.
                total += tl.load(partial_ptr + s * M * N + tile, mask=mn_mask, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")
            _epilogue(total, offs_m, offs_n, m_mask, n_mask, bias_ptr, t_ptr, b_ptr, out_ptr, lora_counter_ptr,
                      output_tiles, M, stride_tm, stride_bn, stride_om, HAS_BIAS, EPILOGUE_RANK, RANK_PAD, LORA_RANKS,
                      DOT, EMULATE)


def _blocks_per_iteration(weight: NF4Weight, block_k: int) -> int:
    """BLOCK_K of the aligned path: the most whole blocks, up to ``block_k`` columns, that divide a row's."""
    per_row = weight.in_features // weight.blocksize
    g = max(1, block_k // weight.blocksize)
    while per_row % g:
        g //= 2
    return g * weight.blocksize


# LoRA's down-projection x @ A^T is split along K into chunks of at least this many columns (up to 16 chunks), one
# program each per rank, instead of a rank's whole K in one program (a chain of dependent loads the output tiles'
# epilogues wait on). 256 until v15; 1024 since v16: the LoRA programs come first in the grid and take whole
# slots, so 768 of them for q+k+v (256 columns) held back its 384 tiles (Nsight Compute, session 46: 1.45 waves
# against 0.48 without LoRA), and 1024 columns is one load a lane at one row (LORA_BLOCK_M 1). But no more than
# LORA_LOADS loads a program: a LoRA program's loads wait one after the other, and 1-warp tiles at 8 rows (64
# columns a load) took 16 for 1024 columns, and ran 3.3-4.6 us slower with LoRA than at 256 (session 46's A/B).
LORA_MIN_CHUNK = 1024
LORA_LOADS = 4
LORA_MAX_SPLIT = 16


def _lora_split(in_features: int, lora_block_k: int) -> tuple[int, int]:
    """(chunks, columns a chunk) of LoRA's down-projection over ``in_features``, whose programs load
    ``lora_block_k`` columns at a time."""
    least = min(LORA_MIN_CHUNK, LORA_LOADS * lora_block_k)
    split = max(1, min(LORA_MAX_SPLIT, in_features // least))
    chunk = triton.cdiv(in_features, split)
    return triton.cdiv(in_features, chunk), chunk


def _lora_block_k(lora_block_m: int, num_warps: int) -> int:
    """Columns an iteration of the LoRA programs' [lora_block_m, K] loads of x (and [K] of A): about 16 values a
    lane in all. The LoRA programs share the kernel's register count: at 64 a lane (v6-v13), with the epilogue's
    products held at once, the MMA GEMV's tiles took 92-122 registers with LoRA against 71-80 without; at 16 they
    take no more than the tile does. At one row A's share counts as much as x's (1024 columns on 2 warps, 16 of
    each a lane: 116 registers against 90, compiled for sm_90a)."""
    return max(16, min(1024, 16 * 32 * num_warps // max(lora_block_m, 2)))


def _lora_constexprs(rank: int, in_features: int, rows: int, block_m: int, num_warps: int) -> dict[str, int]:
    """The kernel's LoRA constexprs for a launch (also what bench/inspect_nf4_kernel.py compiles): each sibling's
    rank, its power-of-two pad, the LoRA programs' rows and columns a load and the chunks of K they split it in.
    The LoRA programs take the launch's rows, not the tile's: an MMA tile has 8 rows at one (v16; before, 7 of
    8 rows of every LoRA load were masked off and a chunk took several loads)."""
    lora_block_m = min(block_m, triton.next_power_of_2(max(rows, 1)))
    lora_block_k = _lora_block_k(lora_block_m, num_warps)
    lora_split, lora_chunk = _lora_split(in_features, lora_block_k)
    return dict(RANK=rank, RANK_PAD=max(16, triton.next_power_of_2(max(rank, 1))), LORA_BLOCK_M=lora_block_m,
                LORA_BLOCK_K=min(lora_block_k, triton.next_power_of_2(lora_chunk)), LORA_SPLIT=lora_split)



def _round_asm(x: torch.Tensor) -> bool:
    """The GEMV rounds weights to bf16 with one PTX instruction (NVIDIA, bf16 compute); elsewhere with Triton's
    cast, the same round to nearest even."""
    return x.device.type == "cuda" and torch.version.hip is None and x.dtype == torch.bfloat16 and not interpreting()


def mma_unfit(device: torch.device, dtype: torch.dtype, weight: NF4Weight, block_k: int,
              block_scale: bool = False) -> str | None:
    """Why the ``mma`` mode cannot compute ``x @ W^T`` at ``block_k`` columns an iteration, or None where it can:
    it needs an NVIDIA GPU with bf16 MMAs (sm_80 on; or Triton's interpreter, which emulates them), a bf16 or fp16
    compute dtype, rows of whole quantization blocks read as int32 words, K a multiple of ``block_k``, and a lane's
    ``block_k / 4`` columns inside one quantization block (``block_scale``: up to two blocks an iteration)."""
    if not interpreting() and not has_mma(device):
        where = "ROCm" if torch.version.hip else device.type
        return f"it needs an NVIDIA GPU of compute capability 8.0 or later (mma.sync, shfl.sync), not {where}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"its MMAs take bf16 or fp16, not {dtype}"
    if not weight.aligned:
        return "the packed weight's rows are not whole quantization blocks of int32 words"
    if weight.in_features % block_k or weight.blocksize % (block_k // 4):
        return (f"K {weight.in_features} is not a multiple of block_k {block_k}, or blocksize {weight.blocksize} "
                f"not of a lane's {block_k // 4} columns")
    if block_scale and block_k > 2 * weight.blocksize:
        return (f"block_scale scales one or two blocks an iteration, not block_k {block_k} of blocksize "
                f"{weight.blocksize}")
    return None


def choose_tile(rows: int, weight: NF4Weight, dtype: torch.dtype, device: torch.device,
                config: TileConfig | None = None, out_features: int | None = None, lora: bool = False) -> TileConfig:
    """The tile :func:`nf4_matmul` runs for ``rows`` rows of x in ``dtype``: ``config``, or :func:`tile_config`'s
    for ``out_features`` rows of W (siblings' together; default: the weight's), with LoRA or not; an ``mma`` tile
    the call cannot run becomes the default of the other modes.

    Raises:
        ValueError: ``config`` asks for the ``mma`` mode where it cannot run.
    """
    n, k = out_features or weight.out_features, weight.in_features
    cfg = config or tile_config(rows, n, k, device, lora)
    if cfg.kernel_mode == "mma":
        why_not = mma_unfit(device, dtype, weight, cfg.block_k, cfg.block_scale)
        if why_not and config is not None:
            raise ValueError(f"nf4_matmul: mode 'mma' cannot run here: {why_not}")
        if why_not:
            return portable_tile(rows, n, k, device)
    return cfg


MAX_SEGMENTS = 3  # weights one launch computes side by side (q/k/v)


def siblings_unfit(weights: Sequence[NF4Weight]) -> str | None:
    """Why ``weights`` cannot run as the segments of one :func:`nf4_matmul` launch, or None where they can: up to
    three, of the same K, block sizes, double quantization and code tables (the kernel reads one of each)."""
    first = weights[0]
    if not 1 <= len(weights) <= MAX_SEGMENTS:
        return f"{len(weights)} weights: one launch takes 1 to {MAX_SEGMENTS}"
    for w in weights[1:]:
        if (w.in_features, w.blocksize, w.double_quant, w.blocksize2) != (
                first.in_features, first.blocksize, first.double_quant, first.blocksize2):
            return "their K, block sizes or double quantization differ"
        if not torch.equal(w.code, first.code) or (w.double_quant and not torch.equal(w.code2, first.code2)):
            return "their code tables differ"
        if w.aligned != first.aligned:
            return "some rows are whole quantization blocks of int32 words, some not"
    return None


def nf4_matmul(x: torch.Tensor, weight: NF4Weight | Sequence[NF4Weight], bias: torch.Tensor | None = None,
               lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
               scaling: float | Sequence[float] = 1.0, config: TileConfig | None = None) -> torch.Tensor:
    """``x @ W^T + bias + scaling * (x @ A^T) @ B^T`` for x [..., K], in x's dtype, W dequantized in registers.

    Several weights (sibling layers that read the same x, up to three: q/k/v, gate/up) run as one launch whose
    output is theirs side by side: W is their rows stacked, each with its own LoRA rank block and scaling. Each
    output tile is computed as a launch of its weight alone with the same tile would compute it.

    Args:
        x: activations [..., K] (bf16, fp16 or fp32).
        weight: the packed NF4 weight [N, K], or sibling weights [N_s, K] (:func:`siblings_unfit` says which can).
        bias: [N] (N the weights' rows together) or None.
        lora_a, lora_b: LoRA's A [r, K] and B [N, r], or None for the base layer alone. Siblings: their A's stacked
            [S * r, K] (one rank r each) and B's stacked [N, r].
        scaling: LoRA's alpha / r; siblings: one each.
        config: a tile shape (tests, the sweep); None picks one for the shape (siblings: their rows together).

    Returns:
        [..., N] in x's dtype.

    Raises:
        ValueError: siblings one launch cannot take, or a scaling for each that is missing.
    """
    weights = [weight] if isinstance(weight, NF4Weight) else list(weight)
    segments = len(weights)
    why_not = siblings_unfit(weights)
    if why_not:
        raise ValueError(f"nf4_matmul: these weights cannot share a launch: {why_not}")
    scalings = [float(scaling)] * segments if isinstance(scaling, (int, float)) else [float(s) for s in scaling]
    if len(scalings) != segments:
        raise ValueError(f"nf4_matmul: {segments} weights need {segments} LoRA scalings, got {len(scalings)}")
    first = weights[0]
    seg_rows = [w.out_features for w in weights]
    n, k = sum(seg_rows), first.in_features
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out.reshape(*lead, n)
    rank = 0 if lora_a is None else int(lora_a.shape[0]) // segments  # each sibling's
    cfg = choose_tile(rows, first, x.dtype, x.device, config, out_features=n, lora=rank > 0)
    mma = cfg.kernel_mode == "mma"
    if mma and (x2.stride(0) != k or x2.data_ptr() % 4):
        x2 = x2.clone()  # its rows are read as int32 words of two values
    dot = cfg.kernel_mode in ("dot", "dot_swap")
    aligned = first.aligned
    if mma:
        block_k = cfg.block_k
        iterations = k // block_k
    elif aligned:
        block_k = _blocks_per_iteration(first, cfg.block_k)
        iterations = (k // first.blocksize) // (block_k // first.blocksize)
    else:
        block_k = max(32 if dot else 2, cfg.block_k)  # the dot's halves need K >= 16
        iterations = triton.cdiv(k, block_k)
    # scales_ahead splits K in whole groups of 4 blocks: no more splits than groups
    groups = triton.cdiv(iterations, 4 * first.blocksize // block_k) if mma and cfg.scales_ahead else iterations
    split = max(1, min(cfg.split_k, groups))
    # t: LoRA's down-projection, [lora_split, rows, segments * rank] partials over K's chunks, written by the
    # launch's first segments * rank * lora_split programs, each rank's summed in chunk order into chunk 0's
    lora = _lora_constexprs(rank, k, rows, cfg.block_m, cfg.num_warps)
    lora_split = lora["LORA_SPLIT"]
    lora_chunk = triton.cdiv(k, lora_split)  # _lora_split's
    t = torch.empty(lora_split, rows, segments * rank, device=x.device, dtype=torch.float32) if rank else out
    a = lora_a if rank else out  # else unused
    b = lora_b if rank else out
    dq = first.double_quant
    n_tiles = sum(triton.cdiv(rows_s, cfg.block_n) for rows_s in seg_rows)
    m_tiles = triton.cdiv(rows, cfg.block_m)
    # [split, M, N]: split-K's float32 partials, a segment's [split, M, N_s] after another's; the MMA path writes
    # its results there even unsplit
    partial = torch.empty(split, rows, n, device=x.device, dtype=torch.float32) if split > 1 or mma else out
    counters = arrival_counters(x.device, "split_k", n_tiles * m_tiles) if split > 1 else out  # else unused
    # the LoRA programs' counters: ranks done, waiters finished, then each rank's arrived chunks
    lora_counters = arrival_counters(x.device, "lora", 2 + segments * rank) if rank else out

    # v22: the tiled copies where every weight has one in this tile's order; bitsandbytes' own otherwise
    tiled = all(w.reads_tiled(cfg) for w in weights)

    def quant(w: NF4Weight) -> list[torch.Tensor]:  # what the kernel reads of one weight
        packed, absmax = (w.tiled.packed, w.tiled.absmax) if tiled else (w.packed, w.absmax)
        return [packed, absmax, w.absmax2 if dq else w.code, w.offset if dq else w.code]

    segment_args = [t_ for w in (weights + [first] * (MAX_SEGMENTS - segments))[1:] for t_ in quant(w)]
    pdl = programmatic_launch(x.device) and pdl_fits(cfg)
    first_packed, first_absmax = quant(first)[:2]
    _nf4_matmul_kernel[(segments * rank * lora_split + n_tiles * m_tiles * split,)](
        x2, first_packed, first_absmax, first.code, first.absmax2 if dq else first.code,
        first.code2 if dq else first.code, first.offset if dq else first.code, *segment_args,
        bias if bias is not None else out, a, t, b, out, partial, counters, lora_counters,
        rows, *(seg_rows + [0] * (MAX_SEGMENTS - segments)), k, x2.stride(0), k // 2, a.stride(0),
        segments * rank, b.stride(0), out.stride(0), k // first.blocksize, iterations,
        *(scalings + [1.0] * (MAX_SEGMENTS - segments)), lora_chunk,
        SEGMENTS=segments, BLOCKSIZE=first.blocksize, BLOCKSIZE2=first.blocksize2, DOUBLE_QUANT=dq, ALIGNED=aligned,
        HAS_BIAS=bias is not None, **lora,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, DOT=dot, SWAP=cfg.kernel_mode == "dot_swap",
        PREFETCH=cfg.prefetch, SHARED_TABLE=cfg.shared_table, SPLIT_K=split, NUM_STAGES=cfg.num_stages,
        GEMV=cfg.kernel_mode == "gemv", MMA=mma, PRMT_ROWS=LOOKUPS.index(cfg.lookup), BLOCK_SCALE=cfg.block_scale,
        SCALES_AHEAD=mma and cfg.scales_ahead,
        ROUND_ASM=_round_asm(x),
        NUM_WARPS=cfg.num_warps,
        PDL=pdl,
        EMULATE=interpreting(), TILED=tiled,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}),
        **({"maxnreg": cfg.max_registers} if cfg.max_registers and not torch.version.hip else {}),
    )
    return out.reshape(*lead, n)

