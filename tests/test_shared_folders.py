"""Jobs sharing folders (issue 27): a locked checkpoint folder, stale-temp cleanup that spares live writers,
adapter names that never collide. Each test starts real processes; none mocks a lock, a pid or a clock.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medqa_core.cli import main
from medqa_core.engine.checkpoint import LOCK_FILE, list_checkpoints, lock_checkpoints, remove_stale_temps
from medqa_core.results.record import load_record

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--backend", "cpu", "--model", str(model_dir), "--train-limit", "32", "--batch-size", "1",
            "--results", str(out / "results"), *extra]


def _holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


@pytest.mark.slow
def test_a_second_job_on_a_busy_checkpoint_folder_stops_naming_the_holder(tiny_model_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    first = subprocess.Popen([sys.executable, "-m", "medqa_core.cli",
                              *_train(tiny_model_dir, tmp_path / "a", "--max-steps", "100000", "--checkpoint-every",
                                      "1", "--checkpoint-dir", str(ckpt))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 300  # a hang guard, not a speed limit
        while not list_checkpoints(ckpt) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, first.stderr.read()[-3000:]
        assert _holder(ckpt / LOCK_FILE)["pid"] == first.pid
        # Another learning rate, the same folder: refused at once, before the model loads, naming the holder.
        code = main(_train(tiny_model_dir, tmp_path / "b", "--max-steps", "2", "--lr", "0.001",
                           "--checkpoint-dir", str(ckpt)))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err
        (line,) = [x for x in err.splitlines() if x.startswith("medqa-parity:")]
        assert line.startswith(f"medqa-parity: error: {ckpt}: in use by another job, pid {first.pid} on "
                               f"{socket.gethostname()} since ")
        assert "medqa-parity train --backend cpu" in line and "train.lr: there 0.0002, here 0.001" in line
        assert line.endswith("; wait for it to finish, or give this job another --checkpoint-dir")
        assert not (tmp_path / "b" / "results").exists() or not list((tmp_path / "b" / "results").iterdir())
        # kill -9: the kernel drops the lock; the next job takes the folder and clears the dead job's temp folder.
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    dead_temp = ckpt / f".step-099999-{socket.gethostname()}-{first.pid}-0badc0de"
    dead_temp.mkdir()
    newest = int(list_checkpoints(ckpt)[-1].name.removeprefix("step-"))
    assert main(_train(tiny_model_dir, tmp_path / "c", "--max-steps", str(newest + 1), "--checkpoint-every", "1",
                       "--resume", str(ckpt))) == 0
    assert list_checkpoints(ckpt)[-1].name == f"step-{newest + 1:06d}"
    assert not dead_temp.exists()


def test_stale_temp_cleanup_spares_a_live_writer_and_other_hosts(tmp_path):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    try:
        folders = {name: tmp_path / name for name in (
            f".step-000004-{host}-{live.pid}-1a2b3c4d",  # a job writing now: kept
            f".step-000004-{host}-{dead.pid}-1a2b3c4d",  # its writer is gone: removed
            ".step-000004-other-host-7-1a2b3c4d",  # another host's job: cannot be checked from here, kept
            ".step-000004-deadbeef",  # named before writers were: removed
        )}
        for folder in folders.values():
            folder.mkdir()
        removed = remove_stale_temps(tmp_path)
    finally:
        live.kill()
        live.wait()
    assert sorted(p.name for p in removed) == sorted([f".step-000004-{host}-{dead.pid}-1a2b3c4d",
                                                      ".step-000004-deadbeef"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f".step-000004-{host}-{live.pid}-1a2b3c4d",
                                                                 ".step-000004-other-host-7-1a2b3c4d"])


def test_the_lock_refuses_another_process_and_is_released_when_the_holder_dies(tmp_path):
    code = ("import sys, time; from pathlib import Path; from medqa_core.engine.checkpoint import lock_checkpoints; "
            "lock = lock_checkpoints(Path(sys.argv[1]), {'train': {'lr': 0.001}}, 'holder'); print('held', flush=True);"
            " time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        from medqa_core.engine.checkpoint import CheckpointError

        with pytest.raises(CheckpointError) as e:
            lock_checkpoints(tmp_path, {"train": {"lr": 0.0002}})
        assert f"pid {holder.pid} on " in str(e.value) and "(holder)" in str(e.value)
        assert "train.lr: there 0.001, here 0.0002" in str(e.value)
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    with lock_checkpoints(tmp_path, {"train": {"lr": 0.0002}}, "me"):  # no stale lock after kill -9
        assert _holder(tmp_path / LOCK_FILE)["pid"] == os.getpid()


@pytest.mark.slow
def test_two_jobs_started_together_with_the_default_adapter_folder_never_share_it(tiny_model_dir, tmp_path):
    argv = ["train", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "4", "--batch-size", "2",
            "--max-steps", "2", "--results", "results"]
    jobs = [subprocess.Popen([sys.executable, "-m", "medqa_core.cli", *argv], cwd=tmp_path, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()[-3000:]
    records = [load_record(p) for p in sorted((tmp_path / "results").glob("*.json"))]
    adapters = {r.adapter_dir for r in records}
    assert len(records) == 2 and len(adapters) == 2, adapters
    assert all((tmp_path / a / "adapter_model.safetensors").is_file() for a in adapters)
    assert sorted(p.name for p in (tmp_path / "runs" / "adapters").iterdir()) == sorted(Path(a).name
                                                                                         for a in adapters)
