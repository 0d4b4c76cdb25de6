"""The timing harness of bench/: one model in memory at a time (ModelSlot), a case's timed rounds over a
synchronizing target (Case, Rounds), and an out-of-memory in a case recorded as its result."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import pytest
import torch

from medqa_core.arms.peers import PeerArm, load_peer
from medqa_core.arms.reference import ReferenceArm, load_reference
from medqa_core.engine.attention import AttentionError, attention_info, is_no_kernel
from medqa_core.engine.config import RunConfig
from medqa_core.engine.session import Session, load_session
from medqa_core.measure.ceilings import EnergyMeter
from medqa_core.measure.device import detect_backend
from medqa_core.measure.timing import (
    Stats,
    Timer,
    free_device_memory,
    host_rss_gib,
    is_oom,
    oom_failure,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)
from medqa_core.results.benchcase import BenchCase
from medqa_core.results.measurements import Energy, Memory

logger = logging.getLogger("medqa_core.bench")

T = TypeVar("T")


def _through_schema(benchmark: Any) -> None:
    """Check the case's extra_info against the one schema (medqa_core.results.benchcase); save it as that writes it."""
    info = BenchCase.from_extra_info(benchmark.extra_info, benchmark.name).to_extra_info()
    benchmark.extra_info.clear()
    benchmark.extra_info.update(info)


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
        """The common-guide QLoRA model (see medqa_core.arms.reference)."""
        return self._get(("reference",), lambda: load_reference(self.cfg, self.device))

    def peer(self, stack: str) -> PeerArm:
        """A peer stack's arm (medqa_core.arms.peers); raises PeerUnavailable, with its reason, where it cannot run."""
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
            if not is_no_kernel(e):
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
            oom = oom_failure(e, "outside the timed rounds", self.device).to_dict()
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
        _through_schema(self.benchmark)  # saved as every other case is: through the one schema
        pytest.skip(reason)

    def time(self, target: Callable[[], Any], rounds: int, warmup_rounds: int) -> Rounds:
        """Time ``target`` with ``benchmark.pedantic`` (one call per round, device synchronized around it).

        Args:
            target: the work of one round; its return value is kept per timed round.
            rounds: timed rounds.
            warmup_rounds: untimed rounds first.

        Returns:
            The timed rounds' times (medqa_core.measure.timing.Timer), outputs, energy and peak memory.

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
                failure.append(oom_failure(e, f"{'warm-up' if warm else 'timed'} round {calls}", self.device).to_dict())
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
            Seconds per call (medqa_core.measure.timing.Timer around each, device synchronized).
        """
        for _ in range(warmup_rounds):
            fn()
        values = []
        for _ in range(rounds):
            with Timer(self.device) as timer:
                fn()
            values.append(timer.elapsed_s)
        return Stats.from_values(values)

    def energy(self, rounds: Rounds, tokens_per_round: float | None = None,
               questions_per_round: float | None = None) -> Energy:
        """Energy of the timed rounds, per token and per question (None without a meter)."""
        return Energy.from_rounds(rounds.joules, len(rounds.times_s), tokens_per_round, questions_per_round)

    def memory(self, rounds: Rounds) -> Memory:
        """Device peak over the rounds and host resident memory now (a run record's Memory holds its peak)."""
        return Memory(peak_mem_gib=rounds.peak_mem_gib, host_rss_gib=host_rss_gib())

    def session_info(self, session: Session) -> dict[str, Any]:
        """What every case of ours records about the loaded model (as a run record does)."""
        return {
            "arm": "ours",
            "backend": detect_backend(),
            "model": session.config.model.name,
            "weights": "local folder" if session.config.model.path else
                       f"random preset (seed {session.config.model.seed}): speed, not medical knowledge",
            "attention": attention_info(session.attention, session.kernel_ran),
            "quantization": dataclasses.asdict(session.quant),
            "compute_dtype": session.numerics.compute_dtype,
            "numerics": session.numerics.as_dict(),
        }


def _noop() -> None:
    return None


