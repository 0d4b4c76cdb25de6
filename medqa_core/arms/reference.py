"""The reference arm: the QLoRA recipe the common guides give, trained on the same examples as ours.

The recipe: transformers ``AutoModelForCausalLM`` with ``BitsAndBytesConfig`` NF4 (double quant,
bf16 compute), sdpa attention; peft ``prepare_model_for_kbit_training(model,
use_gradient_checkpointing=True)`` (which also upcasts the non-quantized weights to fp32); LoRA
r16, alpha 32, dropout 0.05 on all linear layers; AdamW; batches right-padded to the longest
example with an attention mask and labels -100 on pads and prompt; the loss from full-vocabulary
logits through ``model(input_ids, attention_mask, labels)`` under bf16 autocast, as
``TrainingArguments(bf16=True)`` runs it. Where the device has no native bf16 the recipe follows the
run's ``--dtype`` as a guide's user would: ``fp16=True`` (with a gradient scaler) on such a GPU, fp32 on
such a CPU.

It differs from ours (``medqa_core.engine.train``) where the guides differ: ours leaves out the fp32 upcast,
recomputes no layers (or, in a memory-capped profile, only some), packs examples instead of padding,
and runs the LM head only at labelled positions. ``bench/`` times
both on one batch to report ours' speedup.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medqa_core.engine.attention import AttentionChoice, detect_kernel, resolve_attention
from medqa_core.engine.config import LoraSettings, RunConfig
from medqa_core.engine.data import IGNORE_INDEX, TrainExample
from medqa_core.engine.model import (
    QuantInfo,
    add_lora,
    load_base_model,
    load_tokenizer,
    quant_info,
    resolve_model_dir,
)
from medqa_core.engine.numerics import Numerics, autocast, resolve_numerics
from medqa_core.measure.device import resolve_device

logger = logging.getLogger(__name__)

# The guides' fixed hyper-parameters; not taken from RunConfig, whose LoRA settings are ours to change.
REFERENCE_LORA = LoraSettings(rank=16, alpha=32, dropout=0.05, target_modules=("all-linear",))
REFERENCE_ATTN = "sdpa"


@dataclass
class ReferenceArm:
    """The guides' QLoRA model, in train mode, with its optimizer and collator."""

    model: Any  # peft model over the kbit-prepared base
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    collator: Any  # transformers DataCollatorForSeq2Seq
    device: torch.device
    model_dir: Path
    attention: AttentionChoice
    kernel_ran: str
    quant: QuantInfo
    numerics: Numerics
    scaler: torch.amp.GradScaler  # enabled for fp16 only, as Trainer's fp16=True
    gradient_checkpointing: bool = True


def load_reference(cfg: RunConfig, device: torch.device | None = None) -> ReferenceArm:
    """Load the model of ``cfg`` (preset or folder) the way the common QLoRA guides do.

    Args:
        cfg: which weights (``cfg.model.preset``/``path``), learning rate and weight decay; its
            quantization, attention and LoRA settings are ignored: the recipe fixes them.
        device: where to put the model; default ``cfg.backend`` resolved.

    Returns:
        The arm, in train mode (``from_pretrained`` hands back eval mode, which would silently
        turn gradient checkpointing and dropout off).

    Raises:
        ModelLoadError: the folder is unusable or bitsandbytes is missing.
    """
    from peft import prepare_model_for_kbit_training
    from transformers import DataCollatorForSeq2Seq

    device = device or resolve_device(cfg.backend)
    model_dir = resolve_model_dir(cfg.model)
    tokenizer = load_tokenizer(model_dir)
    tokenizer.padding_side = "right"  # the guides pad training batches on the right
    attention = resolve_attention(REFERENCE_ATTN)
    numerics = resolve_numerics(cfg.model.dtype, device)
    # The same from_pretrained call the guides write: NF4, double quant, bf16 compute, sdpa.
    recipe = dataclasses.replace(cfg.model, quant="nf4", attn=REFERENCE_ATTN, nf4_blocksize=None,
                                 nf4_double_quant=True, nf4_quant_storage="uint8")
    base = load_base_model(model_dir, recipe, device, attention.attn_implementation, numerics.torch_dtype)
    quant = quant_info(base)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    base.config.use_cache = False  # the guides' line: no KV cache while training with checkpointing
    model = add_lora(base, REFERENCE_LORA)  # LoraConfig(task_type="CAUSAL_LM") + get_peft_model
    # Train mode before any forward: on CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight
    # the first time an eval-mode layer sees a no-grad input, and the repacked kernel has no autograd.
    model.train()
    probe = torch.tensor([tokenizer("Question: which kernel ran?\nAnswer:")["input_ids"]], device=device)
    kernel_ran = detect_kernel(model, probe, attention,
                               autocast_dtype=None if numerics.torch_dtype == torch.float32 else numerics.torch_dtype)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                      return_tensors="pt")
    logger.info("reference arm %s on %s, attention sdpa ran as %s", model_dir, device, kernel_ran)
    scaler = torch.amp.GradScaler(device.type, enabled=numerics.torch_dtype == torch.float16)
    return ReferenceArm(model, tokenizer, optimizer, collator, device, model_dir, attention, kernel_ran, quant,
                        numerics, scaler)


def collate_reference(arm: ReferenceArm, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
    """The guides' batch: right-padded to the longest example, on the arm's device.

    The labels are those of ``data.encode_train`` (so the same ``loss_on`` rule as ours); pads get
    ``IGNORE_INDEX``.

    Returns:
        ``input_ids``, ``attention_mask`` and ``labels``, each [B, T].
    """
    features = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    batch = arm.collator(features)
    return {k: batch[k].to(arm.device) for k in ("input_ids", "attention_mask", "labels")}


def reference_step(arm: ReferenceArm, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One optimizer step of the reference recipe.

    Args:
        arm: from :func:`load_reference`.
        batch: from :func:`collate_reference`.

    Returns:
        The step's loss, still on the device (reading it is the caller's sync point).
    """
    with autocast(arm.device, arm.numerics):  # as TrainingArguments(bf16=True)
        # transformers shifts the labels and takes the mean over non -100 positions of the
        # full [B, T, V] logits.
        loss = arm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss
    arm.scaler.scale(loss).backward()
    arm.scaler.step(arm.optimizer)
    arm.scaler.update()
    arm.optimizer.zero_grad(set_to_none=True)
    return loss.detach()
