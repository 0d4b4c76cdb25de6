"""The typed measurements a run record and a bench case share: one owner per figure, its unit in its name.

A run record's ``train`` and a bench case carry the same objects under the same names (``throughput``,
``memory``; a bench case also ``energy`` and ``scoring``), built by the same functions, so a figure is
computed once and read the same way from either file (optimum-benchmark's ``Latency``/``Memory``, built
``from_values``). No torch here: readers build them from saved JSON anywhere.

    TrainThroughput  real (non-pad) tokens per second of the timed steps, step-time median and IQR, model
                     FLOPs per second and MFU against the card's datasheet peak (and, in bench cases, the
                     matmul peak measured in the same run).
    Memory           device peak (None on CPU) and host resident memory: the process's peak (run records) or
                     its resident set after the timed rounds (bench cases); each producer fills the one it
                     measures and leaves the other None.
    Energy           joules of the timed rounds, per token and per question (None: no meter here).
    Scoring          questions per second of the scoring loop (median over rounds), its IQR, a round's time.
    Compile          what torch.compile did before and during the timed steps: graphs, seconds, recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from medqa_core.measure.flops import datasheet_mfu


class MeasurementError(ValueError):
    """A saved measurement is not an object of the expected fields, or a field is not a number."""


M = TypeVar("M", bound="_Measurement")


@dataclass(frozen=True)
class _Measurement:
    """Every field is a number or None (``datasheet_peak``: an object or None)."""

    def to_dict(self) -> dict[str, Any]:
        """The measurement as JSON saves it (a tuple as a list, so a saved file and its re-reading compare equal)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls: type[M], d: Any, where: str) -> M:
        """Read one saved measurement; missing fields are None (not measured).

        Raises:
            MeasurementError: not an object, an unknown field, or a field of the wrong type; names ``where``.
        """
        if isinstance(d, cls):
            return d
        if not isinstance(d, Mapping):
            raise MeasurementError(f"{where} is {type(d).__name__}; expected an object of "
                                   f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise MeasurementError(f"{where}: unknown field {', '.join(unknown)} (written by a newer medqa-parity?)")
        out: dict[str, Any] = {}
        for key, value in d.items():
            kind = str(names[key].type)
            if value is None:
                out[key] = None
            elif kind.startswith("str | bool"):
                if not isinstance(value, str | bool):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected text, true/false or null")
                out[key] = value
            elif kind.startswith("str"):
                if not isinstance(value, str):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected text or null")
                out[key] = value
            elif kind.startswith("bool"):
                if not isinstance(value, bool):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected true/false or null")
                out[key] = value
            elif kind.startswith("tuple"):
                if not isinstance(value, list | tuple) or any(isinstance(x, bool) or not isinstance(x, int)
                                                              for x in value):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected a list of integers or null")
                out[key] = tuple(value)
            elif kind.startswith("dict"):
                if not isinstance(value, Mapping):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected an object or null")
                out[key] = dict(value)
            elif str(names[key].type).startswith("int"):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise MeasurementError(f"{where}.{key} = {value!r}; expected an integer or null")
                out[key] = value
            else:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise MeasurementError(f"{where}.{key} = {value!r} ({type(value).__name__}); expected a number "
                                           "or null")
                out[key] = float(value)
        return cls(**out)


@dataclass(frozen=True)
class TrainThroughput(_Measurement):
    """Train-step throughput over the timed steps (warm-up steps left out)."""

    tokens_per_s: float | None = None  # real (non-pad) tokens of the timed steps / their summed time
    step_time_s_median: float | None = None
    step_time_s_iqr: float | None = None  # p75 - p25, numpy's linear interpolation
    model_flops_per_s: float | None = None  # flops.train_step_flops of the counted steps over their time
    mfu_datasheet: float | None = None  # model_flops_per_s over the datasheet dense peak of the compute dtype
    datasheet_peak: dict[str, Any] | None = None  # flops.DatasheetPeak that mfu_datasheet divides by, with dtype
    mfu_measured: float | None = None  # model_flops_per_s over the bf16 matmul peak measured in the run (bench)
    measured_peak_flops_per_s: float | None = None  # that measured peak

    @classmethod
    def from_steps(cls, step_time_s: Sequence[float], step_tokens: Sequence[float],
                   step_flops: Sequence[float | None], gpu_name: str | None, dtype: str,
                   measured_peak_flops_per_s: float | None = None) -> TrainThroughput:
        """The throughput of timed steps: the one function run records and bench cases build it with.

        Args:
            step_time_s: wall seconds of each timed step (warm-up left out).
            step_tokens: real tokens of each (all ranks).
            step_flops: model FLOPs of each; None for a step not counted (trained before a resume).
            gpu_name: the card (:func:`medqa_core.measure.device.gpu_name`), None on CPU: picks the datasheet peak.
            dtype: the short compute dtype ("bf16", "fp16", "fp32").
            measured_peak_flops_per_s: the bf16 matmul peak measured in the same run, or None.

        Returns:
            The throughput; MFU fields None where no peak is known.

        Raises:
            ValueError: no timed step, or the lists differ in length.
        """
        if not step_time_s or not (len(step_time_s) == len(step_tokens) == len(step_flops)):
            raise ValueError(f"{len(step_time_s)} step times, {len(step_tokens)} token counts, {len(step_flops)} FLOP "
                             "counts; a throughput needs at least one timed step and one of each per step")
        p25, p50, p75 = np.percentile(np.asarray(step_time_s, dtype=np.float64), [25, 50, 75])
        counted = [(f, t) for f, t in zip(step_flops, step_time_s, strict=True) if f is not None]
        flops_per_s = sum(f for f, _ in counted) / sum(t for _, t in counted) if counted else None
        mfu, peak = datasheet_mfu(flops_per_s, gpu_name, dtype)
        measured = measured_peak_flops_per_s
        return cls(
            tokens_per_s=sum(step_tokens) / sum(step_time_s), step_time_s_median=float(p50),
            step_time_s_iqr=float(p75 - p25), model_flops_per_s=flops_per_s, mfu_datasheet=mfu, datasheet_peak=peak,
            mfu_measured=flops_per_s / measured if measured and flops_per_s is not None else None,
            measured_peak_flops_per_s=measured)


@dataclass(frozen=True)
class Memory(_Measurement):
    """Memory of a measured phase; None where not measured here (device memory on CPU)."""

    peak_mem_gib: float | None = None  # device peak over the phase
    host_peak_rss_gib: float | None = None  # the process's peak resident memory (run records)
    host_rss_gib: float | None = None  # resident memory after the timed rounds (bench cases)

    @property
    def host_gib(self) -> float | None:
        """The host figure this measurement has: the peak where measured, else the resident set."""
        return self.host_peak_rss_gib if self.host_peak_rss_gib is not None else self.host_rss_gib


@dataclass(frozen=True)
class Energy(_Measurement):
    """Energy of the timed rounds; None without an energy meter."""

    energy_j: float | None = None  # summed over the timed rounds
    joules_per_token: float | None = None
    joules_per_question: float | None = None

    @classmethod
    def from_rounds(cls, joules: float | None, rounds: int, tokens_per_round: float | None = None,
                    questions_per_round: float | None = None) -> Energy:
        """Energy per token and per question over ``rounds`` timed rounds that used ``joules`` (None: no meter)."""
        def per(units: float | None) -> float | None:
            return None if joules is None or units is None else joules / (units * rounds)
        return cls(joules, per(tokens_per_round), per(questions_per_round))


@dataclass(frozen=True)
class Scoring(_Measurement):
    """Scoring speed: lm-evaluation-harness ``acc`` scoring of the eval questions, timed per round."""

    questions_per_s: float | None = None  # median over rounds of the scoring loop's rate (tokenization excluded)
    questions_per_s_iqr: float | None = None
    round_time_s_median: float | None = None  # a whole round, tokenization included


@dataclass(frozen=True)
class Compile(_Measurement):
    """torch.compile of the decoder layers (engine/compiling.CompileState), as the train step ran it."""

    requested: str | bool | None = None  # TrainConfig.compile: "auto", "on", "off" (older files: true/false)
    ran: bool | None = None  # whether compiled layers ran (False: eager, with the reason in detail)
    detail: str | None = None
    graphs: int | None = None  # graphs Dynamo compiled in all
    compile_s: float | None = None  # seconds Dynamo and Inductor spent compiling them
    warmup_graphs: int | None = None  # graphs compiled by the warm-up before step 1
    warmup_s: float | None = None  # the warm-up's wall seconds
    recompiles: int | None = None  # graphs compiled during training steps, after the warm-up
    recompile_steps: tuple[int, ...] | None = None  # the steps that compiled one
    cache: dict[str, Any] | None = None  # the compile cache: state, file, artifacts_loaded, saved_bytes, ...
    recompiles_in_timed_rounds: int | None = None  # bench cases: graphs compiled during the timed rounds


MEASUREMENTS: dict[str, type[_Measurement]] = {"throughput": TrainThroughput, "memory": Memory, "energy": Energy,
                                               "scoring": Scoring, "compile": Compile}


def measurement_fields(m: _Measurement | None, prefix: str) -> list[tuple[str, Any]]:
    """(``prefix.field``, value) of each field of ``m`` (none for None), for checks that walk every figure."""
    return [] if m is None else [(f"{prefix}.{f.name}", getattr(m, f.name)) for f in dataclasses.fields(m)]
