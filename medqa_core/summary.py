"""What a report or gate needs of one run, read from a run record or a pytest-benchmark file.

:func:`summarize_file` reads either kind into :class:`RunSummary` objects (a record gives one; a
benchmark file one per arm and attention kernel), checking kind and schema first; :func:`load_inputs`
reads several and labels them. :mod:`medqa_core.report` and :mod:`medqa_core.gate` both start here.

No torch here: summaries are built on any machine from the saved files.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

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


def format_value(value: float, unit: str) -> str:
    """A METRICS figure as tables and charts print it: "" is a fraction (as %), "s" prints as ms."""
    if unit == "":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{1000 * value:,.1f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"
