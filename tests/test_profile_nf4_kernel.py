"""bench/profile_nf4_kernel.py: a layer name it does not know is refused in one line, exit 2, before anything runs
(on a GPU machine too: the check comes first); a sweep at some row counts keeps the table's other tiles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_layer_is_named_with_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"), "--once",
                           "--layers", "gate_proj/up_proj,gate"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("--layers: unknown gate; choose among q_proj/o_proj, k_proj/v_proj, gate_proj/up_proj, down_proj, "
            "q+k+v_proj, gate+up_proj" in done.stderr)
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_mode_is_named_with_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"), "--sweep",
                           "--modes", "mma,wmma"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--modes: unknown wmma; choose among mma, gemv, fma, dot, dot_swap" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_an_unknown_weight_layout_is_named_with_the_choices(tmp_path):
    # the sweep reads the decoder's switch: a wrong value is one line, exit 2, before anything runs
    env = {**os.environ, "MEDQA_NF4_LAYOUT": "marlin"}
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"), "--sweep"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2
    assert "MEDQA_NF4_LAYOUT='marlin': choose one of bitsandbytes, tiled" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_sweeps_tiled_copies_are_each_tiles_own_order():
    # Under MEDQA_NF4_LAYOUT=tiled the sweep times each tile on copies in that tile's order: a weight and sibling
    # segments alike get copies a launch of that tile reads (bitsandbytes' copy zeroed, its bits stay), another
    # tile's order gives other bytes, and a tile of another mode reads bitsandbytes' order (no copy).
    import bitsandbytes as bnb
    import pytest
    import torch
    from bitsandbytes.functional import quantize_4bit

    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import _segments, _tiled

    from medqa_core.engine.kernels.nf4_matmul import nf4_matmul
    from medqa_core.engine.kernels.nf4_tiles import TileConfig
    from medqa_core.engine.kernels.nf4_weight import nf4_weight

    gen = torch.Generator().manual_seed(0)
    sizes, k = (32, 32), 512  # each segment whole groups of the double-quantized scales (256 blocks), as the 7B's
    w = (torch.randn(sum(sizes), k, generator=gen) * 0.02).bfloat16()
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    whole = nf4_weight(bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True))
    x = torch.randn(3, k, generator=gen).bfloat16()
    tile, other = TileConfig(8, 16, 128, 1, 1, 1, "mma"), TileConfig(8, 16, 64, 1, 1, 1, "mma")
    want = [nf4_matmul(x, whole, config=tile), nf4_matmul(x, _segments(whole, sizes), config=tile)]
    read = _tiled([whole, _segments(whole, sizes)], tile)
    assert read[0].tiled is not None and all(s.tiled is not None for s in read[1])
    assert not torch.equal(read[0].tiled.packed, _tiled([whole], other)[0].tiled.packed)
    for v in [read[0], *read[1]]:
        v.packed.zero_()  # the launches below can only have read the tiled copies
    assert torch.equal(nf4_matmul(x, read[0], config=tile), want[0])
    assert torch.equal(nf4_matmul(x, read[1], config=tile), want[1])
    fma = TileConfig(2, 16, 64, 1, 1, 1, "fma")
    assert _tiled([whole], fma)[0] is whole


def test_an_unknown_arm_is_named_with_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"),
                           "--arms", "ours+lora,marlin"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("--arms: unknown marlin; choose among ours, ours+lora, bitsandbytes, bitsandbytes+lora, bf16"
            in done.stderr)
    assert not (tmp_path / "x.json").exists()


def test_out_is_required_except_with_once(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--rows", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--out is required (only --once, which writes nothing, runs without it)" in done.stderr


def test_a_sweep_at_some_rows_keeps_the_tiles_of_the_others():
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import merge_tiles

    old = {"H100": [{"rows": 1, "n": 8, "k": 64, "config": "a"}, {"rows": 8, "n": 8, "k": 64, "config": "b"}],
           "H200": [{"rows": 1, "n": 8, "k": 64, "config": "c"}]}
    merged = merge_tiles(old, {"H100": [{"rows": 1, "n": 8, "k": 64, "config": "new"}]})
    assert merged["H100"] == [{"rows": 8, "n": 8, "k": 64, "config": "b"},
                              {"rows": 1, "n": 8, "k": 64, "config": "new"}]
    assert merged["H200"] == old["H200"]


def test_siblings_read_as_segments_are_the_weight_they_were_cut_from():
    # What the profile times for q+k+v_proj and gate+up_proj: one weight cut into sibling segments (views), each
    # segment's scales a whole number of double-quantization groups; one launch of the segments gives the whole
    # weight's outputs, bit for bit, with the same tile.
    import bitsandbytes as bnb
    import pytest
    import torch
    from bitsandbytes.functional import quantize_4bit

    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import _segments

    from medqa_core.engine.kernels.nf4_matmul import nf4_matmul
    from medqa_core.engine.kernels.nf4_tiles import TileConfig
    from medqa_core.engine.kernels.nf4_weight import nf4_weight

    device = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.randn(96, 1024, generator=torch.Generator().manual_seed(0)).bfloat16().to(device)
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    whole = nf4_weight(bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True))
    parts = _segments(whole, (64, 16, 16))
    assert [p.out_features for p in parts] == [64, 16, 16] and parts[2].absmax2.numel() == 1
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(1)).bfloat16().to(device)
    tile = TileConfig(1, 16, 256, 1, 1, 2, "gemv")
    assert torch.equal(nf4_matmul(x, parts, config=tile), nf4_matmul(x, whole, config=tile))


def test_compile_ahead_runs_each_tile_in_a_spawned_process_and_names_what_fails():
    # Spawned workers launch each tile once, so Triton's on-disk cache holds it before the sweep times it (on a GPU;
    # here the interpreter runs it): a tile that cannot run is one line, left to the sweep, not a failed pool.
    import torch

    from medqa_core.engine.kernels.nf4_compile import CompileJob, compile_ahead
    from medqa_core.engine.kernels.nf4_tiles import TileConfig

    # two siblings of 256 rows: each segment's 256 blocks a whole group of double-quantized scales, as on the 7B;
    # jobs of two shapes and row counts in one pool, as the sweep sends its whole grid
    jobs = [CompileJob(TileConfig(1, 16, 64, 1, 1, 1, "fma"), 1, (256, 256), 64),
            CompileJob(TileConfig(8, 16, 128, 1, 1, 1, "mma"), 1, (256, 256), 64),  # K 64 < block_k 128
            CompileJob(TileConfig(4, 16, 64, 1, 1, 2, "fma"), 3, (48,), 128, 4),  # with LoRA of rank 4
            CompileJob(TileConfig(8, 16, 64, 1, 1, 1, "mma"), 1, (24,), 128, tiled=True)]  # v22's tiled copies
    done = compile_ahead(jobs, torch.device("cpu"), workers=2)
    assert done[0] is None and done[2] is None and done[3] is None
    assert done[1].startswith("ValueError: nf4_matmul: mode 'mma' cannot run here: K 64 is not a multiple")


INTERRUPTED_COMPILE = """
import sys, threading, torch
from medqa_core.engine.kernels.nf4_compile import CompileJob, compile_ahead
from medqa_core.engine.kernels.nf4_tiles import TileConfig
jobs = [CompileJob(TileConfig(1, 16, 64, 1, 1, 1, "fma"), 1, (4096,), 4096)] * 3  # minutes under the interpreter
result, finished = {}, threading.Event()


def run():
    result["done"] = compile_ahead(jobs, torch.device("cpu"), 2)
    finished.set()


if __name__ == "__main__":  # not in the spawned workers
    try:
        if sys.argv[1] == "thread":  # as StaticDecoder compiles ahead while it traces
            threading.Thread(target=run, daemon=True).start()
            finished.wait()
        else:  # as the profile script does
            compile_ahead(jobs, torch.device("cpu"), 2)
    except KeyboardInterrupt:
        finished.wait(60 if sys.argv[1] == "thread" else 0)  # (a join interrupted once may not wait again)
        print("interrupted;", result.get("done", ["in the main thread"])[0][:60], file=sys.stderr)
        sys.exit(130)
"""


@pytest.mark.parametrize("caller", ["thread", "main"])
def test_a_sigint_during_compile_ahead_leaves_no_traceback_and_no_worker(caller):
    # A real SIGINT to the whole process group (a terminal's Ctrl-C; a time limit's): the workers end at once and
    # print nothing; a compiling thread ends with the pool reported broken, the main thread's handler says its line
    import os
    import signal
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTED_COMPILE, caller], cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    deadline = time.monotonic() + 120
    workers = []
    while len(workers) < 2 or min(w.cpu_times().user for w in workers) < 5:  # past their start, in a job
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.5)
        try:
            workers = [c for c in psutil.Process(proc.pid).children(recursive=True)
                       if "resource_tracker" not in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            workers = []
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr, stderr[-2000:]
    want = "compile ahead: BrokenProcessPool" if caller == "thread" else "in the main thread"
    assert stderr.strip().splitlines()[-1].startswith(f"interrupted; {want}"), stderr[-2000:]
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)


def test_a_lora_chunk_too_small_to_load_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"),
                           "--lora-min-chunk", "8"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--lora-min-chunk: 8 columns; at least 16 (a LoRA program's smallest load)" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_a_sweep_with_lora_keeps_the_tiles_chosen_without_it():
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import merge_tiles

    old = {"H100": [{"rows": 1, "n": 8, "k": 64, "config": "a"},
                    {"rows": 1, "n": 8, "k": 64, "config": "b", "lora": True}]}
    merged = merge_tiles(old, {"H100": [{"rows": 1, "n": 8, "k": 64, "config": "new", "lora": True}]})
    assert merged["H100"] == [{"rows": 1, "n": 8, "k": 64, "config": "a"},
                              {"rows": 1, "n": 8, "k": 64, "config": "new", "lora": True}]


def test_sweep_lora_needs_sweep(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"),
                           "--sweep-lora"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--sweep-lora times the sweep's tiles with LoRA: it needs --sweep" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_the_sweeps_lora_check_passes_the_kernel_and_fails_a_launch_without_lora():
    # What --sweep-lora accepts a tile by: within bf16's eps of the sum of |x * w| and LoRA's |t * b|, against
    # the LoRA reference. The kernel's own launch with LoRA passes; the same launch without it does not.
    import bitsandbytes as bnb
    import pytest
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    pytest.importorskip("triton")
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import _abs_sum_eps, _lora_reference, _segments

    from medqa_core.engine.kernels.nf4_matmul import nf4_matmul
    from medqa_core.engine.kernels.nf4_tiles import TileConfig
    from medqa_core.engine.kernels.nf4_weight import nf4_weight

    gen = torch.Generator().manual_seed(0)
    sizes, k, rank = (64, 16, 16), 1024, 4  # each segment a whole group of double-quantized scales
    w = (torch.randn(sum(sizes), k, generator=gen) * 0.02).bfloat16()
    packed, state = quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    dense = dequantize_4bit(packed, state)
    whole = nf4_weight(bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True))
    x = torch.randn(2, k, generator=gen).bfloat16()
    a = (torch.randn(rank * len(sizes), k, generator=gen) * 0.1).bfloat16()
    b = (torch.randn(sum(sizes), rank, generator=gen) * 0.1).bfloat16()
    ref_lora, lora_abs = _lora_reference(x, x.float() @ dense.float().T, a, b, sizes, 2.0)
    tile = TileConfig(2, 16, 64, 1, 1, 2, "fma")
    out = nf4_matmul(x, _segments(whole, sizes), lora_a=a, lora_b=b, scaling=[2.0] * 3, config=tile)
    assert _abs_sum_eps(out, ref_lora, x, dense, lora_abs) <= 1.0
    without = nf4_matmul(x, _segments(whole, sizes), config=tile)
    assert _abs_sum_eps(without, ref_lora, x, dense, lora_abs) > 1.0


def test_the_sweeps_grid_holds_mma_tiles_that_run_on_every_layer():
    # v18: the MMA tiles of 16 to 64 x rows a program compete with the dots there; every MMA tile of every row count
    # runs on the 7B's layers (K 4096 and 14336 at blocksize 64), and no row count's grid repeats a tile or passes 30
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from profile_nf4_kernel import _sweep_grid

    from medqa_core.engine.kernels.nf4_matmul import mma_unfit
    from medqa_core.engine.kernels.nf4_weight import NF4Weight

    for rows in (1, 8, 32, 64):
        grid = _sweep_grid(rows)
        assert len(grid) == len(set(grid)) <= 30, rows
    for rows in (1, 8, 32, 64):
        mma = [c for c in _sweep_grid(rows) if c.kernel_mode == "mma"]
        if rows > 8:
            assert {c.block_m for c in mma} == ({32} if rows == 32 else {32, 64})
        else:  # v21: tiles of 256 columns an iteration too
            assert {c.block_k for c in mma} == {128, 256}
        for k in (4096, 14336):
            weight = NF4Weight(torch.zeros(4096 * k // 2, dtype=torch.uint8), torch.zeros(1), torch.zeros(16),
                               64, 4096, k, None, None, None, 256)
            assert all(mma_unfit(torch.device("cpu"), torch.bfloat16, weight, c.block_k, c.block_scale) is None
                       for c in mma), k


def test_a_sigint_mid_run_is_one_line_exit_130_and_keeps_the_shapes_saved(tmp_path):
    # A real SIGINT (as a time limit's `timeout --signal=INT` sends) once the first shape is saved: no traceback,
    # and the file holds whole shapes, those finished before it. GPU only (the profile refuses the CPU).
    import json
    import signal
    import time

    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.skip("bench/profile_nf4_kernel.py runs on a GPU only")
    out = tmp_path / "profile.json"
    layers = ["k_proj/v_proj", "gate+up_proj", "down_proj"]
    proc = subprocess.Popen([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(out), "--rows", "1,8",
                             "--layers", ",".join(layers), "--compile-workers", "1"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not out.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"profile_nf4_kernel: interrupted by SIGINT; {out} holds the layer "
                                               "shapes finished before it")
    saved = [r["layer"] for r in json.loads(out.read_text())["rows"]]
    assert saved and set(saved) < set(layers), saved


def test_the_sweeps_final_round_retimes_the_close_tiles_in_turn_and_keeps_the_lowest_median():
    sys.path.insert(0, str(ROOT / "bench"))
    from profile_nf4_kernel import _final_round

    # "a" was lucky once; timed again in turn, "b" is faster. "c" is within 10% but fourth; "d" is 20% behind.
    later = {"a": [1.20, 1.25, 1.10], "b": [1.00, 1.30, 1.02], "c": [0.90, 0.90, 0.90], "d": [0.50] * 3}
    calls = []

    def time_tile(tile):
        calls.append(tile)
        return later[tile][sum(t == tile for t in calls) - 1]

    timed = [("a", 1.00), ("b", 1.05), ("e", 1.08), ("c", 1.09), ("d", 1.20)]
    later["e"] = [1.10, 1.10, 1.10]
    best, seconds, final = _final_round(timed, time_tile)
    assert (best, seconds) == ("b", 1.02)
    assert final == {"a": 1.20, "b": 1.02, "e": 1.10}
    assert calls == ["a", "b", "e"] * 3  # in turn, only the three fastest within 10%
    # one tile near enough: no final round
    calls.clear()
    assert _final_round([("a", 1.0), ("d", 1.2)], time_tile) == ("a", 1.0, {})
    assert calls == []
