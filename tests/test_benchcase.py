"""One schema for a bench case and for the out-of-memory failure: every committed file reads through it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medqa_core.compare.inputs import summarize_file
from medqa_core.results.benchcase import BENCH_CASE_SCHEMA, BenchCase, BenchCaseError
from medqa_core.results.failure import FailureError, OomFailure
from medqa_core.results.measurements import Memory
from medqa_core.results.record import SCHEMA_VERSION, load_record

RESULTS = Path(__file__).resolve().parents[1] / "results"
BENCH_FILES = sorted(RESULTS.glob("bench/*/*.json")) + sorted(RESULTS.glob("gate-noise/*/*.json"))


@pytest.mark.parametrize("path", BENCH_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_committed_bench_file_reads_and_round_trips(path):
    for entry in json.loads(path.read_text())["benchmarks"]:
        case = BenchCase.from_extra_info(entry["extra_info"], entry["name"])
        assert BenchCase.from_extra_info(case.to_extra_info()) == case
        assert case.headline() != "no figure" or case.oom is not None
    assert summarize_file(path)  # and the report's reader takes the whole file


@pytest.mark.parametrize("path", sorted(RESULTS.glob("runs/*.json")), ids=lambda p: p.name[:16])
def test_every_committed_run_record_reads(path):
    assert summarize_file(path)[0].source == "record" and load_record(path).schema_version == SCHEMA_VERSION


def test_schema_1_migrates_and_schema_3_is_stamped():
    old = {"arm": "ours", "joules_per_token": "unavailable", "oom": {"during": "timed round 2", "message": "OOM"}}
    case = BenchCase.from_extra_info(old)
    assert case.oom == OomFailure(phase="timed round 2", message="OOM") and case.energy.joules_per_token is None
    assert case.to_extra_info()["schema_version"] == BENCH_CASE_SCHEMA == 3
    assert case.to_extra_info()["oom"] == {"phase": "timed round 2", "message": "OOM", "memory_allocated_gib": None,
                                           "peak_mem_gib": None, "host_rss_gib": None, "kind": "oom"}
    assert case.dtype == "bfloat16"  # before compute_dtype was recorded every bench ran bf16 autocast


def test_a_newer_schema_is_refused_by_name():
    with pytest.raises(BenchCaseError, match=r"f.json: test_x\[sdpa\]: bench case schema_version 4, expected 3 "
                                             r"\(1 and 2 are migrated on read\)"):
        BenchCase.from_extra_info({"schema_version": 4}, "f.json: test_x[sdpa]")


@pytest.mark.parametrize("info, field, expected", [
    ({"tokens_per_s": "12"}, "throughput.tokens_per_s", "a number"),  # schema 2's flat field, migrated
    ({"schema_version": 3, "memory": {"peak_mem_gib": "80"}}, "memory.peak_mem_gib", "a number"),
    ({"schema_version": 3, "scoring": [1.0]}, "scoring is list;", "an object"),
    ({"batch_size": 8.5}, "batch_size", "integer"), ({"packing": 1}, "packing", "true/false"),
    ({"attention": []}, "attention", "object"),
    ({"gradient_checkpointing": 1}, "gradient_checkpointing", "true/false or a mode")])
def test_a_field_of_the_wrong_type_names_field_found_and_expected(info, field, expected):
    with pytest.raises(BenchCaseError, match=rf"case: {field}.* expected {expected}"):
        BenchCase.from_extra_info(info, "case")


@pytest.mark.parametrize("mode", [True, False, "unsloth"])
def test_gradient_checkpointing_is_true_false_or_a_peers_mode(mode):
    # Unsloth's arm records its own offloading mode by name ("unsloth"), as its settings say
    case = BenchCase.from_extra_info({"schema_version": 3, "gradient_checkpointing": mode}, "case")
    assert case.gradient_checkpointing == mode
    assert case.workload()["gradient_checkpointing"] == mode


def test_unknown_fields_are_kept_as_written():
    info = {"arm": "ours", "dynamo": {"unique_graphs": 1}, "first_call_s": 3.0, "memory": {"peak_mem_gib": None},
            "schema_version": 3}
    case = BenchCase.from_extra_info(info)
    assert case.details == {"dynamo": {"unique_graphs": 1}, "first_call_s": 3.0}
    # a null figure stays null: not measured here
    assert case.to_extra_info() == {**info, "memory": Memory().to_dict()}


def test_a_run_records_failure_reads_with_the_same_schema():
    d = {"kind": "oom", "phase": "fine-tune", "message": "CUDA out of memory", "memory_allocated_gib": 70.5,
         "peak_mem_gib": 79.0}
    failure = OomFailure.from_dict(d)
    assert failure.text == "out of memory during fine-tune (CUDA out of memory)"
    with pytest.raises(FailureError, match="memory_allocated_gib = 'a lot' is not a finite number"):
        OomFailure.from_dict({**d, "memory_allocated_gib": "a lot"})
