"""Peer arms: the fine-tuning stacks users pick for speed, on the same model folder and examples as ours.

Each arm is a small dataclass with a loader, ``collate`` and ``step``, like the reference arm
(``medqa_core.arms.reference``), so ``bench/bench_peers.py`` times every stack the same way:

- ``liger``: the reference recipe with Liger Kernel's Mistral patch (RoPE, RMSNorm, SwiGLU, fused
  linear cross entropy) applied before loading. ``apply_liger_kernel_to_mistral`` rebinds names in
  ``transformers.models.mistral.modeling_mistral`` for the whole process (the RoPE function, the
  RMSNorm and MLP classes, ``MistralForCausalLM.forward``), with or without ``model=``; the arm keeps
  what it replaced and :meth:`LigerArm.close` puts it back, so a model loaded after it is plain again.
- ``unsloth``: ``FastLanguageModel.from_pretrained(folder, load_in_4bit=True)`` and its
  ``get_peft_model`` with the reference's LoRA settings. ``import unsloth`` patches transformers,
  peft and trl for the rest of the process and cannot be undone: it runs last.
- ``torchtune``: recorded as not run (see :func:`load_torchtune`).

Peers are optional (``pip install -e ".[peers]"``). A stack that cannot run here (not installed, no
GPU, an import or load that fails) raises :class:`PeerUnavailable` with the reason, which the bench
saves as the case's ``skipped_reason``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from medqa_core.arms.reference import REFERENCE_LORA, ReferenceArm, collate_reference, load_reference, reference_step
from medqa_core.engine.attention import attention_info
from medqa_core.engine.config import RunConfig
from medqa_core.engine.data import IGNORE_INDEX, TrainExample
from medqa_core.engine.model import QuantInfo, quant_info, resolve_model_dir
from medqa_core.engine.numerics import Numerics, autocast, resolve_numerics
from medqa_core.measure.device import resolve_device

logger = logging.getLogger(__name__)

# The kernels of Liger's Mistral patch this arm turns on (liger-kernel 0.8.5's defaults for Mistral).
LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                 "cross_entropy": False}
# What apply_liger_kernel_to_mistral (0.8.5) rebinds in modeling_mistral, and on MistralForCausalLM.
LIGER_MODULE_NAMES = ("apply_rotary_pos_emb", "MistralRMSNorm", "MistralMLP", "CrossEntropyLoss")
LIGER_CLASS_ATTRS = ("forward",)
# Why unsloth is not in the peers extra (measured: pip install --dry-run unsloth==2026.10.9 into this
# project's CPU-torch environment).
UNSLOTH_NOT_IN_EXTRA = (
    "unsloth is not installed; it is not in the peers extra because `pip install unsloth==2026.10.9` replaces "
    "an installed CPU or other torch build with torch 2.14.1 (CUDA 13 wheels, via its xformers/torchvision pins) "
    "and caps transformers at 5.17.0; install it by hand with --no-deps (docs/peers.md)")
UNSLOTH_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # all-linear
_MISSING = object()
DISTRIBUTIONS = {"liger": "liger-kernel", "torchtune": "torchtune", "unsloth": "unsloth"}  # stack -> package


class PeerUnavailable(Exception):
    """A peer stack cannot run here; ``reason`` says why and is saved with the skipped bench case."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerArm(Protocol):
    """What the bench needs of a peer arm."""

    stack: str
    model: Any
    device: torch.device
    model_dir: Path
    numerics: Numerics

    def collate(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]: ...

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None; imports nothing."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _need_gpu(peer: str, device: torch.device, why: str) -> None:
    if device.type != "cuda":  # torch's "cuda" device covers ROCm too
        raise PeerUnavailable(peer, f"{why}; this run's device is {device.type}, not a CUDA or ROCm GPU")


def _pad_batch(collator: Any, device: torch.device, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
    """Right-padded [B, T] ``input_ids``, ``attention_mask``, ``labels`` (pads -100), as collate_reference."""
    features = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    batch = collator(features)
    return {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}


def count_module_classes(model: torch.nn.Module, prefix: str) -> dict[str, int]:
    """How many modules of each class whose name starts with ``prefix`` the model holds (what a patch reached)."""
    counts: dict[str, int] = {}
    for module in model.modules():
        name = type(module).__name__
        if name.startswith(prefix):
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


# ---- liger ------------------------------------------------------------------------------------


@dataclass
class GlobalPatch:
    """Names a monkey patch may rebind, as they were before it: :meth:`undo` puts them back.

    ``module_names`` are attributes of ``module``; ``class_attrs`` are attributes set on ``cls`` itself
    (not inherited ones).
    """

    module: Any
    cls: type
    saved_module: dict[str, Any] = field(default_factory=dict)
    saved_class: dict[str, Any] = field(default_factory=dict)
    undone: bool = False

    @classmethod
    def save(cls, module: Any, klass: type, module_names: Iterable[str], class_attrs: Iterable[str]) -> GlobalPatch:
        return cls(module, klass, {n: getattr(module, n, _MISSING) for n in module_names},
                   {n: klass.__dict__.get(n, _MISSING) for n in class_attrs})

    def changed(self) -> list[str]:
        """The saved names whose value is no longer the saved one."""
        moved = [n for n, v in self.saved_module.items() if getattr(self.module, n, _MISSING) is not v]
        moved += [f"{self.cls.__name__}.{n}" for n, v in self.saved_class.items()
                  if self.cls.__dict__.get(n, _MISSING) is not v]
        return moved

    def undo(self) -> None:
        for name, value in self.saved_module.items():
            if value is _MISSING:
                if hasattr(self.module, name):
                    delattr(self.module, name)
            else:
                setattr(self.module, name, value)
        for name, value in self.saved_class.items():
            if value is _MISSING:
                if name in self.cls.__dict__:
                    delattr(self.cls, name)
            else:
                setattr(self.cls, name, value)
        self.undone = True


def patch_mistral(apply: Callable[[], None]) -> tuple[GlobalPatch, list[str]]:
    """Run ``apply`` (a patch of transformers' Mistral module), keeping what it rebinds.

    Returns:
        The saved names (``undo()`` restores them) and which ones ``apply`` changed.
    """
    from transformers.models.mistral import modeling_mistral

    saved = GlobalPatch.save(modeling_mistral, modeling_mistral.MistralForCausalLM, LIGER_MODULE_NAMES,
                             LIGER_CLASS_ATTRS)
    try:
        apply()
    except BaseException:
        saved.undo()
        raise
    return saved, saved.changed()


@dataclass
class LigerArm:
    """The reference recipe loaded under Liger Kernel's Mistral patch."""

    reference: ReferenceArm
    patch: GlobalPatch
    patched: list[str]  # the modeling_mistral names the patch rebound
    liger_version: str
    modules: dict[str, int]  # Liger module classes in the loaded model
    stack: str = "liger"

    @property
    def model(self) -> Any:
        return self.reference.model

    @property
    def device(self) -> torch.device:
        return self.reference.device

    @property
    def model_dir(self) -> Path:
        return self.reference.model_dir

    @property
    def numerics(self) -> Numerics:
        return self.reference.numerics

    @property
    def quant(self) -> QuantInfo:
        return self.reference.quant

    def collate(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
        return collate_reference(self.reference, examples)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # model(..., labels).loss: in train mode Liger's forward takes the fused linear cross entropy
        # (no [B, T, V] logits); otherwise the reference's step unchanged.
        return reference_step(self.reference, batch)

    def info(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "stack_version": self.liger_version,
            "liger": {"kernels": dict(LIGER_KERNELS), "patched": list(self.patched), "modules": self.modules},
            "recipe": "reference (medqa_core.reference) under apply_liger_kernel_to_mistral, applied before loading",
            "lora": dataclasses.asdict(REFERENCE_LORA),
            "gradient_checkpointing": ref.gradient_checkpointing,
            "attention": attention_info(ref.attention, ref.kernel_ran),
            "quantization": dataclasses.asdict(ref.quant),
        }

    def close(self) -> None:
        """Undo Liger's patch of modeling_mistral (models loaded later are plain transformers again)."""
        if not self.patch.undone:
            self.patch.undo()
            logger.info("liger: restored %s", ", ".join(self.patched))


def load_liger(cfg: RunConfig, device: torch.device | None = None) -> LigerArm:
    """The reference arm of ``cfg`` loaded after ``apply_liger_kernel_to_mistral(**LIGER_KERNELS)``.

    The patch stays in force while the arm lives (RoPE and the forward are looked up at call time);
    call :meth:`LigerArm.close` before loading any other model.

    Raises:
        PeerUnavailable: liger-kernel is not installed, the device is not a GPU, it does not import
            (Triton missing or mismatched), or the patch reached no module of the loaded model.
        ModelLoadError: as :func:`medqa_core.arms.reference.load_reference`.
    """
    device = device or resolve_device(cfg.backend)
    version = installed_version(DISTRIBUTIONS["liger"])
    if version is None:
        raise PeerUnavailable("liger", 'liger-kernel is not installed (pip install -e ".[peers]")')
    _need_gpu("liger", device, f"liger-kernel {version}'s kernels are Triton")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_mistral
    except ImportError as e:
        raise PeerUnavailable("liger", f"liger-kernel {version} does not import: {_first_line(e)}") from e
    patch, patched = patch_mistral(lambda: apply_liger_kernel_to_mistral(**LIGER_KERNELS))
    try:
        reference = load_reference(cfg, device)
        modules = count_module_classes(reference.model, "Liger")
        if not modules:
            raise PeerUnavailable("liger", f"liger-kernel {version}'s Mistral patch reached no module of the "
                                           f"loaded model (patched: {', '.join(patched) or 'nothing'})")
    except BaseException:
        patch.undo()
        raise
    logger.info("liger %s: patched %s; model holds %s", version, ", ".join(patched), modules)
    return LigerArm(reference, patch, patched, version, modules)


# ---- unsloth ----------------------------------------------------------------------------------


@dataclass
class UnslothArm:
    """Unsloth's QLoRA model (``FastLanguageModel``) with the reference's LoRA settings and optimizer."""

    model: Any
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    collator: Any
    device: torch.device
    model_dir: Path
    numerics: Numerics
    quant: QuantInfo
    scaler: torch.amp.GradScaler
    unsloth_version: str
    import_warnings: list[str]  # e.g. "Unsloth should be imported before [transformers, peft]"
    settings: dict[str, Any]
    stack: str = "unsloth"

    def collate(self, examples: Sequence[TrainExample]) -> dict[str, torch.Tensor]:
        return _pad_batch(self.collator, self.device, examples)

    def step(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with autocast(self.device, self.numerics):  # as the unsloth notebooks' Trainer(bf16=True)
            loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"]).loss
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def info(self) -> dict[str, Any]:
        config = getattr(self.model, "config", None)
        return {
            "stack_version": self.unsloth_version,
            "unsloth": {"settings": self.settings, "import_warnings": self.import_warnings},
            "recipe": "unsloth FastLanguageModel.from_pretrained(load_in_4bit=True) + get_peft_model",
            "lora": dataclasses.asdict(REFERENCE_LORA),
            "gradient_checkpointing": self.settings["use_gradient_checkpointing"],
            "attention": {"requested": None, "ran": getattr(config, "_attn_implementation", None),
                          "attn_implementation": getattr(config, "_attn_implementation", None)},
            "quantization": dataclasses.asdict(self.quant),
        }

    def close(self) -> None:
        """Nothing to undo that can be undone: unsloth's import-time patches stay for the process."""


def load_unsloth(cfg: RunConfig, device: torch.device | None = None) -> UnslothArm:
    """Unsloth's 4-bit QLoRA on the model folder of ``cfg``, LoRA r16/alpha 32/dropout 0.05 on all linear layers.

    Unsloth's own choices are kept where the reference has no counterpart: its gradient checkpointing
    (``"unsloth"``) and kernels. Set ``HF_HUB_OFFLINE=1`` on a machine without network.

    Raises:
        PeerUnavailable: unsloth is not installed, the device is not a GPU, or its import or load fails
            (no supported accelerator, a missing dependency, a transformers it does not support).
    """
    device = device or resolve_device(cfg.backend)
    version = installed_version("unsloth")
    if version is None or importlib.util.find_spec("unsloth") is None:
        raise PeerUnavailable("unsloth", UNSLOTH_NOT_IN_EXTRA)
    _need_gpu("unsloth", device, f"unsloth {version}'s QLoRA path needs a GPU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            from unsloth import FastLanguageModel
        except Exception as e:  # NotImplementedError (no accelerator it supports), ImportError, version checks
            raise PeerUnavailable("unsloth", f"import unsloth {version} failed: {_first_line(e)}") from e
    import_warnings = [str(w.message).strip().splitlines()[0] for w in caught if "nsloth" in str(w.message)]
    from transformers import DataCollatorForSeq2Seq

    numerics = resolve_numerics(cfg.model.dtype, device)
    model_dir = resolve_model_dir(cfg.model)
    settings = {"load_in_4bit": True, "max_seq_length": cfg.train.max_seq_len, "dtype": numerics.compute_dtype,
                "use_gradient_checkpointing": "unsloth", "target_modules": list(UNSLOTH_TARGETS),
                "random_state": cfg.train.seed}
    try:
        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(model_dir), max_seq_length=cfg.train.max_seq_len, dtype=numerics.torch_dtype,
            load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, r=REFERENCE_LORA.rank, lora_alpha=REFERENCE_LORA.alpha, lora_dropout=REFERENCE_LORA.dropout,
            target_modules=list(UNSLOTH_TARGETS), bias="none", use_gradient_checkpointing="unsloth",
            random_state=cfg.train.seed)
    except Exception as e:  # unsloth raises many types (RuntimeError, NotImplementedError, OSError for network)
        raise PeerUnavailable("unsloth", f"unsloth {version} could not load {model_dir.name}: {_first_line(e)}") from e
    FastLanguageModel.for_training(model)
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps the tokenizer
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                                  weight_decay=cfg.train.weight_decay)
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX,
                                      return_tensors="pt")
    scaler = torch.amp.GradScaler(device.type, enabled=numerics.torch_dtype == torch.float16)
    for message in import_warnings:
        logger.warning("unsloth: %s", message)
    return UnslothArm(model, tokenizer, optimizer, collator, device, model_dir, numerics, quant_info(model), scaler,
                      version, import_warnings, settings)


# ---- torchtune --------------------------------------------------------------------------------


def load_torchtune(cfg: RunConfig, device: torch.device | None = None) -> PeerArm:
    """Not run: recorded with its reason.

    torchtune's LoRA recipe builds its own module tree (``torchtune.models.mistral``), reads a HF folder
    through its checkpointer's key conversion, and quantizes with torchao's ``NF4Tensor`` rather than
    bitsandbytes; an arm on the same folder and objective is not written yet.

    Raises:
        PeerUnavailable: always, saying whether torchtune is installed.
    """
    version = installed_version("torchtune")
    if version is None:
        raise PeerUnavailable("torchtune", 'torchtune is not installed (optional; not in the peers extra)')
    raise PeerUnavailable("torchtune", f"torchtune {version} is installed but this project has no arm for its LoRA "
                                       "recipe yet (own Mistral modules, torchao NF4 instead of bitsandbytes)")


LOADERS: dict[str, Callable[[RunConfig, torch.device | None], PeerArm]] = {
    "liger": load_liger, "torchtune": load_torchtune, "unsloth": load_unsloth,
}


def load_peer(stack: str, cfg: RunConfig, device: torch.device | None = None) -> PeerArm:
    """The arm of peer ``stack`` (a key of :data:`LOADERS`).

    Raises:
        PeerUnavailable: the stack cannot run here (see each loader).
        KeyError: an unknown stack.
    """
    if stack not in LOADERS:
        raise KeyError(f"unknown peer {stack!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[stack](cfg, device)
