"""Frozen configs for a run: model, LoRA, training, evaluation, data.

Configs only validate in ``__post_init__``; nothing here touches torch or the disk.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medqa_core.measure.device import BACKENDS
from medqa_core.results.dtypes import DTYPE_NAMES


class ConfigError(ValueError):
    """A config value is out of range or unknown."""


# Mistral architectures by name. Weights are random (fixed seed): throughput and memory
# do not depend on weight values, and no weights can be downloaded where this runs.
PRESETS: dict[str, dict[str, Any]] = {
    # The embedded default: one `medqa-parity run` takes about a minute on 2 CPU cores.
    "tiny": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=2,
    ),
    # A 1B model with Mistral-7B's head size and 4:1 grouped-query layout, for quick GPU runs.
    "small": dict(
        hidden_size=2048, intermediate_size=7168, num_hidden_layers=16,
        num_attention_heads=16, num_key_value_heads=4,
    ),
    # Mistral-7B-v0.1's shape (config.json of mistralai/Mistral-7B-v0.1).
    "mistral-7b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, sliding_window=4096,
    ),
    # A 70B model of Mistral's layout (Llama-2-70B's sizes with Mistral's vocabulary), meant for
    # `train --shard fsdp` across GPUs: its 4-bit base is more than a 24 GiB card holds, half of it less
    # (sharded.BaseWeightSize; tests/test_sharded.py). Generating it on first use writes its bf16 weights
    # (2 bytes a parameter) to the cache and needs as much host memory.
    "mistral-70b-shape": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8,
    ),
}
# Shared by every preset: the Mistral-7B-v0.1 tokenizer and its defaults.
PRESET_COMMON: dict[str, Any] = dict(
    vocab_size=32000, max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, initializer_range=0.02,
)

# --attn values. "sdpa" lets torch pick and records what it picked; "sdpa-<backend>" forces one
# backend of scaled_dot_product_attention and fails if it cannot run.
ATTN_KERNELS = (
    "sdpa", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
    "eager", "flex", "flash_attention_2",
)
QUANT_MODES = ("nf4", "fp4", "none")  # bitsandbytes 4-bit types, or a plain base in the compute dtype
DTYPES = ("auto", *DTYPE_NAMES)  # --dtype; medqa_core.engine.numerics resolves "auto" per device
# NF4/FP4 block sizes bitsandbytes quantizes with: 64 is its default (CUDA, CPU, and ROCm from
# bitsandbytes PR #1873 on); 128 was the default on CDNA (MI250/MI300, 64-wide warps) before it.
NF4_BLOCKSIZES = (32, 64, 128, 256)
QUANT_STORAGE = ("uint8", *DTYPE_NAMES)
LOSS_ON = ("answer", "all")
COMPILE_MODES = ("auto", "on", "off")
# AdamW's implementation: "fused" is one kernel for every LoRA tensor (CUDA, ROCm and CPU builds of torch have
# it); "foreach" batches the tensors into a few multi-tensor kernels; "auto": fused on a GPU, foreach on CPU.
ADAMW_IMPLS = ("auto", "foreach", "fused")
FP8_EMULATE = ("ocp", "fnuz")  # TrainConfig.fp8_emulate: OCP e4m3fn/e5m2 or gfx942's e4m3fnuz/e5m2fnuz
SHARD_MODES = ("ddp", "fsdp")  # --shard: every rank holds the whole model (DDP) or a slice of it (FSDP2)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which weights, how they are quantized and which attention kernel runs them.

    Exactly one of ``preset`` and ``path`` is set; a local ``path`` wins when both are given.
    """

    preset: str | None = "tiny"
    path: str | None = None
    seed: int = 0
    quant: str = "nf4"
    attn: str = "sdpa"
    allow_pickle: bool = False  # load .bin/.pt weights; off: pickle can run code
    dtype: str = "auto"  # compute dtype of training and scoring (see medqa_core.engine.numerics)
    nf4_blocksize: int | None = None  # None: bitsandbytes' default; the record says which ran
    nf4_double_quant: bool = True  # quantize the 4-bit scales again (QLoRA's double quantization)
    nf4_quant_storage: str = "uint8"  # the dtype 4-bit weights are packed into (FSDP wants the compute dtype)

    def __post_init__(self) -> None:
        if self.path is None:
            _check(self.preset in PRESETS,
                   f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)} or pass --model PATH")
        _check(self.quant in QUANT_MODES, f"unknown --quant {self.quant!r}; choose one of {', '.join(QUANT_MODES)}")
        _check(self.dtype in DTYPES, f"unknown --dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        _check(self.nf4_blocksize is None or self.nf4_blocksize in NF4_BLOCKSIZES,
               f"unknown --nf4-blocksize {self.nf4_blocksize}; choose one of {', '.join(map(str, NF4_BLOCKSIZES))}")
        _check(self.nf4_quant_storage in QUANT_STORAGE,
               f"unknown --nf4-quant-storage {self.nf4_quant_storage!r}; choose one of {', '.join(QUANT_STORAGE)}")
        _check(self.attn in ATTN_KERNELS, f"unknown --attn {self.attn!r}; choose one of {', '.join(ATTN_KERNELS)}")

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else str(self.preset)


@dataclass(frozen=True)
class LoraSettings:
    """peft LoRA hyper-parameters. ``target_modules=("all-linear",)`` adapts every linear layer."""

    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("all-linear",)

    def __post_init__(self) -> None:
        _check(self.rank >= 1, f"LoRA rank must be >= 1, got {self.rank}")
        _check(self.alpha > 0, f"LoRA alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"LoRA dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "LoRA needs at least one target module")


@dataclass(frozen=True)
class TrainConfig:
    """The fine-tuning loop. ``max_steps``, when set, replaces ``epochs`` (as in transformers' Trainer)."""

    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 5
    weight_decay: float = 0.0
    max_seq_len: int = 1024
    loss_on: str = "answer"  # "answer": only the answer letter's token; "all": every token
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: recompute only the first N decoder layers (None: all). The memory
    # lever with a dial: each layer left out keeps its activations and skips one forward's recompute.
    checkpoint_layers: int | None = None
    # torch.compile each decoder layer (regional: one graph, compiled once, reused by every layer):
    # fuses the norms, rotary, SwiGLU and LoRA's dropout/scale/add, which eager runs as separate kernels.
    # "auto": on a GPU (CUDA or ROCm) where Triton is installed; off on CPU, where a short run's steps
    # would not pay back the compile time.
    compile: str = "auto"
    packing: bool = True  # pack each step's examples into rows of pack_len tokens instead of padding
    # Rows of 1024: the block-diagonal mask costs attention over the whole row, which on a CPU's SDPA
    # outweighs the padding that longer rows save (on the tiny preset, rows of 2048 were the slowest).
    pack_len: int = 1024
    timing_warmup_steps: int = 2  # steps left out of tokens/s (allocator, kernel selection)
    # LoRA's dropout while training (None: the adapter's own, LoraSettings.dropout). 0 drops the dropout modules:
    # each adapted layer then no longer keeps a dropped copy of its input for the backward, nor runs the mask.
    lora_dropout: float | None = None
    adamw: str = "auto"  # ADAMW_IMPLS
    # Compiled layers only: the share (0..1) of a layer's activations the compiled backward may keep; below 1,
    # Inductor's partitioner recomputes the cheapest ops (element-wise first) to fit: selective recompute
    # inside the graph, where checkpointing a whole layer would redo its matmuls too. None: Inductor's default.
    activation_budget: float | None = None
    # The attention kernel of the training steps (ATTN_KERNELS; None: the run's --attn, which scoring keeps).
    # Packed training rows hold a few examples each: flex attention computes only their blocks of the row.
    attn: str | None = None
    # The frozen 4-bit base's matmuls (forward and input gradient) in fp8 with per-row scaling, the format the
    # hardware computes (medqa_core/engine/fp8.py); refused before the model loads where no fp8 tensor cores exist.
    # A lever to add to a profile (e.g. max-speed+fp8=true), not a default: the default numerics stay bf16.
    fp8: bool = False
    # The same lever with one vendor's formats emulated ("ocp": e4m3fn/e5m2, "fnuz": e4m3fnuz/e5m2fnuz): the casts
    # and rounding are PyTorch's real ones, the matmul runs in float32 on the dequantized fp8 values, on any device
    # (CPU too). For comparing the two formats on one machine; implies fp8.
    fp8_emulate: str | None = None
    # The frozen 4-bit base's matmul as a torch.library custom op (bitsandbytes' kernels, the same numbers), which
    # AOTAutograd's compile cache accepts where bitsandbytes' autograd.Function makes it bypass every graph
    # (medqa_core/engine/nf4_base_op.py). On by default since the H100 7B runs of 2026-12-06 stepped as fast as
    # bitsandbytes' path and compiled warm within the 10 s target (docs/performance.md); fp8, where on, runs instead.
    base_custom_op: bool = True
    profile: str | None = None  # the --profile spec these settings came from (apply_named_settings sets it)
    checkpoint_every: int | None = None  # steps between checkpoints (one is always written at the end)
    keep_checkpoints: int = 2
    seed: int = 0  # LoRA initialisation, dropout and data order
    shard: str = "ddp"  # under torchrun: "ddp" replicates the model on every rank, "fsdp" shards it (sharded.py)

    def __post_init__(self) -> None:
        _check(self.shard in SHARD_MODES, f"unknown --shard {self.shard!r}; choose one of {', '.join(SHARD_MODES)}")
        _check(self.epochs > 0, f"epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.max_seq_len >= 16, f"max_seq_len must be >= 16, got {self.max_seq_len}")
        _check(self.loss_on in LOSS_ON, f"unknown loss_on {self.loss_on!r}; choose one of {', '.join(LOSS_ON)}")
        _check(self.pack_len >= 16, f"pack_len must be >= 16, got {self.pack_len}")
        _check(self.checkpoint_layers is None or self.checkpoint_layers >= 0,
               f"checkpoint_layers must be >= 0, got {self.checkpoint_layers}")
        _check(self.checkpoint_layers is None or self.gradient_checkpointing,
               "checkpoint_layers needs gradient_checkpointing")
        _check(self.fp8_emulate in (None, *FP8_EMULATE),
               f"unknown fp8_emulate {self.fp8_emulate!r}; choose one of {', '.join(FP8_EMULATE)}")
        _check(self.compile in COMPILE_MODES,
               f"unknown compile setting {self.compile!r}; choose one of {', '.join(COMPILE_MODES)}")
        _check(self.checkpoint_every is None or self.checkpoint_every >= 1,
               f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        _check(self.timing_warmup_steps >= 0, f"timing_warmup_steps must be >= 0, got {self.timing_warmup_steps}")
        _check(self.lora_dropout is None or 0.0 <= self.lora_dropout < 1.0,
               f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        _check(self.adamw in ADAMW_IMPLS, f"unknown adamw {self.adamw!r}; choose one of {', '.join(ADAMW_IMPLS)}")
        _check(self.attn is None or self.attn in ATTN_KERNELS,
               f"unknown training attn {self.attn!r}; choose one of {', '.join(ATTN_KERNELS)}")
        _check(self.activation_budget is None or 0.0 <= self.activation_budget <= 1.0,
               f"activation_budget must be in [0, 1], got {self.activation_budget}")


# Named training settings, applied over TrainConfig's defaults. Users name them with ``--profile`` and records
# keep the spec as ``train.profile`` (both kept as they are); in code they are settings, not a profiler's output.
# Batch sizes, recompute counts and levers were chosen from bench runs of the mistral-7b preset on real MedQA
# batches (docs/performance.md has them).
# The three memory classes drop LoRA's dropout (lora_dropout=0) and train with flex attention (GPUs only: it has
# no backward on CPU); their effect on the loss curve is measured in bench/bench_levers.py, not assumed.
NAMED_SETTINGS: dict[str, dict[str, Any]] = {
    "default": {},
    # The default with compiling off, so the bench shows what torch.compile alone buys.
    "eager": dict(compile="off"),
    # Memory as the step needs it: no recompute, the largest batch that stays within an 80 GB card.
    "max-speed": dict(batch_size=48, compile="on", lora_dropout=0.0, attn="flex"),
    # What a 24 GB card can run: a large batch, recomputing only as many layers as the memory needs.
    "capped": dict(batch_size=32, gradient_checkpointing=True, checkpoint_layers=24, compile="on", lora_dropout=0.0,
                   attn="flex"),
    # What a 16 GB card can run: every layer recomputed.
    "lean": dict(batch_size=32, gradient_checkpointing=True, compile="on", lora_dropout=0.0, attn="flex"),
}
# The peak device memory (allocated, GiB) each memory class promises; the run record and the bench say whether it
# held. Each sits under its card class (80, 24, 16 GB) with room for the CUDA context and the allocator's reserve.
MEMORY_CAP_GIB = {"max-speed": 76.0, "capped": 22.0, "lean": 12.0}
# What a card must have beyond a profile's cap for ``choose_memory_class`` to pick it: the context, cuBLAS and
# Triton workspaces, and blocks the caching allocator reserves but has not handed out.
CARD_HEADROOM_GIB = 1.5
AUTO_SETTINGS = "auto"  # TrainConfig.profile to resolve on the device (run.resolve_auto_settings, choose_memory_class)


def memory_cap_gib(spec: str) -> float | None:
    """The peak memory a profile spec (see :func:`apply_named_settings`) promises, if its profile promises one."""
    return MEMORY_CAP_GIB.get(spec.split("+")[0])


def memory_promise_held(spec: str, peak_gib: float | None) -> bool | None:
    """Whether a run under profile spec ``spec`` kept its memory promise (peak <= :func:`memory_cap_gib`).

    The one verdict a run record's ``profile.held`` and a bench case's ``within_memory_cap`` both take.

    Returns:
        True or False; None where the profile promises no peak or no device peak was measured (CPU).
    """
    cap = memory_cap_gib(spec)
    return None if cap is None or peak_gib is None else peak_gib <= cap


def choose_memory_class(card_gib: float | None) -> str:
    """The fastest memory class that fits a card of ``card_gib`` GiB (None: no GPU, the default profile).

    A card too small for every class gets ``lean``, the class that needs the least.
    """
    if card_gib is None:
        return "default"
    fitting = [name for name, cap in MEMORY_CAP_GIB.items() if cap + CARD_HEADROOM_GIB <= card_gib]
    return max(fitting, key=MEMORY_CAP_GIB.__getitem__) if fitting else min(MEMORY_CAP_GIB, key=MEMORY_CAP_GIB.get)


# What a profile spec may set after its name ("capped+batch_size=24+checkpoint_layers=20"), and how to read it.
SETTINGS_KEYS: dict[str, Any] = {
    "batch_size": int, "checkpoint_layers": int, "pack_len": int,
    "gradient_checkpointing": lambda v: _parse_bool(v), "compile": str,
    "lora_dropout": float, "adamw": str, "activation_budget": float, "attn": str, "fp8": lambda v: _parse_bool(v),
    "base_custom_op": lambda v: _parse_bool(v), "fp8_emulate": str,
}


def _parse_bool(value: str) -> bool:
    _check(value.lower() in ("true", "false", "1", "0"), f"expected true or false, got {value!r}")
    return value.lower() in ("true", "1")


def apply_named_settings(spec: str, base: TrainConfig | None = None) -> TrainConfig:
    """TrainConfig with a profile's settings over ``base`` (default: TrainConfig()).

    Args:
        spec: a name of :data:`NAMED_SETTINGS`, optionally followed by ``+key=value`` overrides of
            :data:`SETTINGS_KEYS` (for tuning a profile to another card's memory).
    """
    name, *overrides = spec.split("+")
    _check(name in NAMED_SETTINGS, f"unknown profile {name!r} in {spec!r}; choose one of {', '.join(NAMED_SETTINGS)}")
    settings = dict(NAMED_SETTINGS[name])
    for item in overrides:
        key, sep, value = item.partition("=")
        _check(bool(sep) and key in SETTINGS_KEYS,
               f"profile {spec!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(SETTINGS_KEYS)}")
        try:
            settings[key] = SETTINGS_KEYS[key](value)
        except ValueError as e:
            raise ConfigError(f"profile {spec!r}: {key}: {e}") from e
    return dataclasses.replace(base or TrainConfig(), **settings, profile=spec)


# Questions per scoring forward when --eval-batch-size is not given: a GPU fills its matrix units only
# with many prompts per call (64 is what the bench scored with; docs/performance.md has the run beside it);
# on 2 CPU cores larger batches buy nothing.
EVAL_BATCH_DEFAULT = {"cuda": 64, "cpu": 8}


@dataclass(frozen=True)
class EvalConfig:
    """Option scoring: ``batch_size`` questions per forward call (None: :data:`EVAL_BATCH_DEFAULT` of the
    device), packed into rows of ``pack_len``."""

    batch_size: int | None = None
    max_seq_len: int = 2048
    packing: bool = True
    pack_len: int = 2048

    def batch_for(self, device_type: str) -> int:
        return self.batch_size or EVAL_BATCH_DEFAULT.get(device_type, EVAL_BATCH_DEFAULT["cpu"])

    def __post_init__(self) -> None:
        _check(self.pack_len >= 16, f"eval pack_len must be >= 16, got {self.pack_len}")
        _check(self.batch_size is None or self.batch_size >= 1, f"eval batch_size must be >= 1, got {self.batch_size}")
        _check(self.max_seq_len >= 16, f"eval max_seq_len must be >= 16, got {self.max_seq_len}")


@dataclass(frozen=True)
class DataConfig:
    """Where MedQA comes from. ``data_dir=None`` uses the subset bundled with the package.

    The train split is used when the folder has one; otherwise dev stands in for it (the
    public train split is not bundled).
    """

    data_dir: str | None = None
    train_split: str = "auto"  # "auto": train if present, else dev
    eval_split: str = "test"
    train_limit: int | None = None
    eval_limit: int | None = None

    def __post_init__(self) -> None:
        _check(self.train_limit is None or self.train_limit >= 1, f"train_limit must be >= 1, got {self.train_limit}")
        _check(self.eval_limit is None or self.eval_limit >= 1, f"eval_limit must be >= 1, got {self.eval_limit}")


@dataclass(frozen=True)
class RunConfig:
    """Everything one ``medqa-parity run`` needs; saved whole into the run record."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    data: DataConfig = field(default_factory=DataConfig)
    backend: str = "auto"
    results_dir: str = "runs/records"  # git-ignored; committed records go to results/runs

    def __post_init__(self) -> None:
        _check(self.backend in BACKENDS, f"unknown --backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        # bitsandbytes' documented FSDP path keeps 4-bit weights in a float dtype; uint8 storage crashed, or trained
        # on wrong weights without a word, under FSDP2 with torch 2.8 (accelerate#3983).
        _check(self.train.shard != "fsdp" or self.model.quant == "none" or self.model.nf4_quant_storage != "uint8",
               "--shard fsdp needs the 4-bit weights stored in a float dtype: pass --nf4-quant-storage bf16")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Rebuild a config saved by :meth:`to_dict` (lists come back as tuples)."""
        lora = dict(d["lora"])
        lora["target_modules"] = tuple(lora["target_modules"])
        return cls(
            model=ModelConfig(**d["model"]), lora=LoraSettings(**lora), train=TrainConfig(**d["train"]),
            eval=EvalConfig(**d["eval"]), data=DataConfig(**d["data"]),
            backend=d["backend"], results_dir=d["results_dir"],
        )
