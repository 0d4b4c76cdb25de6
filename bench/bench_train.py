"""QLoRA train-step throughput on one real MedQA batch: ours per attention kernel vs the guides' recipe.

Both arms step on the same ``TrainExample`` batch (the training loop's first batch), each batching it
its own way: ours as ``medqa_core.train`` does (packed rows when ``TrainConfig.packing``), the
reference padded to the longest example. Figures in
``extra_info``: ``tokens_per_s`` (real, non-pad tokens per step / median step time),
``step_time_s_median``/``_iqr``, ``mfu`` (4 x all-parameter FLOPs per real token, as the frozen
base needs no weight gradients, / step time / peak bf16 FLOP/s measured in this run),
``peak_mem_gib``, ``host_rss_gib``, attention requested and ran, quantization, backend,
``batch_size``; ours adds ``speedup_vs_reference`` (its tokens/s over the reference's, same run) and
``compile`` (requested, ran, detail). ``test_train_profile`` runs ours once per ``--train-profiles`` name
(config.TRAIN_PROFILES: batch size, recomputed layers, compile), on the first batch of that size, and
records ``memory_cap_gib`` / ``within_memory_cap`` where the profile promises a peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from medqa_core.attention import AttentionChoice
from medqa_core.compiling import with_eager_fallback
from medqa_core.config import TrainConfig, memory_cap_gib, train_profile
from medqa_core.data import collate, collate_packed
from medqa_core.distributed import DistInfo
from medqa_core.fingerprint import detect_backend
from medqa_core.model import count_parameters
from medqa_core.reference import REFERENCE_ATTN, collate_reference, reference_step
from medqa_core.train import (
    apply_model_settings,
    make_optimizer,
    reset_model_settings,
    train_step,
    wrap_data_parallel,
)

pytestmark = pytest.mark.benchmark(group="train")


def _our_step(model: Any, optimizer: torch.optim.Optimizer, scheduler: Any, attention: AttentionChoice,
              batch: dict[str, torch.Tensor], device: torch.device) -> Callable[[], float]:
    """One step exactly as medqa_core.train.train's loop runs it (forward, backward, AdamW, schedule)."""
    step_loss = wrap_data_parallel(model, device, DistInfo())
    return lambda: train_step(step_loss, optimizer, scheduler, batch, device, attention)


def _cpu_packed(model: torch.nn.Module) -> bool:
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on an eval-mode forward; its kernel
    # has no autograd, so a train step on such weights drops gradients. Recorded so CPU figures say so.
    return any(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False) for p in model.parameters())


def _train_info(case: Any, rounds: Any, model: torch.nn.Module, n_tokens: int, padded_tokens: int,
                ceilings: dict[str, Any]) -> dict[str, Any]:
    stats = rounds.stats
    parameters, trainable = count_parameters(model)
    flops_per_step = 4 * parameters * n_tokens
    peak = ceilings.get("matmul_bf16_flops_per_s")
    return {
        "tokens_per_s": n_tokens / stats.median,
        "step_time_s_median": stats.median,
        "step_time_s_iqr": stats.iqr,
        "timed_rounds": stats.n,
        "tokens_per_step": n_tokens,
        "padded_tokens_per_step": padded_tokens,
        "parameters": parameters,
        "trainable_parameters": trainable,
        "model_flops_per_step": flops_per_step,
        "peak_bf16_flops_per_s": peak,
        "mfu": flops_per_step / stats.median / peak if peak else None,
        "loss_per_round": rounds.outputs,
        "joules_per_token": case.joules_per(rounds, n_tokens),
        "bnb_cpu_packed_weights": _cpu_packed(model),
        **case.memory_info(rounds),
    }


def test_train_reference(benchmark: Any, case: Any, models: Any, train_batch: list, bench_options: Any,
                         ceilings: dict[str, Any], reference_results: dict[str, Any]) -> None:
    if not bench_options.reference:
        pytest.skip("--no-reference: the reference arm is off")
    with case.guard(arm="reference", batch_size=len(train_batch), seq_len_max=max(e.n_tokens for e in train_batch),
                    attention_requested=REFERENCE_ATTN, gradient_checkpointing=True):
        arm = models.reference()
        batch = collate_reference(arm, train_batch)  # input_ids, attention_mask, labels: [B, T]
        n_tokens = int(batch["attention_mask"].sum())
        rounds = case.time(lambda: reference_step(arm, batch).item(), bench_options.train_rounds,
                           bench_options.warmup_rounds)
        info = _train_info(case, rounds, arm.model, n_tokens, batch["input_ids"].numel(), ceilings)
        benchmark.extra_info.update(
            info, backend=detect_backend(), model=arm.model_dir.name,
            attention={"requested": arm.attention.requested, "ran": arm.kernel_ran,
                       "attn_implementation": arm.attention.attn_implementation},
            quantization=dataclasses.asdict(arm.quant),
        )
        reference_results["tokens_per_s"] = info["tokens_per_s"]


def _time_ours(benchmark: Any, case: Any, models: Any, examples: list, bench_options: Any, tc: TrainConfig,
               ceilings: dict[str, Any], reference_results: dict[str, Any], device: torch.device,
               attn: str) -> dict[str, Any]:
    """Time our train step on ``examples`` under ``tc`` (batching, recompute, compile); fill ``extra_info``."""
    session = models.ours(attn)
    pad_id = session.tokenizer.pad_token_id
    # As the training loop batches: packed rows of tc.pack_len (position_ids restart per example) or padded.
    batch = collate_packed(examples, pad_id, tc.pack_len) if tc.packing else collate(examples, pad_id)
    n_tokens = int(batch.pop("n_tokens"))
    batch = {k: v.to(device) for k, v in batch.items()}  # input_ids, labels (, position_ids): [R, T]
    optimizer, scheduler = make_optimizer(session.model, tc)
    session.model.train()  # from_pretrained hands back eval mode
    compiled = apply_model_settings(session.model, tc, device)
    try:
        step = with_eager_fallback(_our_step(session.model, optimizer, scheduler, session.attention, batch, device),
                                   session.model, compiled, lambda: optimizer.zero_grad(set_to_none=True))
        rounds = case.time(step, bench_options.train_rounds, bench_options.warmup_rounds)
    finally:
        reset_model_settings(session.model)
    info = _train_info(case, rounds, session.model, n_tokens, batch["input_ids"].numel(), ceilings)
    reference = reference_results.get("tokens_per_s")
    benchmark.extra_info.update(
        info, **case.session_info(session), compile=compiled.as_dict(),
        reference_tokens_per_s=reference,
        speedup_vs_reference=info["tokens_per_s"] / reference if reference else None,
    )
    return info


def test_train_ours(benchmark: Any, case: Any, models: Any, train_batch: list, bench_options: Any, run_config: Any,
                    ceilings: dict[str, Any], reference_results: dict[str, Any], device: torch.device,
                    attn: str) -> None:
    tc = run_config.train
    with case.guard(arm="ours", batch_size=len(train_batch), seq_len_max=max(e.n_tokens for e in train_batch),
                    attention_requested=attn, gradient_checkpointing=tc.gradient_checkpointing,
                    packing=tc.packing):
        _time_ours(benchmark, case, models, train_batch, bench_options, tc, ceilings, reference_results, device, attn)


def test_train_profile(benchmark: Any, case: Any, models: Any, first_batch: Any, bench_options: Any,
                       run_config: Any, ceilings: dict[str, Any], reference_results: dict[str, Any],
                       device: torch.device, attn: str, profile: str) -> None:
    """Ours under a named profile (``--train-profiles``): its batch size, recompute and compile settings."""
    tc = train_profile(profile, run_config.train)
    examples = first_batch(tc.batch_size)
    cap = memory_cap_gib(profile)
    with case.guard(arm="ours", profile=profile, batch_size=len(examples),
                    seq_len_max=max(e.n_tokens for e in examples), attention_requested=attn,
                    gradient_checkpointing=tc.gradient_checkpointing, checkpoint_layers=tc.checkpoint_layers,
                    packing=tc.packing, compile_requested=tc.compile, memory_cap_gib=cap):
        info = _time_ours(benchmark, case, models, examples, bench_options, tc, ceilings, reference_results,
                          device, attn)
        peak = info["peak_mem_gib"]
        benchmark.extra_info["within_memory_cap"] = None if cap is None or peak is None else peak <= cap
