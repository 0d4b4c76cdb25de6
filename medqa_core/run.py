"""RunConfig -> load model -> train / evaluate -> RunRecord saved under results/."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from medqa_core.engine.attention import AttentionChoice, check_trainable, detect_kernel, resolve_attention
from medqa_core.engine.checkpoint import check_resume
from medqa_core.engine.config import AUTO_PROFILE, DataConfig, RunConfig, choose_profile, memory_cap_gib, train_profile
from medqa_core.engine.data import (
    MedQAItem,
    bundled_data_dir,
    check_prompt_lengths,
    encode_train,
    find_split,
    has_split,
    load_medqa,
)
from medqa_core.engine.distributed import barrier, init_distributed, shutdown
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.model import (
    QuantInfo,
    add_lora,
    count_parameters,
    load_adapter,
    load_base_model,
    load_tokenizer,
    preset_dir,
    quant_info,
    resolve_model_dir,
    save_adapter,
)
from medqa_core.engine.numerics import Numerics, resolve_numerics
from medqa_core.engine.preemption import Interrupted, StopOnSignals
from medqa_core.engine.sharded import check_sharding, full_trainable_state, is_sharded, shard_model
from medqa_core.engine.train import total_steps, train
from medqa_core.measure.device import device_memory_gib, resolve_device
from medqa_core.measure.fingerprint import machine_fingerprint
from medqa_core.measure.timing import free_device_memory, is_oom, memory_allocated_gib, peak_memory_gib
from medqa_core.results.failure import OomFailure
from medqa_core.results.record import RunRecord, save_record

logger = logging.getLogger(__name__)

# (phase, done, total, extra) -> None; the CLI draws it as a progress bar.
Progress = Callable[[str, int, int, dict[str, float]], None]

RANDOM_WEIGHTS_NOTE = ("random-weight preset {name} (seed {seed}): the figures measure speed, memory and the "
                       "pipeline, not medical knowledge; accuracy stays near chance (25%)")
ROCM_NOTE = ("ROCm: this code path has not been validated by the project on a ROCm machine; "
             "compare against a CUDA record with `medqa-parity report` before trusting it")


@dataclass
class Session:
    """A model loaded and ready: LoRA attached, attention resolved and checked once."""

    config: RunConfig
    device: torch.device
    model_dir: Path
    tokenizer: Any
    model: Any
    attention: AttentionChoice
    kernel_ran: str
    quant: QuantInfo
    numerics: Numerics


@dataclass(frozen=True)
class Splits:
    train: list[MedQAItem]
    train_name: str
    eval: list[MedQAItem]
    eval_name: str
    notes: tuple[str, ...]


def load_splits(cfg: DataConfig) -> Splits:
    """The fine-tuning and evaluation questions. Without a train split, dev stands in for it."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else bundled_data_dir()
    notes: list[str] = []
    train_split = cfg.train_split
    if train_split == "auto":
        train_split = "train" if has_split(data_dir, "train") else "dev"
        if train_split == "dev":
            notes.append(f"no train split in {data_dir}: fine-tuned on dev, evaluated on {cfg.eval_split}")
    train_path, eval_path = find_split(data_dir, train_split), find_split(data_dir, cfg.eval_split)
    return Splits(
        train=load_medqa(train_path, cfg.train_limit), train_name=train_path.name,
        eval=load_medqa(eval_path, cfg.eval_limit), eval_name=eval_path.name, notes=tuple(notes),
    )


def load_session(cfg: RunConfig, adapter_dir: str | None = None, device: torch.device | None = None) -> Session:
    """Load the base model (preset or folder), quantize it, attach LoRA (new or saved)."""
    device = device or resolve_device(cfg.backend)
    attention = resolve_attention(cfg.model.attn)
    numerics = resolve_numerics(cfg.model.dtype, device)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    base = load_base_model(model_dir, cfg.model, device, attention.attn_implementation, numerics.torch_dtype)
    quant = quant_info(base)
    if adapter_dir:
        model = load_adapter(base, adapter_dir)
    else:
        torch.manual_seed(cfg.train.seed)  # LoRA A's initialisation: the same adapter start on every run
        model = add_lora(base, cfg.lora)
    ids = tokenizer("Question: which kernel ran?\nAnswer:")["input_ids"]
    # Two prompts in one row when packing: the masked path that training and scoring actually take.
    packed = cfg.train.packing or cfg.eval.packing
    probe = torch.tensor([ids + ids if packed else ids], device=device)
    positions = torch.tensor([list(range(len(ids))) * 2], device=device) if packed else None
    kernel_ran = detect_kernel(model, probe, attention, positions,
                               None if numerics.torch_dtype == torch.float32 else numerics.torch_dtype)
    logger.info("model %s on %s, attention %s ran as %s, compute %s (%s)", model_dir, device, attention.requested,
                kernel_ran, numerics.compute_dtype, numerics.reason)
    return Session(cfg, device, model_dir, tokenizer, model, attention, kernel_ran, quant, numerics)


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


def resolve_profile(cfg: RunConfig, device: torch.device) -> tuple[RunConfig, str | None]:
    """``cfg`` with an "auto" profile replaced by the memory class that fits ``device`` (config.choose_profile).

    Returns:
        The config, and how its profile was chosen ("auto: ...") or None when the user named it (or none).
    """
    if cfg.train.profile != AUTO_PROFILE:
        return cfg, None
    card = device_memory_gib(device)
    name = choose_profile(card)
    train = train_profile(name, dataclasses.replace(cfg.train, profile=None))
    why = f"auto: a {card:.1f} GiB card" if card is not None else "auto: no GPU"
    logger.info("profile %s (%s)", name, why)
    return dataclasses.replace(cfg, train=train), why


def profile_promise(cfg: RunConfig, chosen_by: str | None, peak_gib: float | None) -> dict[str, Any] | None:
    """What the run's profile promised (its peak memory) and whether the run kept it; None without a profile."""
    spec = cfg.train.profile
    if spec is None:
        return None
    cap = memory_cap_gib(spec)
    return {"spec": spec, "chosen_by": chosen_by or "asked", "memory_cap_gib": cap, "peak_mem_gib": peak_gib,
            "held": None if cap is None or peak_gib is None else peak_gib <= cap}


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


def execute(cfg: RunConfig, kind: str = "run", adapter_dir: str | None = None, adapter_out: str | None = None,
            progress: Progress | None = None, checkpoint_dir: str | None = None,
            resume: str | None = None, stop: StopOnSignals | None = None) -> tuple[RunRecord, Path | None]:
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

    Returns:
        The record and the path it was saved to (None on ranks other than 0, which write nothing).

    Raises:
        CheckpointError: ``resume`` cannot be used (checked before the model loads).
        MedQADataError: a question is too long to fit (checked before the model loads).
    """
    if kind not in ("run", "train", "evaluate"):
        raise ValueError(f"unknown kind {kind!r}")
    started = time.perf_counter()
    splits = load_splits(cfg.data)
    trains = kind in ("run", "train")
    # Before the model loads: questions too long to ever fit, and a checkpoint this run may not resume.
    check_prompt_lengths(splits.train if trains else [], cfg.train.max_seq_len)
    check_prompt_lengths(splits.eval if kind != "train" else [], cfg.eval.max_seq_len, "--eval-max-seq-len")
    device = resolve_device(cfg.backend)
    cfg, profile_chosen_by = resolve_profile(cfg, device) if trains else (cfg, None)
    if trains and cfg.train.attn:  # e.g. flex on CPU: refused before the model loads and anything is scored
        check_trainable(resolve_attention(cfg.train.attn), device)
    if resume is not None and trains:
        check_resume(Path(resume), checkpoint_config(cfg), total_steps(len(splits.train), cfg.train))
    info = init_distributed(device.type)
    if info.enabled:
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
        if info.local_rank == 0 and not cfg.model.path:
            preset_dir(str(cfg.model.preset), cfg.model.seed)  # once per host (each has its own cache), not per rank
        barrier()
    check_sharding(cfg, kind, info.world_size, checkpointing=bool(checkpoint_dir or resume))
    session = load_session(cfg, adapter_dir=adapter_dir, device=device)
    model_info = _model_info(session)  # before any sharding: a sharded weight counts only this rank's slice
    if cfg.train.shard == "fsdp":
        shard_model(session.model, device)
    # Wall seconds of each phase, so a run's time to result splits into load, compile, train and score.
    phases: dict[str, float] = {"load": time.perf_counter() - started}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - clock
        clock = time.perf_counter()

    tok, device, attention = session.tokenizer, session.device, session.attention
    results: dict[str, Any] = {"eval_before": None, "train": None, "eval_after": None}
    saved_adapter, failure = None, None
    phase = "evaluate (before)"
    try:
        if stop is not None and stop.requested():  # a signal while the model loaded
            phase = "load"
            stop.check()
        if info.is_main and (kind == "run" or (kind == "evaluate" and not adapter_dir)):
            # LoRA's B matrices start at zero, so the fresh adapter scores exactly as the base model.
            results["eval_before"] = evaluate(session.model, tok, splits.eval, cfg.eval, device, attention,
                                              splits.eval_name, _bar(progress, phase, stop),
                                              numerics=session.numerics)
            lap("score_before")
        if kind in ("run", "train"):
            phase = "fine-tune"
            examples = [encode_train(tok, item, cfg.train.max_seq_len, cfg.train.loss_on) for item in splits.train]
            ckpt = resume or checkpoint_dir
            results["train"] = train(session.model, examples, cfg.train, device, attention, tok.pad_token_id,
                                     session.numerics, _bar(progress, phase),
                                     checkpoint_dir=Path(ckpt) if ckpt else None,
                                     resume=resume is not None, checkpoint_config=checkpoint_config(cfg),
                                     dist_info=info, stop=stop.requested if stop is not None else None)
            stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
            # Sharded LoRA weights are gathered whole first: a collective, so every rank takes part.
            state = full_trainable_state(session.model) if is_sharded(session.model) else None
            if info.is_main:
                saved_adapter = str(save_adapter(session.model, adapter_out or Path("runs") / "adapters" / stamp,
                                                 state))
            lap("train")
            compile_s = (results["train"].compile or {}).get("warmup_s", 0.0)
            phases["compile"], phases["train"] = compile_s, phases["train"] - compile_s  # warm-up before step 1
        if info.is_main and (kind == "run" or (kind == "evaluate" and adapter_dir)):
            phase = "evaluate (after)"
            results["eval_after"] = evaluate(session.model, tok, splits.eval, cfg.eval, device, attention,
                                             splits.eval_name, _bar(progress, phase, stop),
                                             numerics=session.numerics)
            lap("score_after")
    except Interrupted as e:  # a result too: what finished is kept, training continues with --resume
        failure = e.as_failure(phase)
        logger.warning("%s during %s", e, phase)
    except Exception as e:
        if not is_oom(e):
            raise
        # Out of memory is a result: record which configuration ran out and keep what finished.
        oom = OomFailure(phase=phase, message=(str(e).strip().splitlines() or [type(e).__name__])[0],
                         memory_allocated_gib=memory_allocated_gib(device), peak_mem_gib=peak_memory_gib(device))
        failure = oom.to_dict()  # the same schema as a bench case's OOM (medqa_core.results.failure)
        logger.error("%s", oom.text)
    if failure is not None:
        free_device_memory(device)  # the failed step's tensors, held by the traceback until now
    record = RunRecord(
        kind=kind, config=cfg.to_dict(), fingerprint=machine_fingerprint(device), model=model_info,
        attention={"requested": attention.requested, "ran": session.kernel_ran,
                   "attn_implementation": attention.attn_implementation},
        train=results["train"], eval_before=results["eval_before"], eval_after=results["eval_after"],
        adapter_dir=saved_adapter or adapter_dir, numerics=session.numerics.as_dict(),
        notes=_notes(session, splits.notes if kind != "evaluate" else ()),
        wall_time_s=time.perf_counter() - started, failure=failure,
        phases_s={k: phases[k] for k in ("load", "score_before", "compile", "train", "score_after") if k in phases},
        profile=profile_promise(cfg, profile_chosen_by, results["train"].peak_mem_gib if results["train"] else None)
        if trains else None,
    )
    path = save_record(record, cfg.results_dir) if info.is_main else None
    barrier()
    shutdown()
    return record, path
