"""Run records: dataclasses <-> JSON, one file per run, with a schema version.

Pure data: nothing here imports torch, so reports and gates read records anywhere.

Fields of a record (units in names):
    schema_version   int, SCHEMA_VERSION of the writer (2); schema 1 is migrated on read (its flat train
                     figures moved into train.throughput and train.memory), another version is refused.
    kind             "run" (train + evaluate before/after), "train" or "evaluate".
    created_utc      ISO-8601 time the record was written.
    config           RunConfig.to_dict() of the run.
    fingerprint      machine_fingerprint(): device, backend, versions, git commit.
    model            name, source, parameter counts, quantization read back from a layer.
    numerics         the compute dtype that ran (requested, compute_dtype, reason); null in records
                     written before it was recorded, which all computed in bf16.
    phases_s         wall seconds of each phase: load (data, model, preset generation), score_before,
                     compile (the warm-up before step 1), train (the steps, checkpoints, the adapter's save),
                     score_after; null in older records.
    attention        requested kernel and the one the profiler saw run.
    train            TrainResult or null: steps, losses, step times, and the measurements a bench case shares
                     (medqa_core.results.measurements): ``throughput`` (tokens_per_s, step_time_s_median/_iqr,
                     model_flops_per_s, mfu_datasheet, datasheet_peak), ``memory`` (peak_mem_gib,
                     host_peak_rss_gib) and ``compile``.
    eval_before      EvalResult of the base model (LoRA not applied) or null.
    eval_after       EvalResult after fine-tuning (or of the evaluated adapter) or null.
    adapter_dir      where the LoRA adapter was saved, or null.
    notes            plain-language caveats (random-weight preset, untested backend, ...).
    wall_time_s      wall time of the whole job, model loading included.
    failure          null, or what stopped the job, with the phase it stopped in and a message:
                     kind "oom" (memory_allocated_gib, peak_mem_gib, host_rss_gib at the time) or kind "interrupted"
                     (signal "SIGTERM"/"SIGINT", step and steps of training done and asked for, the
                     checkpoint written on the way out or null) or kind "write" (a checkpoint could not be
                     written: path, message, free_bytes on its disk then, step and steps, the newest
                     checkpoint that was written or null); the phases that finished before it keep their
                     results.
    eval_curve       null, or the eval loss during fine-tuning (``run --eval-every``, run sets): a list of
                     {step, eval_loss_nats, accuracy, n_questions}, step 0 the base model, scored on the
                     first n_questions of the eval split; eval_loss_nats is the mean negative
                     log-likelihood of each question's right answer letter (the answer-token loss).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medqa_core.results.measurements import Compile, MeasurementError, Memory, TrainThroughput
from medqa_core.results.storage import fsync_dir, is_write_failure, new_folders, remove_if_empty, write_error

SCHEMA_VERSION = 2
# Schema 1 kept the train figures flat in ``train``; schema 2 nests them as the measurements a bench case
# shares (medqa_core.results.measurements). Read by migration: _migrate_v1.
READABLE_VERSIONS = (1, SCHEMA_VERSION)
# Schema 1's flat train fields -> (measurement, field) of schema 2.
_V1_TRAIN_FIELDS = {"tokens_per_s": ("throughput", "tokens_per_s"),
                    "step_time_s_median": ("throughput", "step_time_s_median"),
                    "step_time_s_iqr": ("throughput", "step_time_s_iqr"),
                    "model_flops_per_s": ("throughput", "model_flops_per_s"),
                    "mfu_datasheet": ("throughput", "mfu_datasheet"),
                    "datasheet_peak": ("throughput", "datasheet_peak"),
                    "peak_mem_gib": ("memory", "peak_mem_gib"),
                    "host_peak_rss_gib": ("memory", "host_peak_rss_gib")}


class RecordError(ValueError):
    """A record file cannot be read as a run record of this schema version."""


@dataclass(frozen=True)
class QuestionResult:
    """One question's option log-likelihoods (lm-evaluation-harness ``acc`` scoring)."""

    qid: str
    answer: int  # index of the right option
    pred: int  # argmax of logprobs
    logprobs: tuple[float, ...]  # summed log-probability of each continuation " A".." D"

    @property
    def correct(self) -> bool:
        return self.pred == self.answer


@dataclass(frozen=True)
class EvalResult:
    split: str
    n_questions: int
    accuracy: float
    accuracy_ci95: tuple[float, float]  # Wilson score interval
    n_tokens: int  # prompt tokens scored
    eval_time_s: float
    questions_per_s: float
    peak_mem_gib: float | None
    questions: tuple[QuestionResult, ...]


@dataclass(frozen=True)
class StepImbalance:
    """How unevenly the ranks shared the steps: per step, the most loaded rank over the ranks' mean (1.0: even),
    and the median of that over the timed steps measured on every rank."""

    time_max_over_mean: float  # slowest rank's step wall time / mean (waits at collectives included)
    tokens_max_over_mean: float  # most real tokens on one rank / mean
    steps: int  # the timed steps the medians are over

    @classmethod
    def from_ranks(cls, rank_step_time_s: Sequence[Sequence[float]], rank_step_tokens: Sequence[Sequence[int]],
                   first_timed_step: int) -> StepImbalance | None:
        """From per-step, per-rank figures (a step not measured per rank is empty); None when no timed step was."""
        timed = [(t, n) for t, n in list(zip(rank_step_time_s, rank_step_tokens, strict=True))[first_timed_step:]
                 if t and n]
        if not timed:
            return None
        return cls(statistics.median(_max_over_mean(t) for t, _ in timed),
                   statistics.median(_max_over_mean(n) for _, n in timed), len(timed))


def _max_over_mean(values: Sequence[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


@dataclass(frozen=True)
class TrainResult:
    steps: int
    epochs: float  # examples seen / examples in the split
    n_examples: int
    tokens: int  # real (non-pad) tokens over all steps
    timed_steps: int  # steps after the timing warm-up
    train_time_s: float  # wall time of the timed steps
    throughput: TrainThroughput  # tokens_per_s, step_time_s_median/_iqr, model_flops_per_s, mfu_datasheet, ...
    memory: Memory  # peak_mem_gib (device; None on CPU), host_peak_rss_gib
    loss_per_step: tuple[float, ...]
    step_time_s: tuple[float, ...]
    world_size: int = 1  # data-parallel ranks; tokens and tokens_per_s count all of them
    all_reduce_s: float | None = None  # one all-reduce of all LoRA gradients, measured alone
    compile: Compile | None = None  # what torch.compile did (a bench case's ``compile`` too)
    # Under torchrun (None for one process): per step, per rank, the step's wall time and real tokens (a step
    # trained before a resume from a checkpoint that lacks them is empty), their StepImbalance over the timed
    # steps, and how the ranks shared the model (distributed.ddp_info's DDP buckets, sharded.sharding_info's).
    rank_step_time_s: tuple[tuple[float, ...], ...] | None = None
    rank_step_tokens: tuple[tuple[int, ...], ...] | None = None
    step_imbalance: StepImbalance | None = None
    parallel: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunRecord:
    kind: str
    config: dict[str, Any]
    fingerprint: dict[str, Any]
    model: dict[str, Any]
    attention: dict[str, Any]
    train: TrainResult | None = None
    eval_before: EvalResult | None = None
    eval_after: EvalResult | None = None
    adapter_dir: str | None = None
    notes: tuple[str, ...] = ()
    wall_time_s: float | None = None  # the whole job: loading, scoring, training
    failure: dict[str, Any] | None = None  # e.g. an out-of-memory: phase, configuration, memory at the time
    numerics: dict[str, Any] | None = None  # numerics.Numerics.as_dict(); None: an older record (bf16)
    phases_s: dict[str, float] | None = None  # wall seconds: load, score_before, compile, train, score_after
    # run.memory_promise: the --profile spec, how it was chosen, the peak it promised and whether it held
    profile: dict[str, Any] | None = None
    # The eval loss during fine-tuning, per point {step, eval_loss_nats, accuracy, n_questions}; None: not measured
    eval_curve: tuple[dict[str, Any], ...] | None = None
    created_utc: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fields(cls: type, d: Any, where: str, part: str) -> None:
    """``d`` (the record's ``part``) is an object holding every field of ``cls`` that has no default, and no other.

    Raises:
        RecordError: naming the file (``where``) and each field ("train.tokens_per_s").
    """
    if not isinstance(d, dict):
        raise RecordError(f"{where}: {part} is a JSON {type(d).__name__}, not an object")
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in d]
    if missing:
        raise RecordError(f"{where}: missing {', '.join(f'{part}.{m}' for m in missing)}")
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise RecordError(f"{where}: unknown field {', '.join(f'{part}.{u}' for u in unknown)} (written by a newer "
                          "medqa-parity?)")


def _eval_from_dict(d: dict[str, Any] | None, where: str = "record", part: str = "eval") -> EvalResult | None:
    if d is None:
        return None
    _check_fields(EvalResult, d, where, part)
    questions = tuple(QuestionResult(q["qid"], q["answer"], q["pred"], tuple(q["logprobs"])) for q in d["questions"])
    return EvalResult(**{**d, "accuracy_ci95": tuple(d["accuracy_ci95"]), "questions": questions})


def _train_from_dict(d: dict[str, Any] | None, where: str = "record") -> TrainResult | None:
    if d is None:
        return None
    _check_fields(TrainResult, d, where, "train")
    ranks = {k: tuple(tuple(step) for step in d[k]) for k in ("rank_step_time_s", "rank_step_tokens") if d.get(k)}
    imbalance = d.get("step_imbalance")
    try:
        throughput = TrainThroughput.from_dict(d["throughput"], f"{where}: train.throughput")
        memory = Memory.from_dict(d["memory"], f"{where}: train.memory")
        compiled = None if d.get("compile") is None else Compile.from_dict(d["compile"], f"{where}: train.compile")
    except MeasurementError as e:
        raise RecordError(str(e)) from e
    return TrainResult(**{**d, "loss_per_step": tuple(d["loss_per_step"]), "step_time_s": tuple(d["step_time_s"]),
                          **ranks, "step_imbalance": StepImbalance(**imbalance) if imbalance else None,
                          "throughput": throughput, "memory": memory, "compile": compiled})


def _migrate_v1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 -> 2: the flat train figures move, unchanged, into ``train.throughput`` and ``train.memory``."""
    train = d.get("train")
    if not isinstance(train, dict):
        return {**d, "schema_version": SCHEMA_VERSION}
    nested: dict[str, dict[str, Any]] = {"throughput": {}, "memory": {}}
    rest = {}
    for key, value in train.items():
        if key in _V1_TRAIN_FIELDS:
            part, name = _V1_TRAIN_FIELDS[key]
            nested[part][name] = value
        else:
            rest[key] = value
    return {**d, "schema_version": SCHEMA_VERSION, "train": {**rest, **nested}}


def record_from_dict(d: dict[str, Any], where: str = "record") -> RunRecord:
    """Rebuild a record; ``where`` names the source in error messages.

    Raises:
        RecordError: wrong schema version, missing or mistyped fields.
    """
    if not isinstance(d, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(d).__name__}")
    found = d.get("schema_version")
    if found not in READABLE_VERSIONS:
        raise RecordError(f"{where}: schema_version {found!r}, expected {SCHEMA_VERSION} (or 1, migrated on read); "
                          "it was written by another version of medqa-parity")
    if found == 1:
        d = _migrate_v1(d)
    # Added within schema 1: older files lack them.
    d = {"wall_time_s": None, "failure": None, "numerics": None, "phases_s": None, "profile": None,
         "eval_curve": None, **d}
    names = {f.name for f in dataclasses.fields(RunRecord)}
    missing = sorted(names - d.keys())
    if missing:
        raise RecordError(f"{where}: missing {', '.join(missing)}")
    curve = d["eval_curve"]
    if curve is not None and not (isinstance(curve, list) and all(isinstance(p, dict) for p in curve)):
        raise RecordError(f"{where}: eval_curve must be null or a list of {{step, eval_loss_nats, ...}} objects")
    try:
        return RunRecord(**{
            **{k: d[k] for k in names},
            "train": _train_from_dict(d["train"], where),
            "eval_before": _eval_from_dict(d["eval_before"], where, "eval_before"),
            "eval_after": _eval_from_dict(d["eval_after"], where, "eval_after"),
            "notes": tuple(d["notes"]),
            "eval_curve": None if d["eval_curve"] is None else tuple(dict(p) for p in d["eval_curve"]),
        })
    except (KeyError, TypeError) as e:
        raise RecordError(f"{where}: malformed field ({e})") from e


def load_record(path: str | Path) -> RunRecord:
    """Read a run record written by :func:`save_record`.

    Raises:
        RecordError: unreadable file, broken JSON, another schema version, or missing fields;
            the message names the file.
    """
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise RecordError(f"{path}: cannot read ({e.strerror})") from e
    except (ValueError, RecursionError) as e:  # bad UTF-8, broken JSON, absurd numbers or nesting
        raise RecordError(f"{path}: not a JSON run record ({e})") from e
    return record_from_dict(d, where=str(path))


def record_filename(record: RunRecord) -> str:
    stamp = record.created_utc.replace("-", "").replace(":", "").replace("+0000", "Z")
    backend = record.fingerprint.get("backend", "unknown")
    model = str(record.model.get("name", "model")).replace(os.sep, "_")
    # A random suffix: two runs started in the same second never share a name.
    return f"{stamp}_{record.kind}_{model}_{backend}_{secrets.token_hex(4)}.json"


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON so that a crash leaves the old file or the new one, never half of one.

    The file gets the user's umask (0644 by default), as ``open`` would give it.

    Raises:
        WriteError: the folder cannot be created or the file written (a full disk, an I/O error); no
            temporary file, nor a folder created for it, is left behind.
    """
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    created = new_folders(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0666 & ~umask, unlike mkstemp's 0600
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)  # the rename itself survives a power cut
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # e.g. the folder was never created
            pass
        remove_if_empty(created)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(path, e) from e
        raise


def save_record(record: RunRecord, results_dir: str | Path) -> Path:
    """Save ``record`` under ``results_dir`` with a fresh, unique name; returns its path.

    Raises:
        WriteError: it cannot be written (see :func:`write_json_atomic`).
    """
    path = Path(results_dir) / record_filename(record)
    write_json_atomic(path, record.to_dict())
    return path
