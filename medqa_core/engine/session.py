"""A model loaded for a job: the base (preset or folder) quantized, LoRA attached, attention resolved and the
kernel that runs it detected once. What ``run``, ``trace`` and ``bench/`` load their model through."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medqa_core.engine.attention import AttentionChoice, detect_kernel, resolve_attention
from medqa_core.engine.config import RunConfig
from medqa_core.engine.model import (
    QuantInfo,
    add_lora,
    load_adapter,
    load_base_model,
    load_tokenizer,
    quant_info,
    resolve_model_dir,
)
from medqa_core.engine.numerics import Numerics, resolve_numerics
from medqa_core.measure.device import resolve_device

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """A model loaded and ready: LoRA attached, attention resolved and checked once."""

    config: RunConfig
    device: torch.device
    model_dir: Path
    tokenizer: Any
    model: Any
    attention: AttentionChoice
    kernel_ran: str
    quant: QuantInfo
    numerics: Numerics


def load_session(cfg: RunConfig, adapter_dir: str | None = None, device: torch.device | None = None,
                 trust_remote_code: bool = False) -> Session:
    """Load the base model (preset or folder), quantize it, attach LoRA (new or saved).

    Args:
        trust_remote_code: run a model folder's own code (its config.json ``auto_map``); refused otherwise.
    """
    device = device or resolve_device(cfg.backend)
    attention = resolve_attention(cfg.model.attn)
    numerics = resolve_numerics(cfg.model.dtype, device)
    model_dir = resolve_model_dir(cfg.model, trust_remote_code)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    base = load_base_model(model_dir, cfg.model, device, attention.attn_implementation, numerics.torch_dtype,
                           trust_remote_code)
    quant = quant_info(base)
    if adapter_dir:
        model = load_adapter(base, adapter_dir)
    else:
        torch.manual_seed(cfg.train.seed)  # LoRA A's initialisation: the same adapter start on every run
        model = add_lora(base, cfg.lora)
    ids = tokenizer("Question: which kernel ran?\nAnswer:")["input_ids"]
    # Two prompts in one row when packing: the masked path that training and scoring actually take.
    packed = cfg.train.packing or cfg.eval.packing
    probe = torch.tensor([ids + ids if packed else ids], device=device)
    positions = torch.tensor([list(range(len(ids))) * 2], device=device) if packed else None
    kernel_ran = detect_kernel(model, probe, attention, positions,
                               None if numerics.torch_dtype == torch.float32 else numerics.torch_dtype)
    logger.info("model %s on %s, attention %s ran as %s, compute %s (%s)", model_dir, device, attention.requested,
                kernel_ran, numerics.compute_dtype, numerics.reason)
    return Session(cfg, device, model_dir, tokenizer, model, attention, kernel_ran, quant, numerics)
