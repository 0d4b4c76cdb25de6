"""bench/ end to end: pytest-in-pytest on the tests' tiny Mistral (tests/conftest.py) with tiny sizes.

One run (about 45 s on 2 CPU cores) with an out-of-memory injected into one case; the tests
then read its saved pytest-benchmark JSON: the fields the report needs are there, the OOM is that
case's recorded result, and the cases after it still ran and were saved.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import without_xdist

from medqa_core.engine.config import MEMORY_CAP_GIB

pytestmark = pytest.mark.slow  # real multi-process or full-bench runs: the full suite only

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OOM_CASE = "test_prefill[sdpa-batch2]"
# A forced SDPA backend torch has no CPU kernel for: its cases must skip with torch's reason.
MISSING_KERNEL = "sdpa-cudnn"
# With --model tiny_model_dir, not the tiny preset (4 layers, hidden 256; tests/test_peers.py's bench runs that): the
# harness is what is tested, and its compiled decode cases compile the 2-layer model's step in about 15 s less.
TINY = [
    "--bench-batch-size", "2", "--bench-seq-len", "32", "--questions", "6",
    "--train-rounds", "2", "--infer-rounds", "1", "--warmup-rounds", "1", "--decode-tokens", "3",
]
CAPPED = "capped+batch_size=3+checkpoint_layers=1+compile=off+attn=sdpa"  # flex cannot train on CPU
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason=f"{MISSING_KERNEL} may run on a GPU")


@pytest.fixture(scope="module")
def bench_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    attn = "sdpa" if torch.cuda.is_available() else f"sdpa,{MISSING_KERNEL}"
    paths = [str(ROOT / "tests"), os.environ.get("PYTHONPATH")]  # tests/ holds the oom_injection plugin
    env = {**without_xdist(os.environ), "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    cmd = [
        sys.executable, "-m", "pytest", str(BENCH), "--model", str(tiny_model_dir), *TINY, "--attn", attn,
        "-p", "no:cacheprovider", "-rs",
        "-p", "oom_injection", "--inject-oom", OOM_CASE,
        # Profile cases without compiling (compile time would dominate a tiny run): the fields are what is checked.
        "--train-profiles", f"eager,{CAPPED}",
        "--decode-batches", "1,16",  # 16 rows of 32 tokens: more prompt tokens than --bench-batch-size rows hold
        "-k", "not lever_loss_curve",  # the levers' curves are tests/test_levers.py's: the harness is what is tested
        f"--benchmark-json={out / 'bench.json'}", f"--benchmark-storage=file://{out / 'storage'}",
        "--benchmark-save=harness",
    ]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    saved = list((out / "storage").glob("*/0001_harness.json"))
    return {"json": json.loads((out / "bench.json").read_text()), "saved": saved, "stdout": proc.stdout}


def _cases(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["name"]: b for b in run["json"]["benchmarks"]}


def test_saved_under_benchmark_storage(bench_run: dict[str, Any]) -> None:
    # --benchmark-save writes .benchmarks/<machine>/0001_<name>.json, what `pytest-benchmark compare` reads.
    assert len(bench_run["saved"]) == 1
    saved = json.loads(bench_run["saved"][0].read_text())
    assert [b["name"] for b in saved["benchmarks"]] == [b["name"] for b in bench_run["json"]["benchmarks"]]


def test_train_cases_have_report_fields(bench_run: dict[str, Any]) -> None:
    cases = _cases(bench_run)
    reference, ours = cases["test_train_reference"]["extra_info"], cases["test_train_ours[sdpa]"]["extra_info"]
    for info in (reference, ours):
        tp = info["throughput"]  # the TrainThroughput a run record's train.throughput holds (case schema 3)
        assert tp["tokens_per_s"] > 0
        assert tp["step_time_s_median"] > 0 and tp["step_time_s_iqr"] >= 0
        # What a run reports: the timed rounds' real tokens over their summed time, each round a distinct batch.
        assert len(info["tokens_per_round"]) == info["timed_rounds"] == 2
        assert len(set(info["tokens_per_round"])) == 2  # two different batches of the loop's order
        assert tp["tokens_per_s"] == pytest.approx(sum(info["tokens_per_round"]) / sum(info["round_times_s"]))
        assert info["tokens_per_step"] <= info["padded_tokens_per_step"]  # real tokens only: pads are left out
        assert "peak_mem_gib" in info["memory"] and info["memory"]["host_rss_gib"] > 0
        assert tp["mfu_measured"] == pytest.approx(tp["model_flops_per_s"] / tp["measured_peak_flops_per_s"])
        assert tp["mfu_datasheet"] is None or info["backend"] != "cpu"  # no datasheet peak for a CPU
        assert info["compute_dtype"] in ("bfloat16", "float32")
        assert info["quantization"]["method"] == "bnb-nf4"
        assert info["attention"]["requested"] == "sdpa" and info["attention"]["ran"].startswith("sdpa")
        assert info["batch_size"] == 2 and info["backend"] in ("cpu", "cuda", "rocm")
        assert len(info["loss_per_round"]) == 2
    assert reference["arm"] == "reference" and reference["gradient_checkpointing"] is True
    assert reference["tokens_per_step"] < reference["padded_tokens_per_step"]  # two lengths, padded to the longer
    assert ours["arm"] == "ours"
    # Both arms stepped on the same examples.
    assert ours["tokens_per_step"] == reference["tokens_per_step"]
    assert ours["speedup_vs_reference"] == pytest.approx(ours["throughput"]["tokens_per_s"]
                                                         / reference["throughput"]["tokens_per_s"])


def test_infer_cases_have_report_fields(bench_run: dict[str, Any]) -> None:
    cases = _cases(bench_run)
    prefill = cases["test_prefill[sdpa-batch1]"]["extra_info"]
    assert prefill["ttft_s_median"] > 0
    assert prefill["prefill_tokens_per_s"] == pytest.approx(32 / prefill["ttft_s_median"])
    # The compiled decode runs once per 4-bit kernel (--nf4-kernels; on CPU bitsandbytes alone), named by it.
    decodes = [cases[name]["extra_info"] for name in (
        "test_decode_eager[sdpa-batch1]", "test_decode_eager[sdpa-batch16]",
        "test_decode_compiled[sdpa-batch1-bitsandbytes]", "test_decode_compiled[sdpa-batch16-bitsandbytes]")]
    for decode in decodes:
        assert decode["new_tokens"] == 3  # per row; min_new_tokens = max_new_tokens: EOS does not stop it early
        assert decode["weight_bytes_per_token"] > 0 and decode["copy_bandwidth_bytes_per_s"] > 0
        assert decode["roofline_tokens_per_s"] == pytest.approx(  # one weight read per step serves every row
            decode["batch_size"] * decode["copy_bandwidth_bytes_per_s"] / decode["weight_bytes_per_token"])
        if decode["decode_tokens_per_s"] is not None:  # None only when generate(3) was not slower than generate(1)
            assert decode["roofline_fraction"] == pytest.approx(
                decode["decode_tokens_per_s"] / decode["roofline_tokens_per_s"])
    assert [d["batch_size"] for d in decodes] == [1, 16, 1, 16]
    # eager generate: decode = generate(3) - generate(1) of other rounds; the StaticDecoder clocks each round's
    # prefill, so its decode is a median of its rounds' own steps, shorter than their whole time
    assert all(d["decode_timing"].startswith("generate(N) minus generate(1)") for d in decodes[:2])
    for static in decodes[2:]:
        assert static["decode_timing"].startswith("per round: its time minus its own prefill")
        assert 0 < static["decode_s_median"] < static["generate_s_median"] and static["decode_s_iqr"] >= 0
        assert static["decode_tokens_per_s"] == pytest.approx(
            static["batch_size"] * (static["new_tokens"] - 1) / static["decode_s_median"])
    for static in decodes[2:]:
        assert static["decode_loop"] == "StaticDecoder" and static["cache"] == "static"
        assert static["dynamo"] == {"unique_graphs": 1, "graph_breaks": 0}  # one step graph, no recompiles
        assert static["cache_layers"] == "full" and static["first_call_s"] > 0 and static["fallback"] is None
        assert static["nf4_kernel"].startswith("bitsandbytes ") and static["nf4_fused_layers"] == 0
        # Where a step's time goes: the steps after a fresh prefill that fit the cache (3 new tokens: 2)
        step = static["decode_step_profile"]
        assert static["decode_step_profile_error"] is None
        assert step["steps"] == 2 and step["tokens_per_step"] == static["batch_size"] and step["wall_ms"] > 0
        assert step["busy_ms"] == pytest.approx(sum(step["categories"].values()))
        assert step["launches"].keys() == step["categories"].keys() and all(n > 0 for n in step["launches"].values())
        assert static["graph"] == ("none: graphs need a GPU" if not torch.cuda.is_available() else
                                   "HIP graph" if torch.version.hip else "CUDA graph")
    scoring = cases["test_scoring[sdpa]"]["extra_info"]
    assert scoring["scoring"]["questions_per_s"] > 0 and scoring["questions"] == 6
    for info in (prefill, *decodes, scoring):
        energy = info["energy"]["joules_per_token"]
        assert energy is None or energy > 0  # null: no energy meter here


def test_every_case_reads_through_the_schema_and_a_headline_is_printed(bench_run: dict[str, Any]) -> None:
    from medqa_core.results.benchcase import BenchCase

    for name, case in _cases(bench_run).items():
        assert BenchCase.from_extra_info(case["extra_info"], name).to_extra_info() == case["extra_info"]
    out = bench_run["stdout"]
    assert "medqa-parity: headline per case" in out
    assert "test_train_ours[sdpa]: " in out and "real tokens/s, MFU" in out
    assert "test_accuracy[sdpa]: accuracy " in out and "got empty parameter set" not in out


def test_accuracy_has_per_question_predictions(bench_run: dict[str, Any]) -> None:
    info = _cases(bench_run)["test_accuracy[sdpa]"]["extra_info"]
    predictions = info["predictions"]
    assert info["n_questions"] == len(predictions) == 6
    assert len({p["qid"] for p in predictions}) == 6
    for p in predictions:
        assert len(p["logprobs"]) == 4 and all(lp <= 0 for lp in p["logprobs"])
        assert p["pred"] == max(range(4), key=lambda i: p["logprobs"][i])
    assert info["accuracy"] == pytest.approx(sum(p["pred"] == p["answer"] for p in predictions) / 6)
    lo, hi = info["accuracy_ci95"]
    assert lo <= info["accuracy"] <= hi


def test_machine_info_has_fingerprint_and_ceilings(bench_run: dict[str, Any]) -> None:
    fingerprint = bench_run["json"]["machine_info"]["medqa_fingerprint"]
    assert fingerprint["backend"] in ("cpu", "cuda", "rocm")
    assert fingerprint["packages"]["pytest-benchmark"]
    hardware = fingerprint["hardware"]
    assert hardware["matmul_bf16_flops_per_s"] > 0 and hardware["copy_bandwidth_bytes_per_s"] > 0
    # The peak MFU divides by is the one measured in this run.
    train = _cases(bench_run)["test_train_ours[sdpa]"]["extra_info"]
    assert train["throughput"]["measured_peak_flops_per_s"] == hardware["matmul_bf16_flops_per_s"]
    assert hardware["energy_meter"] in ("nvml", "amdsmi", "unavailable")


def test_oom_is_recorded_and_the_suite_goes_on(bench_run: dict[str, Any]) -> None:
    cases = _cases(bench_run)
    oom = cases[OOM_CASE]["extra_info"]["oom"]
    info = cases[OOM_CASE]["extra_info"]
    # The configuration stays beside the failure; the failure has a run record's schema (medqa_core.results.failure).
    assert {k: info[k] for k in ("arm", "attention_requested", "batch_size", "seq_len")} == {
        "arm": "ours", "attention_requested": "sdpa", "batch_size": 2, "seq_len": 32}
    assert oom["message"].startswith("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert oom["phase"] == "warm-up round 1" and oom["kind"] == "oom" and info["schema_version"] == 3
    assert "memory_allocated_gib" in oom and oom["host_rss_gib"] > 0  # None on CPU: not tracked there
    assert "ttft_s_median" not in cases[OOM_CASE]["extra_info"]  # no figures from a case that did not run
    # Every other case ran after it (ours' train step comes last) and was saved without an OOM.
    expected = {"test_train_reference", "test_accuracy[sdpa]", "test_prefill[sdpa-batch1]", OOM_CASE,
                "test_decode_eager[sdpa-batch1]", "test_scoring[sdpa]", "test_train_ours[sdpa]"}
    assert expected <= set(cases)
    assert [name for name in cases if "oom" in cases[name]["extra_info"]] == [OOM_CASE]


@CPU_ONLY
def test_missing_kernel_is_skipped_with_reason(bench_run: dict[str, Any]) -> None:
    assert not any(MISSING_KERNEL in name for name in _cases(bench_run))
    assert f"attention kernel '{MISSING_KERNEL}' cannot run here" in bench_run["stdout"]


def test_profile_cases_record_their_settings(bench_run: dict[str, Any]) -> None:
    cases = _cases(bench_run)
    eager = cases["test_train_profile[sdpa-eager]"]["extra_info"]
    capped = cases[f"test_train_profile[sdpa-{CAPPED}]"]["extra_info"]
    assert {k: eager["compile"][k] for k in ("requested", "ran", "detail", "graphs", "recompiles")} == \
        {"requested": "off", "ran": False, "detail": "off", "graphs": 0, "recompiles": 0}
    assert eager["batch_size"] == 2 and eager["throughput"]["tokens_per_s"] > 0 and eager["speedup_vs_reference"] > 0
    assert (capped["batch_size"], capped["checkpoint_layers"], capped["gradient_checkpointing"]) == (3, 1, True)
    assert capped["memory_cap_gib"] == MEMORY_CAP_GIB["capped"]
    # No device peak on CPU: whether the cap held is unknown, not claimed.
    peak = capped["memory"]["peak_mem_gib"]
    assert capped["within_memory_cap"] is (None if peak is None else peak <= MEMORY_CAP_GIB["capped"])


def _collect(*options: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", str(BENCH / "bench_infer.py"), "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-k", "decode_compiled", "--nf4-kernels", "bitsandbytes",
                           *options], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


def test_an_unknown_ab_switch_value_is_refused_before_anything_runs() -> None:
    # the decoder's prefill switch, either kernel's: a wrong value is a usage error naming it, not a failed case
    bad = _collect("--decode-batches", "1", env={**os.environ, "MEDQA_PREFILL": "lazy"})
    assert bad.returncode == 4, bad.stdout[-2000:] + bad.stderr[-2000:]  # pytest's usage error
    assert "MEDQA_PREFILL='lazy': choose one of compiled, eager" in bad.stderr
    assert "Traceback" not in bad.stderr
    # v20's A/B switch is an environment variable: a wrong value is a usage error naming it, not a skipped case
    pytest.importorskip("triton")
    bad = _collect("--decode-batches", "1", env={**os.environ, "MEDQA_NF4_SCALES": "fp8"})
    assert bad.returncode == 4, bad.stdout[-2000:] + bad.stderr[-2000:]  # pytest's usage error
    assert "MEDQA_NF4_SCALES='fp8': choose one of nested, float32" in bad.stderr
    assert "Traceback" not in bad.stderr
    # v22's, likewise
    bad = _collect("--decode-batches", "1", env={**os.environ, "MEDQA_NF4_LAYOUT": "marlin"})
    assert bad.returncode == 4 and "Traceback" not in bad.stderr
    assert "MEDQA_NF4_LAYOUT='marlin': choose one of bitsandbytes, tiled" in bad.stderr


def test_decode_attentions_are_arms_of_one_session() -> None:
    # Several --decode-attention values: one compiled decode case each, named by it; one keeps the names files
    # were saved under before; an unknown one is refused by name before anything runs.
    several = _collect("--decode-attention", "model,triton", "--decode-batches", "1")
    assert several.returncode == 0, several.stdout[-2000:] + several.stderr[-2000:]
    assert [line for line in several.stdout.splitlines() if "::" in line] == [
        "bench/bench_infer.py::test_decode_compiled[sdpa-batch1-bitsandbytes-attn-model]",
        "bench/bench_infer.py::test_decode_compiled[sdpa-batch1-bitsandbytes-attn-triton]"]
    one = _collect("--decode-attention", "triton", "--decode-batches", "1")
    assert "bench/bench_infer.py::test_decode_compiled[sdpa-batch1-bitsandbytes]" in one.stdout.splitlines()
    unknown = _collect("--decode-attention", "model,flash")
    assert unknown.returncode == 4  # pytest's usage error
    assert "--decode-attention 'model,flash': give a comma-separated list of auto, triton, model" in unknown.stderr
