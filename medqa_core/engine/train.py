"""The QLoRA training loop -> TrainResult.

The LM head runs only where labels are: with the default answer-only loss that is one position
per example instead of every position times a 32k vocabulary, the largest single saving on a
small model and a real one on a 7B.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from medqa_core.engine.attention import (
    AttentionChoice,
    attention_context,
    switch_attention,
    training_attention,
)
from medqa_core.engine.checkpoint import (
    CheckpointError,
    CheckpointWriteError,
    TrainProgress,
    load_checkpoint,
    save_checkpoint,
)
from medqa_core.engine.compiling import (
    CompileState,
    compile_layers,
    save_compile_cache,
    uncompile_layers,
    with_eager_fallback,
)
from medqa_core.engine.config import TrainConfig
from medqa_core.engine.data import IGNORE_INDEX, ROW_MULTIPLE, TrainExample, collate, collate_packed, iter_batches
from medqa_core.engine.distributed import (
    DDP_BUCKET_CAP_MB,
    DistInfo,
    all_reduce_sum,
    balance_tokens,
    ddp_info,
    gather_step,
    measure_all_reduce_s,
)
from medqa_core.engine.fp8 import run_formats, set_fp8_base
from medqa_core.engine.model import cache_dir, set_checkpointing, set_lora_dropout
from medqa_core.engine.nf4_base_op import set_custom_op_base
from medqa_core.engine.numerics import Numerics, autocast
from medqa_core.engine.preemption import Interrupted
from medqa_core.engine.sharded import is_sharded, sharding_info
from medqa_core.measure.device import gpu_name
from medqa_core.measure.flops import ModelShape, train_step_flops
from medqa_core.measure.timing import Timer, host_peak_rss_gib, peak_memory_gib, reset_peak_memory
from medqa_core.results.measurements import Compile, Memory, TrainThroughput
from medqa_core.results.record import StepImbalance, TrainResult
from medqa_core.results.storage import WriteError

logger = logging.getLogger(__name__)

ProgressFn = Callable[[int, int, float], None]  # (step done, total steps, loss)
StopFn = Callable[[], str | None]  # the signal that asks training to stop ("SIGTERM"), or None


def total_steps(n_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps: ``cfg.max_steps`` when set (as in transformers' Trainer), else ``cfg.epochs`` worth."""
    return cfg.max_steps or math.ceil(cfg.epochs * n_examples / cfg.batch_size)


def token_losses(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token cross-entropy at each labelled position, computing logits only there.

    Args:
        model: a peft-wrapped causal LM (``get_decoder`` and ``get_output_embeddings``).
        input_ids: [B, T] right-padded or packed token ids.
        labels: [B, T], ``IGNORE_INDEX`` where no loss is taken.
        position_ids: [B, T] for packed rows (restarting at each example), None when padded.

    Returns:
        [N] losses of the N labelled tokens, in row-major order.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # use_cache=False: no KV cache in training, and transformers only reads packed position_ids without one.
    hidden = base.get_decoder()(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
    targets = labels[:, 1:]  # position t predicts token t + 1
    where = targets != IGNORE_INDEX  # [B, T-1]
    logits = base.get_output_embeddings()(hidden[:, :-1][where])  # [N, V]
    return F.cross_entropy(logits.float(), targets[where], reduction="none")


def answer_loss(model: Any, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of :func:`token_losses`: the training loss of one step."""
    return token_losses(model, input_ids, labels, position_ids).mean()


class StepLoss(torch.nn.Module):
    """The training forward as one module (token losses), so DistributedDataParallel can wrap it.

    It runs under autocast to the run's compute dtype (bf16 where native), as the reference's
    ``TrainingArguments(bf16=True)`` does: without it peft casts each LoRA input to its fp32 weights, and the
    adapters' matmuls run in fp32 off the tensor cores while their fp32 input copies are kept for the backward.
    """

    def __init__(self, model: Any, numerics: Numerics) -> None:
        super().__init__()
        self.model = model
        self.numerics = numerics

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        with autocast(input_ids.device, self.numerics):
            return token_losses(self.model, input_ids, labels, position_ids)


def make_scaler(device: torch.device, numerics: Numerics) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only: bf16 and fp32 keep fp32's exponent range."""
    return torch.amp.GradScaler(device.type, enabled=numerics.torch_dtype == torch.float16)


def wrap_data_parallel(model: Any, device: torch.device, info: DistInfo, numerics: Numerics) -> torch.nn.Module:
    """StepLoss, wrapped in DDP when distributed. Frozen 4-bit weights are left out of DDP's
    broadcast and buckets: every rank loads the same weights, and only LoRA gradients are reduced.
    A model sharded by ``sharded.shard_model`` is not wrapped: FSDP2 reduces its gradients itself."""
    step = StepLoss(model, numerics)
    if not info.enabled or is_sharded(model):
        return step
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in step.named_parameters() if not p.requires_grad] + [n for n, _ in step.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(step, frozen)
    # gradient_as_bucket_view: gradients live in the buckets, no second copy of them is made per step.
    return DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, bucket_cap_mb=DDP_BUCKET_CAP_MB,
                                   gradient_as_bucket_view=True)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout's seed for one step on one rank: a resumed run draws the same masks without replaying."""
    return (seed * 1_000_003 + step) * 1009 + rank


def train_step(step_loss: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               batch: dict[str, torch.Tensor], device: torch.device, attention: AttentionChoice,
               world_size: int = 1, scaler: torch.amp.GradScaler | None = None) -> float:
    """One optimizer step on one (local) batch; the loss returned is the global batch's mean.

    Args:
        step_loss: :func:`wrap_data_parallel`'s module.
        batch: from ``collate`` or ``collate_packed`` (``position_ids`` present when packed).
        world_size: ranks sharing the global batch (DDP averages their gradients).
        scaler: :func:`make_scaler`'s (fp16 scales the loss; a step with inf gradients is skipped).
    """
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    position_ids = batch["position_ids"].to(device, non_blocking=True) if "position_ids" in batch else None
    with attention_context(attention):
        losses_local = step_loss(input_ids, labels, position_ids)  # [N_local]
        # Mean over the global batch's labelled tokens: DDP averages gradients over ranks,
        # so each rank scales its sum by world_size / N_global.
        sums = all_reduce_sum(torch.stack([losses_local.detach().sum(),
                                           torch.tensor(float(losses_local.numel()), device=device)]))
        loss = losses_local.sum() * world_size / sums[1]
        (scaler.scale(loss) if scaler else loss).backward()
    stepped = True
    if scaler:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        stepped = scaler.get_scale() >= scale  # update() lowers the scale after a step skipped for inf gradients
    else:
        optimizer.step()
    if stepped:  # as transformers' Trainer: a skipped step does not advance the schedule (nor warn that it did)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return (sums[0] / sums[1]).item()  # note: a device sync point; the step has finished when it returns


def warm_up_compiled(step_loss: torch.nn.Module, model: Any, state: CompileState, batch: dict[str, torch.Tensor],
                     pad_id: int, device: torch.device, attention: AttentionChoice) -> None:
    """Compile, before the first step, the graphs a static-shape run needs, so none compiles mid-run.

    Forward and backward run, without an optimizer step, on ``batch`` (a static-shape packed batch) and on
    it with :data:`data.ROW_MULTIPLE` more rows of pads: the first call compiles a graph for its row count,
    the second makes Dynamo mark the row dimension dynamic (its automatic-dynamic rule), and a batch of
    ``ROW_MULTIPLE`` rows (the smallest count, which it specializes on) compiles the last one. Gradients are
    dropped afterwards; the caller reseeds the RNG before each real step.
    """
    width = batch["input_ids"].shape[1]
    rows = batch["input_ids"].shape[0]
    start_graphs = state.counter.graphs
    fills = {"input_ids": pad_id, "labels": IGNORE_INDEX, "position_ids": None}
    with Timer(device) as timer, attention_context(attention):
        for n_rows in dict.fromkeys((rows, rows + ROW_MULTIPLE, ROW_MULTIPLE)):
            shaped = {k: _with_rows(batch[k], n_rows, fill).to(device) for k, fill in fills.items()}
            losses = step_loss(shaped["input_ids"], shaped["labels"], shaped["position_ids"])
            losses.sum().backward()
    model.zero_grad(set_to_none=True)
    state.warmup_graphs = state.counter.graphs - start_graphs
    state.warmup_s = timer.elapsed_s
    if state.warmup_graphs == 0:  # Dynamo served or skipped the layers without handing a graph to Inductor
        state.ran, state.detail = False, "eager: Dynamo compiled no graph for the layers (recompile limit reached?)"
        logger.warning("torch.compile compiled nothing: the layers ran eagerly")
    if state.cache is not None:
        save_compile_cache(state.cache)
    logger.info("compiled %d graphs in %.1f s before the first step (rows %d..%d of %d tokens)%s",
                state.warmup_graphs, state.warmup_s, ROW_MULTIPLE, rows + ROW_MULTIPLE, width,
                f", compile cache {state.cache.state}" if state.cache else "")


def _with_rows(t: torch.Tensor, n_rows: int, fill: int | None) -> torch.Tensor:
    """``t`` [R, T] cut or extended to ``n_rows`` rows; new rows are ``fill`` (``None``: positions 0..T-1)."""
    if n_rows <= t.shape[0]:
        return t[:n_rows]
    extra = t.new_zeros((n_rows - t.shape[0], t.shape[1]))
    extra += torch.arange(t.shape[1], device=t.device) if fill is None else fill
    return torch.cat([t, extra])


def stop_requested(stop: StopFn | None, info: DistInfo, device: torch.device) -> str | None:
    """The signal asking training to stop after this step; under torchrun every rank stops at the same step."""
    name = stop() if stop else None
    if stop is None or not info.enabled:
        return name
    anyone = all_reduce_sum(torch.tensor(float(name is not None), device=device)).item() > 0
    return (name or "SIGTERM") if anyone else None


def apply_model_settings(model: Any, cfg: TrainConfig, device: torch.device) -> CompileState:
    """The model-side settings of ``cfg``: LoRA's dropout, which layers recompute (checkpointing), which are
    compiled and the activation budget their compiled backward gets."""
    set_lora_dropout(model, cfg.lora_dropout)
    set_checkpointing(model, cfg.gradient_checkpointing, cfg.checkpoint_layers)
    set_activation_budget(cfg.activation_budget)
    formats = run_formats(device, cfg.fp8, cfg.fp8_emulate)
    if formats:
        set_fp8_base(model, formats)
    elif cfg.base_custom_op:
        set_custom_op_base(model, True)
    return compile_layers(model, device, cfg.compile, cache_dir() / "compile", dataclasses.asdict(cfg))


def reset_model_settings(model: Any) -> None:
    """Undo :func:`apply_model_settings`: eager layers, no recompute, the adapter's own dropout."""
    uncompile_layers(model)
    set_fp8_base(model, None)
    set_custom_op_base(model, False)
    set_checkpointing(model, False)
    set_activation_budget(None)
    set_lora_dropout(model, None)


def set_activation_budget(budget: float | None) -> None:
    """Inductor's activation memory budget for graphs compiled from now on (None: its default, 1.0).

    A process-wide setting read when a backward graph is partitioned; the warm-up compiles every graph a
    static-shape run uses, so they all get it.
    """
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = 1.0 if budget is None else budget


def adamw_fused(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether AdamW runs fused (one kernel for all LoRA tensors): ``cfg.adamw``, "auto" meaning on a GPU."""
    return cfg.adamw == "fused" or (cfg.adamw == "auto" and device.type == "cuda")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig,
                   device: torch.device | None = None) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW on the trainable (LoRA) weights, fused or foreach (:func:`adamw_fused`); linear warm-up, then
    constant learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = adamw_fused(cfg, device or params[0].device)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                  fused=fused or None, foreach=None if fused else True)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return optimizer, scheduler


@dataclass
class TrainingStep:
    """A model prepared for training under ``cfg``, and its step: what the loop, the bench and the profiler run.

    Made by :func:`prepare_training`; call it with a batch (and optionally a hook that restores the RNG and
    anything else before an eager retry after a failed compile). :meth:`close` undoes the model settings.
    """

    model: Any
    cfg: TrainConfig
    device: torch.device
    attention: AttentionChoice
    pad_id: int
    step_loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    compiled: CompileState
    info: DistInfo
    attn_before: str | None = None  # the model's attention implementation before cfg.attn switched it

    def __post_init__(self) -> None:
        def before_retry(batch: dict[str, torch.Tensor], restore: Callable[[], None] | None) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            if restore:
                restore()

        self._run = with_eager_fallback(
            lambda batch, restore: train_step(self.step_loss, self.optimizer, self.scheduler, batch, self.device,
                                              self.attention, self.info.world_size, self.scaler),
            self.model, self.compiled, before_retry)

    @property
    def static_shape(self) -> bool:
        """Compiled and packed: batches get one row width and even row counts (see data.collate_packed)."""
        return self.compiled.ran and self.cfg.packing

    def collate(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
        """A batch as the loop builds it: packed rows (static shapes when compiled) or padded rows."""
        if self.cfg.packing:
            return collate_packed(examples, self.pad_id, self.cfg.pack_len, self.static_shape)
        return collate(examples, self.pad_id)

    def warm_up(self, batch: dict[str, torch.Tensor]) -> None:
        """Compile the graphs of every batch shape before the first step (no-op unless :attr:`static_shape`)."""
        if not self.static_shape:
            return
        warm = with_eager_fallback(
            lambda b: warm_up_compiled(self.step_loss, self.model, self.compiled, b, self.pad_id, self.device,
                                       self.attention),
            self.model, self.compiled, lambda b: self.model.zero_grad(set_to_none=True))
        warm(batch)

    def __call__(self, batch: dict[str, torch.Tensor], restore: Callable[[], None] | None = None) -> float:
        graphs_before = self.compiled.counter.graphs
        loss = self._run(batch, restore)
        if self.compiled.ran:
            self.compiled.graphs_per_step.append(self.compiled.counter.graphs - graphs_before)
        return loss

    def close(self) -> None:
        reset_model_settings(self.model)
        if self.attn_before is not None:
            switch_attention(self.model, AttentionChoice(self.attn_before, self.attn_before))


def prepare_training(model: Any, cfg: TrainConfig, device: torch.device, attention: AttentionChoice, pad_id: int,
                     numerics: Numerics, info: DistInfo | None = None) -> TrainingStep:
    """Train mode, recompute and compile as ``cfg`` says, AdamW with its schedule, the loss module (DDP-wrapped
    under torchrun) and a gradient scaler for fp16."""
    info = info or DistInfo()
    attn_before = None
    if cfg.attn is not None and cfg.attn != attention.requested:
        attention = training_attention(cfg.attn, device)
        attn_before = switch_attention(model, attention)
    optimizer, scheduler = make_optimizer(model, cfg, device)
    step_loss = wrap_data_parallel(model, device, info, numerics)
    model.train()  # from_pretrained hands back eval mode: dropout and checkpointing would be off
    compiled = apply_model_settings(model, cfg, device)
    return TrainingStep(model, cfg, device, attention, pad_id, step_loss, optimizer, scheduler,
                        make_scaler(device, numerics), compiled, info, attn_before)


def measure_throughput(step_time_s: Sequence[float], step_tokens: Sequence[int],
                       step_flops: Sequence[float | None], skip: int, device: torch.device,
                       numerics: Numerics) -> TrainThroughput:
    """The throughput of the steps after the first ``skip`` (the timing warm-up), as a bench case measures it.

    Args:
        step_time_s, step_tokens, step_flops: per step of the run, wall seconds, real tokens (all ranks) and
            model FLOPs (None: trained before a resume, not counted in the FLOP rate).
        skip: the timing warm-up steps left out.
        device: where it ran (its card picks the datasheet peak).
        numerics: the compute dtype that ran.

    Returns:
        :meth:`TrainThroughput.from_steps` of the timed steps.
    """
    return TrainThroughput.from_steps(step_time_s[skip:], step_tokens[skip:], step_flops[skip:], gpu_name(device),
                                      numerics.short)


def measure_compile(state: CompileState, timed_from: int | None = None) -> Compile:
    """What torch.compile did, as run records and bench cases save it.

    Args:
        state: the train step's compile state after its steps.
        timed_from: the first timed step of a bench case (its recompiles after it are counted); None for a run.

    Returns:
        The :class:`Compile` measurement.
    """
    d = state.as_dict()
    timed = None if timed_from is None else sum(state.graphs_per_step[timed_from:])
    return Compile(**{**d, "recompile_steps": tuple(d["recompile_steps"])}, recompiles_in_timed_rounds=timed)


def train(model: Any, examples: Sequence[TrainExample], cfg: TrainConfig, device: torch.device,
          attention: AttentionChoice, pad_id: int, numerics: Numerics, progress: ProgressFn | None = None,
          checkpoint_dir: Path | None = None, resume: bool = False,
          checkpoint_config: dict[str, Any] | None = None, dist_info: DistInfo | None = None,
          stop: StopFn | None = None) -> TrainResult:
    """Fine-tune the LoRA weights of ``model`` in place.

    Args:
        model: peft model with trainable LoRA weights, on ``device``.
        examples: tokenized training examples (see ``data.encode_train``).
        cfg: steps, batch size, learning rate, packing, timing warm-up, checkpoint cadence.
        device: where the model lives.
        attention: the attention kernel to force during forward and backward.
        pad_id: token id used for padding.
        numerics: the compute dtype (autocast; fp16 adds a gradient scaler).
        progress: called after each step with (step, total, loss).
        checkpoint_dir: where checkpoints go (every ``cfg.checkpoint_every`` steps and at the end).
        resume: continue from the newest complete checkpoint in ``checkpoint_dir``.
        checkpoint_config: the run's settings; a checkpoint written under other settings is refused.
        dist_info: rank and world size under torchrun: each rank trains on its share of every global
            batch of ``cfg.batch_size`` examples, and only rank 0 writes checkpoints.
        stop: read after each step; when it names a signal, training writes a checkpoint (where
            ``checkpoint_dir`` is set) and raises :class:`Interrupted`.

    Returns:
        Loss per step, real-token throughput (all ranks) over the steps after
        ``cfg.timing_warmup_steps``, step-time median and IQR, peak device memory and host RSS.

    Raises:
        CheckpointError: ``resume`` without a usable checkpoint.
        Interrupted: ``stop`` asked to stop before the last step.
        CheckpointWriteError: a checkpoint could not be written (its step and the run's steps in it).
        FloatingPointError: the loss became NaN or infinite.
    """
    info = dist_info or DistInfo()
    n_steps = total_steps(len(examples), cfg)
    trainer = prepare_training(model, cfg, device, attention, pad_id, numerics, info)
    config = checkpoint_config or {}
    log = _StepLog.start()
    try:
        if resume:
            if checkpoint_dir is None:
                raise CheckpointError("resume needs a checkpoint folder")
            log = _StepLog.start(load_checkpoint(checkpoint_dir, model, trainer.optimizer, trainer.scheduler, config,
                                                 n_steps))
        shape = ModelShape.from_config(model.config)
        batches = iter_batches(examples, cfg.batch_size, cfg.seed)
        for _ in range(log.steps):  # the order is fixed by the seed: skip what was already trained on
            next(batches)
        if progress:
            progress(log.steps, n_steps, math.nan)  # the bar starts before the first step: its rate includes it
        if log.steps < n_steps:
            trainer.warm_up(_local_batch(trainer, info, next(iter_batches(examples, cfg.batch_size, cfg.seed))[1]))
        reset_peak_memory(device)
        for step in range(log.steps, n_steps):
            _, batch_examples = next(batches)
            loss_value = _run_step(trainer, info, batch_examples, step, cfg.seed, device, log)
            log.flops.append(train_step_flops(shape, [e.n_tokens for e in batch_examples],
                                              sum(e.n_labels for e in batch_examples)))
            if progress:
                progress(step + 1, n_steps, loss_value)
            stopping = stop_requested(stop, info, device)
            saved = _checkpoint_if_due(checkpoint_dir, log, n_steps, cfg, bool(stopping), info, model, trainer,
                                       config)
            if stopping and log.steps < n_steps:
                raise Interrupted(stopping, log.steps, n_steps, str(saved) if saved else None)
    finally:
        trainer.close()  # scoring after training runs as after a fresh load
    return _train_result(model, examples, cfg, device, numerics, info, trainer, log, n_steps)


@dataclass
class _StepLog:
    """Each step's figures so far, one list per figure, a resumed run's starting from its checkpoint's."""

    losses: list[float]
    times: list[float]
    tokens: list[int]  # real tokens, all ranks
    rank_times: list[tuple[float, ...]]  # per step, per rank (torchrun only; older checkpoints: empty)
    rank_tokens: list[tuple[int, ...]]
    flops: list[float | None]  # steps before a resume: None, not in the FLOP rate
    seen: int  # examples trained on

    @classmethod
    def start(cls, state: TrainProgress | None = None) -> _StepLog:
        state = state or TrainProgress(0, 0, (), (), ())
        return cls(list(state.loss_per_step), list(state.step_time_s), list(state.step_tokens),
                   list(state.rank_step_time_s) or [()] * state.step,
                   list(state.rank_step_tokens) or [()] * state.step, [None] * state.step, state.examples_seen)

    @property
    def steps(self) -> int:
        return len(self.losses)

    def progress(self, distributed: bool) -> TrainProgress:
        """What a checkpoint saves of it."""
        return TrainProgress(self.steps, self.seen, tuple(self.losses), tuple(self.times), tuple(self.tokens),
                             tuple(self.rank_times) if distributed else (),
                             tuple(self.rank_tokens) if distributed else ())


def _local_batch(trainer: TrainingStep, info: DistInfo, batch_examples: list[TrainExample]) -> dict[str, torch.Tensor]:
    """This rank's share of a global batch, collated."""
    local = batch_examples
    if info.enabled:  # an even share of the tokens, not of the examples: the slowest rank sets the pace
        mine = balance_tokens([e.n_tokens for e in batch_examples], info.world_size)[info.rank]
        local = [batch_examples[i] for i in mine]
    if not local:  # fewer examples than ranks: join the collective with a loss-free example
        local = [TrainExample(batch_examples[0].input_ids, (IGNORE_INDEX,) * batch_examples[0].n_tokens)]
    return trainer.collate(local)


def _run_step(trainer: TrainingStep, info: DistInfo, batch_examples: list[TrainExample], step: int, seed: int,
              device: torch.device, log: _StepLog) -> float:
    """One timed optimizer step, logged; its loss.

    Raises:
        FloatingPointError: the loss is NaN or infinite.
    """
    batch = _local_batch(trainer, info, batch_examples)
    step_seed_value = step_seed(seed, step, info.rank)
    torch.manual_seed(step_seed_value)  # dropout's masks: a resumed run draws the same ones without replaying
    with Timer(device) as timer:
        loss_value = trainer(batch, lambda s=step_seed_value: torch.manual_seed(s))
    n_tokens = int(batch["n_tokens"])
    if info.enabled:
        times, tokens = gather_step(timer.elapsed_s, n_tokens, device)
        log.rank_times.append(times)
        log.rank_tokens.append(tokens)
        n_tokens = sum(tokens)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value} at step {step + 1}; check the quantization "
                                 "settings and bitsandbytes version for this backend")
    log.losses.append(loss_value)
    log.times.append(timer.elapsed_s)
    log.tokens.append(n_tokens)
    log.seen += len(batch_examples)
    return loss_value


def _checkpoint_if_due(checkpoint_dir: Path | None, log: _StepLog, n_steps: int, cfg: TrainConfig, stopping: bool,
                       info: DistInfo, model: Any, trainer: TrainingStep, config: dict[str, Any]) -> Path | None:
    """Write a checkpoint after the last step, every ``cfg.checkpoint_every`` steps and when stopping (rank 0).

    Raises:
        CheckpointWriteError: it could not be written.
    """
    done = log.steps
    due = done == n_steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or stopping
    if checkpoint_dir is None or not due or not info.is_main:
        return None
    try:
        return save_checkpoint(checkpoint_dir, model, trainer.optimizer, trainer.scheduler,
                               log.progress(info.enabled), config, cfg.keep_checkpoints)
    except WriteError as e:
        raise CheckpointWriteError(e, done, n_steps) from e


def _train_result(model: Any, examples: Sequence[TrainExample], cfg: TrainConfig, device: torch.device,
                  numerics: Numerics, info: DistInfo, trainer: TrainingStep, log: _StepLog,
                  n_steps: int) -> TrainResult:
    """The run's training figures over the steps after the warm-up."""
    skip = min(cfg.timing_warmup_steps, max(n_steps - 1, 0))  # keep at least one timed step
    trainable = [p for p in model.parameters() if p.requires_grad]
    parallel = None
    if info.enabled:
        parallel = sharding_info(model) if is_sharded(model) else ddp_info(trainer.step_loss)
    return TrainResult(
        steps=n_steps, epochs=log.seen / len(examples), n_examples=len(examples), tokens=sum(log.tokens),
        timed_steps=n_steps - skip, train_time_s=sum(log.times[skip:]),
        throughput=measure_throughput(log.times, log.tokens, log.flops, skip, device, numerics),
        memory=Memory(peak_mem_gib=peak_memory_gib(device), host_peak_rss_gib=host_peak_rss_gib()),
        loss_per_step=tuple(log.losses), step_time_s=tuple(log.times),
        world_size=info.world_size, all_reduce_s=measure_all_reduce_s(trainable, device),
        compile=measure_compile(trainer.compiled),
        rank_step_time_s=tuple(log.rank_times) if info.enabled else None,
        rank_step_tokens=tuple(log.rank_tokens) if info.enabled else None,
        step_imbalance=StepImbalance.from_ranks(log.rank_times, log.rank_tokens, skip) if info.enabled else None,
        parallel=parallel,
    )
