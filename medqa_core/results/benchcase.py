"""One bench case's figures, typed: the only writer of ``benchmark.extra_info`` and the only reader of it.

bench/ fills a case's ``extra_info`` and, before pytest-benchmark saves it, passes it through
:meth:`BenchCase.from_extra_info` and :meth:`BenchCase.to_extra_info`, which check every field's type
and stamp ``schema_version``. The report, the gate and the docs read saved files through
:meth:`BenchCase.from_extra_info` alone, never by string keys of their own.

Case schema versions:
    1  files written before the schema existed (no ``schema_version`` in extra_info); the
       out-of-memory entry named its phase ``during``. Read by migration.
    2  ``schema_version`` and ``compute_dtype`` added; ``oom`` is
       :class:`~medqa_core.results.failure.OomFailure`; an unmeasured energy is null, not "unavailable".
       Read by migration.
    3  this module: the figures a run record shares are the measurements of
       :mod:`medqa_core.results.measurements`, nested under the run record's names: ``throughput``
       (tokens_per_s, step_time_s_median/_iqr, model_flops_per_s, mfu_datasheet, datasheet_peak, mfu_measured,
       measured_peak_flops_per_s: schema 2's mfu and peak_bf16_flops_per_s), ``memory`` (peak_mem_gib,
       host_rss_gib), ``energy`` (joules_per_token, joules_per_question) and ``scoring`` (questions_per_s,
       questions_per_s_iqr, round_time_s_median); ``compile`` is typed (Compile). Schema 2's flat fields move
       there unchanged on read.

Fields not named below (dynamo counters, per-round losses, ...) are kept as written in
``details`` and saved flat beside the typed ones. No torch here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from medqa_core.results.failure import FailureError, OomFailure
from medqa_core.results.measurements import (
    MEASUREMENTS,
    Compile,
    Energy,
    MeasurementError,
    Memory,
    Scoring,
    TrainThroughput,
)
from medqa_core.results.record import QuestionResult

BENCH_CASE_SCHEMA = 3
READABLE_SCHEMAS = (1, 2, BENCH_CASE_SCHEMA)
# Schema 2's flat fields -> (measurement, field) of schema 3.
_V2_FIELDS = {"tokens_per_s": ("throughput", "tokens_per_s"),
              "step_time_s_median": ("throughput", "step_time_s_median"),
              "step_time_s_iqr": ("throughput", "step_time_s_iqr"),
              "model_flops_per_s": ("throughput", "model_flops_per_s"),
              "mfu_datasheet": ("throughput", "mfu_datasheet"),
              "datasheet_peak": ("throughput", "datasheet_peak"),
              "mfu": ("throughput", "mfu_measured"),
              "peak_bf16_flops_per_s": ("throughput", "measured_peak_flops_per_s"),
              "peak_mem_gib": ("memory", "peak_mem_gib"),
              "host_rss_gib": ("memory", "host_rss_gib"),
              "joules_per_token": ("energy", "joules_per_token"),
              "joules_per_question": ("energy", "joules_per_question"),
              "questions_per_s": ("scoring", "questions_per_s"),
              "questions_per_s_iqr": ("scoring", "questions_per_s_iqr"),
              "round_time_s_median": ("scoring", "round_time_s_median")}
# What a case did: speed and memory of two cases compare only where these match.
WORKLOAD_FIELDS = ("batch_size", "seq_len", "seq_len_max", "tokens_per_step", "questions", "eval_batch_size",
                   "new_tokens", "cache", "compile_mode", "decode_loop", "gradient_checkpointing", "packing",
                   "prompt_tokens", "compute_dtype")
# Files of schema 1 lack compute_dtype: every bench of that time ran under bf16 autocast.
DEFAULT_COMPUTE_DTYPE = "bfloat16"


class BenchCaseError(ValueError):
    """A case's extra_info cannot be read: another schema version, or a field of the wrong type."""


@dataclass(frozen=True)
class BenchCase:
    """The figures of one bench case (units in the names); None where the case did not measure it.

    Attributes:
        arm: "ours" or "reference" (the common-guide QLoRA recipe).
        attention_requested: the kernel asked for.
        attention: requested, ran and attn_implementation, once the model loaded.
        backend, model, weights: where it ran and on what ("random preset (seed 0): ...").
        compute_dtype: autocast / compute dtype of the case ("bfloat16", "float16", "float32").
        quantization: settings read back from a quantized layer.
        batch_size ... prompt_tokens, profile, memory_cap_gib: what the case did (see WORKLOAD_FIELDS).
        throughput: the train step's TrainThroughput, as a run record's ``train.throughput`` (tokens_per_s, step
            time, MFU over the datasheet and the measured peak).
        compile: what torch.compile did in a train case (Compile, as a run record's ``train.compile``).
        speedup_vs_reference, reference_tokens_per_s: ours against the reference arm of the same run.
        prefill_tokens_per_s, ttft_s_*: prefill rate and time to first token.
        decode_tokens_per_s, roofline_fraction: decode rate and its share of the weight-read roofline.
        scoring: questions_per_s(_iqr), round_time_s_median: scoring rate (model time) and the whole round's time.
        accuracy, n_questions, split, predictions: an accuracy case's scores, per question.
        memory, energy: Memory (peak_mem_gib, host_rss_gib) and Energy (None fields: not measured here).
        parameters, trainable_parameters: model size.
        timed_rounds: rounds behind the figures.
        oom: what ran out of memory, or None.
        unmeasured: typed fields the case recorded as null (measured as unavailable here, e.g. device memory on
            CPU), written back as null; a field the case never set is left out.
        details: every other field, as written.
        schema_version: BENCH_CASE_SCHEMA of the writer.
    """

    arm: str = "ours"
    attention_requested: str | None = None
    attention: Mapping[str, Any] | None = None
    backend: str | None = None
    model: str | None = None
    weights: str | None = None
    compute_dtype: str | None = None
    quantization: Mapping[str, Any] | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    seq_len_max: int | None = None
    tokens_per_step: float | None = None  # mean real tokens of the timed rounds (one batch each)
    questions: int | None = None
    eval_batch_size: int | None = None
    new_tokens: int | None = None
    prompt_tokens: int | None = None
    cache: str | None = None
    compile_mode: str | None = None
    decode_loop: str | None = None
    gradient_checkpointing: bool | str | None = None  # a peer's own mode by name (Unsloth's "unsloth")
    packing: bool | None = None
    profile: str | None = None
    checkpoint_layers: int | None = None
    memory_cap_gib: float | None = None
    within_memory_cap: bool | None = None
    throughput: TrainThroughput | None = None
    compile: Compile | None = None
    speedup_vs_reference: float | None = None
    reference_tokens_per_s: float | None = None
    prefill_tokens_per_s: float | None = None
    ttft_s_median: float | None = None
    ttft_s_iqr: float | None = None
    decode_tokens_per_s: float | None = None
    roofline_fraction: float | None = None
    scoring: Scoring | None = None
    accuracy: float | None = None
    n_questions: int | None = None
    split: str | None = None
    predictions: tuple[QuestionResult, ...] = ()
    memory: Memory | None = None
    energy: Energy | None = None
    parameters: int | None = None
    trainable_parameters: int | None = None
    timed_rounds: int | None = None
    oom: OomFailure | None = None
    unmeasured: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    schema_version: int = BENCH_CASE_SCHEMA

    @property
    def kernel_ran(self) -> str | None:
        """The attention kernel that ran, or None (out of memory before the model loaded)."""
        ran = (self.attention or {}).get("ran")
        return None if ran is None else str(ran)

    @property
    def dtype(self) -> str:
        """The compute dtype, bf16 where the file predates the field."""
        return self.compute_dtype or DEFAULT_COMPUTE_DTYPE

    @property
    def tokens_per_s(self) -> float | None:
        """``throughput.tokens_per_s``, or None (not a train case, or out of memory)."""
        return None if self.throughput is None else self.throughput.tokens_per_s

    @property
    def questions_per_s(self) -> float | None:
        """``scoring.questions_per_s``, or None (not a scoring case)."""
        return None if self.scoring is None else self.scoring.questions_per_s

    @property
    def peak_mem_gib(self) -> float | None:
        """``memory.peak_mem_gib``: the device peak, or None (CPU, or not measured)."""
        return None if self.memory is None else self.memory.peak_mem_gib

    def workload(self) -> dict[str, Any]:
        """What the case did, for matching two cases (WORKLOAD_FIELDS that were recorded)."""
        out = {k: getattr(self, k) for k in WORKLOAD_FIELDS if getattr(self, k) is not None}
        out["compute_dtype"] = self.dtype
        return out

    def headline(self) -> str:
        """The case in one line: its rate and, for accuracy, the score ("1,234 real tokens/s, MFU 3.1%, ...")."""
        if self.oom is not None:
            return self.oom.text
        if self.details.get("skipped_reason"):  # a case that could not run here (a peer stack not installed, ...)
            return f"skipped: {self.details['skipped_reason']}"
        tp = self.throughput
        if tp is not None and tp.tokens_per_s is not None:
            mfu = ("-" if tp.mfu_measured is None else f"{100 * tp.mfu_measured:.1f}% of the measured peak") \
                if tp.mfu_datasheet is None else f"{100 * tp.mfu_datasheet:.1f}% of the datasheet peak"
            step = "" if tp.step_time_s_median is None else f", step {1000 * tp.step_time_s_median:.0f} ms"
            peak = "n/a" if self.peak_mem_gib is None else f"{self.peak_mem_gib:.1f} GiB"
            speedup = f", {self.speedup_vs_reference:.2f}x the reference" if self.speedup_vs_reference else ""
            return (f"{tp.tokens_per_s:,.0f} real tokens/s, MFU {mfu}{step}, peak {peak}, batch {self.batch_size}"
                    f"{speedup}")
        if self.decode_tokens_per_s is not None:
            roof = "" if self.roofline_fraction is None else f", {100 * self.roofline_fraction:.1f}% of roofline"
            return f"{self.decode_tokens_per_s:,.1f} decode tokens/s at batch {self.batch_size or 1}{roof}"
        if self.prefill_tokens_per_s is not None:
            ttft = "" if self.ttft_s_median is None else f", time to first token {1000 * self.ttft_s_median:.0f} ms"
            return f"{self.prefill_tokens_per_s:,.0f} prefill tokens/s{ttft}"
        if self.questions_per_s is not None:
            return f"{self.questions_per_s:,.1f} questions/s ({self.questions} questions)"
        if self.accuracy is not None:
            return f"accuracy {100 * self.accuracy:.1f}% on {self.n_questions or len(self.predictions)} questions"
        gap = self.details.get("curve_gap")
        if gap:  # a lever's loss curve against the default's (bench/bench_levers.py)
            return (f"loss curve of {self.details.get('lever')}: max |diff| {gap['max_abs_diff']:.4f} over "
                    f"{gap['steps']} steps, {100 * gap['relative']:.2f}% of the mean loss")
        return "no figure"

    def to_extra_info(self) -> dict[str, Any]:
        """The case as bench/ saves it: typed fields that are set, then ``details``, flat."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("details", "unmeasured") or (f.name == "predictions" and not value):
                continue
            if value is None:
                if f.name in self.unmeasured:
                    out[f.name] = None
                continue
            if f.name == "predictions":
                value = [{**dataclasses.asdict(q), "logprobs": list(q.logprobs)} for q in value]
            elif f.name == "oom" or f.name in MEASUREMENTS:
                value = value.to_dict()
            elif isinstance(value, Mapping):
                value = dict(value)
            out[f.name] = value
        clash = sorted(out.keys() & self.details.keys())
        if clash:
            raise BenchCaseError(f"details repeat typed fields {', '.join(clash)}")
        return {**out, **self.details}

    @classmethod
    def from_extra_info(cls, info: Mapping[str, Any], where: str = "extra_info") -> BenchCase:
        """Read a case's extra_info (schemas 1 and 2 are migrated; a newer schema is refused).

        Args:
            info: the saved extra_info.
            where: names the case in errors ("file.json: test_train_ours[sdpa]").

        Returns:
            The case.

        Raises:
            BenchCaseError: not a mapping, an unknown schema version, or a field of the wrong type; the
                message names the case, the field, what was found and what is expected.
        """
        if not isinstance(info, Mapping):
            raise BenchCaseError(f"{where}: extra_info is {type(info).__name__}; expected an object")
        found = info.get("schema_version", 1)
        if found not in READABLE_SCHEMAS:
            raise BenchCaseError(f"{where}: bench case schema_version {found!r}, expected {BENCH_CASE_SCHEMA} (1 and 2 "
                                 "are migrated on read); it was written by another version of medqa-parity")
        data = dict(info)
        if found == 1:
            data = _migrate_v1(data)
        if found in (1, 2):
            data = _migrate_v2(data)
        kwargs: dict[str, Any] = {"schema_version": BENCH_CASE_SCHEMA}
        details: dict[str, Any] = {}
        for key, value in data.items():
            if key == "schema_version":
                continue
            if key not in _TYPES:
                details[key] = value
                continue
            kwargs[key] = _check(key, value, _TYPES[key], where)
        unmeasured = tuple(k for k in _TYPES if k in data and kwargs.get(k) is None)
        return cls(**kwargs, unmeasured=unmeasured, details=details)


def _migrate_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: "unavailable" energy becomes null, an accuracy case's list of ``questions`` its predictions."""
    for key in ("joules_per_token", "joules_per_question"):
        if data.get(key) == "unavailable":
            data[key] = None
    if isinstance(data.get("questions"), list):
        data["predictions"] = data.pop("questions")
    return data


def _migrate_v2(data: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 -> 3: the flat figures a run record shares move, unchanged, into their measurement.

    A measurement is made only where the case wrote one of its fields; an energy written "unavailable"
    (bench/ wrote that without a meter) becomes null.
    """
    nested: dict[str, dict[str, Any]] = {}
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in _V2_FIELDS:
            part, name = _V2_FIELDS[key]
            nested.setdefault(part, {})[name] = None if value == "unavailable" else value
        else:
            out[key] = value
    clash = sorted(out.keys() & nested.keys())
    if clash:
        raise BenchCaseError(f"{', '.join(clash)} in a schema 2 case beside its flat fields")
    return {**out, **nested}


def _check(key: str, value: Any, kind: str, where: str) -> Any:
    if value is None:
        return None
    if kind == "measurement":
        try:
            return MEASUREMENTS[key].from_dict(value, f"{where}: {key}")
        except MeasurementError as e:
            raise BenchCaseError(str(e)) from e
    bad = BenchCaseError(f"{where}: {key} = {_short(value)} ({type(value).__name__}); expected {kind}")
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if kind == "true/false":
        if not isinstance(value, bool):
            raise bad
        return value
    if kind == "true/false or a mode":
        if not isinstance(value, bool | str):
            raise bad
        return value
    if kind == "text":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "object":
        if not isinstance(value, Mapping):
            raise bad
        return dict(value)
    if kind == "out-of-memory object":
        try:
            return OomFailure.from_dict(value, f"{where}: oom")
        except FailureError as e:
            raise BenchCaseError(str(e)) from e
    return _predictions(value, where)


def _predictions(value: Any, where: str) -> tuple[QuestionResult, ...]:
    if not isinstance(value, list):
        raise BenchCaseError(f"{where}: predictions is {type(value).__name__}; expected a list of "
                             "{qid, answer, pred, logprobs}")
    out = []
    for i, q in enumerate(value):
        try:
            logprobs = tuple(float(x) for x in q["logprobs"])
            if any(isinstance(x, bool | str) for x in q["logprobs"]) or isinstance(q["answer"], bool):
                raise TypeError("not a number")
            out.append(QuestionResult(str(q["qid"]), int(q["answer"]), int(q["pred"]), logprobs))
        except (KeyError, TypeError, ValueError) as e:
            raise BenchCaseError(f"{where}: predictions[{i}] = {_short(q)}: {type(e).__name__} {e}; each needs qid, "
                                 "answer, pred (integers) and logprobs (numbers)") from e
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KINDS = {"float | None": "number", "int | None": "integer", "bool | None": "true/false",
          "bool | str | None": "true/false or a mode", "str | None": "text",
          "str": "text", "Mapping[str, Any] | None": "object", "OomFailure | None": "out-of-memory object",
          "tuple[QuestionResult, ...]": "predictions", "TrainThroughput | None": "measurement",
          "Memory | None": "measurement", "Energy | None": "measurement", "Scoring | None": "measurement",
          "Compile | None": "measurement"}
# Field name -> expected kind, from the annotations above: one list of fields.
_TYPES = {f.name: _KINDS[str(f.type)] for f in dataclasses.fields(BenchCase)
          if f.name not in ("details", "unmeasured", "schema_version")}
