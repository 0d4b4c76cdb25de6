"""QLoRA train-step throughput on real MedQA batches: ours per attention kernel and profile vs the guides' recipe.

Each case steps over consecutive distinct batches in the training loop's own order (``--warmup-rounds``
batches untimed, then ``--train-rounds`` timed), as ``medqa-parity run`` does: the same shapes, the same
compiles, the same memory. Ours batches as ``medqa_core.engine.train`` does (``TrainingStep.collate``: packed
rows, of one width and even row counts when compiled, with the compile warm-up before the first round);
the reference pads each batch to its longest example.

The headline ``throughput.tokens_per_s`` is what a run reports, built by the same function as a run record's
``train.throughput`` (medqa_core.results.measurements.TrainThroughput.from_steps): real (non-pad) tokens of
the timed rounds over their summed time, ``step_time_s_median``/``_iqr``, ``model_flops_per_s``
(medqa_core.measure.flops: the frozen base needs no weight gradients, the LM head runs only at labelled
positions, attention per packed example), ``mfu_datasheet`` (over the vendor's dense peak of the compute
dtype) and ``mfu_measured`` (over the bf16 matmul peak measured in this run). Also in ``extra_info``:
``tokens_per_round``, ``memory`` (``peak_mem_gib`` over the real batches, ``host_rss_gib``), ``energy``,
``compute_dtype``,
attention requested and ran, quantization, backend, ``batch_size``, ``loss_per_round``; ours adds
``speedup_vs_reference`` (same run) and ``compile`` (graphs, warm-up seconds, recompiles in the rounds).
``test_train_profile`` runs ours once per ``--train-profiles`` name (config.NAMED_SETTINGS) on its own
batches and records ``memory_cap_gib`` / ``within_memory_cap`` where the profile promises a peak.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch

from medqa_core.arms.reference import REFERENCE_ATTN, collate_reference, reference_step
from medqa_core.engine.attention import AttentionError, attention_info, training_attention
from medqa_core.engine.config import TrainConfig, apply_named_settings, memory_cap_gib, memory_promise_held
from medqa_core.engine.data import TrainExample
from medqa_core.engine.model import count_parameters
from medqa_core.engine.numerics import Numerics
from medqa_core.engine.train import adamw_fused, measure_compile, prepare_training
from medqa_core.measure.device import detect_backend, gpu_name
from medqa_core.measure.flops import ModelShape, train_step_flops
from medqa_core.results.measurements import TrainThroughput

pytestmark = pytest.mark.benchmark(group="train")


def _cpu_packed(model: torch.nn.Module) -> bool:
    # bitsandbytes repacks 4-bit weights for AVX512-BF16 CPUs on an eval-mode forward; its kernel
    # has no autograd, so a train step on such weights drops gradients. Recorded so CPU figures say so.
    return any(getattr(getattr(p, "quant_state", None), "packing_format_for_cpu", False) for p in model.parameters())


def _rounds_over(batches: Sequence[Any], step: Callable[[Any], float]) -> Callable[[], float]:
    """A target that steps on the next batch at each call: round k runs batch k (warm-up rounds first)."""
    position = iter(range(len(batches)))
    return lambda: step(batches[next(position)])


def _train_info(case: Any, rounds: Any, model: torch.nn.Module, examples: Sequence[list[TrainExample]],
                padded_tokens: Sequence[int], numerics: Numerics, ceilings: dict[str, Any],
                device: torch.device) -> dict[str, Any]:
    """The case's figures over its timed rounds; ``examples``/``padded_tokens`` are per round, warm-up included."""
    timed = slice(len(examples) - len(rounds.times_s), None)  # the timed rounds are the last ones
    tokens = [sum(e.n_tokens for e in batch) for batch in examples[timed]]
    shape = ModelShape.from_config(model.config)
    flops = [train_step_flops(shape, [e.n_tokens for e in batch], sum(e.n_labels for e in batch))
             for batch in examples[timed]]
    parameters, trainable = count_parameters(model)
    # The one function a run record's throughput comes from too (MFU over the datasheet peak, computed once).
    throughput = TrainThroughput.from_steps(rounds.times_s, tokens, flops, gpu_name(device), numerics.short,
                                            ceilings.get("matmul_bf16_flops_per_s"))
    return {
        "throughput": throughput.to_dict(),
        "timing": f"{len(tokens)} consecutive distinct batches of the training loop's order",
        "timed_rounds": len(rounds.times_s),
        "tokens_per_step": sum(tokens) / len(tokens),
        "tokens_per_round": tokens,
        "round_times_s": list(rounds.times_s),
        "padded_tokens_per_step": sum(padded_tokens[timed]) / len(tokens),
        "parameters": parameters,
        "trainable_parameters": trainable,
        "compute_dtype": numerics.compute_dtype,
        "loss_per_round": rounds.outputs,
        "energy": case.energy(rounds, tokens_per_round=sum(tokens) / len(tokens)).to_dict(),
        "bnb_cpu_packed_weights": _cpu_packed(model),
        "memory": case.memory(rounds).to_dict(),
    }


def test_train_reference(benchmark: Any, case: Any, models: Any, loop_batches: Any, bench_options: Any,
                         run_config: Any, ceilings: dict[str, Any], reference_results: dict[str, Any],
                         device: torch.device) -> None:
    if not bench_options.reference:
        pytest.skip("--no-reference: the reference arm is off")
    examples = loop_batches(run_config.train.batch_size)
    with case.guard(arm="reference", batch_size=run_config.train.batch_size,
                    seq_len_max=max(e.n_tokens for b in examples for e in b),
                    attention_requested=REFERENCE_ATTN, gradient_checkpointing=True):
        arm = models.reference()
        batches = [collate_reference(arm, b) for b in examples]  # input_ids, attention_mask, labels: [B, T]
        rounds = case.time(_rounds_over(batches, lambda batch: reference_step(arm, batch).item()),
                           bench_options.train_rounds, bench_options.warmup_rounds)
        info = _train_info(case, rounds, arm.model, examples, [b["input_ids"].numel() for b in batches],
                           arm.numerics, ceilings, device)
        benchmark.extra_info.update(
            info, backend=detect_backend(), model=arm.model_dir.name,
            attention=attention_info(arm.attention, arm.kernel_ran),
            quantization=dataclasses.asdict(arm.quant),
        )
        reference_results.update(tokens_per_s=info["throughput"]["tokens_per_s"],
                                 batch_size=run_config.train.batch_size)


def _time_ours(benchmark: Any, case: Any, models: Any, examples: list[list[TrainExample]], bench_options: Any,
               tc: TrainConfig, ceilings: dict[str, Any], reference_results: dict[str, Any], device: torch.device,
               attn: str, ours_results: dict[int, dict[str, float]]) -> dict[str, Any]:
    """Time our train step over ``examples`` (one batch per round) under ``tc``; fill ``extra_info`` and
    ``ours_results`` (for the peer cases' ``ours_speedup_over_this_peer``)."""
    session = models.ours(attn)
    trainer = prepare_training(session.model, tc, device, session.attention, session.tokenizer.pad_token_id,
                               session.numerics)
    try:
        batches = [trainer.collate(b) for b in examples]  # on the host, moved inside the step as the loop does
        trainer.warm_up(batches[0])  # the compile warm-up a run does before its first step
        rounds = case.time(_rounds_over(batches, trainer), bench_options.train_rounds, bench_options.warmup_rounds)
    finally:
        trainer.close()
    info = _train_info(case, rounds, session.model, examples, [b["input_ids"].numel() for b in batches],
                       session.numerics, ceilings, device)
    reference = reference_results.get("tokens_per_s")
    # The same Compile a run record's train.compile holds, with the recompiles of the timed rounds.
    compiled = measure_compile(trainer.compiled, timed_from=bench_options.warmup_rounds)
    benchmark.extra_info.update(
        info, **case.session_info(session), compile=compiled.to_dict(),
        reference_tokens_per_s=reference,
        speedup_vs_reference=info["throughput"]["tokens_per_s"] / reference if reference else None,
    )
    ours_results.setdefault(tc.batch_size, {})[benchmark.name] = info["throughput"]["tokens_per_s"]
    return info


def test_train_ours(benchmark: Any, case: Any, models: Any, loop_batches: Any, bench_options: Any, run_config: Any,
                    ceilings: dict[str, Any], reference_results: dict[str, Any], device: torch.device,
                    attn: str, ours_results: dict[int, dict[str, float]]) -> None:
    tc = run_config.train
    examples = loop_batches(tc.batch_size)
    with case.guard(arm="ours", batch_size=tc.batch_size, seq_len_max=max(e.n_tokens for b in examples for e in b),
                    attention_requested=attn, gradient_checkpointing=tc.gradient_checkpointing,
                    packing=tc.packing):
        _time_ours(benchmark, case, models, examples, bench_options, tc, ceilings, reference_results, device, attn,
                   ours_results)


def test_train_profile(benchmark: Any, case: Any, models: Any, loop_batches: Any, bench_options: Any,
                       run_config: Any, ceilings: dict[str, Any], reference_results: dict[str, Any],
                       device: torch.device, attn: str, profile: str,
                       ours_results: dict[int, dict[str, float]]) -> None:
    """Ours under a named profile (``--train-profiles``): its batch size, recompute and compile settings."""
    tc = apply_named_settings(profile, run_config.train)
    if tc.attn:
        try:
            training_attention(tc.attn, device)
        except AttentionError as e:
            pytest.skip(f"{profile}: {e}")
    examples = loop_batches(tc.batch_size)
    cap = memory_cap_gib(profile)
    with case.guard(arm="ours", profile=profile, batch_size=tc.batch_size,
                    seq_len_max=max(e.n_tokens for b in examples for e in b), attention_requested=attn,
                    gradient_checkpointing=tc.gradient_checkpointing, checkpoint_layers=tc.checkpoint_layers,
                    packing=tc.packing, compile_requested=tc.compile, memory_cap_gib=cap,
                    lora_dropout=tc.lora_dropout, adamw_fused=adamw_fused(tc, device),
                    activation_budget=tc.activation_budget):
        info = _time_ours(benchmark, case, models, examples, bench_options, tc, ceilings, reference_results,
                          device, attn, ours_results)
        benchmark.extra_info["within_memory_cap"] = memory_promise_held(profile, info["memory"]["peak_mem_gib"])
