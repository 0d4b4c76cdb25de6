"""`run --repeats/--seeds` on the tiny test model, `report` over run sets, and `check CLAIM.toml RUNSET...`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from medqa_core.cli import main
from medqa_core.compare.claims import (
    CONTRADICTED,
    HOLDS,
    NOT_CHECKABLE,
    Claim,
    LoadedSet,
    _accuracy_line,
    _parity_line,
    load_claim,
)
from medqa_core.compare.runsets import summarize
from medqa_core.results.runset import RunSet, load_runset
from tests.test_runsets import synthetic_set

CLAIMS = Path(__file__).resolve().parent.parent / "claims"
REPEATED, HACKATHON = CLAIMS / "mistral7b-mi250-repeated.toml", CLAIMS / "hackathon-qwen3-mi300x.toml"


@pytest.fixture(scope="module")
def tiny_runset(tiny_model_dir, tmp_path_factory) -> Path:
    """Two seeds and the repeat of the first, 2 steps each, on the tiny test model."""
    root = tmp_path_factory.mktemp("runset")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # adapters go to runs/adapters under the working directory
        code = main(["run", "--backend", "cpu", "--model", str(tiny_model_dir), "--seeds", "0,1", "--max-steps", "2",
                     "--batch-size", "4", "--train-limit", "8", "--eval-limit", "8", "--eval-every", "1",
                     "--curve-questions", "4", "--results", str(root / "runs")])
    assert code == 0
    (path,) = (root / "runsets").glob("*.json")
    return path


@pytest.mark.slow
def test_repeats_train_each_seed_and_the_floor_on_one_load(tiny_runset, capsys):
    runset, runs = load_runset(tiny_runset)
    assert runset.seeds == (0, 1) and [(r.entry.seed, r.entry.role) for r in runs] == [(0, "seed"), (1, "seed"),
                                                                                        (0, "repeat")]
    first, other, repeat = (r.record for r in runs)
    # The same seed on the same CPU repeats bit for bit; another seed trains another curve.
    assert repeat.train.loss_per_step == first.train.loss_per_step
    assert other.train.loss_per_step != first.train.loss_per_step
    assert [p["step"] for p in first.eval_curve] == [0, 1, 2] and first.eval_curve[0]["n_questions"] == 4
    assert first.eval_curve[0] == other.eval_curve[0]  # step 0 is the base model's, scored once for the set
    assert first.eval_before == other.eval_before and first.config["train"]["seed"] == 0
    assert other.config["train"]["seed"] == 1 and runset.summary["repeat"]["identical"]
    assert runset.summary["n_seeds"] == 2 and not Path(runset.runs[0].path).is_absolute()


@pytest.mark.slow
def test_report_and_check_read_run_sets(tiny_runset, tmp_path, capsys):
    code = main(["report", str(tiny_runset), str(tiny_runset), "--out", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 0
    assert "S2 vs S1: accuracy INCONCLUSIVE: N too small: 2 and 2 seed runs" in out
    md = (tmp_path / "report" / "report.md").read_text(encoding="utf-8")
    assert "## Run sets: the device effect against the seed spread" in md and "runset_loss.png" in md
    assert main(["check", str(HACKATHON), str(tiny_runset)]) == 4  # nothing of it can be checked here
    out = capsys.readouterr().out
    assert "NOT CHECKABLE HERE dataset" in out and "another dataset" in out
    # The repeated claim: another model ran here, so its figures are not judged; its cited source contradicts it.
    assert main(["check", str(REPEATED), str(tiny_runset)]) == 1
    out = capsys.readouterr().out
    assert "NOT CHECKABLE HERE accuracy" in out and "another model" in out
    assert "CONTRADICTED       source: dataset.name" in out


def test_repeats_flags_are_checked_before_anything_loads(capsys):
    assert main(["run", "--repeats", "2", "--seeds", "0,1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["run", "--seeds", "1,1"]) == 2
    assert "unique seeds" in capsys.readouterr().err
    assert main(["run", "--repeats", "0"]) == 2


def test_bad_claim_toml_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "claim.toml"
    bad.write_text('[claim]\ntitle = "x"\n[result]\naccuracy_pct = "high"\n', encoding="utf-8")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"medqa-parity: error: {bad}: [result] accuracy_pct: expected a number, got 'high'"
    bad.write_text('[claim]\ntitle = "x"\n[hardware]\ngpus = 2\n', encoding="utf-8")
    assert main(["check", str(bad)]) == 2
    assert "[hardware] gpus: unknown key" in capsys.readouterr().err
    bad.write_text('[claim\ntitle = "x"\n', encoding="utf-8")
    assert main(["check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not TOML" in err and len(err.strip().splitlines()) == 1


def test_shipped_claims_without_run_sets():
    assert load_claim(REPEATED).get("result", "accuracy_pct") == 72.3
    assert main(["check", str(HACKATHON)]) == 4
    assert main(["check", str(REPEATED)]) == 1  # its cited source says another model, dataset and GPU


def _set(backend: str, gpu: str, acc: float, seed: int, pretrained: bool = True) -> LoadedSet:
    fingerprint = {"backend": backend, "gpu_name": gpu, "torch_hip": "5.7.1" if backend == "rocm" else None}
    model = {"path": "/models/Mistral-7B-v0.1" if pretrained else None, "preset": "mistral-7b", "quant": "nf4"}
    runset = RunSet(fingerprint, {"model": model, "data": {"data_dir": "/data/medqa"}}, (0,), (), 8.5)
    return LoadedSet(f"{backend}.json", runset, (), summarize(synthetic_set(8, acc, 1.8, seed, sd_acc=0.005)))


def test_parity_and_accuracy_lines_judge_planted_sets():
    claim = load_claim(REPEATED)
    cuda = _set("cuda", "NVIDIA H100 80GB HBM3", 0.723, seed=1)
    same = _set("rocm", "AMD Instinct MI250X / MI250", 0.722, seed=2)
    far = _set("rocm", "AMD Instinct MI250X / MI250", 0.66, seed=2)  # 6 pp below CUDA: past the 3 pp claimed
    assert _parity_line(claim, [cuda, same], 0.05).status == HOLDS
    assert _parity_line(claim, [cuda, far], 0.05).status == CONTRADICTED
    assert _parity_line(claim, [cuda], 0.05).status == NOT_CHECKABLE
    assert _accuracy_line(claim, [same], 0.05).status == HOLDS
    assert _accuracy_line(claim, [far], 0.05).status == CONTRADICTED
    random = _set("rocm", "AMD Instinct MI250X / MI250", 0.25, seed=2, pretrained=False)
    line = _accuracy_line(claim, [random], 0.05)
    assert line.status == NOT_CHECKABLE and "random weights" in line.why
    other = Claim("x.toml", {**claim.tables, "dataset": {"name": "MedMCQA"}})
    assert "another dataset" in _accuracy_line(other, [same], 0.05).why
    assert math.isfinite(same.summary.accuracy.sd)
