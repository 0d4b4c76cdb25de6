"""pytest-benchmark harness: options, shared fixtures, machine info, and the per-case OOM guard.

Run from the repository root; one pytest-benchmark JSON is saved under .benchmarks/::

    pytest bench/ --benchmark-save=NAME                      # tiny preset, whatever device torch has
    pytest bench/ --benchmark-save=h100 --preset mistral-7b --data DIR --questions 1273
    pytest-benchmark compare                                  # tables over saved runs

Every case puts its figures in ``benchmark.extra_info`` (units in the names) and the machine
fingerprint plus the hardware ceilings measured in this run go in
``machine_info["medqa_fingerprint"]``.

Cases run in a fixed order so each model is loaded once and at most one is in memory: the
reference arm's train step first (ours is compared against it), then, per ``--attn`` kernel,
accuracy and inference on the fresh adapter and finally the train step, which changes it; the peer
stacks (bench_peers.py) last, since their patches of transformers are process-wide.
"""

from __future__ import annotations

import importlib.util
import os

# Unsloth patches transformers best when imported before it ("Unsloth should be imported before [transformers]"),
# and its patches stay for the process: MEDQA_UNSLOTH_FIRST=1 imports it here, before anything imports
# transformers, for a session that runs the unsloth arm alone (tools/training_evidence.sh's peers step).
if os.environ.get("MEDQA_UNSLOTH_FIRST") == "1" and importlib.util.find_spec("unsloth") is not None:
    try:
        import unsloth  # noqa: F401
    except Exception:  # the arm imports it again and records this error as its case's skip reason
        pass

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from harness import Case, ModelSlot
from options import _FILE_ORDER, BENCH_DIR, BenchOptions, add_options

from medqa_core.engine.config import (
    RunConfig,
)
from medqa_core.engine.data import Splits, TrainExample, encode_train, format_prompt, iter_batches, load_splits
from medqa_core.engine.model import load_tokenizer, resolve_model_dir
from medqa_core.measure.ceilings import EnergyMeter, HardwareProbeError, measure_copy_bandwidth, measure_matmul_flops
from medqa_core.measure.device import resolve_device
from medqa_core.measure.fingerprint import machine_fingerprint
from medqa_core.results.benchcase import BenchCase

logger = logging.getLogger("medqa_core.bench")


_OPTIONS = pytest.StashKey[BenchOptions]()
_DEVICE = pytest.StashKey[torch.device]()
_CEILINGS = pytest.StashKey[dict[str, Any]]()



def pytest_addoption(parser: pytest.Parser) -> None:
    import importlib.util

    if importlib.util.find_spec("pytest_benchmark") is None:  # before its --benchmark-* options are refused
        raise pytest.UsageError('bench/ needs pytest-benchmark: pip install -e ".[bench]"')
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    import importlib.util

    from medqa_core.engine.decoding import prefill_choice

    try:  # the decoder's prefill switch (MEDQA_PREFILL), either kernel's: refused before anything runs
        prefill_choice(torch.device("cpu"), graph=False)
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if importlib.util.find_spec("triton") is not None:  # our NF4 kernel's A/B switches: refused before anything runs
        from medqa_core.engine.kernels.nf4_weight import scale_layout, weight_layout

        try:
            scale_layout()
            weight_layout()
        except ValueError as e:
            raise pytest.UsageError(str(e)) from None
    device = resolve_device("auto")
    config.stash[_DEVICE] = device
    config.stash[_OPTIONS] = BenchOptions.from_config(config, device)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    opts = metafunc.config.stash[_OPTIONS]
    if "attn" in metafunc.fixturenames:
        metafunc.parametrize("attn", opts.attn)
    if "profile" in metafunc.fixturenames:
        # No profile asked for (the CPU default): one case that skips with the reason, not pytest's
        # "got empty parameter set".
        profiles = opts.train_profiles or [pytest.param(None, id="no-train-profiles", marks=pytest.mark.skip(
            reason="no --train-profiles given (on CPU none run by default); e.g. --train-profiles eager,capped"))]
        metafunc.parametrize("profile", profiles)
    # Inference at one request and at the bench batch: latency, and throughput when rows share a weight read.
    if "prefill_batch" in metafunc.fixturenames:
        metafunc.parametrize("prefill_batch", sorted({1, opts.batch_size}), ids=lambda b: f"batch{b}")
    if "decode_batch" in metafunc.fixturenames:
        metafunc.parametrize("decode_batch", opts.decode_batches, ids=lambda b: f"batch{b}")
    if "nf4_kernel" in metafunc.fixturenames:
        metafunc.parametrize("nf4_kernel", opts.nf4_kernels)
    # One attention keeps the case names of files saved before there could be several (the decode_attention
    # fixture gives it); several are arms of their own
    if "decode_attention" in metafunc.fixturenames and len(opts.decode_attentions) > 1:
        metafunc.parametrize("decode_attention", opts.decode_attentions, ids=lambda a: f"attn-{a}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kernels = config.stash[_OPTIONS].attn

    def order(item: pytest.Item) -> tuple[int, int]:
        if item.path.parent != BENCH_DIR:
            return (-1, 0)
        callspec = getattr(item, "callspec", None)
        attn = callspec.params.get("attn") if callspec else None
        if item.path.name == "bench_peers.py":
            return (1 + len(kernels), 0)  # after ours and the reference: Liger and Unsloth patch transformers
        if attn is None:
            return (0, 0)  # the reference arm
        return (1 + kernels.index(attn), _FILE_ORDER.get(item.path.name, len(_FILE_ORDER)))

    items.sort(key=order)  # stable: definition order within a group


def _ceilings(config: pytest.Config) -> dict[str, Any]:
    """Hardware ceilings of this run, measured once (before any model is loaded, via the fixture)."""
    if _CEILINGS not in config.stash:
        device = config.stash.get(_DEVICE, None) or resolve_device("auto")
        found: dict[str, Any] = {"device": str(device)}
        for key, probe in (("matmul_bf16_flops_per_s", measure_matmul_flops),
                           ("copy_bandwidth_bytes_per_s", measure_copy_bandwidth)):
            try:
                found[key] = probe(device)
            except HardwareProbeError as e:
                logger.warning("%s not measured: %s", key, e)
                found[key], found[f"{key}_error"] = None, str(e)
        with EnergyMeter(device) as meter:
            found["energy_meter"] = meter.source
            found["energy_meter_unavailable_reason"] = meter.reason
        config.stash[_CEILINGS] = found
    return config.stash[_CEILINGS]


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    device = config.stash.get(_DEVICE, None) or resolve_device("auto")
    fingerprint = machine_fingerprint(device)
    fingerprint["hardware"] = _ceilings(config)
    machine_info["medqa_fingerprint"] = fingerprint


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One headline per case (tokens/s or questions/s, accuracy) under pytest-benchmark's timing tables."""
    session = getattr(config, "_benchmarksession", None)
    cases = [b for b in getattr(session, "benchmarks", []) if getattr(b, "extra_info", None)]
    if not cases:
        return
    terminalreporter.section("medqa-parity: headline per case")
    for bench in cases:
        case = BenchCase.from_extra_info(bench.extra_info, bench.name)
        terminalreporter.write_line(f"{bench.name}: {case.headline()}")


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bench_options(pytestconfig: pytest.Config) -> BenchOptions:
    return pytestconfig.stash[_OPTIONS]


@pytest.fixture(scope="session")
def device(pytestconfig: pytest.Config) -> torch.device:
    return pytestconfig.stash[_DEVICE]


@pytest.fixture(scope="session")
def run_config(bench_options: BenchOptions) -> RunConfig:
    return bench_options.run_config()


@pytest.fixture(scope="session")
def ceilings(pytestconfig: pytest.Config) -> dict[str, Any]:
    """Peak bf16 FLOP/s and copy bandwidth measured in this run (also saved in machine_info)."""
    return _ceilings(pytestconfig)


@pytest.fixture(scope="session")
def energy_meter(device: torch.device) -> Iterator[EnergyMeter]:
    with EnergyMeter(device) as meter:
        yield meter


@pytest.fixture(scope="session")
def models(run_config: RunConfig, device: torch.device, ceilings: dict[str, Any]) -> Iterator[ModelSlot]:
    # Depends on ceilings so the probes run on an empty device, before any model is loaded.
    slot = ModelSlot(run_config, device)
    yield slot
    slot.release()


@pytest.fixture(scope="session")
def splits(run_config: RunConfig) -> Splits:
    return load_splits(run_config.data)


@pytest.fixture(scope="session")
def tokenizer(run_config: RunConfig) -> Any:
    """The model's tokenizer, for building inputs before (and independently of) any model load."""
    return load_tokenizer(resolve_model_dir(run_config.model))


@pytest.fixture(scope="session")
def train_examples(tokenizer: Any, splits: Splits, run_config: RunConfig) -> list[TrainExample]:
    """Every training question, tokenized as the training loop tokenizes it."""
    tc = run_config.train
    return [encode_train(tokenizer, item, tc.max_seq_len, tc.loss_on) for item in splits.train]


@pytest.fixture(scope="session")
def loop_batches(train_examples: list[TrainExample], run_config: RunConfig,
                 bench_options: BenchOptions) -> Callable[[int], list[list[TrainExample]]]:
    """``loop_batches(batch_size)``: the first ``--warmup-rounds`` + ``--train-rounds`` batches of that size in
    the training loop's own order (iter_batches with the run's seed), one per round: what a run steps on."""
    n = bench_options.warmup_rounds + bench_options.train_rounds

    def make(batch_size: int) -> list[list[TrainExample]]:
        batches = iter_batches(train_examples, batch_size, run_config.train.seed)
        return [next(batches)[1] for _ in range(n)]

    return make


@pytest.fixture(scope="session")
def prompt_ids(tokenizer: Any, splits: Splits, bench_options: BenchOptions) -> Callable[[int], torch.Tensor]:
    """``prompt_ids(batch)``: [batch, --bench-seq-len] real MedQA prompt tokens, no padding.

    Test prompts are tokenized one after another into one stream (each with its BOS) and cut into
    rows, so every row is exactly the requested length.
    """
    stream: list[int] = []

    def make(batch: int) -> torch.Tensor:
        need = batch * bench_options.seq_len  # grown on demand: decode batches may exceed --batch-size
        while len(stream) < need:
            for item in splits.eval:
                stream.extend(tokenizer(format_prompt(item))["input_ids"])
                if len(stream) >= need:
                    break
        return torch.tensor(stream[:need]).view(batch, bench_options.seq_len)

    return make


@pytest.fixture(scope="session")
def decode_attention(bench_options: BenchOptions) -> str:
    """The one --decode-attention asked for (several are parametrized instead: pytest_generate_tests)."""
    return bench_options.decode_attentions[0]


@pytest.fixture(scope="session")
def reference_results() -> dict[str, Any]:
    """The reference arm's figures, filled by its case, read by ours for ``speedup_vs_reference``."""
    return {}


@pytest.fixture(scope="session")
def ours_results() -> dict[int, dict[str, float]]:
    """Ours' train tokens/s by batch size and case name, filled by ours' cases, read by the peer cases."""
    return {}


@pytest.fixture
def case(benchmark: Any, device: torch.device, energy_meter: EnergyMeter) -> Case:
    return Case(benchmark, device, energy_meter)
