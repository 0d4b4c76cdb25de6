"""Model FLOPs of a QLoRA step and MFU against datasheet and measured peaks.

Model FLOPs count the work the model needs, not what the kernels did: a frozen 4-bit base needs no
weight gradients, so a token costs 2 x (linear weights) forward plus 2 x backward for the activation
gradients; the LM head runs only where a loss is taken (answer-only loss: one position per example);
the embedding lookup is no matmul; attention counts each packed example's own causal square, not
the row's block-diagonal mask. Recompute (gradient checkpointing) is not model work and is left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class DatasheetPeak:
    """A vendor's published dense (no sparsity) tensor-core peak for one accelerator."""

    name: str  # as the fingerprint's gpu_name contains it
    bf16_flops_per_s: float
    fp16_flops_per_s: float
    source: str


# Dense bf16/fp16 matrix peaks from the vendors' datasheets (sparsity figures halved away).
# Matched by substring of torch's device name, most specific first.
DATASHEET_PEAKS: tuple[DatasheetPeak, ...] = (
    DatasheetPeak("H100 PCIe", 756e12, 756e12, "NVIDIA H100 Tensor Core GPU datasheet (PCIe: 1,513 TF sparse)"),
    DatasheetPeak("H100 NVL", 835e12, 835e12, "NVIDIA H100 Tensor Core GPU datasheet (NVL: 1,671 TF sparse)"),
    DatasheetPeak("H100", 989.4e12, 989.4e12, "NVIDIA H100 Tensor Core GPU datasheet (SXM: 1,979 TF sparse)"),
    DatasheetPeak("H200", 989.4e12, 989.4e12, "NVIDIA H200 Tensor Core GPU datasheet (SXM: 1,979 TF sparse)"),
    DatasheetPeak("A100", 312e12, 312e12, "NVIDIA A100 Tensor Core GPU datasheet (624 TF sparse)"),
    DatasheetPeak("L40S", 362.05e12, 362.05e12, "NVIDIA L40S datasheet (733 TF sparse)"),
    DatasheetPeak("MI250X", 383e12, 383e12, "AMD Instinct MI250X datasheet"),
    DatasheetPeak("MI250", 362.1e12, 362.1e12, "AMD Instinct MI250 datasheet"),
    DatasheetPeak("MI300X", 1307.4e12, 1307.4e12, "AMD Instinct MI300X datasheet (2,614.9 TF sparse)"),
    DatasheetPeak("MI325X", 1307.4e12, 1307.4e12, "AMD Instinct MI325X datasheet (2,614.9 TF sparse)"),
)


def datasheet_peak(gpu_name: str | None) -> DatasheetPeak | None:
    """The datasheet entry whose name ``gpu_name`` contains, or None (a CPU, an unlisted card)."""
    if not gpu_name:
        return None
    return next((p for p in DATASHEET_PEAKS if p.name in gpu_name), None)


def datasheet_mfu(flops_per_s: float | None, gpu_name: str | None,
                  dtype: str) -> tuple[float | None, dict[str, Any] | None]:
    """MFU against the card's datasheet peak for the compute dtype, and that peak as records save it.

    The one place a dtype picks its datasheet rate, called once per throughput by
    :meth:`medqa_core.results.measurements.TrainThroughput.from_steps`, which builds it for run records
    (engine/train.py) and bench cases (bench/bench_train.py) alike.

    Args:
        flops_per_s: model FLOPs per second of the timed steps (None: not measured).
        gpu_name: the card's name (:func:`medqa_core.measure.device.gpu_name`); None on CPU.
        dtype: the short compute dtype ("bf16", "fp16", "fp32"); fp32 has no tensor-core datasheet rate.

    Returns:
        (mfu, peak): both None where the card is not listed or the dtype has no rate; else the fraction
        (None without FLOPs) and the :class:`DatasheetPeak` fields with ``dtype`` added.
    """
    peak = datasheet_peak(gpu_name)
    rate = {"bf16": peak.bf16_flops_per_s, "fp16": peak.fp16_flops_per_s}.get(dtype) if peak else None
    if not rate:
        return None, None
    return (flops_per_s / rate if flops_per_s else None), {**asdict(peak), "dtype": dtype}


@dataclass(frozen=True)
class ModelShape:
    """The sizes the FLOP count needs, read from a transformers config."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        return cls(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, getattr(config, "num_key_value_heads", None) or
                   config.num_attention_heads, config.vocab_size)

    @property
    def linear_params_per_layer(self) -> int:
        head_dim = self.hidden // self.heads
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * head_dim  # q, o; k, v
        return attn + 3 * self.hidden * self.intermediate  # gate, up, down


def train_step_flops(shape: ModelShape, example_lengths: Sequence[int], labelled_tokens: int) -> float:
    """Model FLOPs of one QLoRA step on examples of ``example_lengths`` tokens (see the module doc).

    Args:
        shape: the model's sizes.
        example_lengths: real tokens of each example (each attends only to itself, packed or padded).
        labelled_tokens: positions with a loss, where the LM head runs.
    """
    tokens = sum(example_lengths)
    linear = 4 * shape.layers * shape.linear_params_per_layer * tokens  # forward 2, activation gradients 2
    head = 4 * shape.hidden * shape.vocab * labelled_tokens
    # Causal attention of one example of L tokens: QK^T and AV, 2 * L^2 * hidden each, halved by the
    # mask; backward twice the forward.
    attention = 3 * shape.layers * sum(2 * length * length * shape.hidden for length in example_lengths)
    return float(linear + head + attention)
