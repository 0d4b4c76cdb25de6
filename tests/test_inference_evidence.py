"""tools/inference_evidence.sh: each step runs, a failed one is counted and the next still runs, and the
repository's tile table is never written (a sweep writes its own copy under OUT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "inference_evidence.sh"


def _run(out: Path, *steps: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # the GPU-only steps must see no GPU, as a CPU machine does
    return subprocess.run(["bash", str(SCRIPT), str(out), *steps], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_an_unknown_step_is_refused_with_exit_2(tmp_path):
    done = _run(tmp_path / "out", "tests", "sweeep")
    assert done.returncode == 2
    assert "unknown step 'sweeep'" in done.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the GPU steps run for real on a GPU")
def test_failed_steps_are_counted_and_the_next_one_still_runs(tmp_path):
    table = (ROOT / "medqa_core" / "engine" / "kernels" / "nf4_tiles.json").read_text()
    out = tmp_path / "out"
    done = _run(out, "sweep", "profile")
    assert done.returncode == 2, done.stdout + done.stderr  # two steps failed: no GPU here
    assert "== sweep: exit 2" in done.stdout and "== profile: exit 2" in done.stdout
    assert "needs a CUDA or ROCm GPU" in (out / "sweep.log").read_text()
    assert (out / "nf4_tiles.json").read_text() == table  # the run's copy, which a sweep would update
    assert (ROOT / "medqa_core" / "engine" / "kernels" / "nf4_tiles.json").read_text() == table
