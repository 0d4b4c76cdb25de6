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
