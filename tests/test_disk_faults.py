"""Disk and permission faults (issue 27): output folders checked before the work, real full disks during it.

Every fault is real: a path that is a file, a read-only mount, a filesystem of a few KiB (tmpfs), or one that
is filled up by the test while the job runs, at a moment chosen through the job's own progress callback. No
write is replaced by a mock. Mounting needs root (or CAP_SYS_ADMIN): without it those tests skip, saying so.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medqa_core.cli import WRITE_FAILED, main
from medqa_core.engine.checkpoint import check_resume, list_checkpoints
from medqa_core.engine.config import DataConfig, RunConfig
from medqa_core.results.record import load_record
from medqa_core.results.storage import OutputFolderError, WriteError
from medqa_core.run import OutputWriteError, checkpoint_config, execute

ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def _mount(path: Path, size: str, *options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join((f"size={size}", *options)), "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}); needs root")


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``small_fs(name, size, ro=False)``: a real tmpfs of ``size`` mounted at ``tmp_path/name``."""
    mounted: list[Path] = []

    def make(name: str, size: str, ro: bool = False) -> Path:
        path = tmp_path / name
        _mount(path, size, *(("ro",) if ro else ()))
        mounted.append(path)
        return path

    yield make
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder`` until its filesystem says it is full (ENOSPC); returns the filler file."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush on close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("medqa-parity:")]


def _train(model_dir: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["train", "--backend", "cpu", "--model", str(model_dir), "--train-limit", "8", "--batch-size", "4",
            "--max-steps", "2", *extra]


def _outputs(tmp_path: Path, **at: Path) -> list[str]:
    """--results, --adapter-out and --checkpoint-dir under tmp_path, or where ``at`` says."""
    paths = {"results": tmp_path / "results", "adapter-out": tmp_path / "adapter",
             "checkpoint-dir": tmp_path / "ckpt", **at}
    return [arg for option, path in paths.items() for arg in (f"--{option}", str(path))]


# ---- before the model loads: a file in the way, a read-only or full filesystem ----------------------------

OPTIONS = ["results", "adapter-out", "checkpoint-dir"]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("where", ["the-path", "a-parent"])
def test_an_output_path_that_is_a_file_is_one_line_before_the_model_loads(tmp_path, capsys, option, where):
    (tmp_path / "afile").write_text("not a folder")
    path = tmp_path / "afile" if where == "the-path" else tmp_path / "afile" / "sub"
    # No such model: had it been loaded first, that would be the error.
    code = main(_train(tmp_path / "no-model", tmp_path, *_outputs(tmp_path, **{option: path})))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: {path}: ")
    assert f"{tmp_path / 'afile'} is a file" in line or "is a file, not a folder" in line
    assert f"give --{option} a folder" in line
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("option", OPTIONS)
def test_a_read_only_folder_is_one_line_before_the_model_loads(tmp_path, capsys, small_fs, option):
    ro = small_fs("ro", "1m", ro=True)  # root ignores file modes; a read-only mount stops it too
    code = main(_train(tmp_path / "no-model", tmp_path, *_outputs(tmp_path, **{option: ro})))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: {ro}: cannot write in the folder (Read-only file system; ")
    assert f"give --{option} a folder you can write" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes (the read-only mount test covers root)")
def test_a_folder_without_write_permission_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code = main(_train(tmp_path / "no-model", tmp_path, *_outputs(tmp_path, results=locked)))
    (line,) = _error_lines(capsys.readouterr().err)
    assert code == 2 and "Permission denied" in line and str(locked) in line


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("full", [False, True], ids=["64-KiB-free", "0-B-free"])
def test_a_disk_without_room_for_the_outputs_is_refused_before_training(tiny_model_dir, tmp_path, capsys, small_fs,
                                                                         option, full):
    small = small_fs("small", "64k")  # the tiny model's record (~130 KiB), adapter (~190 KiB) and checkpoint
    if full:  # (~450 KiB) each need more; full, not even the probe's byte is written
        fill(small)
    out = small / "out"
    code = main(_train(tiny_model_dir, tmp_path, *_outputs(tmp_path, **{option: out})))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = _error_lines(err)
    if full:  # found before the model loads
        assert line == (f"medqa-parity: error: {out}: cannot write in the folder (No space left on device; 0 B "
                        f"free); give --{option} a folder you can write, or free space there")
    else:  # found once the model's size is known, before any step
        assert re.match(rf"medqa-parity: error: --{option} {out}: \d+\.\d KiB free, the job's outputs need about "
                        r"\d+\.\d KiB", line), line
        assert line.endswith(f"; free space there or give --{option} another disk")
    assert not list((tmp_path / "results").glob("*.json"))


# ---- during the job: the disk fills up (really) at a chosen moment --------------------------------------------


def _fill_when(folder: Path, phase: str, step: int) -> Callable[[str, int, int, dict[str, float]], None]:
    """A progress callback that fills ``folder``'s filesystem once ``phase`` reports ``step`` done."""

    def progress(name: str, done: int, total: int, extra: dict[str, float]) -> None:
        if name == phase and done == (step if step > 0 else total) and not (folder / "filler").exists():
            fill(folder)

    return progress


@pytest.fixture
def rescue(tmp_path, monkeypatch) -> Path:
    """The system temp folder, where outputs go when theirs are full, moved under tmp_path for the test."""
    folder = tmp_path / "system-tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder / "medqa-parity-rescue"


def _cfg(tiny_config: RunConfig, results: Path) -> RunConfig:
    return dataclasses.replace(tiny_config, results_dir=str(results),
                               data=DataConfig(train_limit=16, eval_limit=4),
                               train=dataclasses.replace(tiny_config.train, checkpoint_every=1))


def test_a_full_disk_for_the_adapter_keeps_the_fine_tune_elsewhere(tiny_config, tmp_path, small_fs, rescue):
    full = small_fs("full", "2m")
    with pytest.raises(OutputWriteError) as e:
        execute(_cfg(tiny_config, tmp_path / "results"), kind="run", adapter_out=str(full / "adapter"),
                progress=_fill_when(full, "fine-tune", 0))
    (problem,) = e.value.problems
    assert problem.startswith(f"cannot write the adapter to {full / 'adapter'} (No space left on device; ")
    assert "B free there); saved in " in problem
    # No half adapter (peft's README.md alone, as before), no temporary folder, and the folder the job created
    # for it, left empty, is removed.
    assert sorted(p.name for p in full.iterdir()) == ["filler"]
    (saved,) = rescue.iterdir()
    assert sorted(p.name for p in saved.iterdir()) == ADAPTER_FILES
    record = load_record(e.value.saved_path)
    assert e.value.saved_path.parent == tmp_path / "results"
    assert record.adapter_dir == str(saved) and record.eval_after is not None and record.failure is None
    assert any(problem in note for note in record.notes)
    assert load_file(saved / "adapter_model.safetensors").keys()


def test_a_full_disk_for_the_adapter_and_the_record_saves_both_in_the_rescue_folder(tiny_config, tmp_path, small_fs,
                                                                                   rescue):
    full = small_fs("full", "2m")
    with pytest.raises(OutputWriteError) as e:
        execute(_cfg(tiny_config, full / "results"), kind="train", adapter_out=str(full / "adapter"),
                progress=_fill_when(full, "fine-tune", 0))
    adapter, record = e.value.problems
    assert adapter.startswith(f"cannot write the adapter to {full / 'adapter'} (No space left on device")
    assert record.startswith(f"cannot write the record to {full / 'results'}/")
    assert e.value.saved_path is not None and e.value.saved_path.parent == rescue
    saved = load_record(e.value.saved_path)
    assert saved.train is not None and len(saved.train.loss_per_step) == 4
    assert Path(saved.adapter_dir).parent == rescue
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporary file, no empty folder left


def test_nowhere_to_save_the_record_still_hands_it_back(tiny_config, tmp_path, small_fs, monkeypatch):
    full, ro = small_fs("full", "2m"), small_fs("ro", "1m", ro=True)
    monkeypatch.setattr(tempfile, "tempdir", str(ro))  # the rescue folder cannot be written either
    with pytest.raises(OutputWriteError) as e:
        execute(_cfg(tiny_config, full / "results"), kind="train", adapter_out=str(tmp_path / "adapter"),
                progress=_fill_when(full, "fine-tune", 0))
    (problem,) = e.value.problems
    assert "not saved elsewhere either" in problem and "Read-only file system" in problem
    assert e.value.saved_path is None and e.value.record.train is not None  # the figures are in hand
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ADAPTER_FILES


def test_a_disk_that_fills_mid_training_stops_with_the_checkpoints_before_it(tiny_config, tmp_path, small_fs):
    ckpt = small_fs("ckpt", "2m")
    cfg = _cfg(tiny_config, tmp_path / "results")
    record, path = execute(cfg, kind="train", adapter_out=str(tmp_path / "adapter"), checkpoint_dir=str(ckpt),
                           progress=_fill_when(ckpt, "fine-tune", 2))
    failure = record.failure
    assert failure["kind"] == "write" and failure["step"] == 2 and failure["steps"] == 4
    assert failure["path"] == str(ckpt / "step-000002") and failure["message"] == "No space left on device"
    assert failure["checkpoint"] == str(ckpt / "step-000001") and failure["adapter"] is None
    assert record.train is None and load_record(path).failure == failure
    assert [p.name for p in list_checkpoints(ckpt)] == ["step-000001"]
    assert not list(ckpt.glob(".step-*")), "the half-written checkpoint is removed"
    assert not (tmp_path / "adapter").exists() or not list((tmp_path / "adapter").iterdir())
    # Space freed: --resume continues from step 1 and finishes.
    (ckpt / "filler").unlink()
    assert check_resume(ckpt, checkpoint_config(cfg)) == ckpt / "step-000001"
    record, _ = execute(cfg, kind="train", adapter_out=str(tmp_path / "adapter"), resume=str(ckpt))
    assert record.failure is None and len(record.train.loss_per_step) == 4


def test_a_full_disk_at_the_last_checkpoint_keeps_the_finished_adapter(tiny_config, tmp_path, small_fs):
    ckpt = small_fs("ckpt", "2m")
    record, _ = execute(_cfg(tiny_config, tmp_path / "results"), kind="train", adapter_out=str(tmp_path / "adapter"),
                        checkpoint_dir=str(ckpt), progress=_fill_when(ckpt, "fine-tune", 0))
    assert record.failure["step"] == record.failure["steps"] == 4
    assert record.failure["adapter"] == str(tmp_path / "adapter") == record.adapter_dir
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ADAPTER_FILES


def test_the_cli_says_one_line_and_exits_5_when_a_checkpoint_cannot_be_written(tiny_model_dir, tmp_path, capsys,
                                                                               small_fs):
    ckpt = small_fs("ckpt", "2m")

    def fill_after_the_first_checkpoint() -> None:  # another program filling the disk while the job runs
        while not list_checkpoints(ckpt) and not stop.is_set():
            stop.wait(0.002)
        if not stop.is_set():
            fill(ckpt)

    stop = threading.Event()
    filler = threading.Thread(target=fill_after_the_first_checkpoint)
    filler.start()
    try:
        code = main(["train", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "64",
                     "--batch-size", "1", "--max-steps", "60", "--checkpoint-every", "1",
                     *_outputs(tmp_path, **{"checkpoint-dir": ckpt})])
    finally:
        stop.set()
        filler.join()
    err = capsys.readouterr().err
    assert code == WRITE_FAILED and "Traceback" not in err
    (line,) = _error_lines(err)
    assert line.startswith(f"medqa-parity: error: cannot write checkpoint {ckpt}/step-0000")
    assert "(No space left on device; " in line and "B free there) after step " in line
    assert f"then continue with --resume {ckpt} (newest checkpoint step-0000" in line
    (record,) = (tmp_path / "results").glob("*.json")
    assert load_record(record).failure["kind"] == "write" and str(record) in line


def test_write_errors_name_the_path_and_the_free_space(tmp_path, small_fs):
    from medqa_core.engine.model import save_adapter

    full = small_fs("full", "64k")
    fill(full)
    layer = torch.nn.Linear(64, 64)

    class Saver:  # the peft call save_adapter makes, writing real safetensors
        def save_pretrained(self, folder: Path, state_dict: dict | None = None) -> None:
            from safetensors.torch import save_file

            (Path(folder) / "README.md").write_text("card")
            save_file({"w": layer.weight.detach()}, Path(folder) / "adapter_model.safetensors")

    with pytest.raises(WriteError) as e:
        save_adapter(Saver(), full / "adapter")
    assert str(e.value).startswith(f"cannot write {full / 'adapter'}: No space left on device (")
    assert e.value.free_bytes is not None and e.value.free_bytes < 8192
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


def test_probe_refuses_a_file_in_the_way_without_touching_it(tmp_path):
    from medqa_core.results.storage import probe_dir

    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(OutputFolderError, match="is a file, not a folder; give --results a folder"):
        probe_dir(tmp_path / "f", "--results")
    assert probe_dir(tmp_path / "new" / "deep", "--results").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the probe file is gone
