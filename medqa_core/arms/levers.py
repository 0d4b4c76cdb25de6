"""Loss curves of the speed levers against the default, over the same steps from the same adapter start.

A lever that changes numerics (LoRA's dropout, the fused optimizer, the compiled backward's recompute budget)
must keep the loss curve within :data:`LOSS_CURVE_TOLERANCE` of the default's: ``tests/test_levers.py`` checks
it on the tiny model on CPU, ``bench/bench_levers.py`` measures it on a GPU.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from medqa_core.engine.attention import AttentionChoice
from medqa_core.engine.config import TrainConfig
from medqa_core.engine.data import TrainExample
from medqa_core.engine.numerics import Numerics
from medqa_core.engine.train import prepare_training, step_seed

# The most a lever's per-step loss may differ from the default's, as a share of the default's mean loss over the
# same steps. Dropout's masks make two curves differ by their noise: 2% is several times what dropping it moved
# the tiny model's curve (tests/test_levers.py), and the GPU figure is measured against the same bound.
LOSS_CURVE_TOLERANCE = 0.02


@dataclass(frozen=True)
class CurveGap:
    """How far a lever's loss curve is from the default's over the same steps."""

    steps: int
    max_abs_diff: float
    mean_abs_diff: float
    relative: float  # max_abs_diff over the default curve's mean loss
    within_tolerance: bool

    @classmethod
    def between(cls, default: Sequence[float], lever: Sequence[float]) -> CurveGap:
        diffs = [abs(a - b) for a, b in zip(default, lever, strict=True)]
        relative = max(diffs) / (sum(default) / len(default))
        return cls(len(diffs), max(diffs), sum(diffs) / len(diffs), relative, relative <= LOSS_CURVE_TOLERANCE)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def loss_curve(model: Any, batches: Sequence[Sequence[TrainExample]], cfg: TrainConfig, device: torch.device,
               attention: AttentionChoice, pad_id: int, numerics: Numerics) -> list[float]:
    """The losses of ``len(batches)`` training steps under ``cfg``, starting from the adapter as it is now.

    The adapter's weights are put back afterwards, so every arm starts from the same point; each step draws
    dropout's masks from the loop's own per-step seed.
    """
    start = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    trainer = prepare_training(model, cfg, device, attention, pad_id, numerics)
    losses = []
    try:
        collated = [trainer.collate(list(b)) for b in batches]
        trainer.warm_up(collated[0])
        for step, batch in enumerate(collated):
            seed = step_seed(cfg.seed, step, 0)
            torch.manual_seed(seed)
            losses.append(trainer(batch, lambda seed=seed: torch.manual_seed(seed)))
    finally:
        trainer.close()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in start:
                    p.copy_(start[name])
    return losses
