"""Property-based fuzzing of everything a user hands us: one clear error, never a deep traceback,
never a changed input file."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_record import make_record

from medqa_core.engine.config import ConfigError, LoraSettings, ModelConfig, TrainConfig
from medqa_core.engine.data import MedQADataError, load_medqa
from medqa_core.results.record import RecordError, load_record, save_record

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

GOOD = {"question": "Q?", "answer": "a", "options": {"A": "a", "B": "b", "C": "c", "D": "d"}, "answer_idx": "A"}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)


def _mutated_question(draw_key: str, value) -> dict:
    row = json.loads(json.dumps(GOOD))
    if draw_key.startswith("options.") and value is ...:
        row["options"].pop(draw_key.split(".")[1])
    elif draw_key.startswith("options."):
        row["options"][draw_key.split(".")[1]] = value
    elif value is ...:
        row.pop(draw_key, None)
    else:
        row[draw_key] = value
    return row


lines = st.one_of(
    st.just(json.dumps(GOOD)).map(str.encode),
    st.binary(max_size=200),  # arbitrary bytes: broken JSON, non-UTF-8
    st.builds(lambda k, v: json.dumps(_mutated_question(k, v)).encode(),
              st.sampled_from(["question", "options", "answer_idx", "options.A", "options.D", "extra"]),
              json_values | st.just(...)),
    st.builds(lambda c, n: (c * n).encode(), st.sampled_from(string.printable), st.integers(10_000, 200_000)),  # huge
    json_values.map(lambda v: json.dumps(v).encode()),  # valid JSON, wrong shape
)


def _check_named(error: Exception, path: Path) -> None:
    assert str(error).startswith(str(path)), f"error does not name the file: {error}"


@FUZZ
@given(st.lists(lines, max_size=6))
def test_medqa_loader_fuzz(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("fuzz") / "data.jsonl"
    raw = b"\n".join(rows)
    path.write_bytes(raw)
    try:
        items = load_medqa(path)
    except MedQADataError as e:  # the only exception a bad file may raise
        _check_named(e, path)
        # Per-line problems name the line; only whole-file ones (empty) do not.
        assert f"{path}:" in str(e) or "no questions" in str(e)
    else:
        assert items and all(len(i.options) == 4 and 0 <= i.answer_idx < 4 for i in items)
    assert path.read_bytes() == raw  # never changed


@FUZZ
@given(st.data())
def test_record_loader_fuzz(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("rec")
    path = save_record(make_record(), folder)
    d = json.loads(path.read_text())
    how = data.draw(st.sampled_from(["truncate", "drop", "retype", "version", "nested"]))
    if how == "truncate":
        text = path.read_text()
        raw = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        if how == "drop":
            d.pop(data.draw(st.sampled_from(sorted(d))))
        elif how == "retype":
            d[data.draw(st.sampled_from(sorted(d)))] = data.draw(json_values)
        elif how == "version":
            d["schema_version"] = data.draw(json_values)
        else:
            section = data.draw(st.sampled_from(["train", "eval_before", "eval_after"]))
            d[section][data.draw(st.sampled_from(sorted(d[section])))] = data.draw(json_values)
        raw = json.dumps(d)
    path.write_text(raw)
    try:
        load_record(path)
    except RecordError as e:
        _check_named(e, path)
    assert path.read_text() == raw


BENCH_FILE = Path(__file__).resolve().parent.parent / "results/bench/Linux-CPython-3.11-64bit/0001_cpu.json"


@FUZZ
@given(st.data())
def test_benchmark_file_loader_fuzz(tmp_path_factory, data):
    """pytest-benchmark files as the report and gate read them: truncated, fields dropped or retyped."""
    from medqa_core.compare.inputs import CompareError, summarize_file

    path = tmp_path_factory.mktemp("bench") / "0001_x.json"
    d = json.loads(BENCH_FILE.read_text())
    how = data.draw(st.sampled_from(["truncate", "top", "machine", "entry", "extra"]))
    if how == "truncate":
        text = BENCH_FILE.read_text()
        raw = text[: data.draw(st.integers(0, len(text) - 1))]
    else:
        if how == "top":
            key = data.draw(st.sampled_from(sorted(d)))
            d[key] = data.draw(json_values | st.just(None))
        elif how == "machine":
            d["machine_info"]["medqa_fingerprint"] = data.draw(json_values)
        else:
            entry = d["benchmarks"][data.draw(st.integers(0, len(d["benchmarks"]) - 1))]
            target = entry if how == "entry" else entry["extra_info"]
            key = data.draw(st.sampled_from(sorted(target)))
            if data.draw(st.booleans()):
                target.pop(key)
            else:
                target[key] = data.draw(json_values)
        raw = json.dumps(d)
    path.write_text(raw)
    try:
        summarize_file(path)
    except CompareError as e:
        _check_named(e, path)
    assert path.read_text() == raw


@FUZZ
@given(rank=st.integers(-5, 5), alpha=st.integers(-5, 5), dropout=st.floats(-1, 2, allow_nan=False),
       steps=st.one_of(st.none(), st.integers(-5, 5)), batch=st.integers(-3, 3),
       attn=st.sampled_from(["sdpa", "sdpa-math", "warp", "", "eager"]),
       backend_preset=st.sampled_from(["tiny", "huge", "mistral-7b"]))
def test_config_values_fuzz(rank, alpha, dropout, steps, batch, attn, backend_preset):
    for build in (
        lambda: LoraSettings(rank=rank, alpha=alpha, dropout=dropout),
        lambda: TrainConfig(max_steps=steps, batch_size=batch),
        lambda: ModelConfig(preset=backend_preset, attn=attn),
    ):
        try:
            build()
        except ConfigError as e:
            assert "must be" in str(e) or "unknown" in str(e)


@pytest.mark.parametrize(("args", "message"), [
    (["--max-steps", "-3"], "max_steps must be >= 1, got -3"),
    (["--lora-rank", "0"], "LoRA rank must be >= 1, got 0"),
    (["--batch-size", "0"], "batch_size must be >= 1, got 0"),
])
def test_bad_config_on_the_command_line_is_one_line(args, message, capsys):
    from medqa_core.cli import main

    assert main(["train", *args]) == 2
    assert message in capsys.readouterr().err
