from __future__ import annotations

import json
import shutil

import pytest
import torch

from medqa_core.engine.config import ModelConfig
from medqa_core.engine.model import (
    ModelLoadError,
    _fill_seeded,
    check_model_dir,
    load_base_model,
    quant_info,
)


def test_missing_folder_and_folder_without_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="model folder not found"):
        check_model_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"no weights \(\*\.safetensors\)"):
        check_model_dir(tmp_path)


def test_pickle_only_folder_is_refused_unless_allowed(tmp_path, tiny_model_dir):
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="only pickle weights.*--allow-pickle"):
        check_model_dir(tmp_path)
    assert check_model_dir(tmp_path, allow_pickle=True) == tmp_path


def test_nf4_settings_are_read_back_from_a_layer(tiny_model_dir):
    model = load_base_model(tiny_model_dir, ModelConfig(path=str(tiny_model_dir)), torch.device("cpu"), "sdpa",
                            torch.bfloat16)
    info = quant_info(model)
    # bitsandbytes 0.50 default blocksize on CPU and CUDA is 64 (128 on ROCm CDNA GPUs).
    assert (info.method, info.quant_type, info.blocksize, info.double_quant) == ("bnb-nf4", "nf4", 64, True)
    assert info.compute_dtype == "bfloat16"
    plain = load_base_model(tiny_model_dir, ModelConfig(path=str(tiny_model_dir), quant="none"),
                            torch.device("cpu"), "sdpa", torch.bfloat16)
    assert quant_info(plain).method == "none" and quant_info(plain).weight_dtype == "bfloat16"


def test_seeded_weights_depend_only_on_seed_and_name():
    def make(seed):
        m = torch.nn.ModuleDict({"a": torch.nn.Linear(8, 8), "norm": torch.nn.LayerNorm(8)})
        _fill_seeded(m, seed, std=0.02)
        return m

    a, b, c = make(1), make(1), make(2)
    assert torch.equal(a["a"].weight, b["a"].weight)
    assert not torch.equal(a["a"].weight, c["a"].weight)
    assert torch.all(a["norm"].weight == 1.0)
    assert 0.01 < float(a["a"].weight.std()) < 0.03


def test_preset_folder_holds_safetensors_and_real_tokenizer(tiny_model_dir):
    assert list(tiny_model_dir.glob("*.safetensors"))
    cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "LlamaTokenizer"
