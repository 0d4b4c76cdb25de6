"""README figures, generated from the result files under results/ (never typed by hand).

``python -m medqa_core.readme`` rewrites each block between ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->`` in README.md; ``--check`` exits 1 when README is out of date.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from medqa_core.record import RunRecord, load_record

ROOT = Path(__file__).resolve().parent.parent


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


GENERATORS: dict[str, Callable[[Path], str]] = {"runs": runs_table, "default-run": default_run_summary}


def render(readme: str, results: Path) -> str:
    """README text with every generated block replaced by fresh output."""
    for name, generate in GENERATORS.items():
        start, end = f"<!-- generated:{name} -->", f"<!-- /generated:{name} -->"
        block = f"{start}\n{generate(results)}\n{end}"
        readme = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _, block=block: block, readme, flags=re.S)
    return readme


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if README.md is out of date")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--results", type=Path, default=ROOT / "results")
    args = parser.parse_args(argv)
    old = args.readme.read_text(encoding="utf-8")
    new = render(old, args.results)
    if args.check:
        if new != old:
            print(f"{args.readme} is out of date: run python -m medqa_core.readme", file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
