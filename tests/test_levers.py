"""The training levers: named profiles, selective recompute, torch.compile with its fall-back, the profiler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medqa_core.compiling import CompileState, compile_layers, uncompile_layers, with_eager_fallback
from medqa_core.config import ConfigError, LoraSettings, TrainConfig, memory_cap_gib, train_profile
from medqa_core.data import collate_packed, encode_train, load_medqa
from medqa_core.model import add_lora, decoder_layers, load_base_model, set_checkpointing
from medqa_core.numerics import resolve_numerics
from medqa_core.profiler import OTHER, categorize, profile_steps
from medqa_core.train import StepLoss, make_optimizer, prepare_training, train_step

CPU = torch.device("cpu")
NUMERICS = resolve_numerics("auto", CPU)  # bf16 where this CPU has it, else fp32


def test_profile_spec_applies_overrides_and_names_bad_keys() -> None:
    capped = train_profile("capped+batch_size=4+checkpoint_layers=1+compile=off")
    assert (capped.batch_size, capped.checkpoint_layers, capped.compile, capped.gradient_checkpointing) == \
        (4, 1, "off", True)
    assert memory_cap_gib("capped+batch_size=4") == 24.0 and memory_cap_gib("max-speed") is None
    assert train_profile("default") == TrainConfig()
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        train_profile("fast")
    with pytest.raises(ConfigError, match="'lr=1' is not KEY=VALUE"):
        train_profile("capped+lr=1")
    with pytest.raises(ConfigError, match="batch_size"):
        train_profile("capped+batch_size=many")
    with pytest.raises(ConfigError, match="unknown compile setting"):
        train_profile("capped+compile=yes")
    with pytest.raises(ConfigError, match="needs gradient_checkpointing"):
        TrainConfig(checkpoint_layers=2)


@pytest.fixture()
def fresh_model(tiny_config):
    """A tiny NF4 + LoRA model with dropout off (so two paths can be compared exactly), its batch."""
    from medqa_core.model import load_tokenizer

    model_dir = tiny_config.model.path
    torch.manual_seed(0)
    base = load_base_model(model_dir, tiny_config.model, CPU, "sdpa", NUMERICS.torch_dtype)
    model = add_lora(base, dataclasses.replace(LoraSettings(), dropout=0.0))
    tok = load_tokenizer(model_dir)
    return model, tok


def _batch(tok, tmp_path, n=3):
    from conftest import QUESTION, write_jsonl

    items = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION] * n))
    batch = collate_packed([encode_train(tok, it, 512) for it in items], tok.pad_token_id, 1024)
    batch.pop("n_tokens")
    return batch


def _losses_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    losses = StepLoss(model, NUMERICS)(batch["input_ids"], batch["labels"], batch["position_ids"])
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def test_selective_checkpointing_flags_the_first_layers_and_keeps_gradients(fresh_model, tmp_path) -> None:
    model, tok = fresh_model
    batch = _batch(tok, tmp_path)
    losses, grads = _losses_and_grads(model, batch)
    assert set_checkpointing(model, True, 1) == 1
    assert [layer.gradient_checkpointing for layer in decoder_layers(model)] == [True, False]
    ck_losses, ck_grads = _losses_and_grads(model, batch)
    torch.testing.assert_close(ck_losses, losses)
    assert ck_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:  # recomputing the forward gives the same gradients
        torch.testing.assert_close(ck_grads[name], grads[name])
    assert set_checkpointing(model, False) == 0
    assert not any(layer.gradient_checkpointing for layer in decoder_layers(model))


def test_auto_compile_stays_eager_on_cpu(fresh_model) -> None:
    model, _ = fresh_model
    state = compile_layers(model, CPU, "auto")
    assert not state.ran and "GPUs only" in state.detail
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert compile_layers(model, CPU, "off").detail == "off"


def test_compiled_layers_give_the_eager_losses(fresh_model, tmp_path) -> None:
    # The lever changes how the math runs, not the math: same per-example losses and gradients, to bf16 noise.
    model, tok = fresh_model
    batch = _batch(tok, tmp_path)
    losses, grads = _losses_and_grads(model, batch)
    state = compile_layers(model, CPU, "on")
    try:
        assert state.ran, state.detail
        c_losses, c_grads = _losses_and_grads(model, batch)
    finally:
        uncompile_layers(model)
    torch.testing.assert_close(c_losses, losses, rtol=2e-2, atol=2e-2)
    for name in grads:
        torch.testing.assert_close(c_grads[name], grads[name], rtol=5e-2, atol=5e-3)


class BackendCompilerFailed(RuntimeError):
    """Stands for torch._dynamo's error of that name (its module is what marks a compile error)."""


BackendCompilerFailed.__module__ = "torch._dynamo.exc"


def test_compile_failure_falls_back_to_eager_visibly(fresh_model, tmp_path) -> None:
    model, tok = fresh_model
    batch = _batch(tok, tmp_path)
    optimizer, scheduler = make_optimizer(model, TrainConfig())
    state = CompileState(requested="on", ran=True, detail="inductor")
    for layer in decoder_layers(model):
        layer._compiled_call_impl = lambda *a, **k: (_ for _ in ()).throw(BackendCompilerFailed("no compiler"))
    restored = []
    step_loss = StepLoss(model, NUMERICS)
    step = with_eager_fallback(lambda: train_step(step_loss, optimizer, scheduler, batch, CPU, _attention()),
                               model, state, lambda: restored.append(True))
    loss = step()
    assert loss > 0 and restored == [True]
    assert not state.ran and "BackendCompilerFailed: no compiler" in state.detail
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))


def test_other_errors_are_not_swallowed_by_the_fallback(fresh_model) -> None:
    model, _ = fresh_model
    state = CompileState(requested="on", ran=True, detail="inductor")

    def boom() -> float:
        raise ValueError("a bug in the step")

    with pytest.raises(ValueError, match="a bug"):
        with_eager_fallback(boom, model, state, lambda: None)()
    assert state.ran


def _attention():
    from medqa_core.attention import resolve_attention

    return resolve_attention("sdpa")


def test_profiler_groups_operators_and_times_the_step(fresh_model, tmp_path) -> None:
    assert categorize("void kDequantizeBlockwise<__nv_bfloat16>") == "dequantize 4-bit"
    assert categorize("nvjet_sm90_tst_128x248_64x4_2x1_v_bz_coopA_NNT") == "matmul"
    assert categorize("cudnn_generated_fort_native_sdpa_sm90_flash_bprop") == "attention"
    assert categorize("triton_poi_fused_add_mul_silu_0") == "fused by torch.compile"
    assert categorize("multi_tensor_apply_kernel<AdamFunctor>") == "optimizer"
    assert categorize("vectorized_elementwise_kernel<4, CUDAFunctor_add>") == OTHER
    model, tok = fresh_model
    from conftest import QUESTION, write_jsonl

    items = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION] * 2))
    examples = [encode_train(tok, it, 512) for it in items]
    trainer = prepare_training(model, TrainConfig(), CPU, _attention(), tok.pad_token_id, NUMERICS)
    p = profile_steps(trainer, examples, CPU, steps=1, warmup=0)
    assert p.tokens_per_step == sum(e.n_tokens for e in examples)
    assert p.wall_ms > 0 and p.busy_ms > 0 and p.peak_mem_gib is None
    assert p.categories.get("matmul", 0) > 0 and p.categories.get("dequantize 4-bit", 0) > 0
    assert abs(sum(p.categories.values()) - p.busy_ms) < 1e-6
    assert p.top and all(row["category"] == categorize(row["name"]) for row in p.top)
