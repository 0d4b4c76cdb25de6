"""What the compiler made of our NF4 kernel, without a GPU: per tile, the counts that explained its speed.

Compiles ``_nf4_matmul_kernel`` (medqa_core/engine/kernels/nf4_matmul.py) ahead of time for a GPU target with
Triton's own compiler, as a launch on a Mistral-7B layer would specialize it (pointers and the strides of
whole quantization blocks divisible by 16), and reads its intermediate code:

- in the K loop: ``convert_layout`` ops (a tensor moved between register layouts, through shared memory unless
  the layouts match) and ``cp.async`` copies (Triton's software pipeliner; for the code-table lookups a
  4-byte gather into shared memory per weight, what made v3's dot tiles slow);
- in the PTX (NVIDIA): shared-memory loads and stores, warp shuffles, barriers, global load widths;
- from ptxas (NVIDIA): registers and spill bytes; from the AMD GPU code's own metadata (AMD): vector registers
  (VGPRs, AGPRs included) and scratch bytes, its spills; shared memory per program (every target);
- in the SASS (NVIDIA, Triton's bundled nvdisasm): the instructions of the K loop, and per weight (the loop's
  instructions over the weights one thread handles an iteration): a warp issues one instruction a cycle per
  scheduler, so this bounds the weights a second an SM can decode, whatever the memory system delivers.

    python bench/inspect_nf4_kernel.py [--target sm_90a|gfx90a|gfx942] [--rows 1,8,32] [--grid] [--lora] [--out FILE]
    python bench/inspect_nf4_kernel.py --tile ROWS:M,N,K,WARPS,STAGES,SPLIT,MODE[,FLAG...] ...  (FLAGS below)

Without ``--grid``: the default tile of each row count (``_default_tile``); with it, every tile the sweep of
bench/profile_nf4_kernel.py times; ``--tile`` (repeatable) names tiles instead, so two kernel versions can be
compared tile for tile. ``--out`` also saves the rows with the machine's fingerprint (the kernel's git
commit and Triton's version among them) as results/traces/*_nf4-kernel-compiled-*.json, which docs/decode.md's
table of compiled counts is generated from. A count is a lead, not a time: the sweep on a GPU decides.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_nf4_kernel import MISTRAL_7B_LAYERS, _sweep_grid  # noqa: E402

from medqa_core.engine.kernels.nf4_matmul import _lora_constexprs, _nf4_matmul_kernel  # noqa: E402
from medqa_core.engine.kernels.nf4_mma import UNROLL  # noqa: E402
from medqa_core.engine.kernels.nf4_tiles import LOOKUPS, TileConfig, _default_tile, pdl_fits  # noqa: E402

# H100/H200; AMD's MI250 (CDNA2, the card of the claim the suite checks) and MI300X (CDNA3), 64-wide wavefronts
TARGETS = {"sm_90a": GPUTarget("cuda", 90, 32), "gfx90a": GPUTarget("hip", "gfx90a", 64),
           "gfx942": GPUTarget("hip", "gfx942", 64)}
# SMs / CUs of one device of each (an H100 SXM; an MI250 shows each of its two dies as a device): the default tile's
# K split fills them
MULTIPROCESSORS = {"sm_90a": 132, "gfx90a": 104, "gfx942": 304}
POINTERS = dict(x_ptr="*bf16", q_ptr="*u8", absmax_ptr="*u8", code_ptr="*fp32", absmax2_ptr="*fp32",
                code2_ptr="*fp32", offset_ptr="*fp32",
                **{f"{name}_s{s}_ptr": kind for s in (1, 2)
                   for name, kind in (("q", "*u8"), ("absmax", "*u8"), ("absmax2", "*fp32"), ("offset", "*fp32"))},
                bias_ptr="*bf16", a_ptr="*bf16", t_ptr="*fp32",
                b_ptr="*bf16", out_ptr="*bf16", partial_ptr="*fp32", counter_ptr="*i32", lora_counter_ptr="*i32")
INTS = ("M", "N0", "N1", "N2", "K", "stride_xm", "stride_qn", "stride_am", "stride_tm", "stride_bn", "stride_om",
        "blocks_per_row", "iterations", "lora_chunk")
MULTIPLES_OF_16 = ("N0", "K", "stride_xm", "stride_qn", "stride_bn", "stride_om", "blocks_per_row")  # at 4096+


@dataclasses.dataclass(frozen=True)
class KernelCounts:
    """One compiled tile: where its time could go (``None``: not reported for this target)."""

    tile: TileConfig
    shared_bytes: int
    loop_convert_layouts: int
    loop_async_copies: int
    shared_accesses: int | None
    shuffles: int | None
    barriers: int | None
    registers: int | None
    spill_bytes: int | None
    loop_instructions: int | None = None  # SASS instructions of the K loop (its longest backward branch)
    instructions_per_weight: float | None = None  # loop_instructions / weights a thread handles an iteration
    mma_lanes_in_order: bool | None = None  # mode mma: every mma.sync runs where element i is lane i (None: no MMA)


def mma_lanes_in_order(ttgir: str) -> bool | None:
    """Whether every ``mma.sync`` of the MMA mode runs in a layout that puts element i of its [lanes] operands in
    thread i (lane i % 32 of warp i // 32), or None where the kernel has none.

    The mode's fragments are per hardware lane (from ``%laneid``): in another layout the MMA would gather its
    operands from other lanes than the ones that computed them. Triton picks layouts per tensor: a [WL, lanes, 4]
    x load was laid with lanes over the words by Triton 3.6 (threadsPerWarp [4, 8, 1]), not by 3.9, and the MMA
    ran in that layout's slice; every GPU test of v9's first build failed. So the layout is checked here, where
    any Triton compiles it, before a GPU runs it.
    """
    blocked = dict(re.findall(r"^(#\w+) = (#ttg\.blocked<\{.*\}>)", ttgir, re.M))
    layouts = set()
    for line in ttgir.splitlines():
        if "elementwise_inline_asm" in line and "mma.sync" in line:
            layouts.update(re.findall(r"tensor<\d+xf32, (#[^>]*>?)>", line.split("->")[-1]))
    if not layouts:
        return None
    for layout in layouts:
        found = re.fullmatch(r"#ttg\.slice<\{dim = 1, parent = (#\w+)\}>", layout) or re.fullmatch(r"(#\w+)", layout)
        parent = blocked.get(found.group(1), "") if found else ""
        lanes = "threadsPerWarp = [32, 1]" if layout.startswith("#ttg.slice") else "threadsPerWarp = [32]"
        if lanes not in parent or not re.search(r"sizePerThread = \[1[,\]]", parent):
            return False
    return True


def compile_tile(tile: TileConfig, target: str, blocksize: int = 64, segments: int = 1, rank: int = 0,
                 rows: int = 1, double_quant: bool = True, tiled: bool = False):
    """The compiled kernel of ``tile`` for ``target``: double quantization on (off: the scales decoded at load,
    v20's float32 blocks), bf16, no bias, ``segments`` sibling weights, LoRA of ``rank`` (0: none) as nf4_matmul
    launches it over K = 4096 at ``rows`` rows, reading tiled copies of the weights (``tiled``, v22; the MMA mode
    only) or bitsandbytes' order."""
    names = list(_nf4_matmul_kernel.arg_names)
    constants = dict(SEGMENTS=segments, BLOCKSIZE=blocksize, BLOCKSIZE2=256, DOUBLE_QUANT=double_quant, ALIGNED=True,
                     HAS_BIAS=False, **_lora_constexprs(rank, 4096, rows, tile.block_m, tile.num_warps),
                     BLOCK_M=tile.block_m,
                     BLOCK_N=tile.block_n,
                     BLOCK_K=tile.block_k if tile.kernel_mode == "mma" else max(tile.block_k, blocksize),
                     DOT=tile.kernel_mode in ("dot", "dot_swap"), SWAP=tile.kernel_mode == "dot_swap",
                     PREFETCH=tile.prefetch, SHARED_TABLE=tile.shared_table,
                     SPLIT_K=tile.split_k, NUM_STAGES=tile.num_stages, GEMV=tile.kernel_mode == "gemv",
                     MMA=tile.kernel_mode == "mma", PRMT_ROWS=LOOKUPS.index(tile.lookup), BLOCK_SCALE=tile.block_scale,
                     SCALES_AHEAD=tile.kernel_mode == "mma" and tile.scales_ahead,
                     ROUND_ASM=TARGETS[target].backend == "cuda", NUM_WARPS=tile.num_warps,
                     PDL=target == "sm_90a" and pdl_fits(tile), EMULATE=False,  # as launched on Hopper
                     TILED=tiled and tile.kernel_mode == "mma")
    scalings = dict.fromkeys(("scaling0", "scaling1", "scaling2"), "fp32")
    pointers = POINTERS if double_quant else {  # the decoded scales: float32 a block
        name: "*fp32" if name.startswith("absmax_") else kind for name, kind in POINTERS.items()}
    signature = {**pointers, **dict.fromkeys(INTS, "i32"), **scalings, **dict.fromkeys(constants, "constexpr")}
    source = ASTSource(_nf4_matmul_kernel, {n: signature[n] for n in names},
                       {(names.index(c),): v for c, v in constants.items()},
                       {(names.index(a),): [["tt.divisibility", 16]] for a in (*POINTERS, *MULTIPLES_OF_16)})
    cap = {"maxnreg": tile.max_registers} if tile.max_registers and TARGETS[target].backend == "cuda" else {}
    return triton.compile(source, target=TARGETS[target],
                          options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages, **cap))


def _ptxas(ptx: str) -> tuple[int | None, int | None]:
    """Registers and spill-store bytes from Triton's bundled ptxas (None where it cannot run here)."""
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    ptxas = next((p for p in (bin_dir / "ptxas-blackwell", bin_dir / "ptxas") if p.is_file()), None)
    if ptxas is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        done = subprocess.run([str(ptxas), "--gpu-name", "sm_90a", "-v", f"{tmp}/k.ptx", "-o", f"{tmp}/k.o"],
                              capture_output=True, text=True)
    registers = re.search(r"Used (\d+) registers", done.stderr)
    spills = re.search(r"(\d+) bytes spill stores", done.stderr)
    return (int(registers.group(1)) if registers else None), (int(spills.group(1)) if spills else None)


def amdgcn_registers(amdgcn: str) -> tuple[int | None, int | None]:
    """Vector registers a lane (VGPRs and AGPRs) and scratch bytes (spills) from AMD GPU code's own comments
    (``; TotalNumVgprs: N``, ``; ScratchSize: N``); None where the compiler wrote none."""
    registers = re.search(r"; TotalNumVgprs: (\d+)", amdgcn)
    scratch = re.search(r"; ScratchSize: (\d+)", amdgcn)
    return (int(registers.group(1)) if registers else None), (int(scratch.group(1)) if scratch else None)


def _sass_loop_instructions(cubin: bytes) -> int | None:
    """Instructions in the longest loop of ``cubin``'s SASS (a label and the last branch back to it), from
    Triton's bundled nvdisasm; None where it cannot run here."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    if not nvdisasm.is_file():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cubin").write_bytes(cubin)
        sass = subprocess.run([str(nvdisasm), "-c", f"{tmp}/k.cubin"], capture_output=True, text=True).stdout
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `?\(?(\.L_x_\d+)", line)) and labels.get(m.group(1), i) < i]
    if not loops:
        return None
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return sum(1 for line in lines[start:end + 1] if re.match(r"^\s+/\*[0-9a-f]+\*/", line))


def _k_loop(ttgir: str) -> str:
    """The body of the longest ``scf.for`` in ``ttgir``, the K loop: its lines up to the brace that closes it at its
    own indent (an ``scf.if`` inside yields before the loop's end; v13's group scales). The longest, not the first:
    with LoRA the launch's first loop is its down-projection's."""
    lines = ttgir.splitlines()
    loops = []
    for i, line in enumerate(lines):
        if "scf.for" in line:
            indent = len(line) - len(line.lstrip())
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("}")
                        and len(lines[j]) - len(lines[j].lstrip()) == indent), len(lines))
            loops.append(lines[i:end])
    return "\n".join(max(loops, key=len)) if loops else ""


def inspect(tile: TileConfig, target: str, rank: int = 0, rows: int = 1, double_quant: bool = True,
            tiled: bool = False) -> KernelCounts:
    compiled = compile_tile(tile, target, rank=rank, rows=rows, double_quant=double_quant, tiled=tiled)
    ttgir = compiled.asm["ttgir"]
    loop = _k_loop(ttgir)
    ptx = compiled.asm.get("ptx", "")
    registers, spills = _ptxas(ptx) if ptx else amdgcn_registers(compiled.asm.get("amdgcn", ""))
    sass_loop = _sass_loop_instructions(compiled.asm["cubin"]) if "cubin" in compiled.asm else None
    weights_per_thread = tile.block_n * max(tile.block_k, 64) / (tile.num_warps * 32)  # a K-loop iteration
    if tile.kernel_mode == "mma":  # (v12: its compiled loop makes UNROLL iterations a pass)
        weights_per_thread = tile.block_n * tile.block_k / (tile.num_warps * 32) * UNROLL.value
    return KernelCounts(
        tile=tile, shared_bytes=compiled.metadata.shared, loop_convert_layouts=loop.count("ttg.convert_layout"),
        loop_async_copies=loop.count("async_copy_global_to_local"),
        shared_accesses=len(re.findall(r"\b(?:ld|st)\.shared", ptx)) if ptx else None,
        shuffles=ptx.count("shfl.sync") if ptx else None, barriers=ptx.count("bar.sync") if ptx else None,
        registers=registers, spill_bytes=spills, loop_instructions=sass_loop,
        instructions_per_weight=None if sass_loop is None else round(sass_loop / weights_per_thread, 2),
        mma_lanes_in_order=mma_lanes_in_order(ttgir))


# split/prmt: TileConfig.lookup; scaled: block_scale; ahead: scales_ahead; lora: a LoRA of the presets' rank in the
# launch (its programs and epilogue share the kernel's registers); maxnregN: max_registers N (v19)
FLAGS = ("prefetch", "shared", "split", "prmt", "scaled", "ahead", "lora", "maxnregN")
LORA_RANK = 16


def _tile_arg(text: str) -> tuple[int, TileConfig, int]:
    """``ROWS:M,N,K,WARPS,STAGES,SPLIT,MODE[,FLAG...]`` as (rows, TileConfig, LoRA rank), FLAGs from
    :data:`FLAGS`; argparse names a bad one."""
    try:
        rows, fields = text.split(":")
        *numbers, mode = fields.split(",")[:7]
        flags = fields.split(",")[7:]
        caps = [int(f[len("maxnreg"):]) for f in flags if re.fullmatch(r"maxnreg\d+", f)]
        flags = [f for f in flags if not re.fullmatch(r"maxnreg\d+", f)]
        if set(flags) - set(FLAGS):
            raise ValueError(f"unknown flag(s) {sorted(set(flags) - set(FLAGS))}")
        if {"split", "prmt"} <= set(flags):
            raise ValueError("split and prmt are two lookups: name one")
        lookup = "split" if "split" in flags else "prmt" if "prmt" in flags else "shfl"
        tile = TileConfig(*(int(v) for v in numbers), mode, prefetch="prefetch" in flags,
                          shared_table="shared" in flags, lookup=lookup, block_scale="scaled" in flags,
                          scales_ahead="ahead" in flags, max_registers=caps[-1] if caps else None)
        return int(rows), tile, LORA_RANK if "lora" in flags else 0
    except (ValueError, TypeError) as e:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ROWS:M,N,K,WARPS,STAGES,SPLIT,MODE[,FLAG...] with FLAGs of {FLAGS} ({e})") from e


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", choices=sorted(TARGETS), default="sm_90a")
    parser.add_argument("--rows", default="1,8,32", help="comma-separated row counts (default: %(default)s)")
    parser.add_argument("--grid", action="store_true", help="every tile the sweep times, not only the default")
    parser.add_argument("--lora", action="store_true",
                        help=f"the default or grid tiles with a LoRA of rank {LORA_RANK} in the launch, as a "
                             "fine-tuned model decodes (its programs and epilogue share the kernel's registers)")
    parser.add_argument("--tile", action="append", type=_tile_arg, metavar="ROWS:M,N,K,WARPS,STAGES,SPLIT,MODE",
                        help="a tile to inspect, e.g. 1:1,8,512,4,2,1,fma or 16:16,64,128,8,3,1,dot_swap,prefetch")
    parser.add_argument("--scales", choices=("nested", "float32"), default="nested",
                        help="the weights' block scales: bitsandbytes' double-quantized codes (default) or float32 "
                             "blocks decoded at load (v20, MEDQA_NF4_SCALES)")
    parser.add_argument("--layout", choices=("bitsandbytes", "tiled"), default="bitsandbytes",
                        help="where the MMA tiles read the weights: bitsandbytes' order (default) or copies in the "
                             "tile's order (v22, MEDQA_NF4_LAYOUT)")
    parser.add_argument("--out", type=Path, help="also save the rows as JSON (results/traces/...)")
    args = parser.parse_args(argv)
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    saved = []
    n, k = MISTRAL_7B_LAYERS["q_proj/o_proj"]
    print("| rows | tile | shared | loop converts | loop cp.async | shared ld/st | shuffles | barriers | registers "
          "| spills | SASS loop | per weight | MMA lanes |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    if args.tile:
        groups = [(rows, [(tile, rank)]) for rows, tile, rank in args.tile]
    else:
        mma = TARGETS[args.target].backend == "cuda"  # the default's MMA GEMV is NVIDIA's
        groups = [(rows, [(t, LORA_RANK if args.lora else 0) for t in (_sweep_grid(rows) if args.grid
                                           else [_default_tile(rows, n, k, MULTIPROCESSORS[args.target], mma=mma)])])
                  for rows in (int(r) for r in args.rows.split(","))]
    for rows, tiles in groups:
        for tile, rank in tiles:
            name = (f"{tile.kernel_mode} m{tile.block_m} n{tile.block_n} k{tile.block_k} w{tile.num_warps} "
                    f"s{tile.num_stages} split{tile.split_k}{' prefetch' if tile.prefetch else ''}"
                    f"{' shared-table' if tile.shared_table else ''}"
                    f"{'' if tile.lookup == 'shfl' else ' ' + tile.lookup + '-lookup'}"
                    f"{' block-scale' if tile.block_scale else ''}{' scales-ahead' if tile.scales_ahead else ''}"
                    f"{f' maxnreg{tile.max_registers}' if tile.max_registers else ''}{f' lora{rank}' if rank else ''}"
                    f"{' float32-scales' if args.scales == 'float32' else ''}"
                    f"{' tiled' if args.layout == 'tiled' and tile.kernel_mode == 'mma' else ''}")
            try:
                c = inspect(tile, args.target, rank, rows, double_quant=args.scales == "nested",
                            tiled=args.layout == "tiled")
            except Exception as e:  # a tile this target cannot compile: its row says why, the others still run
                print(f"| {rows} | {name} | does not compile for {args.target}: {type(e).__name__}: "
                      f"{str(e).strip().splitlines()[-1][:120] if str(e).strip() else ''} |", flush=True)
                continue
            print(f"| {rows} | {name} | {c.shared_bytes} | {c.loop_convert_layouts} | {c.loop_async_copies} | "
                  + " | ".join("-" if v is None else str(v) for v in (c.shared_accesses, c.shuffles, c.barriers,
                                                                       c.registers, c.spill_bytes, c.loop_instructions,
                                                                       c.instructions_per_weight))
                  + f" | {'-' if c.mma_lanes_in_order is None else 'in order' if c.mma_lanes_in_order else 'MOVED'} |",
                  flush=True)
            saved.append(dict(rows=rows, **dataclasses.asdict(c), tile_name=name))
    if args.out:
        from medqa_core.measure.fingerprint import machine_fingerprint
        from medqa_core.results.record import write_json_atomic

        write_json_atomic(args.out, dict(kind="nf4-kernel-compiled", started=started, target=args.target,
                                         triton_version=triton.__version__,
                                         fingerprint=machine_fingerprint(torch.device("cpu")), tiles=saved))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
