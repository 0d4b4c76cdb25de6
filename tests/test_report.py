"""Reports built from records and benchmark files made in the test (no torch, no model)."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from medqa_core.cli import main
from medqa_core.compare.inputs import BASE, FINE_TUNED, CompareError, load_inputs, summarize_benchmark, summarize_file
from medqa_core.compare.parity import Tolerances
from medqa_core.compare.tables import markdown_table
from medqa_core.report.build import build_report
from medqa_core.report.render import make_report
from medqa_core.report.tables import metrics_table
from medqa_core.results.measurements import Memory, TrainThroughput
from medqa_core.results.record import (
    SCHEMA_VERSION,
    EvalResult,
    QuestionResult,
    RunRecord,
    TrainResult,
    save_record,
)

N = 300
QUANT = {"method": "bnb-nf4", "quant_type": "nf4", "blocksize": 64, "double_quant": True, "compute_dtype": "bfloat16",
         "bitsandbytes_version": "0.50.2"}

ROOT = Path(__file__).resolve().parents[1]


def scores(seed: int, accuracy: float = 0.3, n: int = N, noise: float = 0.0, base: int = 0) -> EvalResult:
    """``n`` questions with seeded log-probabilities; ``noise`` perturbs those of seed ``base``'s."""
    rng = np.random.default_rng(base)
    answers = np.arange(n) % 4
    logprobs = rng.normal(-5.0, 2.0, (n, 4))  # [N, 4]
    right = rng.random(n) < accuracy
    logprobs[right, answers[right]] = logprobs[right].max(axis=1) + 1.0
    logprobs += np.random.default_rng(seed).normal(0, noise, (n, 4)) if noise else 0.0
    qs = tuple(QuestionResult(f"test.jsonl:{i + 1}", int(answers[i]), int(lp.argmax()), tuple(map(float, lp)))
               for i, lp in enumerate(logprobs))
    acc = float(np.mean([q.correct for q in qs]))
    return EvalResult("test.jsonl", n, acc, (acc - 0.05, acc + 0.05), 100 * n, 10.0, n / 10.0, None, qs)


def make_record(backend: str = "cuda", gpu: str | None = "NVIDIA H100 80GB HBM3", seed: int = 0, noise: float = 0.0,
                before: EvalResult | None = None, after: EvalResult | None = None, **overrides) -> RunRecord:
    loss = tuple(2.0 - 0.1 * i + (0.01 * seed if backend != "cuda" else 0.0) for i in range(10))
    tr = TrainResult(10, 1.0, 80, 20_000, 8, 4.0, TrainThroughput(4000.0 if backend == "cuda" else 3000.0, 0.5, 0.05),
                     Memory(20.0, 3.0), loss, (2.0, 1.0, 0.45, 0.5, 0.5, 0.55, 0.5, 0.48, 0.52, 0.5))
    fingerprint = {"backend": backend, "gpu_name": gpu, "cpu_model": "Xeon", "torch_version": "2.11.0",
                   "torch_hip": "7.0" if backend == "rocm" else None, "driver_version": "580", "hostname": "secret-box",
                   "packages": {"bitsandbytes": "0.50.2"}, "git_commit": "abc123"}
    fields = dict(
        kind="run", config={"model": {"preset": "mistral-7b", "seed": 0}}, fingerprint=fingerprint,
        model={"name": "mistral-7b", "source": "preset", "parameters": 7_283_675_136,
               "trainable_parameters": 41_943_040, "quantization": QUANT},
        attention={"requested": "sdpa", "ran": "sdpa-cudnn" if backend == "cuda" else "sdpa-flash"}, train=tr,
        eval_before=before or scores(seed, noise=noise), eval_after=after or scores(seed + 100, noise=noise, base=1),
        adapter_dir=f"runs/adapters/{backend}-adapter", notes=("random-weight preset",),
    )
    return RunRecord(**{**fields, **overrides})


def bench_file(path: Path, questions: EvalResult | None = None, oom: bool = False, reference: bool = False) -> Path:
    """A pytest-benchmark file as ``pytest bench/ --benchmark-save`` writes it, with our extra_info."""
    common = {"arm": "ours", "backend": "rocm", "model": "mistral-7b", "attention": {"requested": "sdpa", "ran": "ck"},
              "quantization": {**QUANT, "blocksize": 128}, "parameters": 7_283_675_136,
              "trainable_parameters": 41_943_040}
    stats = {"min": 0.4, "max": 0.7, "mean": 0.5, "stddev": 0.05, "median": 0.5, "q1": 0.45, "q3": 0.6, "iqr": 0.15,
             "rounds": 5, "data": [0.45, 0.5, 0.5, 0.6, 0.7]}
    entries = [
        {"group": "train", "name": "test_train_ours[sdpa]", "params": {"attn": "sdpa"}, "stats": stats,
         "extra_info": {**common, "tokens_per_s": 5000.0, "step_time_s_median": 0.5, "step_time_s_iqr": 0.15,
                        "mfu": 0.31, "peak_mem_gib": 30.0, "host_rss_gib": 9.0, "speedup_vs_reference": 1.25}},
        {"group": "prefill", "name": "test_prefill[sdpa-batch8]", "params": {"attn": "sdpa", "prefill_batch": 8},
         "stats": stats, "extra_info": {**common, "prefill_tokens_per_s": 40000.0, "ttft_s_median": 0.4,
                                        "peak_mem_gib": 12.0}},
        {"group": "prefill", "name": "test_prefill[sdpa-batch1]", "params": {"attn": "sdpa", "prefill_batch": 1},
         "stats": stats, "extra_info": {**common, "prefill_tokens_per_s": 9000.0, "ttft_s_median": 0.05}},
        {"group": "decode", "name": "test_decode_eager[sdpa]", "params": {"attn": "sdpa"}, "stats": stats,
         "extra_info": {**common, "decode_tokens_per_s": 300.0, "generate_tokens_per_s": 250.0, "compile_mode": None,
                        "weights": "random preset (seed 0): speed, not medical knowledge"}},
        {"group": "decode", "name": "test_decode_compiled[sdpa]", "params": {"attn": "sdpa"}, "stats": stats,
         "extra_info": {**common, "decode_tokens_per_s": 420.0, "compile_mode": "default"}},
        {"group": "scoring", "name": "test_scoring[sdpa]", "params": {"attn": "sdpa"}, "stats": stats,
         "extra_info": {**common, "questions": N, "questions_per_s": 60.0}},
    ]
    if questions is not None:
        entries.append({"group": "accuracy", "name": "test_accuracy[sdpa]", "params": {"attn": "sdpa"}, "stats": stats,
                        "extra_info": {**common, "questions": N, "n_questions": N, "accuracy": questions.accuracy,
                                       "predictions": [dataclasses.asdict(q) for q in questions.questions]}})
    if oom:
        oom_info = {"error": "HIP out of memory", "during": "timed round 1"}
        entries.append({"group": "train", "name": "test_train_ours[eager]", "params": {"attn": "eager"},
                        "stats": stats, "extra_info": {"arm": "ours", "attention_requested": "eager", "oom": oom_info}})
    if reference:  # bench/ runs the reference arm first, on its own model folder
        entries.insert(0, {"group": "train", "name": "test_train_reference", "params": {}, "stats": stats,
                           "extra_info": {**common, "arm": "reference", "model": "mistral-7b-seed0",
                                          "attention": {"requested": "sdpa", "ran": "ck"}, "tokens_per_s": 4000.0}})
    fingerprint = {"backend": "rocm", "gpu_name": "AMD Instinct MI300X", "torch_hip": "7.0", "git_commit": None}
    data = {"machine_info": {"node": "x", "medqa_fingerprint": fingerprint}, "commit_info": {"id": "def456"},
            "benchmarks": entries, "datetime": "2026-11-25T22:00:00", "version": "5.2.3"}
    path.write_text(json.dumps(data))
    return path


def saved(tmp_path: Path, *records: RunRecord) -> list[Path]:
    return [save_record(r, tmp_path / f"in{i}") for i, r in enumerate(records)]


def test_report_of_two_equal_runs_says_parity_holds(tmp_path):
    paths = saved(tmp_path, make_record(), make_record("cpu", gpu=None, seed=1, noise=1e-3))
    report, written = make_report(paths, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert report.verdict == "holds"
    assert md.startswith("# medqa-parity report\n\n**Parity holds across 2 run records (baseline R1 cuda H100 80GB "
                         "HBM3 sdpa-cudnn).**")
    assert "No ROCm run was compared: every input ran on cpu / cuda." in md
    for name in ("throughput", "memory", "accuracy", "loss", "logprob_drift"):
        png = tmp_path / "out" / f"{name}.png"
        assert png in written and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name}.png)" in md
    page = (tmp_path / "out" / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 5 and base64.b64decode(images[0])[:4] == b"\x89PNG"
    assert "Parity holds" in page and "secret-box" not in page and "secret-box" not in md  # hostname left out
    assert "| torch_version |  | 2.11.0 | 2.11.0 |" in md  # fingerprints side by side


def test_ten_point_accuracy_gap_and_rocm_blocksize_fail_point_by_point(tmp_path):
    base = scores(0, accuracy=0.3, n=1273)
    lifted = list(base.questions)
    wrong = [i for i, q in enumerate(lifted) if not q.correct][:127]  # +127 / 1273 = +10 points
    for i in wrong:  # the right option becomes the most likely
        q = lifted[i]
        lp = tuple(max(q.logprobs) + 1.0 if k == q.answer else x for k, x in enumerate(q.logprobs))
        lifted[i] = QuestionResult(q.qid, q.answer, q.answer, lp)
    rocm = make_record("rocm", gpu="AMD Instinct MI250X", before=dataclasses.replace(base, questions=tuple(lifted)),
                       after=scores(100, base=1, n=1273),
                       model={**make_record().model, "quantization": {**QUANT, "blocksize": 128}})
    paths = saved(tmp_path, make_record(before=base, after=scores(100, base=1, n=1273)), rocm)
    report, _ = make_report(paths, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert report.verdict == "does not hold"
    assert "**Parity does NOT hold: 2 point(s) fail across 2 run records" in md
    fails = [line for line in md.splitlines() if line.startswith("- FAIL")]
    assert "R2 vs R1, base accuracy" in fails[0] and "difference +9.98 pp" in fails[0]
    assert "NOT shown equivalent within +-3 pp" in fails[0]
    assert "settings differ (blocksize: 64 vs 128)" in fails[1]
    assert "No ROCm run was compared" not in md
    assert "| blocksize | yes | 64 | 128 |" in md


def test_margin_option_changes_the_verdict(tmp_path):
    a, b = scores(0, accuracy=0.3), scores(0, accuracy=0.3)
    flipped = list(b.questions)
    for i in [i for i, q in enumerate(flipped) if not q.correct][:6]:  # +2 points on 300 questions
        flipped[i] = QuestionResult(flipped[i].qid, flipped[i].answer, flipped[i].answer, flipped[i].logprobs)
    paths = saved(tmp_path, make_record(before=a, after=a, adapter_dir=None),
                  make_record(before=dataclasses.replace(b, questions=tuple(flipped)), after=a, adapter_dir=None))
    tight = build_report(load_inputs(paths), Tolerances(margin_pp=1.0))
    assert any(not f.ok and "NOT shown equivalent within +-1 pp" in f.text for f in tight.findings)
    loose = build_report(load_inputs(paths), Tolerances(margin_pp=30.0))
    assert all(f.ok or "log-probabilities" in f.text for f in loose.findings)


def test_metrics_are_ratios_to_the_baseline(tmp_path):
    paths = saved(tmp_path, make_record("cpu", gpu=None), make_record())
    runs = load_inputs(paths, baseline=paths[1])  # the cuda run first
    assert [r.backend for r in runs] == ["cuda", "cpu"]
    table = metrics_table(runs, runs[0]).set_index(["run", "metric"])
    assert table.loc[(runs[0].label, "train tokens/s"), "ratio"] == 1.0
    assert table.loc[(runs[1].label, "train tokens/s"), "ratio"] == pytest.approx(3000 / 4000)
    low, high = table.loc[(runs[1].label, "train tokens/s"), ["low", "high"]]
    assert low < 3000 < high  # IQR band of the timed steps


def test_benchmark_file_becomes_runs_per_kernel(tmp_path):
    path = bench_file(tmp_path / "0001_mi300.json", scores(0), oom=True)
    sdpa, eager = summarize_file(path)
    assert (sdpa.kind, sdpa.backend, sdpa.kernel) == ("benchmark:ours", "rocm", "ck")
    assert sdpa.device == "AMD Instinct MI300X"
    assert sdpa.metrics["train_tokens_per_s"].value == 5000.0
    assert sdpa.metrics["train_tokens_per_s"].low == pytest.approx(5000 * 0.5 / 0.6)  # from the rounds' q3
    assert sdpa.metrics["prefill_tokens_per_s"].value == 40000.0  # the batch-8 case, not batch 1
    assert sdpa.metrics["ttft_s"].value == 0.05  # one request: the batch-1 case
    assert sdpa.metrics["decode_tokens_per_s"].value == 300.0
    assert sdpa.metrics["decode_compiled_tokens_per_s"].value == 420.0
    assert sdpa.metrics["peak_mem_gib"].value == 30.0 and sdpa.metrics["mfu"].value == 0.31
    assert sdpa.metrics["questions_per_s"].value == 60.0
    assert sdpa.phases[BASE].n_questions == N and sdpa.quantization["blocksize"] == 128
    assert sdpa.fingerprint["git_commit"] == "def456" and sdpa.schema == "pytest-benchmark 5.2.3"
    assert sdpa.notes == ("weights: random preset (seed 0): speed, not medical knowledge",)
    assert eager.kernel == "eager (out of memory)" and eager.notes == (
        "test_train_ours[eager]: out of memory during timed round 1 (HIP out of memory)",)


def test_benchmark_questions_may_come_as_a_list_named_questions():
    qs = [dataclasses.asdict(q) for q in scores(0).questions]
    data = {"machine_info": {"medqa_fingerprint": {"backend": "cuda", "gpu_name": "NVIDIA H100"}}, "version": "5.2.3",
            "benchmarks": [{"name": "test_accuracy[sdpa]", "stats": {}, "extra_info": {"questions": qs}}]}
    (run,) = summarize_benchmark(data, "h100.json")
    assert run.phases[BASE].n_questions == N and run.kernel == "unknown" and run.model_name is None


def test_report_mixes_a_record_and_a_benchmark_file(tmp_path):
    (record,) = saved(tmp_path, make_record())
    bench = bench_file(tmp_path / "0001_mi300.json", scores(0), oom=True, reference=True)
    report, _ = make_report([record, bench], tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert [r.kind for r in report.runs] == ["run", "benchmark:ours", "benchmark:ours", "benchmark:reference"]
    assert len(report.pairs) == 2 and [ph.phase for ph in report.pairs[0].phases] == [BASE]
    assert report.pairs[1].phases == ()  # the kernel that ran out of memory scored nothing
    assert "R4 is bench/'s reference arm" in md and "| train speedup vs reference arm | - | 1.25x |" in md
    assert "R3: test_train_ours[eager]: out of memory during timed round 1 (HIP out of memory)" in md
    assert report.verdict == "holds"  # same scores; NF4 blocksize 128 vs 64 is flagged, not failed
    assert "- FLAG: R2 vs R1: settings differ: blocksize: 64 vs 128" in md
    assert "| prefill tokens/s | - | 40,000 tokens/s |" in md


def test_scored_adapter_is_checked_against_its_training_run(tmp_path):
    trained = make_record()
    scored = make_record("rocm", gpu="AMD Instinct MI300X", kind="evaluate", train=None, eval_before=None,
                         eval_after=scores(100, base=1, noise=0.02), adapter_dir="/copied/cuda-adapter")
    other = make_record("cpu", gpu=None, adapter_dir="runs/adapters/cpu-adapter")
    paths = saved(tmp_path, other, trained, scored)
    report = build_report(load_inputs(paths), Tolerances())
    (pair,) = report.adapter_pairs  # R2 trained it, R3 scored it; R1 is the baseline
    assert (pair.a, pair.b) == ("R2", "R3") and pair.phases[0].phase == FINE_TUNED and pair.phases[0].same_weights
    assert report.pairs[1].phases[0].same_weights is False  # R3 vs R1: another adapter
    make_report(paths, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert re.search(r"R3 \(rocm, AMD Instinct MI300X\) scored the adapter trained by R2 \(cuda, NVIDIA H100 80GB "
                     r"HBM3\): "
                     r"predictions agree on \d+\.\d% of 300 questions, mean KL [0-9.e+-]+ nats: within the tolerance "
                     r"of 0.01 nats", md)


def test_different_question_sets_are_refused(tmp_path):
    paths = saved(tmp_path, make_record(), make_record(eval_before=scores(0, n=N - 1)))
    with pytest.raises(CompareError, match=r"in1/.*\(R2 .*\) vs .*in0/.*\(R1 .*\), base scores: different question "
                                          r"sets: 300 vs 299 questions, 1 only in run A \(test.jsonl:300\)"):
        make_report(paths, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"name": "small", "parameters": 1, "trainable_parameters": 0, "quantization": QUANT}},
     "different models, 'small' vs 'mistral-7b'"),
    ({"model": {"name": "mistral-7b", "parameters": 7_000, "trainable_parameters": 1_000, "quantization": QUANT}},
     "different model shapes, 6,000 vs 7,241,732,096 base parameters"),
    ({"config": {"model": {"seed": 1}}}, "different model weights, preset seed 1 vs 0"),
])
def test_other_models_are_refused(tmp_path, change, message):
    paths = saved(tmp_path, make_record(), make_record(**change))
    with pytest.raises(CompareError, match=re.escape(message)):
        make_report(paths, tmp_path / "out")


def test_unknown_files_are_refused_naming_found_and_expected(tmp_path):
    (path,) = saved(tmp_path, make_record())
    d = json.loads(path.read_text())
    d["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(CompareError, match=rf"{re.escape(str(path))}: schema_version {SCHEMA_VERSION + 1}, "
                                          rf"expected {SCHEMA_VERSION}"):
        summarize_file(path)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"accuracy": 0.7}))
    with pytest.raises(CompareError, match=r"other.json: found an object with keys accuracy; expected a run record "
                                          r"\(schema_version 2, .*\) or a pytest-benchmark file"):
        summarize_file(other)
    bench = tmp_path / "plain_bench.json"
    bench.write_text(json.dumps({"machine_info": {}, "benchmarks": []}))
    with pytest.raises(CompareError, match="without machine_info.medqa_fingerprint"):
        summarize_file(bench)


def test_markdown_table_escapes_pipes():
    import pandas as pd

    assert markdown_table(pd.DataFrame({"a": ["x|y"], "b": [1]})) == "| a | b |\n| --- | --- |\n| x\\|y | 1 |"


def test_cli_report_writes_files_and_errors_in_one_line(tmp_path, capsys):
    paths = [str(p) for p in saved(tmp_path, make_record(), make_record("cpu", gpu=None))]
    assert main(["report", *paths, "--out", str(tmp_path / "out"), "--baseline", paths[1], "--margin", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Parity holds across 2 run records (baseline R1 cpu CPU sdpa-flash).")
    assert "equivalent within +-5 pp" in out and (tmp_path / "out" / "report.html").is_file()
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    assert main(["report", paths[0], str(bad), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medqa-parity: error: ") and str(bad) in err and "\n" not in err
    assert main(["report", paths[0], "--out", str(tmp_path / "o3")]) == 2
    assert "a report compares at least two" in capsys.readouterr().err


def test_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    from medqa_core.report import render

    paths = saved(tmp_path, make_record(), make_record("cpu", gpu=None, seed=1, noise=1e-3))
    out = tmp_path / "report"

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(render, "_render_html", broken)
    with pytest.raises(OSError):
        make_report(paths, out)
    assert not out.exists() and not list(tmp_path.glob(".report.*"))  # no empty or half-written folder


def test_labels_name_the_cpu_model_where_cpu_runs_differ(tmp_path):
    a = make_record("cpu", gpu=None)
    b = make_record("cpu", gpu=None, seed=1, noise=1e-3)
    b = dataclasses.replace(b, fingerprint={**b.fingerprint, "cpu_model": "AMD EPYC 7B13 64-Core Processor"})
    runs = load_inputs(saved(tmp_path, a, b))
    assert runs[1].label.startswith("R2 cpu EPYC 7B13 64-Core ") and " CPU " not in runs[1].label
    assert runs[0].label != runs[1].label.replace("EPYC 7B13 64-Core", runs[0].label.split(" ")[2])


def test_other_compute_dtype_and_eval_packing_are_flagged_by_name(tmp_path):
    a = make_record()
    a = dataclasses.replace(a, config={**a.config, "eval": {"packing": True}})
    config = {**a.config, "eval": {"packing": False}, "model": {**a.config["model"], "dtype": "fp32"}}
    b = dataclasses.replace(make_record(seed=1, noise=1e-3), config=config)
    report = build_report(load_inputs(saved(tmp_path, a, b)), Tolerances())
    flags = [f.text for f in report.findings if f.status == "flag"]
    assert any("settings differ: compute dtype: bfloat16 vs float32; eval packing: True vs False" in f for f in flags)
    assert "float32" in report.runs[1].label and "eval packing False" in report.runs[1].label


def test_p_values_below_a_thousandth_never_print_as_zero(tmp_path):
    paths = saved(tmp_path, make_record(), make_record("cpu", gpu=None, seed=1, noise=1e-3))
    make_report(paths, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert "p = 0)" not in md and "p = 0 " not in md and "p < 0.001" in md


def test_same_hardware_other_blocksize_measures_the_setting_not_parity(tmp_path):
    """Issue 15: blocksize 64 against 128 on one card is what the setting alone changes, reported in its own section."""
    a = make_record(before=scores(0, n=200))
    drifted = make_record(before=scores(0, n=200, noise=0.3), seed=1,
                          model={**make_record().model, "quantization": {**QUANT, "blocksize": 128}})
    report, _ = make_report(saved(tmp_path, a, drifted), tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert report.verdict == "not judged"
    assert "Parity not judged" in md and "- FAIL" not in md
    section = md.split("## What the settings alone change")[1].split("\n## ")[0]
    assert "R2 vs R1 (both cuda" in section and "blocksize: 64 vs 128" in section
    assert "log-probabilities |diff| mean" in section and "predictions agree on" in section
    # On other hardware the same difference stays a failure, with the setting named (the ROCm test above).


def test_fp8_against_bf16_on_one_card_is_a_setting_with_its_fine_tuned_drift(tmp_path):
    """Issue 31: the committed H100 fp8 run against the bf16 run of the same batches. fp8 is named as the setting
    (with the formats that ran), and the fine-tuned model's drift (KL, |diff|) is what it changed."""
    runs = ROOT / "results" / "runs"
    paths = [runs / "20261206T065855Z_run_mistral-7b_cuda_c40acc51.json",
             runs / "20261206T070103Z_run_mistral-7b_cuda_a5e3bf4f.json"]
    report, _ = make_report(paths, tmp_path / "out")
    md = (tmp_path / "out" / "report.md").read_text()
    assert report.verdict == "not judged"
    assert "fp8 e4m3fn/e5m2" in report.runs[1].label and "fp8 off" in report.runs[0].label
    section = md.split("## What the settings alone change")[1].split("\n## ")[0]
    assert "fp8 base matmuls: off vs e4m3fn/e5m2" in section
    fine_tuned = section.split("fine-tuned: ")[1]
    assert fine_tuned.startswith("log-probabilities |diff| mean") and "mean KL" in fine_tuned
