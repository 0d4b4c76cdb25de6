"""The training levers: named profiles, selective recompute, torch.compile with its fall-back, the profiler."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medqa_core.engine.compiling import CompileState, compile_layers, uncompile_layers, with_eager_fallback
from medqa_core.engine.config import (
    CARD_HEADROOM_GIB,
    MEMORY_CAP_GIB,
    NAMED_SETTINGS,
    ConfigError,
    LoraSettings,
    TrainConfig,
    apply_named_settings,
    choose_memory_class,
    memory_cap_gib,
)
from medqa_core.engine.data import collate_packed, encode_train, load_medqa
from medqa_core.engine.model import add_lora, decoder_layers, load_base_model, set_checkpointing
from medqa_core.engine.numerics import resolve_numerics
from medqa_core.engine.train import (
    StepLoss,
    apply_model_settings,
    make_optimizer,
    prepare_training,
    reset_model_settings,
    train_step,
)
from medqa_core.measure.trace import OTHER, categorize, profile_calls, profile_steps, time_by_launch

CPU = torch.device("cpu")
NUMERICS = resolve_numerics("auto", CPU)  # bf16 where this CPU has it, else fp32


def test_profile_spec_applies_overrides_and_names_bad_keys() -> None:
    capped = apply_named_settings("capped+batch_size=4+checkpoint_layers=1+compile=off")
    assert (capped.batch_size, capped.checkpoint_layers, capped.compile, capped.gradient_checkpointing) == \
        (4, 1, "off", True)
    assert memory_cap_gib("capped+batch_size=4") == MEMORY_CAP_GIB["capped"] and memory_cap_gib("eager") is None
    assert apply_named_settings("default") == dataclasses.replace(TrainConfig(), profile="default")
    assert apply_named_settings("lean+lora_dropout=0.1+adamw=fused+activation_budget=0.5").lora_dropout == 0.1
    with pytest.raises(ConfigError, match="unknown profile 'fast'"):
        apply_named_settings("fast")
    with pytest.raises(ConfigError, match="'lr=1' is not KEY=VALUE"):
        apply_named_settings("capped+lr=1")
    with pytest.raises(ConfigError, match="batch_size"):
        apply_named_settings("capped+batch_size=many")
    with pytest.raises(ConfigError, match="unknown compile setting"):
        apply_named_settings("capped+compile=yes")
    with pytest.raises(ConfigError, match="needs gradient_checkpointing"):
        TrainConfig(checkpoint_layers=2)
    with pytest.raises(ConfigError, match="unknown adamw"):
        apply_named_settings("lean+adamw=sgd")
    with pytest.raises(ConfigError, match="activation_budget"):
        TrainConfig(activation_budget=1.5)


def test_the_fastest_memory_class_that_fits_the_card_is_chosen() -> None:
    caps = MEMORY_CAP_GIB
    assert choose_memory_class(None) == "default"  # no GPU
    assert choose_memory_class(79.2) == "max-speed"  # an H100 80GB as torch reports it
    assert choose_memory_class(caps["max-speed"] + CARD_HEADROOM_GIB - 0.1) == "capped"
    assert choose_memory_class(23.6) == "capped"  # a 24 GB card
    assert choose_memory_class(15.6) == "lean"  # a 16 GB card
    assert choose_memory_class(8.0) == "lean"  # smaller than every class: the one that needs least
    # Every class's promise is below the card it is chosen for.
    for card in (8.0, 15.6, 23.6, 79.2, 139.8):
        name = choose_memory_class(card)
        assert name == "lean" or caps[name] + CARD_HEADROOM_GIB <= card


def test_auto_profile_resolves_on_the_device_and_the_record_says_whether_it_held(tiny_config) -> None:
    from medqa_core.run import memory_promise, resolve_auto_settings

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, profile="auto"))
    resolved, why = resolve_auto_settings(cfg, CPU)
    assert resolved.train.profile == "default" and why == "auto: no GPU"
    assert resolved.train.max_steps == tiny_config.train.max_steps  # the flags a profile does not set stay
    assert resolve_auto_settings(tiny_config, CPU) == (tiny_config, None)  # no auto: untouched
    lean = dataclasses.replace(tiny_config, train=apply_named_settings("lean", tiny_config.train))
    held = memory_promise(lean, None, 3.0)
    assert held == {"spec": "lean", "chosen_by": "asked", "memory_cap_gib": MEMORY_CAP_GIB["lean"],
                    "peak_mem_gib": 3.0, "held": True}
    assert memory_promise(lean, "auto: a 15.6 GiB card", MEMORY_CAP_GIB["lean"] + 0.5)["held"] is False
    assert memory_promise(resolved, why, None)["held"] is None  # CPU: no device peak, no promise
    assert memory_promise(tiny_config, None, 1.0) is None


def test_the_memory_promise_is_judged_in_one_place() -> None:
    from medqa_core.engine.config import memory_promise_held

    cap = MEMORY_CAP_GIB["capped"]
    assert memory_promise_held("capped", cap) is True  # at the cap: held
    assert memory_promise_held("capped+batch_size=16", cap + 0.01) is False  # overrides keep the class's promise
    assert memory_promise_held("capped", None) is None  # CPU: no device peak
    assert memory_promise_held("default", 100.0) is None  # no promise made


def test_the_training_attention_is_chosen_and_described_in_one_place() -> None:
    from medqa_core.engine.attention import AttentionError, attention_info, training_attention

    eager = training_attention("eager", CPU)
    assert attention_info(eager, "eager") == {"requested": "eager", "ran": "eager", "attn_implementation": "eager"}
    assert attention_info(training_attention("sdpa-math", CPU), "sdpa-math")["attn_implementation"] == "sdpa"
    with pytest.raises(AttentionError, match="no backward on CPU"):
        training_attention("flex", CPU)


def test_cli_uses_auto_unless_a_profile_setting_is_given() -> None:
    from medqa_core.cli import build_config, build_parser

    parse = build_parser().parse_args
    assert build_config(parse(["run"])).train.profile == "auto"
    assert build_config(parse(["run", "--profile", "auto"])).train.profile == "auto"
    assert build_config(parse(["run", "--batch-size", "4"])).train.profile is None
    assert build_config(parse(["run", "--gradient-checkpointing"])).train.profile is None
    assert build_config(parse(["run", "--lora-dropout", "0.1"])).train.profile is None  # a profile would drop it
    assert build_config(parse(["run", "--attn", "eager"])).train.profile is None  # a profile trains with flex
    assert build_config(parse(["run", "--profile", "lean"])).train.batch_size == NAMED_SETTINGS["lean"]["batch_size"]


@pytest.fixture()
def fresh_model(tiny_config):
    """A tiny NF4 + LoRA model with dropout off (so two paths can be compared exactly), its batch."""
    from medqa_core.engine.model import load_tokenizer

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


@pytest.mark.slow
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
    from medqa_core.engine.attention import resolve_attention

    return resolve_attention("sdpa")


def test_profiler_groups_operators_and_times_the_step(fresh_model, tmp_path) -> None:
    assert categorize("void kDequantizeBlockwise<__nv_bfloat16>") == "dequantize 4-bit"
    assert categorize("void gemm_4bit_simt<__nv_bfloat16, 1>(__nv_bfloat16 const*)") == "4-bit matmul (bitsandbytes)"
    assert categorize("void gemm_4bit_sm80_m16n8k16<__nv_bfloat16, 32, 64, 128>") == "4-bit matmul (bitsandbytes)"
    assert categorize("_nf4_matmul_kernel") == "4-bit matmul (ours)"
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


def test_a_profile_follows_one_category_launch_by_launch() -> None:
    small, large = torch.nn.Linear(8, 8), torch.nn.Linear(512, 512)
    xs, xl = torch.randn(1, 8), torch.randn(256, 512)

    def step() -> None:  # two matmuls a step, the second about 30,000 times the first's work
        small(xs)
        large(xl)

    step()
    p = profile_calls(step, CPU, steps=3, tokens_per_step=1, sequence_of="matmul")
    assert len(p.sequence) == 2 and p.sequence[1] > p.sequence[0] > 0  # aten::linear each, not its aten::addmm too
    assert profile_calls(step, CPU, steps=3, tokens_per_step=1).sequence == ()  # not asked
    assert profile_calls(step, CPU, steps=3, tokens_per_step=1, sequence_of="attention").sequence == ()


def test_kernel_time_is_set_against_the_bytes_of_each_kind_of_launch() -> None:
    launches = [("q+k+v", 100), ("down", 400), ("q+k+v", 100), ("down", 400)]
    rows = time_by_launch([1.0, 2.0, 1.0, 2.0], launches, bandwidth=1e6)
    assert rows == [
        {"launch": "q+k+v", "per_step": 2, "ms": 2.0, "us_each": 1000.0, "bytes_each": 100,
         "bandwidth_fraction": pytest.approx(0.1)},
        {"launch": "down", "per_step": 2, "ms": 4.0, "us_each": 2000.0, "bytes_each": 400,
         "bandwidth_fraction": pytest.approx(0.2)}]
    assert time_by_launch([1.0, 2.0, 1.0], launches, 1e6) == []  # kernels that do not pair up: no row
    assert time_by_launch([1.0, 2.0, 1.0, 2.0], launches, None)[0]["bandwidth_fraction"] is None


@pytest.fixture()
def dropout_model(tiny_config):
    """A tiny NF4 + LoRA model with the default LoRA settings (dropout 0.05), and its tokenizer."""
    from medqa_core.engine.model import load_tokenizer

    model_dir = tiny_config.model.path
    torch.manual_seed(0)
    base = load_base_model(model_dir, tiny_config.model, CPU, "sdpa", NUMERICS.torch_dtype)
    return add_lora(base, LoraSettings()), load_tokenizer(model_dir)


def _lever_batches(tok, tmp_path, steps=6, batch_size=4):
    from medqa_core.engine.data import bundled_data_dir, find_split, iter_batches

    items = load_medqa(find_split(bundled_data_dir(), "dev"), steps * batch_size)
    examples = [encode_train(tok, it, 512) for it in items]
    batches = iter_batches(examples, batch_size, 0)
    return [next(batches)[1] for _ in range(steps)]


def _curve(model, tok, batches, cfg):
    from medqa_core.arms.levers import loss_curve

    return loss_curve(model, batches, cfg, CPU, _attention(), tok.pad_token_id, NUMERICS)


def test_dropout_free_lora_stays_within_the_stated_tolerance_and_restores_the_adapter(dropout_model, tmp_path):
    from peft.tuners.lora import LoraLayer

    from medqa_core.arms.levers import CurveGap
    from medqa_core.engine.model import set_lora_dropout

    model, tok = dropout_model
    batches = _lever_batches(tok, tmp_path)
    base = TrainConfig(lr=1e-3, warmup_steps=1, compile="off")
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    default = _curve(model, tok, batches, base)
    assert _curve(model, tok, batches, base) == default  # the same start, masks and batches: the same curve
    free = _curve(model, tok, batches, dataclasses.replace(base, lora_dropout=0.0))
    gap = CurveGap.between(default, free)
    assert gap.max_abs_diff > 0, "dropping the dropout changed nothing: the lever did not apply"
    assert gap.within_tolerance, gap
    assert all(torch.equal(p, start[n]) for n, p in model.named_parameters() if n in start)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Dropout) for m in layers)  # the adapter's own again
    assert set_lora_dropout(model, 0.0) == len(layers)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)
    set_lora_dropout(model, None)
    assert {m.lora_dropout["default"].p for m in layers} == {LoraSettings().dropout}


def test_fused_adamw_gives_the_foreach_curve(fresh_model, tmp_path):
    from medqa_core.arms.levers import CurveGap
    from medqa_core.engine.train import adamw_fused

    model, tok = fresh_model
    batches = _lever_batches(tok, tmp_path, steps=4)
    base = TrainConfig(lr=1e-3, warmup_steps=1, compile="off")
    assert not adamw_fused(base, CPU) and adamw_fused(dataclasses.replace(base, adamw="fused"), CPU)
    assert adamw_fused(base, torch.device("cuda"))  # auto: fused on a GPU
    optimizer, _ = make_optimizer(model, dataclasses.replace(base, adamw="fused"), CPU)
    assert optimizer.defaults["fused"] is True
    foreach = _curve(model, tok, batches, dataclasses.replace(base, adamw="foreach"))
    fused = _curve(model, tok, batches, dataclasses.replace(base, adamw="fused"))
    gap = CurveGap.between(foreach, fused)
    assert gap.max_abs_diff < 1e-3, gap  # the same update, to rounding


def test_an_activation_budget_applies_to_the_compiles_of_a_training_and_is_reset(fresh_model):
    import torch._functorch.config as functorch_config

    model, _ = fresh_model
    lever = TrainConfig(activation_budget=0.3, compile="off")
    apply_model_settings(model, lever, CPU)
    try:
        assert functorch_config.activation_memory_budget == 0.3  # what backward graphs are partitioned with
    finally:
        reset_model_settings(model)
    assert functorch_config.activation_memory_budget == 1.0


def test_training_attention_switches_without_a_reload_and_back(fresh_model, tmp_path):
    from medqa_core.arms.levers import CurveGap
    from medqa_core.engine.attention import AttentionError, resolve_attention

    model, tok = fresh_model
    batches = _lever_batches(tok, tmp_path, steps=3)
    base = TrainConfig(lr=1e-3, warmup_steps=1, compile="off")
    sdpa = _curve(model, tok, batches, base)
    eager = _curve(model, tok, batches, dataclasses.replace(base, attn="eager"))
    assert model.get_base_model().config._attn_implementation == "sdpa"  # scoring keeps the run's --attn
    gap = CurveGap.between(sdpa, eager)
    assert gap.within_tolerance, gap
    # Flex attention has no backward on CPU: one clear error before any step, naming what to use.
    with pytest.raises(AttentionError, match="no backward on CPU.*max-speed\\+attn=sdpa"):
        prepare_training(model, dataclasses.replace(base, attn="flex"), CPU, resolve_attention("sdpa"),
                         tok.pad_token_id, NUMERICS)
    assert model.get_base_model().config._attn_implementation == "sdpa"
