"""The inference table (compare.inference): per 4-bit kernel and batch, in the parity report and README.

Built on the committed H200 bench file that ran our Triton NF4 kernel beside bitsandbytes' (no torch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from medqa_core.compare.inference import inference_rows, newest_inference_rows
from medqa_core.compare.inputs import read_bench_file
from medqa_core.report.render import make_report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "results" / "bench" / "Linux-CPython-3.12-64bit"
KERNELS = BENCH / "0017_h200-cuda-nf4-decode-v1.json"  # test_decode_compiled[sdpa-batch1-{triton,bitsandbytes}]
NO_KERNELS = BENCH / "0010_h200-cuda-decode.json"  # compiled decode before the kernel arms existed
# One H100 call, one pytest session per kernel arm: ours in 0018, bitsandbytes' in 0019 (same commit).
H100_OURS = BENCH / "0018_h100-cuda-nf4-decode-v3-triton.json"
H100_BNB = BENCH / "0019_h100-cuda-nf4-decode-v3-bnb.json"
# Another H100 call: batches 1 and 8 one session per arm (0021 ours, 0022 bitsandbytes'), then 32 and 64 both arms.
V5 = [BENCH / f"{name}.json" for name in ("0021_h100-cuda-nf4-decode-v5-triton", "0022_h100-cuda-nf4-decode-v5-bnb",
                                          "0023_h100-cuda-nf4-decode-v5-32-64")]


def _decode_figures(path: Path) -> dict[str, float]:
    return {b["name"]: b["extra_info"]["decode_tokens_per_s"] for b in json.loads(path.read_text())["benchmarks"]}


def test_one_row_per_kernel_arm_ours_first_with_the_saved_figures():
    rows = inference_rows(read_bench_file(KERNELS))
    saved = _decode_figures(KERNELS)
    assert [(r.kernel, r.batch) for r in rows] == [("triton", 1), ("bitsandbytes", 1)]
    assert [r.decode_tokens_per_s for r in rows] == [saved["test_decode_compiled[sdpa-batch1-triton]"],
                                                     saved["test_decode_compiled[sdpa-batch1-bitsandbytes]"]]
    assert all(r.device == "NVIDIA H200" and 0 < r.roofline_fraction < 1 and r.ttft_s > 0 for r in rows)


def test_a_file_without_kernel_arms_gives_no_row_and_is_not_the_newest():
    assert inference_rows(read_bench_file(NO_KERNELS)) == []
    benches = [read_bench_file(p) for p in (KERNELS, NO_KERNELS)]
    assert {r.path for r in newest_inference_rows(benches)} == {str(KERNELS)}


def test_arms_saved_as_two_files_of_one_call_join_but_another_commit_never_does(tmp_path):
    benches = [read_bench_file(p) for p in (KERNELS, H100_OURS, H100_BNB)]
    rows = [(r.device, r.kernel, r.batch, Path(r.path).name) for r in newest_inference_rows(benches)]
    assert rows == [("NVIDIA H200", "triton", 1, KERNELS.name), ("NVIDIA H200", "bitsandbytes", 1, KERNELS.name),
                    ("NVIDIA H100 80GB HBM3", "triton", 1, H100_OURS.name),
                    ("NVIDIA H100 80GB HBM3", "triton", 8, H100_OURS.name),
                    ("NVIDIA H100 80GB HBM3", "bitsandbytes", 1, H100_BNB.name),
                    ("NVIDIA H100 80GB HBM3", "bitsandbytes", 8, H100_BNB.name)]
    # The same bitsandbytes file under another commit: not the same code, so ours stands alone.
    data = json.loads(H100_BNB.read_text())
    data["machine_info"]["medqa_fingerprint"]["git_commit"] = "0" * 40
    other = tmp_path / "other-commit.json"
    other.write_text(json.dumps(data))
    alone = newest_inference_rows([read_bench_file(p) for p in (H100_OURS, other)])
    assert [(r.kernel, r.batch) for r in alone] == [("triton", 1), ("triton", 8)]


def test_the_batches_of_one_call_saved_as_three_files_join_newest_per_kernel_and_batch():
    benches = [read_bench_file(p) for p in (H100_OURS, H100_BNB, *V5)]
    rows = [(r.kernel, r.batch, Path(r.path).name) for r in newest_inference_rows(benches)]
    assert rows == [("triton", 1, V5[0].name), ("triton", 8, V5[0].name), ("triton", 32, V5[2].name),
                    ("triton", 64, V5[2].name), ("bitsandbytes", 1, V5[1].name), ("bitsandbytes", 8, V5[1].name),
                    ("bitsandbytes", 32, V5[2].name), ("bitsandbytes", 64, V5[2].name)]


def test_the_parity_report_shows_the_inference_table_of_its_bench_inputs(tmp_path):
    _, written = make_report([NO_KERNELS, KERNELS], tmp_path / "with")
    md = (tmp_path / "with" / "report.md").read_text()
    section = md.split("## Inference", 1)[1].split("\n## ", 1)[0]
    assert "ours (Triton)" in section and "bitsandbytes" in section and KERNELS.name in section
    assert f"{_decode_figures(KERNELS)['test_decode_compiled[sdpa-batch1-triton]']:,.0f}" in section
    _, _ = make_report([NO_KERNELS, BENCH / "0007_h200-cuda-decode.json"], tmp_path / "without")
    assert "## Inference" not in (tmp_path / "without" / "report.md").read_text()  # no kernel arm: no section


def test_our_attention_is_its_own_row_beside_the_models_of_the_same_call(tmp_path):
    # The same call's ours-arm file again, as the bench saves it with --decode-attention triton
    data = json.loads(H100_OURS.read_text())
    for b in data["benchmarks"]:
        b["extra_info"]["decode_attention"] = "triton-decode (medqa_core.engine.kernels)"
        b["extra_info"]["decode_tokens_per_s"] = b["extra_info"].get("decode_tokens_per_s") and 1234.0
    ours_attention = tmp_path / "0099_h100-attn-triton.json"
    ours_attention.write_text(json.dumps(data))
    rows = newest_inference_rows([read_bench_file(p) for p in (H100_OURS, H100_BNB, ours_attention)])
    assert [(r.kernel_name, r.batch, Path(r.path).name) for r in rows] == [
        ("ours (Triton)", 1, H100_OURS.name), ("ours (Triton)", 8, H100_OURS.name),
        ("ours (Triton) + our attention", 1, ours_attention.name),
        ("ours (Triton) + our attention", 8, ours_attention.name),
        ("bitsandbytes", 1, H100_BNB.name), ("bitsandbytes", 8, H100_BNB.name)]
    assert [r.decode_tokens_per_s for r in rows if r.attention == "triton"] == [1234.0, 1234.0]


def test_attention_arms_of_one_session_are_rows_of_their_own(tmp_path):
    # --decode-attention model,triton: one file whose case names end in the attention
    data = json.loads(H100_OURS.read_text())
    arms = []
    for b in data["benchmarks"]:
        if not b["name"].startswith("test_decode_compiled["):
            arms.append(b)
            continue
        for attention in ("model", "triton"):
            arm = json.loads(json.dumps(b))
            arm["name"] = arm["fullname"] = b["name"][:-1] + f"-attn-{attention}]"
            arm["extra_info"]["decode_attention"] = ("triton-decode (medqa_core.engine.kernels)"
                                                     if attention == "triton" else "model: sdpa")
            arms.append(arm)
    data["benchmarks"] = arms
    both = tmp_path / "0099_h100-attn-model-triton.json"
    both.write_text(json.dumps(data))
    rows = newest_inference_rows([read_bench_file(both)])
    assert [(r.kernel_name, r.batch) for r in rows] == [
        ("ours (Triton)", 1), ("ours (Triton)", 8), ("ours (Triton) + our attention", 1),
        ("ours (Triton) + our attention", 8)]


def test_an_ab_arm_run_away_from_the_defaults_is_never_the_tables_row():
    # One H100 call (session 49): PDL off (0049), the defaults (0050), inductor's tuning on (0051), in that order.
    off, default, tuned = (BENCH / f"{name}.json" for name in (
        "0049_h100-cuda-nf4-decode-v17-pdl-off-ab2-triton", "0050_h100-cuda-nf4-decode-v17-pdl-on-ab2-triton",
        "0051_h100-cuda-nf4-decode-v17-inductor-tuned-triton"))
    assert [r.switch for r in inference_rows(read_bench_file(off))] == ["MEDQA_PDL=0"]
    assert [r.kernel_name for r in inference_rows(read_bench_file(tuned))] == [
        "ours (Triton) + our attention (MEDQA_INDUCTOR_TUNING=1)"]
    assert [r.switch for r in inference_rows(read_bench_file(default))] == ["", ""]
    # Newer files of the same code, but A/B arms: the defaults' rows stand, whatever the order.
    for order in ((default, tuned), (default, off), (off, default, tuned)):
        rows = newest_inference_rows([read_bench_file(p) for p in order])
        assert [(r.batch, Path(r.path).name) for r in rows] == [(1, default.name), (8, default.name)]
    saved = {b["name"]: b["extra_info"].get("decode_tokens_per_s")
             for b in json.loads(default.read_text())["benchmarks"]}
    assert rows[0].decode_tokens_per_s == saved["test_decode_compiled[sdpa-batch1-triton]"]


def test_a_decode_figure_that_is_nan_is_never_a_row_and_never_replaces_a_good_one(tmp_path):
    default = BENCH / "0050_h100-cuda-nf4-decode-v17-pdl-on-ab2-triton.json"
    data = json.loads(default.read_text())
    for b in data["benchmarks"]:
        if b["name"] == "test_decode_compiled[sdpa-batch1-triton]":
            b["extra_info"]["decode_tokens_per_s"] = float("nan")
    damaged = tmp_path / "0099_h100-nan.json"
    damaged.write_text(json.dumps(data))  # the same code, written after: newer
    assert [r.batch for r in inference_rows(read_bench_file(damaged))] == [8]
    rows = newest_inference_rows([read_bench_file(p) for p in (default, damaged)])
    assert [(r.batch, Path(r.path).name) for r in rows] == [(1, default.name), (8, damaged.name)]
    assert all(math.isfinite(r.decode_tokens_per_s) for r in rows)


def test_a_newer_commit_timing_some_batches_replaces_those_batches_only():
    # Session 49 (commit 749481f): ours and bitsandbytes' at batch 1 and 8 (0050, 0052), at 32 and 64 (0053-0055).
    # Session 52 (commit 8e4d88d): ours only, at 32 and 64, with the model's attention (0057) and ours (0059).
    old = [BENCH / f"{name}.json" for name in (
        "0050_h100-cuda-nf4-decode-v17-pdl-on-ab2-triton", "0052_h100-cuda-nf4-decode-v17-bnb",
        "0053_h100-cuda-nf4-decode-v17-batch32-64-triton", "0054_h100-cuda-nf4-decode-v17-batch32-bnb",
        "0055_h100-cuda-nf4-decode-v17-batch64-bnb")]
    new = [BENCH / f"{name}.json" for name in (
        "0057_h100-cuda-nf4-decode-v18-mma-tiles-batch32-64-sdpa-triton",
        "0059_h100-cuda-nf4-decode-v18-mma-tiles-batch32-64-triton")]
    rows = [(r.kernel_name, r.batch, Path(r.path).name[:4]) for r in newest_inference_rows(
        [read_bench_file(p) for p in (*old, *new)])]
    assert rows == [
        ("ours (Triton)", 32, "0057"), ("ours (Triton)", 64, "0057"),
        ("ours (Triton) + our attention", 1, "0050"), ("ours (Triton) + our attention", 8, "0050"),
        ("ours (Triton) + our attention", 32, "0059"), ("ours (Triton) + our attention", 64, "0059"),
        ("bitsandbytes", 1, "0052"), ("bitsandbytes", 8, "0052")]  # 32 and 64: not of the newer code
    # Without the newer files, the older code's rows at 32 and 64 stand, bitsandbytes' beside them.
    older = [(r.kernel, r.batch, Path(r.path).name[:4]) for r in newest_inference_rows(
        [read_bench_file(p) for p in old]) if r.batch >= 32]
    assert older == [("triton", 32, "0053"), ("triton", 64, "0053"), ("bitsandbytes", 32, "0054"),
                     ("bitsandbytes", 64, "0055")]


def test_a_case_with_the_scales_decoded_at_load_is_an_ab_arm(tmp_path):
    # v20's switch (MEDQA_NF4_SCALES=float32), recorded by the decoder's setup: an A/B arm, never the table's row
    default = BENCH / "0050_h100-cuda-nf4-decode-v17-pdl-on-ab2-triton.json"
    data = json.loads(default.read_text())
    for b in data["benchmarks"]:
        b["extra_info"]["nf4_scales"] = "float32: decoded once as the layers were swapped in (MEDQA_NF4_SCALES=float32)"
    arm = tmp_path / "0099_h100-float32-scales.json"
    arm.write_text(json.dumps(data))
    assert {r.switch for r in inference_rows(read_bench_file(arm))} == {"MEDQA_NF4_SCALES=float32"}
    rows = newest_inference_rows([read_bench_file(p) for p in (default, arm)])
    assert {Path(r.path).name for r in rows} == {default.name}


def test_a_compiled_prefill_gives_the_rows_prefill_rate_and_eager_is_an_ab_arm(tmp_path):
    # MEDQA_PREFILL (medqa_core.engine.decoding.prefill_choice's lines): a decoder that compiled its prefill gives
    # its own prompt tokens over its time to first token; one run with the prefill eager is an A/B arm
    default = BENCH / "0063_h100-cuda-nf4-decode-v22-bitsandbytes-order-triton.json"
    eager_rows = inference_rows(read_bench_file(default))  # before MEDQA_PREFILL: the file's eager prefill case
    data = json.loads(default.read_text())
    assert [r.prefill for r in eager_rows] == ["eager"] * len(eager_rows)
    assert [r.prefill_tokens_per_s for r in eager_rows] == [
        b["extra_info"]["prefill_tokens_per_s"] for r in eager_rows for b in data["benchmarks"]
        if b["name"] == f"test_prefill[sdpa-batch{r.batch}]"]
    for line, name in (("compiled: once for the first prompt's length, replayed as a CUDA graph (other lengths run "
                        "eagerly)", "0099_compiled.json"), ("eager: MEDQA_PREFILL=eager", "0100_eager.json")):
        for b in data["benchmarks"]:
            b["extra_info"]["prefill"] = line
        (tmp_path / name).write_text(json.dumps(data))
    compiled = inference_rows(read_bench_file(tmp_path / "0099_compiled.json"))
    assert [r.prefill for r in compiled] == ["compiled"] * len(compiled) and compiled
    assert all(r.prefill_tokens_per_s == r.batch * 256 / r.ttft_s for r in compiled)
    assert {r.switch for r in inference_rows(read_bench_file(tmp_path / "0100_eager.json"))} == {"MEDQA_PREFILL=eager"}
    # a compiled prefill whose time to first token is NaN (a broken timer): neither that time nor a prefill rate
    for b in data["benchmarks"]:
        b["extra_info"]["prefill"] = "compiled: once for the first prompt's length, no graph"
        if "ttft_s_median" in b["extra_info"]:
            b["extra_info"]["ttft_s_median"] = float("nan")
    (tmp_path / "0101_nan.json").write_text(json.dumps(data))
    broken = inference_rows(read_bench_file(tmp_path / "0101_nan.json"))
    assert broken and [(r.ttft_s, r.prefill_tokens_per_s) for r in broken] == [(None, None)] * len(broken)
