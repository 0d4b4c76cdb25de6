"""The compile cache: a second identical run loads the first run's compiled artifacts and Inductor hits them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import save_tiny_mistral, train_argv

from medqa_core.engine.compiling import compile_unavailable
from medqa_core.results.record import load_record


def _train(model_dir: Path, out: Path, cache: Path, inductor_cache: Path) -> dict:
    # Each run gets its own Inductor cache folder (what a fresh machine has), and both share our cache folder:
    # a hit in the second run can only come from the artifacts the first saved there.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDQA_PARITY_CACHE": str(cache),
           "TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    # The 4-bit base runs through the base_custom_op custom op (the default), whose graphs AOTAutograd's cache
    # serves too (bitsandbytes' own 4-bit matmul makes every graph bypass it: tests/test_nf4_base_op.py).
    argv = train_argv(model_dir, out, "--compile", "on", steps=2)
    done = subprocess.run([sys.executable, "-m", "medqa_core.cli", *argv],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    (record,) = (out / "results").glob("*.json")
    return load_record(record).train.compile.to_dict()


@pytest.mark.slow
def test_a_second_identical_run_compiles_from_the_cache(tmp_path) -> None:
    import torch

    if compile_unavailable(torch.device("cpu")):
        pytest.skip(f"torch.compile cannot run here: {compile_unavailable(torch.device('cpu'))}")
    # One decoder layer: the cache stores and serves each graph alike, and the tiny model's second layer only
    # doubles them (its input needs a gradient, the first layer's does not: one more graph per shape), which on
    # 2 CPU cores costs about 25 s of compiling and checks nothing more.
    model_dir = save_tiny_mistral(tmp_path / "model", num_hidden_layers=1)
    cache = tmp_path / "cache"
    first = _train(model_dir, tmp_path / "one", cache, tmp_path / "inductor-one")
    second = _train(model_dir, tmp_path / "two", cache, tmp_path / "inductor-two")
    assert first["cache"]["state"] == "cold" and first["cache"]["saved_bytes"] > 0
    assert first["cache"]["fx_graph_misses"] > 0
    assert second["cache"]["state"] == "warm" and second["cache"]["artifacts_loaded"] > 0
    assert second["cache"]["fx_graph_hits"] > 0 and second["cache"]["fx_graph_misses"] == 0
    assert second["cache"]["file"] == first["cache"]["file"]  # the same settings: the same entry
    # AOTAutograd's cache: every graph a miss the first time, a hit the second (no retracing of joint graphs).
    assert first["cache"]["autograd_cache_misses"] == second["cache"]["autograd_cache_hits"] == second["graphs"] > 0
    assert second["cache"]["autograd_cache_bypasses"] == second["cache"]["autograd_cache_misses"] == 0
