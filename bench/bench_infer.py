"""Inference speed of ours (NF4 base + LoRA): prefill and time to first token, decode against its
roofline, option-scoring questions/s.

Prefill and decode use real MedQA prompt tokens, exactly ``--bench-seq-len`` per row, at batch 1
and at the bench batch. Decode runs twice: plain eager ``generate`` (greedy), and the hardware-bound
path (medqa_core.engine.decoding.StaticDecoder): a static KV cache, the one-token step compiled and, on a
GPU, replayed as one CUDA/HIP graph. Each decode figure is also given as a fraction of its roofline:
rows x copy bandwidth measured in this run / weight bytes read per step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
import torch

from medqa_core.engine.attention import AttentionChoice, attention_context
from medqa_core.engine.decoding import StaticDecoder
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.numerics import Numerics, autocast
from medqa_core.measure.ceilings import weight_bytes_per_token
from medqa_core.measure.timing import Stats, Timer, is_oom, synchronize
from medqa_core.measure.trace import OURS_4BIT, profile_calls, time_by_launch
from medqa_core.results.measurements import Scoring

logger = logging.getLogger("medqa_core.bench")


def _generate(model: Any, input_ids: torch.Tensor, new_tokens: int, pad_id: int, attention: AttentionChoice,
              numerics: Numerics, **options: Any) -> Callable[[], Generated]:
    """A greedy ``generate`` of exactly ``new_tokens`` (min = max, so EOS cannot stop it early).

    Under autocast to the run's compute dtype, as scoring and training run: LoRA's fp32 weights would otherwise
    run their matmuls in fp32.
    """
    mask = torch.ones_like(input_ids)  # [B, T]: rows are full-length prompts, no padding

    def run() -> Generated:
        with attention_context(attention), autocast(input_ids.device, numerics):
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id, **options)
        return Generated(out.shape[1] - input_ids.shape[1])  # out: [B, T + new]

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
        rounds = case.time(_generate(session.model, ids, 1, session.tokenizer.pad_token_id, session.attention,
                                     session.numerics),
                           bench_options.infer_rounds, bench_options.warmup_rounds)
        stats = rounds.stats
        prompt_tokens = prefill_batch * seq_len
        benchmark.extra_info.update(
            case.session_info(session), ttft_s_median=stats.median, ttft_s_iqr=stats.iqr, timed_rounds=stats.n,
            prefill_tokens_per_s=prompt_tokens / stats.median,
            energy=case.energy(rounds, tokens_per_round=prompt_tokens).to_dict(), memory=case.memory(rounds).to_dict(),
        )


def _dynamo_counts() -> dict[str, int]:
    # torch._dynamo's counters: graphs compiled and graph breaks. Recorded so a "compiled" figure that
    # recompiled (more than one graph) or mostly ran eagerly (breaks) shows it.
    from torch._dynamo.utils import counters

    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


@dataclasses.dataclass(frozen=True)
class Generated:
    """What one timed decode round gives back: new tokens per row, and (StaticDecoder) the seconds from the
    round's start until its prefill and first token were done, so that its steps' time is its own."""

    tokens: int
    prefill_s: float | None = None


def _static_decode(decoder: StaticDecoder, input_ids: torch.Tensor, new_tokens: int,
                   attention: AttentionChoice, numerics: Numerics) -> Callable[[], Generated]:
    """``new_tokens`` greedy tokens through the static decoder, under the settings ``_generate`` uses; the round
    synchronizes once after its prefill to clock it (the harness synchronized just before the round)."""
    device = input_ids.device

    def run() -> Generated:
        start = time.perf_counter()
        marks: list[float] = []

        def prefill_done() -> None:
            synchronize(device)
            marks.append(time.perf_counter() - start)

        with attention_context(attention), autocast(device, numerics):
            tokens = decoder.generate(input_ids, new_tokens, after_prefill=prefill_done).shape[1]
        return Generated(tokens, marks[0])

    return run


def _decode(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor], bench_options: Any,
            ceilings: dict[str, Any], device: torch.device, attn: str, batch: int, compiled: bool,
            nf4_kernel: str = "bitsandbytes", decode_attention: str = "auto") -> None:
    seq_len, new_tokens = bench_options.seq_len, bench_options.decode_tokens
    with case.guard(arm="ours", attention_requested=attn, batch_size=batch, seq_len=seq_len, new_tokens=new_tokens,
                    cache="static" if compiled else "dynamic", compile_mode="default" if compiled else None,
                    **({"decode_loop": "StaticDecoder"} if compiled else {})):
        session = models.ours(attn)
        model = session.model
        model.eval()
        ids = prompt_ids(batch).to(device)  # [B, T]
        if not compiled:
            pad_id = session.tokenizer.pad_token_id
            rounds, ttft = _time_decode(case, bench_options,
                                        lambda n: _generate(model, ids, n, pad_id, session.attention,
                                                                    session.numerics))
            benchmark.extra_info.update(_decode_info(case, rounds, ttft, model, ceilings, batch))
        else:
            counts_before = _dynamo_counts()
            try:
                decoder, first_call_s, fallback = _warm_decoder(model, ids, new_tokens, session.attention,
                                                                 session.numerics, device, nf4_kernel,
                                                                 decode_attention)
                rounds, ttft = _time_decode(case, bench_options,
                                            lambda n: _static_decode(decoder, ids, n, session.attention,
                                                                                     session.numerics))
                # Graphs compiled in this case (a failed graph attempt's included): when all went well, 1 (the
                # step), 2 where the decoder compiled its prefill too (its setup's ``prefill`` line).
                counts = {k: v - counts_before[k] for k, v in _dynamo_counts().items()}
                step_profile, step_profile_error = _profile_decode_step(decoder, ids, new_tokens, session.attention,
                                                                        session.numerics, device)
                by_launch = time_by_launch(step_profile["sequence"], decoder.nf4_launches,
                                           ceilings.get("copy_bandwidth_bytes_per_s")) if step_profile else []
            finally:
                torch._dynamo.reset()  # drop the compiled step (and the graph's memory, with the decoder)
            benchmark.extra_info.update(_decode_info(case, rounds, ttft, model, ceilings, batch), dynamo=counts,
                                        first_call_s=first_call_s, fallback=fallback,
                                        decode_step_profile=step_profile, decode_step_profile_error=step_profile_error,
                                        nf4_time_by_launch=by_launch,
                                        **dataclasses.asdict(decoder.setup))
        benchmark.extra_info.update(case.session_info(session))


def _warm_decoder(model: Any, ids: torch.Tensor, new_tokens: int, attention: AttentionChoice,
                  numerics: Numerics, device: torch.device,
                  nf4_kernel: str, decode_attention: str) -> tuple[StaticDecoder, float, str | None]:
    """A StaticDecoder that has compiled its step: with a CUDA/HIP graph on a GPU, else visibly without.

    Returns:
        The decoder; its first call's seconds (compile and graph capture, paid once per process, kept
        apart from the timed rounds); why the graph was dropped, or None.
    """
    fallback = None
    for use_graph in dict.fromkeys((device.type == "cuda", False)):
        try:
            decoder = StaticDecoder(model, batch=ids.shape[0], max_len=ids.shape[1] + new_tokens, use_graph=use_graph,
                                    nf4_kernel=nf4_kernel, attention=decode_attention)
        except ValueError as e:  # our NF4 kernel or attention asked for where it cannot run
            pytest.skip(str(e))
        try:
            with Timer(device) as first_call:
                _static_decode(decoder, ids, new_tokens, attention, numerics)()
            return decoder, first_call.elapsed_s, fallback
        except (torch._dynamo.exc.TorchDynamoException, RuntimeError) as e:
            if is_oom(e):
                raise
            fallback = f"{decoder.setup.graph} failed: {str(e).strip().splitlines()[0][:200]}"
            logger.warning("decode: %s", fallback)
            torch._dynamo.reset()
    pytest.skip(f"static cache + torch.compile cannot run here: {fallback}")


# Decode steps profiled after the timed rounds (kernel time by category, launches, gaps inside the graph).
PROFILED_DECODE_STEPS = 8


def _profile_decode_step(decoder: StaticDecoder, ids: torch.Tensor, new_tokens: int, attention: AttentionChoice,
                         numerics: Numerics, device: torch.device) -> tuple[dict[str, Any] | None, str | None]:
    """Where one decode step's time goes: torch.profiler over a few steps (graph replays on a GPU) after a fresh
    prefill, outside the timed rounds. Its wall time over its kernels' time is the gaps between them.

    Returns:
        The profile (``StepProfile.to_dict()``) and None; or None and why the profiler failed: the case keeps its
        timed figures either way.
    """
    with attention_context(attention), autocast(device, numerics):
        decoder.generate(ids, 1)  # the prefill: the cache holds the prompt again
        steps = max(1, min(PROFILED_DECODE_STEPS, new_tokens - 1))
        try:
            return profile_calls(decoder.step, device, steps, tokens_per_step=ids.shape[0], top_n=10,
                                 sequence_of=OURS_4BIT if decoder.nf4_launches else None).to_dict(), None
        except RuntimeError as e:  # the profiler (kineto, CUPTI) failing here; an out-of-memory is the case's
            if is_oom(e):
                raise
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            logger.warning("decode: step profile not taken (%s); the timed figures stand", why)
            return None, why


def _time_decode(case: Any, bench_options: Any, generate: Callable[[int], Callable[[], int]]) -> tuple[Any, Stats]:
    """Timed rounds of generate(N), and of generate(1) (prefill and first token), the latter outside pedantic."""
    rounds = case.time(generate(bench_options.decode_tokens), bench_options.infer_rounds,
                       bench_options.warmup_rounds)
    ttft = case.measure(generate(1), bench_options.infer_rounds, warmup_rounds=1)
    return rounds, ttft


def _decode_info(case: Any, rounds: Any, ttft: Stats, model: Any, ceilings: dict[str, Any],
                 batch: int) -> dict[str, Any]:
    """Decode tokens/s over all rows, and the same as a fraction of its roofline.

    The decode time: each round's time minus its own prefill and first token where the rounds clocked it
    (StaticDecoder, since session 47), the median over rounds; else (eager ``generate``, and every file before)
    the median of generate(N) minus that of generate(1), timed in other rounds: a time to first token that moved
    between those rounds moved the figure (on one H100, 173 ms against 95 ms in the same code's earlier run).

    The roofline: each step reads the weights once for all ``batch`` rows, so at most
    ``batch`` x copy bandwidth / weight bytes tokens/s (the KV cache's bytes left out).
    """
    generate_s: Stats = rounds.stats
    produced = rounds.outputs[0].tokens  # new tokens per row
    # generate(N) = prefill and first token + (N - 1) decode steps; generate(1) times the former.
    prefills = [out.prefill_s for out in rounds.outputs]
    if all(p is not None for p in prefills):
        steps = Stats.from_values([t - p for t, p in zip(rounds.times_s, prefills, strict=True)])
        decode_s, timing = steps.median, "per round: its time minus its own prefill and first token"
    else:
        steps = None
        decode_s, timing = generate_s.median - ttft.median, "generate(N) minus generate(1), medians of other rounds"
    decode_tokens_per_s = batch * (produced - 1) / decode_s if decode_s > 0 else None
    weight_bytes = weight_bytes_per_token(model)
    bandwidth = ceilings.get("copy_bandwidth_bytes_per_s")
    roofline = batch * bandwidth / weight_bytes if bandwidth else None
    return dict(
        new_tokens=produced, generate_s_median=generate_s.median, generate_s_iqr=generate_s.iqr,
        decode_s_median=decode_s, decode_s_iqr=steps.iqr if steps else None, decode_timing=timing,
        timed_rounds=generate_s.n, ttft_s_median=ttft.median, decode_tokens_per_s=decode_tokens_per_s,
        generate_tokens_per_s=batch * produced / generate_s.median, weight_bytes_per_token=weight_bytes,
        copy_bandwidth_bytes_per_s=bandwidth, roofline_tokens_per_s=roofline,
        roofline_fraction=decode_tokens_per_s / roofline if roofline and decode_tokens_per_s else None,
        energy=case.energy(rounds, tokens_per_round=batch * produced).to_dict(), memory=case.memory(rounds).to_dict(),
    )


@pytest.mark.benchmark(group="decode")
def test_decode_eager(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor],
                      bench_options: Any, ceilings: dict[str, Any], device: torch.device, attn: str,
                      decode_batch: int) -> None:
    _decode(benchmark, case, models, prompt_ids, bench_options, ceilings, device, attn, decode_batch, compiled=False)


@pytest.mark.benchmark(group="decode")
def test_decode_compiled(benchmark: Any, case: Any, models: Any, prompt_ids: Callable[[int], torch.Tensor],
                         bench_options: Any, ceilings: dict[str, Any], device: torch.device, attn: str,
                         decode_batch: int, nf4_kernel: str, decode_attention: str) -> None:
    """The hardware-bound decode, once per 4-bit kernel (--nf4-kernels) and attention (--decode-attention): ours
    (triton) and the others as arms."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip(f"torch.compile is not supported with Python/torch {torch.__version__} here")
    _decode(benchmark, case, models, prompt_ids, bench_options, ceilings, device, attn, decode_batch, compiled=True,
            nf4_kernel=nf4_kernel, decode_attention=decode_attention)


@pytest.mark.benchmark(group="scoring")
def test_scoring(benchmark: Any, case: Any, models: Any, splits: Any, run_config: Any, bench_options: Any,
                 device: torch.device, attn: str) -> None:
    with case.guard(arm="ours", attention_requested=attn, questions=len(splits.eval),
                    eval_batch_size=run_config.eval.batch_for(device.type)):
        session = models.ours(attn)
        rounds = case.time(
            lambda: evaluate(session.model, session.tokenizer, splits.eval, run_config.eval, device,
                             session.attention, splits.eval_name, numerics=session.numerics),
            bench_options.infer_rounds, bench_options.warmup_rounds)
        # evaluate() times its scoring loop itself (tokenization excluded); the round time includes it.
        per_round = Stats.from_values([r.questions_per_s for r in rounds.outputs])
        prompt_tokens = rounds.outputs[0].n_tokens
        benchmark.extra_info.update(
            case.session_info(session), timed_rounds=rounds.stats.n, prompt_tokens=prompt_tokens,
            scoring=Scoring(questions_per_s=per_round.median, questions_per_s_iqr=per_round.iqr,
                            round_time_s_median=rounds.stats.median).to_dict(),
            energy=case.energy(rounds, tokens_per_round=prompt_tokens,
                               questions_per_round=len(splits.eval)).to_dict(),
            memory=case.memory(rounds).to_dict(),
        )
