"""Kill a real fine-tune with SIGKILL, resume it, and get the uninterrupted run's result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import FINE_TUNE_STEPS, fine_tune_cmd, run_ok
from safetensors.torch import load_file

from medqa_core.engine.checkpoint import CheckpointError, list_checkpoints
from medqa_core.results.record import load_record


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tiny_model_dir, tmp_path, uninterrupted):
    ckpt = tmp_path / "killed" / "ckpt"
    proc = subprocess.Popen(fine_tune_cmd(tiny_model_dir, tmp_path, "killed", "--checkpoint-dir", str(ckpt)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300  # a hang guard, not a speed limit
    while not list_checkpoints(ckpt) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = json.loads((list_checkpoints(ckpt)[-1] / "state.json").read_text())["progress"]["step"]
    assert 0 < killed_at < FINE_TUNE_STEPS, "the run must die mid-way for this test to mean anything"
    assert not (tmp_path / "killed" / "results").exists()  # no record: it really died

    run_ok(fine_tune_cmd(tiny_model_dir, tmp_path, "killed", "--resume", str(ckpt)))

    (whole,) = (uninterrupted / "results").glob("*.json")
    (resumed,) = (tmp_path / "killed" / "results").glob("*.json")
    # Bit for bit on CPU: same data order, optimizer state, RNG states (LoRA dropout) and LoRA weights.
    assert load_record(resumed).train.loss_per_step == load_record(whole).train.loss_per_step
    a = load_file(uninterrupted / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list_checkpoints(ckpt)) == 2  # --keep-checkpoints default


@pytest.mark.slow
def test_resume_refuses_a_checkpoint_of_another_config(tiny_model_dir, tmp_path):
    from medqa_core.cli import main

    ckpt = tmp_path / "ckpt"
    argv = ["train", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "8", "--max-steps", "2",
            "--results", str(tmp_path / "r"), "--adapter-out", str(tmp_path / "ad")]
    assert main([*argv, "--checkpoint-dir", str(ckpt)]) == 0
    with pytest.raises(CheckpointError, match=r"train.lr: checkpoint 0.0002, now 0.001"):
        from medqa_core.engine.checkpoint import load_checkpoint

        load_checkpoint(ckpt, None, None, None, {"train": {"lr": 0.001}, "model": {}, "lora": {}, "data": {}})
    assert main([*argv, "--lr", "0.001", "--resume", str(ckpt)]) == 2
    assert main([*argv, "--resume", str(tmp_path / "empty")]) == 2


def test_listing_a_checkpoint_folder_that_is_not_there_or_not_a_folder_finds_none(tmp_path):
    # A job's write probe creates the --checkpoint-dir and removes it again: a reader polling it meanwhile (the
    # signal tests do) must see "no checkpoint", not a FileNotFoundError.
    assert list_checkpoints(tmp_path / "missing") == []
    (tmp_path / "a-file").write_text("x")
    assert list_checkpoints(tmp_path / "a-file") == []
    (tmp_path / "ckpt" / "step-000002").mkdir(parents=True)
    (tmp_path / "ckpt" / ".step-000003-host-1-ab").mkdir()
    assert list_checkpoints(tmp_path / "ckpt") == [tmp_path / "ckpt" / "step-000002"]
