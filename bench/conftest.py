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

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
import torch

from medqa_core.attention import AttentionError
from medqa_core.benchcase import BenchCase
from medqa_core.config import (
    ATTN_KERNELS,
    DTYPES,
    NF4_BLOCKSIZES,
    PRESETS,
    TRAIN_PROFILES,
    ConfigError,
    DataConfig,
    EvalConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    train_profile,
)
from medqa_core.data import TrainExample, encode_train, format_prompt, iter_batches
from medqa_core.failure import OomFailure
from medqa_core.fingerprint import detect_backend, machine_fingerprint, resolve_device
from medqa_core.hardware import EnergyMeter, HardwareProbeError, measure_copy_bandwidth, measure_matmul_flops
from medqa_core.model import load_tokenizer, resolve_model_dir
from medqa_core.peers import PeerArm, load_peer
from medqa_core.reference import ReferenceArm, load_reference
from medqa_core.run import Session, Splits, load_session, load_splits
from medqa_core.timing import (
    Stats,
    Timer,
    free_device_memory,
    host_rss_gib,
    is_oom,
    memory_allocated_gib,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)

logger = logging.getLogger("medqa_core.bench")

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
_FILE_ORDER = {"bench_accuracy.py": 0, "bench_infer.py": 1, "bench_train.py": 2}
# torch's messages when a forced SDPA backend cannot run (older releases, and torch 2.13).
_NO_SDPA_KERNEL = ("No available kernel", "No viable backend")

T = TypeVar("T")


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
    train_profiles: tuple[str, ...] = ()  # named TrainConfig settings (config.TRAIN_PROFILES), one case each
    dtype: str = "auto"  # --dtype, as medqa-parity run takes it
    nf4_blocksize: int | None = None
    peer_batch_size: int | None = None  # the liger-batch peer case's batch; None: the max-speed profile's

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
        profiles_opt = (",".join(p for p in TRAIN_PROFILES if p != "default") if gpu else "") \
            if profiles_opt is None else profiles_opt
        profiles = tuple(dict.fromkeys(p.strip() for p in profiles_opt.split(",") if p.strip()))
        try:
            for spec in profiles:
                train_profile(spec)
        except ConfigError as e:
            raise pytest.UsageError(f"--train-profiles: {e}") from e
        questions = config.getoption("questions")
        decode = config.getoption("decode_tokens")
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
            peer_batch_size=config.getoption("peer_batch_size"),
        )
        for name, value, least in (("--bench-batch-size", opts.batch_size, 1), ("--bench-seq-len", opts.seq_len, 2),
                                   ("--questions", opts.questions or 1, 1), ("--train-rounds", opts.train_rounds, 1),
                                   ("--infer-rounds", opts.infer_rounds, 1), ("--warmup-rounds", opts.warmup_rounds, 0),
                                   ("--decode-tokens", opts.decode_tokens, 2),
                                   ("--peer-batch-size", opts.peer_batch_size or 1, 1)):
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


_OPTIONS = pytest.StashKey[BenchOptions]()
_DEVICE = pytest.StashKey[torch.device]()
_CEILINGS = pytest.StashKey[dict[str, Any]]()


def pytest_addoption(parser: pytest.Parser) -> None:
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
                     f"{', '.join(TRAIN_PROFILES)}, each optionally with +KEY=VALUE overrides "
                     "(e.g. capped+batch_size=16) (default: every one but 'default' on a GPU, none on CPU)")
    g.addoption("--dtype", default="auto", choices=DTYPES,
                help="compute dtype, as medqa-parity run --dtype (default: %(default)s)")
    g.addoption("--nf4-blocksize", type=int, default=None, choices=NF4_BLOCKSIZES,
                help="4-bit block size, as medqa-parity run --nf4-blocksize (default: bitsandbytes')")
    g.addoption("--peer-batch-size", type=int, default=None,
                help="batch of the liger-batch peer case (default: the max-speed profile's)")
    g.addoption("--gradient-checkpointing", action="store_true",
                help="our arm recomputes activations (the memory-capped profile); the reference always does")


def pytest_configure(config: pytest.Config) -> None:
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
    for name in ("prefill_batch", "decode_batch"):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, sorted({1, opts.batch_size}), ids=lambda b: f"batch{b}")


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


class ModelSlot:
    """Holds at most one loaded model, so a 7B reference arm and ours are never in memory together.

    A kernel that cannot run here is skipped with torch's or our reason, once per kernel.
    """

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self._key: tuple[str, ...] | None = None
        self._value: Any = None
        self._skipped: dict[tuple[str, ...], str] = {}

    def ours(self, kernel: str) -> Session:
        """Our QLoRA session (NF4 base + fresh LoRA) with ``kernel`` as its attention."""
        cfg = dataclasses.replace(self.cfg, model=dataclasses.replace(self.cfg.model, attn=kernel))
        return self._get(("ours", kernel), lambda: load_session(cfg))

    def reference(self) -> ReferenceArm:
        """The common-guide QLoRA model (see medqa_core.reference)."""
        return self._get(("reference",), lambda: load_reference(self.cfg, self.device))

    def peer(self, stack: str) -> PeerArm:
        """A peer stack's arm (medqa_core.peers); raises PeerUnavailable, with its reason, where it cannot run."""
        return self._get(("peer", stack), lambda: load_peer(stack, self.cfg, self.device))

    def _get(self, key: tuple[str, ...], load: Callable[[], T]) -> T:
        if key in self._skipped:
            pytest.skip(self._skipped[key])
        if key == self._key:
            return self._value
        self.release()
        try:
            value = load()
        except AttentionError as e:
            self._skipped[key] = f"attention kernel {key[-1]!r} cannot run here: {e}"
            pytest.skip(self._skipped[key])
        except RuntimeError as e:
            # torch's answer when a forced SDPA backend has no kernel for this device/dtype/shape.
            if not any(m in str(e) for m in _NO_SDPA_KERNEL):
                raise
            self._skipped[key] = f"attention kernel {key[-1]!r} cannot run here: {str(e).splitlines()[0]}"
            pytest.skip(self._skipped[key])
        self._key, self._value = key, value
        return value

    def release(self) -> None:
        """Drop the loaded model (undoing a peer's patches) and return its device memory."""
        close = getattr(self._value, "close", None)
        self._key = self._value = None
        if close is not None:
            close()
        free_device_memory(self.device)


@dataclass
class Rounds:
    """The timed rounds of one case (warm-up rounds left out)."""

    times_s: list[float]  # one per round, between two device synchronizations
    outputs: list[Any]  # what the target returned each round
    joules: float | None  # summed over the rounds; None without an energy meter
    peak_mem_gib: float | None  # device peak over warm-up and timed rounds; None on CPU

    @property
    def stats(self) -> Stats:
        return Stats.from_values(self.times_s)


class _RoundOOM(Exception):
    """Carries an out-of-memory caught inside benchmark.pedantic out to :meth:`Case.guard`."""

    def __init__(self, details: dict[str, Any]) -> None:
        super().__init__(details["message"])
        self.details = details


def _oom_details(exc: BaseException, device: torch.device, during: str) -> dict[str, Any]:
    # Read while the failed step's tensors are still referenced: this is the memory at the time.
    # The same schema as a run record's failure (medqa_core.failure).
    return OomFailure(phase=during, message=str(exc).strip().splitlines()[0] if str(exc).strip() else
                      type(exc).__name__, memory_allocated_gib=memory_allocated_gib(device),
                      peak_mem_gib=peak_memory_gib(device), host_rss_gib=host_rss_gib()).to_dict()


class Case:
    """One benchmark case: times a synchronizing target through ``benchmark.pedantic`` and turns an
    out-of-memory anywhere in the case into that case's recorded result."""

    def __init__(self, benchmark: Any, device: torch.device, meter: EnergyMeter) -> None:
        self.benchmark = benchmark
        self.device = device
        self.meter = meter
        self._timed = False

    @contextlib.contextmanager
    def guard(self, **configuration: Any) -> Iterator[Case]:
        """Run the case's body; an OOM in it is recorded, memory freed, and the suite goes on.

        The configuration goes into ``extra_info`` at once, and into ``extra_info["oom"]`` with the
        error's first line (``message``) and the memory allocated when it happened. A case that ran out before
        timing anything still times a no-op, so it appears in the saved file.
        """
        self.benchmark.extra_info.update(configuration)
        oom: dict[str, Any] | None = None
        try:
            yield self
        except _RoundOOM as e:
            oom = e.details
        except Exception as e:
            if not is_oom(e):
                raise
            oom = _oom_details(e, self.device, "outside the timed rounds")
        if oom is None:
            _through_schema(self.benchmark)
            return
        # Outside the except block: the exception and the frames it held are gone, so their tensors can go.
        free_device_memory(self.device)
        self.benchmark.extra_info["oom"] = oom  # the configuration is in extra_info beside it
        logger.warning("%s: out of memory (%s) during %s", self.benchmark.name, oom["message"], oom["phase"])
        if not self._timed:
            self._timed = True
            self.benchmark.pedantic(_noop, rounds=1, warmup_rounds=0, iterations=1)
        _through_schema(self.benchmark)

    def skip(self, reason: str) -> NoReturn:
        """Skip the case, keeping it in the saved file: ``extra_info["skipped_reason"]``, and a no-op timed."""
        self.benchmark.extra_info["skipped_reason"] = reason
        logger.warning("%s: skipped: %s", self.benchmark.name, reason)
        if not self._timed:
            self._timed = True
            self.benchmark.pedantic(_noop, rounds=1, warmup_rounds=0, iterations=1)
        pytest.skip(reason)

    def time(self, target: Callable[[], Any], rounds: int, warmup_rounds: int) -> Rounds:
        """Time ``target`` with ``benchmark.pedantic`` (one call per round, device synchronized around it).

        Args:
            target: the work of one round; its return value is kept per timed round.
            rounds: timed rounds.
            warmup_rounds: untimed rounds first.

        Returns:
            The timed rounds' times (medqa_core.timing.Timer), outputs, energy and peak memory.

        Raises:
            _RoundOOM: a round ran out of memory (the remaining rounds were skipped); handled by :meth:`guard`.
        """
        # pytest-benchmark calls the target once, without warm-up, under --benchmark-disable.
        warmup = warmup_rounds if self.benchmark.enabled else 0
        meter = self.meter if self.meter.available else None
        times: list[float] = []
        outputs: list[Any] = []
        joules: list[float] = []
        failure: list[dict[str, Any]] = []
        calls = 0

        def guarded() -> None:
            nonlocal calls
            if failure:
                return  # the case already ran out of memory: the remaining rounds are no-ops
            calls += 1
            warm = calls <= warmup
            try:
                synchronize(self.device)
                start_j = meter.read_j() if meter else 0.0
                with Timer(self.device) as timer:
                    out = target()
                end_j = meter.read_j() if meter else 0.0
            except Exception as e:
                if not is_oom(e):
                    raise
                # An exception escaping pedantic would drop the case from the saved file.
                failure.append(_oom_details(e, self.device, f"{'warm-up' if warm else 'timed'} round {calls}"))
                return
            if not warm:
                times.append(timer.elapsed_s)
                outputs.append(out)
                joules.append(end_j - start_j)

        reset_peak_memory(self.device)
        self._timed = True
        self.benchmark.pedantic(guarded, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if failure:
            raise _RoundOOM(failure[0])
        return Rounds(times, outputs, sum(joules) if meter else None, peak_memory_gib(self.device))

    def measure(self, fn: Callable[[], Any], rounds: int, warmup_rounds: int) -> Stats:
        """Time ``fn`` outside pedantic, e.g. the time to first token a decode case subtracts.

        Args:
            fn: one call's work.
            rounds: timed calls.
            warmup_rounds: untimed calls first.

        Returns:
            Seconds per call (medqa_core.timing.Timer around each, device synchronized).
        """
        for _ in range(warmup_rounds):
            fn()
        values = []
        for _ in range(rounds):
            with Timer(self.device) as timer:
                fn()
            values.append(timer.elapsed_s)
        return Stats.from_values(values)

    def joules_per(self, rounds: Rounds, units_per_round: float) -> float | str:
        """Energy per unit (token, question) over the timed rounds, or ``"unavailable"``."""
        if rounds.joules is None:
            return "unavailable"
        return rounds.joules / (units_per_round * len(rounds.times_s))

    def memory_info(self, rounds: Rounds) -> dict[str, Any]:
        return {"peak_mem_gib": rounds.peak_mem_gib, "host_rss_gib": host_rss_gib()}

    def session_info(self, session: Session) -> dict[str, Any]:
        """What every case of ours records about the loaded model (as a run record does)."""
        return {
            "arm": "ours",
            "backend": detect_backend(),
            "model": session.config.model.name,
            "weights": "local folder" if session.config.model.path else
                       f"random preset (seed {session.config.model.seed}): speed, not medical knowledge",
            "attention": {"requested": session.attention.requested, "ran": session.kernel_ran,
                          "attn_implementation": session.attention.attn_implementation},
            "quantization": dataclasses.asdict(session.quant),
            "compute_dtype": session.numerics.compute_dtype,
            "numerics": session.numerics.as_dict(),
        }


def _noop() -> None:
    return None


def _through_schema(benchmark: Any) -> None:
    """Check the case's extra_info against the one schema (medqa_core.benchcase) and save it as that writes it."""
    info = BenchCase.from_extra_info(benchmark.extra_info, benchmark.name).to_extra_info()
    benchmark.extra_info.clear()
    benchmark.extra_info.update(info)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One headline per case (tokens/s or questions/s, accuracy) under pytest-benchmark's timing tables."""
    session = getattr(config, "_benchmarksession", None)
    cases = [b for b in getattr(session, "benchmarks", []) if getattr(b, "extra_info", None)]
    if not cases:
        return
    terminalreporter.section("medqa-parity: headline per case")
    for bench in cases:
        terminalreporter.write_line(f"{bench.name}: {BenchCase.from_extra_info(bench.extra_info, bench.name).headline()}")


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
    need = max(1, bench_options.batch_size) * bench_options.seq_len
    stream: list[int] = []
    while len(stream) < need:
        for item in splits.eval:
            stream += tokenizer(format_prompt(item))["input_ids"]
            if len(stream) >= need:
                break

    def make(batch: int) -> torch.Tensor:
        return torch.tensor(stream[: batch * bench_options.seq_len]).view(batch, bench_options.seq_len)

    return make


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
