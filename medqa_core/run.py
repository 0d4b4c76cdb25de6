"""RunConfig -> load model -> train / evaluate -> RunRecord saved under results/ (and the trace command's
profiled steps): the orchestrator; nothing imports it but cli."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from medqa_core.compare.runsets import (
    DEFAULT_TARGET_LOSS_NATS,
    REPEAT,
    SEED,
    RunFigures,
    summarize,
    summary_dict,
)
from medqa_core.engine.attention import attention_info, training_attention
from medqa_core.engine.checkpoint import (
    CheckpointError,
    CheckpointLock,
    CheckpointWriteError,
    check_resume,
    list_checkpoints,
    lock_checkpoints,
)
from medqa_core.engine.config import (
    AUTO_SETTINGS,
    RunConfig,
    apply_named_settings,
    choose_memory_class,
    memory_cap_gib,
    memory_promise_held,
)
from medqa_core.engine.curve import EvalCurve
from medqa_core.engine.data import Splits, check_prompt_lengths, encode_train, first_examples, load_splits
from medqa_core.engine.distributed import DistInfo, all_reduce_sum, barrier, init_distributed, shutdown
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.fp8 import run_formats
from medqa_core.engine.model import check_adapter, count_parameters, preset_dir, remote_code, save_adapter
from medqa_core.engine.preemption import Interrupted, StopOnSignals
from medqa_core.engine.session import Session, load_session
from medqa_core.engine.sharded import check_sharding, full_trainable_state, is_sharded, shard_model
from medqa_core.engine.train import prepare_training, total_steps, train
from medqa_core.measure.device import device_memory_gib, resolve_device
from medqa_core.measure.fingerprint import machine_fingerprint
from medqa_core.measure.timing import free_device_memory, is_oom, oom_failure
from medqa_core.measure.trace import StepProfile, profile_steps
from medqa_core.results.record import EvalResult, RunRecord, TrainResult, save_record
from medqa_core.results.runset import RunSet, RunSetEntry, relative_path, save_runset
from medqa_core.results.storage import (
    WriteError,
    check_room,
    free_text,
    new_folders,
    probe_dir,
    remove_if_empty,
    size_text,
    unique_name,
)

logger = logging.getLogger(__name__)

# (phase, done, total, extra) -> None; the CLI draws it as a progress bar.
Progress = Callable[[str, int, int, dict[str, float]], None]

RANDOM_WEIGHTS_NOTE = ("random-weight preset {name} (seed {seed}): the figures measure speed, memory and the "
                       "pipeline, not medical knowledge; accuracy stays near chance (25%)")
ROCM_NOTE = ("ROCm: this code path has not been validated by the project on a ROCm machine; "
             "compare against a CUDA record with `medqa-parity report` before trusting it")


def _model_info(session: Session) -> dict[str, Any]:
    total, trainable = count_parameters(session.model)
    cfg = session.config.model
    return {
        "name": cfg.name, "source": "path" if cfg.path else "preset", "dir": str(session.model_dir),
        "parameters": total, "trainable_parameters": trainable,
        "quantization": dataclasses.asdict(session.quant),
    }


def _notes(session: Session, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    cfg = session.config.model
    notes = list(extra)
    if not cfg.path:
        notes.append(RANDOM_WEIGHTS_NOTE.format(name=cfg.preset, seed=cfg.seed))
    if session.device.type == "cuda" and torch.version.hip:
        notes.append(ROCM_NOTE)
    return tuple(notes)


def _bar(progress: Progress | None, phase: str, stop: StopOnSignals | None = None) -> Callable[..., None] | None:
    """The progress callback of one phase; with ``stop``, it also ends the phase on a signal (scoring's batches)."""
    if progress is None and stop is None:
        return None

    def bar(done: int, total: int, *loss: float) -> None:
        if progress is not None:
            progress(phase, done, total, {"loss": loss[0]} if loss else {})
        if stop is not None:
            stop.check()

    return bar


def resolve_auto_settings(cfg: RunConfig, device: torch.device) -> tuple[RunConfig, str | None]:
    """``cfg`` with an "auto" profile replaced by the memory class that fits ``device`` (config.choose_memory_class).

    Returns:
        The config, and how its profile was chosen ("auto: ...") or None when the user named it (or none).
    """
    if cfg.train.profile != AUTO_SETTINGS:
        return cfg, None
    card = device_memory_gib(device)
    name = choose_memory_class(card)
    train = apply_named_settings(name, dataclasses.replace(cfg.train, profile=None))
    why = f"auto: a {card:.1f} GiB card" if card is not None else "auto: no GPU"
    logger.info("profile %s (%s)", name, why)
    return dataclasses.replace(cfg, train=train), why


def memory_promise(cfg: RunConfig, chosen_by: str | None, peak_gib: float | None) -> dict[str, Any] | None:
    """What the run's profile promised (its peak memory) and whether the run kept it; None without a profile."""
    spec = cfg.train.profile
    if spec is None:
        return None
    return {"spec": spec, "chosen_by": chosen_by or "asked", "memory_cap_gib": memory_cap_gib(spec),
            "peak_mem_gib": peak_gib, "held": memory_promise_held(spec, peak_gib)}


# Settings that may differ when a run resumes: they do not change the steps trained so far. The steps
# to train (more of them, or fewer down to the checkpoint's), evaluation, checkpoint cadence, timing,
# where results go. The backend is not compared either: another device resumes, but not bit for bit. Nor is
# shard: only DDP writes checkpoints, and checkpoints older than the setting do not have it.
RESUME_MAY_CHANGE = {"train": ("max_steps", "epochs", "checkpoint_every", "keep_checkpoints", "timing_warmup_steps",
                               "shard"),
                     "data": ("eval_split", "eval_limit")}


def checkpoint_config(cfg: RunConfig) -> dict[str, Any]:
    """The settings a checkpoint must share with the run that resumes it (all but :data:`RESUME_MAY_CHANGE`)."""
    d = cfg.to_dict()
    kept = {part: {k: v for k, v in d[part].items() if k not in RESUME_MAY_CHANGE.get(part, ())}
            for part in ("model", "lora", "train", "data")}
    # Through JSON, so it compares equal to the copy a checkpoint stored (tuples come back as lists).
    return json.loads(json.dumps(kept))


DEFAULT_ADAPTERS = Path("runs") / "adapters"


class OutputWriteError(WriteError):
    """An output could not be written where asked (a full disk, an I/O error); the job's results were saved
    elsewhere where possible. ``record`` is the job's record; ``path`` where it was saved (None: nowhere);
    ``problems`` one sentence per output that failed, naming its path, the error, the free space and where it
    went instead."""

    def __init__(self, record: RunRecord, path: Path | None, problems: list[str], first: WriteError) -> None:
        super().__init__(first.path, first.reason, first.free_bytes)
        self.record, self.saved_path, self.problems = record, path, tuple(problems)
        self.args = ("; ".join(problems),)

    def __str__(self) -> str:
        return self.args[0]


def rescue_dir() -> Path:
    """Where results go when their own folder cannot be written: ``<system temp>/medqa-parity-rescue``."""
    return Path(tempfile.gettempdir()) / "medqa-parity-rescue"


def check_outputs(kind: str, results_dir: str | Path, adapter_out: str | None, checkpoints: str | None,
                  checkpoints_option: str) -> None:
    """Before the model loads: each folder the job will write is a folder, can be created and takes a file.

    Folders created for the probe are removed again: they appear when something is written in them, so a job
    that stops before (a bad setting, a damaged model) leaves nothing behind.

    Raises:
        OutputFolderError: naming the folder, the option, what is wrong and what to do.
    """
    folders = [(Path(results_dir), "--results")]
    if kind in ("run", "train"):
        folders.append((Path(adapter_out) if adapter_out else DEFAULT_ADAPTERS, "--adapter-out"))
    if checkpoints is not None:
        folders.append((Path(checkpoints), checkpoints_option))
    created: list[Path] = []
    try:
        for folder, option in folders:
            created = new_folders(folder) + created
            probe_dir(folder, option)
    finally:
        remove_if_empty(created)


def output_bytes(session: Session, kind: str, n_eval: int) -> tuple[int, int, int]:
    """About how many bytes the (adapter, one checkpoint, record) of this job take on disk.

    The adapter is the trainable weights as they are stored; a checkpoint adds AdamW's two moments (fp32) and
    small files; a record holds about 300 bytes per scored question beside its settings.
    """
    trainable = [p for p in session.model.parameters() if p.requires_grad]
    adapter = sum(p.numel() * p.element_size() for p in trainable) + (64 << 10)
    checkpoint = adapter + sum(2 * 4 * p.numel() for p in trainable) + (64 << 10)
    scored = n_eval * (2 if kind == "run" else 1) if kind != "train" else 0
    return adapter, checkpoint, (128 << 10) + 300 * scored


def _lock(root: Path | None, cfg: RunConfig, info: DistInfo, device: torch.device,
          command: str) -> CheckpointLock | None:
    """The checkpoint folder's lock, taken by rank 0; under torchrun every rank learns whether it was refused."""
    if root is None:
        return None
    lock, refused = None, None
    if info.is_main:
        try:
            lock = lock_checkpoints(root, checkpoint_config(cfg), command)
        except CheckpointError as e:
            refused = e
    if info.enabled:
        flag = torch.tensor([1.0 if refused else 0.0], device=device)
        if all_reduce_sum(flag).item() and refused is None:
            raise CheckpointError(f"{root}: in use by another job (rank 0 names it)")
    if refused is not None:
        raise refused
    return lock


def _saved_elsewhere(what: str, e: WriteError, instead: Path | None, second: WriteError | None) -> str:
    """One sentence on an output that could not be written where asked, and where it went."""
    text = f"cannot write {what} to {e.path} ({e.reason}; {free_text(e.path)} there)"
    if instead is not None:
        return f"{text}; saved in {instead} instead"
    return f"{text}; not saved elsewhere either ({second.path}: {second.reason})" if second else text


def execute(cfg: RunConfig, kind: str = "run", adapter_dir: str | None = None, adapter_out: str | None = None,
            progress: Progress | None = None, checkpoint_dir: str | None = None,
            resume: str | None = None, stop: StopOnSignals | None = None, trust_remote_code: bool = False,
            command: str = "", session: Session | None = None, eval_before: EvalResult | None = None,
            curve: EvalCurve | None = None) -> tuple[RunRecord, Path | None]:
    """Run one job and save its record.

    Args:
        cfg: the run's configuration.
        kind: "run" (evaluate, fine-tune, evaluate), "train" (fine-tune only) or "evaluate".
        adapter_dir: for "evaluate", a saved LoRA adapter to score (None: the base model).
        adapter_out: where "run" and "train" save the adapter (default runs/adapters/<time>).
        progress: progress callback for the long steps.
        checkpoint_dir: where to write training checkpoints (None: none unless resuming).
        resume: a checkpoint folder to continue training from (checkpoints keep going there).
        stop: signal handlers (see ``preemption``); on SIGTERM/SIGINT the job stops at the next training
            step or scoring batch, checkpoints, and saves the record with ``failure`` kind "interrupted".
        trust_remote_code: let a model folder's own code run (config.json ``auto_map``); refused otherwise.
        command: the command line, written into the checkpoint folder's lock for another job's message.
        session: a model already loaded for ``cfg`` (a run set's): used as it is, its adapter reset by the caller.
        eval_before: the base model's scores, when already scored with this session (a run set scores them once:
            LoRA's B starts at zero, so every fresh adapter scores as the base).
        curve: score the eval loss during fine-tuning (``RunRecord.eval_curve``).

    Returns:
        The record and the path it was saved to (None on ranks other than 0, which write nothing).

    Raises:
        CheckpointError: ``resume`` cannot be used, or another job holds the checkpoint folder (checked before
            the model loads).
        MedQADataError: a question is too long to fit (checked before the model loads).
        OutputFolderError: an output folder cannot be created or written (before the model loads), or its disk
            has less room than the outputs need (after it loads, before any scoring or training).
        OutputWriteError: an output could not be written (a full disk, an I/O error) after the work; what could
            be saved was saved (e.g. in :func:`rescue_dir`), and the error holds the record. A checkpoint that
            cannot be written stops training: the record then has ``failure`` kind "write".
    """
    if kind not in ("run", "train", "evaluate"):
        raise ValueError(f"unknown kind {kind!r}")
    started = time.perf_counter()
    splits = load_splits(cfg.data, evaluates=kind != "train")
    trains = kind in ("run", "train")
    # Before the model loads: questions too long to ever fit, and a checkpoint this run may not resume.
    check_prompt_lengths(splits.train if trains else [], cfg.train.max_seq_len)
    check_prompt_lengths(splits.eval if kind != "train" else [], cfg.eval.max_seq_len, "--eval-max-seq-len")
    if kind == "evaluate" and adapter_dir:
        check_adapter(adapter_dir)  # a mistyped --adapter fails in a second, not after the model loads
    device = resolve_device(cfg.backend)
    cfg, profile_chosen_by = resolve_auto_settings(cfg, device) if trains else (cfg, None)
    if trains and cfg.train.attn:  # e.g. flex on CPU: refused before the model loads and anything is scored
        training_attention(cfg.train.attn, device)
    if trains:  # likewise fp8 on a device without fp8 tensor cores
        run_formats(device, cfg.train.fp8, cfg.train.fp8_emulate)
    if resume is not None and trains:
        check_resume(Path(resume), checkpoint_config(cfg), total_steps(len(splits.train), cfg.train))
    ckpt = (resume or checkpoint_dir) if trains else None
    check_outputs(kind, cfg.results_dir, adapter_out, ckpt, "--resume" if resume else "--checkpoint-dir")
    info = init_distributed(device.type)
    if info.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if info.local_rank == 0 and not cfg.model.path:
            preset_dir(str(cfg.model.preset), cfg.model.seed)  # once per host (each has its own cache), not per rank
        barrier()
    check_sharding(cfg, kind, info.world_size, checkpointing=bool(ckpt))
    lock = _lock(Path(ckpt) if ckpt else None, cfg, info, device, command)
    try:
        return _execute_locked(cfg, kind, adapter_dir, adapter_out, progress, ckpt, resume, stop,
                               trust_remote_code, device, info, splits, started, profile_chosen_by, session,
                               eval_before, curve)
    finally:
        if lock is not None:
            lock.release()


def _check_room(session: Session, cfg: RunConfig, kind: str, splits: Splits, adapter_out: str | None,
                ckpt: str | None, resume: str | None) -> None:
    """Refuse a job whose disks lack room for its record, adapter and checkpoints (sized by :func:`output_bytes`).

    Raises:
        OutputFolderError: naming the folder, the option, the room needed and the room free.
    """
    adapter_b, checkpoint_b, record_b = output_bytes(session, kind, len(splits.eval))
    needs = [(Path(cfg.results_dir), record_b, "--results")]
    if kind in ("run", "train"):
        needs.append((Path(adapter_out) if adapter_out else DEFAULT_ADAPTERS, adapter_b, "--adapter-out"))
    if ckpt:
        # At its fullest the folder holds --keep-checkpoints of them and the one being written; those there
        # already take their room.
        every, n_steps = cfg.train.checkpoint_every, total_steps(len(splits.train), cfg.train)
        held = min(len(list_checkpoints(Path(ckpt))), cfg.train.keep_checkpoints)
        peak = min(cfg.train.keep_checkpoints + 1, held + (n_steps // every if every else 0) + 1)
        needs.append((Path(ckpt), max(peak - held, 1) * checkpoint_b, "--resume" if resume else "--checkpoint-dir"))
    check_room(needs)
    logger.debug("outputs: adapter about %s, a checkpoint about %s, the record about %s", size_text(adapter_b),
                 size_text(checkpoint_b), size_text(record_b))


def _adapter_target(adapter_out: str | None) -> Path:
    """Where the adapter goes: ``--adapter-out``, else a new folder under :data:`DEFAULT_ADAPTERS`."""
    # The time, this process and a random suffix: two jobs started in the same second never share it.
    return Path(adapter_out) if adapter_out else \
        DEFAULT_ADAPTERS / unique_name(datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"))


def _save_adapter_or_rescue(model: Any, target: Path, state: dict[str, Any] | None
                            ) -> tuple[str | None, str | None, WriteError | None]:
    """Save the fine-tuned adapter in ``target``, else in :func:`rescue_dir`: the fine-tune is done, keep it.

    Returns:
        (the folder saved in or None, a sentence on what went elsewhere or None, the first write error or None).
    """
    try:
        return str(save_adapter(model, target, state)), None, None
    except WriteError as e:
        instead, second, saved = rescue_dir() / unique_name(target.name), None, None
        try:
            saved = str(save_adapter(model, instead, state))
        except WriteError as e2:
            instead, second = None, e2
        problem = _saved_elsewhere("the adapter", e, instead, second)
        logger.error("%s", problem)
        return saved, problem, e


def _write_failure(e: CheckpointWriteError, phase: str, ckpt: str | None, session: Session,
                   adapter_out: str | None, is_main: bool) -> dict[str, Any]:
    """The record's ``failure`` (kind "write") when a checkpoint could not be written; the checkpoints before it
    stand. After the last step the fine-tune itself finished: its adapter is saved (``failure["adapter"]``)."""
    newest = list_checkpoints(Path(ckpt))[-1:] if ckpt else []
    failure = {"kind": "write", "phase": phase, "path": str(e.path), "message": e.reason,
               "free_bytes": e.free_bytes, "step": e.step, "steps": e.steps,
               "checkpoint": str(newest[0]) if newest else None, "adapter": None}
    logger.error("%s during %s", e, phase)
    if e.step == e.steps and is_main and not is_sharded(session.model):
        target = _adapter_target(adapter_out)
        for folder in (target, rescue_dir() / unique_name(target.name)):
            try:
                failure["adapter"] = str(save_adapter(session.model, folder))
                break
            except WriteError as e2:
                logger.error("%s", e2)
    return failure


def _save_record_or_rescue(record: RunRecord, results_dir: str) -> tuple[Path | None, str | None, WriteError | None]:
    """Save ``record`` in ``results_dir``, else in :func:`rescue_dir`.

    Returns:
        (the path saved to or None, a sentence on what went elsewhere or None, the first write error or None).
    """
    try:
        return save_record(record, results_dir), None, None
    except WriteError as e:
        path, second = None, None
        try:
            path = save_record(record, rescue_dir())
        except WriteError as e2:
            second = e2
        problem = _saved_elsewhere("the record", e, path, second)
        logger.error("%s", problem)
        return path, problem, e


@dataclass
class _PhaseClock:
    """Wall seconds of each phase, so a run's time to result splits into load, compile, train and score."""

    phases: dict[str, float]
    mark: float

    @classmethod
    def since(cls, started: float) -> _PhaseClock:
        now = time.perf_counter()
        return cls({"load": now - started}, now)

    def lap(self, name: str) -> None:
        """The time since the last lap goes to ``name``."""
        now = time.perf_counter()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.mark
        self.mark = now

    def split_train(self, result: TrainResult, curve: EvalCurve | None) -> None:
        """Out of the fine-tune's lap: the curve's scoring between steps, and the compile warm-up before step 1."""
        if curve is not None:
            self.phases["curve"], self.phases["train"] = curve.seconds, self.phases["train"] - curve.seconds
        compile_s = (result.compile.warmup_s or 0.0) if result.compile else 0.0
        self.phases["compile"], self.phases["train"] = compile_s, self.phases["train"] - compile_s

    def phases_s(self) -> dict[str, float]:
        return {k: self.phases[k] for k in ("load", "score_before", "compile", "train", "curve", "score_after")
                if k in self.phases}


def _fine_tune(session: Session, cfg: RunConfig, splits: Splits, progress: Progress | None,
               curve: EvalCurve | None, ckpt: str | None, resume: str | None, info: DistInfo,
               stop: StopOnSignals | None) -> TrainResult:
    """The fine-tune of a run or train job: its examples encoded, the eval curve hooked in, trained."""
    tok = session.tokenizer
    examples = [encode_train(tok, item, cfg.train.max_seq_len, cfg.train.loss_on) for item in splits.train]
    bar = _bar(progress, "fine-tune")
    if curve is not None:
        curve.use_split(splits.eval, splits.eval_name)
        bar = curve.hook(bar, session.model, tok, cfg.eval, session.device, session.attention, session.numerics)
    return train(session.model, examples, cfg.train, session.device, session.attention, tok.pad_token_id,
                 session.numerics, bar, checkpoint_dir=Path(ckpt) if ckpt else None, resume=resume is not None,
                 checkpoint_config=checkpoint_config(cfg), dist_info=info,
                 stop=stop.requested if stop is not None else None)


def _execute_locked(cfg: RunConfig, kind: str, adapter_dir: str | None, adapter_out: str | None,
                    progress: Progress | None, ckpt: str | None, resume: str | None, stop: StopOnSignals | None,
                    trust_remote_code: bool, device: torch.device, info: DistInfo, splits: Splits,
                    started: float, profile_chosen_by: str | None, session: Session | None,
                    eval_before: EvalResult | None, curve: EvalCurve | None) -> tuple[RunRecord, Path | None]:
    """:func:`execute` from loading the model on, with the checkpoint folder (if any) held."""
    trains = kind in ("run", "train")
    notes = list(splits.notes if kind != "evaluate" else ())
    session = session or load_session(cfg, adapter_dir=adapter_dir, device=device,
                                      trust_remote_code=trust_remote_code)
    if info.is_main:  # before any scoring or training: room for what the job will write
        _check_room(session, cfg, kind, splits, adapter_out, ckpt, resume)
    custom = remote_code(session.model_dir) if trust_remote_code and cfg.model.path else []
    if custom:
        notes.append(f"--trust-remote-code: the model folder's own code ran ({'; '.join(custom)})")
    model_info = _model_info(session)  # before any sharding: a sharded weight counts only this rank's slice
    if cfg.train.shard == "fsdp":
        shard_model(session.model, device)
    clock = _PhaseClock.since(started)
    tok, device, attention = session.tokenizer, session.device, session.attention
    results: dict[str, Any] = {"eval_before": None, "train": None, "eval_after": None}
    saved_adapter, failure = None, None
    problems: list[str] = []  # outputs written elsewhere than asked (OutputWriteError)
    first_error: WriteError | None = None
    phase = "evaluate (before)"
    try:
        if stop is not None and stop.requested():  # a signal while the model loaded
            phase = "load"
            stop.check()
        if eval_before is not None and kind == "run":
            results["eval_before"] = eval_before
        elif info.is_main and (kind == "run" or (kind == "evaluate" and not adapter_dir)):
            # LoRA's B matrices start at zero, so the fresh adapter scores exactly as the base model.
            results["eval_before"] = evaluate(session.model, tok, splits.eval, cfg.eval, device, attention,
                                              splits.eval_name, _bar(progress, phase, stop),
                                              numerics=session.numerics)
            clock.lap("score_before")
        if kind in ("run", "train"):
            phase = "fine-tune"
            results["train"] = _fine_tune(session, cfg, splits, progress, curve, ckpt, resume, info, stop)
            # Sharded LoRA weights are gathered whole first: a collective, so every rank takes part.
            state = full_trainable_state(session.model) if is_sharded(session.model) else None
            if info.is_main:
                saved_adapter, problem, error = _save_adapter_or_rescue(session.model, _adapter_target(adapter_out),
                                                                        state)
                if problem is not None:  # the fine-tune is done: kept elsewhere, and said so
                    first_error = first_error or error
                    problems.append(problem)
                    notes.append(problem)
            clock.lap("train")
            clock.split_train(results["train"], curve)
        if info.is_main and (kind == "run" or (kind == "evaluate" and adapter_dir)):
            phase = "evaluate (after)"
            results["eval_after"] = evaluate(session.model, tok, splits.eval, cfg.eval, device, attention,
                                             splits.eval_name, _bar(progress, phase, stop),
                                             numerics=session.numerics)
            clock.lap("score_after")
    except Interrupted as e:  # a result too: what finished is kept, training continues with --resume
        failure = e.as_failure(phase)
        logger.warning("%s during %s", e, phase)
    except CheckpointWriteError as e:  # training stops; the checkpoints before it stand
        failure = _write_failure(e, phase, ckpt, session, adapter_out, info.is_main)
        saved_adapter = failure["adapter"] or saved_adapter
    except Exception as e:
        if not is_oom(e):
            raise
        # Out of memory is a result: record which configuration ran out and keep what finished.
        oom = oom_failure(e, phase, device)
        failure = oom.to_dict()  # the same schema as a bench case's OOM (medqa_core.results.failure)
        logger.error("%s", oom.text)
    if failure is not None:
        free_device_memory(device)  # the failed step's tensors, held by the traceback until now
    record = RunRecord(
        kind=kind, config=cfg.to_dict(), fingerprint=machine_fingerprint(device), model=model_info,
        attention=attention_info(attention, session.kernel_ran),
        train=results["train"], eval_before=results["eval_before"], eval_after=results["eval_after"],
        adapter_dir=saved_adapter or adapter_dir,
        numerics={**session.numerics.as_dict(),  # with the fp8 lever: the formats and scaling the base ran
                  "fp8": dataclasses.asdict(formats) if trains and (formats := run_formats(
                      device, cfg.train.fp8, cfg.train.fp8_emulate)) else None},
        notes=_notes(session, tuple(notes)),
        wall_time_s=time.perf_counter() - started, failure=failure, phases_s=clock.phases_s(),
        profile=memory_promise(cfg, profile_chosen_by,
                               results["train"].memory.peak_mem_gib if results["train"] else None)
        if trains else None,
        eval_curve=tuple(curve.points) if curve is not None and curve.points else None,
    )
    path = None
    if info.is_main:
        path, problem, error = _save_record_or_rescue(record, cfg.results_dir)
        if problem is not None:
            first_error = first_error or error
            problems.append(problem)
    barrier()
    shutdown()
    if problems:
        assert first_error is not None
        raise OutputWriteError(record, path, problems, first_error)
    return record, path


# ---- trace: where a train step's time goes, per named training settings ----------------------------------------

def trace_training(cfg: Any, profiles: Sequence[str], steps: int, warmup: int) -> tuple[dict[str, StepProfile],
                                                                                          dict[str, Any]]:
    """Load ``cfg``'s model once and profile our train step under each named training profile.

    Each profile steps on the first batch of its own batch size in the training loop's order.

    Returns:
        The profiles by name, and the metadata to save beside them (fingerprint, settings, compile state).
    """
    session = load_session(cfg)
    splits = load_splits(cfg.data)
    results: dict[str, StepProfile] = {}
    settings: dict[str, Any] = {}
    for name in profiles:
        tc = apply_named_settings(name, cfg.train)
        examples = first_examples(session.tokenizer, splits.train, tc.batch_size, tc.seed, tc.max_seq_len,
                                  tc.loss_on)
        trainer = prepare_training(session.model, tc, session.device, session.attention,
                                   session.tokenizer.pad_token_id, session.numerics)
        settings[name] = {"train": dataclasses.asdict(tc), "compile": trainer.compiled.as_dict()}
        try:
            results[name] = profile_steps(trainer, examples, session.device, steps, warmup)
        except Exception as e:
            if not is_oom(e):
                raise
            settings[name]["oom"] = str(e).splitlines()[0][:300]  # recorded; the next profile still runs
            logger.warning("profile %s: out of memory (%s)", name, settings[name]["oom"])
        finally:
            trainer.close()
            trainer.optimizer.zero_grad(set_to_none=True)
            free_device_memory(session.device)
    meta = {"fingerprint": machine_fingerprint(session.device), "model": cfg.model.name,
            "attention": {"requested": session.attention.requested, "ran": session.kernel_ran},
            "settings": settings}
    return results, meta


# ---- run sets: N seeds and the first seed once more, one model load --------------------------------------------

CURVE_POINTS = 8  # eval-curve points per run when --eval-every is not given: every ceil(steps / 8) steps
CURVE_QUESTIONS = 128  # questions each point scores (the first of the eval split)


@dataclass(frozen=True)
class SetPlan:
    """What ``run --repeats`` runs: the seeds, whether the first is repeated, the eval curve and its target.

    Attributes:
        seeds: the training seeds (adapter init, data order, dropout), distinct, in run order.
        repeat: train the first seed once more at the end (the same-seed floor).
        eval_every: steps between eval-curve points (None: every ceil(steps / CURVE_POINTS) steps).
        curve_questions: questions each curve point scores.
        target_loss_nats: eval-loss target of time to target.
        runset_dir: where the run-set file goes (None: ``runsets`` beside the records' folder).
    """

    seeds: tuple[int, ...]
    repeat: bool = True
    eval_every: int | None = None
    curve_questions: int = CURVE_QUESTIONS
    target_loss_nats: float = DEFAULT_TARGET_LOSS_NATS
    runset_dir: str | None = None

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("a run set needs at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds {list(self.seeds)} repeat one; MLPerf's rule and ours: unique seeds (the "
                             "same-seed repeat is added by itself)")

    def order(self) -> list[tuple[int, str]]:
        """(seed, role) of every run, in order: the seeds, then the first seed's repeat."""
        return [(s, SEED) for s in self.seeds] + ([(self.seeds[0], REPEAT)] if self.repeat else [])


def execute_set(cfg: RunConfig, plan: SetPlan, progress: Progress | None = None,
                stop: StopOnSignals | None = None,
                on_run: Callable[[int, int, RunRecord, Path | None], None] | None = None) -> tuple[RunSet, Path]:
    """Fine-tune ``cfg`` once per seed of ``plan`` (and the first seed again), save each record, then the run set.

    The model loads (and generates, for a preset) once; before each run its LoRA adapter is reset to the run's
    seed (``model.reset_adapter``: A seeded, B zero), and training reseeds data order and dropout from it. The
    base model's scores (``eval_before``) and the curve's step-0 point are the same for every fresh adapter,
    so they are scored once and shared. A run that fails (out of memory, a signal) ends the set: the runs saved
    so far are named in the run-set file, with a note.

    Args:
        cfg: the configuration; ``cfg.train.seed`` is replaced by each run's seed.
        plan: seeds, repeat, eval curve, target.
        progress: progress callback for each run's long steps.
        stop: signal handlers (see ``execute``).
        on_run: called after each run with (index, total, record, path).

    Returns:
        The run set and the path of its file.

    Raises:
        MedQADataError: a question too long to fit (checked before the model loads).
    """
    from medqa_core.engine.model import reset_adapter

    started = time.perf_counter()
    splits = load_splits(cfg.data)
    check_prompt_lengths(splits.train, cfg.train.max_seq_len)
    check_prompt_lengths(splits.eval, cfg.eval.max_seq_len, "--eval-max-seq-len")
    device = resolve_device(cfg.backend)
    resolved, _ = resolve_auto_settings(cfg, device)
    if resolved.train.attn:
        training_attention(resolved.train.attn, device)
    steps = total_steps(len(splits.train), resolved.train)
    every = plan.eval_every or max(1, math.ceil(steps / CURVE_POINTS))
    session = load_session(dataclasses.replace(resolved, train=dataclasses.replace(resolved.train,
                                                                                   seed=plan.seeds[0])),
                           device=device)
    load_s = time.perf_counter() - started
    set_stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    runs: list[tuple[int, str, RunRecord, Path]] = []
    eval_before, start_point, notes = None, None, []
    order = plan.order()
    for i, (seed, role) in enumerate(order):
        run_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))
        reset_adapter(session.model, seed)
        curve = EvalCurve(every, plan.curve_questions, start=start_point)
        adapter_out = Path("runs") / "adapters" / f"{set_stamp}_set" / f"{i + 1:02d}_seed{seed}_{role}"
        record, path = execute(run_cfg, "run", adapter_out=str(adapter_out), progress=progress, stop=stop,
                               session=session, eval_before=eval_before, curve=curve)
        eval_before, start_point = eval_before or record.eval_before, curve.start
        if path is not None:
            runs.append((seed, role, record, path))
        if on_run is not None:
            on_run(i, len(order), record, path)
        if record.failure is not None:
            notes.append(f"the set stopped at run {i + 1} of {len(order)} (seed {seed}, {role}): "
                         f"{record.failure.get('kind')} during {record.failure.get('phase')}")
            break
    folder = Path(plan.runset_dir) if plan.runset_dir else Path(cfg.results_dir).parent / "runsets"
    figures = [RunFigures.from_record(r, s, role, str(p)) for s, role, r, p in runs if r.failure is None]
    summary = summary_dict(summarize(figures, plan.target_loss_nats)) if any(f.role == SEED for f in figures) else None
    first = runs[0][2] if runs else None
    runset = RunSet(
        fingerprint=first.fingerprint if first else machine_fingerprint(device),
        config=first.config if first else cfg.to_dict(),
        seeds=tuple(plan.seeds), runs=tuple(RunSetEntry(relative_path(p, folder), s, role) for s, role, _, p in runs),
        target_loss_nats=plan.target_loss_nats, eval_curve={"every": every, "questions": plan.curve_questions},
        load_s=load_s, summary=summary,
        notes=(*notes, "model loaded once for the set; eval_before and the curve's step 0 scored once (a fresh "
                       "adapter scores as the base model)"),
    )
    return runset, save_runset(runset, folder)
