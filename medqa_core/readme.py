"""README and PERFORMANCE figures, generated from the result files under results/ (never typed by hand).

``python -m medqa_core.readme`` rewrites each block between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in README.md and PERFORMANCE.md; ``--check`` exits 1 when one is out of date.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

from medqa_core.record import RunRecord, load_record

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ("README.md", "PERFORMANCE.md")  # files whose generated blocks this module keeps current


def _acc(result) -> str:
    if result is None:
        return "-"
    lo, hi = result.accuracy_ci95
    return f"{100 * result.accuracy:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _device(record: RunRecord) -> str:
    fp = record.fingerprint
    return fp.get("gpu_name") or f"CPU: {fp.get('cpu_model')} ({fp.get('cpu_cores_logical')} threads)"


def runs_table(results: Path) -> str:
    """One row per run record under ``results/runs``."""
    rows = [
        "| record | device | backend | model | quantization | attention | train tokens/s | step median (IQR) "
        "| peak memory | accuracy before [95% CI] | accuracy after [95% CI] | questions |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted((results / "runs").glob("*.json")):
        r = load_record(path)
        if r.kind == "train":  # fine-tune-only records: in the scaling table
            continue
        tr, q = r.train, r.model["quantization"]
        quant = "bf16" if q["method"] == "none" else f"{q['quant_type']} b{q['blocksize']}"
        speed = peak = step = "-"
        if tr is not None:
            speed = f"{tr.tokens_per_s:,.0f}"
            step = f"{1000 * tr.step_time_s_median:.0f} ms ({1000 * tr.step_time_s_iqr:.0f})"
            peak = (f"{tr.peak_mem_gib:.1f} GiB" if tr.peak_mem_gib is not None
                    else f"host {tr.host_peak_rss_gib:.1f} GiB")
        n = (r.eval_after or r.eval_before).n_questions if (r.eval_after or r.eval_before) else "-"
        rows.append(
            f"| [{path.name[:16]}](results/runs/{path.name}) | {_device(r)} | {r.fingerprint.get('backend')} "
            f"| {r.model['name']} | {quant} | {r.attention['ran']} | {speed} | {step} | {peak} "
            f"| {_acc(r.eval_before)} | {_acc(r.eval_after)} | {n} |"
        )
    return "\n".join(rows)


def default_run_summary(results: Path) -> str:
    """The summary `medqa-parity run` printed for the newest committed run of the embedded default."""
    from medqa_core.cli import summary_lines

    paths = sorted((results / "runs").glob("*_run_tiny_cpu_*.json"))
    if not paths:
        return "(no committed run of the embedded default yet)"
    path = paths[-1]
    return "```text\n" + "\n".join(summary_lines(load_record(path), f"results/runs/{path.name}")) + "\n```"


def _bench_device(data: dict) -> str:
    fp = data["machine_info"].get("medqa_fingerprint", {})
    return fp.get("gpu_name") or f"CPU: {fp.get('cpu_model')} ({fp.get('cpu_cores_logical')} threads)"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _figure(e: dict) -> str:
    """The headline of one benchmark case, from its extra_info."""
    if "oom" in e:
        return f"out of memory ({e['oom'].get('message', '')[:60]})"
    if "tokens_per_s" in e:
        speedup = e.get("speedup_vs_reference")
        peak = e.get("peak_mem_gib")
        return (f"{e['tokens_per_s']:,.0f} real tokens/s, MFU {_pct(e.get('mfu'))}, step "
                f"{1000 * e['step_time_s_median']:.0f} ms, peak {f'{peak:.1f} GiB' if peak is not None else 'n/a'}, "
                f"batch {e.get('batch_size')}, checkpointing {e.get('gradient_checkpointing')}"
                + (f", **{speedup:.2f}x the reference**" if speedup else ""))
    if "decode_tokens_per_s" in e:
        return (f"{e['decode_tokens_per_s']:,.1f} tokens/s at batch {e.get('batch_size', 1)}, "
                f"{_pct(e.get('roofline_fraction'))} of roofline")
    if "prefill_tokens_per_s" in e:
        return f"{e['prefill_tokens_per_s']:,.0f} tokens/s, time to first token {1000 * e['ttft_s_median']:.0f} ms"
    if "questions_per_s" in e:
        return f"{e['questions_per_s']:,.1f} questions/s ({e.get('questions')} questions)"
    if "accuracy" in e:
        return f"accuracy {_pct(e['accuracy'])} on {len(e.get('predictions', ()))} questions"
    return "-"


def bench_table(results: Path, only: str = "") -> str:
    """One row per case (whose name starts with ``only``) of each pytest-benchmark file under ``results/bench``."""
    rows = ["| file | device | case | headline |", "|---|---|---|---|"]
    for path in sorted((results / "bench").glob("*/*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        for bench in data["benchmarks"]:
            if not bench["name"].startswith(only):
                continue
            link = f"[{path.name}](results/bench/{path.parent.name}/{path.name})"
            rows.append(f"| {link} | {_bench_device(data)} | `{bench['name']}` | {_figure(bench['extra_info'])} |")
    return "\n".join(rows)


def scaling_table(results: Path) -> str:
    """Data-parallel train records against the 1-GPU record of the same card and per-rank batch."""
    records = [(p, load_record(p)) for p in sorted((results / "runs").glob("*_train_*.json"))]
    gpu = [(p, r) for p, r in records if r.train is not None and r.fingerprint.get("gpu_name")]
    rows = ["| GPUs | device | global batch (per GPU) | tokens/s | per GPU | efficiency vs 1 GPU | all-reduce alone "
            "| peak memory | record |", "|---|---|---|---|---|---|---|---|---|"]
    for path, r in gpu:
        n, batch = r.train.world_size, r.config["train"]["batch_size"]
        ones = [o for _, o in gpu if o.train.world_size == 1 and o.fingerprint["gpu_name"] == r.fingerprint["gpu_name"]
                and o.config["train"]["batch_size"] == batch // n and o.fingerprint.get("hostname")
                == r.fingerprint.get("hostname")]
        eff = f"{r.train.tokens_per_s / (n * ones[-1].train.tokens_per_s):.1%}" if n > 1 and ones else "-"
        reduce_ms = f"{1000 * r.train.all_reduce_s:.1f} ms" if r.train.all_reduce_s else "-"
        rows.append(f"| {n} | {r.fingerprint['gpu_name']} | {batch} ({batch // n}) | {r.train.tokens_per_s:,.0f} "
                    f"| {r.train.tokens_per_s / n:,.0f} | {eff} | {reduce_ms} | {r.train.peak_mem_gib:.1f} GiB "
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


# MedQA train split: 10,178 questions; the public case study's 2 epochs.
TRAIN_SPLIT_QUESTIONS = 10_178
TEST_QUESTIONS = 1_273


def _latest_gpu_benches(results: Path) -> list[tuple[str, dict]]:
    """(``machine folder/file name``, data) of the newest bench file with training profiles, one per GPU model."""
    newest: dict[str, tuple[str, str, dict]] = {}
    for path in sorted((results / "bench").glob("*/*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        gpu = data["machine_info"].get("medqa_fingerprint", {}).get("gpu_name")
        if gpu and any(b["name"].startswith("test_train_profile") for b in data["benchmarks"]):
            found = (data.get("datetime", ""), f"{path.parent.name}/{path.name}", data)
            newest[gpu] = max(newest.get(gpu, found), found, key=lambda f: f[:2])
    return [(f, data) for _, f, data in sorted(newest.values(), key=lambda f: f[1])]


def performance_table(results: Path) -> str:
    """Issue targets against the newest GPU bench run of each card: each table's figures from one run."""
    runs = _latest_gpu_benches(results)
    if not runs:
        return "(no GPU bench run with training profiles yet)"
    return "\n\n".join(_performance_rows(f, data) for f, data in runs)


def _performance_rows(f: str, data: dict) -> str:
    """One run's table: ours beside the reference arm measured in the same run."""
    cases = {b["name"]: b for b in data["benchmarks"]}
    ours = [b["extra_info"] for n, b in cases.items() if n.startswith("test_train_ours") or
            n.startswith("test_train_profile")]
    ref = cases["test_train_reference"]["extra_info"]
    rows = [f"Run: [{f.split('/')[-1]}](results/bench/{f}), {_bench_device(data)}; the reference ran "
            f"{ref['tokens_per_s']:,.0f} real tokens/s at {ref['peak_mem_gib']:.1f} GiB in it.", "",
            "| target | measured | met |", "|---|---|---|"]
    for e in (e for e in ours if e.get("memory_cap_gib")):
        ratio = e["speedup_vs_reference"]
        rows.append(f"| memory-capped (`{e['profile']}`): peak <= {e['memory_cap_gib']:g} GiB and >= 2.5x the "
                    f"reference | {e['peak_mem_gib']:.1f} GiB, {e['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x "
                    f"(batch {e['batch_size']}, {e['checkpoint_layers']} of the layers recomputed) "
                    f"| {'yes' if e['within_memory_cap'] and ratio >= 2.5 else 'no'} |")
    e = max(ours, key=lambda e: e.get("mfu") or 0)
    met = "yes" if (e.get("mfu") or 0) >= 0.45 else "no"
    rows.append(f"| max-speed (`{e.get('profile', 'default')}`): MFU >= 45% | {_pct(e.get('mfu'))} at "
                f"{e['tokens_per_s']:,.0f} tokens/s ({e['speedup_vs_reference']:.2f}x the reference), batch "
                f"{e.get('batch_size')}, {e['peak_mem_gib']:.1f} GiB | {met} |")
    tokens = 2 * TRAIN_SPLIT_QUESTIONS * e["tokens_per_step"] / e["batch_size"]  # real lengths of the batch
    minutes = tokens / e["tokens_per_s"] / 60
    rows.append(f"| 2 epochs of the train split in <= 10 min | {minutes:.1f} min: {tokens / 1e6:.2f} M tokens "
                f"(2 x 10,178 questions at this batch's mean real length) / {e['tokens_per_s']:,.0f} tokens/s "
                f"(computed, not a run of the train split) | {'yes' if minutes <= 10 else 'no'} |")
    for b in (b for n, b in cases.items() if n.startswith("test_scoring")):
        e, round_s = b["extra_info"], b["stats"]["median"]  # a round also tokenizes the questions
        n = e.get("questions")
        met = ("yes" if round_s <= 20 else "no") if n == TEST_QUESTIONS else f"not measured: {n} questions scored"
        rows.append(f"| scoring 1,273 test questions in <= 20 s | {round_s:.1f} s a round for {n} questions, "
                    f"tokenization included ({n / e['questions_per_s']:.1f} s of model time, "
                    f"{e['questions_per_s']:.1f} questions/s, 4-bit 7B) | {met} |")
    return "\n".join(rows)


def _decode_path(e: dict) -> str:
    """How a compiled-decode case ran, in words (older files ran the compiled step inside ``generate``)."""
    if e.get("decode_loop"):
        return f"`{e['decode_loop']}`, {e.get('graph')}"
    mode = e.get("compile_mode_ran") or e.get("compile_mode")
    return f"`generate`, forward compiled ({mode})" + (", guard checks skipped" if e.get("guards_skipped") else "")


def decode_table(results: Path) -> str:
    """Eager ``generate`` beside the compiled decode path, per batch size, from each bench file that ran both."""
    rows = ["| file | device | batch | compiled path | eager `generate` | compiled | speed-up | first call (compile) "
            "| joules/token eager, compiled |", "|---|---|---|---|---|---|---|---|---|"]
    for path in sorted((results / "bench").glob("*/*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        cases = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
        for name, compiled in cases.items():
            eager = cases.get(name.replace("test_decode_compiled", "test_decode_eager"))
            if not (name.startswith("test_decode_compiled") and eager and eager.get("decode_tokens_per_s")
                    and compiled.get("decode_tokens_per_s")):
                continue
            first = compiled.get("first_call_s") or compiled.get("first_generate_s")
            joules = [e.get("joules_per_token") for e in (eager, compiled)]
            rows.append(
                f"| [{path.name}](results/bench/{path.parent.name}/{path.name}) | {_bench_device(data)} "
                f"| {compiled.get('batch_size', 1)} | {_decode_path(compiled)} "
                f"| {eager['decode_tokens_per_s']:,.1f} tokens/s ({_pct(eager.get('roofline_fraction'))} of roofline) "
                f"| {compiled['decode_tokens_per_s']:,.1f} tokens/s ({_pct(compiled.get('roofline_fraction'))}) "
                f"| {compiled['decode_tokens_per_s'] / eager['decode_tokens_per_s']:.1f}x "
                f"| {f'{first:.0f} s' if first else '-'} "
                f"| {', '.join(f'{j:.2f} J' if isinstance(j, float) else '-' for j in joules)} |")
    return "\n".join(rows)


def _ms(x: float) -> str:
    return f"{x:,.0f}"


def profile_table(path: Path) -> str:
    """One row per profiled configuration of a ``medqa-parity profile`` file: where a step's time goes."""
    data = json.loads(path.read_text(encoding="utf-8"))
    fp = data["meta"]["fingerprint"]
    categories = sorted({c for p in data["profiles"].values() for c in p["categories"]})
    rows = [f"[{path.name}](results/profile/{path.name}): {fp.get('gpu_name') or fp.get('cpu_model')}, "
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


def profile_tables(results: Path) -> str:
    """Every committed profile file, oldest first."""
    paths = sorted((results / "profile").glob("*.json"))
    return "\n\n".join(profile_table(p) for p in paths) if paths else "(no profile yet)"


def _range(values: list[float]) -> str:
    return f"{min(values):+.1f}..{max(values):+.1f}%" if values else "-"


def gate_noise_table(folder: Path, baseline: Path) -> str:
    """How unchanged builds' bench files move: each run against ``baseline`` and against each other run.

    Every figure is the gate's own change (candidate vs baseline, percent) under loose thresholds, so
    the table shows the noise the CI thresholds of ``.ci/gate.toml`` have to tolerate; the last line
    says how many of the runs those thresholds pass.
    """
    from medqa_core.gate import gate_cases, load_cases, load_thresholds, machine_drift, machine_text

    loose = load_thresholds(None, ["speed_pct=99.9", "memory_pct=100000"], start=ROOT)
    ci = load_thresholds(ROOT / ".ci" / "gate.toml", [])
    base = load_cases(baseline)
    runs = {p.name: load_cases(p) for p in sorted(folder.glob("*.json"))}

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
    for folder in sorted(p for p in (results / "gate-noise").glob("*") if p.is_dir()):
        (baseline,) = (results / "bench").glob(f"*/{folder.name}.json")
        tables.append(gate_noise_table(folder, baseline))
    return "\n\n".join(tables) if tables else "(no noise runs committed)"


GENERATORS: dict[str, Callable[[Path], str]] = {
    "train-cases": lambda results: bench_table(results, only="test_train"),
    "verdict": report_verdict, "performance": performance_table, "profiles": profile_tables,
    "gate-noise": gate_noise_tables,
    "runs": runs_table, "default-run": default_run_summary, "bench": bench_table, "scaling": scaling_table,
    "decode": decode_table,
}


def render(readme: str, results: Path) -> str:
    """README text with every generated block replaced by fresh output."""
    for name, generate in GENERATORS.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        block = f"{start}\n{generate(results)}\n{end}"
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, block=block: block, readme, flags=re.S)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a document is out of date")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    parser.add_argument("documents", nargs="*", type=Path, default=[ROOT / name for name in DOCUMENTS])
    args = parser.parse_args(argv)
    stale = []
    for doc in args.documents:
        old = doc.read_text(encoding="utf-8")
        new = render(old, args.results)
        if new == old:
            continue
        stale.append(doc)
        if not args.check:
            doc.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(f"out of date: {', '.join(map(str, stale))}; run python -m medqa_core.readme", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
