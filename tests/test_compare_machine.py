"""`medqa-parity compare`: a user's newest run beside the committed runs of the same model on other hardware.

Built on the committed records of results/runs (no torch): a committed CPU run of the tiny preset stands in for
the user's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from medqa_core.cli import main
from medqa_core.report.machine import WIDTH
from medqa_core.results.record import load_record

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "runs"
CPU_RUN = COMMITTED / "20261201T230645Z_run_tiny_cpu_b9bb9e7f.json"  # bf16 on the 2-core Xeon
H100_RUN = COMMITTED / "20261125T225605Z_run_tiny_cuda_64c13035.json"  # the only tiny run on a GPU


def _mine(tmp_path: Path, src: Path = CPU_RUN, name: str | None = None) -> Path:
    records = tmp_path / "records"
    records.mkdir(exist_ok=True)
    return Path(shutil.copy(src, records / (name or src.name)))


def test_compare_sets_the_newest_run_beside_the_other_machine_with_verdict_and_ratios(tmp_path, capsys):
    older = json.loads(CPU_RUN.read_text())
    older["model"]["name"] = "not-this-one"  # were the older record taken, nothing would be compared
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "20200101T000000Z_run_tiny_cpu_00000000.json").write_text(json.dumps(older))
    _mine(tmp_path)
    assert main(["compare", str(tmp_path / "records"), "--committed", str(COMMITTED)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    # One screen wide; a line that holds only a path (copied as a whole) may be wider than that.
    assert all(len(line) <= WIDTH for line in lines if not line.removesuffix(" \\").endswith(".json")), \
        max(lines, key=len)
    # The newest tiny run of each other machine (the H100, and an AMD EPYC CPU since 2026-12-05); the other
    # runs of this Xeon and every mistral-7b run are left out.
    committed = [line for line in lines if line[:1] == "R" and line[2:].startswith(" committed")]
    assert "committed  cuda, NVIDIA H100 80GB HBM3, sdpa-cudnn" in out and f"  {H100_RUN}\n" in out
    assert committed and not any("Xeon" in line for line in committed) and "R4" not in out
    others = len(committed)
    assert f"Parity holds across {others + 1} run records" in out and "PASS: R2 vs R1, fine-tuned accuracy" in out
    mine, h100 = load_record(CPU_RUN), load_record(H100_RUN)
    # the figures report's table divides
    ratio = h100.train.throughput.tokens_per_s / mine.train.throughput.tokens_per_s
    (row,) = [line for line in lines if line.startswith("train tokens/s")]
    assert f"{mine.train.throughput.tokens_per_s:,.0f}" in row and f"({ratio:.2f}x)" in row
    assert "accuracy, fine-tuned" in out and f"{100 * mine.eval_after.accuracy:.1f}% of 512" in out
    assert "medqa-parity report --out report/ \\" in out


def test_compare_leaves_out_committed_runs_of_other_questions_and_says_why(tmp_path, capsys):
    mine = json.loads(CPU_RUN.read_text())
    for phase in ("eval_before", "eval_after"):
        mine[phase]["questions"] = mine[phase]["questions"][:100]
        mine[phase]["n_questions"] = 100
    path = tmp_path / "records" / CPU_RUN.name
    path.parent.mkdir()
    path.write_text(json.dumps(mine))
    assert main(["compare", str(path), "--committed", str(COMMITTED)]) == 2
    err = capsys.readouterr().err
    assert "no committed run record of tiny on other hardware" in err
    assert f"{H100_RUN.name}: scored 512 questions, yours 100" in err and "--eval-limit" in err


def test_compare_without_a_record_says_what_to_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "records"), "--committed", str(COMMITTED)]) == 2
    assert "run `medqa-parity run` first" in capsys.readouterr().err
