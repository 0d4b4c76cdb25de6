"""`medqa-parity` command line: run / train / evaluate / trace / fingerprint / report / compare / export-mlflow /
gate / check.

The only home of logging setup and progress bars; everything else is library code. ``--profile``
names training settings everywhere; the subcommand that traces a train step is ``trace`` (``profile``,
its older name, still works and is not listed).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medqa_core.engine.config import (
    ATTN_KERNELS,
    AUTO_SETTINGS,
    COMPILE_MODES,
    DTYPES,
    LOSS_ON,
    MEMORY_CAP_GIB,
    NAMED_SETTINGS,
    NF4_BLOCKSIZES,
    PRESETS,
    QUANT_MODES,
    QUANT_STORAGE,
    SETTINGS_KEYS,
    SHARD_MODES,
    ConfigError,
    DataConfig,
    EvalConfig,
    LoraSettings,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_named_settings,
)
from medqa_core.measure.device import BACKENDS

logger = logging.getLogger("medqa_core")

DEFAULTS = RunConfig()


def _add_model_args(p: argparse.ArgumentParser, remote_code: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--preset", default=DEFAULTS.model.preset, choices=sorted(PRESETS),
                   help="random-weight Mistral architecture to generate (default: %(default)s)")
    g.add_argument("--model", metavar="PATH", help="local model folder (safetensors); overrides --preset")
    g.add_argument("--allow-pickle", action="store_true",
                   help="also load .bin/.pt pickle weights (they can run code: only for folders you trust)")
    if remote_code:  # (trace loads presets and folders without custom code only)
        g.add_argument("--trust-remote-code", action="store_true",
                       help="run a --model folder's own Python code (config.json auto_map); refused without it")
    g.add_argument("--seed", type=int, default=DEFAULTS.model.seed, help="preset weight seed (default: %(default)s)")
    g.add_argument("--quant", default=DEFAULTS.model.quant, choices=QUANT_MODES,
                   help="nf4 (QLoRA) or fp4: bitsandbytes 4-bit base; none: a base in the compute dtype "
                        "(default: %(default)s)")
    g.add_argument("--dtype", default=DEFAULTS.model.dtype, choices=DTYPES,
                   help="compute dtype of training and scoring; auto: bf16 where the device has it natively, "
                        "else fp16 on a GPU and fp32 on a CPU (default: %(default)s)")
    g.add_argument("--nf4-blocksize", type=int, choices=NF4_BLOCKSIZES,
                   help="4-bit quantization block size (default: bitsandbytes' own, 64; CDNA GPUs used 128 "
                        "before bitsandbytes changed it)")
    g.add_argument("--no-nf4-double-quant", dest="nf4_double_quant", action="store_false",
                   help="do not quantize the 4-bit scales again")
    g.add_argument("--nf4-quant-storage", default=DEFAULTS.model.nf4_quant_storage, choices=QUANT_STORAGE,
                   help="dtype the 4-bit weights are packed into (default: %(default)s)")
    g.add_argument("--attn", default=DEFAULTS.model.attn, choices=ATTN_KERNELS,
                   help="attention kernel; sdpa-* forces one SDPA backend and fails if it cannot run "
                        "(default: %(default)s)")
    g.add_argument("--backend", default=DEFAULTS.backend, choices=BACKENDS,
                   help="device backend; auto takes what torch has (default: %(default)s)")


def _add_data_args(p: argparse.ArgumentParser, train: bool, evaluate: bool) -> None:
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="DIR", help="MedQA folder with train/dev/test .jsonl (default: bundled subset)")
    if train:
        d.add_argument("--train-split", default=DEFAULTS.data.train_split,
                       help="split to fine-tune on; auto: train if present, else dev (default: %(default)s)")
        d.add_argument("--train-limit", type=int, help="use only the first N training questions")
    if evaluate:
        d.add_argument("--eval-split", default=DEFAULTS.data.eval_split,
                       help="split to evaluate (default: %(default)s)")
        d.add_argument("--eval-limit", type=int, help="use only the first N evaluation questions")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-batch-size", type=int, default=DEFAULTS.eval.batch_size,
                   help="questions per forward call (default: 64 on a GPU, 8 on CPU)")
    e.add_argument("--eval-max-seq-len", type=int, default=DEFAULTS.eval.max_seq_len,
                   help="longest prompt scored, in tokens (default: %(default)s)")
    e.add_argument("--eval-no-packing", dest="eval_packing", action="store_false",
                   help="one prompt per padded row instead of packing prompts into shared rows")


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", default=DEFAULTS.results_dir, metavar="DIR",
                   help="folder for the run record (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")


def _settings_text(settings: dict[str, Any]) -> str:
    """A profile's settings as a reader types them: "batch_size=32, compile=on" (no dict reprs)."""
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "the defaults"


def _settings_help() -> str:
    names = "; ".join(f"{name} ({_settings_text(settings)})" for name, settings in NAMED_SETTINGS.items())
    caps = ", ".join(f"{name} <= {cap:g} GiB" for name, cap in MEMORY_CAP_GIB.items())
    keys = ", ".join(SETTINGS_KEYS)
    return (f"named training settings that replace the flags they set: {names}. +KEY=VALUE overrides one "
            f"({keys}), e.g. capped+batch_size=16 or max-speed+fp8=true (docs/usage.md). Peak memory promised: "
            f"{caps}. auto (the default unless a batch, "
            "recompute, packing, compile, --lora-dropout or --attn flag is given): on a GPU the fastest of "
            "those that fits the card's memory, on CPU default")


def _add_train_args(p: argparse.ArgumentParser, outputs: bool = True) -> None:
    """The fine-tuning flags; ``outputs=False`` (trace) leaves out what only a saved fine-tune uses: the adapter,
    checkpoints and torchrun processes."""
    t = p.add_argument_group("fine-tuning")
    tc = DEFAULTS.train
    t.add_argument("--epochs", type=float, default=tc.epochs, help="passes over the train split (default: %(default)s)")
    t.add_argument("--max-steps", type=int, help="train this many optimizer steps instead of --epochs")
    t.add_argument("--batch-size", type=int, default=tc.batch_size, help="examples per step (default: %(default)s)")
    t.add_argument("--lr", type=float, default=tc.lr, help="AdamW learning rate (default: %(default)s)")
    t.add_argument("--warmup-steps", type=int, default=tc.warmup_steps, help="linear LR warm-up (default: %(default)s)")
    t.add_argument("--max-seq-len", type=int, default=tc.max_seq_len,
                   help="longest training example; longer prompts are cut from the left (default: %(default)s)")
    t.add_argument("--loss-on", default=tc.loss_on, choices=LOSS_ON,
                   help="answer: loss on the answer token only; all: every token (default: %(default)s)")
    t.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    t.add_argument("--checkpoint-layers", type=int, metavar="N",
                   help="with --gradient-checkpointing: recompute only the first N decoder layers (default: all)")
    t.add_argument("--compile", default=DEFAULTS.train.compile, choices=COMPILE_MODES,
                   help="torch.compile each decoder layer; auto: on GPUs only; where Inductor cannot run, eager, "
                        "recorded (default: %(default)s)")
    t.add_argument("--profile", metavar="NAME[+KEY=VALUE...]", help=_settings_help())
    t.add_argument("--no-packing", dest="packing", action="store_false",
                   help="pad each example to the batch's longest instead of packing examples into shared rows")
    t.add_argument("--pack-len", type=int, default=tc.pack_len,
                   help="tokens per packed row (default: %(default)s)")
    t.add_argument("--train-seed", type=int, default=tc.seed, help="data order seed (default: %(default)s)")
    lc = DEFAULTS.lora
    t.add_argument("--lora-rank", type=int, default=lc.rank, help="(default: %(default)s)")
    t.add_argument("--lora-alpha", type=int, default=lc.alpha, help="(default: %(default)s)")
    t.add_argument("--lora-dropout", type=float, default=lc.dropout, help="(default: %(default)s)")
    t.add_argument("--lora-targets", default=",".join(lc.target_modules),
                   help="comma-separated module names, or all-linear (default: %(default)s)")
    if not outputs:
        return
    t.add_argument("--adapter-out", metavar="DIR",
                   help="where to save the LoRA adapter (default: runs/adapters/TIME-PID-RANDOM)")
    c = p.add_argument_group("checkpoints")
    c.add_argument("--checkpoint-dir", metavar="DIR", help="write training checkpoints here (and at the end)")
    c.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    c.add_argument("--keep-checkpoints", type=int, default=tc.keep_checkpoints,
                   help="newest checkpoints kept (default: %(default)s)")
    c.add_argument("--resume", metavar="DIR",
                   help="continue from the newest valid checkpoint in DIR (docs/fault-tolerance.md: what may change)")
    t.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this host, started through torchrun (default: %(default)s)")


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 0,1,2,3,4") from e
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return seeds


def _add_runset_args(p: argparse.ArgumentParser) -> None:
    from medqa_core.compare.runsets import DEFAULT_TARGET_LOSS_NATS  # numpy and scipy only, no torch

    r = p.add_argument_group("run sets (docs/parity-reports.md, \"Run sets\")")
    r.add_argument("--repeats", type=int, metavar="N",
                   help="fine-tune N times, seeds --train-seed .. --train-seed+N-1 (adapter init, data order, "
                        "dropout), then the first seed once more (the same-seed floor); the model loads once; "
                        "saves every run record and a run-set file naming them (runsets/ beside --results)")
    r.add_argument("--seeds", type=_seed_list, metavar="LIST",
                   help="a run set of these seeds (comma-separated, distinct) instead of --repeats")
    r.add_argument("--eval-every", type=int, metavar="STEPS",
                   help="score the eval loss every STEPS steps while fine-tuning (the eval curve time to target is "
                        "read from; default in a run set: 8 points a run, none otherwise)")
    r.add_argument("--curve-questions", type=int, default=128, metavar="N",
                   help="questions each eval-curve point scores, the first of the eval split (default: %(default)s)")
    r.add_argument("--target-loss", type=float, default=DEFAULT_TARGET_LOSS_NATS, metavar="NATS",
                   help="eval-loss target of time to target (default: %(default)s)")
    r.add_argument("--runset-dir", metavar="DIR", help="folder for the run-set file (default: runsets/ beside "
                                                       "--results)")


def set_plan(args: argparse.Namespace) -> Any:
    """The run set ``args`` ask for (``--repeats`` or ``--seeds``), or None for a single run.

    Raises:
        ConfigError: both flags, a count below 1, or a repeated seed.
    """
    from medqa_core.run import SetPlan

    repeats, seeds = getattr(args, "repeats", None), getattr(args, "seeds", None)
    if repeats is None and seeds is None:
        return None
    if repeats is not None and seeds is not None:
        raise ConfigError("give --repeats N or --seeds LIST, not both")
    if repeats is not None and repeats < 1:
        raise ConfigError(f"--repeats {repeats}: give 1 or more (5 or more for a spread the report can judge)")
    if getattr(args, "nproc", 1) > 1:
        raise ConfigError("--repeats/--seeds run on one process; drop --nproc")
    if getattr(args, "resume", None) or getattr(args, "checkpoint_dir", None):
        raise ConfigError("--repeats/--seeds do not checkpoint or resume; drop --resume/--checkpoint-dir")
    if args.eval_every is not None and args.eval_every < 1:
        raise ConfigError(f"--eval-every {args.eval_every}: give 1 or more")
    if args.curve_questions < 1:
        raise ConfigError(f"--curve-questions {args.curve_questions}: give 1 or more")
    seeds = seeds or tuple(range(args.train_seed, args.train_seed + repeats))
    try:
        return SetPlan(seeds=seeds, eval_every=args.eval_every, curve_questions=args.curve_questions,
                       target_loss_nats=args.target_loss, runset_dir=args.runset_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def single_run_curve(args: argparse.Namespace) -> Any:
    """``run --eval-every`` without a run set: the eval curve of one run, or None."""
    every = getattr(args, "eval_every", None)
    if every is None:
        return None
    if getattr(args, "nproc", 1) > 1:
        raise ConfigError("--eval-every scores on one process; drop --nproc")
    from medqa_core.engine.curve import EvalCurve

    try:
        return EvalCurve(every, args.curve_questions)
    except ValueError as e:
        raise ConfigError(f"--eval-every/--curve-questions: {e}") from e


def cmd_runset(args: argparse.Namespace, plan: Any) -> int:
    """``run --repeats N`` / ``--seeds``: the runs, one line each, then the set's summary."""
    from medqa_core.compare.runsets import RunFigures, set_summary_lines, summarize_loaded
    from medqa_core.engine.preemption import Interrupted, StopOnSignals
    from medqa_core.results.runset import load_runset
    from medqa_core.run import execute_set

    cfg = build_config(args)
    bars = ProgressBars()

    def on_run(i: int, total: int, record: Any, path: Any) -> None:
        bars.bars.clear()  # each run draws its own bars
        role = "repeat" if i >= len(plan.seeds) else "seed"
        fig = RunFigures.from_record(record, record.config["train"]["seed"], role)
        print(f"run {i + 1}/{total} seed {fig.seed} ({role}): accuracy {100 * fig.accuracy:.1f}%, eval loss "
              f"{fig.eval_loss_nats:.4f} nats, {len(fig.loss_per_step)} steps in {sum(fig.step_time_s):.1f} s "
              f"-> {path}")

    try:
        with StopOnSignals() as stop:
            runset, path = execute_set(cfg, plan, progress=bars, stop=stop, on_run=on_run)
    except Interrupted as e:
        print(f"medqa-parity: interrupted by {e.signal_name}; the runs finished before are saved", file=sys.stderr)
        return e.exit_code
    _, loaded = load_runset(path)
    print("\n".join(set_summary_lines(summarize_loaded(loaded, runset.target_loss_nats, "set"))))
    for note in runset.notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0 if len(loaded) == len(plan.order()) else 3


def settings_flags_are_defaults(args: argparse.Namespace, train: TrainConfig) -> bool:
    """No flag whose setting a profile also sets (batch, recompute, packing, compile, LoRA dropout, attention) was
    changed: "auto" may choose them without overriding what the user asked for."""
    defaults = DEFAULTS.train
    return all(getattr(train, key) == getattr(defaults, key) for key in
               ("batch_size", "gradient_checkpointing", "checkpoint_layers", "compile", "packing", "pack_len")) \
        and args.lora_dropout == DEFAULTS.lora.dropout and args.attn == DEFAULTS.model.attn


def build_config(args: argparse.Namespace) -> RunConfig:
    """Turn parsed arguments into a RunConfig (validation happens in the dataclasses)."""
    train = TrainConfig()
    lora = LoraSettings()
    if hasattr(args, "epochs"):
        train = TrainConfig(
            epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
            warmup_steps=args.warmup_steps, max_seq_len=args.max_seq_len, loss_on=args.loss_on,
            gradient_checkpointing=args.gradient_checkpointing, seed=args.train_seed,
            packing=args.packing, pack_len=args.pack_len, checkpoint_every=getattr(args, "checkpoint_every", None),
            keep_checkpoints=getattr(args, "keep_checkpoints", DEFAULTS.train.keep_checkpoints),
            checkpoint_layers=args.checkpoint_layers, compile=args.compile,
            shard=getattr(args, "shard", DEFAULTS.train.shard),
        )
        if args.profile == AUTO_SETTINGS or (args.profile is None and settings_flags_are_defaults(args, train)):
            train = dataclasses.replace(train, profile=AUTO_SETTINGS)  # run.resolve_auto_settings, on the device
        elif args.profile:
            train = apply_named_settings(args.profile, train)
        targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
        lora = LoraSettings(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                            target_modules=targets)
    ev, data = DEFAULTS.eval, DEFAULTS.data
    if hasattr(args, "eval_batch_size"):
        ev = EvalConfig(batch_size=args.eval_batch_size, max_seq_len=args.eval_max_seq_len,
                        packing=args.eval_packing, pack_len=max(args.eval_max_seq_len, DEFAULTS.eval.pack_len))
    return RunConfig(
        model=ModelConfig(preset=args.preset, path=args.model, seed=args.seed, quant=args.quant, attn=args.attn,
                          allow_pickle=args.allow_pickle, dtype=args.dtype, nf4_blocksize=args.nf4_blocksize,
                          nf4_double_quant=args.nf4_double_quant, nf4_quant_storage=args.nf4_quant_storage),
        lora=lora, train=train, eval=ev,
        # A command without a split's flags keeps that split's defaults (train does not evaluate, evaluate does
        # not train).
        data=DataConfig(data_dir=args.data, train_split=getattr(args, "train_split", data.train_split),
                        eval_split=getattr(args, "eval_split", data.eval_split),
                        train_limit=getattr(args, "train_limit", None), eval_limit=getattr(args, "eval_limit", None)),
        backend=args.backend, results_dir=getattr(args, "results", DEFAULTS.results_dir),
    )


class ProgressBars:
    """One tqdm bar per phase, drawn on stderr.

    The library reports (phase, done, total) before its first batch or step, so a bar exists from the
    start and its rate and ETA include the first one; a resumed fine-tune's bar starts at its step.
    """

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, phase: str, done: int, total: int, extra: dict[str, float]) -> None:
        import math

        from tqdm import tqdm

        bar = self.bars.get(phase)
        if bar is None:
            bar = self.bars[phase] = tqdm(total=total, initial=done, desc=phase,
                                          unit="q" if "evaluate" in phase else "step", leave=True, dynamic_ncols=True)
        bar.update(done - bar.n)
        shown = {k: f"{v:.4f}" for k, v in extra.items() if math.isfinite(v)}  # no loss before the first step
        if shown:
            bar.set_postfix(shown, refresh=False)
        if done >= total:
            bar.close()

    def close(self) -> None:
        """End the bars a stopped phase left open, so that a line printed next starts a line of its own."""
        for bar in self.bars.values():
            bar.close()


def relaunch_with_torchrun(nproc: int, argv: Sequence[str]) -> int:
    """Start this command again under torchrun (PyTorch's launcher), one process per device."""
    import subprocess

    rest = [a for i, a in enumerate(argv) if a != "--nproc" and (i == 0 or argv[i - 1] != "--nproc")
            and not a.startswith("--nproc=")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "medqa_core.cli", *rest]
    return subprocess.call(cmd)


def interrupted_line(failure: dict[str, Any], path: Any) -> str:
    """The one line printed when a signal stopped the job (``failure`` kind "interrupted")."""
    at = f" after step {failure['step']} of {failure['steps']}" if failure.get("step") is not None else ""
    if failure.get("checkpoint"):
        then = f"; checkpoint {failure['checkpoint']}: continue with --resume {Path(failure['checkpoint']).parent}"
    elif failure["phase"] != "fine-tune":
        then = ""
    elif failure.get("step") is None:
        then = "; a second signal stopped it mid-step (that step is lost; --resume continues from the last checkpoint)"
    else:
        then = "; no checkpoint written (no --checkpoint-dir)"
    return (f"medqa-parity: interrupted by {failure['signal']} during {failure['phase']}{at}{then}; "
            f"what finished is saved in {path}")


# Exit code of a job whose output could not be written (full disk, I/O error) after the work began.
WRITE_FAILED = 5


def write_failure_line(failure: dict[str, Any], path: Any) -> str:
    """The one line printed when a checkpoint could not be written (``failure`` kind "write")."""
    from medqa_core.results.storage import size_text

    free = "free space unknown" if failure.get("free_bytes") is None else f"{size_text(failure['free_bytes'])} free"
    line = (f"medqa-parity: error: cannot write checkpoint {failure['path']} ({failure['message']}; {free} there) "
            f"after step {failure.get('step')} of {failure.get('steps')}; training stopped")
    if failure.get("adapter"):
        line += f"; the finished fine-tune's adapter is saved in {failure['adapter']}"
    elif failure.get("checkpoint"):
        line += (f"; free space (or move the folder to a larger disk), then continue with --resume "
                 f"{Path(failure['checkpoint']).parent} (newest checkpoint {Path(failure['checkpoint']).name})")
    else:
        line += "; no checkpoint was written: free space or give --checkpoint-dir another disk"
    return f"{line}; what finished is saved in {path}"


def _print_unsaved(record: Any) -> None:
    """A record that could be saved nowhere: its figures, then the record itself as JSON, on stdout."""
    from medqa_core.report.run_summary import summary_lines

    print("\n".join(summary_lines(record, "(not saved: see below)")))
    print(json.dumps(record.to_dict(), indent=1))


def cmd_execute(args: argparse.Namespace) -> int:
    from medqa_core.engine.distributed import launched_by_torchrun
    from medqa_core.engine.preemption import Interrupted, StopOnSignals, exit_code
    from medqa_core.engine.sharded import check_sharding
    from medqa_core.report.run_summary import summary_lines
    from medqa_core.run import OutputWriteError, execute

    plan = set_plan(args) if args.command == "run" else None
    if plan is not None:
        return cmd_runset(args, plan)
    cfg = build_config(args)  # a bad setting fails here, once, not in each process torchrun would start
    if getattr(args, "nproc", 1) > 1 and not launched_by_torchrun():
        checkpointing = bool(getattr(args, "checkpoint_dir", None) or getattr(args, "resume", None))
        check_sharding(cfg, args.command, args.nproc, checkpointing)
        return relaunch_with_torchrun(args.nproc, args.argv)
    bars = ProgressBars()
    try:
        with StopOnSignals() as stop:  # SIGTERM/SIGINT: stop at the next step, checkpoint, save the record
            record, path = execute(cfg, kind=args.command, adapter_dir=getattr(args, "adapter", None),
                                   adapter_out=getattr(args, "adapter_out", None), progress=bars,
                                   checkpoint_dir=getattr(args, "checkpoint_dir", None),
                                   resume=getattr(args, "resume", None), stop=stop,
                                   trust_remote_code=args.trust_remote_code,
                                   command=" ".join(["medqa-parity", *args.argv]), curve=single_run_curve(args))
    except Interrupted as e:  # a second signal, or one before anything could be saved
        bars.close()
        print(f"medqa-parity: interrupted by {e.signal_name}; nothing was saved", file=sys.stderr)
        return e.exit_code
    except OutputWriteError as e:  # the work is done; an output went elsewhere (or nowhere)
        bars.close()
        if e.saved_path is not None:
            print("\n".join(summary_lines(e.record, e.saved_path)))
            where = "" if any("the record" in p for p in e.problems) else f"; the record is saved in {e.saved_path}"
        else:
            _print_unsaved(e.record)
            where = "; the record follows on stdout as JSON"
        print(f"medqa-parity: error: {e}{where}", file=sys.stderr)
        return WRITE_FAILED
    bars.close()
    interrupted = record.failure is not None and record.failure.get("kind") == "interrupted"
    if path is None:  # a rank other than 0 under torchrun: rank 0 prints and saves
        return exit_code(record.failure["signal"]) if interrupted else 0
    print("\n".join(summary_lines(record, path)))
    if interrupted:
        print(interrupted_line(record.failure, path), file=sys.stderr)
        return exit_code(record.failure["signal"])
    if stop.requested() and not record.failure:
        print(f"medqa-parity: note: {stop.requested()} arrived after the last step; the job finished and its "
              f"record is saved in {path}", file=sys.stderr)
    if record.failure and record.failure.get("kind") == "write":
        print(write_failure_line(record.failure, path), file=sys.stderr)
        return WRITE_FAILED
    if record.failure:
        print(f"medqa-parity: error: out of memory during {record.failure['phase']} "
              f"({record.failure['message']}); lower --batch-size, --eval-batch-size or --pack-len, or turn on "
              f"--gradient-checkpointing (or --profile capped). What finished before is saved in {path}",
              file=sys.stderr)
        return 3
    return 0


# Where `trace` saves by default: git-ignored (runs/), so that tracing leaves the checkout clean and the records
# made after it are not marked git_dirty. Traces worth keeping are committed under results/traces/ by hand.
TRACE_DIR = "runs/trace"


def cmd_trace(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from medqa_core.measure.trace import format_profile, save_profiles
    from medqa_core.run import trace_training

    names = [n.strip() for n in (args.profile or "default").split(",") if n.strip()]
    args.profile = None  # each traced profile applies its own settings over the flags
    cfg = build_config(args)
    for name in names:
        apply_named_settings(name)  # an unknown name fails here, before the model loads
    profiles, meta = trace_training(cfg, names, args.steps, args.warmup)
    for name, p in profiles.items():
        print(format_profile(f"{name} ({meta['settings'][name]['compile']['detail']})", p))
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or f"{TRACE_DIR}/{stamp}_{cfg.model.name}_{meta['fingerprint'].get('backend', 'cpu')}.json"
    print(f"wrote {save_profiles(out, profiles, meta)}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    from medqa_core.measure.device import resolve_device
    from medqa_core.measure.fingerprint import machine_fingerprint

    fp = machine_fingerprint(resolve_device(args.backend))
    print(json.dumps(fp, indent=2))
    if fp.get("backend") != "rocm":
        print("note: ROCm support is written (torch.version.hip, same torch.cuda API) but has not been run by "
              "this project on a ROCm machine", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from medqa_core.report.render import make_report, verdict_lines

    try:
        from medqa_core.results.runset import is_runset_file

        sets = [p for p in args.runs if is_runset_file(p)]
        records = [p for p in args.runs if p not in sets]
        report, written = make_report(records, args.out, baseline=args.baseline, margin_pp=args.margin,
                                      runsets=sets, loss_margin_nats=args.loss_margin)
    except OSError as e:  # the output folder: nothing was moved into it
        print(f"medqa-parity: error: cannot write the report to {args.out} ({e.strerror or e}); "
              "give --out a folder you can write", file=sys.stderr)
        return 2
    head, findings = verdict_lines(report)
    print(head)
    for f in findings:
        print(f"  {f.status.upper()}: {f.text}")
    for note in report.notes:
        print(f"  note: {note}")
    if report.runsets is not None:
        from medqa_core.report.runsets import verdict_lines as runset_lines

        print(f"run sets: {len(report.runsets.summaries)} (baseline {report.runsets.summaries[0].label})")
        for line in runset_lines(report.runsets):
            print(f"  {line}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from medqa_core.report.machine import compare_machine, comparison_lines, newest_record

    mine = Path(args.record)
    if mine.is_dir() or mine.suffix != ".json":  # a folder, or one not made yet: "no run record in ..."
        mine = newest_record(mine)
    print("\n".join(comparison_lines(compare_machine(mine, args.committed or committed_records_dir(),
                                                        margin_pp=args.margin))))
    return 0


def cmd_export_mlflow(args: argparse.Namespace) -> int:
    from medqa_core.report.mlflow_export import default_tracking_uri, export_files

    uri = args.tracking_uri or default_tracking_uri()
    for e in export_files(args.files, tracking_uri=args.tracking_uri, experiment=args.experiment):
        print(f"{'already there' if e.existed else 'exported'}: {e.name} ({e.path}) -> run {e.run_id}")
    print(f"MLflow store: {uri}, experiment {args.experiment!r} (view: mlflow ui --backend-store-uri {uri})")
    return 0


def committed_records_dir() -> Path:
    """The committed run records: results/runs of the working directory, else of the checkout this package runs
    from (an editable install run elsewhere)."""
    here = Path("results/runs")
    if here.is_dir():
        return here
    import medqa_core

    return Path(medqa_core.__file__).resolve().parent.parent / "results" / "runs"


def cmd_gate(args: argparse.Namespace) -> int:
    import os

    from medqa_core.gate.decide import run_gate
    from medqa_core.gate.render import append_step_summary, render_text
    from medqa_core.gate.thresholds import load_thresholds

    thresholds = load_thresholds(args.config, args.threshold or [])
    baseline = args.baseline
    if args.baseline_runset:
        from medqa_core.gate.runset import baseline_record, with_runset

        baseline = baseline or baseline_record(args.baseline_runset)
    elif not baseline:
        print("medqa-parity: error: give --baseline RUN or --baseline-runset RUNSET", file=sys.stderr)
        return 2
    result = run_gate(baseline, args.candidate, thresholds, allow_not_compared=args.allow_not_compared)
    if args.baseline_runset:
        result = with_runset(result, args.baseline_runset, args.candidate)
    print(render_text(result))
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        try:
            append_step_summary(result, summary)
        except OSError as e:  # the verdict stands; only its summary is lost
            print(f"medqa-parity: warning: cannot write GITHUB_STEP_SUMMARY {summary} ({e.strerror})", file=sys.stderr)
    return result.exit_code


def cmd_check(args: argparse.Namespace) -> int:
    from medqa_core.compare.claims import ClaimError, check_claim, exit_code, load_claim, load_sets, render_lines

    try:
        claim = load_claim(args.claim)
        lines = check_claim(claim, load_sets(args.runsets))
    except ClaimError as e:
        print(f"medqa-parity: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(render_lines(claim, lines)))
    return exit_code(lines)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _version() -> str:
    try:
        return importlib.metadata.version("medqa-parity")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Parser(argparse.ArgumentParser):
    """argparse's parser with raw help text and no abbreviated options, for the top level and (argparse makes them
    of the parent's class) every command: ``run --adapter X`` is refused, not taken for ``--adapter-out X``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="medqa-parity",
        description="QLoRA fine-tuning and MedQA evaluation benchmarks, the same on CUDA, ROCm and CPU.",
        epilog=_examples("medqa-parity run                       # the tiny preset on the bundled subset",
                         "medqa-parity compare                   # your newest run beside the committed machines",
                         "medqa-parity report A.json B.json --out report/",
                         "medqa-parity gate --baseline base.json --candidate new.json"))
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_job_commands(sub)
    _add_trace_command(sub)
    _add_fingerprint_command(sub)
    _add_result_commands(sub)
    _add_verdict_commands(sub)
    return parser


def _add_job_commands(sub: argparse._SubParsersAction) -> None:
    """The commands that run a job and save a run record: run, train, evaluate."""
    p = sub.add_parser("run", help="evaluate, fine-tune with QLoRA, evaluate again; save a run record",
                       description="Evaluate the model on MedQA, fine-tune it with QLoRA, evaluate again, and save "
                                   "a fingerprinted run record. With no arguments: the tiny preset on the bundled "
                                   "MedQA subset.",
                       epilog=_examples("medqa-parity run",
                                        "medqa-parity run --preset mistral-7b --data ~/medqa --profile max-speed",
                                        "medqa-parity run --model ./my-mistral --eval-limit 200"))
    _add_model_args(p)
    _add_data_args(p, train=True, evaluate=True)
    _add_eval_args(p)
    _add_train_args(p)
    _add_runset_args(p)
    _add_output_args(p)
    p.set_defaults(func=cmd_execute)
    p = sub.add_parser("train", help="fine-tune with QLoRA and save the adapter (no evaluation)",
                       description="Fine-tune with QLoRA, save the adapter and a run record.",
                       epilog=_examples("medqa-parity train --max-steps 20",
                                        "medqa-parity train --checkpoint-dir ckpt --checkpoint-every 50",
                                        "medqa-parity train --resume ckpt"))
    _add_model_args(p)
    _add_data_args(p, train=True, evaluate=False)
    _add_train_args(p)
    p.add_argument("--shard", default=DEFAULTS.train.shard, choices=SHARD_MODES,
                   help="with --nproc: ddp keeps the whole model on every process; fsdp splits it over them "
                        "(FSDP2, for a model too large for one device; needs --nf4-quant-storage bf16) "
                        "(default: %(default)s)")
    _add_output_args(p)
    p.set_defaults(func=cmd_execute)
    p = sub.add_parser("evaluate", help="score MedQA options with the base model or a saved adapter",
                       description="Score every question's four options (lm-evaluation-harness "
                                                        "medqa_4options) and save a run record.",
                       epilog=_examples("medqa-parity evaluate --eval-limit 100",
                                        "medqa-parity evaluate --adapter runs/adapters/20261125T225615Z-4242-1a2b3c"))
    _add_model_args(p)
    _add_data_args(p, train=False, evaluate=True)
    _add_eval_args(p)
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder saved by train/run")
    _add_output_args(p)
    p.set_defaults(func=cmd_execute)


def _add_trace_command(sub: argparse._SubParsersAction) -> None:
    """trace: where a train step's time goes, per training profile."""
    p = sub.add_parser("trace", help="trace our train step: where the time goes, per training profile",
                       description="Run a few train steps under torch.profiler for each training profile named by "
                                   "--profile and group the kernel time (matmul, 4-bit dequantization, attention, "
                                   "optimizer, compiled fusions, element-wise) against the step's wall time. Saves "
                                   "JSON. (Formerly the 'profile' command, which still works.)",
                       epilog=_examples("medqa-parity trace --profile default,eager --steps 3",
                                        "medqa-parity trace --preset mistral-7b --profile capped+batch_size=16"))
    _add_model_args(p, remote_code=False)
    _add_data_args(p, train=True, evaluate=False)
    _add_train_args(p, outputs=False)  # nothing is saved but the trace: no adapter, checkpoints or torchrun
    # --profile takes a comma-separated list here: each profile is traced in turn.
    p.add_argument("--profiles", dest="profile", help=argparse.SUPPRESS)  # the older name of --profile here
    p.add_argument("--steps", type=int, default=3, help="traced steps per profile (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="steps before tracing (default: %(default)s)")
    p.add_argument("--out", metavar="FILE", help=f"JSON file (default: {TRACE_DIR}/TIME_MODEL_BACKEND.json)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_trace)


def _add_fingerprint_command(sub: argparse._SubParsersAction) -> None:
    """fingerprint: this machine, as a record carries it."""
    p = sub.add_parser("fingerprint", help="print this machine's fingerprint as JSON",
                       epilog=_examples("medqa-parity fingerprint", "medqa-parity fingerprint --backend cpu"))
    p.add_argument("--backend", default="auto", choices=BACKENDS)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_fingerprint)


def _add_result_commands(sub: argparse._SubParsersAction) -> None:
    """The commands over saved results: report, compare, export-mlflow."""
    from medqa_core.compare.parity import DEFAULT_MARGIN_PP  # numpy and scipy only, no torch
    from medqa_core.compare.runsets import DEFAULT_LOSS_MARGIN_NATS  # scipy.stats: +0.5 s at module top
    from medqa_core.report.mlflow_export import DEFAULT_EXPERIMENT  # mlflow itself is imported only to export

    p = sub.add_parser("report", help="compare saved runs: tables, charts and a parity verdict (md + html)",
                       description="Compare run records and/or pytest-benchmark files of one model: speed and "
                                   "memory as ratios to a baseline, paired accuracy statistics (bootstrap CI, "
                                   "McNemar, TOST equivalence), log-probability and loss drift, settings, "
                                   "quantization and fingerprints. Writes report.md, report.html and PNG charts, "
                                   "all at once when complete.",
                       epilog=_examples("medqa-parity report runs/records/*.json --out report/",
                                        "medqa-parity report cuda.json rocm.json --baseline cuda.json --margin 2 "
                                        "--out report/"))
    p.add_argument("runs", nargs="+", metavar="RUN",
                   help="run record, pytest-benchmark JSON or run-set file (run --repeats): two or more runs, or one "
                        "run set or more; run sets get their own section (device effect against the seed spread)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for report.md, report.html and the charts")
    p.add_argument("--baseline", metavar="RUN", help="the run others are compared with (default: the first RUN)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN_PP, metavar="PP",
                   help="accuracy equivalence margin in percentage points (default: %(default)s)")
    p.add_argument("--loss-margin", type=float, default=DEFAULT_LOSS_MARGIN_NATS, metavar="NATS",
                   help="run sets: eval-loss equivalence margin in nats (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_report)
    p = sub.add_parser("compare", help="how does my machine compare? your newest run beside the committed ones",
                       description="Set your run record (default: the newest in runs/records) beside the committed "
                                   "records (results/runs) of the same model, kind and questions on other hardware, "
                                   "one per machine, and print what `medqa-parity report` concludes: the parity "
                                   "verdict with its findings, and every figure with its ratio to your run.",
                       epilog=_examples("medqa-parity run && medqa-parity compare",
                                        "medqa-parity compare runs/records/20261205T101500Z_run_tiny_cpu_1a2b3c4d.json",
                                        "medqa-parity compare --committed ~/medqa-parity/results/runs"))
    p.add_argument("record", nargs="?", default=DEFAULTS.results_dir, metavar="RECORD",
                   help="your run record, or a folder whose newest record is taken (default: %(default)s)")
    p.add_argument("--committed", metavar="DIR",
                   help="the committed records (default: results/runs here, else of the checkout installed)")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN_PP, metavar="PP",
                   help="accuracy equivalence margin in percentage points (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("export-mlflow", help="log run records and bench files to MLflow (pip install '.[mlflow]')",
                       description="Log each run record, and each arm and kernel of a pytest-benchmark file, as an "
                                   "MLflow run: speed, memory and accuracy as metrics (the loss curve by step), "
                                   "settings and config as params, device, kernel and git commit as tags, the file "
                                   "as an artifact. A file exported before is left as it is. Default store: MLflow's "
                                   "local SQLite file runs/mlflow.db (git-ignored).",
                       epilog=_examples("medqa-parity export-mlflow runs/records/*.json",
                                        "medqa-parity export-mlflow results/bench/*/*.json --experiment bench",
                                        "medqa-parity export-mlflow runs/records/*.json --tracking-uri "
                                        "http://mlflow.internal:5000"))
    p.add_argument("files", nargs="+", metavar="FILE", help="run record or pytest-benchmark JSON")
    p.add_argument("--tracking-uri", metavar="URI",
                   help="MLflow tracking URI: a server (http://...), a database (sqlite:///...), databricks "
                        "(default: sqlite:///runs/mlflow.db, made absolute)")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_export_mlflow)


def _add_verdict_commands(sub: argparse._SubParsersAction) -> None:
    """The commands that answer pass or fail: gate, check."""
    p = sub.add_parser("gate", help="fail (exit 1) when a candidate run regressed against a baseline run",
                       description="Compare a candidate run with a baseline (run records, or pytest-benchmark files "
                                   "matched case by case) on throughput (with a Mann-Whitney test of the rounds), "
                                   "peak memory, accuracy (McNemar where paired) and the parity verdict. Exit 0: "
                                   "the candidate holds; 1: something regressed (a table says what); 2: bad input; "
                                   "4: inconclusive, neither pass nor fail: a figure is NaN, inf, missing or "
                                   "incomplete (named with its file), a baseline case is missing in the candidate, "
                                   "both sides are one file, a change past twice its threshold is too noisy to "
                                   "call, or most checks could not be compared (other hardware or workload) and "
                                   "--allow-not-compared was not given. Appends a markdown summary to "
                                   "$GITHUB_STEP_SUMMARY when it is set.",
                       epilog=_examples("medqa-parity gate --baseline base.json --candidate new.json",
                                        "medqa-parity gate --config .ci/gate.toml --baseline "
                                        "results/bench/Linux-CPython-3.11-64bit/0007_cpu-ci.json --candidate "
                                        "/tmp/candidate.json",
                                        "medqa-parity gate --baseline a.json --candidate b.json "
                                        "--threshold speed_pct=20"))
    p.add_argument("--baseline", metavar="RUN", help="run record or pytest-benchmark JSON (or give --baseline-runset)")
    p.add_argument("--baseline-runset", metavar="RUNSET",
                   help="a run set (run --repeats) of the baseline: the candidate's fine-tuned accuracy and eval loss "
                        "are judged against the set's spread (one-sided prediction bound of one more run at alpha) "
                        "instead of accuracy_pp; --baseline defaults to the set's first seed run")
    p.add_argument("--candidate", required=True, metavar="RUN", help="the same kind of file, to be judged")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE",
                   help="override a threshold of [tool.medqa-parity.gate], e.g. speed_pct=10, memory_pct=10, "
                        "accuracy_pp=2, decode_tokens_per_s_pct=30 (repeatable)")
    p.add_argument("--config", metavar="TOML",
                   help="a TOML file with a [tool.medqa-parity.gate] table (default: the nearest pyproject.toml "
                        "above the working directory)")
    p.add_argument("--allow-not-compared", action="store_true",
                   help="pass (exit 0) even where most checks could not be compared, e.g. a CI runner of another "
                        "CPU model than the baseline's; the verdict line still counts them with their reasons")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_gate)
    p = sub.add_parser("check", help="check a published claim (CLAIM.toml) line by line against run sets",
                       description="Read a claim (model, method, hardware, software, dataset, epochs, wall time, "
                                   "accuracy, parity margin; see claims/*.toml) and answer each line: HOLDS, "
                                   "CONTRADICTED, or NOT CHECKABLE HERE with why (no such hardware among the run sets, "
                                   "random weights, another dataset or model). A claim attributed to a source "
                                   "([claim] attributed_to) is also checked against that source. Exit 0: every "
                                   "checkable line holds; 1: a line is contradicted; 2: bad input (the TOML or a run "
                                   "set, named with the key); 4: nothing could be checked here.",
                       epilog=_examples("medqa-parity check claims/mistral7b-mi250-repeated.toml "
                                        "results/runsets/*.json",
                                        "medqa-parity check claims/hackathon-qwen3-mi300x.toml"))
    p.add_argument("claim", metavar="CLAIM.toml",
                   help="the claim (format: claims/*.toml, medqa_core/compare/claims.py)")
    p.add_argument("runsets", nargs="*", metavar="RUNSET", help="run-set files (run --repeats) to check it against")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    p.set_defaults(func=cmd_check)


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args``, with a typo answered by the parser it belongs to and the nearest name, as git does:
    an unknown command by the top-level usage, an unknown option by its command's usage (argparse left both to
    the top level, without a suggestion).

    Raises:
        SystemExit: 2 after the usage and the error line, as argparse does.
    """
    commands: dict[str, argparse.ArgumentParser] = next(
        a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if argv and not argv[0].startswith("-") and argv[0] not in commands:
        parser.error(f"unknown command {argv[0]!r}{_did_you_mean(argv[0], list(commands))} (choose from "
                     f"{', '.join(commands)})")
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = commands[args.command]
        options = [o for action in sub._actions for o in action.option_strings if o.startswith("--")]
        first = extra[0].split("=", 1)[0]
        sub.error(f"unrecognized arguments: {' '.join(extra)}"
                  + (_did_you_mean(first, options) if first.startswith("-") else ""))
    return args


# Commands renamed, still accepted under their old names (not listed in help).
_ALIASES = {"profile": "trace"}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _ALIASES:
        argv[0] = _ALIASES[argv[0]]
    args = parse_args(build_parser(), argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    # transformers and bitsandbytes are chatty at INFO; their warnings still show.
    # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` inside get_peft_model: its warning, not
    # ours (our calls use the activation_checkpointing_* names), shown on every run otherwise.
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    # bitsandbytes' CPU backend would fetch a faster 4-bit kernel from the Hub (the `kernels` package); offline
    # that is never possible, and its warning on every run says nothing a user can act on.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # torch.profiler's C++ side (kineto: trace, and --attn flex's kernel probe) prints "USDT: ... profiler_start"
    # lines at its default log level, read once when it first starts; 6 is above all of its levels. A
    # KINETO_LOG_LEVEL of the user's own, or -v, keeps them.
    if not args.verbose:
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    for name in ("transformers", "bitsandbytes", "peft", "accelerate", "httpx", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING if not args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, *_user_errors()) as e:
        print(f"medqa-parity: error: {e}", file=sys.stderr)
        return 2
    except _write_errors() as e:  # a write outside a job's own handling (e.g. generating a preset)
        print(f"medqa-parity: error: {e}", file=sys.stderr)
        return WRITE_FAILED
    except KeyboardInterrupt:  # Ctrl-C outside a job's own handling (loading, report, gate)
        print("medqa-parity: interrupted by SIGINT", file=sys.stderr)
        return 130
    except Exception as e:
        # Nothing is imported here: memory may be exhausted. Without medqa_core.measure.timing no torch code ran,
        # and only a MemoryError can be out of memory.
        timing = sys.modules.get("medqa_core.measure.timing")
        if not (isinstance(e, MemoryError) or (timing is not None and timing.is_oom(e))):
            raise
        print(f"medqa-parity: error: out of memory ({str(e).splitlines()[0]}); lower --batch-size, "
              "--eval-batch-size or --max-seq-len, or turn on --gradient-checkpointing (or --profile capped)",
              file=sys.stderr)
        return 3


# Errors that are the user's to fix, by module: shown as one line, not a traceback.
USER_ERRORS = {
    "medqa_core.engine.attention": "AttentionError", "medqa_core.engine.checkpoint": "CheckpointError",
    "medqa_core.engine.data": "MedQADataError", "medqa_core.measure.device": "BackendError",
    "medqa_core.compare.inputs": "CompareError",  # the gate's GateError and the report's errors are CompareErrors
    "medqa_core.engine.model": "ModelLoadError", "medqa_core.results.record": "RecordError",
    "medqa_core.engine.numerics": "DtypeError", "medqa_core.engine.sharded": "ShardError",
    "medqa_core.results.storage": "OutputFolderError", "medqa_core.engine.fp8": "Fp8Unavailable",
    "medqa_core.results.runset": "RunSetError", "medqa_core.compare.runsets": "RunSetStatsError",
    "medqa_core.report.mlflow_export": "ExportError",
}


def _write_errors() -> tuple[type[Exception], ...]:
    """files.WriteError where medqa_core.results.storage is imported (nothing is imported here, as for user errors)."""
    cls = getattr(sys.modules.get("medqa_core.results.storage"), "WriteError", None)
    return (cls,) if isinstance(cls, type) else ()


def _user_errors() -> tuple[type[Exception], ...]:
    """The classes of :data:`USER_ERRORS` whose modules are imported: an error can only come from one of
    those, and handling an error (out of memory, say) must not import pandas or torch."""
    found = (getattr(sys.modules[m], name, None) for m, name in USER_ERRORS.items() if m in sys.modules)
    return tuple(cls for cls in found if isinstance(cls, type))

if __name__ == "__main__":
    sys.exit(main())
