"""`medqa-parity export-mlflow` against a real MLflow store in a temp folder (skipped without the mlflow extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from medqa_core.cli import main
from medqa_core.compare.inputs import summarize_file
from medqa_core.report.mlflow_export import ID_TAG, default_tracking_uri, export_files
from medqa_core.results.record import load_record

mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed")

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "results" / "runs" / "20261201T230645Z_run_tiny_cpu_b9bb9e7f.json"
BENCH = ROOT / "results" / "bench" / "Linux-CPython-3.11-64bit" / "0007_cpu-ci.json"


def test_records_and_bench_files_land_in_mlflows_local_store_once(tmp_path, monkeypatch, capsys):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # the default store is runs/ of the working directory
    assert main(["export-mlflow", str(RECORD), str(BENCH)]) == 0
    assert (tmp_path / "runs" / "mlflow.db").is_file()
    for path in ("runs/mlflow.db", "runs/mlartifacts/x"):
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path}: the default store would dirty the checkout"
    client = MlflowClient(tracking_uri=default_tracking_uri())
    experiment = client.get_experiment_by_name("medqa-parity")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 + len(summarize_file(BENCH))  # a record; each arm and kernel of the bench file
    (run,) = [r for r in runs if r.data.tags["medqa_parity.file"] == RECORD.name]
    record = load_record(RECORD)
    assert run.data.metrics["train_tokens_per_s"] == pytest.approx(record.train.tokens_per_s)
    assert run.data.metrics["accuracy_fine_tuned"] == pytest.approx(record.eval_after.accuracy)
    assert run.data.metrics["accuracy_base"] == pytest.approx(record.eval_before.accuracy)
    loss = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in loss] == list(range(1, len(record.train.loss_per_step) + 1))
    assert [m.value for m in sorted(loss, key=lambda m: m.step)] == pytest.approx(record.train.loss_per_step)
    assert run.data.params["config.train.lr"] == str(record.config["train"]["lr"])
    assert run.data.params["settings.compute_dtype"] == "bfloat16" and run.data.tags["device"].startswith("CPU")
    assert run.data.tags["mlflow.source.git.commit"] == record.fingerprint["git_commit"]
    assert run.info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "medqa_parity")] == [f"medqa_parity/{RECORD.name}"]
    (ours,) = [r for r in runs if r.data.tags.get("model") == "tiny" and r.data.params["kind"] == "benchmark:ours"]
    assert ours.data.metrics["train_tokens_per_s"] > 0
    capsys.readouterr()
    # Exported again: found by the file's hash, nothing added.
    assert main(["export-mlflow", str(RECORD)]) == 0
    assert capsys.readouterr().out.startswith("already there: run tiny")
    assert len(client.search_runs([experiment.experiment_id])) == len(runs)


def test_a_tracking_uri_given_is_where_the_runs_go(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'team' / 'store.db'}"
    (tmp_path / "team").mkdir()
    (exported,) = export_files([RECORD], tracking_uri=uri, experiment="parity")
    assert not exported.existed and not (tmp_path / "runs").exists()
    run = MlflowClient(tracking_uri=uri).get_run(exported.run_id)
    assert run.data.tags[ID_TAG].endswith("#0")


def test_without_mlflow_the_export_says_what_to_install(monkeypatch, capsys):
    for name in [m for m in sys.modules if m == "mlflow" or m.startswith("mlflow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now fails, as where it is not installed
    assert main(["export-mlflow", str(RECORD)]) == 2
    err = capsys.readouterr().err
    assert err == 'medqa-parity: error: the MLflow export needs mlflow: pip install -e ".[mlflow]"\n'
