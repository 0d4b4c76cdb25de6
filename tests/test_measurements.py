"""The shared measurements: one function builds a throughput for run records and bench cases alike."""

from __future__ import annotations

import pytest

from medqa_core.measure.flops import DATASHEET_PEAKS
from medqa_core.measure.timing import Stats
from medqa_core.results.measurements import Compile, Energy, MeasurementError, Memory, TrainThroughput

H100 = "NVIDIA H100 80GB HBM3"


def test_throughput_is_real_tokens_over_time_with_the_step_time_stats_of_timing():
    times, tokens = [0.5, 0.7, 0.4, 0.6, 0.55], [1000, 1200, 900, 1100, 1050]
    tp = TrainThroughput.from_steps(times, tokens, [1e12] * 5, None, "bf16")
    stats = Stats.from_values(times)  # what run records and bench cases reported before the measurements
    assert tp.tokens_per_s == sum(tokens) / sum(times)
    assert (tp.step_time_s_median, tp.step_time_s_iqr) == (stats.median, stats.iqr)
    assert tp.model_flops_per_s == 5e12 / sum(times)
    # No datasheet peak for a CPU, and none measured: MFU unknown, not zero.
    assert tp.mfu_datasheet is None and tp.datasheet_peak is None and tp.mfu_measured is None


def test_mfu_divides_by_the_card_datasheet_peak_of_the_dtype_and_by_the_measured_peak():
    tp = TrainThroughput.from_steps([1.0, 1.0], [10, 10], [2e14, 2e14], H100, "bf16",
                                    measured_peak_flops_per_s=8e14)
    sxm = next(p for p in DATASHEET_PEAKS if p.name == "H100")
    assert tp.mfu_datasheet == pytest.approx(2e14 / sxm.bf16_flops_per_s)
    assert tp.datasheet_peak["name"] == "H100" and tp.datasheet_peak["dtype"] == "bf16"
    assert tp.mfu_measured == 2e14 / 8e14 and tp.measured_peak_flops_per_s == 8e14
    # fp32 has no tensor-core datasheet rate.
    assert TrainThroughput.from_steps([1.0], [10], [2e14], H100, "fp32").mfu_datasheet is None


def test_steps_trained_before_a_resume_are_left_out_of_the_flop_rate_only():
    tp = TrainThroughput.from_steps([1.0, 2.0, 3.0], [10, 20, 30], [None, 4e12, 6e12], None, "bf16")
    assert tp.model_flops_per_s == 10e12 / 5.0  # the two counted steps over their own time
    assert tp.tokens_per_s == 60 / 6.0  # tokens count every timed step
    assert TrainThroughput.from_steps([1.0], [10], [None], None, "bf16").model_flops_per_s is None


def test_a_throughput_needs_timed_steps():
    with pytest.raises(ValueError, match="at least one timed step"):
        TrainThroughput.from_steps([], [], [], None, "bf16")


def test_energy_per_token_and_question_is_none_without_a_meter():
    assert Energy.from_rounds(None, 5, 100, 4) == Energy()
    energy = Energy.from_rounds(50.0, 5, tokens_per_round=100, questions_per_round=4)
    assert (energy.energy_j, energy.joules_per_token, energy.joules_per_question) == (50.0, 0.1, 2.5)


def test_a_saved_measurement_reads_back_and_a_bad_one_is_named():
    memory = Memory(peak_mem_gib=12.5, host_rss_gib=3.0)
    assert Memory.from_dict(memory.to_dict(), "m") == memory
    compiled = Compile(requested="on", ran=True, graphs=3, recompile_steps=(4,), cache={"state": "warm"})
    assert compiled.to_dict()["recompile_steps"] == [4]  # as JSON holds it: a re-read case equals the saved one
    assert Compile.from_dict(compiled.to_dict(), "c") == compiled
    with pytest.raises(MeasurementError, match=r"f.json: train.memory: unknown field gpu_gib"):
        Memory.from_dict({"gpu_gib": 1.0}, "f.json: train.memory")
    with pytest.raises(MeasurementError, match=r"t.tokens_per_s = '12' \(str\); expected a number"):
        TrainThroughput.from_dict({"tokens_per_s": "12"}, "t")
    with pytest.raises(MeasurementError, match=r"c.ran = 'yes'; expected true/false"):
        Compile.from_dict({"ran": "yes"}, "c")
