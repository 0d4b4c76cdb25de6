"""Where one step's time goes: torch.profiler over a few steps, grouped into categories.

A step is a training step (:func:`profile_steps`) or any call, such as one decode step (:func:`profile_calls`).
On a GPU the device kernels are grouped by name (matmuls, our and bitsandbytes' 4-bit kernels, attention,
optimizer, Inductor's fused kernels, other element-wise work) and set against the step's wall time: a step whose
wall time far exceeds its kernel time is bound by the host (Python and kernel launches) or, inside a CUDA graph,
by the gaps between its kernels. On CPU the operators' own CPU time is grouped the same way. Batching the data
(collate) is timed apart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from medqa_core.measure.timing import Timer, peak_memory_gib, reset_peak_memory

logger = logging.getLogger(__name__)

OURS_4BIT = "4-bit matmul (ours)"
# (category, substrings of kernel / operator names), first match wins; case-insensitive.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (OURS_4BIT, ("_nf4_matmul_kernel",)),
    ("4-bit matmul (bitsandbytes)", ("gemm_4bit",)),  # gemm_4bit_simt (1 row), gemm_4bit_sm80_* (a few)
    ("dequantize 4-bit", ("dequant",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "aten::mm", "aten::addmm", "aten::bmm", "aten::linear",
                "matmul")),
    ("optimizer", ("adam", "multi_tensor_apply")),
    ("copies", ("memcpy", "memset", "aten::copy_", "aten::to")),
    ("fused by torch.compile", ("triton", "cpp_fused", "compiledfunction")),
)
OTHER = "element-wise, norms, other"


def categorize(name: str) -> str:
    """The category of a kernel or operator name (see :data:`CATEGORIES`)."""
    low = name.lower()
    for category, needles in CATEGORIES:
        if any(n in low for n in needles):
            return category
    return OTHER


@dataclass(frozen=True)
class StepProfile:
    """One profiled configuration: per-step times in milliseconds."""

    device: str
    steps: int
    tokens_per_step: int
    wall_ms: float  # one step, host clock, device synchronized
    busy_ms: float  # summed kernel time (GPU) or operator self time (CPU) per step
    collate_ms: float  # batching the step's examples on the host (outside wall_ms)
    peak_mem_gib: float | None
    categories: dict[str, float]  # category -> ms per step
    top: tuple[dict[str, Any], ...]  # the heaviest kernels / operators: name, category, ms, calls per step
    launches: dict[str, float] = dataclasses.field(default_factory=dict)  # category -> kernels (operators) a step
    # ms of each kernel (outermost operator on CPU) of the category profile_calls was asked to follow, in the
    # order a step launches them, each the median over the steps; empty when not asked or not one per step alike
    sequence: tuple[float, ...] = ()

    @property
    def host_bound_ms(self) -> float:
        """Wall time not covered by device work: host overhead (Python, launches, syncs)."""
        return max(self.wall_ms - self.busy_ms, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "host_bound_ms": self.host_bound_ms}


def _device_events(prof: Any, on_gpu: bool) -> list[tuple[str, float, int]]:
    """(name, total microseconds, calls) of each device kernel (GPU) or operator's own time (CPU)."""
    rows = []
    for e in prof.key_averages():
        if on_gpu:
            # Kernels only: their time is the GPU's; operators' device time would count them twice.
            if e.device_type != torch.autograd.DeviceType.CUDA or e.self_device_time_total <= 0:
                continue
            rows.append((e.key, e.self_device_time_total, e.count))
        elif e.self_cpu_time_total > 0 and e.key.startswith(("aten::", "bitsandbytes::", "CompiledFunction",
                                                              "Optimizer")):
            rows.append((e.key, e.self_cpu_time_total, e.count))
    return rows


def profile_steps(step: Any, examples: Sequence[Any], device: torch.device, steps: int = 3,
                  warmup: int = 2, top_n: int = 15) -> StepProfile:
    """Profile ``steps`` calls of ``step(batch)`` after ``warmup`` unprofiled ones.

    Args:
        step: a :class:`medqa_core.engine.train.TrainingStep` (forward, backward, optimizer; ``step.collate``
            batches as the training loop does).
        examples: the step's examples (``engine.data.TrainExample``).
        device: where the model runs.
        steps: profiled steps.
        warmup: steps first (compile, allocator, kernel selection).
        top_n: how many of the heaviest kernels to list.
    """
    t0 = time.perf_counter()
    batch = step.collate(list(examples))
    collate_ms = 1e3 * (time.perf_counter() - t0)
    n_tokens = int(batch.pop("n_tokens"))
    batch = {k: v.to(device) for k, v in batch.items()}
    step.warm_up(batch)
    for _ in range(warmup):
        step(batch)
    return profile_calls(lambda: step(batch), device, steps, n_tokens, top_n, collate_ms)


def _sequence(prof: Any, on_gpu: bool, category: str, steps: int) -> tuple[float, ...]:
    """Milliseconds of each kernel of ``category`` in launch order, the median over ``steps`` steps of each
    position (:attr:`StepProfile.sequence`); on CPU the outermost operators of the category (an ``aten::linear``,
    not the ``aten::addmm`` inside it). Empty when the kernels do not split into ``steps`` equal steps."""
    def outermost(e: Any) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if categorize(parent.name) == category:
                return False
            parent = parent.cpu_parent
        return True

    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    events = sorted((e for e in prof.events() if e.device_type == kind and categorize(e.name) == category
                     and (on_gpu or outermost(e))), key=lambda e: e.time_range.start)
    if not events or len(events) % steps:
        return ()
    per_step = len(events) // steps
    ms = [e.time_range.elapsed_us() / 1e3 for e in events]
    return tuple(statistics.median(ms[i::per_step]) for i in range(per_step))


def profile_calls(call: Any, device: torch.device, steps: int, tokens_per_step: int, top_n: int = 15,
                  collate_ms: float = 0.0, sequence_of: str | None = None) -> StepProfile:
    """Profile ``steps`` calls of ``call()``, already warm (compiled, captured): a step is one call.
    ``sequence_of``: a category (:data:`CATEGORIES`) whose kernels' times are also kept one by one, in launch
    order (:attr:`StepProfile.sequence`)."""
    reset_peak_memory(device)
    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    walls = []
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with Timer(device) as timer:
                call()
            walls.append(timer.elapsed_s)
    rows = _device_events(prof, on_gpu)
    categories: dict[str, float] = {}
    launches: dict[str, float] = {}
    for name, us, calls in rows:
        category = categorize(name)
        categories[category] = categories.get(category, 0.0) + us / 1e3 / steps
        launches[category] = launches.get(category, 0.0) + calls / steps
    top = sorted(rows, key=lambda r: -r[1])[:top_n]
    return StepProfile(
        device=str(device), steps=steps, tokens_per_step=tokens_per_step,
        wall_ms=1e3 * sorted(walls)[len(walls) // 2], busy_ms=sum(categories.values()), collate_ms=collate_ms,
        peak_mem_gib=peak_memory_gib(device),
        categories=dict(sorted(categories.items(), key=lambda kv: -kv[1])),
        top=tuple({"name": n[:160], "category": categorize(n), "ms": us / 1e3 / steps, "calls": c / steps}
                  for n, us, c in top),
        launches={k: launches[k] for k in sorted(launches, key=lambda k: -categories[k])},
        sequence=_sequence(prof, on_gpu, sequence_of, steps) if sequence_of else (),
    )


def time_by_launch(sequence: Sequence[float], launches: Sequence[tuple[str, int]],
                   bandwidth: float | None) -> list[dict[str, Any]]:
    """Kernel time against bytes read, per kind of launch: :attr:`StepProfile.sequence` (ms, launch order) beside
    what each of those launches is, ``(name, bytes it reads)`` in the same order.

    Returns:
        One row per name, in first-launch order: launches a step, ms a step, us a launch, bytes a launch, and
        (with ``bandwidth``, bytes/s) the share of it those bytes took; ``[]`` when the two do not pair up
        one to one.
    """
    if not sequence or len(sequence) != len(launches):
        return []
    rows: dict[str, dict[str, Any]] = {}
    for ms, (name, nbytes) in zip(sequence, launches, strict=True):
        row = rows.setdefault(name, {"launch": name, "per_step": 0, "ms": 0.0, "bytes": 0})
        row["per_step"] += 1
        row["ms"] += ms
        row["bytes"] += nbytes
    for row in rows.values():
        row["us_each"] = 1e3 * row["ms"] / row["per_step"]
        row["bytes_each"] = row.pop("bytes") // row["per_step"]
        row["bandwidth_fraction"] = (row["bytes_each"] * row["per_step"] / (row["ms"] / 1e3) / bandwidth
                                     if bandwidth and row["ms"] > 0 else None)
    return list(rows.values())


def format_profile(label: str, p: StepProfile) -> str:
    """A plain-text table of one profile, for the terminal."""
    lines = [f"{label}: {p.tokens_per_step:,} real tokens, wall {p.wall_ms:.1f} ms/step, "
             f"{'kernels' if p.device.startswith('cuda') else 'operators'} {p.busy_ms:.1f} ms, "
             f"host-bound {p.host_bound_ms:.1f} ms, collate {p.collate_ms:.1f} ms, peak "
             f"{'n/a' if p.peak_mem_gib is None else f'{p.peak_mem_gib:.1f} GiB'}"]
    for category, ms in p.categories.items():
        lines.append(f"  {category:<28} {ms:9.1f} ms  {100 * ms / max(p.busy_ms, 1e-9):5.1f}%  "
                     f"x{p.launches.get(category, 0):.0f}")
    lines.append("  heaviest:")
    for row in p.top:
        lines.append(f"    {row['ms']:8.1f} ms  x{row['calls']:<6.0f} {row['category']:<24} {row['name'][:90]}")
    return "\n".join(lines)


def save_profiles(path: str | Path, profiles: dict[str, StepProfile], meta: dict[str, Any]) -> Path:
    """Write ``{"meta": ..., "profiles": {label: profile}}`` as JSON (``meta`` carries the fingerprint)."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = {"meta": meta, "profiles": {k: v.to_dict() for k, v in profiles.items()}}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1))
    tmp.replace(out)
    return out
