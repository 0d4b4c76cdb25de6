"""Tests for medqa_core.measure.timing: stats, timer, memory readings, OOM recognition."""

from __future__ import annotations

import dataclasses
import json
import time

import psutil
import pytest
import torch

from medqa_core.measure.timing import (
    Stats,
    Timer,
    host_peak_rss_gib,
    host_rss_gib,
    is_oom,
    oom_failure,
    peak_memory_gib,
    reset_peak_memory,
    synchronize,
)

CPU = torch.device("cpu")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")


def test_stats_from_values() -> None:
    # numpy's default (linear) percentiles of [1, 2, 3, 4, 100]: p25 = 2, p50 = 3, p75 = 4.
    stats = Stats.from_values([1, 2, 3, 4, 100])
    assert stats == Stats(median=3.0, iqr=2.0, mean=22.0, min=1.0, max=100.0, n=5)


def test_stats_single_value_has_zero_iqr() -> None:
    assert Stats.from_values([0.5]) == Stats(median=0.5, iqr=0.0, mean=0.5, min=0.5, max=0.5, n=1)


def test_stats_are_plain_json_numbers() -> None:
    stats = Stats.from_values([0.1, 0.2, 0.4])
    assert all(type(value) in (float, int) for value in dataclasses.astuple(stats))
    assert json.loads(json.dumps(dataclasses.asdict(stats))) == dataclasses.asdict(stats)


def test_stats_empty_raises() -> None:
    with pytest.raises(ValueError, match="empty"):
        Stats.from_values([])


def test_stats_is_frozen() -> None:
    stats = Stats.from_values([1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.median = 2.0  # type: ignore[misc]


def test_timer_measures_sleep() -> None:
    outer = time.perf_counter()
    with Timer(CPU) as timer:
        time.sleep(0.05)
    outer = time.perf_counter() - outer
    # Seconds, between the sleep and a clock read around the block: catches a wrong unit (ms, ns) on a
    # machine of any speed or load.
    assert 0.05 <= timer.elapsed_s <= outer


def test_timer_elapsed_before_exit_raises() -> None:
    with Timer(CPU) as timer, pytest.raises(RuntimeError, match="only set after"):
        _ = timer.elapsed_s


def test_timer_propagates_exception_and_records_nothing() -> None:
    timer = Timer(CPU)
    with pytest.raises(KeyError), timer:
        raise KeyError("boom")
    with pytest.raises(RuntimeError):
        _ = timer.elapsed_s


def test_cpu_has_no_device_peak_memory() -> None:
    reset_peak_memory(CPU)
    synchronize(CPU)
    assert peak_memory_gib(CPU) is None


def test_host_rss_is_between_zero_and_peak_and_ram() -> None:
    rss = host_rss_gib()
    peak = host_peak_rss_gib()  # read after rss: the high-water mark can only have grown
    total_gib = psutil.virtual_memory().total / 2**30
    # The kernel batches RSS counters per CPU, so /proc's RSS and ru_maxrss can disagree by
    # a few hundred KiB; 16 MiB of slack still catches a KiB/bytes mix-up (off by 1024x).
    slack_gib = 16 / 1024
    assert 0.01 < rss < peak + slack_gib
    assert peak < total_gib


def test_host_peak_rss_sees_a_large_allocation() -> None:
    before = host_peak_rss_gib()
    block = torch.ones(2**28 // 4, dtype=torch.float32)  # 256 MiB, touched so it is resident
    after = host_peak_rss_gib()
    del block
    # The peak may already have been higher than now + 256 MiB; it can never drop.
    assert after >= before
    assert after >= 0.25


@pytest.mark.parametrize(
    "exc",
    [
        torch.OutOfMemoryError("x"),
        torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"),
        RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB"),
        MemoryError(),  # a host allocation that failed: on CPU, the device's memory (issue 22)
    ],
)
def test_is_oom_recognises_out_of_memory(exc: BaseException) -> None:
    assert is_oom(exc)


@pytest.mark.parametrize(
    "exc",
    [RuntimeError("shape mismatch"), ValueError("out of memory"), KeyboardInterrupt()],
)
def test_is_oom_rejects_other_errors(exc: BaseException) -> None:
    assert not is_oom(exc)


def test_an_out_of_memory_is_recorded_by_its_first_line_and_the_memory_then() -> None:
    cpu = torch.device("cpu")
    oom = oom_failure(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore text"),
                      "fine-tune", cpu)
    # On CPU the allocator reports no device memory; the host's resident memory is read for every caller.
    assert (oom.kind, oom.phase, oom.message) == ("oom", "fine-tune", "CUDA out of memory. Tried to allocate 2.00 GiB")
    assert oom.memory_allocated_gib is None and oom.peak_mem_gib is None
    assert oom.host_rss_gib is not None and oom.host_rss_gib > 0
    assert oom_failure(MemoryError(), "timed round 2", cpu).message == "MemoryError"


@needs_gpu
def test_gpu_peak_memory_tracks_an_allocation() -> None:
    device = torch.device("cuda")
    reset_peak_memory(device)
    block = torch.empty(2**28, dtype=torch.uint8, device=device)  # 256 MiB
    synchronize(device)
    peak = peak_memory_gib(device)
    del block
    assert peak is not None and peak >= 0.25


@needs_gpu
def test_timer_waits_for_gpu_work() -> None:
    device = torch.device("cuda")
    x = torch.randn(4096, 4096, device=device)
    with Timer(device) as timer:
        for _ in range(20):
            x = x @ x
            x = x / x.norm()
    assert timer.elapsed_s > 0


def test_datasheet_mfu_is_one_rule_for_runs_and_bench_cases():
    # H100 SXM: 989.4 TFLOP/s dense bf16 and fp16 (NVIDIA H100 datasheet, medqa_core.measure.flops.DATASHEET_PEAKS).
    from medqa_core.measure.flops import datasheet_mfu

    mfu, peak = datasheet_mfu(494.7e12, "NVIDIA H100 80GB HBM3", "bf16")
    assert mfu == pytest.approx(0.5) and peak["name"] == "H100" and peak["dtype"] == "bf16"
    assert datasheet_mfu(494.7e12, "NVIDIA H100 80GB HBM3", "fp32") == (None, None)  # no tensor-core fp32 rate
    assert datasheet_mfu(494.7e12, None, "bf16") == (None, None)  # a CPU
    assert datasheet_mfu(None, "NVIDIA H100 80GB HBM3", "fp16")[0] is None
