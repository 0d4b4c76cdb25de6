"""Data-parallel QLoRA on CPU: 2 processes through torchrun with gloo, against one process."""

from __future__ import annotations

import subprocess
import sys

from hypothesis import given
from hypothesis import strategies as st

from medqa_core.distributed import balance_tokens
from medqa_core.record import load_record


def _train(tiny_model_dir, out, nproc):
    argv = ["train", "--backend", "cpu", "--model", str(tiny_model_dir), "--train-limit", "16", "--batch-size", "8",
            "--max-steps", "4", "--lora-dropout", "0", "--results", str(out / "results"),
            "--adapter-out", str(out / "adapter"), "--checkpoint-dir", str(out / "ckpt")]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "medqa_core.cli", *argv]
    else:
        cmd = [sys.executable, "-m", "medqa_core.cli", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={
        **__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_gloo_ranks_match_one_process(tiny_model_dir, tmp_path):
    _train(tiny_model_dir, tmp_path / "one", 1)
    _train(tiny_model_dir, tmp_path / "two", 2)
    (one,) = (tmp_path / "one" / "results").glob("*.json")
    records = list((tmp_path / "two" / "results").glob("*.json"))
    assert len(records) == 1  # only rank 0 writes the record...
    assert len(list((tmp_path / "two" / "ckpt").glob("step-*"))) == 1  # ...and the checkpoint
    a, b = load_record(one).train, load_record(records[0]).train
    assert b.world_size == 2 and a.world_size == 1
    assert b.tokens == a.tokens  # the same global batches, split over two ranks
    assert b.all_reduce_s is not None and b.all_reduce_s > 0
    # Same global batch and loss; each rank packs and runs its half in bf16, so the curves agree to
    # bf16 rounding of the sums, not bit for bit.
    for x, y in zip(a.loss_per_step, b.loss_per_step, strict=True):
        assert abs(x - y) < 2e-3 * abs(x)


# ---- token-balanced split -----------------------------------------------------------------------------


@given(st.lists(st.integers(1, 4096), max_size=64), st.integers(1, 8))
def test_balance_tokens_is_a_deterministic_partition_within_one_example_of_the_mean(lengths, world_size):
    parts = balance_tokens(lengths, world_size)
    assert len(parts) == world_size
    assert sorted(i for part in parts for i in part) == list(range(len(lengths)))
    assert all(part == sorted(part) for part in parts)  # batch order kept inside a share
    assert balance_tokens(list(lengths), world_size) == parts
    if lengths:
        loads = [sum(lengths[i] for i in part) for part in parts]
        assert max(loads) - sum(loads) / world_size <= max(lengths)
    if len(lengths) >= world_size:
        assert all(parts)  # every rank has an example to train on


def test_balance_tokens_beats_round_robin_on_a_sorted_batch():
    lengths = [900, 800, 300, 200]  # round robin: ranks of 1200 and 1000 tokens
    assert [sum(lengths[i] for i in part) for part in balance_tokens(lengths, 2)] == [1100, 1100]
    assert balance_tokens(lengths, 2) == [[0, 3], [1, 2]]
