"""Tests for medqa_core.arms.reference: the guides' QLoRA recipe, on the tiny Mistral of tests/conftest.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medqa_core.arms.reference import REFERENCE_LORA, collate_reference, load_reference, reference_step
from medqa_core.engine.config import RunConfig, TrainConfig
from medqa_core.engine.data import IGNORE_INDEX, MedQAItem, collate, encode_train
from medqa_core.engine.train import answer_loss

ITEMS = [
    MedQAItem("q:1", "A 23-year-old woman has a fever. Which drug is best?",
              ("Ampicillin", "Ceftriaxone", "Doxycycline", "Nitrofurantoin"), 1),
    MedQAItem("q:2", "Which nerve is injured in a fracture of the humeral shaft?",
              ("Radial nerve", "Ulnar nerve", "Median nerve", "Axillary nerve"), 0),
]


@pytest.fixture
def arm(tiny_config: RunConfig):  # a fresh arm per test: training changes it
    torch.manual_seed(0)
    cfg = dataclasses.replace(tiny_config, train=TrainConfig(lr=1e-2, packing=False))
    return load_reference(cfg, torch.device("cpu"))


@pytest.fixture
def examples(arm):
    return [encode_train(arm.tokenizer, item, 1024, "answer") for item in ITEMS]


def test_recipe_is_the_guides(arm) -> None:
    base = arm.model.get_base_model()
    assert arm.model.training  # from_pretrained's eval mode would turn checkpointing and dropout off
    assert base.model.gradient_checkpointing
    assert base.config.use_cache is False
    # prepare_model_for_kbit_training upcasts the weights it does not quantize.
    assert base.get_input_embeddings().weight.dtype == torch.float32
    assert (arm.quant.method, arm.quant.double_quant, arm.quant.compute_dtype) == ("bnb-nf4", True, "bfloat16")
    lora = arm.model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (REFERENCE_LORA.rank, REFERENCE_LORA.alpha, 0.05)
    assert isinstance(arm.optimizer, torch.optim.AdamW)
    assert arm.kernel_ran.startswith("sdpa")


def test_collate_pads_right_with_mask_and_ignored_labels(arm, examples) -> None:
    batch = collate_reference(arm, examples)
    lengths = [e.n_tokens for e in examples]
    assert batch["input_ids"].shape == batch["labels"].shape == (2, max(lengths))
    for row, e in enumerate(examples):
        n = e.n_tokens
        assert batch["input_ids"][row, :n].tolist() == list(e.input_ids)
        assert batch["labels"][row, :n].tolist() == list(e.labels)  # the same loss_on rule as ours
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()


def test_full_vocab_loss_equals_answer_loss(arm, examples) -> None:
    # LoRA's B starts at zero, so dropout cannot change either loss; train mode keeps bitsandbytes'
    # CPU inference repacking out of the way.
    padded = collate(examples, arm.tokenizer.pad_token_id)
    batch = collate_reference(arm, examples)
    with torch.no_grad():
        theirs = arm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
        ours = answer_loss(arm.model, padded["input_ids"], padded["labels"])
    torch.testing.assert_close(theirs, ours, rtol=1e-3, atol=1e-3)


def test_step_trains_the_first_layer_too(arm, examples) -> None:
    batch = collate_reference(arm, examples)
    losses = [reference_step(arm, batch).item() for _ in range(6)]
    assert losses[-1] < losses[0]
    # B of the first layer's adapter only moves if the gradient came back through every layer above it.
    first_b = arm.model.get_base_model().model.layers[0].self_attn.q_proj.lora_B["default"].weight
    assert first_b.abs().sum() > 0
