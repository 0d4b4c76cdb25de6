"""QLoRA train-step throughput of the peer stacks (medqa_core.arms.peers) beside ours and the reference.

``test_train_peer[NAME]`` steps a peer arm over the same real batches as the reference
(``loop_batches``: ``--warmup-rounds`` untimed, then ``--train-rounds`` timed, in the training loop's
order) and records the same figures (``_train_info`` of bench_train.py), plus:

- ``arm`` ("peer"), ``peer`` (the case), ``stack`` and ``stack_version``, ``device_name``, ``backend``,
  ``ran`` (False when skipped), ``skipped_reason`` where the stack cannot run here;
- ``speedup_vs_reference`` / ``reference_tokens_per_s`` / ``reference_batch_size`` (the reference case
  of this run, at ``--bench-batch-size``);
- ``ours_speedup_over_this_peer``: ours' fastest case of the same batch size in this run over this
  peer (``ours_tokens_per_s``, ``ours_case``), and ``ours_speedups_over_this_peer`` for each such case.

Cases: ``liger`` at ``--bench-batch-size``; ``liger-batch`` at the ``max-speed`` profile's batch
(or ``--peer-batch-size``; its
memory settings at their best: fused linear cross entropy and checkpointing, a larger batch; an
out-of-memory is that case's recorded result); ``torchtune``; ``unsloth`` last, since its import
patches transformers for the rest of the process. They run after every case of ours and the reference
(bench/conftest.py orders them), one model in memory at a time.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from bench_train import _rounds_over, _train_info

from medqa_core.arms.peers import DISTRIBUTIONS, PeerUnavailable, installed_version
from medqa_core.engine.config import apply_named_settings
from medqa_core.measure.device import detect_backend

pytestmark = pytest.mark.benchmark(group="train")

# Case -> (stack, profile whose batch size it takes; None: --bench-batch-size). Unsloth last (see above).
PEER_CASES = {
    "liger": ("liger", None),
    "liger-batch": ("liger", "max-speed"),
    "torchtune": ("torchtune", None),
    "unsloth": ("unsloth", None),
}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _versus_ours(tokens_per_s: float, ours: dict[str, float]) -> dict[str, Any]:
    """Ours' speed-up over this peer, from ours' cases of the same batch size (none: None)."""
    if not ours:
        return {"ours_tokens_per_s": None, "ours_case": None, "ours_speedup_over_this_peer": None,
                "ours_speedups_over_this_peer": {}}
    best = max(ours, key=ours.__getitem__)
    return {"ours_tokens_per_s": ours[best], "ours_case": best,
            "ours_speedup_over_this_peer": ours[best] / tokens_per_s,
            "ours_speedups_over_this_peer": {name: rate / tokens_per_s for name, rate in ours.items()}}


@pytest.mark.parametrize("peer", list(PEER_CASES))
def test_train_peer(benchmark: Any, case: Any, models: Any, loop_batches: Any, bench_options: Any, run_config: Any,
                    ceilings: dict[str, Any], reference_results: dict[str, Any],
                    ours_results: dict[int, dict[str, float]], device: torch.device, peer: str) -> None:
    stack, profile = PEER_CASES[peer]
    batch_size = (bench_options.peer_batch_size or apply_named_settings(profile, run_config.train).batch_size) \
        if profile else run_config.train.batch_size
    examples = loop_batches(batch_size)
    with case.guard(arm="peer", peer=peer, stack=stack, stack_version=installed_version(DISTRIBUTIONS[stack]),
                    batch_size=batch_size,
                    seq_len_max=max(e.n_tokens for b in examples for e in b), backend=detect_backend(),
                    device_name=_device_name(device), ran=False):
        unavailable = None
        try:
            arm = models.peer(stack)
        except PeerUnavailable as e:
            unavailable = e.reason
        if unavailable is not None:  # outside the except block: a half-loaded model's frames are gone
            models.release()
            case.skip(unavailable)
        batches = [arm.collate(b) for b in examples]  # input_ids, attention_mask, labels: [B, T]
        rounds = case.time(_rounds_over(batches, lambda batch: arm.step(batch).item()),
                           bench_options.train_rounds, bench_options.warmup_rounds)
        info = _train_info(case, rounds, arm.model, examples, [b["input_ids"].numel() for b in batches],
                           arm.numerics, ceilings, device)
        reference = reference_results.get("tokens_per_s")
        benchmark.extra_info.update(
            info, **arm.info(), ran=True, model=arm.model_dir.name, numerics=arm.numerics.as_dict(),
            reference_tokens_per_s=reference, reference_batch_size=reference_results.get("batch_size"),
            speedup_vs_reference=info["throughput"]["tokens_per_s"] / reference if reference else None,
            **_versus_ours(info["throughput"]["tokens_per_s"], ours_results.get(batch_size, {})),
        )
