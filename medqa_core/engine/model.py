"""Mistral from a preset (config + seed) or a local folder; NF4 4-bit base; peft LoRA.

Presets are written once into a cache folder as safetensors plus the real Mistral-7B
tokenizer, then loaded through the same ``from_pretrained`` path as a user's folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from packaging.version import Version

from medqa_core.engine.config import PRESET_COMMON, PRESETS, LoraSettings, ModelConfig
from medqa_core.engine.numerics import TORCH_DTYPES
from medqa_core.results.storage import (
    apply_umask,
    fsync_dir,
    fsync_file,
    is_write_failure,
    json_problem,
    new_folders,
    remove_if_empty,
    safetensors_tensors,
    unique_name,
    write_error,
)

logger = logging.getLogger(__name__)

MIN_BNB_ROCM = Version("0.50.0")  # 4-bit on ROCm gave NaNs before this release (bitsandbytes tracker)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
TOKENIZER_FILE = "tokenizer.model.v1"  # Mistral-7B-v0.1's SentencePiece model, shipped in mistral-common
# The JSON files of a transformers model folder (and its tokenizer) that are checked before loading.
FOLDER_JSON = ("config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "generation_config.json")


class ModelLoadError(ValueError):
    """A model folder is missing, has no usable weights, or cannot be quantized here."""


@dataclass(frozen=True)
class QuantInfo:
    """Quantization settings read back from a loaded layer: what ran, not what was asked for."""

    method: str  # "bnb-nf4" or "none"
    quant_type: str | None = None
    blocksize: int | None = None
    double_quant: bool | None = None
    double_quant_blocksize: int | None = None
    compute_dtype: str | None = None
    storage_dtype: str | None = None
    weight_dtype: str | None = None
    bitsandbytes_version: str | None = None
    cpu_packed_inference: bool | None = None  # bitsandbytes' AVX512-bf16 repacking; kept off (see model.py)


_STORAGE_DTYPES = {"uint8": torch.uint8, **TORCH_DTYPES}


def cache_dir() -> Path:
    """Where generated presets live: ``$MEDQA_PARITY_CACHE`` or ``~/.cache/medqa-parity``."""
    return Path(os.environ.get("MEDQA_PARITY_CACHE", Path.home() / ".cache" / "medqa-parity"))


def mistral_tokenizer_file() -> Path:
    """The Mistral-7B SentencePiece model inside the mistral-common package.

    Found without importing mistral_common, so its own dependencies are not needed.
    """
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("mistral-common is not installed; it ships the Mistral tokenizer the presets use "
                             "(pip install mistral-common)")
    path = Path(spec.submodule_search_locations[0]) / "data" / TOKENIZER_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: tokenizer file missing from the installed mistral-common")
    return path


def save_preset_tokenizer(folder: Path) -> None:
    """Turn mistral-common's ``tokenizer.model`` into a transformers tokenizer saved in ``folder``.

    transformers 5 reads a folder's ``tokenizer.model`` into ``LlamaTokenizer`` (with sentencepiece and
    protobuf installed). BOS is added as Mistral-7B-v0.1's own tokenizer_config asks.
    """
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(mistral_tokenizer_file(), Path(tmp) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
    tokenizer.save_pretrained(folder)


def _fill_seeded(model: torch.nn.Module, seed: int, std: float) -> None:
    """Random weights that depend only on (seed, parameter name): the same on every machine,
    device and transformers version, so two backends score the very same model."""
    for name, param in model.named_parameters():
        digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        with torch.no_grad():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32).mul_(std))


def preset_dir(name: str, seed: int) -> Path:
    """The preset's folder, written on first use (atomically: a half-written preset is never loaded)."""
    from transformers import MistralConfig, MistralForCausalLM

    if name not in PRESETS:
        raise ModelLoadError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    folder = cache_dir() / f"{name}-seed{seed}"
    if (folder / "config.json").is_file():
        return folder
    logger.info("generating preset %s (seed %d) into %s", name, seed, folder)
    config = MistralConfig(**{**PRESET_COMMON, "sliding_window": None, **PRESETS[name]})
    with torch.device("meta"):
        model = MistralForCausalLM(config).to(torch.bfloat16)  # meta: no memory until to_empty
    model = model.to_empty(device="cpu")
    _fill_seeded(model, seed, config.initializer_range)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        model.save_pretrained(tmp, max_shard_size="5GB")  # safetensors: the transformers 5 default
        save_preset_tokenizer(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # another process may have won the race
            raise
    return folder


def remote_code(folder: Path) -> list[str]:
    """The custom code a model folder asks transformers to run: its config.json's ``auto_map`` entries, and
    tokenizer_config.json's (e.g. ``AutoModelForCausalLM -> modeling_x.XModel``)."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # missing or broken: check_model_dir names a broken one
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if isinstance(auto_map, dict):
            found += [f"{name}: {k} -> {v if isinstance(v, str) else ', '.join(map(str, v))}"
                      for k, v in auto_map.items()]
        elif auto_map:
            found.append(f"{name}: auto_map {auto_map!r}")
    return found


def check_model_dir(path: str | Path, allow_pickle: bool = False, trust_remote_code: bool = False) -> Path:
    """Validate a local model folder before transformers sees it.

    Raises:
        ModelLoadError: no such folder, no config.json, no weights, pickle-only weights without
            ``allow_pickle``, custom code (``auto_map``) without ``trust_remote_code``, or a damaged file
            (broken JSON, a safetensors file shorter or longer than its header says); the message names the file.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder not found; --model takes a local folder with "
                             "config.json and *.safetensors")
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json; is this a transformers model folder?")
    for name in FOLDER_JSON:
        problem = json_problem(folder / name) if (folder / name).exists() else None
        if problem:
            raise ModelLoadError(f"{folder / name}: {problem}; the model folder is damaged")
    code = remote_code(folder)
    if code and not trust_remote_code:
        raise ModelLoadError(f"{folder}: auto_map asks to run the folder's own code ({'; '.join(code)}); "
                             "without --trust-remote-code only transformers' built-in classes run. Remove auto_map to "
                             "use the built-in class, or pass --trust-remote-code if you trust this folder's code")
    weights = sorted(folder.glob("*.safetensors"))
    for weight in weights:
        try:
            safetensors_tensors(weight)  # the header only: milliseconds for any size
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{weight}: {e}; the model folder is damaged (copy it again)") from e
    if weights:
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise ModelLoadError(f"{folder}: only pickle weights ({', '.join(pickles)}); loading pickle can run code. "
                             "Convert them to safetensors, or pass --allow-pickle if you trust this folder")
    if not pickles:
        raise ModelLoadError(f"{folder}: no weights (*.safetensors) in the folder")
    return folder


def resolve_model_dir(cfg: ModelConfig, trust_remote_code: bool = False) -> Path:
    """The folder a model config names: the user's ``path`` (checked) or the preset's (generated on first use)."""
    if cfg.path:
        return check_model_dir(cfg.path, cfg.allow_pickle, trust_remote_code)
    return preset_dir(str(cfg.preset), cfg.seed)


def error_text(e: BaseException, limit: int = 400) -> str:
    """An error's whole message on one line (its lines joined), cut at a word only past ``limit`` characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def load_tokenizer(folder: str | Path, trust_remote_code: bool = False) -> Any:
    """The folder's tokenizer, with a pad token.

    Raises:
        ModelLoadError: it does not load (damaged or missing tokenizer files); the message names them.
    """
    from transformers import AutoTokenizer

    folder = Path(folder)
    files = sorted(p.name for p in folder.glob("tokenizer*"))
    if not files:
        raise ModelLoadError(f"{folder}: no tokenizer (no tokenizer.json, tokenizer.model or tokenizer_config.json); "
                             "copy the model's tokenizer files into the folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # tokenizers, sentencepiece and protobuf each raise their own types
        from medqa_core.measure.timing import is_oom

        if is_oom(e):
            raise
        raise ModelLoadError(f"{folder}: the tokenizer does not load ({', '.join(files)}): "
                             f"{type(e).__name__}: {error_text(e)}") from e
    if tokenizer.pad_token_id is None:
        # Pads are never attended to (right padding) nor scored, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _check_bnb(device: torch.device) -> None:
    try:
        import bitsandbytes
    except ImportError as e:
        raise ModelLoadError("--quant nf4 needs bitsandbytes (pip install 'bitsandbytes>=0.50.2'); "
                             "or run --quant none") from e
    if device.type == "cuda" and torch.version.hip and Version(bitsandbytes.__version__) < MIN_BNB_ROCM:
        raise ModelLoadError(f"bitsandbytes {bitsandbytes.__version__} on ROCm: 4-bit gave NaNs before "
                             f"{MIN_BNB_ROCM}; upgrade bitsandbytes")


def _pickle_refused(e: BaseException) -> str:
    """What torch's safe loader said about pickle weights, without its advice to turn the safety off."""
    text = " ".join(str(e).split())
    detail = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0].strip()
    return detail[:200] or type(e).__name__


def load_base_model(model_dir: Path, cfg: ModelConfig, device: torch.device, attn_implementation: str,
                    compute_dtype: torch.dtype, trust_remote_code: bool = False) -> Any:
    """The frozen base model on ``device``: 4-bit (NF4 or FP4, bitsandbytes) or plain, in ``compute_dtype``.

    Non-quantized weights (embeddings, norms, LM head; everything with ``--quant none``) load in
    ``compute_dtype`` and the 4-bit layers dequantize to it. ``cfg.nf4_blocksize``, which
    transformers' ``BitsAndBytesConfig`` cannot pass on, is applied by :func:`requantize_4bit`.

    Returns the model in eval mode as ``from_pretrained`` gives it; the trainer switches modes.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = dict(
        dtype=compute_dtype, attn_implementation=attn_implementation, device_map={"": device},
        trust_remote_code=trust_remote_code, use_safetensors=not cfg.allow_pickle or None,
    )
    if cfg.quant != "none":
        _check_bnb(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=cfg.quant, bnb_4bit_use_double_quant=cfg.nf4_double_quant,
            bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=_STORAGE_DTYPES[cfg.nf4_quant_storage],
        )
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except (pickle.UnpicklingError, EOFError) as e:  # --allow-pickle: torch.load(weights_only=True) said no
        pickles = ", ".join(sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES))
        raise ModelLoadError(f"{model_dir}: cannot load the pickle weights ({pickles}): torch's safe loader "
                             f"refused them ({_pickle_refused(e)}); they may hold code or be damaged. Convert a "
                             "trusted copy to safetensors") from e
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"{model_dir}: cannot load model: {first}") from e
    if cfg.quant != "none" and cfg.nf4_blocksize is not None:
        requantize_4bit(model, model_dir, cfg.nf4_blocksize, compute_dtype)
    if device.type == "cpu":
        keep_trainable_cpu_format(model)
    return model


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


def requantize_4bit(model: torch.nn.Module, model_dir: Path, blocksize: int, compute_dtype: torch.dtype) -> int:
    """Quantize every 4-bit layer again from the checkpoint's own weights, with ``blocksize``.

    transformers quantizes with bitsandbytes' default block size and offers no setting for it; this
    redoes each layer from the original weights (never from the dequantized ones, which would add a
    second rounding), so ``--nf4-blocksize 128`` on CUDA or CPU quantizes as CDNA's old default did.

    Returns:
        The number of layers quantized again (0 when they already had ``blocksize``).

    Raises:
        ModelLoadError: a layer's weight is not in the folder's safetensors files under its module name.
    """
    import bitsandbytes as bnb
    from safetensors import safe_open

    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, bnb.nn.Linear4bit) and m.weight.quant_state.blocksize != blocksize]
    if not layers:
        return 0
    index = _weight_files(model_dir)
    for name, module in layers:
        key = f"{name}.weight"
        if key not in index:
            raise ModelLoadError(f"{model_dir}: no tensor {key!r} in its safetensors files; --nf4-blocksize needs "
                                 "the checkpoint's names to match the model's modules")
        with safe_open(str(index[key]), framework="pt") as f:
            weight = f.get_tensor(key).to(compute_dtype)  # as from_pretrained hands it to the quantizer
        old = module.weight
        device = old.device
        module.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, blocksize=blocksize, compress_statistics=old.compress_statistics,
            quant_type=old.quant_type, quant_storage=old.quant_storage, module=module,
        ).to(device)  # moving an unquantized Params4bit quantizes it (on CPU too)
    logger.info("quantized %d 4-bit layers again with blocksize %d", len(layers), blocksize)
    return len(layers)


def keep_trainable_cpu_format(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its AVX512-bf16 CPU inference kernel.

    bitsandbytes 0.50 repacks a Linear4bit's weight on the first no-grad forward in eval mode; the
    repacked kernel has no autograd, so a later training step silently gets no gradient through the
    frozen 4-bit layers (only along the residual stream). Scoring then runs the same kernel as
    training, a little slower.

    Returns:
        The number of 4-bit layers changed.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    if changed:
        logger.info("bitsandbytes CPU inference repacking off for %d 4-bit layers (it drops gradients)", changed)
    return changed


def quant_info(model: torch.nn.Module) -> QuantInfo:
    """Read the 4-bit settings from the first quantized layer (blocksize differs by GPU: 64 on
    CUDA, 128 on CDNA's 64-wide warps), so parity reports compare what actually ran."""
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is None:
            continue
        import bitsandbytes

        nested = bool(getattr(state, "nested", False))
        return QuantInfo(
            method=f"bnb-{state.quant_type}", quant_type=state.quant_type, blocksize=int(state.blocksize),
            double_quant=nested,
            double_quant_blocksize=int(state.state2.blocksize) if nested and state.state2 is not None else None,
            compute_dtype=str(getattr(module, "compute_dtype", None) or state.dtype).removeprefix("torch."),
            storage_dtype=str(module.weight.dtype).removeprefix("torch."),
            weight_dtype=str(state.dtype).removeprefix("torch."),
            bitsandbytes_version=bitsandbytes.__version__,
            cpu_packed_inference=bool(getattr(module, "support_avx512bf16_for_cpu", False))
            if module.weight.device.type == "cpu" else None,
        )
    dtype = next(model.parameters()).dtype
    return QuantInfo(method="none", weight_dtype=str(dtype).removeprefix("torch."))


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated decoder blocks of a (peft-wrapped) causal LM, in order."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return list(base.get_decoder().layers)


def set_checkpointing(model: Any, enabled: bool, layers: int | None = None) -> int:
    """Gradient checkpointing (non-reentrant) on the first ``layers`` decoder layers (None: all), or off.

    Returns:
        How many layers recompute their forward in the backward pass.
    """
    # transformers 5.2x renamed these (activation_checkpointing_*; the old names warn); 5.17 has only the old.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled:
        getattr(base, "activation_checkpointing_disable", base.gradient_checkpointing_disable)()
        return 0
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    blocks = decoder_layers(model)
    keep = len(blocks) if layers is None else min(layers, len(blocks))
    for block in blocks[keep:]:  # transformers' per-layer flag, read at each call
        block.gradient_checkpointing = False
    return keep


def set_lora_dropout(model: Any, p: float | None) -> int:
    """LoRA's dropout in every adapted layer: ``p`` (0: no dropout module at all), or None for the adapter's own.

    peft skips an ``nn.Identity`` dropout entirely, so with 0 the adapter reads the layer's input as it is:
    no mask is drawn and no dropped copy of the input is kept for the backward.

    Returns:
        How many dropout modules were set.
    """
    from peft.tuners.lora import LoraLayer

    config = getattr(model, "peft_config", {})
    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name in module.lora_dropout:
            rate = config[name].lora_dropout if p is None else p
            module.lora_dropout[name] = torch.nn.Dropout(rate) if rate > 0 else torch.nn.Identity()
            changed += 1
    return changed


def reset_adapter(model: Any, seed: int) -> int:
    """Put every LoRA adapter back at its initialisation (A seeded, B zero): a fresh start for a comparison.

    Returns:
        How many adapted layers were reset.
    """
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for module in layers:
        for name in module.lora_A:
            module.reset_lora_parameters(name, True)
    return len(layers)


def add_lora(model: Any, lora: LoraSettings) -> Any:
    """Wrap the frozen base with trainable LoRA adapters (fp32 weights, the run's compute dtype under autocast)."""
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = "all-linear" if lora.target_modules == ("all-linear",) else list(lora.target_modules)
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as e:
        raise ModelLoadError(f"LoRA target modules {targets}: {e}") from e


def check_adapter(adapter_dir: str | Path) -> Path:
    """Refuse a folder that holds no saved adapter, before any model is loaded for it.

    Args:
        adapter_dir: the folder given to ``--adapter``.

    Returns:
        The folder.

    Raises:
        ModelLoadError: no such folder, or no adapter_model.safetensors in it; says what to pass.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ModelLoadError(f"adapter folder not found: {adapter_dir}; pass a folder written by medqa-parity train "
                             "or run (default runs/adapters/TIME-PID-RANDOM)")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise ModelLoadError(f"{adapter_dir}: no adapter_model.safetensors; pass a folder written by "
                             "medqa-parity train")
    return adapter_dir


def load_adapter(model: Any, adapter_dir: str | Path) -> Any:
    """Attach a LoRA adapter saved by :func:`save_adapter` (safetensors) to a base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, check_adapter(adapter_dir), is_trainable=False)


def save_adapter(model: Any, adapter_dir: str | Path, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the LoRA weights (safetensors) and adapter_config.json (and peft's README.md) into ``adapter_dir``.

    They are written into a temporary folder beside it and fsynced, then moved in: a write that fails (a
    full disk) leaves no half adapter, and the folder as it was.

    Args:
        state_dict: the weights to write by parameter name (e.g. gathered from shards); None: the model's own.

    Raises:
        WriteError: the adapter could not be written (naming the folder and the free space); nothing is left.
    """
    adapter_dir = Path(adapter_dir)
    tmp = adapter_dir.parent / f".{unique_name(adapter_dir.name)}.tmp"
    created = new_folders(adapter_dir)
    try:
        adapter_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # under the user's umask
        model.save_pretrained(tmp, state_dict=state_dict)  # peft writes adapter_model.safetensors by default
        apply_umask(tmp / "adapter_model.safetensors")  # safetensors writes 0600
        for path in tmp.iterdir():
            fsync_file(path)
        adapter_dir.mkdir(exist_ok=True)
        for path in tmp.iterdir():  # renames within one folder's parent: no new space needed
            os.replace(path, adapter_dir / path.name)
        fsync_dir(adapter_dir)
    except BaseException as e:  # a signal mid-write too: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(created)
        if isinstance(e, Exception) and is_write_failure(e):
            raise write_error(adapter_dir, e) from e
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # empty by now
    return adapter_dir


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; a 4-bit weight counts its logical elements, not bytes."""
    total = trainable = 0
    for p in model.parameters():
        n = p.numel()
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        if shape is not None:
            n = int(torch.Size(shape).numel())
        total += n
        trainable += n if p.requires_grad else 0
    return total, trainable
