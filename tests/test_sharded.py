"""FSDP2 of the 4-bit base (`train --shard fsdp`): 2 gloo ranks against one process, the 70B shape on paper,
and the settings it refuses in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import assert_same_curve, run_cli, train_argv
from safetensors.torch import load_file

from medqa_core.cli import main
from medqa_core.engine.config import PRESET_COMMON, PRESETS
from medqa_core.engine.sharded import BaseWeightSize
from medqa_core.measure.flops import ModelShape

pytestmark = pytest.mark.slow  # real multi-process or full-bench runs: the full suite only

GIB = 2**30


def test_two_fsdp_ranks_train_as_two_ddp_ranks(tiny_model_dir, tmp_path, one_process, two_ddp_ranks):
    job = run_cli(train_argv(tiny_model_dir, tmp_path, "--shard", "fsdp", "--nf4-quant-storage", "bf16"), nproc=2)
    two, ddp = job.train, two_ddp_ranks.train
    # Each rank computes what it computes under DDP, on the same 4-bit values (stored in bf16 here, uint8 there),
    # and the gradients are averaged over two ranks either way: the same curve and adapter, to the bit.
    assert two.world_size == 2 and two.tokens == ddp.tokens
    assert two.loss_per_step == ddp.loss_per_step
    assert_same_curve(one_process.train.loss_per_step, two.loss_per_step)
    ours, theirs = (load_file(Path(r.adapter_dir) / "adapter_model.safetensors") for r in (job, two_ddp_ranks))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)  # gathered whole
    parallel = two.parallel
    assert parallel["strategy"] == "fsdp2" and parallel["groups"] == 3  # 2 decoder layers and the decoder
    # Each rank holds half of the sharded weights, and the LM head (32000 x 64 in bf16 here) whole.
    head_gib = PRESET_COMMON["vocab_size"] * 64 * 2 / GIB
    assert parallel["weights_gib_per_rank"] == pytest.approx((parallel["weights_gib"] - head_gib) / 2 + head_gib,
                                                             rel=0.02)


def test_fsdp_refuses_uint8_storage_before_anything_starts(tiny_model_dir, tmp_path, capsys):
    code = main(train_argv(tiny_model_dir, tmp_path, "--shard", "fsdp", "--nproc", "2"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "pass --nf4-quant-storage bf16" in err


@pytest.mark.parametrize("extra, words", [
    ((), "pass --nproc 2 or more"),  # one process: nothing to shard over
    (("--nproc", "2", "--checkpoint-dir", "ckpt"), "does not write or resume checkpoints"),
])
def test_fsdp_refuses_what_it_does_not_do_in_one_line(tiny_model_dir, tmp_path, capsys, extra, words):
    code = main(train_argv(tiny_model_dir, tmp_path, "--shard", "fsdp", "--nf4-quant-storage", "bf16", *extra))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and words in err and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_the_70b_shape_builds_and_needs_sharding_on_24_gib_cards():
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(**{**PRESET_COMMON, "sliding_window": None, **PRESETS["mistral-70b-shape"]})
    with torch.device("meta"):  # shapes only: no memory
        model = MistralForCausalLM(config)
    shape = ModelShape.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())
    norms = (2 * shape.layers + 1) * shape.hidden
    assert n_params == shape.layers * shape.linear_params_per_layer + 2 * shape.vocab * shape.hidden + norms
    assert 68e9 < n_params < 70e9
    size = BaseWeightSize.estimate(shape)
    # More than a 24 GiB card holds; a half of it (FSDP over 2 ranks) less. It fits one 80 GiB GPU: sharding
    # a 70B QLoRA base is for smaller cards, or for room to batch.
    assert 24 < size.gib < 80 and size.per_rank_gib(2) < 24


def test_weight_size_estimate_matches_the_loaded_4bit_layers(tiny_session):
    import bitsandbytes as bnb

    measured = 0
    for module in tiny_session.model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w, state = module.weight, module.weight.quant_state
            measured += w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
            if state.nested:
                measured += state.state2.absmax.numel() * state.state2.absmax.element_size()
    estimate = BaseWeightSize.estimate(ModelShape.from_config(tiny_session.model.config)).quantized_bytes
    assert estimate == pytest.approx(measured, rel=0.01)
