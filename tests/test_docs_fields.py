"""Docs name what the code has: every run record field, every preset, the cache variable, every command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from medqa_core.cli import build_parser
from medqa_core.engine.config import PRESETS
from medqa_core.results.measurements import MEASUREMENTS
from medqa_core.results.record import EvalResult, RunRecord, TrainResult

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


def test_run_record_doc_names_every_field_of_a_record():
    text = (DOCS / "run-record.md").read_text()
    section = text[text.index("## Run record"):text.index("## Bench case")]
    for cls in (RunRecord, TrainResult, EvalResult):
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in _words(section)]
        assert not missing, f"docs/run-record.md does not name {cls.__name__} fields {missing}"
    assert "`phases_s`" in section and "`mfu_datasheet`" in section


def test_run_record_doc_names_every_field_of_each_measurement():
    text = (DOCS / "run-record.md").read_text()
    section = text[text.index("## Measurements"):text.index("## Run record")]
    for cls in MEASUREMENTS.values():
        assert f"`{cls.__name__}`" in section
        missing = [f.name for f in dataclasses.fields(cls) if f"`{f.name}`" not in section]
        assert not missing, f"docs/run-record.md does not name {cls.__name__} fields {missing}"


def test_usage_doc_names_every_preset_the_cache_and_every_command():
    text = (DOCS / "usage.md").read_text()
    assert not [p for p in PRESETS if f"`{p}`" not in text], "a preset is missing from docs/usage.md"
    assert "MEDQA_PARITY_CACHE" in text
    commands = next(a.choices for a in build_parser()._actions if hasattr(a, "choices") and a.choices
                    and "run" in a.choices)
    assert not [c for c in commands if f"medqa-parity {c}" not in text], "a command is missing from docs/usage.md"
