"""Data-parallel QLoRA on CPU: 2 processes through torchrun with gloo, against one process."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from conftest import STEPS, assert_same_curve, run_cli, train_argv
from hypothesis import given
from hypothesis import strategies as st

from medqa_core.engine.compiling import compile_unavailable
from medqa_core.engine.distributed import DDP_BUCKET_CAP_MB, balance_tokens
from medqa_core.results.record import RunRecord

pytestmark = pytest.mark.slow  # real multi-process or full-bench runs: the full suite only


def expected_rank_tokens(model_dir: Path, world_size: int) -> tuple[tuple[int, ...], ...]:
    """Each step's real tokens per rank under balance_tokens, from the data as the loop draws it."""
    from medqa_core.engine.config import DataConfig, TrainConfig
    from medqa_core.engine.data import encode_train, iter_batches, load_splits
    from medqa_core.engine.model import load_tokenizer

    cfg = TrainConfig()
    tok = load_tokenizer(model_dir)
    examples = [encode_train(tok, item, cfg.max_seq_len, cfg.loss_on)
                for item in load_splits(DataConfig(train_limit=16)).train]
    batches = iter_batches(examples, 8, cfg.seed)
    steps = [next(batches)[1] for _ in range(STEPS)]
    return tuple(tuple(sum(batch[i].n_tokens for i in part)
                       for part in balance_tokens([e.n_tokens for e in batch], world_size)) for batch in steps)


def test_two_gloo_ranks_match_one_process(tiny_model_dir, one_process, two_ddp_ranks):
    ckpt = Path(two_ddp_ranks.adapter_dir).parent / "ckpt"
    assert len(list(ckpt.glob("step-*"))) == 1  # only rank 0 writes the checkpoint (and the record)
    a, b = one_process.train, two_ddp_ranks.train
    assert b.world_size == 2 and a.world_size == 1
    assert b.tokens == a.tokens  # the same global batches, split over two ranks
    assert b.all_reduce_s is not None and b.all_reduce_s > 0
    assert_same_curve(a.loss_per_step, b.loss_per_step)
    # Per-rank figures: one row per step, one entry per rank, adding up to the step's tokens.
    assert a.rank_step_time_s is a.rank_step_tokens is a.step_imbalance is a.parallel is None
    assert len(b.rank_step_time_s) == len(b.rank_step_tokens) == STEPS
    assert all(len(t) == 2 and min(t) > 0 for t in b.rank_step_time_s)
    assert sum(map(sum, b.rank_step_tokens)) == b.tokens
    assert tuple(b.rank_step_tokens) == expected_rank_tokens(tiny_model_dir, world_size=2)  # the split, as recorded
    imbalance = b.step_imbalance
    assert imbalance.steps == b.timed_steps and imbalance.time_max_over_mean >= 1.0
    longest_share = max(max(n) / (sum(n) / 2) for n in b.rank_step_tokens)
    assert 1.0 <= imbalance.tokens_max_over_mean <= longest_share
    assert b.parallel["strategy"] == "ddp" and b.parallel["bucket_cap_mb"] == DDP_BUCKET_CAP_MB
    assert b.parallel["gradient_as_bucket_view"] is True and b.parallel["bucket_mib"]


@pytest.fixture(scope="module")
def two_steps_c10d(tiny_model_dir, tmp_path_factory) -> RunRecord:
    """2 steps on 2 ranks through the multi-node launch (--nnodes, c10d rendezvous at an endpoint) with one node of
    two processes, writing its checkpoint into its folder's ckpt/: the launch test's job, and the first part of
    the resume test's."""
    with socket.socket() as s:  # a free port for the rendezvous store
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    launcher = ("--nnodes=1", "--node-rank=0", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}",
                "--rdzv-id=medqa-test")
    out = tmp_path_factory.mktemp("two-steps-c10d")
    return run_cli(train_argv(tiny_model_dir, out, "--checkpoint-dir", str(out / "ckpt"), steps=2), nproc=2,
                   launcher=launcher)


def test_two_ranks_resume_from_a_checkpoint_and_repeat_the_curve(tiny_model_dir, tmp_path, two_ddp_ranks,
                                                                  two_steps_c10d):
    ckpt = Path(two_steps_c10d.adapter_dir).parent / "ckpt"
    first = two_steps_c10d.train
    rest = run_cli(train_argv(tiny_model_dir, tmp_path / "rest", "--resume", str(ckpt)), nproc=2).train
    whole = two_ddp_ranks.train
    assert rest.steps == STEPS and rest.loss_per_step[:2] == first.loss_per_step
    assert rest.loss_per_step == whole.loss_per_step  # the uninterrupted 2-rank run's curve, to the bit
    assert rest.tokens == whole.tokens  # the resumed run skipped exactly the batches trained before
    # The checkpoint carried the per-rank figures of the steps before it.
    assert rest.rank_step_tokens[:2] == first.rank_step_tokens and len(rest.rank_step_time_s) == STEPS


def test_c10d_rendezvous_as_across_nodes_on_one_machine(one_process, two_steps_c10d):
    """The multi-node launch (--nnodes, c10d rendezvous at an endpoint), with one node of two processes."""
    two = two_steps_c10d.train
    assert two.world_size == 2
    assert_same_curve(one_process.train.loss_per_step[:2], two.loss_per_step)


@pytest.mark.slow
# DDP only in the suite: FSDP2 with compiled layers ran once on CPU (docs/several-gpus.md), and a 2-rank compile
# on 2 cores costs close to a minute; FSDP2's own curve is checked eagerly in test_sharded.py.
@pytest.mark.parametrize("shard", [("--shard", "ddp")], ids=["ddp"])
def test_compiled_layers_under_two_ranks_train_as_eager(tiny_model_dir, tmp_path, one_process, shard):
    two = run_cli(train_argv(tiny_model_dir, tmp_path, "--compile", "on", *shard), nproc=2).train
    assert all(torch.isfinite(torch.tensor(two.loss_per_step)))
    assert_same_curve(one_process.train.loss_per_step, two.loss_per_step)
    why_not = compile_unavailable(torch.device("cpu"))
    if why_not is None:  # Inductor runs here: every graph compiled before step 1, none while training
        assert two.compile.ran and two.compile.graphs > 0 and two.compile.recompiles == 0
    else:
        assert not two.compile.ran and two.compile.detail == f"eager: {why_not}"


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
