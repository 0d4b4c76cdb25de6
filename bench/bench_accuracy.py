"""MedQA accuracy and every question's option log-probabilities, per attention kernel.

Scored with medqa_core.engine.evaluate.evaluate on the fresh adapter (before any train step), so two
backends' files can be joined on ``qid`` and compared question by question (McNemar, logprob drift).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from medqa_core.engine.evaluate import evaluate

pytestmark = pytest.mark.benchmark(group="accuracy")


def test_accuracy(benchmark: Any, case: Any, models: Any, splits: Any, run_config: Any, device: torch.device,
                  attn: str) -> None:
    with case.guard(arm="ours", attention_requested=attn, questions=len(splits.eval),
                    eval_batch_size=run_config.eval.batch_for(device.type)):
        session = models.ours(attn)
        # One round: the figures are the predictions, not the time (bench_infer's test_scoring times it).
        rounds = case.time(
            lambda: evaluate(session.model, session.tokenizer, splits.eval, run_config.eval, device,
                             session.attention, splits.eval_name, numerics=session.numerics),
            rounds=1, warmup_rounds=0)
        result = rounds.outputs[0]
        benchmark.extra_info.update(
            case.session_info(session), split=result.split, n_questions=result.n_questions,
            accuracy=result.accuracy, accuracy_ci95=list(result.accuracy_ci95),
            # qid, answer, pred, logprobs (one per option " A".." D")
            predictions=[dataclasses.asdict(q) for q in result.questions],
        )
