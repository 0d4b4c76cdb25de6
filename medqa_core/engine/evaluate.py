"""Option scoring as lm-evaluation-harness's ``multiple_choice`` does it -> EvalResult.

Each question's four continuations (" A".." D") share the prompt. When each is a single token
(the Mistral tokenizer's case) one forward of the prompt scores all four from the last
position's distribution; otherwise the four full sequences are scored in one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from medqa_core.engine.attention import AttentionChoice, attention_context
from medqa_core.engine.config import EvalConfig
from medqa_core.engine.data import MedQAItem, ScoringExample, encode_scoring, pack_rows
from medqa_core.engine.numerics import Numerics, autocast
from medqa_core.measure.timing import Timer, peak_memory_gib, reset_peak_memory
from medqa_core.results.accuracy import wilson_ci95
from medqa_core.results.record import EvalResult, QuestionResult

ProgressFn = Callable[[int, int], None]  # (questions done, total)


def _parts(model: Any) -> tuple[Any, Any]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def _score_single_token(model: Any, batch: Sequence[ScoringExample], device: torch.device, pad_id: int,
                        pack_len: int | None) -> torch.Tensor:
    """[B, 4] log-probabilities from one forward of the prompts, packed into rows of ``pack_len``
    tokens (attention kept inside each prompt) or one prompt per right-padded row."""
    decoder, head = _parts(model)
    lengths = [len(e.context_ids) for e in batch]
    rows = pack_rows(lengths, pack_len) if pack_len else [[i] for i in range(len(batch))]
    width = max(sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.arange(width).repeat(len(rows), 1)
    last = torch.zeros(len(batch), 2, dtype=torch.long)  # (row, column) of each prompt's last token
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            input_ids[r, start:end] = torch.tensor(batch[i].context_ids)
            position_ids[r, start:end] = torch.arange(lengths[i])
            last[i] = torch.tensor([r, end - 1])
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    hidden = decoder(input_ids=input_ids.to(device), use_cache=False,
                     position_ids=position_ids.to(device) if pack_len else None).last_hidden_state  # [R, T, H]
    last = last.to(device)
    logprobs = head(hidden[last[:, 0], last[:, 1]]).float().log_softmax(-1)  # [B, V]
    choice_ids = torch.tensor([[c[0] for c in e.continuation_ids] for e in batch], device=device)  # [B, 4]
    return logprobs.gather(1, choice_ids)


def _score_multi_token(model: Any, example: ScoringExample, device: torch.device, pad_id: int) -> torch.Tensor:
    """[1, 4] summed log-probabilities of multi-token continuations, four sequences in one call."""
    seqs = [example.context_ids + c for c in example.continuation_ids]
    input_ids = torch.full((len(seqs), max(map(len, seqs))), pad_id, dtype=torch.long)
    for row, s in enumerate(seqs):
        input_ids[row, : len(s)] = torch.tensor(s)
    logprobs = model(input_ids=input_ids.to(device), use_cache=False).logits.float().log_softmax(-1)  # [4, T, V]
    start = len(example.context_ids)
    scores = [
        sum(logprobs[i, start - 1 + j, tok] for j, tok in enumerate(c))
        for i, c in enumerate(example.continuation_ids)
    ]
    return torch.stack(scores).unsqueeze(0)


@torch.no_grad()
def evaluate(model: Any, tokenizer: Any, items: Sequence[MedQAItem], cfg: EvalConfig, device: torch.device,
             attention: AttentionChoice, split: str, progress: ProgressFn | None = None, *,
             numerics: Numerics) -> EvalResult:
    """Score every question's four options; accuracy is the share whose best option is right.

    Args:
        model: causal LM (peft-wrapped or not) on ``device``.
        tokenizer: the model's tokenizer.
        items: the questions.
        cfg: questions per forward call and the length limit.
        device: where the model lives.
        attention: the attention kernel to force.
        split: name recorded with the result (e.g. ``test.jsonl``).
        progress: called with (questions done, total).
        numerics: the compute dtype scoring runs in (autocast; fp32 runs without).

    Returns:
        Accuracy with a Wilson 95% interval, questions/s of the scoring loop (tokenization excluded),
        and every question's four log-probabilities and predicted letter.
    """
    examples = encode_scoring(tokenizer, items, cfg.max_seq_len)
    pad_id = tokenizer.pad_token_id
    # Longest first, so similar lengths share a batch (less padding) and memory peaks at once.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].context_ids))
    scores: list[torch.Tensor | None] = [None] * len(examples)
    was_training = model.training
    model.eval()
    reset_peak_memory(device)
    done = 0
    if progress:
        progress(0, len(examples))  # the bar starts before the first batch, so its rate and ETA include it
    # Autocast as in training: LoRA's fp32 weights would otherwise run their matmuls in fp32.
    with Timer(device) as timer, attention_context(attention), autocast(device, numerics):
        single = [i for i in order if examples[i].single_token]
        batch_size = cfg.batch_for(device.type)
        for start in range(0, len(single), batch_size):
            idx = single[start : start + batch_size]
            batch_scores = _score_single_token(model, [examples[i] for i in idx], device, pad_id,
                                               cfg.pack_len if cfg.packing else None).cpu()
            for row, i in enumerate(idx):
                scores[i] = batch_scores[row]
            done += len(idx)
            if progress:
                progress(done, len(examples))
        for i in (i for i in order if not examples[i].single_token):
            scores[i] = _score_multi_token(model, examples[i], device, pad_id).cpu()[0]
            done += 1
            if progress:
                progress(done, len(examples))
    if was_training:
        model.train()
    questions = []
    for item, score in zip(items, scores, strict=True):
        assert score is not None  # every index was scored above
        values = tuple(float(v) for v in score)
        questions.append(QuestionResult(item.qid, item.answer_idx, int(torch.argmax(score)), values))
    correct = sum(q.correct for q in questions)
    return EvalResult(
        split=split, n_questions=len(questions), accuracy=correct / len(questions),
        accuracy_ci95=wilson_ci95(correct, len(questions)),
        n_tokens=sum(len(e.context_ids) for e in examples), eval_time_s=timer.elapsed_s,
        questions_per_s=len(questions) / timer.elapsed_s, peak_mem_gib=peak_memory_gib(device),
        questions=tuple(questions),
    )
