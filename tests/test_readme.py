"""README figures come from result files: the generated blocks must match them."""

from __future__ import annotations

import pytest

from medqa_core import readme


@pytest.mark.parametrize("name", readme.DOCUMENTS)
def test_documents_match_result_files(name):
    text = readme.ROOT.joinpath(name).read_text(encoding="utf-8")
    assert "<!-- generated:" in text
    assert readme.render(text, readme.ROOT / "results") == text, "run: python -m medqa_core.readme"


def test_render_fills_blocks_from_records(tmp_path):
    (tmp_path / "runs").mkdir()
    text = "a\n<!-- generated:runs -->\nstale\n<!-- /generated:runs -->\nb\n"
    out = readme.render(text, tmp_path)
    assert "stale" not in out and "| record | device |" in out and out.startswith("a\n") and out.endswith("b\n")


def _bench_file(folder, name, gpu, cases):
    import json

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
    rows = readme.decode_table(tmp_path).splitlines()[2:]
    assert len(rows) == 2 and all("0001_both" in row for row in rows)
    assert "`StaticDecoder`, HIP graph" in rows[0] and "| 12.0x |" in rows[0] and "9.00 J, 3.00 J" in rows[0]
    assert "| 8 |" in rows[1] and "| 20.0x |" in rows[1]  # each batch against eager at the same batch


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
    text = readme.performance_table(tmp_path)
    runs = [line.split("]")[0] for line in text.splitlines() if line.startswith("Run: [")]
    assert runs == ["Run: [0002.json", "Run: [0003.json"]  # the newest of each card
    h200, h100 = text.split("Run: [0003.json")
    assert "not measured: 512 questions scored" in h100 and "not measured" not in h200
