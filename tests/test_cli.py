"""The command line, end to end, on the tiny model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medqa_core.cli import TRACE_DIR, build_parser, main
from medqa_core.results.record import load_record

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", ["run", "train", "evaluate", "trace", "fingerprint", "report", "compare", "gate"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert "usage: medqa-parity " + command in capsys.readouterr().out


def test_help_lists_each_commands_own_flags_with_examples_and_no_raw_dicts(capsys):
    parser = build_parser()
    helps = {}
    for command in ("train", "evaluate", "run", "trace"):
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        helps[command] = capsys.readouterr().out
    assert "--eval-batch-size" not in helps["train"] and "--eval-limit" not in helps["train"]
    assert "--lr" not in helps["evaluate"] and "--train-limit" not in helps["evaluate"]
    assert "--eval-batch-size" in helps["run"] and "--lr" in helps["run"]
    assert all("examples:" in text and "{'" not in text and "{}" not in text for text in helps.values())
    assert "capped (batch_size=32, gradient_checkpointing=True" in " ".join(helps["run"].split())
    with pytest.raises(SystemExit):
        parser.parse_args(["--help"])
    listed = capsys.readouterr().out
    assert "trace" in listed and "profile" not in listed.split("positional arguments")[1].split("options")[0]


def test_version_prints_and_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("medqa-parity ")


@pytest.mark.slow
def test_trace_saves_outside_the_tracked_tree_quietly(tiny_model_dir, tmp_path):
    # A process of its own: the profiler's native log level is read once per process, at its first start.
    # "profile" and "--profiles" are the older names of "trace" and its "--profile"; both still work.
    done = subprocess.run([sys.executable, "-m", "medqa_core.cli", "profile", "--backend", "cpu", "--model",
                           str(tiny_model_dir), "--train-limit", "8", "--profiles", "eager+batch_size=2", "--steps",
                           "1", "--warmup", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "USDT" not in done.stderr and "profiler_start" not in done.stderr  # kineto's lines, not ours
    # By default under runs/ (git-ignored): tracing leaves the checkout clean, so later records are not git_dirty.
    (out,) = (tmp_path / TRACE_DIR).glob("*.json")
    assert f"wrote {Path(TRACE_DIR) / out.name}" in done.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{TRACE_DIR}/{out.name}"], cwd=ROOT)
    assert ignored.returncode == 0, f"{TRACE_DIR} is tracked by git"
    saved = json.loads(out.read_text())
    (profile,) = saved["profiles"].values()
    assert profile["tokens_per_step"] > 0 and profile["categories"]["matmul"] > 0
    assert saved["meta"]["settings"]["eager+batch_size=2"]["train"]["batch_size"] == 2
    assert saved["meta"]["fingerprint"]["backend"] == "cpu"
    assert "eager+batch_size=2 (off)" in done.stdout


def test_trace_help_lists_only_the_flags_that_apply(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["trace", "--help"])
    text = capsys.readouterr().out
    for flag in ("--adapter-out", "--resume", "--checkpoint-dir", "--checkpoint-every", "--keep-checkpoints",
                 "--nproc"):
        assert flag not in text, flag  # trace saves no adapter or checkpoint and starts no torchrun
    assert "--lr" in text and "--batch-size" in text and "--out" in text


def test_unknown_profile_is_a_user_error(tiny_model_dir, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--profile", "turbo"]) == 2
    assert "unknown profile 'turbo'" in capsys.readouterr().err


def test_a_profile_that_cannot_train_here_stops_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    # max-speed trains with flex attention, which has no backward on CPU: one line, exit 2, no record half-made.
    results = tmp_path / "records"
    code = main(["run", "--model", str(tiny_model_dir), "--backend", "cpu", "--profile", "max-speed",
                 "--train-limit", "4", "--eval-limit", "4", "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert "flex attention has no backward on CPU" in err and "max-speed+attn=sdpa" in err
    assert "Traceback" not in err and "evaluate" not in err  # nothing was scored before it stopped
    assert not results.exists() or not any(results.iterdir())


def test_run_end_to_end_saves_a_fingerprinted_record(tiny_model_dir, tmp_path, capsys):
    code = main(["run", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "8", "--eval-limit", "8",
                 "--max-steps", "3", "--batch-size", "4", "--results", str(tmp_path / "results"),
                 "--adapter-out", str(tmp_path / "adapter")])
    assert code == 0
    out = capsys.readouterr().out
    (path,) = (tmp_path / "results").glob("*.json")
    assert f"record            {path}" in out
    record = load_record(path)
    assert record.kind == "run" and record.train.steps == 3
    assert record.eval_before.n_questions == record.eval_after.n_questions == 8
    assert record.fingerprint["backend"] == "cpu" and record.fingerprint["packages"]["torch"]
    assert record.model["quantization"]["blocksize"] == 64
    assert record.attention["ran"].startswith("sdpa")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    for line in ("accuracy before", "accuracy after", "train tokens/s", "attention kernel"):
        assert line in out


def test_evaluate_with_saved_adapter(tiny_model_dir, tmp_path):
    assert main(["train", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "4", "--max-steps", "1",
                 "--results", str(tmp_path), "--adapter-out", str(tmp_path / "ad")]) == 0
    assert main(["evaluate", "--backend", "cpu", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "ad"),
                 "--eval-limit", "4", "--results", str(tmp_path)]) == 0
    kinds = sorted(load_record(p).kind for p in tmp_path.glob("*.json"))
    assert kinds == ["evaluate", "train"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nonexistent/model"], "model folder not found"),
        (["--data", "/nonexistent/data"], "MedQA folder not found"),
        pytest.param(["--backend", "cuda"], "torch", marks=pytest.mark.skipif(
            torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")),  # names the installed build
        (["--backend", "cpu", "--attn", "sdpa-efficient"], "--attn sdpa-efficient cannot run on cpu"),
    ],
)
def test_user_errors_are_one_clear_line(tiny_model_dir, tmp_path, capsys, args, message):
    argv = ["evaluate", "--model", str(tiny_model_dir), "--eval-limit", "2", "--results", str(tmp_path), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "medqa-parity: error:" in err and message in err and "Traceback" not in err
    assert not list(tmp_path.glob("*.json"))


def test_unknown_kernel_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--attn", "warp-speed"])
    assert e.value.code == 2
    assert "invalid choice: 'warp-speed'" in capsys.readouterr().err


def test_fingerprint_prints_json(capsys):
    assert main(["fingerprint", "--backend", "cpu"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["backend"] == "cpu"
    assert "has not been run by this project on a ROCm machine" in captured.err


def test_out_of_memory_is_recorded_and_earlier_phases_kept(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import medqa_core.run

    def run_out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(medqa_core.run, "train", run_out_of_memory)
    code = main(["run", "--backend", "cpu", "--model", str(tiny_model_dir), "--eval-limit", "4", "--train-limit", "4",
                 "--max-steps", "1", "--results", str(tmp_path)])
    assert code == 3
    assert "out of memory during fine-tune" in capsys.readouterr().err
    (path,) = tmp_path.glob("*.json")
    record = load_record(path)
    assert record.failure["kind"] == "oom" and record.failure["phase"] == "fine-tune"
    assert "Tried to allocate 20.00 GiB" in record.failure["message"]
    assert record.failure["host_rss_gib"] > 0  # as a bench case's OOM carries it (measure.timing.oom_failure)
    assert record.eval_before is not None and record.eval_before.n_questions == 4  # what finished is kept
    assert record.train is None and record.eval_after is None


def test_a_commands_typo_is_answered_with_the_nearest_name(capsys):
    with pytest.raises(SystemExit) as e:
        main(["evalute"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "unknown command 'evalute'; did you mean evaluate?" in err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--eval-limt", "3"])
    err = capsys.readouterr().err
    # The command's own usage, not the top level's, and the option meant.
    assert e.value.code == 2 and err.startswith("usage: medqa-parity evaluate")
    assert "unrecognized arguments: --eval-limt 3; did you mean --eval-limit?" in err


def test_evaluate_with_a_missing_adapter_stops_before_the_model_loads(tiny_model_dir, tmp_path, monkeypatch, capsys):
    import medqa_core.run

    def load_session(*args, **kwargs):
        raise AssertionError("the model was loaded for an adapter that does not exist")

    monkeypatch.setattr(medqa_core.run, "load_session", load_session)
    code = main(["evaluate", "--backend", "cpu", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "nope"),
                 "--eval-limit", "2", "--results", str(tmp_path / "records")])
    assert code == 2
    assert f"adapter folder not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--backend", "cpu", "--model", str(tiny_model_dir), "--adapter", str(tmp_path / "empty"),
                 "--eval-limit", "2", "--results", str(tmp_path / "records")]) == 2
    assert "no adapter_model.safetensors" in capsys.readouterr().err


@pytest.mark.parametrize("argv, meant", [
    (["run", "--adapter", "x"], "--adapter-out"),  # an evaluate flag given to run: not taken for --adapter-out
    (["evaluate", "--eval-lim", "3"], "--eval-limit"),
    (["gate", "--candidate", "b.json", "--base", "a.json"], "--baseline"),
])
def test_an_abbreviated_option_is_refused_not_guessed(argv, meant, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"unrecognized arguments: {' '.join(argv[-2:])}; did you mean {meant}?" in err


def test_every_command_refuses_abbreviations():
    import argparse

    parser = build_parser()
    commands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert not parser.allow_abbrev and not [name for name, p in commands.items() if p.allow_abbrev]
