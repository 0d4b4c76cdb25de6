"""Tests for medqa_core.measure.ceilings: measured ceilings, decode bytes per token, the energy meter."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from medqa_core.engine.config import LoraSettings, ModelConfig
from medqa_core.engine.model import add_lora, load_base_model, quant_info
from medqa_core.measure.ceilings import (
    EnergyMeter,
    measure_copy_bandwidth,
    measure_matmul_flops,
    weight_bytes_per_token,
)

CPU = torch.device("cpu")
# tests/conftest.py's TINY Mistral: hidden 64, intermediate 128, 4 heads of 16, 2 KV heads, 2 layers.
HIDDEN, INTER, KV_DIM, LAYERS, VOCAB = 64, 128, 32, 2, 32000
LINEARS = [(64, 64), (KV_DIM, 64), (KV_DIM, 64), (64, 64), (INTER, 64), (INTER, 64), (64, INTER)]  # (out, in)


def test_matmul_flops_is_a_rate() -> None:
    flops = measure_matmul_flops(CPU, n=256, reps=3)
    assert math.isfinite(flops) and flops > 1e6  # 2 * 256^3 FLOP in well under 30 s


def test_copy_bandwidth_is_a_rate() -> None:
    bandwidth = measure_copy_bandwidth(CPU, nbytes=2**22, reps=3)
    assert math.isfinite(bandwidth) and bandwidth > 1e6


def test_energy_meter_unavailable_on_cpu() -> None:
    with EnergyMeter(CPU) as meter:
        assert not meter.available
        assert meter.source == "unavailable"
        assert "cpu" in meter.reason
        with pytest.raises(RuntimeError, match="unavailable"):
            meter.read_j()


def test_weight_bytes_per_token_counts_packed_nf4(tiny_model_dir: Path) -> None:
    model = load_base_model(tiny_model_dir, ModelConfig(path=str(tiny_model_dir)), CPU, "sdpa", torch.bfloat16)
    quant = quant_info(model)
    assert quant.double_quant  # the expected sum below assumes nested absmax
    per_layer = 0
    for out_f, in_f in LINEARS:
        blocks = out_f * in_f // quant.blocksize
        per_layer += out_f * in_f // 2  # two 4-bit codes per byte
        per_layer += blocks  # uint8 absmax, one per block
        per_layer += 4 * math.ceil(blocks / quant.double_quant_blocksize)  # fp32 absmax of the absmax
    per_layer += 2 * HIDDEN * 2  # two bf16 RMSNorm weights
    expected = LAYERS * per_layer + HIDDEN * 2 + HIDDEN * 2 + VOCAB * HIDDEN * 2  # final norm, one embedding row, head
    assert weight_bytes_per_token(model) == expected

    # LoRA adapters are read every token too: r x (in + out) fp32 weights per adapted linear.
    lora = LoraSettings(rank=4, alpha=8, dropout=0.0)
    wrapped = add_lora(model, lora)
    extra = LAYERS * sum(lora.rank * (out_f + in_f) * 4 for out_f, in_f in LINEARS)
    assert weight_bytes_per_token(wrapped) == expected + extra
