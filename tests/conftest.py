"""Shared fixtures: a tiny Mistral (2 layers, hidden 64) saved like a user's model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medqa_core.config import PRESET_COMMON, EvalConfig, ModelConfig, RunConfig, TrainConfig

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

QUESTION = {
    "question": "A 23-year-old woman has a fever. Which drug is best?",
    "answer": "Ceftriaxone",
    "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
    "meta_info": "step2&3",
    "answer_idx": "B",
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mistral with the real Mistral tokenizer, saved as safetensors to a temp folder."""
    from transformers import MistralConfig, MistralForCausalLM

    from medqa_core.model import save_preset_tokenizer

    folder = tmp_path_factory.mktemp("tiny-mistral")
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**PRESET_COMMON, "sliding_window": None, **TINY}))
    model.to(torch.bfloat16).save_pretrained(folder)
    save_preset_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return RunConfig(
        model=ModelConfig(path=str(tiny_model_dir)),
        train=TrainConfig(max_steps=4, batch_size=4, timing_warmup_steps=1),
        eval=EvalConfig(batch_size=4),
        backend="cpu",  # CPU tests, also on a GPU machine
        results_dir=str(tmp_path_factory.mktemp("results")),
    )


@pytest.fixture(scope="session")
def tiny_session(tiny_config: RunConfig):
    from medqa_core.run import load_session

    return load_session(tiny_config)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts or raw strings) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path
