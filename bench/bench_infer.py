"""Inference speed of ours (NF4 base + LoRA): prefill and time to first token, decode against its
roofline, option-scoring questions/s.

Prefill and decode use real MedQA prompt tokens, exactly ``--bench-seq-len`` per row, through
``generate`` (greedy). Decode runs at batch 1 twice: plain eager ``generate``, and the
hardware-bound path, a static KV cache with the model's forward under ``torch.compile``
("reduce-overhead", i.e. CUDA/HIP graphs, on a GPU). Each decode figure is also given as a
fraction of its roofline: copy bandwidth measured in this run / weight bytes read per token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch

from medqa_core.attention import AttentionChoice, attention_context
from medqa_core.evaluate import evaluate
from medqa_core.hardware import weight_bytes_per_token
from medqa_core.timing import Stats, is_oom

logger = logging.getLogger("medqa_core.bench")


def _generate(model: Any, input_ids: torch.Tensor, new_tokens: int, pad_id: int, attention: AttentionChoice,
              **options: Any) -> Callable[[], int]:
    """A greedy ``generate`` of exactly ``new_tokens`` (min = max, so EOS cannot stop it early)."""
    mask = torch.ones_like(input_ids)  # [B, T]: rows are full-length prompts, no padding

    def run() -> int:
        with attention_context(attention):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **options)
        return out.shape[1] - input_ids.shape[1]  # out: [B, T + new]

    return run


@pytest.mark.benchmark(group="prefill")
def test_prefill(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor],
                 bench_options: Any, device: torch.device, attn: str, prefill_batch: int) -> None:
    seq_len = bench_options.seq_len
    with case.guard(arm="ours", attention_requested=attn, batch_size=prefill_batch, seq_len=seq_len):
        session = models.ours(attn)
        session.model.eval()
        ids = prompt_ids(prefill_batch).to(device)  # [B, T]
        # Time to first token is one generate step: the prompt's forward plus picking the token.
        rounds = case.time(_generate(session.model, ids, 1, session.tokenizer.pad_token_id, session.attention),
                           bench_options.infer_rounds, bench_options.warmup_rounds)
        stats = rounds.stats
        prompt_tokens = prefill_batch * seq_len
        benchmark.extra_info.update(
            case.session_info(session), ttft_s_median=stats.median, ttft_s_iqr=stats.iqr, timed_rounds=stats.n,
            prefill_tokens_per_s=prompt_tokens / stats.median, joules_per_token=case.joules_per(rounds, prompt_tokens),
            **case.memory_info(rounds),
        )


def _dynamo_counts() -> dict[str, int]:
    # torch._dynamo's counters: graphs compiled, graph breaks, CUDA-graph skips. Recorded so a
    # "compiled" figure that mostly ran eager (breaks) or without graphs (skips) shows it.
    from torch._dynamo.utils import counters

    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def _decode(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor], bench_options: Any,
            ceilings: dict[str, Any], device: torch.device, attn: str, compiled: bool) -> None:
    seq_len, new_tokens = bench_options.seq_len, bench_options.decode_tokens
    mode = ("reduce-overhead" if device.type == "cuda" else "default") if compiled else None
    with case.guard(arm="ours", attention_requested=attn, batch_size=1, seq_len=seq_len, new_tokens=new_tokens,
                    cache="static" if compiled else "dynamic", compile_mode=mode):
        session = models.ours(attn)
        model = session.model
        model.eval()
        ids = prompt_ids(1).to(device)  # [1, T]
        pad_id = session.tokenizer.pad_token_id
        options: dict[str, Any] = {}
        base = model.get_base_model()
        fallback = None
        if compiled:
            # transformers' own auto-compile refuses bitsandbytes models (quantizer not compileable), so we
            # compile the forward ourselves and tell generate not to try. dynamic=False: one graph for the
            # prefill shape, one for the decode step, neither with symbolic shapes.
            options = {"cache_implementation": "static", "disable_compile": True}
            counts_before = _dynamo_counts()
        try:
            for attempt in (mode, "default") if compiled and mode != "default" else (mode,):
                if compiled:
                    torch._dynamo.reset()
                    base.forward = torch.compile(type(base).forward.__get__(base), mode=attempt, dynamic=False)
                try:
                    if compiled:
                        # Compile and replay untimed first (twice: CUDA graphs fail on a replay, not a capture),
                        # so a mode that cannot run falls back before pytest-benchmark's one timing call.
                        for tokens in (new_tokens, new_tokens, 1):
                            _generate(model, ids, tokens, pad_id, session.attention, **options)()
                    mode = attempt
                    break
                except (torch._dynamo.exc.TorchDynamoException, RuntimeError) as e:
                    if not compiled or is_oom(e):
                        raise
                    # Fall back visibly: CUDA/HIP graphs off, still compiled; the reason goes in the record.
                    fallback = f"compile mode {attempt} failed: {str(e).strip().splitlines()[0][:200]}"
                    logger.warning("decode: %s", fallback)
            else:
                pytest.skip(f"static cache + torch.compile cannot run here: {fallback}")
            rounds = case.time(_generate(model, ids, new_tokens, pad_id, session.attention, **options),
                               bench_options.infer_rounds, bench_options.warmup_rounds)
            ttft = case.measure(_generate(model, ids, 1, pad_id, session.attention, **options),
                                bench_options.infer_rounds, warmup_rounds=1)
        finally:
            if compiled:
                counts = {k: v - counts_before[k] for k, v in _dynamo_counts().items()}
                base.__dict__.pop("forward", None)  # back to the class's eager forward for the cases after this
                torch._dynamo.reset()  # drop the graphs (and their CUDA-graph memory pools)
        generate_s: Stats = rounds.stats
        produced = rounds.outputs[0]
        # generate(N) = prefill and first token + (N - 1) decode steps; generate(1) times the former.
        decode_s = generate_s.median - ttft.median
        decode_tokens_per_s = (produced - 1) / decode_s if decode_s > 0 else None
        weight_bytes = weight_bytes_per_token(model)
        bandwidth = ceilings.get("copy_bandwidth_bytes_per_s")
        roofline = bandwidth / weight_bytes if bandwidth else None
        benchmark.extra_info.update(
            case.session_info(session), new_tokens=produced, generate_s_median=generate_s.median,
            generate_s_iqr=generate_s.iqr, timed_rounds=generate_s.n, ttft_s_median=ttft.median,
            decode_tokens_per_s=decode_tokens_per_s, generate_tokens_per_s=produced / generate_s.median,
            weight_bytes_per_token=weight_bytes, copy_bandwidth_bytes_per_s=bandwidth,
            roofline_tokens_per_s=roofline,
            roofline_fraction=decode_tokens_per_s / roofline if roofline and decode_tokens_per_s else None,
            joules_per_token=case.joules_per(rounds, produced), **case.memory_info(rounds),
        )
        if compiled:
            benchmark.extra_info.update(dynamo=counts, compile_mode_ran=mode, compile_fallback=fallback)


@pytest.mark.benchmark(group="decode")
def test_decode_eager(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor],
                      bench_options: Any, ceilings: dict[str, Any], device: torch.device, attn: str) -> None:
    _decode(benchmark, case, models, prompt_ids, bench_options, ceilings, device, attn, compiled=False)


@pytest.mark.benchmark(group="decode")
def test_decode_compiled(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor],
                         bench_options: Any, ceilings: dict[str, Any], device: torch.device, attn: str) -> None:
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip(f"torch.compile is not supported with Python/torch {torch.__version__} here")
    _decode(benchmark, case, models, prompt_ids, bench_options, ceilings, device, attn, compiled=True)


@pytest.mark.benchmark(group="scoring")
def test_scoring(benchmark: Any, case: Any, models: Any, splits: Any, run_config: Any, bench_options: Any,
                 device: torch.device, attn: str) -> None:
    with case.guard(arm="ours", attention_requested=attn, questions=len(splits.eval),
                    eval_batch_size=run_config.eval.batch_size):
        session = models.ours(attn)
        rounds = case.time(
            lambda: evaluate(session.model, session.tokenizer, splits.eval, run_config.eval, device,
                             session.attention, splits.eval_name),
            bench_options.infer_rounds, bench_options.warmup_rounds)
        # evaluate() times its scoring loop itself (tokenization excluded); the round time includes it.
        per_round = Stats.from_values([r.questions_per_s for r in rounds.outputs])
        prompt_tokens = rounds.outputs[0].n_tokens
        benchmark.extra_info.update(
            case.session_info(session), questions_per_s=per_round.median, questions_per_s_iqr=per_round.iqr,
            round_time_s_median=rounds.stats.median, timed_rounds=rounds.stats.n, prompt_tokens=prompt_tokens,
            joules_per_token=case.joules_per(rounds, prompt_tokens),
            joules_per_question=case.joules_per(rounds, len(splits.eval)), **case.memory_info(rounds),
        )
