"""The numerics of each speed lever: its loss curve against the default's over the same real batches.

Each case trains the default and the lever from a fresh adapter (reset to its seeded initialisation: earlier
cases trained it on these batches) over the same ``--warmup-rounds`` +
``--train-rounds`` batches of the loop's order, with the same dropout seeds, eagerly at the bench batch (the
levers' numerics do not depend on compiling, and eager steps keep the case short). ``extra_info`` holds both
curves and ``medqa_core.arms.levers.CurveGap`` (``within_tolerance`` against ``LOSS_CURVE_TOLERANCE``); the timed
round is the lever arm's whole curve, compile-free.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from medqa_core.arms.levers import LOSS_CURVE_TOLERANCE, CurveGap, loss_curve
from medqa_core.engine.attention import AttentionError, training_attention
from medqa_core.engine.config import TrainConfig
from medqa_core.engine.model import reset_adapter

pytestmark = pytest.mark.benchmark(group="levers")

# The levers of the memory-class profiles that change numerics, each over the default's settings.
LEVERS: dict[str, dict[str, Any]] = {
    "dropout-free-lora": dict(lora_dropout=0.0),
    "fused-adamw": dict(adamw="fused"),
    "flex-attention": dict(attn="flex"),
}


@pytest.fixture(scope="module")
def default_curves() -> dict[str, list[float]]:
    return {}


@pytest.mark.parametrize("lever", list(LEVERS))
def test_lever_loss_curve(benchmark: Any, case: Any, models: Any, loop_batches: Any, run_config: Any,
                          device: torch.device, attn: str, lever: str,
                          default_curves: dict[str, list[float]]) -> None:
    base = dataclasses.replace(run_config.train, compile="off", adamw="foreach", lora_dropout=None)
    changed = dataclasses.replace(base, **LEVERS[lever])
    batches = loop_batches(base.batch_size)
    with case.guard(arm="ours", lever=lever, lever_settings=LEVERS[lever], batch_size=base.batch_size,
                    attention_requested=attn, compile_requested="off"):
        if changed.attn:
            try:
                training_attention(changed.attn, device)
            except AttentionError as e:
                pytest.skip(str(e))
        session = models.ours(attn)
        reset_adapter(session.model, run_config.train.seed)

        def curve(cfg: TrainConfig) -> list[float]:
            return loss_curve(session.model, batches, cfg, device, session.attention,
                              session.tokenizer.pad_token_id, session.numerics)

        if attn not in default_curves:
            default_curves[attn] = curve(base)
        lever_curve: list[float] = []
        benchmark.pedantic(lambda: lever_curve.extend(curve(changed)), rounds=1, iterations=1)
        reset_adapter(session.model, run_config.train.seed)  # the cases after this one start as if fresh too
        gap = CurveGap.between(default_curves[attn], lever_curve)
        benchmark.extra_info.update(
            **case.session_info(session), steps=len(batches), loss_default=default_curves[attn],
            loss_lever=lever_curve, curve_gap=gap.as_dict(), tolerance=LOSS_CURVE_TOLERANCE,
            timing=f"one round: the lever's {len(batches)} eager steps, not a throughput figure",
        )
        assert gap.within_tolerance, f"{lever}: loss curve off the default's by {gap.relative:.1%} (max)"
