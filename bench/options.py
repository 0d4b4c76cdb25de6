"""The command-line options of bench/ and their resolved, typed form (BenchOptions)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from medqa_core.engine.config import (
    ATTN_KERNELS,
    DTYPES,
    NAMED_SETTINGS,
    NF4_BLOCKSIZES,
    PRESETS,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_named_settings,
)
from medqa_core.engine.decoding import DECODE_ATTENTIONS

BENCH_DIR = Path(__file__).resolve().parent
# Defaults sized for a 2-core CPU (a few minutes on the tiny preset); a GPU gets the full split
# and a decode long enough that the prompt's prefill is a small share of it.
CPU_QUESTIONS = 64
CPU_DECODE_TOKENS = 16
GPU_DECODE_TOKENS = 128
# Timed train rounds: each a distinct real batch, so a GPU case covers about half an epoch of the dev
# split at batch 32 (compiles, the spread of row counts and lengths, the memory of the longest batches).
CPU_TRAIN_ROUNDS = 5
GPU_TRAIN_ROUNDS = 20
# Accuracy/inference before training: the train step changes the adapter they would score.
_FILE_ORDER = {"bench_accuracy.py": 0, "bench_infer.py": 1, "bench_train.py": 2, "bench_levers.py": 3}

@dataclass(frozen=True)
class BenchOptions:
    """The command-line options of bench/, resolved (device-dependent defaults filled in)."""

    preset: str
    model: str | None
    data: str | None
    attn: tuple[str, ...]
    batch_size: int
    seq_len: int
    questions: int | None  # None: every question of the eval split
    train_rounds: int
    infer_rounds: int
    warmup_rounds: int
    decode_tokens: int
    reference: bool
    gradient_checkpointing: bool = False
    eval_batch_size: int | None = None  # None: EvalConfig's default for the device, as a run takes it
    train_profiles: tuple[str, ...] = ()  # named TrainConfig settings (config.NAMED_SETTINGS), one case each
    dtype: str = "auto"  # --dtype, as medqa-parity run takes it
    nf4_blocksize: int | None = None
    peer_batch_size: int | None = None  # the liger-batch peer case's batch; None: the max-speed profile's
    decode_batches: tuple[int, ...] = (1, 8)  # rows of the decode cases
    nf4_kernels: tuple[str, ...] = ("bitsandbytes",)  # 4-bit kernels of the compiled decode case, one arm each
    decode_attentions: tuple[str, ...] = ("auto",)  # the compiled decode steps' attentions, one arm each

    @classmethod
    def from_config(cls, config: pytest.Config, device: torch.device) -> BenchOptions:
        """Read and check the options.

        Raises:
            pytest.UsageError: an unknown kernel or a size below its minimum.
        """
        attn = tuple(k.strip() for k in config.getoption("attn").split(",") if k.strip())
        unknown = [k for k in attn if k not in ATTN_KERNELS]
        if not attn or unknown:
            raise pytest.UsageError(f"--attn {config.getoption('attn')!r}: unknown {', '.join(unknown) or 'empty'}; "
                                    f"give a comma-separated list of {', '.join(ATTN_KERNELS)}")
        gpu = device.type == "cuda"
        profiles_opt = config.getoption("train_profiles")
        profiles_opt = (",".join(p for p in NAMED_SETTINGS if p != "default") if gpu else "") \
            if profiles_opt is None else profiles_opt
        profiles = tuple(dict.fromkeys(p.strip() for p in profiles_opt.split(",") if p.strip()))
        try:
            for spec in profiles:
                apply_named_settings(spec)
        except ConfigError as e:
            raise pytest.UsageError(f"--train-profiles: {e}") from e
        questions = config.getoption("questions")
        decode = config.getoption("decode_tokens")
        batches_opt = config.getoption("decode_batches")
        try:
            decode_batches = tuple(sorted({int(b) for b in batches_opt.split(",") if b.strip()})) if batches_opt \
                else tuple(sorted({1, config.getoption("bench_batch_size")}))
        except ValueError as e:
            raise pytest.UsageError(f"--decode-batches {batches_opt!r}: give comma-separated row counts") from e
        kernels_opt = config.getoption("nf4_kernels") or ("triton,bitsandbytes" if gpu else "bitsandbytes")
        nf4_kernels = tuple(dict.fromkeys(k.strip() for k in kernels_opt.split(",") if k.strip()))
        if not nf4_kernels or set(nf4_kernels) - {"triton", "bitsandbytes"}:
            raise pytest.UsageError(f"--nf4-kernels {kernels_opt!r}: give a comma-separated list of triton, "
                                    "bitsandbytes")
        attentions_opt = config.getoption("decode_attention")
        decode_attentions = tuple(dict.fromkeys(a.strip() for a in attentions_opt.split(",") if a.strip()))
        if not decode_attentions or set(decode_attentions) - set(DECODE_ATTENTIONS):
            raise pytest.UsageError(f"--decode-attention {attentions_opt!r}: give a comma-separated list of "
                                    f"{', '.join(DECODE_ATTENTIONS)}")
        opts = cls(
            preset=config.getoption("preset"), model=config.getoption("model"), data=config.getoption("data"),
            attn=tuple(dict.fromkeys(attn)), batch_size=config.getoption("bench_batch_size"),
            seq_len=config.getoption("bench_seq_len"),
            questions=questions if questions is not None else (None if gpu else CPU_QUESTIONS),
            train_rounds=config.getoption("train_rounds") or (GPU_TRAIN_ROUNDS if gpu else CPU_TRAIN_ROUNDS),
            infer_rounds=config.getoption("infer_rounds"),
            warmup_rounds=config.getoption("warmup_rounds"),
            decode_tokens=decode if decode is not None else (GPU_DECODE_TOKENS if gpu else CPU_DECODE_TOKENS),
            reference=not config.getoption("no_reference"),
            gradient_checkpointing=config.getoption("gradient_checkpointing"),
            eval_batch_size=config.getoption("bench_eval_batch_size"),
            train_profiles=profiles, dtype=config.getoption("dtype"), nf4_blocksize=config.getoption("nf4_blocksize"),
            peer_batch_size=config.getoption("peer_batch_size"), decode_batches=decode_batches,
            nf4_kernels=nf4_kernels, decode_attentions=decode_attentions,
        )
        for name, value, least in (("--bench-batch-size", opts.batch_size, 1), ("--bench-seq-len", opts.seq_len, 2),
                                   ("--questions", opts.questions or 1, 1), ("--train-rounds", opts.train_rounds, 1),
                                   ("--infer-rounds", opts.infer_rounds, 1), ("--warmup-rounds", opts.warmup_rounds, 0),
                                   ("--decode-tokens", opts.decode_tokens, 2),
                                   ("--peer-batch-size", opts.peer_batch_size or 1, 1),
                                   ("--decode-batches", min(opts.decode_batches or (0,)), 1)):
            if value < least:
                raise pytest.UsageError(f"{name} must be >= {least}, got {value}")
        return opts

    def run_config(self) -> RunConfig:
        """The RunConfig the library functions get; ``model.attn`` is replaced per case."""
        return RunConfig(
            model=ModelConfig(preset=self.preset, path=self.model, attn=self.attn[0], dtype=self.dtype,
                              nf4_blocksize=self.nf4_blocksize),
            train=TrainConfig(batch_size=self.batch_size, gradient_checkpointing=self.gradient_checkpointing),
            eval=EvalConfig(batch_size=self.eval_batch_size),
            data=DataConfig(data_dir=self.data, eval_limit=self.questions),
        )


def add_options(parser: pytest.Parser) -> None:
    """The bench's command-line options (pytest_addoption in conftest.py calls this)."""
    g = parser.getgroup("medqa-parity bench")
    g.addoption("--preset", default="tiny", choices=sorted(PRESETS),
                help="random-weight Mistral architecture (default: %(default)s)")
    g.addoption("--model", metavar="PATH", help="local model folder (safetensors); overrides --preset")
    g.addoption("--data", metavar="DIR", help="MedQA folder with train/dev/test .jsonl (default: bundled subset)")
    g.addoption("--attn", default="sdpa",
                help="comma-separated attention kernels; each is a parameter of the train/infer/accuracy cases "
                     "(default: %(default)s)")
    g.addoption("--bench-batch-size", type=int, default=8,
                help="train batch, and the larger of the two prefill and decode batches (1 and this) "
                     "(default: %(default)s)")
    g.addoption("--bench-seq-len", type=int, default=256,
                help="prompt tokens for prefill/decode (default: %(default)s)")
    g.addoption("--questions", type=int, default=None,
                help=f"MedQA test questions for scoring and accuracy (default: {CPU_QUESTIONS} on CPU, all on a GPU)")
    g.addoption("--train-rounds", type=int, default=None,
                help=f"timed train steps per case, each on the next distinct batch of the training loop's order "
                     f"(default: {CPU_TRAIN_ROUNDS} on CPU, {GPU_TRAIN_ROUNDS} on a GPU)")
    g.addoption("--infer-rounds", type=int, default=5, help="timed rounds per inference case (default: %(default)s)")
    g.addoption("--warmup-rounds", type=int, default=2,
                help="untimed rounds first (compile, autotune, allocator) (default: %(default)s)")
    g.addoption("--decode-tokens", type=int, default=None,
                help=f"new tokens per decode round (default: {CPU_DECODE_TOKENS} on CPU, {GPU_DECODE_TOKENS} on a GPU)")
    g.addoption("--no-reference", action="store_true", help="skip the reference (common-guide QLoRA) arm")
    g.addoption("--bench-eval-batch-size", type=int, default=None,
                help="questions per scoring forward (default: medqa-parity run's, 64 on a GPU and 8 on CPU)")
    g.addoption("--train-profiles", default=None, metavar="NAMES",
                help="comma-separated training profiles, each one more train case of ours beside the reference: "
                     f"{', '.join(NAMED_SETTINGS)}, each optionally with +KEY=VALUE overrides "
                     "(e.g. capped+batch_size=16) (default: every one but 'default' on a GPU, none on CPU)")
    g.addoption("--dtype", default="auto", choices=DTYPES,
                help="compute dtype, as medqa-parity run --dtype (default: %(default)s)")
    g.addoption("--nf4-blocksize", type=int, default=None, choices=NF4_BLOCKSIZES,
                help="4-bit block size, as medqa-parity run --nf4-blocksize (default: bitsandbytes')")
    g.addoption("--peer-batch-size", type=int, default=None,
                help="batch of the liger-batch peer case (default: the max-speed profile's)")
    g.addoption("--decode-batches", default=None, metavar="ROWS",
                help="comma-separated batches of the decode cases (default: 1 and --bench-batch-size)")
    g.addoption("--nf4-kernels", default=None, metavar="NAMES",
                help="4-bit kernels of the compiled decode case, one arm each: triton (ours, "
                     "medqa_core.engine.kernels), bitsandbytes (default: both on a GPU, bitsandbytes on CPU); "
                     "ours' A/B switches, recorded in each case: MEDQA_PDL=0, MEDQA_INDUCTOR_TUNING=1, "
                     "MEDQA_NF4_SCALES=float32, MEDQA_NF4_LAYOUT=tiled; either arm's: MEDQA_PREFILL=eager "
                     "(docs/decode.md)")
    g.addoption("--decode-attention", default="auto", metavar="NAMES",
                help="attentions of the compiled decode steps, comma-separated, one arm each (several: the case "
                     "names end in attn-NAME): triton (ours, one-token split-key kernel), model (the model's own, "
                     "--attn's), auto (ours where measured ahead) (default: %(default)s); recorded in each case's "
                     "'decode_attention'")
    g.addoption("--gradient-checkpointing", action="store_true",
                help="our arm recomputes activations (the memory-capped profile); the reference always does")


