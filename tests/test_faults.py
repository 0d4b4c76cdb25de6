"""Faults without surprises (issue 22): damaged checkpoints, real out-of-memory, preemption signals, resume
that extends, damaged model folders, over-long questions, file modes.

Every fault here is real: files are truncated, deleted and rewritten on disk, the allocation failure comes
from an address-space limit, the signals are sent to a real fine-tune. Nothing asserts how fast anything ran.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import FINE_TUNE_STEPS, QUESTION, fine_tune_cmd, run_ok, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from medqa_core.cli import main
from medqa_core.engine import checkpoint as ckpt_module
from medqa_core.engine.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from medqa_core.engine.data import (
    MAX_TOKEN_CHARS,
    MedQADataError,
    bundled_data_dir,
    encode_scoring,
    encode_train,
    find_split,
    load_medqa,
)
from medqa_core.engine.preemption import Interrupted, StopOnSignals
from medqa_core.engine.train import make_optimizer, train
from medqa_core.measure.timing import is_oom
from medqa_core.results.record import load_record, save_record

FILES = ("adapter_model.safetensors", "adapter_config.json", "optim.pt", "rng.safetensors", "state.json",
         "manifest.json")
NEWEST, OLDER = "step-000002", "step-000001"


# ---- checkpoints that prove themselves -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Trained:
    """Two real checkpoints (steps 1 and 2) of the tiny model, and what resuming them needs."""

    session: Any
    cfg: Any
    config: dict[str, Any]
    root: Path


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory) -> Trained:
    from medqa_core.engine.session import load_session
    from medqa_core.run import checkpoint_config

    cfg = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, max_steps=2, batch_size=2, checkpoint_every=1, timing_warmup_steps=0))
    session = load_session(cfg)  # its own model: resuming overwrites the LoRA weights
    items = load_medqa(find_split(bundled_data_dir(), "dev"), limit=4)
    examples = [encode_train(session.tokenizer, item, 256) for item in items]
    root = tmp_path_factory.mktemp("checkpoints") / "ckpt"
    train(session.model, examples, cfg.train, session.device, session.attention, session.tokenizer.pad_token_id,
          session.numerics, checkpoint_dir=root, checkpoint_config=checkpoint_config(cfg))
    assert [p.name for p in list_checkpoints(root)] == [OLDER, NEWEST]
    return Trained(session, cfg, checkpoint_config(cfg), root)


@pytest.fixture(autouse=True)
def _keep_global_rng() -> Iterator[None]:
    """Resuming restores a checkpoint's RNG states; the tests after these keep their own."""
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    yield
    torch.set_rng_state(torch_state)
    random.setstate(python_state)


def _resume(t: Trained, root: Path) -> int:
    optimizer, scheduler = make_optimizer(t.session.model, t.cfg.train)
    return load_checkpoint(root, t.session.model, optimizer, scheduler, t.config).step


def _copy(t: Trained, into: Path) -> Path:
    root = into / "ckpt"
    shutil.copytree(t.root, root)
    return root


def _lora_equals(t: Trained, folder: Path) -> bool:
    from peft import get_peft_model_state_dict

    saved = load_file(folder / "adapter_model.safetensors")
    now = get_peft_model_state_dict(t.session.model)
    return saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in saved)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def delete(path: Path) -> None:
    path.unlink()


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte is tensor data (safetensors) or the zip directory (optim.pt): size unchanged
    path.write_bytes(bytes(data))


def break_json(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2] + "\n")  # cut off mid-object: not JSON any more


def _lora_name(path: Path) -> str:
    return sorted(load_file(path))[0]


def drop_tensor(path: Path) -> None:
    tensors = load_file(path)
    tensors.pop(_lora_name(path))
    save_file(tensors, path)


def reshape_tensor(path: Path) -> None:
    tensors = load_file(path)
    name = _lora_name(path)
    tensors[name] = tensors[name][: tensors[name].shape[0] // 2].clone()  # rank 16 -> 8
    save_file(tensors, path)


# (file, damage, what the one warning says about it; {n} and {m} are the damaged and recorded sizes)
DAMAGES = [
    *[(name, truncate, "{n} bytes, the manifest says {m} (truncated)") for name in FILES if name != "manifest.json"],
    *[(name, delete, "missing") for name in FILES if name != "manifest.json"],
    *[(name, flip_last_byte, "contents differ from the manifest (sha256") for name in
      ("adapter_model.safetensors", "optim.pt", "rng.safetensors")],
    ("adapter_config.json", break_json, "bytes, the manifest says"),
    ("state.json", break_json, "bytes, the manifest says"),
    ("adapter_model.safetensors", drop_tensor, "missing (1 of the"),
    ("adapter_model.safetensors", reshape_tensor, "has shape [8,"),
    ("manifest.json", truncate, "not valid JSON"),
    ("manifest.json", break_json, "not valid JSON"),
    ("manifest.json", delete, "missing (it is written last, so the checkpoint is incomplete)"),
]


@pytest.mark.parametrize(("name", "damage", "expected"), DAMAGES,
                         ids=[f"{n}-{d.__name__}" for n, d, _ in DAMAGES])
def test_a_damaged_newest_checkpoint_is_skipped_for_the_older_one(trained, tmp_path, caplog, name, damage, expected):
    root = _copy(trained, tmp_path)
    path = root / NEWEST / name
    recorded = json.loads((root / NEWEST / "manifest.json").read_text())["files"].get(name, {}).get("bytes")
    damage(path)
    size = path.stat().st_size if path.exists() else None
    caplog.set_level(logging.INFO, logger="medqa_core")
    assert _resume(trained, root) == 1
    assert _lora_equals(trained, root / OLDER)  # the older checkpoint's weights, not a mix
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"checkpoint {root / NEWEST} skipped: {name}: ")
    assert expected.format(n=size, m=recorded) in warning
    assert "\n" not in warning


@pytest.mark.parametrize("damage", [drop_tensor, reshape_tensor])
def test_an_adapter_that_does_not_fit_the_model_is_skipped_even_with_a_matching_manifest(trained, tmp_path, caplog,
                                                                                          damage):
    # Damage that rewrote the manifest too (or a checkpoint of another LoRA shape): the model's own LoRA
    # parameters are what the adapter is finally checked against.
    root = _copy(trained, tmp_path)
    folder = root / NEWEST
    name = _lora_name(folder / "adapter_model.safetensors")
    damage(folder / "adapter_model.safetensors")
    (folder / "manifest.json").unlink()
    ckpt_module._write_manifest(folder)
    caplog.set_level(logging.WARNING, logger="medqa_core")
    assert _resume(trained, root) == 1
    (warning,) = _warnings(caplog)
    assert f"adapter_model.safetensors: tensor {name}" in warning and "the model's LoRA parameters" in warning


def _make_legacy(folder: Path) -> None:
    """A checkpoint as schema 1 wrote it: no manifest.json, state.json schema_version 1."""
    (folder / "manifest.json").unlink()
    state = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**state, "schema_version": 1}))


def test_a_checkpoint_without_manifest_from_schema_1_still_resumes(trained, tmp_path, caplog):
    root = _copy(trained, tmp_path)
    _make_legacy(root / NEWEST)
    caplog.set_level(logging.INFO, logger="medqa_core")
    assert _resume(trained, root) == 2
    assert _lora_equals(trained, root / NEWEST)
    assert not _warnings(caplog)
    assert any("has no manifest (schema 1): verified by loading its files" in r.getMessage() for r in caplog.records)


LEGACY_DAMAGES = [
    ("adapter_model.safetensors", truncate, "its header needs"),
    ("adapter_model.safetensors", drop_tensor, "the model's LoRA parameters"),
    ("optim.pt", truncate, "optim.pt: unreadable ("),
    ("rng.safetensors", truncate, "(truncated)"),
    ("rng.safetensors", delete, "rng.safetensors: missing"),
    ("state.json", break_json, "state.json: not valid JSON"),
]


@pytest.mark.parametrize(("name", "damage", "expected"), LEGACY_DAMAGES,
                         ids=[f"{n}-{d.__name__}" for n, d, _ in LEGACY_DAMAGES])
def test_a_damaged_schema_1_checkpoint_is_skipped_by_loading_it(trained, tmp_path, caplog, name, damage, expected):
    root = _copy(trained, tmp_path)
    _make_legacy(root / NEWEST)
    damage(root / NEWEST / name)
    caplog.set_level(logging.WARNING, logger="medqa_core")
    assert _resume(trained, root) == 1
    (warning,) = _warnings(caplog)
    assert warning.startswith(f"checkpoint {root / NEWEST} skipped: {name}: ") and expected in warning


def test_no_valid_checkpoint_is_one_line_naming_each(trained, tmp_path, caplog):
    root = _copy(trained, tmp_path)
    truncate(root / NEWEST / "optim.pt")
    delete(root / OLDER / "rng.safetensors")
    with pytest.raises(CheckpointError) as e:
        _resume(trained, root)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"{root}: no valid checkpoint to resume from (")
    assert f"{NEWEST}: optim.pt: " in message and f"{OLDER}: rng.safetensors: missing" in message


# Which byte range of which file gets cut off, or which byte flips, is the fuzzer's choice.
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(name=st.sampled_from(FILES), cut=st.floats(min_value=0.0, max_value=0.999))
def test_fuzz_a_truncation_anywhere_falls_back_naming_the_file(trained, caplog, name, cut):
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(trained, Path(tmp))
        path = root / NEWEST / name
        data = path.read_bytes()
        path.write_bytes(data[: int(cut * len(data))])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medqa_core"):
            assert _resume(trained, root) == 1
        (warning,) = _warnings(caplog)
        assert warning.startswith(f"checkpoint {root / NEWEST} skipped: {name}: ")


@FUZZ
@given(name=st.sampled_from(FILES), where=st.floats(min_value=0.0, max_value=0.999), mask=st.integers(1, 255))
def test_fuzz_a_changed_byte_anywhere_is_caught(trained, caplog, name, where, mask):
    with tempfile.TemporaryDirectory() as tmp:
        root = _copy(trained, Path(tmp))
        path = root / NEWEST / name
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= mask
        path.write_bytes(bytes(data))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="medqa_core"):
            step = _resume(trained, root)
        warnings = _warnings(caplog)
        if name != "manifest.json":  # every byte of every other file is covered by its sha256
            assert step == 1 and len(warnings) == 1 and f"skipped: {name}: " in warnings[0]
        elif warnings:  # a manifest that no longer matches its files: one line, the older checkpoint
            assert step == 1 and len(warnings) == 1 and f"checkpoint {root / NEWEST} skipped: " in warnings[0]
        else:  # the byte changed something resuming does not rely on (JSON spacing, schema_version)
            assert step == 2 and _lora_equals(trained, root / NEWEST)


# ---- through the command line: refusals before the model loads, stale temp folders, file modes ---------


def _cli_train(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--backend", "cpu", "--model", str(model_dir), "--train-limit", "8", "--batch-size", "2",
            "--results", str(tmp_path / "results"), "--adapter-out", str(tmp_path / "adapter"), *extra]


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medqa-parity:")]


def test_resume_with_more_steps_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(_cli_train(tiny_model_dir, whole, "--max-steps", "6")) == 0
    assert main(_cli_train(tiny_model_dir, part, "--max-steps", "3", "--checkpoint-dir", str(part / "ckpt"))) == 0
    # More steps, another results folder and checkpoint cadence: none changes steps 1-3. (`train` takes no
    # evaluation flags; `run --resume` may change them, as run.RESUME_MAY_CHANGE lists.)
    assert main(_cli_train(tiny_model_dir, part, "--max-steps", "6", "--checkpoint-every", "2",
                           "--keep-checkpoints", "3", "--results", str(part / "results-2"),
                           "--resume", str(part / "ckpt"))) == 0
    (a,) = (whole / "results").glob("*.json")
    (b,) = (part / "results-2").glob("*.json")
    assert load_record(b).train.loss_per_step == load_record(a).train.loss_per_step
    assert len(load_record(b).train.loss_per_step) == 6
    x, y = load_file(whole / "adapter" / "adapter_model.safetensors"), load_file(part / "adapter" /
                                                                                 "adapter_model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert [p.name for p in list_checkpoints(part / "ckpt")] == ["step-000003", "step-000004", "step-000006"]


def test_resume_with_another_lr_is_refused_before_the_model_loads(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    ckpt = tmp_path / "ckpt"
    assert main(_cli_train(model, tmp_path, "--max-steps", "2", "--checkpoint-dir", str(ckpt))) == 0
    capsys.readouterr()
    truncate(model / "model.safetensors")  # loading the model now fails: the refusal must come first
    assert main(_cli_train(model, tmp_path, "--max-steps", "2", "--lr", "0.001", "--batch-size", "4",
                           "--resume", str(ckpt))) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "train.lr: checkpoint 0.0002, now 0.001" in line and "train.batch_size: checkpoint 2, now 4" in line
    assert "model.safetensors" not in line
    assert main(_cli_train(model, tmp_path, "--max-steps", "1", "--resume", str(ckpt))) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert "at step 2, past the 1 steps this run asks for; resume with --max-steps 2 or more" in line


def test_cli_without_a_valid_checkpoint_exits_2_with_one_line(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert main(_cli_train(tiny_model_dir, tmp_path, "--max-steps", "2", "--checkpoint-every", "1",
                           "--checkpoint-dir", str(ckpt))) == 0
    for folder in list_checkpoints(ckpt):
        truncate(folder / "adapter_model.safetensors")
    capsys.readouterr()
    assert main(_cli_train(tiny_model_dir, tmp_path, "--max-steps", "2", "--resume", str(ckpt))) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: {ckpt}: no valid checkpoint to resume from (")
    assert "Traceback" not in err


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_records_checkpoints_and_adapters_follow_the_umask(tiny_model_dir, tmp_path, umask, file_mode, dir_mode):
    ckpt = tmp_path / "ckpt"
    stale = ckpt / ".step-000001-deadbeef"  # left by a checkpoint write that was killed
    stale.mkdir(parents=True)
    (stale / "optim.pt").write_bytes(b"half")
    previous = os.umask(umask)
    try:
        assert main(_cli_train(tiny_model_dir, tmp_path, "--max-steps", "1", "--checkpoint-dir", str(ckpt))) == 0
        from test_record import make_record

        record = save_record(make_record(), tmp_path / "records")
    finally:
        os.umask(previous)
    assert not stale.exists()
    (run_record,) = (tmp_path / "results").glob("*.json")
    (folder,) = list_checkpoints(ckpt)
    assert _mode(folder) == dir_mode
    files = [record, run_record, tmp_path / "adapter" / "adapter_model.safetensors", *folder.iterdir()]
    assert [(str(p), _mode(p)) for p in files] == [(str(p), file_mode) for p in files]


# ---- preemption: SIGTERM and SIGINT to a real fine-tune -------------------------------------------

def _interrupt(cmd: list[str], ckpt: Path, sig: signal.Signals) -> subprocess.CompletedProcess:
    """Start a fine-tune, send ``sig`` once its first checkpoint is there, and wait for it to stop."""
    # A child of a shell that ignores SIGINT (a background job) would inherit that: give it the default back.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300  # a hang guard, not a speed limit
    while not list_checkpoints(ckpt) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, sig)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code", "resume"), [(signal.SIGTERM, 143, True), (signal.SIGINT, 130, False)],
                         ids=["SIGTERM-then-resume", "SIGINT"])
def test_a_signal_stops_at_a_step_boundary_with_checkpoint_record_and_one_line(tiny_model_dir, tmp_path, request,
                                                                             sig, code, resume):
    """SIGTERM, then --resume: the loss curve and adapter of an uninterrupted run, bit for bit. SIGINT takes
    the same path to its checkpoint (only the signal's name differs), so its resume is not run again."""
    ckpt = tmp_path / "stopped" / "ckpt"
    done = _interrupt(fine_tune_cmd(tiny_model_dir, tmp_path, "stopped", "--checkpoint-dir", str(ckpt)), ckpt, sig)
    assert done.returncode == code, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "KeyboardInterrupt" not in done.stderr
    (record_path,) = (tmp_path / "stopped" / "results").glob("*.json")
    record = load_record(record_path)
    failure = record.failure
    stopped_at = failure["step"]
    assert 0 < stopped_at < FINE_TUNE_STEPS, "the signal must land mid-run for this test to mean anything"
    assert failure["kind"] == "interrupted" and failure["signal"] == sig.name and failure["phase"] == "fine-tune"
    assert failure["steps"] == FINE_TUNE_STEPS and failure["checkpoint"] == str(ckpt / f"step-{stopped_at:06d}")
    assert record.train is None and list_checkpoints(ckpt)[-1].name == f"step-{stopped_at:06d}"
    assert not list(ckpt.glob(".step-*"))  # no half-written checkpoint
    (line,) = _error_lines(done.stderr)
    assert line == (f"medqa-parity: interrupted by {sig.name} during fine-tune after step {stopped_at} of "
                    f"{FINE_TUNE_STEPS}; checkpoint {failure['checkpoint']}: continue with --resume {ckpt}; "
                    f"what finished is saved in {record_path}")
    if not resume:
        return
    uninterrupted = request.getfixturevalue("uninterrupted")
    run_ok(fine_tune_cmd(tiny_model_dir, tmp_path, "stopped", "--resume", str(ckpt), "--results",
                         str(tmp_path / "resumed")))
    (resumed,) = (tmp_path / "resumed").glob("*.json")
    (whole,) = (uninterrupted / "results").glob("*.json")
    assert load_record(resumed).train.loss_per_step == load_record(whole).train.loss_per_step
    a = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "stopped" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_signal_handlers_are_installed_only_inside_and_restored():
    def mine(signum, frame):
        return None

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with StopOnSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) != mine
            os.kill(os.getpid(), signal.SIGTERM)  # the flag only: nothing is raised here
            assert stop.requested() == "SIGTERM"
            with pytest.raises(Interrupted) as e:
                stop.check()
            assert e.value.exit_code == 143
            # A second signal does not wait for the step. SIGTERM again: a shell that starts jobs in the background
            # (CI's can) hands them SIGINT ignored, and an ignored signal stays ignored by design.
            with pytest.raises(Interrupted):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)  # the handler raises at Python's next signal check, at the latest after this
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


# ---- out of memory: a real allocation failure -------------------------------------------------------

# Imports first (they map gigabytes of libraries), then an address-space limit of what is mapped plus
# 1.5 GiB: enough to load the tiny model and score two questions, far too little for a fine-tune step that
# packs 128 questions into one 32k-token row with the loss on every token.
OOM_SCRIPT = textwrap.dedent("""
    import resource, sys
    import bitsandbytes, peft, torch, transformers
    import medqa_core.run
    from medqa_core.cli import main

    mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    limit = mapped + int(1.5 * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/status are Linux's")
def test_a_real_cpu_allocation_failure_is_a_result_with_exit_3(tiny_model_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}  # few threads, few malloc arenas
    cmd = [sys.executable, "-c", OOM_SCRIPT, "run", "--backend", "cpu", "--model", str(tiny_model_dir),
           "--eval-limit", "2", "--train-limit", "128", "--batch-size", "128", "--pack-len", "32768",
           "--loss-on", "all", "--max-steps", "1", "--results", str(tmp_path / "results"),
           "--adapter-out", str(tmp_path / "adapter")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 3, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    (line,) = _error_lines(done.stderr)
    assert line.startswith("medqa-parity: error: out of memory during fine-tune (")
    (path,) = (tmp_path / "results").glob("*.json")
    record = load_record(path)
    assert record.failure["kind"] == "oom" and record.failure["phase"] == "fine-tune"
    assert is_oom(RuntimeError(record.failure["message"])) or record.failure["message"] == "MemoryError"
    # Host memory at the time, as a bench case's OOM carries it; at least the model and libraries were resident.
    assert record.failure["host_rss_gib"] > 0
    assert record.eval_before is not None and record.eval_before.n_questions == 2  # what finished is kept
    assert record.train is None and record.eval_after is None


@pytest.mark.parametrize("exc", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("HIP out of memory. Tried to allocate 1.00 GiB. GPU 0 has a total capacity of 191.98 GiB"),
    RuntimeError("HIP error: hipErrorOutOfMemory"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 2039936000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
    MemoryError("Unable to allocate 7.45 GiB for an array with shape (1000000000,) and data type float64"),
])
def test_is_oom_knows_every_backend(exc):
    assert is_oom(exc)


def test_is_oom_is_not_fooled_by_the_words_elsewhere():
    assert not is_oom(ValueError("out of memory"))  # not an allocator's error type
    assert not is_oom(RuntimeError("could not create a primitive"))
    assert not is_oom(KeyboardInterrupt())


# ---- damaged model folders and over-long questions ---------------------------------------------------


def _break_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").write_text("{}")  # JSON, but no tokenizer in it


MODEL_DAMAGES = [
    ("model.safetensors", truncate, "bytes, its header needs"),
    ("model.safetensors", flip_last_byte, None),  # data, not structure: loads; the file is not for us to judge
    ("config.json", break_json, "not valid JSON"),
    ("tokenizer.json", break_json, "not valid JSON"),
    ("tokenizer.json", lambda p: _break_tokenizer(p.parent), "the tokenizer does not load (tokenizer.json"),
]


@pytest.mark.parametrize(("name", "damage", "expected"), MODEL_DAMAGES,
                         ids=["truncated-weights", "changed-weight-byte", "broken-config", "broken-tokenizer-json",
                              "tokenizer-that-will-not-load"])
def test_a_damaged_model_folder_is_one_line_naming_the_file(tiny_model_dir, tmp_path, capsys, name, damage,
                                                            expected):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model / name)
    code = main(["evaluate", "--backend", "cpu", "--model", str(model), "--eval-limit", "2",
                 "--results", str(tmp_path / "results")])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0
        return
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith("medqa-parity: error: ") and expected in line
    named = str(model / name) if name != "tokenizer.json" or "not valid JSON" in expected else str(model)
    assert named in line
    assert not (tmp_path / "results").exists()


def test_the_character_bound_holds_for_the_mistral_tokenizer(tiny_session):
    tok = tiny_session.tokenizer
    special = set(tok.all_special_tokens)
    pieces = [p for p in tok.get_vocab() if p not in special and not (p.startswith("<0x") and p.endswith(">"))]
    assert max(len(p) for p in pieces) == MAX_TOKEN_CHARS  # "▁representations": 16 characters


class CountingTokenizer:
    """The real tokenizer, counting the texts it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        self.texts += len(text) if isinstance(text, list) else 1
        return self.tokenizer(text, *args, **kwargs)


@pytest.mark.parametrize("encode", [
    lambda tok, items: encode_scoring(tok, items, max_len=2048),
    lambda tok, items: encode_train(tok, items[1], max_len=1024),
], ids=["scoring", "training"])
def test_a_10_mb_question_is_refused_from_its_length_before_tokenizing(tiny_session, tmp_path, encode):
    huge = {**QUESTION, "question": "fever " * (10_000_000 // 6)}
    items = load_medqa(write_jsonl(tmp_path / "test.jsonl", [QUESTION, huge]))
    tok = CountingTokenizer(tiny_session.tokenizer)
    with pytest.raises(MedQADataError) as e:
        encode(tok, items)
    assert str(e.value).startswith("test.jsonl:2: question and options are 10,000,") and "cannot fit" in str(e.value)
    assert tok.texts == 0


def test_a_10_mb_question_is_refused_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "medqa"
    data.mkdir()
    write_jsonl(data / "dev.jsonl", [QUESTION])
    write_jsonl(data / "test.jsonl", [QUESTION, {**QUESTION, "question": "x" * 10_000_000}])
    # No such model: had the model been loaded first, this would be the error.
    code = main(["evaluate", "--backend", "cpu", "--model", str(tmp_path / "no-model"), "--data", str(data),
                 "--results", str(tmp_path / "results")])
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2
    assert line.startswith("medqa-parity: error: test.jsonl:2: question and options are 10,000,080 characters")
    assert "cannot fit in --eval-max-seq-len 2048 tokens" in line


def test_no_user_error_handling_imports_a_module(monkeypatch):
    # The except clause of main() runs while memory may be exhausted: it looks classes up, it imports nothing.
    import medqa_core.cli as cli

    monkeypatch.delitem(sys.modules, "medqa_core.gate", raising=False)
    monkeypatch.delitem(sys.modules, "medqa_core.summary", raising=False)
    names = {cls.__name__ for cls in cli._user_errors()}
    assert "CheckpointError" in names and "GateError" not in names and "ReportError" not in names
    assert "medqa_core.gate" not in sys.modules and "medqa_core.summary" not in sys.modules


# ---- folders that ask to run code, pickle that will not load, whole messages (issue 27) --------------------


def _evaluate(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["evaluate", "--backend", "cpu", "--model", str(model), "--eval-limit", "2",
            "--results", str(tmp_path / "results"), *extra]


def test_a_folder_with_auto_map_is_refused_unless_remote_code_is_allowed(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XModel"}
    (model / "config.json").write_text(json.dumps(config))
    assert main(_evaluate(model, tmp_path)) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: {model}: auto_map asks to run the folder's own code "
                           "(config.json: AutoModelForCausalLM -> modeling_x.XModel)")
    assert "--trust-remote-code" in line and "Traceback" not in err
    assert not (tmp_path / "results").exists()
    # Allowed: the folder's own class loads, and the record says so.
    (model / "modeling_x.py").write_text(textwrap.dedent("""
        from transformers import MistralForCausalLM


        class XModel(MistralForCausalLM):
            pass
    """))
    assert main(_evaluate(model, tmp_path, "--trust-remote-code")) == 0
    (path,) = (tmp_path / "results").glob("*.json")
    assert ("--trust-remote-code: the model folder's own code ran (config.json: AutoModelForCausalLM -> "
            "modeling_x.XModel)") in load_record(path).notes


def test_pickle_weights_that_torch_refuses_are_one_line_and_never_run(tiny_model_dir, tmp_path, capsys):
    model, marker = tmp_path / "model", tmp_path / "pwned"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").unlink()

    class Payload:  # what a malicious checkpoint holds: a call made while unpickling
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    import pickle

    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    assert main(_evaluate(model, tmp_path, "--allow-pickle")) == 2
    err = capsys.readouterr().err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: {model}: cannot load the pickle weights (pytorch_model.bin): "
                           "torch's safe loader refused them (")
    assert line.endswith("they may hold code or be damaged. Convert a trusted copy to safetensors")
    assert "Traceback" not in err and not marker.exists()


def test_a_missing_tokenizer_is_a_whole_message(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for path in model.glob("tokenizer*"):
        path.unlink()
    (model / "special_tokens_map.json").unlink(missing_ok=True)
    assert main(_evaluate(model, tmp_path)) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line == (f"medqa-parity: error: {model}: no tokenizer (no tokenizer.json, tokenizer.model or "
                    "tokenizer_config.json); copy the model's tokenizer files into the folder")


def test_a_tokenizer_error_of_several_lines_is_kept_whole(tiny_model_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    for path in model.glob("tokenizer*"):
        path.unlink()
    (model / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast"}))
    assert main(_evaluate(model, tmp_path)) == 2
    (line,) = _error_lines(capsys.readouterr().err)
    assert line.startswith(f"medqa-parity: error: {model}: the tokenizer does not load (tokenizer_config.json): ")
    assert not line.rstrip().endswith(":"), line  # transformers' list of what it tried is not cut off


def test_a_malformed_line_past_the_train_limit_stops_the_run(tmp_path, capsys):
    data = tmp_path / "medqa"
    data.mkdir()
    write_jsonl(data / "dev.jsonl", [QUESTION] * 3 + ['{"question": "broken"'])
    write_jsonl(data / "test.jsonl", [QUESTION])
    code = main(["train", "--backend", "cpu", "--model", str(tmp_path / "no-model"), "--data", str(data),
                 "--train-limit", "2", "--results", str(tmp_path / "results")])
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and line.startswith(f"medqa-parity: error: {data / 'dev.jsonl'}:4: broken JSON")
    assert len(load_medqa(write_jsonl(tmp_path / "ok.jsonl", [QUESTION] * 3), limit=2)) == 2


@pytest.mark.parametrize(("part", "field"), [("train", "throughput"), ("eval_after", "accuracy")])
def test_a_record_missing_a_field_names_it(tmp_path, part, field):
    from test_record import make_record

    from medqa_core.results.record import RecordError

    path = save_record(make_record(), tmp_path)
    d = json.loads(path.read_text())
    assert d[part] is not None
    del d[part][field]
    path.write_text(json.dumps(d))
    with pytest.raises(RecordError) as e:
        load_record(path)
    assert str(e.value) == f"{path}: missing {part}.{field}"
