"""Kernel time against bytes moved: our NF4 (+LoRA) kernel, bitsandbytes' 4-bit matmul and bf16, per layer shape.

One layer's matmul at a time, over the shapes of a Mistral-7B decoder layer, for each row count: the time of one
call (Triton's ``do_bench_cudagraph``: replayed from a CUDA/HIP graph, as decode runs it; median; over distinct
copies of the weight that together exceed three times the L2, recorded as ``weight_copies``: files before
2026-12-06 timed one copy, so a layer whose 4-bit weight fits in L2 was read partly from there), the bytes it
must move (packed weight, absmax codes and scales, LoRA factors, input and output, each once), their rate, and
that rate against the copy bandwidth measured in the same run. Also the largest error of each arm against
``x.float() @ W.float().T`` of bitsandbytes' own dequantized weight, in units in the last place of bf16.

    python bench/profile_nf4_kernel.py --out results/traces/NAME.json [--rows 1,8,32,64] [--sweep]
        [--tiles-out medqa_core/engine/kernels/nf4_tiles.json] [--layers gate_proj/up_proj,...]
    ncu --clock-control none -k regex:"nf4|4bit" python bench/profile_nf4_kernel.py --once [--rows ...] [--layers ...]

GPU only. ``--sweep`` also times a grid of tiles (shape, warps, ``split_k``, ``mode``) at 1, 8, 32 and 64 rows and
reports the fastest (every tile's time under ``tried``) of those that give the right result twice (within
bf16's eps of the sum of ``|x * w|``, the same bits both times), the three fastest within 10% timed again in
turn first (``final_round``: the lowest median of three wins); ``--tiles-out`` writes them as the kernel's tile
table for this device, keeping other devices' entries (``MEDQA_NF4_TILES=FILE`` makes a run use that file).
``--sweep-lora`` times each tile with LoRA (rank 16), as an adapted model's decode launches it, and writes entries
that launches with LoRA take (``"lora": true``), beside those chosen without. Under ``MEDQA_NF4_LAYOUT=tiled`` (the
decoder's switch, v22) the sweep times each MMA tile on copies of the weights in that tile's own order, as a
decoder with the switch reads them, and its trace rows and table entries say so (``"layout": "tiled"``).

Exit codes: 0 done; 2 an unknown option value (``MEDQA_NF4_LAYOUT``'s too), or no GPU; 130 stopped by SIGINT
(Ctrl-C, or a time limit's ``timeout --signal=INT``), one line on stderr: the file written so far keeps the layer
shapes finished before it.
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that made it)
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import torch

MISTRAL_7B_LAYERS = {  # name: (out_features N, in_features K)
    "q_proj/o_proj": (4096, 4096), "k_proj/v_proj": (1024, 4096), "gate_proj/up_proj": (14336, 4096),
    "down_proj": (4096, 14336),
    # Siblings as our kernel runs them since v10, one launch each (nf4_layers.SIBLINGS): ours calls them as their
    # segments (SIBLING_SEGMENTS), bitsandbytes and bf16 as one weight of all their rows
    "q+k+v_proj": (6144, 4096), "gate+up_proj": (28672, 4096)}
SIBLING_SEGMENTS = {"q+k+v_proj": (4096, 1024, 1024), "gate+up_proj": (14336, 14336)}
RANK = 16  # the presets' LoRA rank (config.LoraSettings)


def _ulps(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    eps = torch.finfo(torch.bfloat16).eps
    ulp = torch.where(ref.abs() > 0, torch.exp2(torch.floor(torch.log2(ref.abs()))) * eps, torch.full_like(ref, eps))
    return ((out.float() - ref).abs() / ulp).max().item()


def _abs_sum_eps(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 lora_abs: torch.Tensor | None = None) -> float:
    """Largest |out - ref| in units of bf16's eps times the sum of |x_k * w_nk| (and of LoRA's |t_r * b_nr|,
    ``lora_abs``): the summation-order bound, which stays meaningful where the sum cancels to near zero (there the
    ulp of the result is tiny)."""
    bound = x.float().abs() @ w.float().abs().T
    if lora_abs is not None:
        bound = bound + lora_abs
    bound = bound * torch.finfo(torch.bfloat16).eps
    return ((out.float() - ref.float()).abs() / bound.clamp_min(1e-30)).max().item()


def _lora_reference(x: torch.Tensor, ref: torch.Tensor, a: torch.Tensor, b: torch.Tensor, sizes: tuple[int, ...],
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``ref`` (x @ W^T in float32) plus LoRA's up-projection of siblings of ``sizes`` rows, each with its rank
    block of A [S * r, K] and rows of B [N, r], t rounded to bf16 as the kernel rounds it; and the sum of LoRA's
    |t_r * b_nr| per output, :func:`_abs_sum_eps`'s share of the bound for it."""
    rank = a.shape[0] // len(sizes)
    t = (scaling * (x.float() @ a.float().T)).bfloat16().float()  # [rows, S * r]
    blocks = [(t[:, i * rank:(i + 1) * rank], b_s.float()) for i, b_s in enumerate(b.split(list(sizes)))]
    return (ref + torch.cat([t_s @ b_s.T for t_s, b_s in blocks], dim=1),
            torch.cat([t_s.abs() @ b_s.abs().T for t_s, b_s in blocks], dim=1))


def _segments(weight, sizes: tuple[int, ...]) -> list:
    """``weight`` [N, K] as sibling weights of ``sizes`` rows (views of its tensors): what one launch of siblings
    reads. Each segment's blocks are whole groups of the double-quantized scales (true of the 7B shapes)."""
    k, parts, row0 = weight.in_features, [], 0
    for n in sizes:
        blocks = slice(row0 * k // weight.blocksize, (row0 + n) * k // weight.blocksize)
        groups = slice(blocks.start // weight.blocksize2, blocks.stop // weight.blocksize2)
        parts.append(dataclasses.replace(weight, packed=weight.packed[row0 * k // 2:(row0 + n) * k // 2],
                                         absmax=weight.absmax[blocks], absmax2=weight.absmax2[groups],
                                         out_features=n))
        row0 += n
    return parts


def _tiled(weights: list, cfg) -> list:
    """Each of ``weights`` (a weight, or a list of sibling segments) with copies in MMA tile ``cfg``'s order (v22,
    ``tile_nf4``; as it is where that tile reads bitsandbytes' order): what launches of ``cfg`` read in a decoder
    with ``MEDQA_NF4_LAYOUT=tiled``."""
    from medqa_core.engine.kernels.nf4_weight import tile_nf4

    return [[tile_nf4(s, cfg) for s in w] if isinstance(w, list) else tile_nf4(w, cfg) for w in weights]


def _time_s(fns: list, rep: int = 60) -> float:
    """Seconds of one call: ``fns`` (the same call over distinct weight copies, more bytes than L2 holds) replayed
    in turn from one CUDA graph, median over replays, divided by their number; so each call reads its weight
    from HBM, as decode does, not from the L2 the previous replay filled."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(lambda: [fn() for fn in fns], rep=rep, return_mode="median") / 1e3 \
        / len(fns)


def _copies(nbytes: int, device: torch.device) -> int:
    """How many copies of an ``nbytes`` weight make three times the device's L2 (1 where one does; at most 16)."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    return max(1, min(16, math.ceil(3 * l2 / nbytes)))


def _final_round(timed: list[tuple], time_tile: Callable, top: int = 3, within: float = 0.10,
                 rounds: int = 3) -> tuple:
    """The sweep's pick among ``timed`` ((tile, seconds), each timed once): the fastest ``top`` within ``within``
    of the fastest timed again in turn, ``rounds`` times each by ``time_tile``, the lowest median winning. Returns
    (tile, its seconds, {tile: median} of the final round, empty where one tile was near enough). One timing a
    tile, seconds apart from its rivals', let clocks decide close calls: session 53's sweep and session 47's put
    the same two gate+up tiles at 8 rows in opposite orders, 8% apart."""
    ranked = sorted(timed, key=lambda item: item[1])
    contenders = [tile for tile, seconds in ranked[:top] if seconds <= ranked[0][1] * (1 + within)]
    if len(contenders) == 1:
        return ranked[0][0], ranked[0][1], {}
    times: dict = {tile: [] for tile in contenders}
    for _ in range(rounds):  # in turn, so that a drift in the card's clocks falls on every contender alike
        for tile in contenders:
            times[tile].append(time_tile(tile))
    medians = {tile: sorted(ts)[len(ts) // 2] for tile, ts in times.items()}
    best = min(contenders, key=medians.__getitem__)
    return best, medians[best], medians


SWEEP_ROWS = (1, 8, 32, 64)  # the row counts --sweep tunes; their buckets key the tile table
ARMS = ("ours", "ours+lora", "bitsandbytes", "bitsandbytes+lora", "bf16")  # what each shape and row count times
# A/B arms (asked by --arms only): ours with LoRA, the block scales decoded to float32 first (v20,
# MEDQA_NF4_SCALES), or the weights copied into the order of the tile in use first (v22, MEDQA_NF4_LAYOUT)
AB_ARMS = ("ours+lora+float32-scales", "ours+lora+tiled")


def _sweep_grid(rows: int) -> list:
    """The tiles --sweep times at ``rows`` (at most 30 a row count).

    v8-v13: at 1 and 8 rows, 17 tiles of the MMA GEMV (mode mma), which runs on NVIDIA GPUs only, of one and
    two 16-row tiles a warp: five shapes with and without ``scales_ahead``, with ``block_scale`` a group ahead,
    and two with the ``prmt`` lookup a group ahead.

    v6: every tile takes the code table from shared memory (v5's winners did, on every shape at 1 and 8 rows).
    With the table a ``tl.gather``, Triton's software pipeliner no longer routes the lookups through shared memory,
    so the dot tiles come both ways: loads prefetched by hand (num_stages 1, ``prefetch``), or pipelined by Triton
    (num_stages 3-4: cp.async copies of the packed bytes, scales and x, several iterations in flight).

    - 1 row: v8's MMA tiles, v7's one-warp GEMV tiles (mode gemv), v6's GEMV winners (fma, block_m 1) and two of
      them pipelined by Triton.
    - 8 rows: v8's MMA tiles, v5's 8-row winners (dot with prefetch, dot_swap), and pipelined dots.
    - 32 and 64 rows: v18's MMA tiles of 32 and 64 rows a program, and dots of the rows' own height, by hand and
      pipelined.
    """
    from medqa_core.engine.kernels.nf4_tiles import TileConfig

    def shared(*args: object, **kwargs: object) -> TileConfig:
        return TileConfig(*args, **kwargs, shared_table=True)

    # v8's MMA GEMV (NVIDIA; 1 to 8 rows of x at one cost): warps, 16-row tiles of W a warp (v9: two share each x
    # word), columns an iteration, split; v9 prefetches x with the words. Elsewhere nf4_matmul refuses them and the
    # sweep lists them as rejected. The v9/v10 winners' shapes (v8's sweeps, 20261206T1540Z, and v10's,
    # 20261206T2016Z: one warp at split 8-16, on gate/up two or four warps at split 4).
    # v13, after session 43's H100 sweep (20261207T0225Z): the shfl lookup won every shape at 1 and 8 rows, v12's
    # prmt lookup and block scale with permutes lost by 10-40% on the same shapes; scales loaded a group ahead were
    # 5-11% faster where they ran right (a program of one group; the rest were wrong, fixed since). So: each shape
    # with and without scales_ahead, block scale with the shfl lookup (not yet timed) a group ahead, and prmt a
    # group ahead on the two shapes it came nearest.
    shapes = ((1, 1, 8), (4, 1, 4), (1, 2, 16), (2, 2, 4), (4, 2, 8))
    mma = [TileConfig(8, 16 * nw * tiles, 128, nw, 1, sk, "mma", prefetch=True, scales_ahead=ahead)
           for ahead in (False, True) for nw, tiles, sk in shapes]
    mma += [TileConfig(8, 16 * nw * tiles, 128, nw, 1, sk, "mma", prefetch=True, block_scale=True, scales_ahead=True)
            for nw, tiles, sk in shapes]
    mma += [TileConfig(8, 16 * nw * tiles, 128, nw, 1, sk, "mma", prefetch=True, lookup="prmt", scales_ahead=True)
            for nw, tiles, sk in ((4, 1, 4), (2, 2, 4))]
    # v21: 256 columns an iteration, a lane's whole quantization block of each row (a 128-byte line a row, twice the
    # words in flight a warp; no block_scale, which takes at most two blocks an iteration): one-warp tiles of one and
    # two 16-row tiles, two warps of two, at fewer splits (K's iterations halve).
    wide = ((1, 1, 4), (1, 2, 8), (2, 2, 2), (4, 1, 4)) if rows == 1 else ((1, 1, 4), (2, 2, 2))
    mma += [TileConfig(8, 16 * nw * tiles, 256, nw, 1, sk, "mma", prefetch=True, scales_ahead=True)
            for nw, tiles, sk in wide]
    # v19's register caps (TileConfig.max_registers) left the grid after session 53's H100 sweeps at 1 and 8 rows
    # (20261207T2148Z, 20261207T2150Z): the two-warp 64-column tile, which spills 140 bytes or more under a cap,
    # 4-34% slower than uncapped; the one-warp tiles (0-32 bytes spilled) within 2% either way. A table entry may
    # still name a cap.
    if rows == 1:
        # v7's GEMV (int32 words, a word a lane): the swept winner (down_proj) and its neighbours
        words = [TileConfig(1, bn, bk, nw, 1, sk, "gemv", prefetch=True) for bn, bk, nw, sk in
                 ((8, 256, 1, 8), (8, 512, 1, 8), (8, 512, 2, 8))]
        # v6's GEMV (fma, block_m 1): the winners of v7's sweep (q/o, k/v, gate/up) and of v6's
        gemv = [shared(1, bn, bk, nw, st, sk, "fma") for bn, bk, nw, st, sk in
                ((16, 256, 4, 2, 1), (16, 256, 4, 2, 2), (8, 512, 4, 2, 4), (16, 256, 4, 3, 1), (8, 512, 4, 3, 4))]
        return mma + words + gemv  # 29
    block_m = max(16, rows)
    if rows > 8:
        # v18: the MMA tiles of 16 to 64 x rows a program (blocks of 8 sharing each decoded weight), block scale a
        # group ahead (the 8-row winners' flags); with x prefetched only where its registers fit (64 columns and
        # at most 32 rows: 168 registers, sm_90a; 64 rows take 171 without it), one and two tiles a warp, and at
        # 64 rows programs of 32 rows too (two decode each weight).
        def mma_tile(bm: int, nw: int, tiles: int, bk: int, sk: int, prefetch: bool) -> TileConfig:
            return TileConfig(bm, 16 * nw * tiles, bk, nw, 1, sk, "mma", prefetch=prefetch, block_scale=True,
                              scales_ahead=True)
        bm = min(rows, 64)
        ahead = bm <= 32  # x prefetched
        mma = [mma_tile(bm, 1, 1, 64, sk, ahead) for sk in (2, 4, 8)]
        mma += [mma_tile(bm, 1, 1, 64, 4, False)] if ahead else []
        mma += [mma_tile(bm, 2, 1, 64, 4, ahead), mma_tile(bm, 1, 2, 64, 4, False), mma_tile(bm, 1, 1, 32, 4, True)]
        if rows >= 64:
            mma += [mma_tile(32, 1, 1, 64, 4, True), mma_tile(32, 2, 1, 64, 4, True)]
    by_hand = [shared(block_m, 32, 128, 4, 1, sk, "dot", True) for sk in ((1, 4) if rows <= 16 else (1, 2))] + [
        shared(block_m, 64, 64, 4, 1, sk, "dot_swap") for sk in ((1, 4) if rows <= 16 else (1,))]
    pipelined = [shared(block_m, bn, bk, nw, st, sk, mode) for bn, bk, nw, st, sk, mode in
                 ((32, 128, 4, 3, 1, "dot"), (32, 128, 4, 3, 4, "dot"), (64, 128, 4, 3, 2, "dot"),
                  (64, 64, 4, 3, 4, "dot_swap"), (64, 128, 4, 3, 2, "dot_swap"), (64, 128, 8, 4, 1, "dot_swap"),
                  (128, 64, 8, 3, 1, "dot_swap"))]
    return mma + by_hand + pipelined  # 30 at 8 rows, 17-18 above


def _sweep_tiles(rows: int, n: int, k: int, device: torch.device, modes: list[str] | None,
                 lora: bool = False) -> list:
    """The tiles the sweep times for one shape and row count, in order: the tile in use (``lora``: by a launch with
    LoRA; it competes too, whatever its mode), then the grid's tiles of ``modes`` (all without)."""
    from medqa_core.engine.kernels.nf4_tiles import tile_config

    grid = [c for c in _sweep_grid(rows) if modes is None or c.kernel_mode in modes]
    return list(dict.fromkeys([tile_config(rows, n, k, device, lora), *grid]))


def profile(rows_list: list[int], sweep: bool, blocksize: int,
            save: Callable[[dict, dict], None] = lambda result, tiles: None,
            device: torch.device | None = None, layers: list[str] | None = None,
            once: bool = False, modes: list[str] | None = None, compile_workers: int = 1,
            arms: list[str] | None = None, sweep_lora: bool = False) -> tuple[dict, dict]:
    """Every arm at every row count, layer shape by layer shape (``layers``: these of MISTRAL_7B_LAYERS only, in
    that order);
    ``save`` gets what is done after each shape, so a call cut off by a time limit keeps the shapes it finished.
    ``once``: each arm's first weight copy called once, untimed, nothing saved: the launches for an external
    profiler (Nsight Compute) to capture. ``modes``: sweep only the grid's tiles of these modes (the tile in use
    competes whatever its mode). ``compile_workers`` > 1: the tiles in use (with and without LoRA) and the
    sweep's, of every shape and row count, compiled first by that many processes at once (:func:`compile_ahead`).
    ``arms``: time only these of ARMS. ``sweep_lora``: the sweep times each tile with LoRA of rank RANK, as decode
    runs an adapted model, and its table entries say so (``"lora": true``; tile_config gives them to launches with
    LoRA). Under ``MEDQA_NF4_LAYOUT=tiled`` the sweep times each tile on copies in its own order (:func:`_tiled`)."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    from medqa_core.engine.kernels import nf4_matmul as kernels
    from medqa_core.engine.kernels.nf4_compile import CompileJob, compile_ahead
    from medqa_core.engine.kernels.nf4_matmul import nf4_matmul
    from medqa_core.engine.kernels.nf4_tiles import row_bucket, tile_config
    from medqa_core.engine.kernels.nf4_weight import float32_scales, nf4_weight, weight_layout
    from medqa_core.measure.ceilings import measure_copy_bandwidth

    device = device or torch.device("cuda")  # another only to smoke-test the script on CPU (interpreter)
    bandwidth = measure_copy_bandwidth(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    gen = torch.Generator(device=device).manual_seed(0)
    rows_out = []
    tiles = []  # the sweep's best per (rows bucket, N, K): the kernel's tile table
    arms = list(arms or ARMS)
    sweep_tiled = sweep and weight_layout() == "tiled"  # the decoder's switch: the sweep times what it will read
    if not once and device.type == "cuda" and compile_workers > 1:
        sizes_of = {layer: SIBLING_SEGMENTS.get(layer, MISTRAL_7B_LAYERS[layer][:1]) for layer in MISTRAL_7B_LAYERS}
        ranks = [rank for arm, rank in (("ours", 0), ("ours+lora", RANK)) if arm in arms]
        jobs = [CompileJob(tile_config(rows, *MISTRAL_7B_LAYERS[layer], device, rank > 0), rows, sizes_of[layer],
                           MISTRAL_7B_LAYERS[layer][1], rank, blocksize, tiled=tiled)
                for layer in layers or MISTRAL_7B_LAYERS for rows in rows_list
                for rank, tiled in [(rank, False) for rank in ranks] + [(RANK, True)] * ("ours+lora+tiled" in arms)]
        if sweep:
            jobs += [CompileJob(tile, rows, sizes_of[layer], MISTRAL_7B_LAYERS[layer][1], RANK if sweep_lora else 0,
                                blocksize, tiled=sweep_tiled)
                     for layer in layers or MISTRAL_7B_LAYERS for rows in rows_list if rows in SWEEP_ROWS
                     for tile in _sweep_tiles(rows, *MISTRAL_7B_LAYERS[layer], device, modes, sweep_lora)]
        jobs = list(dict.fromkeys(jobs))
        began = time.perf_counter()
        failed = sum(e is not None for e in compile_ahead(jobs, device, compile_workers))
        print(f"compiled ahead: {len(jobs)} tiles of every shape and row count in "
              f"{time.perf_counter() - began:.0f} s ({compile_workers} processes; {failed} left to the timing loop)",
              flush=True)
    for layer in layers or MISTRAL_7B_LAYERS:  # in the order asked: a call cut short keeps the first ones
        n, k = MISTRAL_7B_LAYERS[layer]
        w = torch.randn(n, k, device=device, generator=gen).bfloat16() * 0.02
        packed, state = quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        param = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True)
        weight = nf4_weight(param)
        dense = dequantize_4bit(packed, state)  # [N, K] bf16: bitsandbytes' own dequantize
        a = (torch.randn(RANK, k, device=device, generator=gen) * 0.02).bfloat16()
        b = (torch.randn(n, RANK, device=device, generator=gen) * 0.02).bfloat16()
        weight_bytes = packed.numel() * packed.element_size() + state.absmax.numel() + \
            state.state2.absmax.numel() * 4
        # Distinct copies of the packed weight (its bulk; the absmax codes are 1/32 of it) and of the bf16 one.
        params = [param] + [bnb.nn.Params4bit(packed.clone(), requires_grad=False, quant_state=state,
                                              bnb_quantized=True) for _ in range(_copies(weight_bytes, device) - 1)]
        weights = [weight] + [dataclasses.replace(weight, packed=p.data.view(torch.uint8).reshape(-1))
                              for p in params[1:]]
        sizes = SIBLING_SEGMENTS.get(layer, (n,))
        if len(sizes) > 1:  # ours reads them as siblings, each with its own LoRA rank block
            weights = [_segments(w, sizes) for w in weights]
            a = torch.cat([a] + [(torch.randn(RANK, k, device=device, generator=gen) * 0.02).bfloat16()
                                 for _ in sizes[1:]])
        denses = [dense] + [dense.clone() for _ in range(_copies(n * k * 2, device) - 1)]
        weights_f32 = ([[float32_scales(s) for s in w] if isinstance(w, list) else float32_scales(w) for w in weights]
                       if "ours+lora+float32-scales" in arms else [])
        for rows in rows_list:
            x = torch.randn(rows, k, device=device, generator=gen).bfloat16()
            io_bytes = 2 * rows * (k + n)
            lora_bytes = 2 * RANK * (len(sizes) * k + n)
            ref = x.float() @ dense.float().T
            lora_args = dict(lora_a=a, lora_b=b, scaling=[2.0] * len(sizes))
            ref_lora, lora_abs = _lora_reference(x, ref, a, b, sizes, 2.0)
            in_use = tile_config(rows, n, k, device, True)  # the tile a launch with LoRA takes (v22 tiles for it)
            weights_tiled = _tiled(weights, in_use) if "ours+lora+tiled" in arms else []
            cases = {
                "ours": ([lambda w=w: nf4_matmul(x, w) for w in weights], weight_bytes, ref),
                "ours+lora": ([lambda w=w: nf4_matmul(x, w, **lora_args) for w in weights],
                              weight_bytes + lora_bytes, ref_lora),
                # the bytes of the weights as stored (nested scales), as the other arms: what a user's model holds
                "ours+lora+float32-scales": ([lambda w=w: nf4_matmul(x, w, **lora_args) for w in weights_f32],
                                             weight_bytes + lora_bytes, ref_lora),
                "ours+lora+tiled": ([lambda w=w: nf4_matmul(x, w, **lora_args) for w in weights_tiled],
                                    weight_bytes + lora_bytes, ref_lora),
                "bitsandbytes": ([lambda p=p: bnb.matmul_4bit(x, p.t(), quant_state=state) for p in params],
                                 weight_bytes, ref),
                "bitsandbytes+lora": ([lambda p=p: bnb.matmul_4bit(x, p.t(), quant_state=state)
                                       + (x @ a.T) @ b.T * 2.0 for p in params], weight_bytes + lora_bytes,
                                      ref_lora),
                "bf16": ([lambda d=d: x @ d.T for d in denses], n * k * 2, ref),
            }
            if len(sizes) > 1:  # bitsandbytes and peft run siblings' adapters one layer at a time: their own rows
                del cases["bitsandbytes+lora"]
            for arm, (fns, wbytes, reference) in cases.items():
                if arm not in arms:
                    continue
                lora = "lora" in arm
                out = fns[0]()
                if once:
                    continue
                seconds = _time_s(fns)
                moved = wbytes + io_bytes
                rows_out.append(dict(layer=layer, n=n, k=k, rows=rows, arm=arm, time_s=seconds, bytes=moved,
                                     weight_copies=len(fns),
                                     bytes_per_s=moved / seconds, bandwidth_fraction=moved / seconds / bandwidth,
                                     max_ulps_vs_dequantize_matmul=_ulps(out, reference),
                                     max_abs_error=(out.float() - reference).abs().max().item(),
                                     max_error_abs_sum_eps=_abs_sum_eps(out, reference, x, dense)
                                     if not lora else None))
                print(f"{layer:18s} M={rows:4d} {arm:18s} {seconds * 1e6:8.1f} us  "
                      f"{moved / seconds / 1e9:7.0f} GB/s ({moved / seconds / bandwidth:5.1%})  "
                      f"err {rows_out[-1]['max_ulps_vs_dequantize_matmul']:.1f} ulp", flush=True)
            if sweep and not once and rows in SWEEP_ROWS:
                chosen = tile_config(rows, n, k, device, sweep_lora)
                timed = []  # (tile, seconds) of every tile that ran right
                rejected = []  # tiles that failed to launch or gave a wrong result: never the table's
                # with LoRA: the launch an adapted model makes, checked against LoRA's reference
                extra, sweep_ref, sweep_abs = (lora_args, ref_lora, lora_abs) if sweep_lora else ({}, ref, None)

                def time_tile(cfg) -> float:  # one launch's seconds (a TileConfig's), over the weight copies
                    read = _tiled(weights, cfg) if sweep_tiled else weights  # copies in cfg's order, for its time
                    return _time_s([lambda cfg=cfg, w=w: nf4_matmul(x, w, config=cfg, **extra) for w in read],
                                   rep=25)

                for cfg in _sweep_tiles(rows, n, k, device, modes, sweep_lora):
                    try:
                        read = _tiled(weights[:1], cfg)[0] if sweep_tiled else weights[0]
                        first = nf4_matmul(x, read, config=cfg, **extra)
                        # The summation-order bound (stays meaningful where sums cancel), and the same bits on a
                        # second call: a split-K reduction that raced would fail one or the other.
                        error = _abs_sum_eps(first, sweep_ref, x, dense, sweep_abs)
                        repeats = torch.equal(first, nf4_matmul(x, read, config=cfg, **extra))
                        if error > 1.0 or not repeats:
                            raise ArithmeticError(f"error {error:.2f} eps of sum |x*w|, repeats {repeats}")
                        seconds = time_tile(cfg)
                        # each tile's time in the log too: a sweep cut inside a shape saves no file for it
                        print(f"  tile {seconds * 1e6:8.1f} us  {cfg}", flush=True)
                    except Exception as e:  # a tile this device cannot hold (shared memory), or a wrong one
                        print(f"  sweep {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                        rejected.append(dict(config=dataclasses.asdict(cfg), error=f"{type(e).__name__}: {e}"[:500]))
                        continue
                    timed.append((cfg, seconds))
                if not timed:
                    print(f"  sweep: no tile ran for {layer} at {rows} rows", flush=True)
                    continue
                best, best_s, final = _final_round(timed, time_tile)
                for cfg, seconds in final.items():
                    print(f"  final {seconds * 1e6:8.1f} us  {cfg}", flush=True)
                layout = {"layout": "tiled"} if sweep_tiled else {}  # timed on copies in each tile's order
                tiles.append(dict(rows=row_bucket(rows), n=n, k=k, config=dataclasses.asdict(best),
                                  **({"lora": True} if sweep_lora else {}), **layout))
                swept_bytes = weight_bytes + io_bytes + (lora_bytes if sweep_lora else 0)
                rows_out.append(dict(layer=layer, n=n, k=k, rows=rows, arm="sweep+lora" if sweep_lora else "sweep",
                                     **layout, chosen=dataclasses.asdict(chosen),
                                     best=dataclasses.asdict(best), best_time_s=best_s,
                                     best_bandwidth_fraction=swept_bytes / best_s / bandwidth,
                                     tried=[dict(config=dataclasses.asdict(c), time_s=t) for c, t in timed],
                                     rejected=rejected,
                                     final_round=[dict(config=dataclasses.asdict(cfg), time_s=seconds)
                                                  for cfg, seconds in final.items()]))
                print(f"  sweep best {best} {best_s * 1e6:.1f} us "
                      f"({swept_bytes / best_s / bandwidth:.1%}); was {chosen}", flush=True)
        result = dict(copy_bandwidth_bytes_per_s=bandwidth, blocksize=blocksize, double_quant=True, lora_rank=RANK,
                      lora_min_chunk=kernels.LORA_MIN_CHUNK,
                      rows=rows_out)
        if not once:
            save(result, {device_name: tiles})
    return result, {device_name: tiles}


def merge_tiles(old: dict, new: dict) -> dict:
    """The tile table ``old`` with ``new``'s entries in: an entry of the same device, row bucket, shape and LoRA
    (timed with it or not) is replaced, every other stays (a sweep at some row counts keeps the others' tiles, a
    sweep with LoRA the tiles chosen without)."""
    def key(e: dict) -> tuple:
        return e["rows"], e["n"], e["k"], bool(e.get("lora", False))

    merged = {device: list(entries) for device, entries in old.items()}
    for device, entries in new.items():
        fresh = {key(e) for e in entries}
        merged[device] = [e for e in merged.get(device, []) if key(e) not in fresh] + entries
    return merged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="JSON file to write (results/traces/...); needed but with --once")
    parser.add_argument("--rows", default="1,8,32,64", help="comma-separated row counts (default: %(default)s)")
    parser.add_argument("--blocksize", type=int, default=64, help="NF4 block size (default: %(default)s)")
    parser.add_argument("--sweep", action="store_true", help="also time a grid of tile shapes")
    parser.add_argument("--tiles-out", type=Path, help="with --sweep: write the best tiles as the kernel's tile table")
    parser.add_argument("--sweep-lora", action="store_true",
                        help=f"with --sweep: time each tile with LoRA of rank {RANK}, as an adapted model's decode "
                             "launches it; the table's entries are then those of launches with LoRA")
    parser.add_argument("--layers",
                        help=f"comma-separated layer shapes, of {', '.join(MISTRAL_7B_LAYERS)} (default: all)")
    parser.add_argument("--modes",
                        help="with --sweep: comma-separated kernel modes whose tiles to sweep (default: all)")
    parser.add_argument("--compile-workers", type=int, default=os.cpu_count() or 1,
                        help="processes that compile the tiles (in use, and with --sweep the grid's) before they "
                             "are timed (default: one a CPU, %(default)s here; 1 compiles each as it is timed)")
    parser.add_argument("--arms", help=f"comma-separated arms to time, of {', '.join(ARMS + AB_ARMS)} (default: "
                                       f"{', '.join(ARMS)})")
    parser.add_argument("--lora-min-chunk", type=int, metavar="COLUMNS",
                        help="columns of K a LoRA down-projection program takes at least (the kernel's "
                             "LORA_MIN_CHUNK, 1024; larger: fewer, longer LoRA programs), recorded in --out")
    parser.add_argument("--once", action="store_true",
                        help="call each arm once, untimed, and write nothing: for Nsight Compute (ncu) to profile")
    args = parser.parse_args(argv)
    if not args.out and not args.once:
        parser.error("--out is required (only --once, which writes nothing, runs without it)")
    if args.sweep_lora and not args.sweep:
        parser.error("--sweep-lora times the sweep's tiles with LoRA: it needs --sweep")
    layers = args.layers.split(",") if args.layers else None
    unknown = sorted(set(layers or ()) - set(MISTRAL_7B_LAYERS))
    if unknown:
        parser.error(f"--layers: unknown {', '.join(unknown)}; choose among {', '.join(MISTRAL_7B_LAYERS)}")
    modes = args.modes.split(",") if args.modes else None
    arms = args.arms.split(",") if args.arms else None
    if set(arms or ()) - set(ARMS + AB_ARMS):
        parser.error(f"--arms: unknown {', '.join(sorted(set(arms) - set(ARMS + AB_ARMS)))}; choose among "
                     f"{', '.join(ARMS + AB_ARMS)}")
    from medqa_core.engine.kernels.nf4_tiles import MODES

    if args.lora_min_chunk is not None and args.lora_min_chunk < 16:
        parser.error(f"--lora-min-chunk: {args.lora_min_chunk} columns; at least 16 (a LoRA program's smallest load)")
    if set(modes or ()) - set(MODES):
        parser.error(f"--modes: unknown {', '.join(sorted(set(modes) - set(MODES)))}; choose among {', '.join(MODES)}")
    from medqa_core.engine.kernels.nf4_weight import weight_layout

    try:
        weight_layout()  # MEDQA_NF4_LAYOUT, read again by the sweep: a wrong value is refused before anything runs
    except ValueError as e:
        parser.error(str(e))
    if not torch.cuda.is_available():
        print("profile_nf4_kernel: needs a CUDA or ROCm GPU (the CPU interpreter's times mean nothing)",
              file=sys.stderr)
        return 2
    from medqa_core.measure.fingerprint import machine_fingerprint
    from medqa_core.results.record import write_json_atomic

    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    fingerprint = machine_fingerprint(torch.device("cuda"))
    # This device's entries replace its old ones; other devices' stay.
    old_table = json.loads(args.tiles_out.read_text()) if args.tiles_out and args.tiles_out.is_file() else {}

    def save(result: dict, tiles: dict) -> None:  # each file whole or not at all: a kill keeps the last save
        if args.tiles_out and args.sweep:
            write_json_atomic(args.tiles_out, merge_tiles(old_table, tiles))
        write_json_atomic(args.out, dict(kind="nf4-kernel-profile", started=started, fingerprint=fingerprint,
                                         **result))

    if args.lora_min_chunk is not None:  # read at each launch (nf4_matmul._lora_split): in effect from here on
        from medqa_core.engine.kernels import nf4_matmul as kernels

        kernels.LORA_MIN_CHUNK = args.lora_min_chunk
    try:
        profile([int(r) for r in args.rows.split(",")], args.sweep, args.blocksize, save, layers=layers,
                once=args.once, modes=modes, compile_workers=args.compile_workers, arms=arms,
                sweep_lora=args.sweep_lora)
    except KeyboardInterrupt:  # Ctrl-C, or a time limit's SIGINT: the shapes saved so far stay as they were
        kept = "nothing saved (--once)" if args.once else f"{args.out} holds the layer shapes finished before it"
        print(f"profile_nf4_kernel: interrupted by SIGINT; {kept}", file=sys.stderr)
        return 130
    if not args.once:
        print(f"wrote {args.out}" + (f" and {args.tiles_out}" if args.tiles_out and args.sweep else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
