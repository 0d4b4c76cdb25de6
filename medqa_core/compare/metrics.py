"""The metric registry: every performance figure's key, label, unit, kind and better direction.

Gate, charts, tables and docs read this list; none keeps its own.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEED, MEMORY = "speed", "memory"


@dataclass(frozen=True)
class MetricSpec:
    """One performance figure.

    Attributes:
        key: its name in summaries and gate checks ("train_tokens_per_s").
        label: how tables and charts name it ("train tokens/s").
        unit: "tokens/s", "s", "GiB", "x", or "" for a fraction (printed as %).
        kind: "speed" (gated as a rate), "memory" (gated as a peak), or "info" (shown, not gated).
        higher_is_better: the better direction.
    """

    key: str
    label: str
    unit: str
    kind: str
    higher_is_better: bool


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("train_tokens_per_s", "train tokens/s", "tokens/s", SPEED, True),
    MetricSpec("mfu", "train MFU", "", "info", True),
    MetricSpec("step_time_s", "train step time (median)", "s", "info", False),
    MetricSpec("peak_mem_gib", "peak device memory", "GiB", MEMORY, False),
    MetricSpec("host_rss_gib", "host RSS (peak)", "GiB", MEMORY, False),
    MetricSpec("prefill_tokens_per_s", "prefill tokens/s", "tokens/s", SPEED, True),
    MetricSpec("decode_tokens_per_s", "decode tokens/s", "tokens/s", SPEED, True),
    MetricSpec("decode_compiled_tokens_per_s", "decode tokens/s (torch.compile)", "tokens/s", SPEED, True),
    MetricSpec("ttft_s", "time to first token", "s", "info", False),
    MetricSpec("questions_per_s", "scoring questions/s", "questions/s", SPEED, True),
    MetricSpec("speedup_vs_reference", "train speedup vs reference arm", "x", "info", True),
)
BY_KEY = {m.key: m for m in METRICS}
SPEED_KEYS = tuple(m.key for m in METRICS if m.kind == SPEED)
MEMORY_KEYS = tuple(m.key for m in METRICS if m.kind == MEMORY)


def label(key: str) -> str:
    """The metric's label, or the key itself for a figure the registry does not know."""
    spec = BY_KEY.get(key)
    return spec.label if spec else key


def unit(key: str) -> str:
    """The metric's unit ("" for a fraction or an unknown key)."""
    spec = BY_KEY.get(key)
    return spec.unit if spec else ""


def format_value(value: float, unit: str) -> str:
    """A figure as tables and charts print it: "" is a fraction (as %), "s" prints as ms."""
    if unit == "":
        return f"{100 * value:.1f}%"
    if unit == "s":
        return f"{1000 * value:,.1f} ms"
    if unit == "x":
        return f"{value:.2f}x"
    if abs(value) >= 100:
        return f"{value:,.0f} {unit}"
    return f"{value:.3g} {unit}"
