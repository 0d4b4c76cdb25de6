"""The eval loss during fine-tuning: a fixed slice of the eval split scored every N steps -> ``RunRecord.eval_curve``.

Time to target (MLPerf's measure) needs the quality as training goes, not only at the end. Each point scores
the first ``questions`` questions of the eval split as ``evaluate`` scores them (option log-likelihoods) and
keeps the answer-token loss: the mean negative log-likelihood of the right letter, the quantity the default
``--loss-on answer`` trains down. Points are taken between steps, outside the steps' timers: a run's step
times, and so its time to target, leave the scoring out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from medqa_core.compare.runsets import answer_loss_nats
from medqa_core.engine.attention import AttentionChoice
from medqa_core.engine.config import EvalConfig
from medqa_core.engine.data import MedQAItem
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.numerics import Numerics
from medqa_core.results.record import EvalResult

logger = logging.getLogger(__name__)

TrainProgress = Callable[[int, int, float], None]  # train's (step done, total, loss)


def curve_point(step: int, result: EvalResult) -> dict[str, Any]:
    """One point of ``RunRecord.eval_curve`` from a scoring of the curve's questions."""
    return {"step": step, "eval_loss_nats": answer_loss_nats(result.questions), "accuracy": result.accuracy,
            "n_questions": result.n_questions}


@dataclass
class EvalCurve:
    """Scores ``items`` after every ``every`` steps and after the last one (a fine-tune's eval-loss curve).

    Attributes:
        every: steps between points (>= 1).
        questions: how many questions of the eval split, from the first, each point scores.
        items: those questions (``use_split`` sets them from the run's eval split).
        split: their split's name.
        start: the step-0 point (the base model: LoRA's B starts at zero), shared by the runs of a set.
        points: the points so far, step 0 first.
        seconds: wall time spent scoring, so the caller can keep it out of the training phase.
    """

    every: int
    questions: int
    items: Sequence[MedQAItem] = ()
    split: str = ""
    start: dict[str, Any] | None = None
    points: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.every < 1:
            raise ValueError(f"eval curve every {self.every} steps: give 1 or more")
        if self.questions < 1:
            raise ValueError(f"eval curve of {self.questions} questions: give 1 or more")

    def use_split(self, items: Sequence[MedQAItem], split: str) -> None:
        """Score the first :attr:`questions` of ``items`` (once: a run set's runs share them)."""
        if not self.items:
            self.items, self.split = tuple(items[: self.questions]), split

    def score(self, step: int, model: Any, tokenizer: Any, cfg: EvalConfig, device: torch.device,
              attention: AttentionChoice, numerics: Numerics) -> dict[str, Any]:
        """Score the curve's questions now; compiled layers run eagerly (no graph is compiled for scoring)."""
        began = time.perf_counter()
        with torch.compiler.set_stance("force_eager"):
            result = evaluate(model, tokenizer, self.items, cfg, device, attention, self.split, numerics=numerics)
        point = curve_point(step, result)
        self.seconds += time.perf_counter() - began
        logger.info("eval curve: step %d, eval loss %.4f nats on %d questions", step, point["eval_loss_nats"],
                    point["n_questions"])
        return point

    def hook(self, progress: TrainProgress | None, model: Any, tokenizer: Any, cfg: EvalConfig,
             device: torch.device, attention: AttentionChoice, numerics: Numerics) -> TrainProgress:
        """``progress`` for ``train``, also scoring a point after every ``every`` steps and after the last."""
        if self.start is None:
            self.start = self.score(0, model, tokenizer, cfg, device, attention, numerics)
        self.points = [self.start]

        def after_step(done: int, total: int, loss: float) -> None:
            if progress is not None:
                progress(done, total, loss)
            if done > 0 and (done % self.every == 0 or done == total):
                self.points.append(self.score(done, model, tokenizer, cfg, device, attention, numerics))

        return after_step
