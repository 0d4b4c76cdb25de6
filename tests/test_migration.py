"""Every committed result file reads through the one reader, and the migration moves each figure without changing it.

Run records of schema 1 kept their train figures flat (``train.tokens_per_s``); bench cases of schemas 1 and 2
kept theirs flat in ``extra_info`` (``tokens_per_s``, ``mfu``, ``peak_mem_gib``, ``joules_per_token``, ...).
Both now carry the measurements of :mod:`medqa_core.results.measurements` under the same names. Each old raw
value is looked up in the migrated object and must be the same number (``"unavailable"`` energy: None).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from medqa_core.compare.inputs import BenchFile, read_result_file
from medqa_core.results.benchcase import _V2_FIELDS, BenchCase
from medqa_core.results.record import _V1_TRAIN_FIELDS, SCHEMA_VERSION, RunRecord, load_record
from medqa_core.results.runset import load_runset

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _json_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*.json"))


def _kind(data: Any) -> str:
    if isinstance(data, dict) and "benchmarks" in data and "machine_info" in data:
        return "bench"
    if isinstance(data, dict) and data.get("kind") == "runset":
        return "runset"
    if isinstance(data, dict) and "schema_version" in data and "fingerprint" in data:
        return "record"
    return "other"  # traces (results/traces/): no figure a report, gate or bench case shares


FILES = [(p, _kind(json.loads(p.read_text(encoding="utf-8")))) for p in _json_files()]


def test_every_kind_of_result_file_is_committed_and_found():
    kinds = {k for _, k in FILES}
    assert {"bench", "runset", "record"} <= kinds


def _same(old: Any, new: Any) -> bool:
    if old == "unavailable":  # bench/ wrote an energy without a meter as this word; the schema says null
        return new is None
    return type(new) in (type(old), float) and new == old if not isinstance(old, dict) else new == old


def _id(path: Path) -> str:
    return path.relative_to(RESULTS).as_posix()


@pytest.mark.parametrize("path", [p for p, k in FILES if k == "record"], ids=_id)
def test_every_committed_run_record_migrates_without_changing_a_figure(path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    record = read_result_file(path)
    assert isinstance(record, RunRecord) and record.schema_version == SCHEMA_VERSION
    assert load_record(path) == record
    if raw["schema_version"] == 1 and raw["train"] is not None:
        tr = raw["train"]
        moved = [k for k in _V1_TRAIN_FIELDS if k in tr]
        assert {"tokens_per_s", "step_time_s_median", "peak_mem_gib", "host_peak_rss_gib"} <= set(moved)
        for key in moved:
            part, name = _V1_TRAIN_FIELDS[key]
            assert _same(tr[key], getattr(getattr(record.train, part), name)), (key, part, name)
        for key in set(tr) - set(_V1_TRAIN_FIELDS) - {"loss_per_step", "step_time_s", "step_imbalance",
                                                       "rank_step_time_s", "rank_step_tokens", "compile"}:
            assert getattr(record.train, key) == tr[key], key
        for key, value in (tr.get("compile") or {}).items():  # typed now (Compile): each value as it was
            assert _same(value, getattr(record.train.compile, key)) or list(getattr(record.train.compile, key)) \
                == value, ("compile", key)
        assert list(record.train.step_time_s) == tr["step_time_s"]
        assert list(record.train.loss_per_step) == tr["loss_per_step"]
    for phase in ("eval_before", "eval_after"):
        if raw.get(phase):
            ev = getattr(record, phase)
            assert (ev.accuracy, ev.questions_per_s, ev.peak_mem_gib) == (
                raw[phase]["accuracy"], raw[phase]["questions_per_s"], raw[phase]["peak_mem_gib"])


@pytest.mark.parametrize("path", [p for p, k in FILES if k == "bench"], ids=_id)
def test_every_committed_bench_file_migrates_without_changing_a_figure(path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    bench = read_result_file(path)
    assert isinstance(bench, BenchFile) and len(bench.entries) == len(raw["benchmarks"])
    for entry, old in zip(bench.entries, raw["benchmarks"], strict=True):
        info, case = old["extra_info"], entry.case
        assert entry.name == old["name"] and entry.median_s == old["stats"]["median"]
        for key in (k for k in _V2_FIELDS if k in info):
            part, name = _V2_FIELDS[key]
            measurement = getattr(case, part)
            assert measurement is not None, (entry.name, key)
            assert _same(info[key], getattr(measurement, name)), (entry.name, key, info[key])
        for key, value in (info.get("compile") or {}).items():  # typed now (Compile): each value as it was
            assert _same(value, getattr(case.compile, key)) or list(getattr(case.compile, key)) == value, key
        for key in ("batch_size", "arm", "compute_dtype", "speedup_vs_reference", "decode_tokens_per_s",
                    "prefill_tokens_per_s", "accuracy"):
            if key in info:
                assert getattr(case, key) == info[key], (entry.name, key)
        # And it saves as schema 3 and reads back the same.
        assert BenchCase.from_extra_info(case.to_extra_info(), entry.name) == case


@pytest.mark.parametrize("path", [p for p, k in FILES if k == "runset"], ids=lambda p: p.name[:16])
def test_every_committed_run_set_reads_its_records_migrated(path):
    runset, runs = load_runset(path)
    assert len(runs) == len(runset.runs) > 1
    for run in runs:
        assert run.record == read_result_file(run.path)
        assert run.record.train is not None and run.record.train.throughput.tokens_per_s > 0
