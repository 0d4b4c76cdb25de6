"""FSDP2 of the 4-bit base (``train --shard fsdp``), for a model whose weights do not fit one device.

Each rank keeps 1/world_size of every decoder layer and all-gathers a layer just before it runs (forward,
and again in the backward). Each decoder layer is one ``fully_shard`` group (its 4-bit weights, norms and
LoRA weights); the decoder itself (embeddings, final norm) is the root group. The LM head stays whole on
every rank: the loss calls it outside the decoder's forward, at labelled positions only
(``train.token_losses``), where FSDP would not gather it.

The bitsandbytes 4-bit weights are sharded as stored, as bitsandbytes' FSDP-QLoRA guide and Answer.AI's
fsdp_qlora do: a float storage dtype (``--nf4-quant-storage bf16``) holding the packed 4-bit values. FSDP2
all-gathers a group whose parameters have several dtypes as raw bytes, so those values arrive unchanged;
no ``MixedPrecisionPolicy(param_dtype=...)`` is set, because casting would rewrite them as if they were
numbers (bitsandbytes#1945, accelerate#3983). A gathered weight is a plain tensor again; bitsandbytes'
``Linear4bit.forward`` puts the layer's quant_state back on it from the module (its path for FSDP).
Gradients (LoRA's only) are reduce-scattered and averaged over ranks, as DDP averages them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from medqa_core.engine.config import RunConfig
from medqa_core.engine.model import decoder_layers
from medqa_core.measure.flops import ModelShape

logger = logging.getLogger(__name__)


class ShardError(ValueError):
    """``--shard fsdp`` asked for something it does not do (yet)."""


def check_sharding(cfg: RunConfig, kind: str, world_size: int, checkpointing: bool) -> None:
    """Refuse, before the model loads, what ``--shard fsdp`` cannot run.

    Raises:
        ShardError: not under torchrun with 2+ processes, a job that scores (rank 0 scores alone, which a
            sharded model cannot), or checkpoints (the optimizer state is sharded; not written yet).
    """
    if cfg.train.shard != "fsdp":
        return
    if world_size < 2:
        raise ShardError("--shard fsdp splits the model over processes: pass --nproc 2 or more (or run torchrun)")
    if kind != "train":
        raise ShardError(f"--shard fsdp trains only: use `medqa-parity train`, not {kind!r} (scoring runs on "
                         "rank 0 alone, which a sharded model cannot)")
    if checkpointing:
        raise ShardError("--shard fsdp does not write or resume checkpoints yet (the optimizer state is sharded): "
                         "drop --checkpoint-dir and --resume")


def shard_model(model: Any, device: torch.device) -> dict[str, Any]:
    """Shard ``model``'s decoder layers and decoder over the default process group, in place (FSDP2).

    Call it before the optimizer is made: FSDP2 replaces each parameter with a sharded one.

    Returns:
        What was sharded, for the record (see :func:`sharding_info`).
    """
    from torch.distributed.fsdp import fully_shard

    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    fully_shard(base.get_decoder())
    info = sharding_info(model)
    logger.info("FSDP2: %d groups sharded over the ranks on %s; LM head replicated", info["groups"], device)
    return info


def is_sharded(model: Any) -> bool:
    """True once :func:`shard_model` has run on ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def sharding_info(model: Any) -> dict[str, Any]:
    """How ``model`` is sharded: FSDP2 groups, and the bytes of weights each rank holds against the whole."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    local = whole = 0
    for p in model.parameters():
        part = p.to_local() if isinstance(p, DTensor) else p
        local += part.numel() * part.element_size()
        whole += p.numel() * p.element_size()
    return {"strategy": "fsdp2", "groups": sum(isinstance(m, FSDPModule) for m in model.modules()),
            "replicated": ["lm_head"], "weights_gib_per_rank": local / 2**30, "weights_gib": whole / 2**30}


def full_trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """The trainable (LoRA) weights gathered whole, by parameter name, on CPU; every rank must call it."""
    from torch.distributed.tensor import DTensor

    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
            for name, p in model.named_parameters() if p.requires_grad}


@dataclass(frozen=True)
class BaseWeightSize:
    """Bytes of a QLoRA base model's weights, from its shape alone (no weights are made).

    The decoder's linear layers are 4-bit (bitsandbytes: half a byte per weight plus a scale per block;
    double quantization stores each scale as one byte plus an fp32 scale per 256 of them), the rest
    (embeddings, norms, LM head) is in a 2-byte compute dtype.
    """

    quantized_bytes: float  # the 4-bit linear weights with their scales
    sharded_plain_bytes: float  # embeddings and norms, which FSDP shards
    replicated_bytes: float  # the LM head, whole on every rank

    @classmethod
    def estimate(cls, shape: ModelShape, blocksize: int = 64, double_quant: bool = True) -> BaseWeightSize:
        n = shape.layers * shape.linear_params_per_layer
        scale_bytes = (1 + 4 / 256) if double_quant else 4
        norms = (2 * shape.layers + 1) * shape.hidden
        return cls(n / 2 + n / blocksize * scale_bytes, 2.0 * (shape.vocab * shape.hidden + norms),
                   2.0 * shape.vocab * shape.hidden)

    @property
    def gib(self) -> float:
        return (self.quantized_bytes + self.sharded_plain_bytes + self.replicated_bytes) / 2**30

    def per_rank_gib(self, world_size: int) -> float:
        """What each of ``world_size`` ranks holds under :func:`shard_model`."""
        return ((self.quantized_bytes + self.sharded_plain_bytes) / world_size + self.replicated_bytes) / 2**30
