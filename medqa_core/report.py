"""Parity report: run records and pytest-benchmark files -> tables, charts, verdict, report.md/.html.

``medqa-parity report RUN RUN [RUN...] --out DIR`` reads every input into a :class:`RunSummary`
(a run record gives one; a benchmark file one per arm and attention kernel), refuses runs that
cannot be compared, compares every run with the baseline (and each scored adapter with the run
that trained it) through :mod:`medqa_core.parity`, and writes ``report.md``, a self-contained
``report.html`` (charts inlined as base64 PNG) and the charts as PNG files.

No torch here: a report is built on any machine from the saved files.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.stats import binomtest

from medqa_core.parity import (
    DEFAULT_MARGIN_PP,
    FAIL,
    FLAG,
    PASS,
    Finding,
    PairParity,
    ParityError,
    PhaseParity,
    Tolerances,
    compare_phase,
    judge_pair,
    loss_drift,
    quantization_differences,
    same_adapter,
)
from medqa_core.record import SCHEMA_VERSION, EvalResult, QuestionResult, RecordError, RunRecord, record_from_dict

logger = logging.getLogger(__name__)

BASE, FINE_TUNED = "base", "fine-tuned"
# bench/'s reference arm: the common-guide QLoRA recipe, timed beside ours for speedup_vs_reference.
REFERENCE_ARM = "benchmark:reference"
# (key, label, unit) of each performance figure, in table order.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("train_tokens_per_s", "train tokens/s", "tokens/s"),
    ("mfu", "train MFU", ""),
    ("step_time_s", "train step time (median)", "s"),
    ("peak_mem_gib", "peak device memory", "GiB"),
    ("host_rss_gib", "host RSS (peak)", "GiB"),
    ("prefill_tokens_per_s", "prefill tokens/s", "tokens/s"),
    ("decode_tokens_per_s", "decode tokens/s", "tokens/s"),
    ("decode_compiled_tokens_per_s", "decode tokens/s (torch.compile)", "tokens/s"),
    ("ttft_s", "time to first token", "s"),
    ("questions_per_s", "scoring questions/s", "questions/s"),
    ("speedup_vs_reference", "train speedup vs reference arm", "x"),
)
# Rates in a benchmark's extra_info; tokens_per_s is the train step's.
_RATES = ("tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "questions_per_s")
_THROUGHPUT = ("train_tokens_per_s", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_compiled_tokens_per_s",
               "questions_per_s")
_BACKEND_COLORS = {"cuda": "#4c9a2a", "rocm": "#c0392b", "cpu": "#7f8c8d"}
_FINGERPRINT_HIDDEN = ("hostname",)  # identifies a person's machine, not its hardware


class ReportError(ValueError):
    """An input cannot be read, or the runs cannot be compared; the message names the files and the difference."""


@dataclass(frozen=True)
class Metric:
    """A figure with its interquartile band (``low``/``high``, same unit) when one was measured."""

    value: float
    low: float | None = None
    high: float | None = None


@dataclass(frozen=True)
class PhaseScores:
    """One run's scores of one phase; ``questions`` is empty when a benchmark saved only the accuracy."""

    accuracy: float
    n_questions: int
    questions: tuple[QuestionResult, ...]

    @property
    def ci95(self) -> tuple[float, float]:
        """Wilson 95% interval of the accuracy (as in run records)."""
        k = round(self.accuracy * self.n_questions)
        ci = binomtest(k, self.n_questions).proportion_ci(0.95, method="wilson")
        return float(ci.low), float(ci.high)


@dataclass(frozen=True)
class RunSummary:
    """What the report needs of one run, whichever file it came from.

    Attributes:
        label: short unique name used in tables and charts ("R1 cuda H100 sdpa-cudnn").
        path: the input file.
        source: "record" or "benchmark".
        kind: record kind ("run", "train", "evaluate") or "benchmark:<arm>".
        backend, device, kernel: where and how it ran (kernel: attention that ran).
        model_name: model name (preset or folder), or None when not recorded (a case that ran out of memory).
        base_parameters: parameters without LoRA, or None when not recorded.
        seed: preset weight seed, or None when not recorded.
        quantization: settings read back from a quantized layer.
        fingerprint: machine fingerprint (medqa_core.fingerprint).
        metrics: performance figures by METRICS key.
        phases: per-question scores by phase ("base", "fine-tuned").
        loss_per_step: training loss per optimizer step (records only).
        adapter_dir: adapter saved (run/train) or scored (evaluate).
        schema: what the file was ("run record schema 1", "pytest-benchmark 5.2.3").
        created: when it was written.
        notes: caveats (random weights, out of memory, ...).
    """

    label: str
    path: str
    source: str
    kind: str
    backend: str
    device: str
    kernel: str
    model_name: str | None
    base_parameters: int | None
    seed: int | None
    quantization: Mapping[str, Any]
    fingerprint: Mapping[str, Any]
    metrics: Mapping[str, Metric]
    phases: Mapping[str, PhaseScores]
    loss_per_step: tuple[float, ...] = ()
    adapter_dir: str | None = None
    schema: str = ""
    created: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rid(self) -> str:
        """The run's short id ("R1"), the first word of its label."""
        return self.label.split(" ", 1)[0]


@dataclass(frozen=True)
class Report:
    """A built report: runs, comparisons, verdict; written by :func:`write_report`."""

    runs: tuple[RunSummary, ...]
    baseline: RunSummary
    pairs: tuple[PairParity, ...]
    adapter_pairs: tuple[PairParity, ...]
    findings: tuple[Finding, ...]
    tolerances: Tolerances
    notes: tuple[str, ...]

    @property
    def verdict(self) -> str:
        """"holds", "does not hold", or "not judged" (no per-question results in common)."""
        if any(not f.ok for f in self.findings):
            return "does not hold"
        judged = any(p.phases for p in (*self.pairs, *self.adapter_pairs))
        return "holds" if judged else "not judged"


# ---- reading inputs --------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """Parse one input file.

    Args:
        path: the file.

    Returns:
        The parsed JSON value.

    Raises:
        ReportError: unreadable or not JSON; names the file.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, broken JSON, absurd numbers or nesting
        raise ReportError(f"{path}: not JSON ({e}); expected a run record or a pytest-benchmark file") from e


def summarize_file(path: str | Path) -> list[RunSummary]:
    """Read a run record (one summary) or a pytest-benchmark file (one per arm and kernel).

    Labels are provisional ("?"); :func:`load_inputs` numbers them.

    Args:
        path: the file.

    Returns:
        Its runs.

    Raises:
        ReportError: neither kind of file, another schema version, or malformed fields; names the
            file, what was found and what was expected.
    """
    path = Path(path)
    data = read_json(path)
    try:
        if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
            return summarize_benchmark(data, str(path))
        if isinstance(data, dict) and "schema_version" in data:
            return [summarize_record(record_from_dict(data, where=str(path)), str(path))]
    except RecordError as e:
        raise ReportError(str(e)) from e
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        # A field of the wrong type or shape somewhere in a hand-edited or truncated-then-fixed file.
        raise ReportError(f"{path}: malformed field ({type(e).__name__}: {e}); expected a file as "
                          "pytest bench/ or medqa-parity wrote it") from e
    found = f"an object with keys {', '.join(sorted(data)[:8])}" if isinstance(data, dict) else type(data).__name__
    raise ReportError(f"{path}: found {found}; expected a run record (schema_version {SCHEMA_VERSION}, kind, "
                      "fingerprint, ...) or a pytest-benchmark file (machine_info, benchmarks)")


def load_inputs(paths: Sequence[str | Path], baseline: str | Path | None = None) -> list[RunSummary]:
    """Read every input, baseline first, and give each run a unique label.

    Args:
        paths: run records and/or pytest-benchmark files.
        baseline: the file to compare the others with (default: the first path); it is read
            even when not among ``paths``. Of a benchmark file, the first kernel of our arm is the baseline.

    Returns:
        Summaries, the baseline first, labelled R1, R2, ...

    Raises:
        ReportError: fewer than two runs, or an input that cannot be read.
    """
    ordered = [Path(p) for p in paths]
    if baseline is not None:
        b = Path(baseline)
        ordered = [b] + [p for p in ordered if p.resolve() != b.resolve()]
    runs = [s for p in ordered for s in summarize_file(p)]
    if len(runs) < 2:
        raise ReportError(f"{len(runs)} run(s) in {', '.join(map(str, ordered))}; a report compares at least two")
    return [_relabel(s, i + 1) for i, s in enumerate(runs)]


def _relabel(s: RunSummary, i: int) -> RunSummary:
    arm = " (reference)" if s.kind == REFERENCE_ARM else ""
    return replace(s, label=f"R{i} {s.backend} {_short_device(s.device)} {s.kernel}{arm}")


def _short_device(device: str) -> str:
    for prefix in ("NVIDIA ", "AMD ", "Instinct "):
        device = device.removeprefix(prefix)
    return "CPU" if device.startswith("CPU") else device


def _device(fp: Mapping[str, Any]) -> str:
    return fp.get("gpu_name") or f"CPU: {fp.get('cpu_model') or 'unknown'}"


def summarize_record(record: RunRecord, path: str) -> RunSummary:
    """One run record as a summary.

    Args:
        record: a loaded record.
        path: where it was read from.

    Returns:
        Its summary (label "?").
    """
    fp, model = record.fingerprint, record.model
    params, trainable = model.get("parameters"), model.get("trainable_parameters")
    phases = {}
    if record.eval_before is not None:
        phases[BASE] = _phase(record.eval_before)
    if record.eval_after is not None:
        phases[FINE_TUNED] = _phase(record.eval_after)
    return RunSummary(
        label="?", path=path, source="record", kind=record.kind, backend=str(fp.get("backend", "unknown")),
        device=_device(fp), kernel=str(record.attention.get("ran", "unknown")), model_name=_name(model.get("name")),
        base_parameters=_base_parameters(params, trainable),
        seed=(record.config.get("model") or {}).get("seed") if model.get("source") == "preset" else None,
        quantization=model.get("quantization") or {}, fingerprint=fp, metrics=_record_metrics(record),
        phases=phases, loss_per_step=record.train.loss_per_step if record.train else (),
        adapter_dir=record.adapter_dir, schema=f"run record schema {record.schema_version}",
        created=record.created_utc, notes=record.notes,
    )


def _name(value: Any) -> str | None:
    return None if value is None else str(value)


def _base_parameters(parameters: int | None, trainable: int | None) -> int | None:
    # Only a trainable adapter tells LoRA's share: an evaluate run loads its adapter frozen.
    if not parameters or not trainable:
        return None
    return parameters - trainable


def _phase(ev: EvalResult) -> PhaseScores:
    return PhaseScores(ev.accuracy, ev.n_questions, ev.questions)


def _record_metrics(record: RunRecord) -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    tr = record.train
    if tr is not None:
        timed = np.asarray(tr.step_time_s[len(tr.step_time_s) - tr.timed_steps:], dtype=float)
        q1, q3 = (np.percentile(timed, [25, 75]) if timed.size else (math.nan, math.nan))
        out["train_tokens_per_s"] = _rate(tr.tokens_per_s, tr.step_time_s_median, q1, q3)
        out["step_time_s"] = Metric(tr.step_time_s_median, float(q1), float(q3))
        out["host_rss_gib"] = Metric(tr.host_peak_rss_gib)
    peaks = [x for x in (tr.peak_mem_gib if tr else None, *(e.peak_mem_gib for e in _evals(record))) if x is not None]
    if peaks:
        out["peak_mem_gib"] = Metric(max(peaks))
    last = record.eval_after or record.eval_before
    if last is not None:
        out["questions_per_s"] = Metric(last.questions_per_s)
    return out


def _evals(record: RunRecord) -> list[EvalResult]:
    return [e for e in (record.eval_before, record.eval_after) if e is not None]


def _rate(rate: float, median_s: float | None, q1_s: float | None, q3_s: float | None) -> Metric:
    """A rate with the band of the same work timed at the quartiles (slower quartile = lower rate)."""
    if not median_s or not q1_s or not q3_s or not all(map(math.isfinite, (median_s, q1_s, q3_s))):
        return Metric(rate)
    return Metric(rate, rate * median_s / q3_s, rate * median_s / q1_s)


# ---- pytest-benchmark files ------------------------------------------------------------------


def summarize_benchmark(data: Mapping[str, Any], path: str) -> list[RunSummary]:
    """A pytest-benchmark file saved by ``pytest bench/``: one summary per arm and attention kernel.

    Fields are read by name and may be missing (a case that ran out of memory, a file from a
    bench/ that records fewer figures).

    Args:
        data: the parsed file.
        path: where it was read from.

    Returns:
        Summaries in file order of their first case (label "?").

    Raises:
        ReportError: no ``machine_info.medqa_fingerprint`` (not saved by medqa-parity's bench/) or
            no benchmark entries.
    """
    fp = (data.get("machine_info") or {}).get("medqa_fingerprint")
    if not isinstance(fp, dict):
        raise ReportError(f"{path}: a pytest-benchmark file without machine_info.medqa_fingerprint; expected one "
                          "saved by medqa-parity's bench/ (pytest bench/ --benchmark-save=NAME)")
    entries = [e for e in data.get("benchmarks") or [] if isinstance(e, dict)]
    if not entries:
        raise ReportError(f"{path}: a pytest-benchmark file with no benchmark entries; expected at least one case")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in entries:
        ei = e.get("extra_info") or {}
        requested = (ei.get("attention") or {}).get("requested") or ei.get("attention_requested") \
            or (e.get("params") or {}).get("attn") or "unknown"
        groups.setdefault((str(ei.get("arm", "ours")), str(requested)), []).append(e)
    meta = {"schema": f"pytest-benchmark {data.get('version', '?')}", "created": str(data.get("datetime", "")),
            "commit": data.get("commit_info") or {}}
    ordered = sorted(groups.items(), key=lambda kv: kv[0][0] == "reference")  # ours first: it is the baseline
    return [_bench_summary(arm, requested, group, fp, meta, path) for (arm, requested), group in ordered]


def _bench_summary(arm: str, requested: str, entries: list[dict[str, Any]], fp: dict[str, Any],
                   meta: dict[str, Any], path: str) -> RunSummary:
    infos = [e.get("extra_info") or {} for e in entries]
    ran = _first(i.get("attention", {}).get("ran") for i in infos if isinstance(i.get("attention"), dict))
    kernel = ran or (f"{requested} (out of memory)" if all("oom" in i for i in infos) else requested)
    params = _first(i.get("parameters") for i in infos)
    trainable = _first(i.get("trainable_parameters") for i in infos)
    commit = meta["commit"]
    fingerprint = {**fp, "git_commit": fp.get("git_commit") or commit.get("id"),
                   "git_dirty": fp.get("git_dirty", commit.get("dirty"))}
    return RunSummary(
        label="?", path=path, source="benchmark", kind=f"benchmark:{arm}",
        backend=str(_first(i.get("backend") for i in infos) or fp.get("backend", "unknown")), device=_device(fp),
        kernel=str(kernel), model_name=_name(_first(i.get("model") for i in infos)),
        base_parameters=_base_parameters(params, trainable), seed=None,
        quantization=_first(i.get("quantization") for i in infos) or {}, fingerprint=fingerprint,
        metrics=_bench_metrics(entries), phases=_bench_phases(infos), schema=meta["schema"], created=meta["created"],
        notes=_bench_notes(entries),
    )


def _first(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def _bench_notes(entries: list[dict[str, Any]]) -> tuple[str, ...]:
    infos = [e.get("extra_info") or {} for e in entries]
    weights = [f"weights: {w}" for w in dict.fromkeys(i["weights"] for i in infos if i.get("weights"))]
    return (*weights, *(_oom_note(e) for e, i in zip(entries, infos, strict=True) if i.get("oom")))


def _oom_note(entry: Mapping[str, Any]) -> str:
    oom = entry["extra_info"]["oom"]
    oom = oom if isinstance(oom, dict) else {}
    return f"{entry.get('name', '?')}: out of memory during {oom.get('during', '?')} ({oom.get('error', '?')})"


def _is_train(entry: Mapping[str, Any]) -> bool:
    return entry.get("group") == "train" or "train" in str(entry.get("name", ""))


def _batch(entry: Mapping[str, Any]) -> float:
    params, ei = entry.get("params") or {}, entry.get("extra_info") or {}
    return float(params.get("prefill_batch") or ei.get("batch_size") or 0)


def _bench_metrics(entries: list[dict[str, Any]]) -> dict[str, Metric]:
    ran = [e for e in entries if "oom" not in (e.get("extra_info") or {})]
    out: dict[str, Metric] = {}
    for e in sorted(ran, key=_batch, reverse=True):  # the largest batch of a sweep speaks for throughput
        _take_rates(e, out)
        _take_train(e, out)
    latency = sorted((e for e in ran if _ttft_s(e) is not None), key=_batch)  # TTFT: one request, smallest batch
    if latency:
        out["ttft_s"] = Metric(_ttft_s(latency[0]))
    for key in ("peak_mem_gib", "host_rss_gib"):  # the most any case needed
        values = [v for e in ran if (v := (e.get("extra_info") or {}).get(key)) is not None]
        if values:
            out[key] = Metric(max(values))
    return out


def _take_rates(entry: Mapping[str, Any], out: dict[str, Metric]) -> None:
    ei, stats = entry.get("extra_info") or {}, entry.get("stats") or {}
    rates = {_rate_name(entry, k): float(ei[k]) for k in _RATES
             if ei.get(k) is not None and (k != "tokens_per_s" or _is_train(entry))}
    for name, value in rates.items():
        if name in out:
            continue
        # An entry timing one rate: its rounds' quartiles give that rate's band.
        one = len(rates) == 1
        out[name] = _rate(value, stats.get("median"), stats.get("q1"), stats.get("q3")) if one else Metric(value)


def _rate_name(entry: Mapping[str, Any], key: str) -> str:
    if key == "tokens_per_s":
        return "train_tokens_per_s"
    if key == "decode_tokens_per_s" and (entry.get("extra_info") or {}).get("compile_mode"):
        return "decode_compiled_tokens_per_s"
    return key


def _take_train(entry: Mapping[str, Any], out: dict[str, Metric]) -> None:
    ei, stats = entry.get("extra_info") or {}, entry.get("stats") or {}
    if not _is_train(entry):
        return
    if ei.get("step_time_s_median") is not None and "step_time_s" not in out:
        out["step_time_s"] = Metric(float(ei["step_time_s_median"]), stats.get("q1"), stats.get("q3"))
    for key in ("mfu", "speedup_vs_reference"):
        if ei.get(key) is not None and key not in out:
            out[key] = Metric(float(ei[key]))


def _ttft_s(entry: Mapping[str, Any]) -> float | None:
    ei = entry.get("extra_info") or {}
    value = ei.get("ttft_s", ei.get("ttft_s_median"))
    return None if value is None else float(value)


def _bench_phases(infos: list[dict[str, Any]]) -> dict[str, PhaseScores]:
    # Accuracy cases score the fresh adapter (LoRA B = 0): the base model's scores.
    for ei in infos:
        qs = next((v for v in (ei.get("predictions"), ei.get("questions")) if isinstance(v, list) and v), None)
        if qs is not None:
            questions = tuple(QuestionResult(str(q["qid"]), int(q["answer"]), int(q["pred"]),
                                             tuple(float(x) for x in q["logprobs"])) for q in qs)
            acc = float(np.mean([q.correct for q in questions]))
            return {BASE: PhaseScores(acc, len(questions), questions)}
        if ei.get("accuracy") is not None and ei.get("n_questions"):
            return {BASE: PhaseScores(float(ei["accuracy"]), int(ei["n_questions"]), ())}
    return {}


# ---- comparing -------------------------------------------------------------------------------


def check_comparable(a: RunSummary, b: RunSummary) -> None:
    """Refuse two runs of different models.

    Args:
        a: one run (the baseline).
        b: another.

    Raises:
        ReportError: different model names, base parameter counts or preset seeds; names both files.
    """
    where = f"{b.path} ({b.label}) vs {a.path} ({a.label})"
    if None not in (a.model_name, b.model_name) and a.model_name != b.model_name:
        raise ReportError(f"{where}: different models, {b.model_name!r} vs {a.model_name!r}; compare runs of one "
                          "model (same --preset or --model)")
    if None not in (a.base_parameters, b.base_parameters) and a.base_parameters != b.base_parameters:
        raise ReportError(f"{where}: different model shapes, {b.base_parameters:,} vs {a.base_parameters:,} base "
                          "parameters")
    if None not in (a.seed, b.seed) and a.seed != b.seed:
        raise ReportError(f"{where}: different model weights, preset seed {b.seed} vs {a.seed}")


def compare_runs(a: RunSummary, b: RunSummary, tol: Tolerances) -> PairParity:
    """Compare run B with run A: each phase both scored, loss curves, quantization.

    Args:
        a: the reference of the pair (the baseline, or the run that trained an adapter).
        b: the other run.
        tol: margin, KL tolerance, alpha.

    Returns:
        The comparison.

    Raises:
        ReportError: different models, or different questions in a phase both scored.
    """
    check_comparable(a, b)
    phases: list[PhaseParity] = []
    for phase in (BASE, FINE_TUNED):
        pa, pb = a.phases.get(phase), b.phases.get(phase)
        if pa is None or pb is None or not pa.questions or not pb.questions:
            continue
        same = phase == BASE or same_adapter(a.adapter_dir, b.adapter_dir)
        try:
            phases.append(compare_phase(phase, pa.questions, pb.questions, same, tol))
        except ParityError as e:
            raise ReportError(f"{b.path} ({b.label}) vs {a.path} ({a.label}), {phase} scores: {e}") from e
    loss = loss_drift(a.loss_per_step, b.loss_per_step) if a.loss_per_step and b.loss_per_step else None
    # A case that ran out of memory before loading its model recorded no quantization: nothing to compare.
    quant = quantization_differences(a.quantization, b.quantization) if a.quantization and b.quantization else ()
    return PairParity(a.rid, b.rid, tuple(phases), loss, quant)


def adapter_trainers(runs: Sequence[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """(trainer, scorer) for each evaluate record that scored an adapter a run among the inputs trained.

    Args:
        runs: all runs.

    Returns:
        Pairs in input order.
    """
    trainers = [r for r in runs if r.kind in ("run", "train") and r.adapter_dir]
    scorers = [r for r in runs if r.kind == "evaluate" and r.adapter_dir]
    return [(t, s) for s in scorers for t in trainers if same_adapter(t.adapter_dir, s.adapter_dir)]


def build_report(runs: Sequence[RunSummary], tol: Tolerances) -> Report:
    """Compare every run with the first (the baseline) and every scored adapter with its trainer.

    Args:
        runs: from :func:`load_inputs`, baseline first.
        tol: what counts as parity.

    Returns:
        The report, with the verdict's findings.

    Raises:
        ReportError: runs that cannot be compared.
    """
    baseline, others = runs[0], runs[1:]
    pairs = tuple(compare_runs(baseline, r, tol) for r in others if r.kind != REFERENCE_ARM)
    adapter_pairs = tuple(compare_runs(t, s, tol) for t, s in adapter_trainers(runs) if t is not baseline)
    findings = tuple(f for p in (*pairs, *adapter_pairs) for f in judge_pair(p, tol))
    return Report(tuple(runs), baseline, pairs, adapter_pairs, findings, tol, _report_notes(runs))


def _report_notes(runs: Sequence[RunSummary]) -> tuple[str, ...]:
    notes = [f"{r.rid} is bench/'s reference arm (the common-guide QLoRA recipe on its own model folder): shown for "
             "speed and memory, not compared for parity." for r in runs if r.kind == REFERENCE_ARM]
    same: dict[tuple[Path, str, str], list[str]] = {}  # one file given twice (a benchmark file holds several runs)
    for r in runs:
        same.setdefault((Path(r.path).resolve(), r.kind, r.kernel), []).append(r.rid)
    for (path, _, _), ids in same.items():
        if len(ids) > 1:
            notes.append(f"{' and '.join(ids)} are the same run, read twice from {path}: they agree by construction.")
    backends = sorted({r.backend for r in runs})
    if "rocm" not in backends:
        notes.append(f"No ROCm run was compared: every input ran on {' / '.join(backends)}.")
    scorers = [r for r in runs if r.kind == "evaluate" and r.adapter_dir]
    for s in scorers:
        if not any(same_adapter(t.adapter_dir, s.adapter_dir) for t in runs if t.kind in ("run", "train")):
            notes.append(f"{s.label} scored adapter {s.adapter_dir}, whose training run is not among the inputs: "
                         "no cross-backend adapter check for it.")
    return tuple(notes)


# ---- tables ----------------------------------------------------------------------------------


def runs_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """One row per run: file, kind, backend, device, kernel, model, quantization.

    Args:
        runs: all runs.

    Returns:
        The table, one row per run in input order.
    """
    return pd.DataFrame([{
        "run": r.label, "file": Path(r.path).name, "kind": r.kind, "backend": r.backend, "device": r.device,
        "attention kernel": r.kernel, "model": r.model_name or "-", "quantization": _quant_text(r.quantization),
        "created": r.created,
    } for r in runs])


def _quant_text(q: Mapping[str, Any]) -> str:
    if not q:
        return "not recorded"
    if q.get("method") == "none":
        return "none (bf16)"
    return f"{q.get('quant_type', '?')} blocksize {q.get('blocksize', '?')}, double quant {q.get('double_quant', '?')}"


def metrics_table(runs: Sequence[RunSummary], baseline: RunSummary) -> pd.DataFrame:
    """Performance figures in long form: run, metric, value, IQR band, ratio to the baseline.

    Args:
        runs: all runs.
        baseline: the run ratios are taken to.

    Returns:
        Columns run, metric, unit, value, low, high, ratio (NaN where the baseline lacks the figure).
    """
    rows = []
    for r in runs:
        for key, label, unit in METRICS:
            m = r.metrics.get(key)
            if m is None:
                continue
            base = baseline.metrics.get(key)
            ratio = m.value / base.value if base is not None and base.value else math.nan
            rows.append({"run": r.label, "metric": label, "unit": unit, "value": m.value,
                         "low": m.low, "high": m.high, "ratio": ratio})
    return pd.DataFrame(rows, columns=["run", "metric", "unit", "value", "low", "high", "ratio"])


def _metrics_display(long: pd.DataFrame, runs: Sequence[RunSummary]) -> pd.DataFrame:
    """:func:`metrics_table` as metric rows by run columns, each cell "value (ratio x)"."""
    if long.empty:
        return pd.DataFrame()
    cells = long.assign(cell=[_cell(v, u, r) for v, u, r in zip(long.value, long.unit, long.ratio, strict=True)])
    table = cells.pivot(index="metric", columns="run", values="cell")
    order = [label for _, label, _ in METRICS if label in table.index]
    table = table.reindex(index=order, columns=[r.label for r in runs]).astype(object).fillna("-")
    table.index.name = table.columns.name = None  # no extra header row in HTML
    return table


def _cell(value: float, unit: str, ratio: float) -> str:
    text = _num(value, unit)
    return text if math.isnan(ratio) else f"{text} ({ratio:.2f}x)"


def _num(value: float, unit: str) -> str:
    if unit == "":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{1000 * value:,.1f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"


def accuracy_table(runs: Sequence[RunSummary], baseline: RunSummary) -> pd.DataFrame:
    """Accuracy of each run and phase with its Wilson 95% CI and ratio to the baseline's.

    Args:
        runs: all runs.
        baseline: the run ratios are taken to (per phase).

    Returns:
        One row per run and phase it scored.
    """
    rows = []
    for r in runs:
        for phase, s in r.phases.items():
            lo, hi = s.ci95
            base = baseline.phases.get(phase)
            rows.append({"run": r.label, "phase": phase, "questions": s.n_questions,
                         "accuracy": f"{100 * s.accuracy:.1f}%", "95% CI (Wilson)": f"{100 * lo:.1f} - {100 * hi:.1f}",
                         "ratio to baseline": f"{s.accuracy / base.accuracy:.3f}x" if base and base.accuracy else "-"})
    return pd.DataFrame(rows)


def parity_table(pairs: Sequence[PairParity]) -> pd.DataFrame:
    """Accuracy statistics and log-probability drift of compared pairs.

    Args:
        pairs: comparisons from :func:`compare_runs`.

    Returns:
        One row per pair and phase; "run" is B, "vs" is A of the pair.
    """
    rows = []
    for p in pairs:
        for ph in p.phases:
            a, lp = ph.accuracy, ph.logprobs
            rows.append({
                "run": p.b, "vs": p.a, "phase": ph.phase, "n": a.n, "diff (pp)": f"{100 * a.diff:+.2f}",
                "95% CI (bootstrap)": f"{100 * a.ci95[0]:+.2f} to {100 * a.ci95[1]:+.2f}",
                "McNemar p": f"{a.mcnemar_p:.3g}", "discordant (vs only / run only)": f"{a.a_only} / {a.b_only}",
                "TOST p": f"{a.tost_p:.3g}", "equivalent": "yes" if a.equivalent else "NO",
                "agreement": f"{100 * a.agreement:.1f}%", "logprob |diff| mean / max": f"{lp.mean_abs:.3g} / "
                f"{lp.max_abs:.3g}", "KL mean / max (nats)": f"{lp.kl_mean:.2e} / {lp.kl_max:.2e}",
                "same weights": "yes" if ph.same_weights else "no",
            })
    return pd.DataFrame(rows)


def loss_table(pairs: Sequence[PairParity]) -> pd.DataFrame:
    """Loss-curve drift of the pairs where both runs trained.

    Args:
        pairs: comparisons from :func:`compare_runs`.

    Returns:
        One row per pair with loss curves (empty when none has).
    """
    return pd.DataFrame([{
        "run": p.b, "vs": p.a, "steps": f"{p.loss.steps_b} / {p.loss.steps_a}", "common steps": p.loss.steps_compared,
        "max |diff|": f"{p.loss.max_abs:.4g}", "at step": p.loss.max_at_step, "mean |diff|": f"{p.loss.mean_abs:.4g}",
        "NaN/inf steps": f"{p.loss.nonfinite_b} / {p.loss.nonfinite_a}",
    } for p in pairs if p.loss is not None])


def quantization_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Quantization settings by run.

    Args:
        runs: all runs.

    Returns:
        Settings as rows, runs as columns, after a "differs" column marking settings not equal across runs.
    """
    keys = sorted({k for r in runs for k in r.quantization})
    table = pd.DataFrame({r.label: [_text(r.quantization.get(k)) for k in keys] for r in runs}, index=keys)
    return _mark_differences(table)


def fingerprint_table(runs: Sequence[RunSummary]) -> pd.DataFrame:
    """Every fingerprint field (nested ones flattened with dots) by run, after file, schema and time.

    The host name is left out: it names a person's machine, not its hardware.

    Args:
        runs: all runs.

    Returns:
        Fields as rows, runs as columns, after a "differs" column marking fields not equal across runs.
    """
    flat = [{"file": Path(r.path).name, "schema": r.schema, "created": r.created, **flatten_dict(r.fingerprint)}
            for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f if k.split(".")[-1] not in _FINGERPRINT_HIDDEN))
    table = pd.DataFrame({r.label: [_text(f.get(k)) for k in keys] for r, f in zip(runs, flat, strict=True)},
                         index=keys)
    return _mark_differences(table)


def _mark_differences(table: pd.DataFrame) -> pd.DataFrame:
    """Prepend a "differs" column: "yes" where a row's values are not all equal."""
    differs = ["yes" if row.nunique() > 1 else "" for _, row in table.iterrows()]
    return table.assign(differs=differs)[["differs", *table.columns]]


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists become tuples, so values compare and hash."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def _text(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ---- charts ----------------------------------------------------------------------------------


def _new_figure(rows: int, cols: int = 1, width: float = 9.0, row_height: float = 2.6,
                height: float | None = None) -> Figure:
    # A Figure with its own Agg canvas: no pyplot, no global backend switch.
    fig = Figure(figsize=(width, height or max(2.2, row_height * rows)), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _bar_panels(runs: Sequence[RunSummary], keys: Sequence[str]) -> tuple[Figure, list[Axes]]:
    """One horizontal-bar panel per metric, each as tall as the runs that have that metric."""
    bars = [sum(k in r.metrics for r in runs) for k in keys]
    fig = _new_figure(len(keys), height=sum(0.5 * n + 1.2 for n in bars))
    axes = fig.subplots(len(keys), 1, squeeze=False, gridspec_kw={"height_ratios": [n + 2.4 for n in bars]})
    return fig, list(axes[:, 0])


def _color(run: RunSummary) -> str:
    return _BACKEND_COLORS.get(run.backend, "#2c3e50")


def _barh(ax: Axes, runs: Sequence[RunSummary], metric: str, title: str, unit: str, baseline: RunSummary) -> None:
    have = [r for r in runs if metric in r.metrics]
    values = np.array([r.metrics[metric].value for r in have])
    low = np.array([np.nan if r.metrics[metric].low is None else r.metrics[metric].low for r in have])
    high = np.array([np.nan if r.metrics[metric].high is None else r.metrics[metric].high for r in have])
    err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])  # NaN: no bar
    y = np.arange(len(have))
    ax.barh(y, values, color=[_color(r) for r in have], hatch=[("//" if r is baseline else "") for r in have],
            edgecolor="white")
    banded = np.isfinite(err).all(axis=0)  # [R]; runs without a measured band get no error bar
    if banded.any():
        # xerr as lists: matplotlib's finiteness probe warns on one-element numpy rows.
        ax.errorbar(values[banded], y[banded], xerr=err[:, banded].tolist(), fmt="none", ecolor="black", capsize=4)
        title += " (error bars: interquartile range)"
    ax.set_yticks(y, [r.label + (" [baseline]" if r is baseline else "") for r in have])
    ax.invert_yaxis()
    ax.set_title(title, loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel(unit)
    for yi, v, hi in zip(y, values, high, strict=True):  # the label goes past the error bar
        ax.annotate(_num(v, unit), (np.nanmax([v, hi]), yi),
                    xytext=(6, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlim(0, 1.3 * np.nanmax(np.concatenate([values, high])))  # room for the labels


def _throughput_chart(runs: Sequence[RunSummary], baseline: RunSummary) -> Figure | None:
    """Train, prefill, decode and scoring rates per run, with IQR error bars where measured."""
    shown = [(k, label, unit) for k, label, unit in METRICS if k in _THROUGHPUT and any(k in r.metrics for r in runs)]
    if not shown:
        return None
    fig, axes = _bar_panels(runs, [k for k, _, _ in shown])
    for ax, (key, label, unit) in zip(axes, shown, strict=True):
        _barh(ax, runs, key, label, unit, baseline)
    return fig


def _memory_chart(runs: Sequence[RunSummary], baseline: RunSummary) -> Figure | None:
    """Peak device memory and host RSS per run."""
    shown = [(k, label) for k, label, _ in METRICS if k in ("peak_mem_gib", "host_rss_gib")
             and any(k in r.metrics for r in runs)]
    if not shown:
        return None
    fig, axes = _bar_panels(runs, [k for k, _ in shown])
    for ax, (key, label) in zip(axes, shown, strict=True):
        _barh(ax, runs, key, label, "GiB", baseline)
    return fig


def _accuracy_chart(runs: Sequence[RunSummary], baseline: RunSummary, tol: Tolerances) -> Figure | None:
    """Accuracy with Wilson 95% CIs per phase; the band is the baseline's accuracy +- the margin."""
    phases = [p for p in (BASE, FINE_TUNED) if any(p in r.phases for r in runs)]
    if not phases:
        return None
    counts = [sum(p in r.phases for r in runs) for p in phases]
    fig = _new_figure(len(phases), height=sum(0.5 * n + 1.5 for n in counts) + 0.3)
    axes = fig.subplots(len(phases), 1, squeeze=False, gridspec_kw={"height_ratios": [n + 3 for n in counts]})
    for ax, phase in zip(axes[:, 0], phases, strict=True):
        _accuracy_panel(ax, [r for r in runs if phase in r.phases], phase, baseline.phases.get(phase), tol)
    handles = {label: h for ax in axes[:, 0] for h, label in zip(*ax.get_legend_handles_labels(), strict=True)}
    fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    return fig


def _accuracy_panel(ax: Axes, have: Sequence[RunSummary], phase: str, base: PhaseScores | None,
                    tol: Tolerances) -> None:
    if base is not None:
        ax.axvspan(100 * base.accuracy - tol.margin_pp, 100 * base.accuracy + tol.margin_pp, color="#3498db",
                   alpha=0.12, label=f"baseline +- {tol.margin_pp:g} pp")
    ax.axvline(25, color="#999", ls=":", lw=1, label="chance (4 options)")
    for yi, r in enumerate(have):
        s = r.phases[phase]
        a, (lo, hi) = 100 * s.accuracy, (100 * x for x in s.ci95)
        ax.errorbar(a, yi, xerr=[[a - lo], [hi - a]], fmt="o", color=_color(r), capsize=4)
        ax.annotate(f"{a:.1f}%  (n={s.n_questions})", (hi, yi), xytext=(5, 0), textcoords="offset points",
                    va="center", fontsize=8)
    ax.set_yticks(range(len(have)), [r.label for r in have])
    ax.set_ylim(len(have) - 0.5, -0.5)
    ax.set_title(f"{phase} accuracy, 95% CI (Wilson)", loc="left", fontsize=10, fontweight="bold")
    ax.set_xlabel("accuracy (%)")
    ax.margins(x=0.25)


def _loss_chart(runs: Sequence[RunSummary]) -> Figure | None:
    """Training loss per step of every run that trained, overlaid."""
    have = [r for r in runs if r.loss_per_step]
    if not have:
        return None
    fig = _new_figure(1, row_height=3.6)
    ax = fig.subplots()
    for r in have:
        steps = np.arange(1, len(r.loss_per_step) + 1)
        ax.plot(steps, r.loss_per_step, marker="o" if len(steps) <= 40 else None, ms=3, label=r.label,
                color=_color(r) if len({x.backend for x in have}) == len(have) else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("loss curves", loc="left", fontsize=10, fontweight="bold")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _logprob_chart(pairs: Sequence[PairParity]) -> Figure | None:
    """Histogram of every option's log-probability difference (run minus its reference), per pair and phase."""
    cells = [(p, ph) for p in pairs for ph in p.phases]
    if not cells:
        return None
    cols = 2 if len(cells) > 1 else 1
    rows = math.ceil(len(cells) / cols)
    fig = _new_figure(rows, cols, width=11 if cols == 2 else 8, row_height=3.0)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (p, ph) in zip(axes, cells, strict=False):
        d = np.asarray(ph.logprobs.differences)
        if d.size and np.ptp(d) == 0:
            ax.axvline(d[0], color="#2c3e50", lw=3)
            ax.text(0.5, 0.5, f"all {d.size} differences = {d[0]:g}", transform=ax.transAxes, ha="center")
        elif d.size:
            ax.hist(d, bins=60, color="#8e44ad", alpha=0.8)
            ax.axvline(0, color="#2c3e50", lw=0.8, ls="--")
            ax.set_yscale("log")
        weights = "same weights" if ph.same_weights else "separately fine-tuned"
        ax.set_title(f"{p.b} vs {p.a}, {ph.phase} ({weights})\nmean |diff| {ph.logprobs.mean_abs:.3g} nats, "
                     f"mean KL {ph.logprobs.kl_mean:.1e} nats", loc="left", fontsize=9)
        ax.set_xlabel("log-probability difference (nats)")
        ax.set_ylabel("options")
    for ax in axes[len(cells):]:
        ax.set_visible(False)
    return fig


def draw_charts(report: Report, out_dir: Path) -> dict[str, Path]:
    """Draw every chart that has data and save it as PNG.

    Args:
        report: the built report.
        out_dir: folder for the PNG files.

    Returns:
        Chart name -> PNG path, for the charts drawn.
    """
    runs, base = report.runs, report.baseline
    figures = {
        "throughput": _throughput_chart(runs, base),
        "memory": _memory_chart(runs, base),
        "accuracy": _accuracy_chart(runs, base, report.tolerances),
        "loss": _loss_chart(runs),
        "logprob_drift": _logprob_chart((*report.pairs, *report.adapter_pairs)),
    }
    out: dict[str, Path] = {}
    for name, fig in figures.items():
        if fig is None:
            continue
        out[name] = out_dir / f"{name}.png"
        fig.savefig(out[name], dpi=110)
    return out


# ---- writing ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    """One part of the report: heading, text paragraphs, an optional table and chart."""

    title: str
    text: tuple[str, ...] = ()
    table: pd.DataFrame | None = None
    index: bool = False  # show the table's index (row names)
    chart: str | None = None


def verdict_lines(report: Report) -> tuple[str, tuple[Finding, ...]]:
    """The headline and the findings: failures, then flags, then passes.

    Args:
        report: the built report.

    Returns:
        (headline, findings).
    """
    order = {FAIL: 0, FLAG: 1, PASS: 2}
    fails = [f for f in report.findings if f.status == FAIL]
    n = len(report.runs)
    if report.verdict == "does not hold":
        head = f"Parity does NOT hold: {len(fails)} point(s) fail across {n} runs (baseline {report.baseline.label})."
    elif report.verdict == "holds":
        head = f"Parity holds across {n} runs (baseline {report.baseline.label})."
    else:
        head = f"Parity not judged: the {n} runs share no per-question results to compare."
    return head, tuple(sorted(report.findings, key=lambda f: order[f.status]))


def _criteria_text(tol: Tolerances) -> str:
    """The rules the verdict applies, stated once in the report."""
    return (f"Criteria: accuracy equivalent within +-{tol.margin_pp:g} percentage points (paired TOST on the same "
            f"questions, both one-sided p < {tol.alpha:g}, i.e. the 90% CI inside the margin); where both runs scored "
            f"the same weights (the base model, or one saved adapter scored on two machines) mean KL divergence of "
            f"the four-option distributions <= {tol.kl_nats:g} nats and no NaN/inf; no NaN/inf training loss. "
            "Speed and memory are reported as ratios, not judged.")


def _sections(report: Report) -> list[Section]:
    """The report's parts after the verdict, in order."""
    runs, base, pairs = report.runs, report.baseline, (*report.pairs, *report.adapter_pairs)
    out = [
        Section("Runs compared", (f"Baseline: {base.label} ({base.path}); ratios are run / baseline.",),
                runs_table(runs)),
        Section("Performance", ("Ratios in parentheses are to the baseline; lower is better for time and memory.",),
                _metrics_display(metrics_table(runs, base), runs), index=True, chart="throughput"),
        Section("Memory", (), None, chart="memory"),
        Section("Accuracy", (), accuracy_table(runs, base), chart="accuracy"),
        Section("Statistical and numerical parity", (
            "diff = run minus vs, in percentage points; McNemar: exact two-sided test on the discordant questions; "
            "TOST: two one-sided z-tests of the paired difference against the margin; agreement: same predicted "
            "letter; KL: KL(vs || run) of the softmax over the four option log-probabilities.",),
            parity_table(pairs), chart="logprob_drift"),
        Section("Loss curves", (), loss_table(pairs), chart="loss"),
        Section("Cross-backend adapter check", _adapter_text(report)),
        Section("Quantization", ("Settings read back from a quantized layer of each run.",),
                quantization_table(runs), index=True),
        Section("Fingerprints", ("Everything recorded about each machine and software stack.",),
                fingerprint_table(runs), index=True),
    ]
    by_note: dict[str, list[str]] = {}
    for r in runs:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.rid)
    notes = [f"{', '.join(ids)}: {n}" for n, ids in by_note.items()]
    if notes:
        out.append(Section("Notes from the runs", tuple(notes)))
    return out


def _adapter_text(report: Report) -> tuple[str, ...]:
    lines = []
    for a, b in adapter_trainers(report.runs):
        pair = next(p for p in (*report.pairs, *report.adapter_pairs) if (p.a, p.b) == (a.rid, b.rid))
        ft = next((ph for ph in pair.phases if ph.phase == FINE_TUNED), None)
        if ft is None:
            lines.append(f"{b.rid} scored the adapter {a.rid} trained, but {a.rid} has no fine-tuned scores.")
            continue
        ok = ft.logprobs.kl_mean <= report.tolerances.kl_nats and not ft.logprobs.nonfinite
        lines.append(f"{b.rid} ({b.backend}, {b.device}) scored the adapter trained by {a.rid} ({a.backend}, "
                     f"{a.device}): predictions "
                     f"agree on {100 * ft.accuracy.agreement:.1f}% of {ft.accuracy.n} questions, mean KL "
                     f"{ft.logprobs.kl_mean:.2e} nats: {'within' if ok else 'OUTSIDE'} the tolerance of "
                     f"{report.tolerances.kl_nats:g} nats.")
    return tuple(lines) or ("No evaluate record among the inputs scored an adapter trained by another input run.",)


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A pipe table (no tabulate dependency); cells are str()-ed with pipes escaped."""
    if index:
        df = df.reset_index(names="")
    def row(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
    return "\n".join([row(df.columns), row("---" for _ in df.columns), *(row(r) for r in df.itertuples(index=False))])


def _render_markdown(report: Report, charts: Mapping[str, Path]) -> str:
    """report.md: verdict first, then each section; charts linked as PNG files beside it."""
    head, findings = verdict_lines(report)
    lines = ["# medqa-parity report", "", f"**{head}**", ""]
    lines += [f"- {f.status.upper()}: {f.text}" for f in findings]
    lines += ["", *[f"> {n}" for n in report.notes], "", _criteria_text(report.tolerances), ""]
    for s in _sections(report):
        lines += [f"## {s.title}", "", *[f"{t}\n" for t in s.text]]
        if s.table is not None and not s.table.empty:
            lines += [markdown_table(s.table, s.index), ""]
        if s.chart in charts:
            lines += [f"![{s.chart}]({charts[s.chart].name})", ""]
    return "\n".join(lines).rstrip() + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1300px;color:#222;
 padding:0 1em;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #eee;padding-bottom:.2em;margin-top:1.8em}
.verdict{padding:1em 1.3em;border-radius:8px;margin:1em 0}
.holds{background:#eafaf1;border-left:8px solid #27ae60}.fails{background:#fdedec;border-left:8px solid #c0392b}
.notjudged{background:#fef9e7;border-left:8px solid #f1c40f}
.verdict h2{border:none;margin:0 0 .5em 0;font-size:1.3em}
.verdict li{margin:.25em 0}.pass{color:#1e8449;font-weight:bold}.fail{color:#c0392b;font-weight:bold}
.flag{color:#b9770e;font-weight:bold}
.note{background:#f4f6f7;padding:.6em 1em;border-radius:6px;margin:.4em 0}
.criteria{font-size:.9em;color:#555}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f4f6f7}tr:nth-child(even) td{background:#fbfcfc}
img{max-width:100%;border:1px solid #eee;margin:.5em 0}
"""


def _html_verdict(report: Report) -> str:
    head, findings = verdict_lines(report)
    css = {"holds": "holds", "does not hold": "fails"}.get(report.verdict, "notjudged")
    items = "".join(f"<li><span class='{f.status}'>{f.status.upper()}</span> "
                    f"{html.escape(f.text)}</li>" for f in findings)
    notes = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in report.notes)
    return (f"<div class='verdict {css}'><h2>{html.escape(head)}</h2><ul>{items}</ul></div>{notes}"
            f"<p class='criteria'>{html.escape(_criteria_text(report.tolerances))}</p>")


def _png_base64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def _render_html(report: Report, charts: Mapping[str, Path]) -> str:
    """report.html: the same content as report.md, self-contained (charts inlined as base64 PNG)."""
    body = ["<h1>medqa-parity report</h1>", _html_verdict(report)]
    for s in _sections(report):
        body.append(f"<h2>{html.escape(s.title)}</h2>")
        body += [f"<p>{html.escape(t)}</p>" for t in s.text]
        if s.table is not None and not s.table.empty:
            body.append(f"<div class='scroll'>{s.table.to_html(index=s.index, border=0, na_rep='-')}</div>")
        if s.chart in charts:
            body.append(f"<img alt='{s.chart}' src='data:image/png;base64,{_png_base64(charts[s.chart])}'>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>medqa-parity report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(report: Report, out_dir: str | Path) -> list[Path]:
    """Write report.md, report.html and the chart PNGs under ``out_dir`` (created if needed).

    Args:
        report: the built report.
        out_dir: output folder.

    Returns:
        Paths written, report.md and report.html first.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = draw_charts(report, out)
    md, page = out / "report.md", out / "report.html"
    md.write_text(_render_markdown(report, charts), encoding="utf-8")
    page.write_text(_render_html(report, charts), encoding="utf-8")
    logger.debug("wrote %s, %s and %d charts", md, page, len(charts))
    return [md, page, *charts.values()]


def make_report(paths: Sequence[str | Path], out_dir: str | Path, baseline: str | Path | None = None,
                margin_pp: float = DEFAULT_MARGIN_PP) -> tuple[Report, list[Path]]:
    """Read the inputs, compare them, write the report: what ``medqa-parity report`` does.

    Args:
        paths: run records and/or pytest-benchmark files.
        out_dir: output folder.
        baseline: the file others are compared with (default the first of ``paths``).
        margin_pp: accuracy equivalence margin in percentage points.

    Returns:
        The report and the paths written.

    Raises:
        ReportError: unreadable inputs, runs that cannot be compared, or a bad margin.
    """
    try:
        tol = Tolerances(margin_pp=margin_pp)
    except ValueError as e:
        raise ReportError(str(e)) from e
    report = build_report(load_inputs(paths, baseline), tol)
    return report, write_report(report, out_dir)
