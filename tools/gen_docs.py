"""README and docs/ figures, generated from the committed result files under results/ (never typed by hand).

``python tools/gen_docs.py`` rewrites each block between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in README.md and docs/*.md; ``--check`` exits 1 when one is out of date.

Only files git tracks under results/ are read (``git ls-files``), so a user's own runs never change a
generated block; outside a git checkout every file is read, and the generator says so. Targets come from
docs/targets.toml. This is a tool of the repository, not of the package: nothing here ships in the wheel.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python tools/gen_docs.py` from a checkout, installed or not

from medqa_core.compare.inference import newest_inference_rows  # noqa: E402
from medqa_core.compare.inputs import BenchFile, device_label, read_bench_file  # noqa: E402
from medqa_core.report.run_summary import summary_lines  # noqa: E402
from medqa_core.results.benchcase import BenchCase  # noqa: E402
from medqa_core.results.record import RunRecord, load_record  # noqa: E402
from medqa_core.results.runset import read_runset  # noqa: E402

logger = logging.getLogger("gen_docs")
# Files whose generated blocks this tool keeps current.
DOCUMENTS = ("README.md", "docs/benchmarks.md", "docs/peers.md", "docs/decode.md", "docs/several-gpus.md",
             "docs/ci-gates.md", "docs/performance.md", "docs/parity-reports.md", "docs/numerics.md")
TARGETS = ROOT / "docs" / "targets.toml"


@cache
def _tracked(results: Path) -> frozenset[Path] | None:
    """Files git tracks under ``results``; None outside a git checkout (then every file counts)."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=results, capture_output=True, check=True,
                             timeout=60).stdout.decode()
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        logger.warning("%s is not in a git checkout: reading every file under it, committed or not", results)
        return None
    return frozenset((results / name).resolve() for name in out.split("\0") if name)


def result_files(results: Path, pattern: str) -> list[Path]:
    """Committed files under ``results`` matching ``pattern``, sorted (see :func:`_tracked`)."""
    tracked = _tracked(results.resolve())
    return sorted(p for p in results.glob(pattern) if tracked is None or p.resolve() in tracked)


def single_runs(results: Path, pattern: str) -> list[Path]:
    """:func:`result_files` of ``runs/`` without the runs of committed run sets: those are shown as sets
    (``runsets`` block), and their settings are a set's, not the embedded default's."""
    in_sets: set[Path] = set()
    for runset in result_files(results, "runsets/*.json"):
        for run in read_runset(runset).runs:
            in_sets.add((runset.parent / run.path).resolve())
    return [p for p in result_files(results, pattern) if p.resolve() not in in_sets]


def _targets() -> dict[str, Any]:
    with TARGETS.open("rb") as f:
        return tomllib.load(f)


@cache
def _bench(path: Path) -> BenchFile:
    """A bench file, read once through the one reader (medqa_core.compare.inputs: cases migrated to the schema)."""
    return read_bench_file(path)


def _json(path: Path) -> dict:
    """A trace file (results/traces/: measure/trace.py's and bench/profile_nf4_kernel.py's output), which
    neither the report nor the gate reads; run records and bench files go through :func:`_bench` and load_record."""
    return json.loads(path.read_text(encoding="utf-8"))


def _acc(result) -> str:
    if result is None:
        return "-"
    lo, hi = result.accuracy_ci95
    return f"{100 * result.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _device(fp: dict) -> str:
    threads = "" if fp.get("gpu_name") else f" ({fp.get('cpu_cores_logical')} threads)"
    return device_label(fp) + threads


def runs_table(results: Path) -> str:
    """One row per run record under ``results/runs``."""
    rows = [
        "| record | device | backend | model | quantization | attention | train tokens/s | step median (IQR) "
        "| peak memory | accuracy before [95% CI] | accuracy after [95% CI] | questions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in single_runs(results, "runs/*.json"):
        r = load_record(path)
        if r.kind == "train":  # fine-tune-only records: in the scaling table
            continue
        tr, q = r.train, r.model["quantization"]
        quant = "bf16" if q["method"] == "none" else f"{q['quant_type']} b{q['blocksize']}"
        speed = peak = step = "-"
        if tr is not None:
            tp, memory = tr.throughput, tr.memory
            speed = f"{tp.tokens_per_s:,.0f}"
            step = f"{1000 * tp.step_time_s_median:.0f} ms ({1000 * tp.step_time_s_iqr:.0f})"
            peak = (f"{memory.peak_mem_gib:.1f} GiB" if memory.peak_mem_gib is not None
                    else f"host {memory.host_peak_rss_gib:.1f} GiB")
        n = (r.eval_after or r.eval_before).n_questions if (r.eval_after or r.eval_before) else "-"
        rows.append(
            f"| [{path.name[:16]}](results/runs/{path.name}) | {_device(r.fingerprint)} "
            f"| {r.fingerprint.get('backend')} "
            f"| {r.model['name']} | {quant} | {r.attention['ran']} | {speed} | {step} | {peak} "
            f"| {_acc(r.eval_before)} | {_acc(r.eval_after)} | {n} |"
        )
    return "\n".join(rows)


def _capped_kernels(fp: dict) -> bool:
    """torch ran AVX2 kernels on a CPU with AVX-512 (ATEN_CPU_CAPABILITY=avx2): a stand-in for an AVX2-only CPU."""
    return fp.get("cpu_capability") == "AVX2" and "avx512f" in (fp.get("cpu_flags") or ())


def _kernels(fp: dict) -> str:
    if _capped_kernels(fp):
        return "AVX2, capped by ATEN_CPU_CAPABILITY=avx2 (stands in for an AVX2-only CPU)"
    return fp.get("cpu_capability") or "not recorded"


def default_run_summary(results: Path) -> str:
    """The summary `medqa-parity run` printed for the newest committed run of the embedded default (on kernels
    its CPU chose; runs with torch's kernels capped stand in for other CPUs and go to the machine-times table)."""
    paths = [p for p in single_runs(results, "runs/*_run_tiny_cpu_*.json")
             if not _capped_kernels(load_record(p).fingerprint)]
    if not paths:
        return "(no committed run of the embedded default yet)"
    path = paths[-1]
    text = "\n".join(summary_lines(load_record(path), f"results/runs/{path.name}"))
    # A note names the data folder of the machine that ran it; the bundled one is the package's.
    text = re.sub(r"/\S*/medqa_core/data", "medqa_core/data", text)
    return "```text\n" + text + "\n```"


def _bench_device(bench: BenchFile) -> str:
    return _device(bench.fingerprint)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def bench_table(results: Path, only: str = "") -> str:
    """One row per case (whose name starts with ``only``) of each pytest-benchmark file under ``results/bench``."""
    rows = ["| file | device | case | headline |", "|---|---|---|---|"]
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        for name, case in bench.cases.items():
            if not name.startswith(only):
                continue
            link = f"[{path.name}]({_link(results, path)})"
            rows.append(f"| {link} | {_bench_device(bench)} | `{name}` | {case.headline()} |")
    return "\n".join(rows)


def _link(results: Path, path: Path) -> str:
    """A link to a result file as the documents write it, from the repository root."""
    return f"results/{path.relative_to(results).as_posix()}"


def scaling_table(results: Path) -> str:
    """Data-parallel train records against the 1-GPU record of the same card and per-rank batch."""
    records = [(p, load_record(p)) for p in result_files(results, "runs/*_train_*.json")]
    gpu = [(p, r) for p, r in records if r.train is not None and r.fingerprint.get("gpu_name")]
    rows = ["| GPUs | device | global batch (per GPU) | tokens/s | per GPU | efficiency vs 1 GPU | all-reduce alone "
            "| slowest rank / mean | most tokens / mean | peak memory | record |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for path, r in gpu:
        n, batch = r.train.world_size, r.config["train"]["batch_size"]
        ones = [o for _, o in gpu if o.train.world_size == 1 and o.fingerprint["gpu_name"] == r.fingerprint["gpu_name"]
                and o.config["train"]["batch_size"] == batch // n and o.fingerprint.get("hostname")
                == r.fingerprint.get("hostname")]
        rate = r.train.throughput.tokens_per_s
        eff = f"{rate / (n * ones[-1].train.throughput.tokens_per_s):.1%}" if n > 1 and ones else "-"
        reduce_ms = f"{1000 * r.train.all_reduce_s:.1f} ms" if r.train.all_reduce_s else "-"
        # Medians over the timed steps (record.StepImbalance); records before it was measured show "-".
        imb = r.train.step_imbalance
        spread = f"{imb.time_max_over_mean:.3f} | {imb.tokens_max_over_mean:.3f}" if imb else "- | -"
        rows.append(f"| {n} | {r.fingerprint['gpu_name']} | {batch} ({batch // n}) | {rate:,.0f} "
                    f"| {rate / n:,.0f} | {eff} | {reduce_ms} | {spread} "
                    f"| {r.train.memory.peak_mem_gib:.1f} GiB "
                    f"| [{path.name[:16]}](results/runs/{path.name}) |")
    return "\n".join(rows)


def report_verdict(results: Path) -> str:
    """The verdict block of the committed parity report (results/report/report.md), as it was written."""
    path = results / "report" / "report.md"
    if not path.is_file():
        return "(no committed report yet)"
    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("**"))
    end = next(i for i, line in enumerate(lines) if line.startswith("Criteria:"))
    return "\n".join(lines[start : end + 1]).strip()


def _settings_section(results: Path, folder: str) -> str:
    """The section "What the settings alone change" of the committed report in results/``folder``."""
    path = results / folder / "report.md"
    if not path.is_file():
        return f"(no committed report in results/{folder} yet)"
    section = path.read_text(encoding="utf-8").split("## What the settings alone change", 1)[1].split("\n## ")[0]
    return "\n".join(f"- {line}" for line in section.strip().splitlines() if line.strip())


def settings_effects(results: Path) -> str:
    """The numerics report's settings section (results/report-numerics: blocksize, compute dtype)."""
    return _settings_section(results, "report-numerics")


def fp8_effects(results: Path) -> str:
    """The fp8 report's settings section (results/report-fp8: an fp8 GPU run against bf16 on the same batches)."""
    return _settings_section(results, "report-fp8")


def fp8_formats_effects(results: Path) -> str:
    """The vendor formats' report (results/report-fp8-formats: e4m3fn/e5m2 against e4m3fnuz/e5m2fnuz emulated)."""
    return _settings_section(results, "report-fp8-formats")


# Settings a profile case may add to its named settings (``+KEY=VALUE``) that change what a step computes
# (base_custom_op does not: bitsandbytes' numbers through a custom op, so its runs answer the plain profile).
LEVER_KEYS = ("fp8", "fp8_emulate")


def _profile_of(train: dict) -> str | None:
    """The --profile spelling whose settings a record's config.train has: the named settings it matches (batch,
    recompute, compile, ...) and, as ``+KEY=VALUE``, the levers it changed from them (``max-speed+fp8=true``), as
    the bench spells a profile case. A key an older record lacks did not exist then: TrainConfig's default.
    """
    from medqa_core.engine.config import NAMED_SETTINGS, TrainConfig, apply_named_settings

    keys = ("batch_size", "gradient_checkpointing", "checkpoint_layers", "compile", "lora_dropout", "adamw", "attn",
            "activation_budget")
    default = TrainConfig()
    for name in NAMED_SETTINGS:
        tc = apply_named_settings(name)
        if all(train.get(k, getattr(default, k)) == getattr(tc, k) for k in keys):
            levers = [f"+{k}={str(train[k]).lower()}" for k in LEVER_KEYS
                      if k in train and train[k] != getattr(tc, k)]
            return name + "".join(levers)
    return None


def _newest_reference(results: Path, gpu: str) -> tuple[Path, BenchCase] | None:
    """The reference arm of the newest bench file of ``gpu`` that ran it, and the file."""
    found = None
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        if bench.gpu_name != gpu:
            continue
        ref = bench.cases.get("test_train_reference")
        if ref is not None and ref.tokens_per_s and (found is None or bench.datetime >= found[0]):
            found = (bench.datetime, path, ref)
    return found[1:] if found else None


def _same_model(r: RunRecord, case: BenchCase) -> bool:
    """A run and a bench case of one model (its parameter count): a `small` run never answers a 7B bench."""
    return r.model.get("parameters") == case.parameters


def profile_targets(results: Path) -> str:
    """The memory classes on real runs: the newest 2-epoch run of each profile per card, its promise, and the
    speed issue's targets (docs/targets.toml [profiles]) against the reference of the card's newest bench file."""
    from medqa_core.engine.config import MEMORY_CAP_GIB

    targets = _targets()["profiles"]
    newest: dict[tuple[str, str], tuple[Path, RunRecord]] = {}
    for path, r in ((p, load_record(p)) for p in result_files(results, "runs/*_run_*_cuda_*.json")):
        spec = _profile_of(r.config["train"]) if r.train and r.config["train"].get("epochs") == 2.0 else None
        ref = _newest_reference(results, r.fingerprint.get("gpu_name"))
        if spec and spec.split("+")[0] in targets and not r.failure and (ref is None or _same_model(r, ref[1])):
            newest[(r.fingerprint.get("gpu_name"), spec)] = (path, r)  # files sort by time
    if not newest:
        return "(no real run of a memory class yet)"
    rows = ["| card | profile | real run: tokens/s | peak (promise) | held | vs the reference | target | met | files |",
            "|---|---|---|---|---|---|---|---|---|"]
    for (gpu, spec), (path, r) in sorted(newest.items(),
                                          key=lambda kv: (kv[0][0], list(targets).index(kv[0][1].split("+")[0]),
                                                          kv[0][1])):
        name = spec.split("+")[0]
        want, rate, peak = targets[name], r.train.throughput.tokens_per_s, r.train.memory.peak_mem_gib
        ref = _newest_reference(results, gpu)
        ratio = rate / ref[1].tokens_per_s if ref else None
        cap = MEMORY_CAP_GIB[name]
        held = peak is not None and peak <= cap
        goal = [f"<= {want['memory_gib']:g} GiB", f">= {want['speedup_vs_reference']:g}x"]
        met = peak is not None and peak <= want["memory_gib"] and ratio is not None \
            and ratio >= want["speedup_vs_reference"]
        floor = want.get("tokens_per_s_by_card", {}).get(gpu, want.get("tokens_per_s"))
        if floor:
            goal.append(f">= {floor:,} tokens/s")
            met = met and rate >= floor
        ref_text = f"{ratio:.2f}x ({ref[1].tokens_per_s:,.0f} in [{ref[0].name}]({_link(results, ref[0])}))" \
            if ref else "no reference on this card"
        rows.append(f"| {gpu} | `{spec}` | {rate:,.0f} | {peak:.1f} GiB (<= {cap:g}) | "
                    f"{'yes' if held else 'no'} | {ref_text} | {', '.join(goal)} | {'yes' if met else 'no'} | "
                    f"[{path.name[:16]}]({_link(results, path)}) |")
    return "\n".join(rows)


def lever_table(results: Path) -> str:
    """docs/levers.toml's pairs of committed bench cases: what each lever bought, from the files."""
    with (ROOT / "docs" / "levers.toml").open("rb") as f:
        levers = tomllib.load(f)["lever"]
    rows = ["| lever | profile | before | after | tokens/s | peak | verdict |", "|---|---|---|---|---|---|---|"]

    def figure(ref: list[str]) -> tuple[str, BenchCase]:
        path = next(p for p in result_files(results, "bench/*/*.json") if p.name == ref[0])
        case = _bench(path).cases[ref[1]]
        compiled = case.compile
        eager = " (ran eagerly: no graph compiled)" if compiled and compiled.ran and not compiled.graphs else ""
        return (f"{case.tokens_per_s:,.0f} tokens/s, {case.peak_mem_gib:.1f} GiB, `{case.profile}`{eager} "
                f"[{path.name[:4]}]({_link(results, path)})", case)

    for lever in levers:
        (before, b), (after, a) = figure(lever["before"]), figure(lever["after"])
        rows.append(f"| {lever['name']} | {lever['profile']} | {before} | {after} | "
                    f"{a.tokens_per_s / b.tokens_per_s - 1:+.1%} | {a.peak_mem_gib - b.peak_mem_gib:+.1f} GiB | "
                    f"{lever['verdict']} |")
    return "\n".join(rows)


def miss_bounds(results: Path) -> str:
    """What the levers not taken could buy at most: the newest step profile of ``max-speed`` with one share of the
    step's time taken away at a time (cumulatively), as tokens/s of that profiled batch."""
    paths = [p for p in _step_traces(results) if "max-speed" in _json(p)["profiles"]]
    if not paths:
        return "(no step profile of max-speed yet)"
    path = paths[-1]
    p = _json(path)["profiles"]["max-speed"]
    cats, wall, tokens = p["categories"], p["wall_ms"], p["tokens_per_step"]
    steps = [("as profiled (one batch, steady state)", 0.0),
             ("without the host-bound time: the most CUDA graphs of the step could buy", p["host_bound_ms"]),
             ("and without dequantizing: the most a fused dequantize + matmul could buy",
              cats.get("dequantize 4-bit", 0.0)),
             ("and without attention", cats.get("attention", 0.0)),
             ("and without the fused element-wise kernels: matmul, optimizer and copies alone",
              cats.get("fused by torch.compile", 0.0) + cats.get("element-wise, norms, other", 0.0))]
    rows = [f"[{path.name}]({_link(results, path)}), `max-speed`, {tokens:,} real tokens a step:", "",
            "| time taken away | ms a step | tokens/s |", "|---|---|---|"]
    left = wall
    for label, ms in steps:
        left -= ms
        rows.append(f"| {label} | {left:,.0f} | {tokens / left * 1000:,.0f} |")
    return "\n".join(rows)


def lever_curves(results: Path) -> str:
    """Every committed GPU lever loss-curve case (bench/bench_levers.py): how far each lever moved the curve."""
    rows = ["| file | device | lever | steps | max abs diff (nats) | max / mean loss | within the tolerance |",
            "|---|---|---|---|---|---|---|"]
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        for name, c in bench.cases.items():
            gap = c.details.get("curve_gap")
            if not (name.startswith("test_lever_loss_curve") and gap):
                continue
            default = c.details["loss_default"]
            # Before the adapter was reset per case, the cases before had trained it on these very batches.
            verdict = "not a comparison: the default curve is ~0 (the adapter had learnt these batches)" \
                if sum(default) / len(default) < 0.01 else ("yes" if gap["within_tolerance"] else "no")
            rows.append(f"| [{path.name}]({_link(results, path)}) | {_bench_device(bench)} | "
                        f"{c.details.get('lever')} | {gap['steps']} | {gap['max_abs_diff']:.4f} | "
                        f"{_pct(gap['relative'])} (<= {_pct(c.details['tolerance'])}) | {verdict} |")
    return "\n".join(rows) if len(rows) > 2 else "(no lever loss-curve case committed yet)"


def bench_vs_run(results: Path) -> str:
    """Each training profile's bench headline beside a real run of it on the same card: what a run gets."""
    rows = ["| card | profile | bench: real tokens/s over distinct batches (peak) "
            "| `medqa-parity run --epochs 2`: tokens/s (peak) | run / bench | scoring q/s, bench / run "
            "| compile before step 1, recompiles | run wall time | files |",
            "|---|---|---|---|---|---|---|---|---|"]
    runs = [(p, load_record(p)) for p in result_files(results, "runs/*_run_*_cuda_*.json")]
    newest: dict[tuple[str, str], tuple[str, BenchFile, BenchCase]] = {}  # (card, profile): its newest bench case
    for path in result_files(results, "bench/*/*.json"):  # files sort by time
        bench = _bench(path)
        for name, case in bench.cases.items():
            if bench.gpu_name and name.startswith("test_train_profile") and case.tokens_per_s is not None:
                newest[(bench.gpu_name, case.profile)] = (f"{path.parent.name}/{path.name}", bench, case)
    for (gpu, _), (f, bench, case) in sorted(newest.items()):
        scoring = next((c for n, c in bench.cases.items() if n.startswith("test_scoring")), None)
        match = [(p, r) for p, r in runs if r.fingerprint.get("gpu_name") == gpu and r.train is not None
                 and _same_model(r, case) and _profile_of(r.config["train"]) == case.profile
                 and r.model["quantization"].get("blocksize")
                 == (case.quantization or {}).get("blocksize") and r.config["train"].get("epochs") == 2.0]
        if not match:
            continue
        path, r = match[-1]
        tr, c = r.train, tr_compile(r)
        q = (f"{scoring.questions_per_s:.1f} / {r.eval_after.questions_per_s:.1f}" if scoring and r.eval_after
             else "-")
        rows.append(f"| {gpu} | `{case.profile}` | {case.tokens_per_s:,.0f} ({case.peak_mem_gib:.1f} GiB) | "
                    f"{tr.throughput.tokens_per_s:,.0f} ({tr.memory.peak_mem_gib:.1f} GiB) "
                    f"| {tr.throughput.tokens_per_s / case.tokens_per_s:.2f} | {q} | {c} | {r.wall_time_s:.0f} s "
                    f"| [{f.split('/')[-1]}]({_link(results, results / 'bench' / f)}), "
                    f"[{path.name[:16]}]({_link(results, path)}) |")
    return "\n".join(rows) if len(rows) > 2 else "(no GPU bench file with a matching real run yet)"


def peers_table(results: Path) -> str:
    """Stack x device: the newest bench file with peer arms per card, each stack ran or skipped (and why)."""
    newest: dict[str, tuple[str, Path, BenchFile]] = {}
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        ran = [n for n, c in bench.cases.items() if n.startswith("test_train_peer") and c.tokens_per_s is not None]
        if ran:  # a file where at least one peer stack ran (skips alone are listed in docs/peers.md's own runs)
            device = device_label(bench.fingerprint)
            found = (bench.datetime, path, bench)
            newest[device] = max(newest.get(device, found), found, key=lambda f: f[0])
    if not newest:
        return "(no bench file with peer arms yet)"
    rows = ["| device | stack | batch | real tokens/s | peak memory | vs the reference | ours' fastest bf16 profile "
            "over it | file |", "|---|---|---|---|---|---|---|---|"]
    for device, (_, path, bench) in sorted(newest.items()):
        # The reference and our arms of the same call may be in another file of the same code (one pytest session
        # per bench module): joined, the newest case of each name.
        commit = bench.fingerprint.get("git_commit")
        cases: dict[str, tuple[Path, BenchCase]] = {}
        for other in result_files(results, "bench/*/*.json"):
            b = _bench(other)
            if device_label(b.fingerprint) == device and b.fingerprint.get("git_commit") == commit:
                cases.update({n: (other, c) for n, c in b.cases.items() if n.startswith("test_train")
                              and (other == path or c.arm in ("ours", "reference"))})
        bf16 = [c for _, c in cases.values()
                if c.arm == "ours" and c.tokens_per_s and "fp8=true" not in (c.profile or "")]
        best = max(bf16, key=lambda c: c.tokens_per_s, default=None)
        reference = next((c for _, c in cases.values() if c.arm == "reference" and c.tokens_per_s), None)
        for name, (where, c) in cases.items():
            if c.arm == "ours":
                label = f"ours (`{c.profile or 'default'}`)"
            elif c.arm == "reference":
                label = "the guides' recipe (reference)"
            else:
                version = c.details.get("stack_version")
                label = f"{c.details.get('stack', name)}" + (f" {version}" if version else "")
                warned = any("imported before" in w for w in (c.details.get(c.details.get("stack", ""), {}) or {})
                             .get("import_warnings", []))
                label += " (it warned: imported after transformers)" if warned else ""
            if c.tokens_per_s is None:
                why = c.details.get("skipped_reason") or (c.oom.text if c.oom else "no figure")
                rows.append(f"| {device} | {label} | - | skipped: {why} | | | | |")
                continue
            over = f"{best.tokens_per_s / c.tokens_per_s:.2f}x (`{best.profile}`, batch {best.batch_size})" \
                if best and c.arm == "peer" else "-"
            speedup = c.speedup_vs_reference or (c.tokens_per_s / reference.tokens_per_s if reference else None)
            ref = f"{speedup:.2f}x" if speedup and c.arm != "reference" else "-"
            peak = "n/a" if c.peak_mem_gib is None else f"{c.peak_mem_gib:.1f} GiB"
            rows.append(f"| {device} | {label} | {c.batch_size} | {c.tokens_per_s:,.0f} | {peak} | {ref} "
                        f"| {over} | [{where.name}]({_link(results, where)}) |")
    return "\n".join(rows)


def tr_compile(record: RunRecord) -> str:
    c = record.train.compile if record.train else None
    if not (c and c.ran):
        return "not compiled"
    return (f"{c.warmup_s or 0:.0f} s ({'?' if c.graphs is None else c.graphs} graphs), "
            f"{'?' if c.recompiles is None else c.recompiles}")


def compile_cache_table(results: Path) -> str:
    """Every committed GPU run whose record says how its compile cache stood: the compile phase before step 1,
    cold (nothing to load) or warm (artifacts loaded), against the issue's <= 10 s for a warm one."""
    target = _targets()["compile_cache"]["warm_phase_s"]
    rows = ["| run | card | model, profile | 4-bit base matmul | cache | artifacts loaded, FX graph hits / misses "
            "| AOTAutograd hits / misses / bypasses | compiling | compile phase before step 1 "
            f"| warm <= {target:g} s |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path in result_files(results, "runs/*_cuda_*.json"):
        r = load_record(path)
        c = r.train.compile if r.train else None
        cache = (c.cache or {}) if c and c.ran else {}
        if not cache.get("state"):
            continue
        warm = cache["state"] == "warm"
        rows.append(f"| [{path.name[:16]}]({_link(results, path)}) | {r.fingerprint.get('gpu_name')} "
                    f"| {r.model.get('name')}, `{_profile_of(r.config['train']) or 'custom'}` | {_base_matmul(r)} "
                    f"| {cache['state']} "
                    f"| {cache.get('artifacts_loaded', 0)}, {cache.get('fx_graph_hits', 0)} / "
                    f"{cache.get('fx_graph_misses', 0)} | "
                    + (f"{cache['autograd_cache_hits']} / {cache['autograd_cache_misses']} / "
                       f"{cache.get('autograd_cache_bypasses', '-')}" if "autograd_cache_hits" in cache
                       else "- (not recorded)")
                    + f" | {c.compile_s or 0:.1f} s | {c.warmup_s or 0:.1f} s "
                    f"| {('yes' if (c.warmup_s or 0) <= target else 'no') if warm else '-'} |")
    return "\n".join(rows) if len(rows) > 2 else "(no committed GPU run records its compile cache yet)"


def _base_matmul(r: RunRecord) -> str:
    """How a run's frozen 4-bit base multiplied: fp8, the custom op, or bitsandbytes' autograd.Function."""
    train = r.config.get("train") or {}
    if (r.numerics or {}).get("fp8"):
        return "fp8 (autograd.Function)"
    return "custom op" if train.get("base_custom_op") else "bitsandbytes (autograd.Function)"


def _latest_gpu_benches(results: Path) -> list[tuple[str, BenchFile]]:
    """(``machine folder/file name``, file) of the newest bench file with training profiles, one per GPU model."""
    newest: dict[str, tuple[str, str, BenchFile]] = {}
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        gpu = bench.gpu_name
        names = [e.name for e in bench.entries]
        # A full bench run: training profiles and scoring (a peers-only or decode-only file is not one).
        if gpu and any(n.startswith("test_train_profile") for n in names) and any(n.startswith("test_scoring")
                                                                                  for n in names):
            found = (bench.datetime, f"{path.parent.name}/{path.name}", bench)
            newest[gpu] = max(newest.get(gpu, found), found, key=lambda f: f[:2])
    return [(f, bench) for _, f, bench in sorted(newest.values(), key=lambda f: f[1])]


def performance_table(results: Path) -> str:
    """Issue targets against the newest GPU bench run of each card: each table's figures from one run."""
    runs = _latest_gpu_benches(results)
    if not runs:
        return "(no GPU bench run with training profiles yet)"
    return "\n\n".join(_performance_rows(f, bench) for f, bench in runs)


def _performance_rows(f: str, bench: BenchFile) -> str:
    """One run's table: ours beside the reference arm measured in the same run, against docs/targets.toml."""
    targets = _targets()
    cases = bench.cases
    medians = {e.name: e.median_s for e in bench.entries}
    ours = [c for n, c in cases.items() if n.startswith("test_train_ours") or n.startswith("test_train_profile")]
    ref = cases["test_train_reference"]
    rows = [f"Run: [{f.split('/')[-1]}](results/bench/{f}), {_bench_device(bench)}; the reference ran "
            f"{ref.tokens_per_s:,.0f} real tokens/s at {ref.peak_mem_gib:.1f} GiB in it.", "",
            "| target | measured | met |", "|---|---|---|"]
    want = targets["memory_capped"]["speedup_vs_reference"]
    for e in (e for e in ours if e.memory_cap_gib):
        ratio = e.speedup_vs_reference
        rows.append(f"| memory-capped (`{e.profile}`): peak <= {e.memory_cap_gib:g} GiB and >= {want:g}x the "
                    f"reference | {e.peak_mem_gib:.1f} GiB, {e.tokens_per_s:,.0f} tokens/s = {ratio:.2f}x "
                    f"(batch {e.batch_size}, {e.checkpoint_layers} of the layers recomputed) "
                    f"| {'yes' if e.within_memory_cap and ratio >= want else 'no'} |")
    e = max(ours, key=lambda e: (e.throughput and e.throughput.mfu_measured) or 0)
    tp = e.throughput
    mfu = targets["max_speed"]["mfu"]
    met = "yes" if (tp.mfu_measured or 0) >= mfu else "no"
    datasheet = "" if tp.mfu_datasheet is None else f" ({_pct(tp.mfu_datasheet)} of the datasheet dense peak)"
    rows.append(f"| max-speed (`{e.profile or 'default'}`): MFU >= {100 * mfu:g}% of the measured peak | "
                f"{_pct(tp.mfu_measured)}{datasheet} at {e.tokens_per_s:,.0f} tokens/s "
                f"({e.speedup_vs_reference:.2f}x the "
                f"reference), batch {e.batch_size}, {e.peak_mem_gib:.1f} GiB | {met} |")
    rows.append(_train_split_row(targets["train_split"], e, bench))
    scoring = targets["scoring"]
    for name, e in ((n, c) for n, c in cases.items() if n.startswith("test_scoring")):
        round_s = medians[name]  # a round also tokenizes the questions
        n = e.questions
        met = ("yes" if round_s <= scoring["seconds"] else "no") if n == scoring["questions"] \
            else f"not measured: {n} questions scored"
        rows.append(f"| scoring {scoring['questions']:,} test questions in <= {scoring['seconds']:g} s | "
                    f"{round_s:.1f} s a round for {n} questions, tokenization included ({n / e.questions_per_s:.1f} s "
                    f"of model time, {e.questions_per_s:.1f} questions/s, 4-bit 7B) | {met} |")
    return "\n".join(rows)


def _train_split_row(split: dict, e: BenchCase, bench: BenchFile) -> str:
    """Time to result on the train split: a real run of it where one is committed, else the committed 2-epoch dev
    run of the same profile and card scaled by question count (stated as such), else the bench's arithmetic."""
    gpu = bench.gpu_name
    runs = [(p, load_record(p)) for p in result_files(ROOT / "results", "runs/*_run_*_cuda_*.json")]
    runs = [(p, r) for p, r in runs if r.fingerprint.get("gpu_name") == gpu and r.train is not None
            and _same_model(r, e) and _profile_of(r.config["train"]) == e.profile
            and r.config["train"].get("epochs") == split["epochs"]
            and r.model["quantization"].get("blocksize") == (e.quantization or {}).get("blocksize")]
    head = f"| {split['epochs']} epochs of the train split in <= {split['minutes']:g} min | "
    if runs:
        path, r = runs[-1]
        tr = r.train
        scale = split["questions"] / tr.n_examples
        compile_s = (tr.compile.warmup_s or 0.0) if tr.compile else 0.0
        minutes = (sum(tr.step_time_s) * scale + compile_s) / 60
        return (head + f"{minutes:.1f} min: the run [{path.name[:16]}](results/runs/{path.name}) fine-tuned "
                f"{tr.epochs:g} epochs of {tr.n_examples:,} dev questions in {sum(tr.step_time_s):.0f} s of steps "
                f"plus {compile_s:.0f} s of compile; the steps scaled by {split['questions']:,} / {tr.n_examples:,} "
                f"questions (a run of the train split itself is not committed: the split is not here) | "
                f"{'yes' if minutes <= split['minutes'] else 'no'} |")
    tokens = split["epochs"] * split["questions"] * e.tokens_per_step / e.batch_size  # real lengths of the batch
    minutes = tokens / e.tokens_per_s / 60
    return (head + f"{minutes:.1f} min: {tokens / 1e6:.2f} M tokens ({split['epochs']} x {split['questions']:,} "
            f"questions at this batch's mean real length) / {e.tokens_per_s:,.0f} tokens/s (computed from the bench, "
            f"not a run) | {'yes' if minutes <= split['minutes'] else 'no'} |")


def _decode_path(e: BenchCase) -> str:
    """How a compiled-decode case ran, in words (older files ran the compiled step inside ``generate``)."""
    if e.decode_loop:
        kernel = e.details.get("nf4_kernel")
        return f"`{e.decode_loop}`, {e.details.get('graph')}" + (f", 4-bit: {kernel}" if kernel else "")
    mode = e.details.get("compile_mode_ran") or e.compile_mode
    return f"`generate`, forward compiled ({mode})" + (", guard checks skipped" if e.details.get("guards_skipped")
                                                       else "")


def decode_table(results: Path) -> str:
    """Eager ``generate`` beside the compiled decode path, per batch size, from each bench file that ran both."""
    rows = ["| file | device | batch | compiled path | eager `generate` | compiled | speed-up | first call (compile) "
            "| joules/token eager, compiled |", "|---|---|---|---|---|---|---|---|---|"]
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        cases = bench.cases
        for name, compiled in cases.items():
            eager_name = re.sub(r"-(triton|bitsandbytes)\]$", "]",
                                name.replace("test_decode_compiled", "test_decode_eager"))
            eager = cases.get(eager_name)
            if not (name.startswith("test_decode_compiled") and eager and eager.decode_tokens_per_s
                    and compiled.decode_tokens_per_s):
                continue
            first = compiled.details.get("first_call_s") or compiled.details.get("first_generate_s")
            joules = [e.energy.joules_per_token if e.energy else None for e in (eager, compiled)]
            rows.append(
                f"| [{path.name}]({_link(results, path)}) | {_bench_device(bench)} "
                f"| {compiled.batch_size or 1} | {_decode_path(compiled)} "
                f"| {eager.decode_tokens_per_s:,.1f} tokens/s ({_pct(eager.roofline_fraction)} of roofline) "
                f"| {compiled.decode_tokens_per_s:,.1f} tokens/s ({_pct(compiled.roofline_fraction)}) "
                f"| {compiled.decode_tokens_per_s / eager.decode_tokens_per_s:.1f}x "
                f"| {f'{first:.0f} s' if first else '-'} "
                f"| {', '.join(f'{j:.2f} J' if isinstance(j, float) else '-' for j in joules)} |")
    return "\n".join(rows)


def inference_table(results: Path) -> str:
    """What a buyer reads: per device the newest bench run that timed our NF4 kernel beside bitsandbytes', per
    kernel and batch: how the prefill ran (eager or compiled), time to first token, prefill and decode tokens/s,
    the share of the decode roofline and joules per token (rows: medqa_core.compare.inference, which the parity
    report reads too)."""
    rows = ["| device | 4-bit kernel | batch | prefill | time to first token | prefill tokens/s | decode tokens/s "
            "| of roofline | joules/token | file |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in newest_inference_rows(_bench(p) for p in result_files(results, "bench/*/*.json")):
        path = Path(r.path)
        rows.append(
            f"| {r.device} | {r.kernel_name} | {r.batch} | {r.prefill} "
            f"| {f'{r.ttft_s * 1e3:,.0f} ms' if r.ttft_s else '-'} "
            f"| {f'{r.prefill_tokens_per_s:,.0f}' if r.prefill_tokens_per_s else '-'} "
            f"| {r.decode_tokens_per_s:,.0f} | {_pct(r.roofline_fraction)} "
            f"| {f'{r.joules_per_token:.2f} J' if r.joules_per_token is not None else '-'} "
            f"| [{path.name}]({_link(results, path)}) |")
    return "\n".join(rows)


def inference_brief(results: Path) -> str:
    """README's view of :func:`inference_table`: per device and batch, decode tokens/s (share of the roofline)
    of our kernel beside bitsandbytes' in the same run."""
    cells: dict[tuple[str, int], dict[str, Any]] = {}
    arms: dict[str, None] = {}  # the arms' columns, ours first (the rows' order)
    for r in newest_inference_rows(_bench(p) for p in result_files(results, "bench/*/*.json")):
        cell = cells.setdefault((r.device, r.batch), {"path": Path(r.path)})
        cell[r.kernel_name] = f"{r.decode_tokens_per_s:,.0f} ({_pct(r.roofline_fraction)})"
        arms[r.kernel_name] = None
    if not cells:
        return "(no decode bench with our NF4 kernel committed yet)"
    names = [n.replace("ours (Triton)", "ours") for n in arms]
    rows = [f"| device | batch | decode tokens/s (of roofline): {' | '.join(names)} | file |",
            "|---" * (3 + len(names)) + "|"]
    devices = list(dict.fromkeys(device for device, _ in cells))  # in the order the rows name them; then by batch
    for (device, batch), cell in sorted(cells.items(), key=lambda item: (devices.index(item[0][0]), item[0][1])):
        rows.append(f"| {device} | {batch} | {' | '.join(cell.get(a, '-') for a in arms)} "
                    f"| [{cell['path'].name}]({_link(results, cell['path'])}) |")
    return "\n".join(rows)


def decode_step_table(results: Path) -> str:
    """Where one decode step's time goes, from bench files whose compiled decode cases profiled a few steps
    (bench_infer.py, after the timed rounds): per file, 4-bit kernel and batch, the step's wall time under the
    profiler, the step of the timed rounds (batch / decode tokens/s), its kernels' time, the gaps between them
    (each wall minus kernels: launches inside the graph, idle time), and per kernel category the time and kernels
    per step. The profiler's own cost falls in its gaps (CUPTI records every kernel of the replayed graph); the
    kernels' durations are the GPU's, so the timed step minus them is the nearer figure for the real gaps."""
    found = []
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        for name, case in bench.cases.items():
            step = case.details.get("decode_step_profile")
            if name.startswith("test_decode_compiled") and step:
                found.append((path, bench, case, step))
    if not found:
        return "(no decode bench with a step profile committed yet)"
    totals: dict[str, float] = {}
    for *_, step in found:
        for category, ms in step["categories"].items():
            totals[category] = totals.get(category, 0.0) + ms
    categories = sorted(totals, key=lambda c: -totals[c])
    rows = ["| file | device | 4-bit kernel | batch | step under the profiler | step, timed | kernels | gaps: profiled "
            "| gaps: timed | kernels a step | " + " | ".join(categories) + " |", "|---" * (10 + len(categories)) + "|"]
    for path, bench, case, step in found:
        kernel = "ours (Triton)" if str(case.details.get("nf4_kernel", "")).startswith("triton") else \
            str(case.details.get("nf4_kernel", "-"))
        if str(case.details.get("decode_attention", "")).startswith("triton"):
            kernel += " + our attention"
        launches = step.get("launches", {})
        tokens_per_s = case.decode_tokens_per_s
        timed_ms = (case.batch_size or 1) / tokens_per_s * 1e3 if tokens_per_s and math.isfinite(tokens_per_s) \
            and tokens_per_s > 0 else None  # a missing or broken rate gives "-", never a step
        timed = f"{timed_ms:.2f} ms" if timed_ms else "-"
        timed_gaps = f"{max(timed_ms - step['busy_ms'], 0.0):.2f} ms" if timed_ms else "-"
        rows.append(f"| [{path.name}]({_link(results, path)}) | {_bench_device(bench)} | {kernel} "
                    f"| {case.batch_size or 1} | {step['wall_ms']:.2f} ms | {timed} | {step['busy_ms']:.2f} ms "
                    f"| {max(step['wall_ms'] - step['busy_ms'], 0.0):.2f} ms | {timed_gaps} "
                    f"| {sum(launches.values()):,.0f} | "
                    + " | ".join(f"{step['categories'][c]:.2f} ms (x{launches.get(c, 0):,.0f})"
                                 if c in step["categories"] else "-" for c in categories) + " |")
    return "\n".join(rows)


def decode_launch_table(results: Path) -> str:
    """Our 4-bit kernel's time in one decode step, per kind of launch, against the bytes each reads: from bench
    files whose step profile kept the kernel's launches one by one (bench_infer.py: ``nf4_time_by_launch``, the
    launches lined up with the layers in the order the model calls them). The share of the copy bandwidth is
    that of the same run; the real decode reads the weights from HBM, as these launches did."""
    rows = ["| file | device | batch | launch | a step | us a launch | MB a launch | of copy bandwidth "
            "| of the 4-bit time |", "|---" * 9 + "|"]
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        for case in bench.cases.values():
            launches = case.details.get("nf4_time_by_launch") or []
            total_ms = sum(row["ms"] for row in launches)
            for row in launches:
                rows.append(f"| [{path.name}]({_link(results, path)}) | {_bench_device(bench)} "
                            f"| {case.batch_size or 1} | {row['launch']} | {row['per_step']} "
                            f"| {row['us_each']:.1f} | {row['bytes_each'] / 1e6:.1f} "
                            f"| {_pct(row['bandwidth_fraction'])} "
                            f"| {_pct(row['ms'] / total_ms if total_ms > 0 else None)} |")
    if len(rows) == 2:
        return "(no decode bench with our kernel's launches profiled one by one committed yet)"
    return "\n".join(rows)


NF4_ARMS = ("ours", "ours+lora", "bitsandbytes", "bitsandbytes+lora", "bf16")


def nf4_kernel_profile(results: Path) -> str:
    """Kernel time against bytes moved, from bench/profile_nf4_kernel.py files: one row per file, layer shape and
    rows, each arm's time per call and share of the copy bandwidth; where the file swept tiles, the best tile's
    time (with LoRA where the sweep timed it so); an A/B arm's (ours with LoRA and a switch: ``ours+lora+NAME``,
    named by NAME); the largest error of ours and bitsandbytes' in bf16 eps of the sum of |x * w|."""
    rows = ["| file | layer (N x K) | rows | " + " | ".join(NF4_ARMS) + " | ours, best swept tile "
            "| ours+lora, A/B arm | max error: ours / bitsandbytes |", "|---" * (6 + len(NF4_ARMS)) + "|"]

    def cell(r: dict | None) -> str:
        return f"{r['time_s'] * 1e6:,.1f} us ({_pct(r['bandwidth_fraction'])})" if r else "-"

    def error(r: dict | None) -> str:
        return f"{r['max_error_abs_sum_eps']:.3f}" if r and r.get("max_error_abs_sum_eps") is not None else "-"

    for path in result_files(results, "traces/*nf4-kernel-*.json"):
        if _json(path).get("kind") != "nf4-kernel-profile":
            continue
        by_case: dict[tuple, dict[str, dict]] = {}
        for r in _json(path)["rows"]:
            by_case.setdefault((r["layer"], r["n"], r["k"], r["rows"]), {})[r["arm"]] = r
        for (layer, n, k, m), arms in by_case.items():
            sweep = arms.get("sweep") or arms.get("sweep+lora")  # tiles timed without LoRA, or with it
            best = (f"{sweep['best_time_s'] * 1e6:,.1f} us ({_pct(sweep['best_bandwidth_fraction'])})"
                    + (" with LoRA" if sweep["arm"] == "sweep+lora" else "")
                    + (", tiled copies" if sweep.get("layout") == "tiled" else "") if sweep else "-")
            switched = "; ".join(f"{cell(r)} {a.removeprefix('ours+lora+')}" for a, r in arms.items()
                                 if a.startswith("ours+lora+")) or "-"
            rows.append(f"| [{path.name}]({_link(results, path)}) | {layer} ({n} x {k}) | {m} | "
                        + " | ".join(cell(arms.get(a)) for a in NF4_ARMS)
                        + f" | {best} | {switched} | {error(arms.get('ours'))} / {error(arms.get('bitsandbytes'))} |")
    return "\n".join(rows)


def nf4_kernel_compiled(results: Path) -> str:
    """What the compiler made of the NF4 kernel, per file (kernel version) and tile: bench/inspect_nf4_kernel.py
    --out files, compiled on a CPU-only machine for a GPU target."""
    rows = ["| file | kernel commit | target | rows | tile | layout conversions in the loop | cp.async in the loop "
            "| shared-memory accesses | shuffles | barriers | registers | spill bytes "
            "| SASS instructions in the loop | per weight |", "|---" * 14 + "|"]
    for path in result_files(results, "traces/*nf4-kernel-compiled*.json"):
        data = _json(path)
        fp = data["fingerprint"]
        commit = str(fp.get("git_commit"))[:7] + (" + local changes" if fp.get("git_dirty") else "")
        for t in data["tiles"]:
            rows.append(f"| [{path.name}]({_link(results, path)}) | {commit} | {data['target']} "
                        f"(Triton {data['triton_version']}) | {t['rows']} | {t['tile_name']} "
                        f"| {t['loop_convert_layouts']} | {t['loop_async_copies']} | "
                        + " | ".join("-" if t.get(k) is None else str(t[k]) for k in
                                     ("shared_accesses", "shuffles", "barriers", "registers", "spill_bytes",
                                      "loop_instructions", "instructions_per_weight")) + " |")
    return "\n".join(rows)


def _ms(x: float) -> str:
    return f"{x:,.0f}"


def profile_table(path: Path) -> str:
    """One row per profiled configuration of a ``medqa-parity profile`` file: where a step's time goes."""
    data = _json(path)
    fp = data["meta"]["fingerprint"]
    categories = sorted({c for p in data["profiles"].values() for c in p["categories"]})
    rows = [f"[{path.name}](results/traces/{path.name}): {fp.get('gpu_name') or fp.get('cpu_model')}, "
            f"{data['meta']['model']}, commit {str(fp.get('git_commit'))[:7]}"
            + (" (a copied tree with local changes)" if fp.get("git_dirty") else "") + "; ms per step.", "",
            "| settings | real tokens | wall | tokens/s | kernels | host-bound | " + " | ".join(categories)
            + " | peak |", "|---" * (6 + len(categories)) + "|---|"]
    for label, p in data["profiles"].items():
        settings = data["meta"]["settings"][label]
        compiled = "compiled" if settings["compile"]["ran"] else "eager"
        rows.append(f"| `{label}` ({compiled}) | {p['tokens_per_step']:,} | {_ms(p['wall_ms'])} | "
                    f"{p['tokens_per_step'] / p['wall_ms'] * 1000:,.0f} | {_ms(p['busy_ms'])} | "
                    f"{_ms(p['host_bound_ms'])} | "
                    + " | ".join(_ms(p["categories"].get(c, 0.0)) for c in categories)
                    + f" | {p['peak_mem_gib']:.1f} GiB |")
    for label, settings in data["meta"]["settings"].items():
        if "oom" in settings:
            rows.append(f"| `{label}` | out of memory: {settings['oom'][:80]} |" + " |" * (5 + len(categories)))
    return "\n".join(rows)


def _step_traces(results: Path) -> list[Path]:
    """The `trace` command's files (bench/profile_nf4_kernel.py's kernel profiles lie beside them)."""
    return [p for p in result_files(results, "traces/*.json")
            if _json(p).get("kind") not in ("nf4-kernel-profile", "nf4-kernel-compiled")]


def profile_tables(results: Path) -> str:
    """Every committed `trace` file, oldest first (the NF4 kernel's profiles have their own table)."""
    paths = _step_traces(results)
    return "\n\n".join(profile_table(p) for p in paths) if paths else "(no profile yet)"


def _range(values: list[float]) -> str:
    return f"{min(values):+.1f}..{max(values):+.1f}%" if values else "-"


def gate_noise_table(folder: Path, baseline: Path) -> str:
    """How unchanged builds' bench files move: each run against ``baseline`` and against each other run.

    Every figure is the gate's own change (candidate vs baseline, percent) under loose thresholds, so
    the table shows the noise the CI thresholds of ``.ci/gate.toml`` have to tolerate; the last line
    says how many of the runs those thresholds pass.
    """
    from medqa_core.gate.cases import load_cases
    from medqa_core.gate.decide import gate_cases, machine_drift, machine_text
    from medqa_core.gate.thresholds import load_thresholds

    loose = load_thresholds(None, ["speed_pct=99.9", "memory_pct=100000"], start=ROOT)
    ci = load_thresholds(ROOT / ".ci" / "gate.toml", [])
    base = load_cases(baseline)
    runs = {p.name: load_cases(p) for p in result_files(folder.parent.parent, f"gate-noise/{folder.name}/*.json")}

    def changes(a: tuple, b: tuple) -> dict[tuple[str, str], float]:
        checks = gate_cases(a, b, loose).checks
        return {(c.case, c.field): c.change for c in checks if c.kind in ("speed", "memory")
                and math.isfinite(c.change)}

    against: dict[tuple[str, str], list[float]] = {}
    between: dict[tuple[str, str], list[float]] = {}
    names = list(runs)
    for i, name in enumerate(names):
        for key, value in changes(base, runs[name]).items():
            against.setdefault(key, []).append(value)
        for other in names[i + 1:]:
            for key, value in changes(runs[name], runs[other]).items():
                between.setdefault(key, []).append(value)
    drifts = [machine_drift(base[0].summary, cases[0].summary) for cases in runs.values()]
    probes = sorted({k for d in drifts for k in d})
    verdicts = {name: gate_cases(base, cases, ci) for name, cases in runs.items()}
    failed = [name for name, result in verdicts.items() if not result.passed]
    rows = [f"{len(runs)} runs in [{folder.name}/](results/{folder.parent.name}/{folder.name}/), against "
            f"[{baseline.name}](results/bench/{baseline.parent.name}/{baseline.name}) and against each other "
            "(change, min..max over runs and over pairs of runs):", "",
            "| case | figure | against the baseline | run to run |", "|---|---|---|---|"]
    for case, field in sorted(against.keys() | between.keys()):
        rows.append(f"| `{case}` | {field} | {_range(against.get((case, field), []))} | "
                    f"{_range(between.get((case, field), []))} |")
    for key in probes:
        values = [d[key] for d in drifts if key in d]
        rows.append(f"| machine | {machine_text({key: 0.0}).rsplit(' ', 1)[0]} (measured before the first case) | "
                    f"{_range(values)} | |")
    rows += ["", f"Under [.ci/gate.toml](.ci/gate.toml): {len(runs) - len(failed)} of {len(runs)} pass"
             + (f"; failing: {', '.join(failed)}." if failed else ".")]
    return "\n".join(rows)


def gate_noise_tables(results: Path) -> str:
    """:func:`gate_noise_table` for each ``results/gate-noise/<baseline file stem>/`` folder."""
    tables = []
    folders = sorted({p.parent for p in result_files(results, "gate-noise/*/*.json")})
    for folder in folders:
        (baseline,) = result_files(results, f"bench/*/{folder.name}.json")
        tables.append(gate_noise_table(folder, baseline))
    return "\n\n".join(tables) if tables else "(no noise runs committed)"


def machine_times(results: Path) -> str:
    """Wall time of the default run (``medqa-parity run``) on each CPU model a committed record came from."""
    newest: dict[tuple[str, str], tuple[Path, RunRecord]] = {}
    for path in single_runs(results, "runs/*_run_tiny_cpu_*.json"):
        record = load_record(path)
        fp = record.fingerprint
        newest[(str(fp.get("cpu_model")), _kernels(fp))] = (path, record)  # sorted by time: the last is newest
    if not newest:
        return "(no committed record of the default run yet)"
    rows = ["| CPU | torch's CPU kernels | threads | compute dtype | wall time of `medqa-parity run` "
            "| per train step (median) | record |", "|---|---|---|---|---|---|---|"]
    for (cpu, kernels), (path, r) in sorted(newest.items()):
        step = f"{1000 * r.train.throughput.step_time_s_median:.0f} ms" if r.train else "-"
        wall = f"{r.wall_time_s:.0f} s" if r.wall_time_s is not None else "not recorded"
        dtype = (r.numerics or {}).get("compute_dtype", "bfloat16 (before --dtype)")
        rows.append(f"| {cpu} | {kernels} | {r.fingerprint.get('cpu_cores_logical')} | {dtype} | {wall} | {step} "
                    f"| [{path.name[:16]}]({_link(results, path)}) |")
    return "\n".join(rows)


def newest_per_device(results: Path) -> str:
    """The newest committed result of each device: its newest run record and its newest bench file's train case."""
    found: dict[str, dict[str, str]] = {}
    for path in single_runs(results, "runs/*_run_*.json"):
        r = load_record(path)
        acc = _acc(r.eval_after)
        speed = f"{r.train.throughput.tokens_per_s:,.0f}" if r.train else "-"
        spec = (r.config.get("train") or {}).get("profile")
        found.setdefault(device_label(r.fingerprint), {})["record"] = (
            f"{r.model['name']}{f' `{spec}`' if spec else ''}: {speed} train tokens/s, accuracy after {acc} "
            f"([{path.name[:16]}]({_link(results, path)}))")
    for path in result_files(results, "bench/*/*.json"):
        bench = _bench(path)
        train = [c for n, c in bench.cases.items() if n.startswith("test_train_ours") and c.tokens_per_s]
        if train:
            device = device_label(bench.fingerprint)
            found.setdefault(device, {})["bench"] = (f"{train[0].model}: {train[0].headline()} "
                                                     f"([{path.name}]({_link(results, path)}))")
    rows = ["| device | newest run record | newest bench file (our train step) |", "|---|---|---|"]
    rows += [f"| {d} | {v.get('record', '-')} | {v.get('bench', '-')} |" for d, v in sorted(found.items())]
    return "\n".join(rows)


def _committed_runsets(results: Path) -> list[Path]:
    return result_files(results, "runsets/*.json")


def _runset_rows(results: Path) -> list[tuple[Path, Any, Any, Any]]:
    """(path, run set, its runs, their summary) of every committed run set."""
    from medqa_core.compare.runsets import summarize_loaded
    from medqa_core.results.runset import load_runset

    rows = []
    for path in _committed_runsets(results):
        runset, runs = load_runset(path)
        rows.append((path, runset, runs, summarize_loaded(runs, runset.target_loss_nats, path.name)))
    return rows


def _same_seed(s: Any) -> str:
    rep = s.repeat
    return "-" if rep is None else ("bit for bit" if rep.identical else
                                    f"{rep.accuracy_pp:+.2f} pp, {rep.eval_loss_nats:+.3g} nats")


def runsets_table(results: Path) -> str:
    """One row per committed run set (results/runsets): its seeds, spreads, same-seed repeat and time to target."""
    rows = ["| run set | device | model, steps | seeds | accuracy mean (sd) [range] | eval loss, nats: mean (sd) "
            "[range] | same seed twice | time to target |",
            "|---|---|---|---|---|---|---|---|"]
    for path, runset, runs, s in _runset_rows(results):
        acc, loss, ttt = s.accuracy, s.eval_loss_nats, s.time_to_target
        first = runs[0].record
        model = first.model["name"]
        steps = first.train.steps if first.train else "-"
        n_q = first.eval_after.n_questions if first.eval_after else "-"
        time = (f"{ttt.result_s:.0f} s to {ttt.target_nats:g} nats (sd {ttt.spread.sd:.0f} s, {ttt.reached} of "
                f"{len(ttt.steps)} reached; steps {', '.join('-' if x is None else str(x) for x in ttt.steps)})"
                if ttt.result_s is not None else f"- ({ttt.why})")
        rows.append(
            f"| [{path.name[:16]}](results/runsets/{path.name}) | {_device(runset.fingerprint)} "
            f"| {model}, {steps} steps, {n_q} questions | {', '.join(map(str, runset.seeds))} "
            f"| {100 * acc.mean:.2f}% ({100 * acc.sd:.2f} pp) [{100 * acc.min:.2f}, {100 * acc.max:.2f}] "
            f"| {loss.mean:.4f} ({loss.sd:.3g}) [{loss.min:.4f}, {loss.max:.4f}] | {_same_seed(s)} | {time} |")
    if len(rows) == 2:
        rows.append("| (no run set committed) | | | | | | | |")
    return "\n".join(rows)


def runsets_brief(results: Path) -> str:
    """README's view of :func:`runsets_table`: per set, the seed spread of accuracy and the same-seed repeat."""
    rows = ["| run set | device, model | accuracy over the seeds: mean (sd) | same seed twice |", "|---|---|---|---|"]
    for path, runset, runs, s in _runset_rows(results):
        rows.append(f"| [{path.name[:16]}](results/runsets/{path.name}) | {_device(runset.fingerprint)}, "
                    f"{runs[0].record.model['name']} | {100 * s.accuracy.mean:.2f}% ({100 * s.accuracy.sd:.2f} pp, "
                    f"{len(runset.seeds)} seeds) | {_same_seed(s)} |")
    return "\n".join(rows) if len(rows) > 2 else "(no run set committed)"


def claims_check(results: Path) -> str:
    """``medqa-parity check`` of every shipped claim (claims/*.toml) against the committed run sets."""
    from medqa_core.compare.claims import Claim, check_claim, exit_code, load_claim, load_sets, render_lines

    sets = load_sets(_committed_runsets(results))
    out = []
    for path in sorted((ROOT / "claims").glob("*.toml")):
        claim = load_claim(path)
        lines = check_claim(claim, sets)
        shown = Claim(str(path.relative_to(ROOT)), claim.tables)
        out += ["```text", f"$ medqa-parity check {shown.path} results/runsets/*.json   # exit {exit_code(lines)}",
                *render_lines(shown, lines), "```", ""]
    return "\n".join(out).rstrip()


GENERATORS: dict[str, Callable[[Path], str]] = {
    "train-cases": lambda results: bench_table(results, only="test_train"),
    "verdict": report_verdict, "performance": performance_table, "profiles": profile_tables,
    "gate-noise": gate_noise_tables,
    "runs": runs_table, "default-run": default_run_summary, "bench": bench_table, "scaling": scaling_table,
    "decode": decode_table, "machine-times": machine_times, "newest": newest_per_device,
    "settings-effects": settings_effects, "fp8-effects": fp8_effects,
    "fp8-formats": fp8_formats_effects, "bench-vs-run": bench_vs_run, "peers": peers_table,
    "profile-targets": profile_targets, "levers": lever_table, "lever-curves": lever_curves,
    "miss-bounds": miss_bounds, "inference": inference_table, "nf4-kernel-profile": nf4_kernel_profile,
    "nf4-kernel-compiled": nf4_kernel_compiled, "decode-step": decode_step_table,
    "decode-launches": decode_launch_table,
    "runsets": runsets_table, "runsets-brief": runsets_brief, "inference-brief": inference_brief,
    "claims": claims_check, "compile-cache": compile_cache_table,
}


def render(readme: str, results: Path, up: str = "") -> str:
    """A document's text with every generated block replaced by fresh output.

    Args:
        readme: the document's text.
        results: the results folder.
        up: the path from the document's folder to the repository root ("../" for docs/), put before links.

    Returns:
        The new text.
    """
    for name, generate in GENERATORS.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        if start not in readme:
            continue
        text = re.sub(r"\]\((results/|\.ci/)", lambda m: f"]({up}{m.group(1)}", generate(results))
        block = f"{start}\n{text}\n{end}"
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, block=block: block, readme, flags=re.S)
    return readme


def up_to_root(document: Path) -> str:
    """"../" for each folder between the repository root and ``document``."""
    depth = len(document.resolve().relative_to(ROOT).parts) - 1
    return "../" * depth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
    parser.add_argument("--results", type=Path, default=ROOT / "results",
                        help="the results folder (default: the repository's); only its git-tracked files are read")
    parser.add_argument("documents", nargs="*", type=Path, default=[ROOT / name for name in DOCUMENTS])
    args = parser.parse_args(argv)
    stale = []
    for doc in args.documents:
        old = doc.read_text(encoding="utf-8")
        new = render(old, args.results, up_to_root(doc))
        if new == old:
            continue
        stale.append(doc)
        if not args.check:
            doc.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python tools/gen_docs.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="gen_docs: %(message)s")
    sys.exit(main())
