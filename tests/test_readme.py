"""README and docs/ figures come from committed result files: every generated block must match them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "tools" / "gen_docs.py")
gen_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gen_docs)


@pytest.mark.parametrize("name", gen_docs.DOCUMENTS)
def test_documents_match_committed_result_files(name):
    doc = ROOT / name
    text = doc.read_text(encoding="utf-8")
    assert "<!-- generated:" in text
    assert gen_docs.render(text, ROOT / "results", gen_docs.up_to_root(doc)) == text, "run: python tools/gen_docs.py"


def test_a_users_own_run_under_results_changes_no_block(tmp_path):
    """Only git-tracked files count: an untracked record (a user's run) leaves every block as it was."""
    results = tmp_path / "results"
    (results / "runs").mkdir(parents=True)
    src = ROOT / "results" / "runs" / "20261126T011808Z_run_tiny_cpu_41e12ba7.json"
    (results / "runs" / src.name).write_bytes(src.read_bytes())
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "results"], cwd=tmp_path, check=True)
    before = gen_docs.GENERATORS["default-run"](results)
    user = json.loads(src.read_text())
    user["fingerprint"]["cpu_model"] = "AMD EPYC 7B13 64-Core Processor"
    (results / "runs" / "20991231T000000Z_run_tiny_cpu_00000000.json").write_text(json.dumps(user))
    gen_docs._tracked.cache_clear()
    assert gen_docs.GENERATORS["default-run"](results) == before
    assert "AMD EPYC" not in gen_docs.GENERATORS["machine-times"](results)


def test_outside_a_checkout_every_file_counts_and_it_says_so(tmp_path, caplog):
    (tmp_path / "runs").mkdir()
    gen_docs._tracked.cache_clear()
    assert gen_docs.result_files(tmp_path, "runs/*.json") == []
    assert "not in a git checkout" in caplog.text


def test_render_fills_blocks_and_points_links_up_from_docs(tmp_path):
    (tmp_path / "runs").mkdir()
    text = "a\n<!-- generated:runs -->\nstale\n<!-- /generated:runs -->\nb\n"
    out = gen_docs.render(text, tmp_path)
    assert "stale" not in out and "| record | device |" in out and out.startswith("a\n") and out.endswith("b\n")
    assert gen_docs.up_to_root(ROOT / "docs" / "ci-gates.md") == "../" and gen_docs.up_to_root(ROOT / "README.md") == ""


@pytest.mark.slow
def test_generator_ships_in_no_wheel_and_runs_as_a_script():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["medqa_core*"]' in pyproject and not (ROOT / "medqa_core" / "readme.py").exists()
    # One document: test_documents_match_committed_result_files checks every one of them, in this process.
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_docs.py"), "--check", str(ROOT / "README.md")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _bench_file(folder, name, gpu, cases):
    data = {"machine_info": {"medqa_fingerprint": {"gpu_name": gpu}}, "datetime": name,
            "benchmarks": [{"name": n, "extra_info": e, "stats": {"median": 1.0}} for n, e in cases.items()]}
    (folder / f"{name}.json").write_text(json.dumps(data))


def test_decode_table_sets_the_compiled_path_beside_eager(tmp_path):
    folder = tmp_path / "bench" / "machine"
    folder.mkdir(parents=True)
    eager = {"decode_tokens_per_s": 10.0, "roofline_fraction": 0.01, "joules_per_token": 9.0}
    compiled = {"decode_tokens_per_s": 120.0, "roofline_fraction": 0.12, "joules_per_token": 3.0,
                "decode_loop": "StaticDecoder", "graph": "HIP graph", "first_call_s": 50.0}
    batch8 = {**compiled, "batch_size": 8, "decode_tokens_per_s": 800.0}
    _bench_file(folder, "0001_both", "MI250",
                {"test_decode_eager[sdpa-batch1]": eager, "test_decode_compiled[sdpa-batch1]": compiled,
                 "test_decode_eager[sdpa-batch8]": {**eager, "decode_tokens_per_s": 40.0},
                 "test_decode_compiled[sdpa-batch8]": batch8})
    _bench_file(folder, "0002_eager-only", "MI250", {"test_decode_eager[sdpa-batch1]": eager})
    gen_docs._tracked.cache_clear()
    rows = gen_docs.decode_table(tmp_path).splitlines()[2:]
    assert len(rows) == 2 and all("0001_both" in row for row in rows)
    assert "`StaticDecoder`, HIP graph" in rows[0] and "| 12.0x |" in rows[0] and "9.00 J, 3.00 J" in rows[0]
    assert "| 8 |" in rows[1] and "| 20.0x |" in rows[1]  # each batch against eager at the same batch


def test_decode_step_table_splits_a_step_into_kernels_and_gaps(tmp_path):
    folder = tmp_path / "bench" / "machine"
    folder.mkdir(parents=True)
    step = {"steps": 8, "tokens_per_step": 1, "wall_ms": 6.0, "busy_ms": 4.5,
            "categories": {"4-bit matmul (ours)": 4.0, "attention": 0.5},
            "launches": {"4-bit matmul (ours)": 224.0, "attention": 32.0}}
    _bench_file(folder, "0001_h100", "H100", {
        "test_decode_compiled[sdpa-batch1-triton]": {"decode_loop": "StaticDecoder", "batch_size": 1,
                                                     "nf4_kernel": "triton-nf4 (medqa_core.engine.kernels)",
                                                     "decode_tokens_per_s": 200.0, "decode_step_profile": step},
        "test_decode_compiled[sdpa-batch8-bitsandbytes]": {"decode_loop": "StaticDecoder", "batch_size": 8}})
    gen_docs._tracked.cache_clear()
    lines = gen_docs.decode_step_table(tmp_path).splitlines()
    assert lines[0].endswith("| 4-bit matmul (ours) | attention |")  # categories by their total time
    assert len(lines) == 3  # a case without a step profile has no row
    # the timed step is 1 / 200 tokens/s: its gaps are 0.50 ms where the profiled wall's are 1.50 ms
    assert ("| ours (Triton) | 1 | 6.00 ms | 5.00 ms | 4.50 ms | 1.50 ms | 0.50 ms | 256 | 4.00 ms (x224) "
            "| 0.50 ms (x32) |" in lines[2])


def test_decode_launch_table_gives_each_kind_of_launch_its_share(tmp_path):
    folder = tmp_path / "bench" / "machine"
    folder.mkdir(parents=True)
    by_launch = [{"launch": "q_proj+k_proj+v_proj", "per_step": 32, "ms": 0.5, "us_each": 15.625,
                  "bytes_each": 14_000_000, "bandwidth_fraction": 0.3},
                 {"launch": "gate_proj+up_proj", "per_step": 32, "ms": 1.5, "us_each": 46.875,
                  "bytes_each": 62_000_000, "bandwidth_fraction": 0.55}]
    _bench_file(folder, "0001_h100", "H100", {
        "test_decode_compiled[sdpa-batch1-triton]": {"decode_loop": "StaticDecoder", "batch_size": 1,
                                                     "nf4_time_by_launch": by_launch},
        "test_decode_compiled[sdpa-batch1-bitsandbytes]": {"decode_loop": "StaticDecoder", "batch_size": 1}})
    gen_docs._tracked.cache_clear()
    lines = gen_docs.decode_launch_table(tmp_path).splitlines()
    assert len(lines) == 4  # the bitsandbytes case has no launches of ours: no row
    assert lines[2].endswith("| 1 | q_proj+k_proj+v_proj | 32 | 15.6 | 14.0 | 30.0% | 25.0% |")
    assert lines[3].endswith("| 1 | gate_proj+up_proj | 32 | 46.9 | 62.0 | 55.0% | 75.0% |")


def test_performance_has_a_table_per_card_and_no_scoring_verdict_on_a_subset(tmp_path):
    folder = tmp_path / "bench" / "machine"
    folder.mkdir(parents=True)
    train = {"tokens_per_s": 9000.0, "speedup_vs_reference": 3.0, "mfu": 0.5, "peak_mem_gib": 60.0,
             "batch_size": 32, "tokens_per_step": 8000, "profile": "max-speed"}
    for name, gpu, questions in (("0001", "H100", 1273), ("0002", "H200", 1273), ("0003", "H100", 512)):
        _bench_file(folder, name, gpu, {
            "test_train_reference": {"tokens_per_s": 3000.0, "peak_mem_gib": 8.0},
            "test_train_profile[sdpa-max-speed]": train,
            "test_scoring[sdpa]": {"questions_per_s": 90.0, "questions": questions}})
    gen_docs._tracked.cache_clear()
    text = gen_docs.performance_table(tmp_path)
    runs = [line.split("]")[0] for line in text.splitlines() if line.startswith("Run: [")]
    assert runs == ["Run: [0002.json", "Run: [0003.json"]  # the newest of each card
    h200, h100 = text.split("Run: [0003.json")
    assert "not measured: 512 questions scored" in h100 and "not measured" not in h200


def test_a_run_of_another_model_never_answers_a_bench_target(tmp_path):
    """The committed `small` H100 run set ran `max-speed` for 2 epochs, as the 7B bench's profile case did: only
    a run of the bench's own model (its parameter count) may fill the profile and bench-against-run tables."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "bench" / "machine").mkdir(parents=True)
    bench = ROOT / "results" / "bench" / "Linux-CPython-3.12-64bit" / "0008_h100-cuda.json"
    (tmp_path / "bench" / "machine" / bench.name).write_bytes(bench.read_bytes())
    small = json.loads((ROOT / "results" / "runs" / "20261206T043044Z_run_small_cuda_271a52db.json").read_text())
    (tmp_path / "runs" / "20261206T043044Z_run_small_cuda_271a52db.json").write_text(json.dumps(small))
    gen_docs._tracked.cache_clear()
    assert gen_docs.profile_targets(tmp_path) == "(no real run of a memory class yet)"
    assert gen_docs.bench_vs_run(tmp_path).startswith("(no GPU bench file")
    seven_b = json.loads(bench.read_text())["benchmarks"][0]["extra_info"]["parameters"]
    small["model"]["parameters"] = seven_b  # the same record, as if it had run the bench's model
    (tmp_path / "runs" / "20261206T043044Z_run_small_cuda_271a52db.json").write_text(json.dumps(small))
    assert "| NVIDIA H100 80GB HBM3 | `max-speed` |" in gen_docs.profile_targets(tmp_path)
    assert "| NVIDIA H100 80GB HBM3 | `max-speed` |" in gen_docs.bench_vs_run(tmp_path)


def test_a_lever_run_answers_only_the_bench_case_of_its_own_settings(tmp_path):
    """The fp8 run is `max-speed+fp8=true`: it pairs with that bench case (not plain max-speed's) and is judged
    against its card's floor; the peers table joins the peer file with the same call's reference and ours."""
    (tmp_path / "runs").mkdir()
    bench_dir = tmp_path / "bench" / "machine"
    bench_dir.mkdir(parents=True)
    committed = ROOT / "results" / "bench" / "Linux-CPython-3.12-64bit"
    for name in ("0024_h100-cuda-train-fp8.json", "0025_h100-cuda-peers.json"):
        (bench_dir / name).write_bytes((committed / name).read_bytes())
    run = "20261206T070103Z_run_mistral-7b_cuda_a5e3bf4f.json"
    (tmp_path / "runs" / run).write_bytes((ROOT / "results" / "runs" / run).read_bytes())
    gen_docs._tracked.cache_clear()
    pairs = gen_docs.bench_vs_run(tmp_path).splitlines()[2:]
    assert len(pairs) == 1 and pairs[0].startswith("| NVIDIA H100 80GB HBM3 | `max-speed+fp8=true` | 19,194 ")
    assert ">= 19,000 tokens/s | yes |" in gen_docs.profile_targets(tmp_path)  # issue 31's H100 floor
    unsloth = next(r for r in gen_docs.peers_table(tmp_path).splitlines() if "| unsloth" in r)
    assert "| 5,039 |" in unsloth and "(`max-speed`, batch 48)" in unsloth  # ours' fastest bf16 case, not fp8's


def test_readme_briefs_carry_the_full_tables_figures():
    """README's short tables (inference, run sets) show the figures of docs' full ones, never others."""
    gen_docs._tracked.cache_clear()
    results = ROOT / "results"
    full_header, _, *full_rows = gen_docs.inference_table(results).splitlines()
    full = [row.split(" | ") for row in full_rows]
    columns = full_header.split(" | ")
    decode, roofline = columns.index("decode tokens/s"), columns.index("of roofline")
    header, _, *brief = gen_docs.inference_brief(results).splitlines()
    assert brief
    # the arms' columns: "ours", "ours + our attention", "bitsandbytes", as the full table names them
    arms = [c.strip().replace("decode tokens/s (of roofline): ", "").replace("ours", "ours (Triton)")
            for c in header.strip("| ").split(" | ")[2:-1]]
    assert arms[0] == "ours (Triton)" and "bitsandbytes" in arms
    for row in brief:
        device, batch, *cells = (c.strip("| ") for c in row.split(" | ")[:2 + len(arms)])
        for kernel, cell in zip(arms, cells, strict=True):
            match = [r for r in full if r[0].strip("| ") == device and r[1] == kernel and r[2] == batch]
            assert cell == "-" and not match or cell == f"{match[0][decode]} ({match[0][roofline]})", (row, kernel)
    sets = gen_docs.runsets_table(results)
    for row in gen_docs.runsets_brief(results).splitlines()[2:]:
        name, mean = row.split(" | ")[0], row.split(" | ")[2].split(" (")[0]
        assert any(r.startswith(name) and f"| {mean} (" in r for r in sets.splitlines()), row


def test_kernel_profile_table_names_an_ab_arm_beside_the_arm_it_switches(tmp_path):
    # A/B arms (ours with LoRA and a switch: v20's float32 scales, v22's tiled copies) get a column of their own,
    # named by the switch, beside the plain ours+lora they are timed against
    folder = tmp_path / "traces"
    folder.mkdir()
    row = dict(layer="down_proj", n=4096, k=14336, rows=8, bandwidth_fraction=0.5)
    (folder / "20990101T0000Z_h100_nf4-kernel-ab.json").write_text(json.dumps(dict(
        kind="nf4-kernel-profile", rows=[{**row, "arm": "ours+lora", "time_s": 27.1e-6},
                                         {**row, "arm": "ours+lora+tiled", "time_s": 24.4e-6}])))
    gen_docs._tracked.cache_clear()
    rows = gen_docs.nf4_kernel_profile(tmp_path).splitlines()
    assert "| ours+lora, A/B arm |" in rows[0] and len(rows) == 3
    assert "| 27.1 us (50.0%) |" in rows[2] and "| 24.4 us (50.0%) tiled |" in rows[2]


def test_kernel_profile_table_says_a_sweep_timed_tiled_copies(tmp_path):
    # a sweep under MEDQA_NF4_LAYOUT=tiled timed each tile on copies in its own order: its best says so
    folder = tmp_path / "traces"
    folder.mkdir()
    row = dict(layer="down_proj", n=4096, k=14336, rows=1, best_time_s=22.0e-6, best_bandwidth_fraction=0.5)
    for name, layout in (("a", {}), ("b", {"layout": "tiled"})):
        (folder / f"20990101T0000Z_h100_nf4-kernel-sweep-{name}.json").write_text(json.dumps(dict(
            kind="nf4-kernel-profile", rows=[{**row, "arm": "sweep+lora", **layout}])))
    gen_docs._tracked.cache_clear()
    rows = gen_docs.nf4_kernel_profile(tmp_path).splitlines()[2:]
    assert "| 22.0 us (50.0%) with LoRA |" in rows[0]
    assert "| 22.0 us (50.0%) with LoRA, tiled copies |" in rows[1]
