"""Which tile each launch of our NF4 kernel (:mod:`nf4_matmul`) takes: the :class:`TileConfig` (tile shape, warps,
K split, inner loop), the tables of tiles measured best per device (``nf4_tiles.json``) and the defaults where a
table has none.

Which tile wins is measured, not assumed: ``bench/profile_nf4_kernel.py --sweep`` times a grid of tiles per layer
shape and row count and writes the best as a table per device; :func:`_default_tile` is the choice where the table
has no entry. v1 to v8 were measured on H200/H100 (docs/decode.md).
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import triton

from medqa_core.engine.kernels.common import interpreting

MODES = ("mma", "gemv", "fma", "dot", "dot_swap")
MMA_BLOCK_M = (8, 16, 32, 64)  # mode mma: x rows a program, blocks of 8 (v18: each weight decoded once for all)
LOOKUPS = ("shfl", "split", "prmt")  # mode mma: rows by byte permutes 0, 1 (g + 8) or 2 (both) of a lane's two


def _power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


@dataclass(frozen=True)
class TileConfig:
    """A kernel launch's tile shape, warps, K split and inner loop.

    ``block_k``: columns an iteration (whole quantization blocks on the aligned path, rounded to divide a row's blocks).
    ``split_k``: programs sharing one output tile, each over a near-equal range of whole iterations (clamped to the
    iterations there are), reduced in a fixed order. ``mode``: ``"mma"`` (v8, NVIDIA: ``block_m`` 8, or v18 16 to 64 in
    blocks of 8 that share each decoded weight; ``block_n`` 16 or 32 a warp, ``block_k`` 32 to 256 columns an iteration,
    a quarter of it a lane's; ``prefetch`` loads the next iteration's words and scales first; ``shared_table`` does not
    apply), ``"gemv"`` (v7, ``block_m`` 1: int32 words, ``block_n`` rows of W a program over ``num_warps`` warps;
    ``shared_table`` does not apply, its lookups are always a gather), ``"fma"`` (broadcast multiply-adds, any
    ``block_m``; at 1 v6's GEMV), ``"dot"`` (``x @ W^T`` by ``tl.dot`` with K = ``block_k``) or ``"dot_swap"`` (``(W @
    x^T)^T``: the MMA's M is ``block_n``, which Hopper's wgmma wants at 64); the dots need ``block_m`` and ``block_n``
    of at least 16. None, as tile tables written before these fields read, is ``"fma"`` below 16 rows a tile and
    ``"dot"`` from 16 (what those tables measured). ``prefetch`` (rows of whole blocks): load the next iteration's bytes
    and scales before decoding this one's. ``shared_table`` (rows of whole blocks): the code-table lookups by
    ``tl.gather`` from the table staged in shared memory, not by global-memory loads (v5; fewer instructions a weight in
    the compiled loop; on the H100 it won every swept shape at 1 and 8 rows, and the defaults use it). ``num_stages`` of
    3 or more with the shared table and no prefetch: Triton software-pipelines the K loop over that many stages (v6; the
    8-64-row winners on the H100). ``lookup`` (mode ``mma``): how a code becomes its weight. ``"shfl"`` (v8): one
    ``shfl`` a weight from the lane that holds its level; ``"split"`` (v11): rows g + 8 of each tile by ALU byte
    permutes on a table of their block's rounded weights, rows g by ``shfl``, so the lookups use two pipes; ``"prmt"``
    (v12): every row by byte permutes, no ``shfl`` (:func:`_nf4_mma`). ``block_scale`` (mode ``mma``, v12): the MMAs
    take each code's level rounded to the dtype and each block's sums are scaled after them, not each weight before: no
    multiply or rounding a weight, and with ``lookup`` ``"prmt"`` one table for the whole launch. Not bitwise
    bitsandbytes' dequantization then (a weight rounds ``level`` where bitsandbytes rounds ``level * absmax``), within
    the tolerance tests/test_nf4_kernel.py states. ``scales_ahead`` (mode ``mma``, v13): the four lanes of a row load
    the scales of four blocks once, one each, and each iteration takes its block's by one ``shfl``, instead of every
    lane loading its block's scale every iteration (K split in whole groups of four blocks); bitwise the same results.
    ``max_registers`` (v19, NVIDIA): a thread's register cap (ptxas' ``maxnreg``; None: ptxas' own choice), so that
    more warps fit an SM; what does not fit spills to local memory. Other vendors' compilers take no cap: ignored
    there. The same arithmetic in the same order either way: bitwise the same results.

    Raises:
        ValueError: a size that is not a power of two, ``split_k`` below 1, an unknown mode, a dot tile under 16, or a
            register cap outside ptxas' 24 to 255.
    """

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    mode: str | None = None
    prefetch: bool = False
    shared_table: bool = False
    lookup: str = "shfl"
    block_scale: bool = False
    scales_ahead: bool = False
    max_registers: int | None = None

    @property
    def inner_loop(self) -> str:
        """The mode with how its lanes decode where that is not the default: ``"mma"``, ``"mma prmt"``,
        ``"mma prmt block-scale scales-ahead"``, ``"mma m32 block-scale"`` (x rows a program, v18), ``"mma
        maxnreg96"`` (a register cap, v19): what a decode record names."""
        rows = [f"m{self.block_m}"] if self.kernel_mode == "mma" and self.block_m > 8 else []
        return " ".join([self.kernel_mode] + rows + ([self.lookup] if self.lookup != "shfl" else [])
                        + (["block-scale"] if self.block_scale else [])
                        + (["scales-ahead"] if self.scales_ahead else [])
                        + ([f"maxnreg{self.max_registers}"] if self.max_registers else []))

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k", "num_warps"):
            if not _power_of_two(getattr(self, name)):
                raise ValueError(f"TileConfig.{name}={getattr(self, name)}: must be a power of two")
        if self.split_k < 1:
            raise ValueError(f"TileConfig.split_k={self.split_k}: must be at least 1")
        if self.max_registers is not None and not 24 <= self.max_registers <= 255:
            raise ValueError(f"TileConfig.max_registers={self.max_registers}: ptxas takes 24 to 255 (or None)")
        if self.mode not in (None, *MODES):
            raise ValueError(f"TileConfig.mode={self.mode!r}: choose one of {MODES} (or None)")
        if self.lookup not in LOOKUPS:
            raise ValueError(f"TileConfig.lookup={self.lookup!r}: choose one of {LOOKUPS}")
        if (self.lookup != "shfl" or self.block_scale or self.scales_ahead) and self.kernel_mode != "mma":
            raise ValueError(f"TileConfig: lookup {self.lookup!r}, block_scale and scales_ahead are the mma mode's "
                             f"(how its lanes decode a code), not mode {self.kernel_mode!r}'s")
        if self.kernel_mode == "mma":
            if (self.block_m not in MMA_BLOCK_M or self.block_n not in (16 * self.num_warps, 32 * self.num_warps)
                    or not 32 <= self.block_k <= 256):  # a lane's 8 to 64 columns: up to 8 words of a row
                raise ValueError(f"TileConfig: mode 'mma' is 8 to 64 rows of x (block_m {MMA_BLOCK_M}) by 16 or 32 "
                                 f"rows of W a warp "
                                 f"(block_n {16 * self.num_warps} or {32 * self.num_warps} at {self.num_warps} warps) "
                                 f"over block_k 32 to 256 columns, got {self.block_m} x {self.block_n} x "
                                 f"{self.block_k}")
        elif self.kernel_mode == "gemv":
            if self.block_m != 1:
                raise ValueError(f"TileConfig: mode 'gemv' is one row of x a tile (block_m 1), got {self.block_m}")
            if self.block_n < self.num_warps:
                raise ValueError(f"TileConfig: mode 'gemv' gives each warp its own rows, so block_n "
                                 f"({self.block_n}) must be at least num_warps ({self.num_warps})")
        elif self.kernel_mode != "fma" and min(self.block_m, self.block_n) < 16:
            raise ValueError(f"TileConfig: mode {self.kernel_mode!r} needs block_m and block_n >= 16 (tl.dot), got "
                             f"{self.block_m} x {self.block_n}; use mode 'fma' for fewer rows")

    @property
    def kernel_mode(self) -> str:
        """The mode this tile runs: ``mode``, or for None ``"fma"`` below 16 rows a tile and ``"dot"`` from 16."""
        return self.mode or ("dot" if self.block_m >= 16 else "fma")


# Tiles measured best by bench/profile_nf4_kernel.py --sweep, per device name: a JSON list of
# {"rows": bucket, "n": N, "k": K, "config": {...}}; "split_k" and "mode" may be absent (1 and None). An entry
# with "lora": true was timed with LoRA (--sweep-lora), and is the one a launch with LoRA takes: the best tile
# without LoRA was not the best with it (gate+up at one row, session 46). An entry with "layout": "tiled" was
# timed on copies in its tile's order (the sweep under MEDQA_NF4_LAYOUT=tiled); a launch takes it in either order.
# MEDQA_NF4_TILES names another file.
TUNED_TILES = Path(__file__).with_name("nf4_tiles.json")

# Warps to aim for per multiprocessor (SM / CU) when the default tile splits K (four programs of four warps): enough
# resident warps to keep loads in flight while each waits on its dependent loads (byte -> code, absmax code ->
# code2 -> absmax2).
WARPS_PER_MULTIPROCESSOR = 16
MAX_DEFAULT_SPLIT_K = 8


def row_bucket(rows: int) -> int:
    """The row counts that share a tuned tile: the next power of two (1, 2, 4, 8, 16, 32, 64, ...)."""
    return triton.next_power_of_2(max(1, rows))


@functools.cache
def _tuned(device_name: str, path: str) -> dict[tuple[int, int, int, bool], TileConfig]:
    """The tile table's entries for ``device_name``, keyed (rows bucket, N, K, timed with LoRA)."""
    file = Path(path)
    if not file.is_file():
        return {}
    try:
        table = json.loads(file.read_text())
        return {(e["rows"], e["n"], e["k"], bool(e.get("lora", False))): TileConfig(**e["config"])
                for e in table.get(device_name, [])}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{file}: not a tile table ({type(e).__name__}: {e}); "
                         "write it with bench/profile_nf4_kernel.py --sweep --tiles-out") from e


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    """SMs (CUDA) or CUs (ROCm) of ``device``; 1 elsewhere (the interpreter: no split worth making)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_tile(rows: int, out_features: int, in_features: int, multiprocessors: int,
                  mma: bool = False) -> TileConfig:
    """The tile where the device's table has none: per row bucket, the single swept tile whose worst shape is
    nearest that shape's own winner, from the H100 sweeps (2026-12-06: at 1 and 8 rows v8's,
    results/traces/20261206T1540Z_h100_nf4-kernel-v8-mma.json, and where ``mma`` is False v7's,
    20261206T1313Z_h100_nf4-kernel-v7b-gemv.json; at 32 and 64 v6's, 20261206T0926Z_h100_nf4-kernel-v6.json).

    - 1 to 8 rows with ``mma`` (an NVIDIA GPU of sm_80 on): v8's MMA GEMV, 16 rows of W a one-warp program, 128
      columns an iteration (64 where K is not a multiple of 128), prefetch, split by the rule below: within 1%
      of the sweep's best on q/o and down_proj at 1 and 8 rows, 12% on gate/up (its best: 4 warps a program),
      25% on k/v (its best: a split of 16, past the rule's 8).
    - 1 row otherwise: v7's GEMV, 8 rows of W a one-warp program, 256 columns an iteration, prefetch (within 13% of each
      shape's best in that sweep; v6's fma tiles were up to 31% off on one shape or another).
    - 2..16 rows otherwise (and 9..16): dot, K = block_k = 128 a tl.dot, block_n 32, 4 warps, prefetch by hand
      (v6's 8-row sweep's).
    - 17..64 rows: dot_swap, block_n 64, block_k 64, 4 warps, pipelined by Triton over 3 stages (the 32-row
      sweep's; at 64 rows a pipelined dot of block_n 32 was nearer, the table holds it for the H100).
    - split_k: doubled (up to 8) until the grid has 16 warps per SM, keeping two iterations a split and the
      float32 partials (written and read once) under 1/8 of the packed weight's bytes.
    """
    if mma and rows <= 8:
        block_k = 128 if in_features % 128 == 0 else 64
        block_m, block_n, warps, stages, mode, prefetch = 8, 16, 1, 1, "mma", True
    elif rows == 1:
        block_m, block_n, block_k, warps, stages, mode, prefetch = 1, 8, 256, 1, 1, "gemv", True
    elif rows <= 16:
        block_m, block_n, block_k, warps, stages, mode, prefetch = 16, 32, 128, 4, 1, "dot", True
    else:
        block_m = min(64, row_bucket(rows))
        block_n, block_k, warps, stages, mode, prefetch = 64, 64, 4, 3, "dot_swap", False
    programs = triton.cdiv(out_features, block_n) * triton.cdiv(rows, block_m)
    split = 1
    while (programs * split * warps < WARPS_PER_MULTIPROCESSOR * multiprocessors and split < MAX_DEFAULT_SPLIT_K
           and in_features // (block_k * split * 2) >= 2
           # float32 partials, written and read, per output: at most 1/8 of its row's packed bytes
           and (2 * split) * rows * 4 * 2 <= in_features // 2 // 8):
        split *= 2
    return TileConfig(block_m, block_n, block_k, warps, stages, split, mode, prefetch, shared_table=True)


def tile_config(rows: int, out_features: int, in_features: int, device: torch.device,
                lora: bool = False) -> TileConfig:
    """The tile for ``rows`` x ``out_features`` outputs over ``in_features`` (``lora``: a launch with LoRA): the
    swept best for this device, shape and row bucket where bench/profile_nf4_kernel.py --sweep measured one (the
    one timed as the launch runs, with or without LoRA, else the other), else :func:`_default_tile`.
    """
    if interpreting():
        # The portable defaults: the MMA mode's emulation is several times slower, and its own tests ask for it
        return _default_tile(rows, out_features, in_features, 1)
    path = os.environ.get("MEDQA_NF4_TILES") or str(TUNED_TILES)
    table = _tuned(_device_name(device), path)
    key = (row_bucket(rows), out_features, in_features)
    tuned = table.get((*key, lora)) or table.get((*key, not lora))
    if tuned:
        return tuned
    return _default_tile(rows, out_features, in_features, _multiprocessors(device), mma=has_mma(device))


def portable_tile(rows: int, out_features: int, in_features: int, device: torch.device) -> TileConfig:
    """The default tile of the modes other than ``mma`` (which runs on every device), for a launch the ``mma``
    mode cannot take."""
    return _default_tile(rows, out_features, in_features, _multiprocessors(device), mma=False)


@functools.cache
def has_mma(device: torch.device) -> bool:
    """An NVIDIA GPU with bf16 MMAs (sm_80 on), where the ``mma`` mode runs."""
    return (device.type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (8, 0))


def mma_parts(cfg: TileConfig, blocksize: int) -> int:
    """The quantization blocks a lane's words of a row span in one iteration of an MMA tile (the kernel's PARTS):
    2 where a block-scale tile reads two blocks an iteration (a lane's words half in each), else 1."""
    return cfg.block_k // blocksize if cfg.block_scale and cfg.block_k > blocksize else 1


def pdl_fits(cfg: TileConfig) -> bool:
    """Whether a tile launches as a programmatic dependent where the device can (common.programmatic_launch): the
    MMA tiles of decode (1 to 64 rows; v18's of 16 to 64 timed with it on an H100, session 52), whose first weights
    load before the wait, with the shuffle lookup.

    Not the dot tiles (16 rows and more), which wait before their first load, so gain no more than an earlier
    launch, and were not measured with it (session 47 timed batches 1 and 8). Not the
    byte-permute lookups: their 16 levels held through the loop left the split lookup 8 bytes of spills with the
    first weights loaded ahead of the wait (Triton 3.9, sm_90a; no table holds them)."""
    return cfg.kernel_mode == "mma" and cfg.lookup == "shfl"
