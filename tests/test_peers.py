"""Peer arms (medqa_core.arms.peers): the same objective as ours, patches undone, skips saved with their reason.

Every arm starts from LoRA B = 0, so before any step each one computes the base model's loss on the
batch. The model is the tiny Mistral with weights drawn at std 0.3 instead of 0.02, so its logits
are far from uniform (loss ~13 nats, not ln 32000 = 10.4) and a wrong target shows; the tests check
the losses agree within a tolerance set by the compute dtype:

- fp32: 1e-5 relative, summation order only (padded full-vocabulary logits vs packed rows and the LM
  head at labelled positions). Measured on this CPU, reference vs ours: 1.4e-7.
- bf16: 5e-3 relative. bf16 keeps 8 significant bits (up to 2^-9, 0.2%, per rounding); the reference
  upcasts norms, embeddings and LM head to fp32 (peft's prepare_model_for_kbit_training) where ours
  keeps bf16, and Liger's fused linear cross entropy and RMSNorm/SwiGLU kernels round in other places
  than transformers' modules. Measured on this CPU (AVX512-BF16), reference vs ours: 0.19% on the
  three answer tokens, 0.018% over every token.

:func:`test_tolerance_tells_objectives_apart` shows that other objectives on the same prompts fall
outside it: other answer letters move this loss by 1.4%, a loss on every token instead of the answer
by 2.5% (measured), against 0.5% allowed in bf16 and 0.001% in fp32.

Liger's kernels are Triton (GPU only): its test runs where CUDA or ROCm and liger-kernel are present.
Unsloth's runs in a child process, since ``import unsloth`` patches transformers for the whole process.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import without_xdist

from medqa_core.arms.peers import (
    UNSLOTH_NOT_IN_EXTRA,
    GlobalPatch,
    PeerUnavailable,
    installed_version,
    load_liger,
    load_peer,
    patch_mistral,
)
from medqa_core.arms.reference import collate_reference, load_reference
from medqa_core.engine.config import RunConfig, TrainConfig
from medqa_core.engine.data import MedQAItem, collate_packed, encode_train
from medqa_core.engine.numerics import Numerics, autocast
from medqa_core.engine.session import load_session
from medqa_core.engine.train import answer_loss

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)  # tests/conftest.py's TINY
ITEMS = [
    MedQAItem("q:1", "A 23-year-old woman has a fever. Which drug is best?",
              ("Ampicillin", "Ceftriaxone", "Doxycycline", "Nitrofurantoin"), 1),
    MedQAItem("q:2", "Which nerve is injured in a fracture of the humeral shaft?",
              ("Radial nerve", "Ulnar nerve", "Median nerve", "Axillary nerve"), 0),
    MedQAItem("q:3", "A 60-year-old man has crushing chest pain radiating to the left arm for an hour. "
                     "Which test comes first?",
              ("Troponin", "Electrocardiogram", "Chest X-ray", "Echocardiogram"), 1),
]
GPU = torch.cuda.is_available()
LIGER = installed_version("liger-kernel") is not None
UNSLOTH = installed_version("unsloth") is not None


def rtol_for(numerics: Numerics) -> float:
    """The loss tolerance of the module docstring for this compute dtype."""
    return 1e-5 if numerics.short == "fp32" else 5e-3


@pytest.fixture(scope="module")
def sharp_config(tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    """tests/conftest.py's tiny Mistral with std-0.3 weights (see the module docstring), as a RunConfig on CPU."""
    from transformers import MistralConfig, MistralForCausalLM

    from medqa_core.engine.config import PRESET_COMMON, ModelConfig
    from medqa_core.engine.model import save_preset_tokenizer

    folder = tmp_path_factory.mktemp("sharp-mistral")
    torch.manual_seed(0)
    config = MistralConfig(**{**PRESET_COMMON, "sliding_window": None, **TINY_MODEL, "initializer_range": 0.3})
    MistralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    save_preset_tokenizer(folder)
    return RunConfig(model=ModelConfig(path=str(folder)), train=TrainConfig(batch_size=4), backend="cpu")


def _dropout_off(model: torch.nn.Module) -> None:
    # Train mode stays on (Liger's forward takes its fused loss only in training), dropout does not.
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.eval()


def arm_loss(arm: Any, batch: dict[str, torch.Tensor]) -> float:
    """The loss a reference-style arm's step would take on ``batch`` (model(..., labels).loss), no step."""
    _dropout_off(arm.model)
    with autocast(arm.device, arm.numerics):
        return arm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"]).loss.float().item()


def ours_loss(cfg: RunConfig, device: torch.device, loss_on: str,
              items: Sequence[MedQAItem] = ITEMS) -> tuple[float, Numerics]:
    """Ours' step loss (token_losses' mean, packed rows as the loop collates them) on a fresh session."""
    session = load_session(cfg, device=device)
    examples = [encode_train(session.tokenizer, item, 1024, loss_on) for item in items]
    batch = collate_packed(examples, session.tokenizer.pad_token_id, cfg.train.pack_len)
    _dropout_off(session.model)
    with autocast(device, session.numerics):
        loss = answer_loss(session.model, batch["input_ids"].to(device), batch["labels"].to(device),
                           batch["position_ids"].to(device))
    return loss.float().item(), session.numerics


def reference_loss(cfg: RunConfig, device: torch.device, loss_on: str) -> tuple[float, Numerics]:
    arm = load_reference(cfg, device)
    examples = [encode_train(arm.tokenizer, item, 1024, loss_on) for item in ITEMS]
    return arm_loss(arm, collate_reference(arm, examples)), arm.numerics


@pytest.mark.parametrize("dtype", ["auto", "fp32"])
@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_reference_loss_equals_ours(sharp_config: RunConfig, loss_on: str, dtype: str) -> None:
    cfg = dataclasses.replace(sharp_config, model=dataclasses.replace(sharp_config.model, dtype=dtype))
    cpu = torch.device("cpu")
    ours, numerics = ours_loss(cfg, cpu, loss_on)
    theirs, ref_numerics = reference_loss(cfg, cpu, loss_on)
    assert numerics == ref_numerics  # the reference follows the run's --dtype
    assert ours == pytest.approx(theirs, rel=rtol_for(numerics))


def test_tolerance_tells_objectives_apart(sharp_config: RunConfig) -> None:
    cpu = torch.device("cpu")
    right, numerics = ours_loss(sharp_config, cpu, "answer")
    # Each question's target letter moved to the next option; the loss on every token instead of the answer.
    moved = [dataclasses.replace(item, answer_idx=(item.answer_idx + 1) % 4) for item in ITEMS]
    for wrong in (ours_loss(sharp_config, cpu, "answer", moved)[0], ours_loss(sharp_config, cpu, "all")[0]):
        assert abs(wrong - right) / right > 2 * rtol_for(numerics)


def test_patch_is_undone() -> None:
    from transformers.models.mistral import modeling_mistral as mm

    before = (mm.apply_rotary_pos_emb, mm.MistralRMSNorm, mm.MistralMLP, mm.MistralForCausalLM.forward)
    had_ce = hasattr(mm, "CrossEntropyLoss")

    def fake_liger() -> None:  # rebinds what apply_liger_kernel_to_mistral rebinds, and adds a name
        mm.apply_rotary_pos_emb = lambda *a, **k: None
        mm.MistralRMSNorm = type("LigerRMSNorm", (torch.nn.Module,), {})
        mm.MistralForCausalLM.forward = lambda self, *a, **k: None
        mm.CrossEntropyLoss = object()

    patch, changed = patch_mistral(fake_liger)
    try:
        # MistralMLP is saved but was not touched; CrossEntropyLoss was replaced or added.
        assert sorted(changed) == ["CrossEntropyLoss", "MistralForCausalLM.forward", "MistralRMSNorm",
                                   "apply_rotary_pos_emb"]
    finally:
        patch.undo()
    assert (mm.apply_rotary_pos_emb, mm.MistralRMSNorm, mm.MistralMLP, mm.MistralForCausalLM.forward) == before
    assert hasattr(mm, "CrossEntropyLoss") == had_ce
    assert "forward" in mm.MistralForCausalLM.__dict__  # transformers' own, back on the class
    assert patch.changed() == []


def test_patch_failing_midway_is_undone() -> None:
    from transformers.models.mistral import modeling_mistral as mm

    original = mm.MistralMLP

    def broken() -> None:
        mm.MistralMLP = object
        raise RuntimeError("kernel import failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        patch_mistral(broken)
    assert mm.MistralMLP is original


def test_global_patch_removes_added_class_attribute() -> None:
    class Model:
        pass

    class Module:
        pass

    saved = GlobalPatch.save(Module, Model, ["added"], ["forward"])
    Module.added = 1
    Model.forward = lambda self: 1
    assert sorted(saved.changed()) == ["Model.forward", "added"]
    saved.undo()
    assert not hasattr(Module, "added") and "forward" not in Model.__dict__


@pytest.mark.skipif(GPU, reason="checks the reason given on a machine without a GPU")
def test_peers_without_gpu_say_why(tiny_config: RunConfig) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(PeerUnavailable) as liger:
        load_liger(tiny_config, cpu)
    assert liger.value.reason == ("liger-kernel is not installed (pip install -e \".[peers]\")" if not LIGER else
                                  f"liger-kernel {installed_version('liger-kernel')}'s kernels are Triton; this "
                                  "run's device is cpu, not a CUDA or ROCm GPU")
    with pytest.raises(PeerUnavailable) as unsloth:
        load_peer("unsloth", tiny_config, cpu)
    assert (unsloth.value.reason == UNSLOTH_NOT_IN_EXTRA) is not UNSLOTH
    with pytest.raises(KeyError, match="unknown peer 'axolotl'"):
        load_peer("axolotl", tiny_config, cpu)


@pytest.mark.skipif(not GPU, reason="Liger Kernel's kernels are Triton: they need a CUDA or ROCm GPU")
@pytest.mark.skipif(not LIGER, reason='liger-kernel is not installed (pip install -e ".[peers]")')
@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_liger_loss_equals_reference_and_ours(sharp_config: RunConfig, loss_on: str) -> None:
    from transformers.models.mistral import modeling_mistral as mm

    gpu = torch.device("cuda")
    cfg = dataclasses.replace(sharp_config, backend="cuda")
    reference, numerics = reference_loss(cfg, gpu, loss_on)  # before the patch
    forward = mm.MistralForCausalLM.forward
    arm = load_liger(cfg, gpu)
    try:
        assert arm.modules.get("LigerRMSNorm") and arm.modules.get("LigerSwiGLUMLP")
        assert "MistralForCausalLM.forward" in arm.patched
        examples = [encode_train(arm.reference.tokenizer, item, 1024, loss_on) for item in ITEMS]
        liger = arm_loss(arm.reference, arm.collate(examples))
    finally:
        arm.close()
    assert mm.MistralForCausalLM.forward is forward  # ours below runs unpatched
    ours, _ = ours_loss(cfg, gpu, loss_on)
    assert liger == pytest.approx(reference, rel=rtol_for(numerics))
    assert liger == pytest.approx(ours, rel=rtol_for(numerics))


_UNSLOTH_CHILD = """
import json, sys, torch
from medqa_core.engine.config import ModelConfig, RunConfig
from medqa_core.engine.data import MedQAItem, encode_train
from medqa_core.arms.peers import load_unsloth
items = [MedQAItem(row[0], row[1], tuple(row[2]), row[3]) for row in json.loads(sys.argv[2])]
arm = load_unsloth(RunConfig(model=ModelConfig(path=sys.argv[1]), backend="cuda"), torch.device("cuda"))
arm.model.train()
for m in arm.model.modules():
    if isinstance(m, torch.nn.Dropout):
        m.eval()
batch = arm.collate([encode_train(arm.tokenizer, item, 1024, sys.argv[3]) for item in items])
with torch.autocast("cuda", dtype=arm.numerics.torch_dtype):
    loss = arm.model(**batch).loss.float().item()
print(json.dumps({"loss": loss, "version": arm.unsloth_version}))
"""


@pytest.mark.skipif(not GPU, reason="this arm measures Unsloth's GPU path (CUDA or ROCm)")
@pytest.mark.skipif(not UNSLOTH, reason=UNSLOTH_NOT_IN_EXTRA)
@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_unsloth_loss_equals_reference(sharp_config: RunConfig, loss_on: str) -> None:
    gpu = torch.device("cuda")
    cfg = dataclasses.replace(sharp_config, backend="cuda")
    reference, numerics = reference_loss(cfg, gpu, loss_on)
    rows = json.dumps([[i.qid, i.question, list(i.options), i.answer_idx] for i in ITEMS])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _UNSLOTH_CHILD, str(cfg.model.path), rows, loss_on], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    unsloth = json.loads(proc.stdout.strip().splitlines()[-1])["loss"]
    assert unsloth == pytest.approx(reference, rel=rtol_for(numerics))


# ---- bench cases: pytest-in-pytest on the tiny preset ---------------------------------------------

TINY = ["--preset", "tiny", "--bench-batch-size", "2", "--bench-seq-len", "32", "--questions", "6",
        "--train-rounds", "2", "--warmup-rounds", "1", "--train-profiles", "eager", "--peer-batch-size", "3"]


@pytest.fixture(scope="module")
def peer_bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One bench run of the reference, ours and the peers; GPUs hidden, so every real peer is unavailable,
    and the ``fake_liger`` plugin runs the liger case through the reference under a no-op patch."""
    out = tmp_path_factory.mktemp("peer-bench")
    paths = [str(ROOT / "tests"), str(ROOT), os.environ.get("PYTHONPATH")]
    env = {**without_xdist(os.environ), "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "CUDA_VISIBLE_DEVICES": "", "HIP_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "pytest", str(ROOT / "bench"), *TINY, "-p", "no:cacheprovider", "-rs",
           "-p", "fake_liger", "-k", "peer or test_train_reference or test_train_ours or test_train_profile",
           f"--benchmark-storage=file://{out / 'storage'}", "--benchmark-save=peers"]
    proc = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"bench run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    saved = list((out / "storage").glob("*/0001_peers.json"))
    assert len(saved) == 1
    run = json.loads(saved[0].read_text())
    return {"cases": {b["name"]: b["extra_info"] for b in run["benchmarks"]}, "order": [b["name"] for b in
            run["benchmarks"]], "stdout": proc.stdout}


@pytest.mark.slow
def test_missing_peer_is_a_saved_skip_with_its_reason(peer_bench: dict[str, Any], tiny_config: RunConfig) -> None:
    cases = peer_bench["cases"]
    for stack in ("unsloth", "torchtune"):
        info = cases[f"test_train_peer[{stack}]"]
        with pytest.raises(PeerUnavailable) as expected:
            load_peer(stack, tiny_config, torch.device("cpu"))
        # The saved file carries the loader's own reason, and pytest reports the case skipped with it.
        assert info["skipped_reason"] == expected.value.reason
        assert (info["arm"], info["stack"], info["ran"], info["backend"]) == ("peer", stack, False, "cpu")
        assert "throughput" not in info  # no figures from a case that did not run
        assert expected.value.reason.split(";")[0] in peer_bench["stdout"]
    assert not UNSLOTH or "unsloth" not in cases["test_train_peer[unsloth]"]["skipped_reason"]


def test_peer_case_has_the_train_figures(peer_bench: dict[str, Any]) -> None:
    cases = peer_bench["cases"]
    reference, ours = cases["test_train_reference"], cases["test_train_ours[sdpa]"]
    liger, big = cases["test_train_peer[liger]"], cases["test_train_peer[liger-batch]"]
    for info in (liger, big):
        assert info["ran"] is True and "skipped_reason" not in info
        assert info["throughput"]["tokens_per_s"] == pytest.approx(sum(info["tokens_per_round"])
                                                                   / sum(info["round_times_s"]))
        assert len(info["loss_per_round"]) == info["timed_rounds"] == 2
        assert info["speedup_vs_reference"] == pytest.approx(info["throughput"]["tokens_per_s"]
                                                             / reference["throughput"]["tokens_per_s"])
        assert info["reference_batch_size"] == 2 and info["stack_version"] == "fake (no-op patch)"
        assert info["quantization"]["method"] == "bnb-nf4" and info["attention"]["ran"].startswith("sdpa")
    # Same batches as the reference at the same batch size; the fake patch changed nothing, so the same loss.
    assert liger["tokens_per_round"] == reference["tokens_per_round"]
    # The same objective; not the same number: LoRA A starts from another draw per load and the dropout masks
    # differ, which matter once the warm-up step has moved B off zero.
    assert liger["loss_per_round"][0] == pytest.approx(reference["loss_per_round"][0], rel=1e-2)
    # Ours' cases of batch 2 (default and eager); the fastest is the headline.
    speedups = liger["ours_speedups_over_this_peer"]
    assert set(speedups) == {"test_train_ours[sdpa]", "test_train_profile[sdpa-eager]"}
    assert speedups["test_train_ours[sdpa]"] == pytest.approx(ours["throughput"]["tokens_per_s"]
                                                              / liger["throughput"]["tokens_per_s"])
    assert liger["ours_speedup_over_this_peer"] == max(speedups.values())
    assert liger["ours_case"] == max(speedups, key=speedups.__getitem__)
    # liger-batch at --peer-batch-size 3, where ours ran no case: no ratio claimed.
    assert big["batch_size"] == 3 and big["ours_speedup_over_this_peer"] is None
    assert big["ours_speedups_over_this_peer"] == {}


def test_peers_run_after_ours_and_the_reference(peer_bench: dict[str, Any]) -> None:
    order = peer_bench["order"]
    peers = [name for name in order if name.startswith("test_train_peer")]
    assert peers == [f"test_train_peer[{p}]" for p in ("liger", "liger-batch", "torchtune", "unsloth")]
    assert order[-len(peers):] == peers  # nothing of ours or the reference after a patching peer


def test_unsloth_first_without_unsloth_installed_still_collects_the_peer_cases() -> None:
    """MEDQA_UNSLOTH_FIRST=1 (the evidence script's unsloth session) imports unsloth before transformers only where
    it is installed; elsewhere the session runs and the arm records its skip, as without the variable."""
    if importlib.util.find_spec("unsloth") is not None:
        pytest.skip("unsloth is installed here: importing it would patch this process's transformers")
    env = {**os.environ, "MEDQA_UNSLOTH_FIRST": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench" / "bench_peers.py"), "--collect-only",
                           "-q", "-p", "no:cacheprovider", "-k", "unsloth"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "bench_peers.py::test_train_peer[unsloth]" in done.stdout
