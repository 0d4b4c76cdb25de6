"""bench/profile_nf4_kernel.py's command line: a layer name it does not know is refused in one line, exit 2, before
anything runs (on a GPU machine too: the check comes first)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_an_unknown_layer_is_named_with_the_choices(tmp_path):
    done = subprocess.run([sys.executable, "bench/profile_nf4_kernel.py", "--out", str(tmp_path / "x.json"), "--once",
                           "--layers", "gate_proj/up_proj,gate"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert ("--layers: unknown gate; choose among q_proj/o_proj, k_proj/v_proj, gate_proj/up_proj, down_proj"
            in done.stderr)
    assert not (tmp_path / "x.json").exists()
