"""The NF4 kernel's compiled form on sm_90a (bench/inspect_nf4_kernel.py, no GPU needed): the two properties v4's
speed rests on, so a change that loses them fails here before a GPU call measures it (docs/decode.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


# The tests' TRITON_INTERPRET=1 makes @triton.jit functions interpreted ones, which cannot be compiled: the tests'
# code runs in a process without it. One for the module, fed each piece of code on stdin, instead of one a piece (each
# imported torch and Triton again: about 2 s of a 2-core CI machine, 17 times).
DONE = "medqa-compiled:"  # ends each piece's output, with its traceback ("" when it raised nothing)
SERVE = f"""
import json, sys, traceback
for line in sys.stdin:
    try:
        exec(json.loads(line), {{}})
        error = ""
    except BaseException:
        error = traceback.format_exc()
    print({DONE!r} + json.dumps(error), flush=True)
"""


@pytest.fixture(scope="module")
def compiling(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], str]]:
    """``compiling(code)``: the stdout of ``code`` run where Triton compiles; the code must raise nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    stderr = tmp_path_factory.mktemp("compiling") / "stderr.txt"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-c", SERVE], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)

    def run(code: str) -> str:
        hang_guard = threading.Timer(300, proc.kill)
        hang_guard.start()
        try:
            proc.stdin.write(json.dumps(code) + "\n")
            proc.stdin.flush()
            lines = []
            while not (line := proc.stdout.readline()).startswith(DONE):
                assert line, f"the compiling process died (exit {proc.wait()}):\n{stderr.read_text()[-2000:]}"
                lines.append(line)
        finally:
            hang_guard.cancel()
        error = json.loads(line[len(DONE):])
        assert not error, error[-2000:]
        return "".join(lines)

    yield run
    proc.stdin.close()
    proc.wait(timeout=60)


def _inspect(compiling: Callable[[str], str], *tile) -> dict:
    """bench/inspect_nf4_kernel.inspect of TileConfig(*tile) for sm_90a."""
    code = ("import dataclasses, json, sys; sys.path.insert(0, 'bench'); from inspect_nf4_kernel import inspect; "
            "from medqa_core.engine.kernels.nf4_tiles import TileConfig; "
            f"c = inspect(TileConfig(*{tile!r}), 'sm_90a'); print(json.dumps(dataclasses.asdict(c)))")
    return json.loads(compiling(code).strip().splitlines()[-1])


COMPILE_TILE = ("import sys; sys.path.insert(0, 'bench'); from inspect_nf4_kernel import compile_tile; "
                "from medqa_core.engine.kernels.nf4_tiles import TileConfig; ")


@pytest.mark.parametrize("tile", [(16, 64, 128, 8, 3, 1, "dot_swap", True), (32, 32, 128, 4, 3, 2, "dot", False)],
                         ids=str)
def test_the_dot_loop_is_not_pipelined_through_shared_memory(compiling, tile):
    # num_stages 3 asked for: the loop still has no cp.async (Triton's pipeliner would route the code-table
    # lookups through shared memory, one 4-byte gather a weight).
    assert _inspect(compiling, *tile)["loop_async_copies"] == 0


def test_the_gemv_keeps_its_weights_in_their_load_layout(compiling):
    counts = _inspect(compiling, 1, 8, 512, 4, 2, 1, "fma", False)
    # Only x (two [G, HB] halves) changes layout in the loop; v3 moved the weights: 55 shared accesses, 83 shuffles
    # on this tile (results/traces/*_nf4-kernel-compiled-v3.json).
    assert counts["loop_convert_layouts"] <= 2 and counts["loop_async_copies"] == 0
    assert counts["shared_accesses"] < 20 and counts["shuffles"] < 16
    assert counts["spill_bytes"] in (0, None)


def test_the_gemv_loop_is_found_in_the_sass_and_counted_per_weight(compiling):
    counts = _inspect(compiling, 1, 8, 512, 4, 2, 1, "fma", False)
    if counts["loop_instructions"] is None:
        pytest.skip("Triton's bundled nvdisasm is not here")
    # One iteration: 8 x 512 weights over 128 threads, 32 a thread; at least a load, a lookup and an FMA for
    # each pair of weights, and nothing like the whole kernel (the loop is the longest backward branch).
    assert 32 * 1.5 < counts["loop_instructions"] < 32 * 40
    assert counts["instructions_per_weight"] == round(counts["loop_instructions"] / 32, 2)


def test_the_shared_code_table_takes_fewer_instructions_a_weight(compiling):
    """v5's lookup: tl.gather from the code table staged in shared memory instead of a global load a weight, which
    drops each lookup's 64-bit address arithmetic (docs/decode.md)."""
    table_in_global = _inspect(compiling, 1, 16, 512, 4, 2, 1, "fma", False, False)
    table_in_shared = _inspect(compiling, 1, 16, 512, 4, 2, 1, "fma", False, True)
    if table_in_global["instructions_per_weight"] is None:
        pytest.skip("Triton's bundled nvdisasm is not here")
    assert table_in_shared["instructions_per_weight"] < 0.9 * table_in_global["instructions_per_weight"]
    assert table_in_shared["spill_bytes"] in (0, None)


@pytest.mark.parametrize("tile", [(8, 16, 128, 1, 1, 8, "mma", True), (8, 128, 128, 4, 1, 4, "mma", True),
                                  (8, 32, 64, 1, 1, 2, "mma", False)], ids=str)
def test_every_mma_runs_where_its_operands_lanes_are(compiling, tile):
    # The MMA mode's fragments are per hardware lane: each mma.sync must run in a layout with element i in lane i
    # (v9's first build loaded x as [words, lanes, 4], which Triton 3.6 laid out with lanes over the words; every
    # GPU test failed while the interpreter passed)
    assert _inspect(compiling, *tile)["mma_lanes_in_order"] is True


def test_three_sibling_segments_compile_for_both_vendors(compiling):
    # v10's launch of q/k/v (SEGMENTS 3: pointers picked per program) compiles for NVIDIA's sm_90a in the mma mode
    # and for AMD's gfx942 in the portable gemv mode (ROCm's path; it has not run on an AMD GPU).
    out = compiling(COMPILE_TILE
                     + "mma = compile_tile(TileConfig(8, 64, 128, 2, 1, 4, 'mma', True), 'sm_90a', segments=3); "
                     "gemv = compile_tile(TileConfig(1, 8, 256, 1, 1, 8, 'gemv', True), 'gfx942', segments=3); "
                     "print('mma.sync' in mma.asm['ptx'], len(gemv.asm['amdgcn']) > 0)")
    assert out.split() == ["True", "True"]


@pytest.mark.parametrize(("target", "blocksize"), [("gfx90a", 128), ("gfx942", 64)])
def test_what_rocm_decodes_with_compiles_for_mi250_and_mi300x_without_spills(compiling, target, blocksize):
    # ROCm's decode path (never run on an AMD GPU here): our NF4 kernel's portable tiles at 1, 8 and 64 rows with
    # LoRA (gemv, dot, dot_swap: the mma mode is NVIDIA's) and the decode attention at the 7B's 4 query heads a KV
    # head, compiled for 64-wide wavefronts, none spilling to scratch (AMD's code says its registers and scratch);
    # the MI250 at 4-bit blocks of 128 (bitsandbytes' default on CDNA until its PR #1873), the MI300X at 64
    code = "\n".join([
        COMPILE_TILE + "import triton",
        "from inspect_nf4_kernel import MULTIPROCESSORS, amdgcn_registers",
        "from medqa_core.engine.kernels.nf4_tiles import _default_tile",
        "from medqa_core.engine.kernels.decode_attention import BLOCK_L, _decode_attention_kernel as k",
        "from triton.compiler import ASTSource",
        "from triton.backends.compiler import GPUTarget",
        "for rows in (1, 8, 64):",
        f"    tile = _default_tile(rows, 6144, 4096, MULTIPROCESSORS[{target!r}])",
        f"    amdgcn = compile_tile(tile, {target!r}, {blocksize}, segments=3, rank=16, rows=rows).asm['amdgcn']",
        "    print(tile.kernel_mode, *amdgcn_registers(amdgcn))",
        "consts = dict(GROUP=4, HEAD_DIM=128, BLOCK=BLOCK_L, SPLITS=8, MASK=1, PDL=False, EMULATE=False)",
        "kinds = dict(q_ptr='*bf16', k_ptr='*bf16', v_ptr='*bf16', mask_ptr='*u8', out_ptr='*bf16',",
        "             partial_ptr='*fp32', stats_ptr='*fp32', counter_ptr='*i32', scale_log2='fp32')",
        "names = list(k.arg_names)",
        "sig = {n: 'constexpr' if n in consts else kinds.get(n, 'i32') for n in names}",
        "src = ASTSource(k, sig, {(names.index(c),): v for c, v in consts.items()})",
        f"attention = triton.compile(src, target=GPUTarget('hip', {target!r}, 64), options=dict(num_warps=4))",
        "print('attention', *amdgcn_registers(attention.asm['amdgcn']))"])
    lines = [line.split() for line in compiling(code).strip().splitlines()[-4:]]
    assert [line[0] for line in lines] == ["gemv", "dot", "dot_swap", "attention"]
    for kernel, registers, scratch in lines:
        assert 0 < int(registers) <= 512 and int(scratch) == 0, (kernel, registers, scratch)


def test_byte_permute_lookups_take_the_shuffles_off_the_loop(compiling):
    # v11 ("split"): rows g + 8 by byte permutes, so the shuffles (one a weight before; v10's top stall on an H200
    # was the MIO unit that runs them) halve; v12 ("prmt"): every row, none left. More ALU instructions a weight.
    shfl, split, prmt = (_inspect(compiling, 8, 64, 128, 4, 1, 4, "mma", True, False, lookup)
                         for lookup in ("shfl", "split", "prmt"))
    assert split["shuffles"] * 2 == shfl["shuffles"] and prmt["shuffles"] == 0
    assert all(c["spill_bytes"] in (0, None) and c["mma_lanes_in_order"] is True for c in (split, prmt))


@pytest.mark.parametrize(("text", "why"), [("1:8,16,128,1,1,8,mma,split,prmt", "split and prmt are two lookups"),
                                           ("1:8,16,128,1,1,8,mma,fast", "unknown flag(s) ['fast']")])
def test_a_tile_argument_that_names_no_one_tile_is_refused_with_why(text, why):
    import argparse

    sys.path.insert(0, str(ROOT / "bench"))
    from inspect_nf4_kernel import _tile_arg

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(why)):
        _tile_arg(text)


def test_the_loop_counted_is_the_k_loop_to_its_own_end_past_a_branch_inside_it():
    # v13 reloads its group scales under an scf.if inside the K loop: the if's yield is not the loop's end. With
    # LoRA, the launch's first loop is its down-projection's, shorter than the K loop.
    sys.path.insert(0, str(ROOT / "bench"))
    from inspect_nf4_kernel import _k_loop

    ttgir = "\n".join(["  scf.for %j = %c0 to %r {", "    %l = ttg.convert_layout %w", "    scf.yield %l", "  }",
                       "  %a = ttg.convert_layout %x", "  scf.for %i = %c0 to %n {",
                       "    %b = scf.if %p -> (tensor) {", "      scf.yield %y", "    } else {", "      scf.yield %z",
                       "    }", "    %c = ttg.convert_layout %b", "    scf.yield %c", "  }",
                       "  %d = ttg.convert_layout %c"])
    loop = _k_loop(ttgir)
    assert loop.startswith("  scf.for %i") and loop.count("ttg.convert_layout") == 1
    assert loop.rstrip().endswith("scf.yield %c")
    assert _k_loop("no loop here") == ""


def test_the_group_scales_are_carried_through_the_loop_as_four_values(compiling):
    # v13 with prefetch carries this group's scales of rows g and g + 8 and the next group's through the K loop.
    # Bound to one tensor before the loop, Triton's compiler carried them as two values (the interpreter, as four):
    # every group but a program's first took the next group's scales, wrong on the H100 (session 43).
    loop = compiling(COMPILE_TILE + "c = compile_tile(TileConfig(8, 16, 128, 1, 1, 8, 'mma', prefetch=True, "
                      "scales_ahead=True), 'sm_90a'); "
                      "print(next(line for line in c.asm['ttir'].splitlines() if 'scf.for' in line))")
    assert loop.count("tensor<32xf32>") == 8  # its result types: 4 accumulators and 4 group scales (was 6)


@pytest.mark.parametrize("rank", [0, 16])
def test_under_pdl_a_program_loads_weights_before_its_wait_and_writes_nothing_before_it(compiling, rank):
    # v17, programmatic dependent launch (Hopper): a program may start while the kernel before it still runs, so
    # before its griddepcontrol.wait it may only read what no kernel writes (the weights and their scales: loaded
    # there, the point of it) and may write nothing (an output may reuse memory that kernel still reads). The
    # PTX of an MMA tile with LoRA of two siblings has two waits (the LoRA programs' and the tiles'); every store
    # and atomic comes after the first, and the trigger for the next kernel after the last.
    ptx = compiling(COMPILE_TILE + "c = compile_tile(TileConfig(8, 64, 128, 2, 1, 4, 'mma', prefetch=True, "
                     f"block_scale=True, scales_ahead=True), 'sm_90a', segments=2, rank={rank}); "
                     "print(c.asm['ptx'])").splitlines()
    waits = [i for i, line in enumerate(ptx) if "griddepcontrol.wait" in line]
    trigger = [i for i, line in enumerate(ptx) if "griddepcontrol.launch_dependents" in line]
    assert len(waits) == (2 if rank else 1) and len(trigger) == 1 and trigger[0] > waits[-1]
    writes = [i for i, line in enumerate(ptx) if re.search(r"\b(st\.global|atom\.|red\.)", line)]
    assert writes and min(writes) > waits[0]
    if not rank:  # the tile's first words and its group's scales (two rows, three loads each) before its wait
        assert sum("ld.global" in line for line in ptx[:waits[0]]) >= 8


def test_the_dot_tiles_and_the_permute_lookups_do_not_launch_as_dependents(compiling):
    # PDL only where it was measured (decode's MMA tiles with the shuffle lookup, batch 1 and 8): a dot tile of
    # 64 rows (decode at batch 64) and an MMA tile of byte-permute lookups compile without griddepcontrol.
    out = compiling(COMPILE_TILE + "dot = compile_tile(TileConfig(64, 64, 64, 4, 3, 1, 'dot_swap', "
                     "shared_table=True), 'sm_90a', rows=64); "
                     "prmt = compile_tile(TileConfig(8, 64, 128, 4, 1, 4, 'mma', prefetch=True, lookup='split'), "
                     "'sm_90a'); mma = compile_tile(TileConfig(8, 64, 128, 4, 1, 4, 'mma', prefetch=True), 'sm_90a'); "
                     "print(*('griddepcontrol' in c.asm['ptx'] for c in (dot, prmt, mma)))")
    assert out.split() == ["False", "False", "True"]


def test_a_register_cap_holds_the_compiled_kernel_under_it(compiling):
    # v19: the one-row gate+up tile with LoRA takes 128 registers (2 warps: 8 programs an SM); capped at 80 it
    # fits 12, and ptxas spills what does not fit. The tile argument names the cap (maxnregN).
    code = ("import dataclasses, json, sys; sys.path.insert(0, 'bench'); "
            "from inspect_nf4_kernel import inspect, _tile_arg; "
            "rows, tile, rank = _tile_arg('1:8,64,128,2,1,4,mma,prefetch,scaled,ahead,lora,maxnreg80'); "
            "capped = inspect(tile, 'sm_90a', rank=rank, rows=rows); "
            "free = inspect(dataclasses.replace(tile, max_registers=None), 'sm_90a', rank=rank, rows=rows); "
            "print(json.dumps([capped.registers, free.registers, capped.spill_bytes]))")
    capped, free, spills = json.loads(compiling(code).strip().splitlines()[-1])
    if capped is None:
        pytest.skip("Triton's bundled ptxas cannot run here")
    assert capped <= 80 < free and spills > 0


def test_scales_decoded_at_load_compile_for_the_mma_tiles_with_a_shorter_loop(compiling):
    # v20 (MEDQA_NF4_SCALES=float32): the MMA mode reads float32 block scales through the single-level path (the
    # mode has no CPU run: this compile is its check off a GPU), and its K loop loses the two-level lookup.
    code = ("import json, sys; sys.path.insert(0, 'bench'); from inspect_nf4_kernel import inspect, _tile_arg; "
            "rows, tile, rank = _tile_arg('1:8,64,128,2,1,4,mma,prefetch,scaled,ahead,lora'); "
            "counts = [inspect(tile, 'sm_90a', rank, rows, double_quant=dq) for dq in (True, False)]; "
            "print(json.dumps([[c.loop_instructions, c.spill_bytes] for c in counts]))")
    (nested, nested_spills), (decoded, decoded_spills) = json.loads(compiling(code).strip().splitlines()[-1])
    if nested is None:
        pytest.skip("Triton's bundled nvdisasm cannot run here")
    assert decoded < nested and decoded_spills in (0, None)
