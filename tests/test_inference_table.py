"""The inference table (compare.inference): per 4-bit kernel and batch, in the parity report and README.

Built on the committed H200 bench file that ran our Triton NF4 kernel beside bitsandbytes' (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from medqa_core.compare.inference import inference_rows, newest_kernel_benches
from medqa_core.compare.inputs import read_bench_file
from medqa_core.report.render import make_report

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "results" / "bench" / "Linux-CPython-3.12-64bit"
KERNELS = BENCH / "0017_h200-cuda-nf4-decode-v1.json"  # test_decode_compiled[sdpa-batch1-{triton,bitsandbytes}]
NO_KERNELS = BENCH / "0010_h200-cuda-decode.json"  # compiled decode before the kernel arms existed


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
    assert [b.path for b in newest_kernel_benches(benches)] == [str(KERNELS)]


def test_the_parity_report_shows_the_inference_table_of_its_bench_inputs(tmp_path):
    _, written = make_report([NO_KERNELS, KERNELS], tmp_path / "with")
    md = (tmp_path / "with" / "report.md").read_text()
    section = md.split("## Inference", 1)[1].split("\n## ", 1)[0]
    assert "ours (Triton)" in section and "bitsandbytes" in section and KERNELS.name in section
    assert f"{_decode_figures(KERNELS)['test_decode_compiled[sdpa-batch1-triton]']:,.0f}" in section
    _, _ = make_report([NO_KERNELS, BENCH / "0007_h200-cuda-decode.json"], tmp_path / "without")
    assert "## Inference" not in (tmp_path / "without" / "report.md").read_text()  # no kernel arm: no section
