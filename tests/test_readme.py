"""README figures come from result files: the generated blocks must match them."""

from __future__ import annotations

from medqa_core import readme


def test_readme_matches_result_files():
    text = readme.ROOT.joinpath("README.md").read_text(encoding="utf-8")
    assert readme.render(text, readme.ROOT / "results") == text, "run: python -m medqa_core.readme"


def test_render_fills_blocks_from_records(tmp_path):
    (tmp_path / "runs").mkdir()
    text = "a\n<!-- generated:runs -->\nstale\n<!-- /generated:runs -->\nb\n"
    out = readme.render(text, tmp_path)
    assert "stale" not in out and "| record | device |" in out and out.startswith("a\n") and out.endswith("b\n")
