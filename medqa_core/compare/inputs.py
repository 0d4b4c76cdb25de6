"""What a report or gate needs of one run, read from a run record or a pytest-benchmark file.

:func:`summarize_file` reads either kind into :class:`RunSummary` objects (a record gives one; a
benchmark file one per arm and attention kernel), checking kind and schema first; :func:`load_inputs`
reads several and labels them so that each label shows what differs. :mod:`medqa_core.report` and
:mod:`medqa_core.gate` both start here. Bench cases are read through
:class:`~medqa_core.results.benchcase.BenchCase` alone.

No torch here: summaries are built on any machine from the saved files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medqa_core.results.accuracy import wilson_ci95
from medqa_core.results.benchcase import DEFAULT_COMPUTE_DTYPE, BenchCase, BenchCaseError
from medqa_core.results.dtypes import DTYPE_NAMES
from medqa_core.results.failure import FailureError, OomFailure
from medqa_core.results.measurements import MEASUREMENTS, measurement_fields
from medqa_core.results.record import (
    SCHEMA_VERSION,
    EvalResult,
    QuestionResult,
    RecordError,
    RunRecord,
    record_from_dict,
)

logger = logging.getLogger(__name__)

BASE, FINE_TUNED = "base", "fine-tuned"
# bench/'s reference arm: the common-guide QLoRA recipe, timed beside ours for speedup_vs_reference.
REFERENCE_ARM = "benchmark:reference"
# bench/'s peer arms (Liger, Unsloth, ...): other stacks on the same model folder, timed like the reference.
PEER_ARM = "benchmark:peer"
SPEED_ONLY_ARMS = (REFERENCE_ARM, PEER_ARM)  # shown for speed and memory, never compared for parity
class CompareError(ValueError):
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
        """Wilson 95% interval of the accuracy (as in run records); NaN where the accuracy is not a fraction of
        questions scored (a damaged file: the report shows it as invalid)."""
        if not (math.isfinite(self.accuracy) and 0 <= self.accuracy <= 1 and self.n_questions > 0):
            return math.nan, math.nan
        return wilson_ci95(round(self.accuracy * self.n_questions), self.n_questions)


@dataclass(frozen=True)
class InvalidFigure:
    """A figure of a file that cannot be judged: not finite, or fewer entries than the file says it holds.

    The gate turns each into an inconclusive check, the report into an inconclusive verdict; neither
    compares it.

    Attributes:
        path: the file.
        field: where in the file ("train.step_time_s[50]", "test_scoring[sdpa]: extra_info.questions_per_s").
        problem: what is wrong with it ("= nan", "holds 10 questions; n_questions says 512").
        checks: what it keeps from being judged: metric keys (:mod:`medqa_core.compare.metrics`) or scoring
            phases ("base", "fine-tuned"); empty for a figure nothing compares.
    """

    path: str
    field: str
    problem: str
    checks: tuple[str, ...] = ()

    @property
    def text(self) -> str:
        """"cand.json: train.step_time_s[50] = nan (1 of 128 step times)"."""
        return f"{self.path}: {self.field} {self.problem}"


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
        fingerprint: machine fingerprint (medqa_core.measure.fingerprint).
        metrics: performance figures by metric key (medqa_core.compare.metrics).
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
    settings: Mapping[str, Any] = field(default_factory=dict)
    oom: OomFailure | None = None
    invalid: tuple[InvalidFigure, ...] = ()

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
        CompareError: unreadable or not JSON; names the file.
    """
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CompareError(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, broken JSON, absurd numbers or nesting
        raise CompareError(f"{path}: not JSON ({e}); expected a run record or a pytest-benchmark file") from e


@dataclass(frozen=True)
class BenchFile:
    """A pytest-benchmark file saved by ``pytest bench/``, read once: the machine, when, and every case.

    Attributes:
        path: the file.
        fingerprint: ``machine_info.medqa_fingerprint`` (medqa_core.measure.fingerprint).
        datetime: when pytest-benchmark saved it ("" where not saved).
        version: pytest-benchmark's version ("?" where not saved).
        entries: the cases in file order, their extra_info read through BenchCase (migrated to its schema).
        data: the parsed file (machine and commit info), for :func:`summarize_entries`.
    """

    path: str
    fingerprint: Mapping[str, Any]
    datetime: str
    version: str
    entries: tuple[BenchEntry, ...]
    data: Mapping[str, Any]

    @property
    def cases(self) -> dict[str, BenchCase]:
        """The cases by name."""
        return {e.name: e.case for e in self.entries}

    @property
    def gpu_name(self) -> str | None:
        """The card the file was benched on, or None (a CPU)."""
        return self.fingerprint.get("gpu_name") or None


ResultFile = RunRecord | BenchFile


def read_result_file(path: str | Path) -> ResultFile:
    """Read a run record or a pytest-benchmark file, once: the one reader the report, the gate and the docs
    generator share (older schemas migrated on read, figures checked to be numbers).

    Args:
        path: the file.

    Returns:
        The record (:class:`RunRecord`), or the benchmark file (:class:`BenchFile`).

    Raises:
        CompareError: neither kind of file, another schema version, or malformed fields; names the
            file, what was found and what was expected.
    """
    path = Path(path)
    data = read_json(path)
    try:
        if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
            return BenchFile(str(path), (data.get("machine_info") or {}).get("medqa_fingerprint") or {},
                             str(data.get("datetime", "")), str(data.get("version", "?")),
                             read_bench_entries(data, str(path)), data)
        if isinstance(data, dict) and "schema_version" in data:
            record = record_from_dict(data, where=str(path))
            check_record_figures(record, str(path))
            return record
    except CompareError:
        raise
    except RecordError as e:
        raise CompareError(str(e)) from e
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        # A field of the wrong type or shape somewhere in a hand-edited or truncated-then-fixed file.
        raise CompareError(f"{path}: malformed field ({type(e).__name__}: {e}); expected a file as "
                          "pytest bench/ or medqa-parity wrote it") from e
    found = f"an object with keys {', '.join(sorted(data)[:8])}" if isinstance(data, dict) else type(data).__name__
    raise CompareError(f"{path}: found {found}; expected a run record (schema_version {SCHEMA_VERSION}, kind, "
                      "fingerprint, ...) or a pytest-benchmark file (machine_info, benchmarks)")


def read_bench_file(path: str | Path) -> BenchFile:
    """:func:`read_result_file` of a file that must be a pytest-benchmark file.

    Raises:
        CompareError: unreadable, or a run record; names the file.
    """
    result = read_result_file(path)
    if not isinstance(result, BenchFile):
        raise CompareError(f"{path}: a run record; expected a pytest-benchmark file (machine_info, benchmarks)")
    return result


def summarize_file(path: str | Path) -> list[RunSummary]:
    """Read a run record (one summary) or a pytest-benchmark file (one per arm and kernel).

    Labels are provisional ("?"); :func:`load_inputs` numbers them.

    Args:
        path: the file.

    Returns:
        Its runs.

    Raises:
        CompareError: neither kind of file, another schema version, or malformed fields; names the
            file, what was found and what was expected.
    """
    return summarize_result(read_result_file(path), str(path))


def summarize_result(result: ResultFile, path: str) -> list[RunSummary]:
    """The summaries of a file :func:`read_result_file` read (a record: one; a bench file: one per arm and kernel).

    Raises:
        CompareError: a failure entry or a figure that cannot be read; names the file.
    """
    try:
        if isinstance(result, RunRecord):
            return [summarize_record(result, path)]
        return [summarize_entries(group, result.data, path) for group in group_entries(result.entries)]
    except CompareError:
        raise
    except (TypeError, AttributeError, KeyError, ValueError, IndexError) as e:
        raise CompareError(f"{path}: malformed field ({type(e).__name__}: {e}); expected a file as "
                          "pytest bench/ or medqa-parity wrote it") from e


def load_inputs(paths: Sequence[str | Path], baseline: str | Path | None = None) -> list[RunSummary]:
    """Read every input, baseline first, and give each run a unique label that shows what differs.

    Args:
        paths: run records and/or pytest-benchmark files.
        baseline: the file to compare the others with (default: the first path); it is read
            even when not among ``paths``. Of a benchmark file, the first kernel of our arm is the baseline.

    Returns:
        Summaries, the baseline first, labelled R1, R2, ...

    Raises:
        CompareError: fewer than two runs, or an input that cannot be read.
    """
    return summarize_inputs(read_inputs(paths, baseline))


def read_inputs(paths: Sequence[str | Path], baseline: str | Path | None = None) -> list[tuple[str, ResultFile]]:
    """Every input read once through :func:`read_result_file`, the baseline first (see :func:`load_inputs`).

    Raises:
        CompareError: an input that cannot be read.
    """
    ordered = [Path(p) for p in paths]
    if baseline is not None:
        b = Path(baseline)
        ordered = [b] + [p for p in ordered if p.resolve() != b.resolve()]
    return [(str(p), read_result_file(p)) for p in ordered]


def summarize_inputs(results: Sequence[tuple[str, ResultFile]]) -> list[RunSummary]:
    """The runs of files :func:`read_inputs` read, labelled R1, R2, ... (see :func:`load_inputs`).

    Raises:
        CompareError: fewer than two runs, or a figure that cannot be read.
    """
    runs = [s for path, result in results for s in summarize_result(result, path)]
    if len(runs) < 2:
        raise CompareError(f"{len(runs)} run(s) in {', '.join(path for path, _ in results)}; a report compares at "
                           "least two")
    return label_runs(runs)


def check_record_figures(record: RunRecord, where: str) -> None:
    """Refuse a record whose figures are not numbers (a hand-edited accuracy "0.5", say).

    Args:
        record: a loaded record.
        where: the file, for the message.

    Raises:
        CompareError: names the field, what it holds and what is expected.
    """
    def number(name: str, value: Any, optional: bool = False) -> None:
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CompareError(f"{where}: {name} = {value!r} ({type(value).__name__}); expected a number")

    for phase in ("eval_before", "eval_after"):
        ev = getattr(record, phase)
        if ev is None:
            continue
        for name in ("accuracy", "questions_per_s", "eval_time_s"):
            number(f"{phase}.{name}", getattr(ev, name))
        number(f"{phase}.peak_mem_gib", ev.peak_mem_gib, optional=True)
        if isinstance(ev.n_questions, bool) or not isinstance(ev.n_questions, int):
            raise CompareError(f"{where}: {phase}.n_questions = {ev.n_questions!r}; expected an integer")
        for i, q in enumerate(ev.questions):
            for x in q.logprobs:
                number(f"{phase}.questions[{i}].logprobs", x)
    tr = record.train
    if tr is not None:
        for name in ("tokens_per_s", "step_time_s_median"):
            number(f"train.throughput.{name}", getattr(tr.throughput, name))
        number("train.memory.host_peak_rss_gib", tr.memory.host_peak_rss_gib)
        number("train.memory.peak_mem_gib", tr.memory.peak_mem_gib, optional=True)
        for name in ("loss_per_step", "step_time_s"):
            for x in getattr(tr, name):
                number(f"train.{name}", x)


def label_runs(runs: Sequence[RunSummary]) -> list[RunSummary]:
    """Label runs "R1 cpu CPU sdpa-flash (cpu)": backend, device, kernel, and what else tells them apart.

    The CPU model is named where the CPU runs differ in it (else "CPU"); compute dtype, eval packing and
    quantization blocksize are added where the runs differ in them.

    Args:
        runs: summaries in order.

    Returns:
        The same summaries, relabelled R1, R2, ...
    """
    cpu_models = {r.fingerprint.get("cpu_model") for r in runs if r.device.startswith("CPU")}
    varying = [k for k in _LABEL_SETTINGS if len({r.settings.get(k) for r in runs}) > 1]
    out = []
    for i, r in enumerate(runs):
        device = _short_device(r.device, name_cpu=len(cpu_models) > 1)
        # A setting the run does not have (no blocksize without quantization) is left out, never "None".
        extra = "".join(f" {_LABEL_SETTINGS[k]}{r.settings[k]}" for k in varying if r.settings.get(k) is not None)
        arm = {REFERENCE_ARM: " (reference)", PEER_ARM: " (peer)"}.get(r.kind, "")
        out.append(replace(r, label=f"R{i + 1} {r.backend} {device} {r.kernel}{extra}{arm}"))
    return out


# Settings a label shows where runs differ in them, with the prefix it shows them by.
_LABEL_SETTINGS = {"compute_dtype": "", "eval_packing": "eval packing ", "nf4_blocksize": "blocksize ",
                   "fp8": "fp8 "}


def _short_device(device: str, name_cpu: bool = False) -> str:
    for prefix in ("NVIDIA ", "AMD ", "Instinct "):
        device = device.removeprefix(prefix)
    if not device.startswith("CPU"):
        return device
    if not name_cpu:
        return "CPU"
    model = device.removeprefix("CPU: ")
    for noise in ("(R)", "(TM)", "Intel ", "AMD ", " Processor", " CPU"):
        model = model.replace(noise, "")
    return model.split(" @ ")[0].strip() or "CPU"


def device_label(fp: Mapping[str, Any]) -> str:
    """The device a fingerprint names: the GPU, or "CPU: <model>".

    The one function that builds a device's label: the report, the gate, run summaries, run sets, claims and
    tools/gen_docs.py all call it (labels and tables may shorten it, as :func:`label_runs` does).
    """
    return fp.get("gpu_name") or f"CPU: {fp.get('cpu_model') or 'unknown'}"


def summarize_record(record: RunRecord, path: str) -> RunSummary:
    """One run record as a summary.

    Args:
        record: a loaded record.
        path: where it was read from.

    Returns:
        Its summary (label "?").

    Raises:
        CompareError: a failure entry that cannot be read.
    """
    fp, model = record.fingerprint, record.model
    params, trainable = model.get("parameters"), model.get("trainable_parameters")
    phases = {}
    if record.eval_before is not None:
        phases[BASE] = _phase(record.eval_before)
    if record.eval_after is not None:
        phases[FINE_TUNED] = _phase(record.eval_after)
    try:
        oom = OomFailure.from_dict(record.failure, f"{path}: failure") if record.failure else None
    except FailureError as e:
        raise CompareError(str(e)) from e
    quantization = model.get("quantization") or {}
    return RunSummary(
        label="?", path=path, source="record", kind=record.kind, backend=str(fp.get("backend", "unknown")),
        device=device_label(fp), kernel=str(record.attention.get("ran", "unknown")),
        model_name=_name(model.get("name")),
        base_parameters=_base_parameters(params, trainable),
        seed=(record.config.get("model") or {}).get("seed") if model.get("source") == "preset" else None,
        quantization=quantization, fingerprint=fp, metrics=_record_metrics(record),
        phases=phases, loss_per_step=record.train.loss_per_step if record.train else (),
        adapter_dir=record.adapter_dir, schema=f"run record schema {record.schema_version}",
        created=record.created_utc, settings=record_settings(record), oom=oom,
        notes=(*record.notes, *((f"the job stopped: {oom.text}",) if oom else ())),
        invalid=record_invalid(record, path),
    )


_TRAIN_SPEED = ("train_tokens_per_s",)


def record_invalid(record: RunRecord, path: str) -> tuple[InvalidFigure, ...]:
    """Every figure of a record that cannot be judged: NaN or inf in a timing or stored figure, a phase's
    question list shorter than its ``n_questions`` (or empty), a part a finished job of its kind always writes
    missing (``train`` of a run or train record, a score of a run record). A job that stopped (``failure``)
    keeps only what it finished: its missing parts are not counted. The loss curve is left to the parity
    verdict (a NaN loss is a failed training, not a damaged file).

    Args:
        record: a loaded record (figures checked to be numbers by :func:`check_record_figures`).
        path: the file, named in each entry.

    Returns:
        The invalid figures, in file order.
    """
    out: list[InvalidFigure] = []

    def finite(name: str, value: float | None, checks: tuple[str, ...]) -> None:
        if value is not None and not math.isfinite(value):
            out.append(InvalidFigure(path, name, f"= {value!r}", checks))

    finished = record.failure is None
    tr = record.train
    if tr is None:
        if finished and record.kind in ("run", "train"):
            out.append(InvalidFigure(path, "train", f"is null in a {record.kind} record of a job that finished",
                                     (*_TRAIN_SPEED, "host_rss_gib")))
    else:
        finite("train.throughput.tokens_per_s", tr.throughput.tokens_per_s, _TRAIN_SPEED)
        finite("train.throughput.step_time_s_median", tr.throughput.step_time_s_median, _TRAIN_SPEED)
        bad = [i for i, t in enumerate(tr.step_time_s) if not math.isfinite(t)]
        if bad:
            out.append(InvalidFigure(path, f"train.step_time_s[{bad[0]}]", f"= {tr.step_time_s[bad[0]]!r} ({len(bad)} "
                                     f"of {len(tr.step_time_s)} step times not finite)", _TRAIN_SPEED))
        finite("train.memory.host_peak_rss_gib", tr.memory.host_peak_rss_gib, ("host_rss_gib",))
        finite("train.memory.peak_mem_gib", tr.memory.peak_mem_gib, ("peak_mem_gib",))
    for name, phase in (("eval_before", BASE), ("eval_after", FINE_TUNED)):
        ev = getattr(record, name)
        if ev is None:
            if finished and record.kind == "run":
                out.append(InvalidFigure(path, name, "is null in a run record of a job that finished", (phase,)))
            continue
        finite(f"{name}.accuracy", ev.accuracy, (phase,))
        finite(f"{name}.questions_per_s", ev.questions_per_s, ("questions_per_s",))
        finite(f"{name}.eval_time_s", ev.eval_time_s, ("questions_per_s",))
        finite(f"{name}.peak_mem_gib", ev.peak_mem_gib, ("peak_mem_gib",))
        if not ev.questions:
            out.append(InvalidFigure(path, f"{name}.questions", f"is empty (n_questions {ev.n_questions})", (phase,)))
        elif len(ev.questions) != ev.n_questions:
            out.append(InvalidFigure(path, f"{name}.questions", f"holds {len(ev.questions)} questions; n_questions "
                                     f"says {ev.n_questions}", (phase,)))
    if finished and record.kind == "evaluate" and record.eval_before is None and record.eval_after is None:
        out.append(InvalidFigure(path, "eval_before, eval_after", "are both null in an evaluate record", (BASE,)))
    return tuple(out)


# config.model.dtype -> the torch dtype it names; "auto" is whatever the record's numerics say ran.


def record_settings(record: RunRecord) -> dict[str, Any]:
    """The settings of a record that move its numbers: compute dtype, eval packing, NF4 blocksize, fp8 matmuls.

    Records from before these were chosen lack them: their compute dtype was bf16, their packing is
    config.eval.packing, their blocksize the quantized layer's (model.quantization); a record from before the fp8
    lever has none (not compared), one after says "off" or the formats that ran (numerics.fp8).

    Args:
        record: a loaded record.

    Returns:
        {"compute_dtype", "eval_packing", "nf4_blocksize", "fp8"} (a value None where not recorded).
    """
    numerics = getattr(record, "numerics", None) or {}
    requested = (record.config.get("model") or {}).get("dtype")
    dtype = numerics.get("compute_dtype") or DTYPE_NAMES.get(str(requested)) or DEFAULT_COMPUTE_DTYPE
    quantization = record.model.get("quantization") or {}
    return {"compute_dtype": dtype, "eval_packing": (record.config.get("eval") or {}).get("packing"),
            "nf4_blocksize": quantization.get("blocksize"), "fp8": _fp8_setting(record)}


def _fp8_setting(record: RunRecord) -> str | None:
    """The frozen base's matmuls: "off", or the formats that ran ("e4m3fn/e5m2", "emulated" where cast on CPU)."""
    if "fp8" not in (record.config.get("train") or {}):
        return None  # before the lever existed, or an evaluate record (no training)
    ran = (getattr(record, "numerics", None) or {}).get("fp8")
    if not ran:
        return "off"
    return f"{ran['forward']}/{ran['gradient']}" + (" emulated" if ran.get("emulated") else "")


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
        tp, memory = tr.throughput, tr.memory
        out["train_tokens_per_s"] = _rate(tp.tokens_per_s, tp.step_time_s_median, q1, q3)
        out["step_time_s"] = Metric(tp.step_time_s_median, float(q1), float(q3))
        out["host_rss_gib"] = Metric(memory.host_gib)  # the process's peak: what a run record measures
    peaks = [x for x in (tr.memory.peak_mem_gib if tr else None, *(e.peak_mem_gib for e in _evals(record)))
             if x is not None]
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


@dataclass(frozen=True)
class BenchEntry:
    """One case of a pytest-benchmark file: pytest-benchmark's side (name, group, params, timing) and ours.

    Attributes:
        name: the case ("test_train_ours[sdpa]").
        group: pytest-benchmark's group ("train", "decode", ...), or "".
        params: the case's parameters.
        median_s, q1_s, q3_s: pytest-benchmark's round-time statistics, where saved.
        rounds: rounds pytest-benchmark timed, where saved.
        round_times_s: every round's time (saved with --benchmark-save-data), else empty.
        case: the figures bench/ put in extra_info.
    """

    name: str
    group: str
    params: Mapping[str, Any]
    median_s: float | None
    q1_s: float | None
    q3_s: float | None
    rounds: int | None
    round_times_s: tuple[float, ...]
    case: BenchCase

    @property
    def is_train(self) -> bool:
        return self.group == "train" or "train" in self.name

    @property
    def batch(self) -> float:
        """The batch a sweep's case ran (prefill_batch parameter, else batch_size), for ordering."""
        return float(self.params.get("prefill_batch") or self.case.batch_size or 0)


def read_bench_entries(data: Mapping[str, Any], path: str) -> tuple[BenchEntry, ...]:
    """Every case of a parsed pytest-benchmark file, its extra_info read through :class:`BenchCase`.

    Args:
        data: the parsed file.
        path: where it was read from (named in errors).

    Returns:
        The cases in file order.

    Raises:
        CompareError: no ``machine_info.medqa_fingerprint``, no benchmark entries, or a case whose
            fields are of the wrong type or of another schema; names the file and case.
    """
    fp = (data.get("machine_info") or {}).get("medqa_fingerprint") if isinstance(data.get("machine_info"), dict) \
        else None
    if not isinstance(fp, dict):
        raise CompareError(f"{path}: a pytest-benchmark file without machine_info.medqa_fingerprint; expected one "
                           "saved by medqa-parity's bench/ (pytest bench/ --benchmark-save=NAME)")
    raw = data.get("benchmarks")
    entries = [e for e in raw if isinstance(e, dict)] if isinstance(raw, list) else []
    if not entries:
        raise CompareError(f"{path}: a pytest-benchmark file with no benchmark entries; expected at least one case")
    return tuple(_entry(e, i, path) for i, e in enumerate(entries))


def _entry(e: Mapping[str, Any], i: int, path: str) -> BenchEntry:
    name = str(e.get("name") or e.get("fullname") or f"case {i + 1}")
    try:
        case = BenchCase.from_extra_info(e.get("extra_info") or {}, f"{path}: {name}")
    except BenchCaseError as err:
        raise CompareError(str(err)) from err
    stats = e.get("stats") if isinstance(e.get("stats"), dict) else {}
    times = stats.get("data")
    numbers = {k: _number(stats.get(k), f"{path}: {name}: stats.{k}") for k in ("median", "q1", "q3")}
    rounds = stats.get("rounds")
    return BenchEntry(
        name=name, group=str(e.get("group") or ""), params=e.get("params") if isinstance(e.get("params"), dict) else {},
        median_s=numbers["median"], q1_s=numbers["q1"], q3_s=numbers["q3"],
        rounds=rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else None,
        round_times_s=tuple(_number(t, f"{path}: {name}: stats.data") for t in times) if isinstance(times, list)
        else (), case=case)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise CompareError(f"{where} = {value!r} is not a number; expected seconds as pytest-benchmark saves them")
    return float(value)


def summarize_benchmark(data: Mapping[str, Any], path: str) -> list[RunSummary]:
    """A pytest-benchmark file saved by ``pytest bench/``: one summary per arm and attention kernel.

    Figures may be missing (a case that ran out of memory, a file from a bench/ that records fewer).

    Args:
        data: the parsed file.
        path: where it was read from.

    Returns:
        Summaries in file order of their first case, ours first (label "?").

    Raises:
        CompareError: from :func:`read_bench_entries`.
    """
    return [summarize_entries(group, data, path) for group in group_entries(read_bench_entries(data, path))]


def group_entries(entries: Sequence[BenchEntry]) -> list[list[BenchEntry]]:
    """Entries grouped by arm and requested attention kernel, our arm first (it is the baseline)."""
    groups: dict[tuple[str, str, str], list[BenchEntry]] = {}
    for e in entries:
        requested = e.case.attention_requested or (e.case.attention or {}).get("requested") or e.params.get("attn") \
            or "unknown"
        groups.setdefault((e.case.arm, str(requested), str(e.params.get("peer") or "")), []).append(e)
    # Ours first (the baseline), then the reference, then the peer stacks.
    order = {"ours": 0, "reference": 1}
    return [g for _, g in sorted(groups.items(), key=lambda kv: order.get(kv[0][0], 2))]


def summarize_entries(entries: Sequence[BenchEntry], data: Mapping[str, Any], path: str) -> RunSummary:
    """One arm-and-kernel's cases of a bench file as a summary (the gate passes one case at a time).

    Args:
        entries: cases of one arm and requested kernel.
        data: the parsed file (machine info, commit, version).
        path: where it was read from.

    Returns:
        The summary (label "?").
    """
    fp = data["machine_info"]["medqa_fingerprint"]
    commit = data.get("commit_info") if isinstance(data.get("commit_info"), dict) else {}
    cases = [e.case for e in entries]
    requested = cases[0].attention_requested or entries[0].params.get("attn") or "unknown"
    ran = _first(c.kernel_ran for c in cases)
    kernel = ran or (f"{requested} (out of memory)" if all(c.oom for c in cases) else requested)
    if entries[0].params.get("peer"):  # a peer stack's case is named by its stack, not its attention kernel
        kernel = f"{entries[0].params['peer']}: {kernel}"
    fingerprint = {**fp, "git_commit": fp.get("git_commit") or commit.get("id"),
                   "git_dirty": fp.get("git_dirty", commit.get("dirty"))}
    quantization = _first(c.quantization for c in cases) or {}
    oom = _first(c.oom for c in cases)
    return RunSummary(
        label="?", path=path, source="benchmark", kind=f"benchmark:{cases[0].arm}",
        backend=str(_first(c.backend for c in cases) or fp.get("backend", "unknown")), device=device_label(fp),
        kernel=str(kernel), model_name=_first(c.model for c in cases),
        base_parameters=_base_parameters(_first(c.parameters for c in cases),
                                         _first(c.trainable_parameters for c in cases)), seed=None,
        quantization=quantization, fingerprint=fingerprint, metrics=_bench_metrics(entries),
        phases=_bench_phases(cases), schema=f"pytest-benchmark {data.get('version', '?')}",
        created=str(data.get("datetime", "")), notes=_bench_notes(entries), oom=oom,
        settings={"compute_dtype": _first(c.compute_dtype for c in cases)
                  or quantization.get("compute_dtype") or DEFAULT_COMPUTE_DTYPE,
                  "eval_packing": None, "nf4_blocksize": quantization.get("blocksize")},
        invalid=tuple(f for e in entries for f in bench_invalid(e, path)),
    )


# A bench case's extra_info field -> what the gate compares it as (the rest are shown, not gated).
_BENCH_CHECKS = {"throughput.tokens_per_s": _TRAIN_SPEED, "throughput.step_time_s_median": _TRAIN_SPEED,
                 "prefill_tokens_per_s": ("prefill_tokens_per_s",),
                 "decode_tokens_per_s": ("decode_tokens_per_s", "decode_compiled_tokens_per_s"),
                 "scoring.questions_per_s": ("questions_per_s",), "memory.peak_mem_gib": ("peak_mem_gib",),
                 "memory.host_rss_gib": ("host_rss_gib",), "accuracy": (BASE,)}


def bench_invalid(entry: BenchEntry, path: str) -> tuple[InvalidFigure, ...]:
    """Every figure of a bench case that cannot be judged: NaN or inf in a round time (``stats.data``), in
    pytest-benchmark's median or quartiles, or in a figure of ``extra_info``; an accuracy case whose
    predictions are fewer than its ``n_questions``.

    Args:
        entry: one case of the file.
        path: the file, named in each entry.

    Returns:
        The invalid figures, in file order.
    """
    speed = tuple(_rates(entry))  # the rates its rounds time (none: a case timed for nothing the gate compares)
    out: list[InvalidFigure] = []
    bad = [i for i, t in enumerate(entry.round_times_s) if not math.isfinite(t)]
    if bad:
        out.append(InvalidFigure(path, f"{entry.name}: stats.data[{bad[0]}]", f"= {entry.round_times_s[bad[0]]!r} "
                                 f"({len(bad)} of {len(entry.round_times_s)} round times not finite)", speed))
    for key in ("median", "q1", "q3"):
        value = getattr(entry, f"{key}_s")
        if value is not None and not math.isfinite(value):
            out.append(InvalidFigure(path, f"{entry.name}: stats.{key}", f"= {value!r}", speed))
    c = entry.case
    figures = [(f.name, getattr(c, f.name)) for f in dataclasses.fields(c)]
    figures += [kv for name in MEASUREMENTS for kv in measurement_fields(getattr(c, name), name)]
    for name, value in figures:
        if isinstance(value, float) and not math.isfinite(value):
            out.append(InvalidFigure(path, f"{entry.name}: extra_info.{name}", f"= {value!r}",
                                     _BENCH_CHECKS.get(name, ())))
    if c.predictions and c.n_questions is not None and len(c.predictions) != c.n_questions:
        out.append(InvalidFigure(path, f"{entry.name}: extra_info.predictions", f"holds {len(c.predictions)} "
                                 f"questions; n_questions says {c.n_questions}", (BASE,)))
    return tuple(out)


def _first(values: Iterable[Any]) -> Any:
    return next((v for v in values if v is not None), None)


def _bench_notes(entries: Sequence[BenchEntry]) -> tuple[str, ...]:
    weights = [f"weights: {w}" for w in dict.fromkeys(e.case.weights for e in entries if e.case.weights)]
    return (*weights, *(f"{e.name}: {e.case.oom.text}" for e in entries if e.case.oom))


def _bench_metrics(entries: Sequence[BenchEntry]) -> dict[str, Metric]:
    ran = [e for e in entries if e.case.oom is None]
    out: dict[str, Metric] = {}
    for e in sorted(ran, key=lambda e: e.batch, reverse=True):  # the largest batch of a sweep speaks for throughput
        _take_rates(e, out)
        _take_train(e, out)
    latency = sorted((e for e in ran if e.case.ttft_s_median is not None), key=lambda e: e.batch)  # one request
    if latency:
        out["ttft_s"] = Metric(latency[0].case.ttft_s_median)
    for key in ("peak_mem_gib", "host_rss_gib"):  # the most any case needed
        values = [v for e in ran if e.case.memory is not None and (v := getattr(e.case.memory, key)) is not None]
        if values:
            out[key] = Metric(max(values))
    return out


def _rates(entry: BenchEntry) -> dict[str, float]:
    """The rates a case measured, by metric key."""
    c = entry.case
    rates = {"prefill_tokens_per_s": c.prefill_tokens_per_s, "questions_per_s": c.questions_per_s,
             ("decode_compiled_tokens_per_s" if c.compile_mode else "decode_tokens_per_s"): c.decode_tokens_per_s,
             "train_tokens_per_s": c.tokens_per_s if entry.is_train else None}
    return {k: v for k, v in rates.items() if v is not None}


def _take_rates(entry: BenchEntry, out: dict[str, Metric]) -> None:
    rates = _rates(entry)
    for name, value in rates.items():
        if name in out:
            continue
        # An entry timing one rate: its rounds' quartiles give that rate's band.
        one = len(rates) == 1
        out[name] = _rate(value, entry.median_s, entry.q1_s, entry.q3_s) if one else Metric(value)


def _take_train(entry: BenchEntry, out: dict[str, Metric]) -> None:
    c = entry.case
    if not entry.is_train:
        return
    tp = c.throughput
    if tp is not None and tp.step_time_s_median is not None and "step_time_s" not in out:
        out["step_time_s"] = Metric(tp.step_time_s_median, entry.q1_s, entry.q3_s)
    for key, value in (("mfu", tp.mfu_measured if tp else None), ("speedup_vs_reference", c.speedup_vs_reference)):
        if value is not None and key not in out:
            out[key] = Metric(value)


def _bench_phases(cases: Sequence[BenchCase]) -> dict[str, PhaseScores]:
    # Accuracy cases score the fresh adapter (LoRA B = 0): the base model's scores.
    for c in cases:
        if c.predictions:
            acc = float(np.mean([q.correct for q in c.predictions]))
            return {BASE: PhaseScores(acc, len(c.predictions), c.predictions)}
        if c.accuracy is not None and c.n_questions:
            return {BASE: PhaseScores(c.accuracy, c.n_questions, ())}
    return {}
