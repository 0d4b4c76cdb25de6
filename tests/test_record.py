from __future__ import annotations

import dataclasses
import json

import pytest

from medqa_core.results.measurements import Memory, TrainThroughput
from medqa_core.results.record import (
    SCHEMA_VERSION,
    EvalResult,
    QuestionResult,
    RecordError,
    RunRecord,
    StepImbalance,
    TrainResult,
    load_record,
    save_record,
)


def make_record(**overrides) -> RunRecord:
    q = (QuestionResult("test.jsonl:1", 1, 1, (-1.5, -0.2, -2.0, -3.0)),
         QuestionResult("test.jsonl:2", 0, 3, (-1.0, -2.0, -2.5, -0.5)))
    ev = EvalResult("test.jsonl", 2, 0.5, (0.1, 0.9), 500, 1.0, 2.0, None, q)
    tr = TrainResult(3, 1.0, 24, 6000, 2, 2.0, TrainThroughput(2000.0, 1.0, 0.1), Memory(None, 1.5), (2.0, 1.5, 1.2),
                     (1.1, 1.0, 1.0))
    fields = dict(kind="run", config={"backend": "auto"}, fingerprint={"backend": "cpu"},
                  model={"name": "tiny", "parameters": 10, "trainable_parameters": 1, "quantization": {}},
                  attention={"requested": "sdpa", "ran": "sdpa-math"}, train=tr, eval_before=ev, eval_after=ev,
                  notes=("a note",))
    return RunRecord(**{**fields, **overrides})


def test_round_trip(tmp_path):
    record = make_record()
    path = save_record(record, tmp_path)
    assert path.parent == tmp_path and path.name.endswith(".json")
    assert load_record(path) == record
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was renamed into place


def test_two_saves_never_share_a_name(tmp_path):
    record = make_record()
    assert save_record(record, tmp_path) != save_record(record, tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2


def test_other_schema_version_is_refused_naming_both(tmp_path):
    path = save_record(make_record(), tmp_path)
    d = json.loads(path.read_text())
    d["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(d))
    with pytest.raises(RecordError) as e:
        load_record(path)
    assert str(path) in str(e.value)
    assert f"schema_version {SCHEMA_VERSION + 1}" in str(e.value) and f"expected {SCHEMA_VERSION}" in str(e.value)


def test_truncated_and_incomplete_files_are_named(tmp_path):
    path = save_record(make_record(), tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(RecordError, match="not a JSON run record"):
        load_record(path)
    d = make_record().to_dict()
    del d["fingerprint"]
    path.write_text(json.dumps(d))
    with pytest.raises(RecordError, match="missing fingerprint"):
        load_record(path)


def test_concurrent_writers_do_not_clobber_each_other(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    records = [make_record(notes=(f"writer {i}",)) for i in range(40)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        paths = list(pool.map(lambda r: save_record(r, tmp_path), records))
    assert len(set(paths)) == 40
    assert sorted(load_record(p).notes[0] for p in paths) == sorted(f"writer {i}" for i in range(40))


def test_per_rank_figures_round_trip_and_summarize(tmp_path):
    # Step 0 trained before a resume from a checkpoint without per-rank figures: empty, left out of the medians.
    times, tokens = ((), (1.0, 3.0), (2.0, 2.0)), ((), (10, 30), (20, 20))
    imbalance = StepImbalance.from_ranks(times, tokens, first_timed_step=0)
    assert imbalance == StepImbalance(time_max_over_mean=1.25, tokens_max_over_mean=1.25, steps=2)  # (1.5 + 1) / 2
    assert StepImbalance.from_ranks(times, tokens, first_timed_step=2).steps == 1
    assert StepImbalance.from_ranks(times[:1], tokens[:1], first_timed_step=0) is None
    train = dataclasses.replace(make_record().train, world_size=2, rank_step_time_s=times, rank_step_tokens=tokens,
                                step_imbalance=imbalance)
    record = make_record(train=train)
    assert load_record(save_record(record, tmp_path)) == record  # lists come back as tuples, the summary typed
