"""The lines a finished job prints, read from its saved record: each command's summary says what it did."""

from __future__ import annotations

from pathlib import Path

from medqa_core.engine.config import DataConfig
from medqa_core.engine.data import load_splits
from medqa_core.report.run_summary import summary_lines
from medqa_core.results.record import load_record

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs"
SCORED_ADAPTER = RUNS / "20261125T230158Z_evaluate_tiny_cpu_f19b0880.json"  # evaluate --adapter
SCORED_BASE = RUNS / "20261201T221830Z_evaluate_mistral-7b_cuda_0a286d7d.json"  # evaluate, the base model
RUN = RUNS / "20261201T230645Z_run_tiny_cpu_b9bb9e7f.json"


def _rows(path: Path) -> dict[str, str]:
    lines = summary_lines(load_record(path), path)
    return {line.split("  ", 1)[0]: line.split("  ", 1)[1].strip() for line in lines if "  " in line}


def test_evaluate_summary_scores_once_with_no_before_after_or_trainable_count():
    for path, what in ((SCORED_ADAPTER, "with the adapter"), (SCORED_BASE, "base model")):
        record, rows = load_record(path), _rows(path)
        scored = record.eval_after or record.eval_before
        assert "accuracy before" not in rows and "accuracy after" not in rows
        assert rows["accuracy"].startswith(f"{100 * scored.accuracy:.1f}%") and rows["accuracy"].endswith(what)
        assert rows["scoring"] == f"{scored.questions_per_s:,.1f} questions/s"  # the base model's scoring too
        assert "trainable" not in rows["model"]


def test_run_summary_keeps_before_and_after():
    rows = _rows(RUN)
    assert {"accuracy before", "accuracy after", "scoring"} <= rows.keys() and "trainable" in rows["model"]


def test_train_notes_name_only_the_split_it_fine_tuned_on():
    # The bundled subset has no train split: dev stands in for it.
    (note,) = load_splits(DataConfig(), evaluates=False).notes
    assert note.endswith("fine-tuned on dev") and "evaluated" not in note
    (note,) = load_splits(DataConfig()).notes
    assert note.endswith("fine-tuned on dev, evaluated on test")
