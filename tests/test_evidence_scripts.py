"""tools/inference_evidence.sh and tools/training_evidence.sh: each step runs, a failed one is counted and the
next still runs, an unknown step is refused before any runs, and the repository's tile table is never written (a
sweep writes its own copy under OUT)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "inference_evidence.sh"
TRAINING = ROOT / "tools" / "training_evidence.sh"


def _run(out: Path, *steps: str, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TRITON_INTERPRET", None)  # the GPU-only steps must see no GPU, as a CPU machine does
    return subprocess.run(["bash", str(script), str(out), *steps], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize(("script", "steps"), [(SCRIPT, ("tests", "sweeep")), (TRAINING, ("cold", "sweeep"))],
                         ids=["inference", "training"])
def test_an_unknown_step_is_refused_with_exit_2(tmp_path, script, steps):
    done = _run(tmp_path / "out", *steps, script=script)
    assert done.returncode == 2
    assert "unknown step 'sweeep'" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before any step ran


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the fp8 step runs for real on a GPU")
def test_the_fp8_step_is_refused_here_in_one_line_and_counted(tmp_path):
    """On CPU max-speed+fp8 cannot train (its flex attention has no CPU backward, fp8 no tensor cores; the first
    check refuses it, tests/test_fp8.py covers fp8's own line): one line, exit 2, counted, nothing loaded."""
    out = tmp_path / "out"
    done = _run(out, "fp8", script=TRAINING)
    assert done.returncode == 1, done.stdout + done.stderr  # one step failed
    assert "== fp8: exit 2" in done.stdout
    log = (out / "fp8.log").read_text().strip().splitlines()
    assert len(log) == 1 and log[0].startswith("medqa-parity: error:")
    assert not (out / "runs").exists() or not list((out / "runs").glob("*.json"))  # before the model loaded


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


@pytest.mark.skipif(__import__("shutil").which("ncu") is not None, reason="Nsight Compute is installed here")
def test_the_nsight_step_is_skipped_where_there_is_no_ncu(tmp_path):
    done = _run(tmp_path / "out", "ncu")
    assert done.returncode == 0, done.stdout + done.stderr  # skipped, not failed: ROCm machines have no ncu
    assert "== ncu: skipped (no ncu on PATH" in done.stdout


def test_a_step_past_its_limit_is_interrupted_so_it_can_save_what_finished(tmp_path):
    # STEP_TIMEOUT sends SIGINT (pytest's Ctrl-C: pytest-benchmark then saves its finished cases), is counted as a
    # failed step (exit 124) and the next step still runs.
    out = tmp_path / "out"
    waits = (f"import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: (open({str(out / 'saved')!r}, 'w')"
             ".write('saved'), sys.exit(130))); time.sleep(60)")
    script = (f'OUT={out}; STEP_TIMEOUT=2; source tools/evidence_steps.sh; step slow {sys.executable} -c "{waits}"; '
              'step next true; exit "$failed"')
    done = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "== slow: exit 124" in done.stdout and "== next: exit 0" in done.stdout
    assert (out / "saved").read_text() == "saved"


def _recording_python3(tmp_path, variable: str = "") -> tuple[Path, Path]:
    """A folder holding a python3 that, in place of the real one, appends its arguments (after ``variable``'s value,
    where one is named) to a file, and that file (emptied)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    calls = tmp_path / "calls.txt"
    calls.unlink(missing_ok=True)
    (fake / "python3").write_text(f"#!/bin/sh\necho \"{'$' + variable + ' ' if variable else ''}$*\" >> {calls}\n")
    (fake / "python3").chmod(0o755)
    return fake, calls


def _bench_runs(tmp_path, env: dict, variable: str) -> list[tuple[str, str]]:
    """The bench step's runs, (``variable``'s value, the file name it saves), with a python3 on PATH that records
    its arguments in place of the bench."""
    fake, calls = _recording_python3(tmp_path, variable)
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "bench"], cwd=ROOT, timeout=60,
                          env={**env, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}"}, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return [(line.split()[0], next(a for a in line.split() if a.startswith("--benchmark-save="))[17:])
            for line in calls.read_text().splitlines() if "bench_infer.py" in line]


def test_pdl_ab_runs_our_arm_with_pdl_off_first_and_the_others_once(tmp_path):
    # PDL_AB: the bench step runs our kernel's arm twice on the same card, MEDQA_PDL=0 first (its own file name),
    # and every other arm once.
    env = {**os.environ, "PDL_AB": "1", "ARMS": "triton bitsandbytes", "DECODE_ATTENTION": "triton"}
    assert _bench_runs(tmp_path, env, "MEDQA_PDL") == [
        ("0", "nf4-decode-triton-attn-triton-pdl-off"), ("1", "nf4-decode-triton-attn-triton"),
        ("1", "nf4-decode-bitsandbytes-attn-triton")]
    # without PDL_AB, one run of each arm, under the caller's MEDQA_PDL
    env = {**env, "MEDQA_PDL": "0"}
    del env["PDL_AB"]
    assert [pdl for pdl, _ in _bench_runs(tmp_path, env, "MEDQA_PDL")] == ["0", "0"]
    # with inductor's tuning asked, the files' names say so
    tuned = _bench_runs(tmp_path, {**env, "MEDQA_INDUCTOR_TUNING": "1", "ARMS": "triton"}, "MEDQA_PDL")
    assert [name for _, name in tuned] == ["nf4-decode-triton-attn-triton-tuned"]
    # SCALES_AB: our arm first with the block scales decoded at load (v20), then as asked; the others once
    assert _bench_runs(tmp_path, {**env, "SCALES_AB": "1"}, "MEDQA_NF4_SCALES") == [
        ("float32", "nf4-decode-triton-attn-triton-float32-scales"), ("nested", "nf4-decode-triton-attn-triton"),
        ("nested", "nf4-decode-bitsandbytes-attn-triton")]
    # LAYOUT_AB: our arm first with the weights tiled at load (v22), then as asked; the others once
    assert _bench_runs(tmp_path, {**env, "LAYOUT_AB": "1"}, "MEDQA_NF4_LAYOUT") == [
        ("tiled", "nf4-decode-triton-attn-triton-tiled"), ("bitsandbytes", "nf4-decode-triton-attn-triton"),
        ("bitsandbytes", "nf4-decode-bitsandbytes-attn-triton")]
    # PREFILL_AB: our arm first with the decoder's prefill eager, then as the caller asked; the others once
    assert _bench_runs(tmp_path, {**env, "PREFILL_AB": "1", "MEDQA_PREFILL": "compiled"}, "MEDQA_PREFILL") == [
        ("eager", "nf4-decode-triton-attn-triton-eager-prefill"), ("compiled", "nf4-decode-triton-attn-triton"),
        ("compiled", "nf4-decode-bitsandbytes-attn-triton")]


def test_sweep_layout_sets_the_sweeps_weight_layout_only(tmp_path):
    # SWEEP_LAYOUT=tiled: the sweep (and only it) runs under MEDQA_NF4_LAYOUT=tiled, so it times each tile on copies
    # in that tile's order; unset, the sweep reads bitsandbytes' order
    fake, calls = _recording_python3(tmp_path, "MEDQA_NF4_LAYOUT")
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "ARMS": "triton"}
    env.pop("MEDQA_NF4_LAYOUT", None)
    for layout, want in (("tiled", "tiled"), (None, "bitsandbytes")):
        calls.unlink(missing_ok=True)
        run_env = {**env, "SWEEP_LAYOUT": layout} if layout else env
        done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "sweep", "bench"], cwd=ROOT, timeout=60,
                              env=run_env, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        runs = {("sweep" if "profile_nf4_kernel.py" in line else "bench"): line.split()[0]
                for line in calls.read_text().splitlines()}
        assert runs == {"sweep": want, "bench": "bitsandbytes"}, layout


def test_the_nsight_step_profiles_the_layers_and_rows_asked(tmp_path):
    # An ncu on PATH that records what it was asked to run, in place of NVIDIA's
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$NCU_ARGS"\n')
    fake.chmod(0o755)
    args = tmp_path / "args"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "NCU_ARGS": str(args),
           "NCU_ROWS": "64", "NCU_LAYERS": "q+k+v_proj"}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "ncu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    asked = args.read_text().splitlines()
    assert asked[asked.index("--rows") + 1] == "64" and asked[asked.index("--layers") + 1] == "q+k+v_proj"


def test_the_full_nsight_step_saves_a_report_and_prints_its_details_and_source_page(tmp_path):
    # NCU_SET=full: every section into OUT/ncu.ncu-rep, then the report read back twice: its details into
    # ncu-details.log (ncu.log keeps the profiled run's output)
    # and each SASS instruction's counters into ncu-source.csv (a fake ncu that records each call and writes the
    # report file the real one would)
    fake = tmp_path / "bin" / "ncu"
    fake.parent.mkdir()
    fake.write_text('#!/usr/bin/env bash\necho "$*" >> "$NCU_ARGS"\n'
                    'for ((i = 1; i <= $#; i++)); do\n'
                    '  [[ ${!i} == -o ]] && { j=$((i + 1)); touch "${!j}.ncu-rep"; }\n'
                    'done\n'
                    '[[ $1 == -i ]] && echo "printed $*"\nexit 0\n')
    fake.chmod(0o755)
    args = tmp_path / "args"
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "NCU_ARGS": str(args),
           "NCU_SET": "full"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out), "ncu"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    profile, details, source = args.read_text().splitlines()
    assert "--set full" in profile and f"-o {out}/ncu" in profile and "profile_nf4_kernel.py --once" in profile
    assert details == f"-i {out}/ncu.ncu-rep --page details"
    assert source == f"-i {out}/ncu.ncu-rep --page source --print-source sass --csv"
    assert (out / "ncu-source.csv").read_text().startswith("printed -i")
    assert (out / "ncu-details.log").read_text().startswith("printed -i")
    assert "printed" not in (out / "ncu.log").read_text()  # the profiled run's own output, kept


def test_the_tests_step_runs_the_kernels_and_the_decoders_gpu_tests(tmp_path):
    # the NF4 kernel's tests and the decoder's (its step's and prefill's graph replays against generate), one -k
    fake, calls = _recording_python3(tmp_path)
    env = {**os.environ, "PATH": f"{fake}{os.pathsep}{os.environ['PATH']}", "TESTS_K": "gpu"}
    done = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "tests"], cwd=ROOT, timeout=60, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    (line,) = calls.read_text().splitlines()
    assert "tests/test_nf4_kernel.py tests/test_decoding.py" in line and line.endswith("-k gpu")
