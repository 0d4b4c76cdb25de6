"""--dtype: the choice per device and CPU, what it runs, and that fp32 and bf16 score alike on the tiny model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medqa_core.engine.config import ConfigError, ModelConfig
from medqa_core.engine.data import load_medqa
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.model import quant_info
from medqa_core.engine.numerics import DtypeError, autocast, resolve_numerics
from medqa_core.engine.session import load_session
from medqa_core.measure.device import cpu_has_native_bf16, relevant_cpu_flags

CPU = torch.device("cpu")
AVX2_EPYC = frozenset({"fpu", "sse2", "avx", "avx2", "fma", "f16c"})  # an AMD EPYC 7003's flags, abridged
SAPPHIRE_RAPIDS = AVX2_EPYC | {"avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}
GRAVITON3 = frozenset({"fp", "asimd", "sve", "bf16", "i8mm"})


@pytest.mark.parametrize(("flags", "expected"), [(AVX2_EPYC, "float32"), (SAPPHIRE_RAPIDS, "bfloat16")])
def test_auto_follows_the_cpus_bf16_support(flags: frozenset[str], expected: str, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    numerics = resolve_numerics("auto", CPU, cpu_flags=flags)
    assert numerics.compute_dtype == expected
    assert numerics.reason.startswith("auto: ")
    assert ("no native bf16" in numerics.reason) == (expected == "float32")


def test_torch_capped_at_avx2_runs_bf16_emulated_even_on_a_bf16_cpu(monkeypatch) -> None:
    # ATEN_CPU_CAPABILITY=avx2 on a Sapphire Rapids: torch's AVX2 kernels convert bf16 element by element.
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS, "AVX512")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert not cpu_has_native_bf16(SAPPHIRE_RAPIDS, "AVX2")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    numerics = resolve_numerics("auto", CPU, cpu_flags=SAPPHIRE_RAPIDS)
    assert numerics.compute_dtype == "float32" and "AVX2 kernels" in numerics.reason


def test_arm_bf16_flag_counts_as_native() -> None:
    assert cpu_has_native_bf16(GRAVITON3, "SVE256")


def test_explicit_dtype_wins_and_says_so(caplog) -> None:
    numerics = resolve_numerics("bf16", CPU, cpu_flags=AVX2_EPYC)
    assert numerics.compute_dtype == "bfloat16" and numerics.reason.startswith("--dtype bf16 although")
    assert "emulated" in caplog.text
    assert resolve_numerics("fp32", CPU, cpu_flags=SAPPHIRE_RAPIDS).compute_dtype == "float32"
    assert resolve_numerics("fp16", CPU, cpu_flags=SAPPHIRE_RAPIDS).torch_dtype == torch.float16


def test_unknown_dtype_is_refused_by_name() -> None:
    with pytest.raises(DtypeError, match="unknown --dtype 'fp8'"):
        resolve_numerics("fp8", CPU)
    with pytest.raises(ConfigError, match="unknown --dtype 'fp8'"):
        ModelConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="--nf4-blocksize 100"):
        ModelConfig(nf4_blocksize=100)


def test_fingerprint_flags_keep_only_what_decides_kernels() -> None:
    assert relevant_cpu_flags(SAPPHIRE_RAPIDS | {"sse4_2", "aes"}) == sorted(
        {"avx2", "fma", "f16c", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})


def test_fp32_autocast_is_plain_fp32() -> None:
    fp32 = resolve_numerics("fp32", CPU)
    a = torch.randn(4, 4)
    with autocast(CPU, fp32):
        assert (a @ a).dtype == torch.float32
    with autocast(CPU, resolve_numerics("bf16", CPU)):
        assert (a @ a).dtype == torch.bfloat16


@pytest.fixture(scope="module")
def questions(tmp_path_factory):
    from medqa_core.engine.data import bundled_data_dir, find_split

    return load_medqa(find_split(bundled_data_dir(), "test"), limit=24)


def _scores(tiny_config, questions, **model):
    cfg = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, **model))
    session = load_session(cfg)
    result = evaluate(session.model, session.tokenizer, questions, cfg.eval, CPU, session.attention, "test",
                      numerics=session.numerics)
    return session, torch.tensor([q.logprobs for q in result.questions])


def test_fp32_and_bf16_score_the_same_model_alike(tiny_config, questions) -> None:
    fp32_session, fp32 = _scores(tiny_config, questions, dtype="fp32", quant="none")
    bf16_session, bf16 = _scores(tiny_config, questions, dtype="bf16", quant="none")
    assert fp32_session.numerics.compute_dtype == "float32" and quant_info(fp32_session.model).weight_dtype == "float32"
    assert bf16_session.numerics.compute_dtype == "bfloat16"
    # The same weights (saved in bf16, so fp32 holds them exactly): the dtypes differ by rounding alone.
    # bf16 keeps 8 bits of mantissa; over 2 layers and a 32k log-softmax that is within 0.1 nats here,
    # while the scores themselves spread over several nats, so agreement is not vacuous.
    assert (fp32 - bf16).abs().max() < 0.1
    assert (fp32 - bf16).abs().max() > 0  # the two paths really ran in different dtypes
    assert fp32.std() > 0.05


def test_nf4_blocksize_128_quantizes_again_from_the_checkpoint(tiny_config, questions) -> None:
    default, default_scores = _scores(tiny_config, questions)
    wide, wide_scores = _scores(tiny_config, questions, nf4_blocksize=128)
    assert quant_info(default.model).blocksize == 64 and quant_info(wide.model).blocksize == 128
    # Larger blocks share one scale over more weights: a coarser quantization, so the scores move...
    assert not torch.equal(default_scores, wide_scores)
    # ...by quantization noise only (against the spread of the scores themselves).
    assert (default_scores - wide_scores).abs().mean() < 0.5 * default_scores.std()
    again, again_scores = _scores(tiny_config, questions, nf4_blocksize=64)  # the default asked for by name
    assert torch.equal(again_scores, default_scores)


def test_fp16_training_runs_with_a_gradient_scaler(tiny_config, tmp_path) -> None:
    """fp16 (GPUs without bf16: V100, T4, MI100) trains through a GradScaler; its record says fp16 ran."""
    from medqa_core.engine.config import TrainConfig
    from medqa_core.run import execute

    cfg = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, dtype="fp16"),
                              train=TrainConfig(max_steps=3, batch_size=4, lr=1e-2), results_dir=str(tmp_path))
    record, path = execute(cfg, kind="train", adapter_out=str(tmp_path / "adapter"))
    assert record.numerics["compute_dtype"] == "float16" and record.numerics["reason"] == "--dtype fp16"
    assert record.model["quantization"]["compute_dtype"] == "float16"
    losses = record.train.loss_per_step
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    from medqa_core.engine.train import make_scaler

    assert make_scaler(CPU, resolve_numerics("fp16", CPU)).is_enabled()
    assert not make_scaler(CPU, resolve_numerics("bf16", CPU)).is_enabled()


def test_a_step_the_fp16_scaler_skips_leaves_the_schedule_where_it_was() -> None:
    """fp16's first steps may overflow at the scaler's initial 65536x: that step is skipped, and the LR schedule must
    not move on without it (torch warns "lr_scheduler.step() before optimizer.step()" when it does)."""
    import warnings

    from medqa_core.engine.attention import resolve_attention
    from medqa_core.engine.train import make_scaler, train_step

    class Overflowing(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels, position_ids):  # per-token losses [N]
            return (self.w * 1e38).expand(2)  # finite, but not once the scaler multiplies it

    model = Overflowing()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    scaler = make_scaler(CPU, resolve_numerics("fp16", CPU))
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_step(model, optimizer, scheduler, batch, CPU, resolve_attention("sdpa"), scaler=scaler)
    assert scaler.get_scale() < 65536.0 and torch.equal(model.w.detach(), torch.ones(1))  # the step was skipped
    assert scheduler.last_epoch == 0 and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 / 5)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
