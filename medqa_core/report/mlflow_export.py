"""Run records and bench figures into MLflow, where practitioners already keep their runs.

One MLflow run per run record, and per arm and attention kernel of a pytest-benchmark file, read through
the report's reader (:func:`~medqa_core.compare.inputs.summarize_file`): the performance figures of the metric
registry and each phase's accuracy as metrics (the loss curve as ``train_loss`` by step), the settings and a
record's whole config as params, backend, device, kernel and git commit as tags, and the file as an artifact.
A file exported again is found by its content hash and left as it is.

MLflow is an extra (``pip install -e ".[mlflow]"``), imported by :func:`export_files` only; the store is
MLflow's local one (a SQLite file, its default since the file store went into maintenance) under the
git-ignored ``runs/`` unless a tracking URI is given. The client is built for that URI: no global MLflow state
and no environment variable is set.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medqa_core.compare.inputs import RunSummary, device_label, read_result_file, summarize_result
from medqa_core.compare.metrics import METRICS
from medqa_core.results.record import RunRecord

logger = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "medqa-parity"
DEFAULT_STORE_DIR = "runs"  # git-ignored, beside runs/records: exporting leaves the checkout clean
ID_TAG = "medqa_parity_id"  # sha256 of the file, and which of its runs: finds a run exported before


class ExportError(ValueError):
    """The export cannot run: MLflow is not installed, or the tracking store refused; says what to do."""


@dataclass(frozen=True)
class MlflowRun:
    """What one MLflow run holds, built from one summary without MLflow (see :func:`mlflow_run`).

    Attributes:
        name: the run's name ("run tiny cpu CPU: Intel(R) Xeon(R) Processor sdpa-flash (cpu)").
        start_ms: when the run or bench file was written, in milliseconds since the epoch (None: unknown).
        params: settings and config, flattened to dotted keys, values as text.
        metrics: figures by key; NaN and inf are left out (named in the ``invalid`` tag).
        series: per-step metrics, (key, value, step).
        tags: where and how it ran, and :data:`ID_TAG`.
        failed: the job stopped (out of memory, a failed write, a signal).
    """

    name: str
    start_ms: int | None
    params: dict[str, str]
    metrics: dict[str, float]
    series: tuple[tuple[str, float, int], ...] = ()
    tags: dict[str, str] = field(default_factory=dict)
    failed: bool = False


@dataclass(frozen=True)
class Exported:
    """One exported run: the file it came from, its MLflow run id, and whether it was there already."""

    path: str
    name: str
    run_id: str
    existed: bool


def default_tracking_uri(folder: str | Path = DEFAULT_STORE_DIR) -> str:
    """MLflow's local store in ``folder``: ``sqlite:///<folder>/mlflow.db`` (absolute)."""
    return f"sqlite:///{(Path(folder) / 'mlflow.db').resolve()}"


def _start_ms(created: str) -> int | None:
    try:
        return int(datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def mlflow_run(run: RunSummary, file_id: str, config: Mapping[str, Any] | None = None) -> MlflowRun:
    """The MLflow run of one summary (no MLflow needed).

    Args:
        run: from :func:`summarize_file`.
        file_id: :data:`ID_TAG`'s value: the file's hash and the run's place in it.
        config: a run record's config (RunConfig.to_dict()), logged as ``config.*`` params.

    Returns:
        The run's name, params, metrics, per-step series and tags.
    """
    from medqa_core.compare.tables import flatten_dict  # with pandas: not loaded where the CLI only parses

    params = {"kind": run.kind, "model": run.model_name or "-", "backend": run.backend, "device": run.device,
              "attention_kernel": run.kernel, "schema": run.schema}
    params |= {f"settings.{k}": v for k, v in run.settings.items()}
    params |= {f"quantization.{k}": v for k, v in flatten_dict(run.quantization).items()}
    params |= {f"config.{k}": v for k, v in flatten_dict(config or {}).items()}
    metrics: dict[str, float] = {}
    invalid = [f.field for f in run.invalid]
    for spec in METRICS:
        m = run.metrics.get(spec.key)
        if m is not None and _finite(m.value):
            metrics[spec.key] = float(m.value)
        elif m is not None:
            invalid.append(spec.key)
    for phase, scores in run.phases.items():
        key = f"accuracy_{phase.replace('-', '_')}"  # "accuracy_base", "accuracy_fine_tuned"
        if _finite(scores.accuracy):
            metrics[key] = float(scores.accuracy)
        params[f"n_questions.{phase}"] = scores.n_questions
    series = tuple(("train_loss", float(v), i + 1) for i, v in enumerate(run.loss_per_step) if _finite(v))
    fp = run.fingerprint
    tags = {ID_TAG: file_id, "medqa_parity.file": Path(run.path).name, "backend": run.backend,
            "device": run.device, "attention_kernel": run.kernel, "model": run.model_name or "-"}
    if fp.get("git_commit"):
        tags["mlflow.source.git.commit"] = str(fp["git_commit"])
        tags["git_dirty"] = str(fp.get("git_dirty"))
    if invalid:
        tags["invalid"] = ", ".join(invalid)  # not finite or incomplete: left out of the metrics
    name = f"{run.kind} {run.model_name or '-'} {run.backend} {device_label(fp) if fp else run.device} {run.kernel}"
    return MlflowRun(name=name, start_ms=_start_ms(run.created), params={k: str(v) for k, v in params.items()},
                     metrics=metrics, series=series, tags=tags, failed=run.oom is not None)


def file_runs(path: str | Path) -> list[MlflowRun]:
    """Every MLflow run of one file: one for a run record, one per arm and kernel of a bench file.

    Raises:
        CompareError: the file is neither kind, or damaged (as for ``medqa-parity report``).
    """
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    result = read_result_file(path)  # read once: the summaries and the record's config come from the one reading
    summaries = summarize_result(result, str(path))
    config = result.config if isinstance(result, RunRecord) else None
    return [mlflow_run(s, f"{digest}#{i}", config) for i, s in enumerate(summaries)]


def export_files(paths: Sequence[str | Path], tracking_uri: str | None = None,
                 experiment: str = DEFAULT_EXPERIMENT) -> list[Exported]:
    """Log run records and bench files to MLflow, each run once.

    Args:
        paths: run records and/or pytest-benchmark files.
        tracking_uri: where to log (``http://host:5000``, ``sqlite:///path.db``, ``databricks``, ...); None:
            :func:`default_tracking_uri`.
        experiment: the MLflow experiment, created where missing (its artifacts under ``runs/mlartifacts``
            for the default store).

    Returns:
        One entry per run, in file order; ``existed`` where a run of the same file content was already there.

    Raises:
        ExportError: MLflow is not installed, or the store refused (bad URI, no server).
        CompareError: a file cannot be read (checked for every file before anything is logged).
    """
    try:
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient
    except ImportError as e:
        raise ExportError('the MLflow export needs mlflow: pip install -e ".[mlflow]"') from e
    runs = [(str(p), r) for p in paths for r in file_runs(p)]  # every file read before the first write
    default = tracking_uri is None
    uri = default_tracking_uri() if default else tracking_uri
    if default:
        Path(DEFAULT_STORE_DIR).mkdir(parents=True, exist_ok=True)
    client = MlflowClient(tracking_uri=uri)
    out = []
    try:
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            artifacts = (Path(DEFAULT_STORE_DIR) / "mlartifacts").resolve().as_uri() if default else None
            experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
        for path, run in runs:
            there = client.search_runs([experiment_id], filter_string=f"tags.{ID_TAG} = '{run.tags[ID_TAG]}'",
                                       max_results=1)
            if there:
                out.append(Exported(path, run.name, there[0].info.run_id, existed=True))
                continue
            made = client.create_run(experiment_id, start_time=run.start_ms, tags=run.tags, run_name=run.name)
            run_id = made.info.run_id
            stamp = run.start_ms or 0
            params = [Param(k, v) for k, v in run.params.items()]
            metrics = [Metric(k, v, stamp, 0) for k, v in run.metrics.items()] + \
                [Metric(k, v, stamp, step) for k, v, step in run.series]
            # MLflow takes at most 100 params and 1,000 metrics a batch (a long loss curve is more).
            for j in range(max(-(-len(params) // 100), -(-len(metrics) // 1000))):
                client.log_batch(run_id, params=params[100 * j:100 * (j + 1)], metrics=metrics[1000 * j:1000 * (j + 1)])
            client.log_artifact(run_id, path, artifact_path="medqa_parity")
            client.set_terminated(run_id, "FAILED" if run.failed else "FINISHED", end_time=run.start_ms)
            logger.debug("exported %s as MLflow run %s", path, run_id)
            out.append(Exported(path, run.name, run_id, existed=False))
    except MlflowException as e:
        raise ExportError(f"MLflow at {uri}: {str(e).splitlines()[0]}; pass --tracking-uri of a store you can "
                          "reach (default: a SQLite file under runs/)") from e
    return out
