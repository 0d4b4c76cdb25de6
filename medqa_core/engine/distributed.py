"""Data-parallel training through PyTorch's own launcher (torchrun) and collectives.

NCCL on CUDA (RCCL on ROCm answers to the same name), gloo on CPU. Every rank holds the 4-bit
base and the LoRA weights; only LoRA gradients cross the link, all-reduced by DDP in buckets
while the backward pass still runs.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from medqa_core.measure.timing import synchronize

logger = logging.getLogger(__name__)


# DDP's gradient bucket size, in MiB. LoRA's gradients are many small tensors: mistral-7b's at rank 16 on every
# linear layer are 1.3 M fp32 values (5 MiB) per decoder layer, 448 tensors in all. Buckets of about one layer
# let the first all-reduce start once the last layer's backward is done, not several layers later (DDP's
# default is 25 MiB), while each call still carries megabytes, far above a collective's fixed cost.
DDP_BUCKET_CAP_MB = 5


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group torchrun set up (NCCL/RCCL on GPUs, gloo on CPU); no-op when not launched.

    Returns:
        This process's rank, the world size and its local rank (its GPU index on this host).
    """
    if not launched_by_torchrun():
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    logger.info("rank %d of %d (local %d), backend %s", info.rank, info.world_size, info.local_rank,
                dist.get_backend())
    return info


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed)."""
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def measure_all_reduce_s(params: list[torch.nn.Parameter], device: torch.device, rounds: int = 10) -> float | None:
    """Median time of one all-reduce of a buffer the size of all trainable gradients (what crosses the
    link per step, if it were not overlapped with the backward pass). None when not distributed."""
    if not dist.is_initialized():
        return None
    numel = sum(p.numel() for p in params)
    buffer = torch.ones(numel, dtype=torch.float32, device=device)
    times = []
    for i in range(rounds + 2):
        synchronize(device)
        start = time.perf_counter()
        dist.all_reduce(buffer)
        synchronize(device)
        if i >= 2:  # the first calls set up the communicator
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def balance_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Split a global batch over ranks by tokens: each example, longest first, goes to the rank with the
    fewest tokens so far (then the fewest examples, then the lowest rank).

    A pure function of the lengths and the world size, so every rank computes the same split and the
    global batch order (what ``--resume`` skips) does not change. The most loaded rank ends within one
    example's length of the mean (it had the fewest tokens when it took its last example), and with at
    least ``world_size`` examples every rank gets one.

    Returns:
        Indices into ``lengths`` for each rank, in batch order.
    """
    tokens, counts = [0] * world_size, [0] * world_size
    parts: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        rank = min(range(world_size), key=lambda r: (tokens[r], counts[r], r))
        parts[rank].append(i)
        tokens[rank] += lengths[i]
        counts[rank] += 1
    return [sorted(part) for part in parts]


def gather_step(time_s: float, tokens: int, device: torch.device) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """Every rank's wall time and real tokens of one step, in rank order: one all-gather of two numbers.

    A rank's wall time includes its waits at the step's collectives, so a fast rank's time shows the slow
    one's; the token counts say which rank carried more.
    """
    mine = torch.tensor([time_s, float(tokens)], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    rows = torch.stack(every).tolist()  # [world_size, 2]
    return tuple(r[0] for r in rows), tuple(int(r[1]) for r in rows)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def ddp_info(module: torch.nn.Module) -> dict[str, Any]:
    """What a DistributedDataParallel module ran with: its bucket cap and the buckets it built (MiB each)."""
    logged = module._get_ddp_logging_data()  # type: ignore[operator]  # DDP's own record of its reducer
    sizes = [int(b) for b in str(logged.get("bucket_sizes", "")).split(",") if b.strip()]
    return {"strategy": "ddp", "bucket_cap_mb": DDP_BUCKET_CAP_MB,
            "gradient_as_bucket_view": bool(logged.get("gradient_as_bucket_view")),
            "bucket_mib": [round(b / 2**20, 3) for b in sizes]}
