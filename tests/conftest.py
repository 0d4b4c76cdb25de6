"""Shared fixtures: a tiny Mistral (2 layers, hidden 64) saved like a user's model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch

# Our Triton kernels (medqa_core.engine.kernels) run on CPU tensors under Triton's interpreter; it must be on before
# triton.jit wraps them at import. On a GPU the tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from medqa_core.engine.config import PRESET_COMMON, EvalConfig, ModelConfig, RunConfig, TrainConfig
from medqa_core.results.record import RunRecord, load_record


def _interpret_each_launch_once_patched_on_a_shallow_stack() -> None:
    """Take two costs off Triton's interpreter that change nothing a kernel computes (one NF4 LoRA test on this
    2-core AMD EPYC: 40 s -> 15 s; the interpreted tests were half of CI's test time):

    - every call of a @triton.jit helper inside a kernel patches triton.language again (``inspect.getmembers`` of
      its modules), though the modules patched once in a launch stay patched until it ends;
    - CPython frees a chunk of its frame stack whenever the call depth drops back across the chunk's start, so a
      launch at pytest's depth can map, fault in and unmap a chunk at every helper call (a fifth of the time):
      a thread of its own runs each launch from a shallow stack. Its caller waits for it; errors are re-raised.

    Where Triton's interpreter lacks these internals the tests run as before, only slower, with a warning."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:  # triton is a test extra; the tests that need it skip
        return
    try:
        launch, patch_lang, unpatched = (interpreter.GridExecutor.__call__, interpreter._patch_lang,
                                         interpreter._LangPatchScope)
    except AttributeError as e:
        warnings.warn(f"Triton's interpreter has changed ({e}): interpreted tests run without tests/conftest.py's "
                      "speed-ups", stacklevel=1)
        return

    langs_of: dict = {}  # jit function -> what _patch_lang patches for it: the language modules in its globals
    running: dict = {}  # the kernel of the launch under way and, once patched, the language modules patched since

    def patch_lang_once(fn):
        if fn not in langs_of:
            langs_of[fn] = {id(v) for v in fn.__globals__.values() if v is tl or v is tl.core}
        patched = running.get("patched")
        if patched is not None and langs_of[fn] <= patched:
            return unpatched()  # a helper called inside the launch: patched already, until the launch ends
        if fn is running.get("kernel") or patched is not None:
            running["patched"] = (patched or set()) | langs_of[fn]
        return patch_lang(fn)

    def launch_in_a_thread(self, *args, **kwargs):
        done: dict = {}

        def run() -> None:
            running.update(kernel=self.fn)
            try:
                done["result"] = launch(self, *args, **kwargs)
            except BaseException as e:  # re-raised in the caller
                done["error"] = e
            finally:
                running.clear()

        thread = threading.Thread(target=run, name=f"triton-interpreter {self.fn.__name__}")
        thread.start()
        thread.join()
        if "error" in done:
            raise done["error"]
        return done.get("result")

    interpreter._patch_lang = patch_lang_once
    interpreter.GridExecutor.__call__ = launch_in_a_thread


if os.environ.get("TRITON_INTERPRET") == "1":
    _interpret_each_launch_once_patched_on_a_shallow_stack()

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)

QUESTION = {
    "question": "A 23-year-old woman has a fever. Which drug is best?",
    "answer": "Ceftriaxone",
    "options": {"A": "Ampicillin", "B": "Ceftriaxone", "C": "Doxycycline", "D": "Nitrofurantoin"},
    "meta_info": "step2&3",
    "answer_idx": "B",
}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (README: `pytest -n 2`) the workers run at once, each with the jobs its tests start: each
    gets its share of the cores for torch's threads and Inductor's compile workers, not all of them, unless the
    environment says otherwise. Set in the controller before it starts the workers, so torch in each worker and in
    each job reads it from its start."""
    workers = len(config.getoption("tx", None) or []) if config.getoption("dist", "no") != "no" else 0
    if workers > 1:  # in the controller only: a worker's dist is "no"
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        for name in ("OMP_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
            os.environ.setdefault(name, str(max(1, cores // workers)))


# Files whose tests share a fixture that starts a job (a fine-tune, a bench, torchrun, a compiling process), in groups
# of the files that share it: under `pytest -n` each group runs on one worker, so its jobs run once.
SHARED_JOBS = (("test_distributed.py", "test_sharded.py"),  # one_process, two_ddp_ranks
               ("test_faults.py", "test_resume.py"),  # uninterrupted; test_faults.py's trained
               ("test_bench_harness.py",), ("test_peers.py",), ("test_compile_shapes.py",), ("test_runset_cli.py",),
               ("test_inspect_nf4_kernel.py",), ("test_lm_eval_exact.py",))


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """(pytest-xdist) `-n` alone hands tests out in chunks (--dist load), which can split a file whose tests share
    a job across the workers, each then running the job. Instead: each group of :data:`SHARED_JOBS` is one unit of
    work, the groups go first (most tests first), then the other tests one at a time, so the workers finish
    together. (--dist loadgroup's xdist_group marks would say the same, but pytest-xdist 3.8 renames the tests they
    mark through an attribute pytest 9.2 no longer reads: every test stays its own unit.) An explicit --dist
    stays as asked."""
    if config.getoption("dist") != "load" or any(a.startswith("--dist") for a in config.invocation_params.args):
        return None
    from xdist.scheduler import LoadScopeScheduling

    group_of = {name: group[0] for group in SHARED_JOBS for name in group}

    class SharedJobScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of.get(nodeid.split("::", 1)[0].rsplit("/", 1)[-1], nodeid)

    return SharedJobScheduling(config, log)


def save_tiny_mistral(folder: Path, **overrides: int) -> Path:
    """A random tiny Mistral (``TINY``, changed by ``overrides``) with the real Mistral tokenizer, saved as
    safetensors to ``folder``."""
    from transformers import MistralConfig, MistralForCausalLM

    from medqa_core.engine.model import save_preset_tokenizer

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**{**PRESET_COMMON, "sliding_window": None, **TINY, **overrides}))
    model.to(torch.bfloat16).save_pretrained(folder)
    save_preset_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mistral with the real Mistral tokenizer, saved as safetensors to a temp folder."""
    return save_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))


@pytest.fixture(scope="session")
def tiny_config(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> RunConfig:
    return RunConfig(
        model=ModelConfig(path=str(tiny_model_dir)),
        train=TrainConfig(max_steps=4, batch_size=4, timing_warmup_steps=1),
        eval=EvalConfig(batch_size=4),
        backend="cpu",  # CPU tests, also on a GPU machine
        results_dir=str(tmp_path_factory.mktemp("results")),
    )


@pytest.fixture(scope="session")
def tiny_session(tiny_config: RunConfig):
    from medqa_core.engine.session import load_session

    return load_session(tiny_config)


def without_xdist(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` less pytest-xdist's ``PYTEST_XDIST_*`` variables, for a pytest a test starts (``pytest bench/``): under
    ``pytest -n`` a child inherits them, and pytest-benchmark, seeing ``PYTEST_XDIST_WORKER``, takes itself for an
    xdist worker and disables itself (its cases run unmeasured, no file is saved)."""
    return {k: v for k, v in env.items() if not k.startswith("PYTEST_XDIST_")}


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts or raw strings) one per line."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


# ---- torchrun jobs (tests/test_distributed.py, tests/test_sharded.py) ----------------------------------------

STEPS = 4
# Same global batch and loss; each rank packs and runs its share in bf16, so the curves agree to bf16 rounding of
# the sums, not bit for bit.
REL_TOL = 2e-3


def train_argv(model_dir: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return ["train", "--backend", "cpu", "--model", str(model_dir), "--train-limit", "16", "--batch-size", "8",
            "--max-steps", str(steps), "--lora-dropout", "0", "--results", str(out / "results"),
            "--adapter-out", str(out / "adapter"), *extra]


def run_cli(argv: list[str], nproc: int = 1, launcher: tuple[str, ...] = ("--standalone",)) -> RunRecord:
    """One `medqa-parity` job (under torchrun for nproc > 1); the one record it wrote."""
    head = [sys.executable, "-m", "torch.distributed.run", *launcher, f"--nproc-per-node={nproc}"] if nproc > 1 \
        else [sys.executable]
    done = subprocess.run([*head, "-m", "medqa_core.cli", *argv], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = Path(argv[argv.index("--results") + 1])
    (record,) = results.glob("*.json")  # only rank 0 writes the record
    return load_record(record)


def assert_same_curve(a: tuple[float, ...], b: tuple[float, ...]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) < REL_TOL * abs(x), (a, b)


@pytest.fixture(scope="session")
def one_process(tiny_model_dir, tmp_path_factory) -> RunRecord:
    """The reference: the same global batches in one process."""
    return run_cli(train_argv(tiny_model_dir, tmp_path_factory.mktemp("one")))


@pytest.fixture(scope="session")
def two_ddp_ranks(tiny_model_dir, tmp_path_factory) -> RunRecord:
    """The same job on 2 gloo ranks with DDP (the default), writing a checkpoint into its folder's ckpt/."""
    out = tmp_path_factory.mktemp("two")
    return run_cli(train_argv(tiny_model_dir, out, "--checkpoint-dir", str(out / "ckpt")), nproc=2)


# ---- a fine-tune run by the CLI in its own process (tests/test_resume.py, tests/test_faults.py) ---------------

# Killed or signalled once the first checkpoint (step 2) is there, a run still has 10 steps to go: it dies mid-way.
FINE_TUNE_STEPS = 12


def fine_tune_cmd(model_dir: Path, tmp_path: Path, name: str, *extra: str, steps: int = FINE_TUNE_STEPS) -> list[str]:
    """``medqa-parity train`` of the tiny model as a child process, a checkpoint every 2 steps, outputs under
    ``tmp_path / name``."""
    return [sys.executable, "-m", "medqa_core.cli", "train", "--backend", "cpu", "--model", str(model_dir),
            "--train-limit", "32", "--batch-size", "4", "--max-steps", str(steps), "--checkpoint-every", "2",
            "--results", str(tmp_path / name / "results"), "--adapter-out", str(tmp_path / name / "adapter"),
            *extra]


def run_ok(cmd: list[str]) -> subprocess.CompletedProcess:
    """Run ``cmd``; it must exit 0."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.fixture(scope="session")
def uninterrupted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The outputs (results/, adapter/) of :func:`fine_tune_cmd` run start to end: what a killed or signalled run
    of the same command, resumed, must repeat bit for bit. One run, shared by the kill and the signal tests."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_ok(fine_tune_cmd(tiny_model_dir, tmp, "whole"))
    return tmp / "whole"
