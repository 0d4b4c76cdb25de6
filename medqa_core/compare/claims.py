"""Published claims as data: a CLAIM.toml read, and judged line by line against run sets.

``medqa-parity check CLAIM.toml RUNSET...`` answers each line of a claim (model, method, hardware, software,
dataset, epochs, wall time, accuracy, parity) with one of:

- holds: the run sets show it (the same setting ran, or the figure lies within what the sets measured);
- contradicted: the run sets (or the claim's own cited source) show otherwise;
- not checkable here: with why (no such hardware among the sets, random weights, another dataset or model).

The claim's format (every table and key optional except ``[claim] title``; see claims/*.toml)::

    [claim]       title, source (where it was read), attributed_to (another claim file: its cited source)
    [model]       name ("Mistral-7B"), family ("mistral"), parameters_b, pretrained (true: published weights)
    [method]      fine_tune ("qlora", "lora"), quant ("nf4", "none"), dtype ("bf16", "fp16"), attention
    [hardware]    gpu ("AMD Instinct MI250"), count, backend ("rocm", "cuda")
    [software]    rocm ("5.7"), cuda, torch
    [dataset]     name ("MedQA", "MedMCQA"), split
    [training]    epochs, wall_time_h
    [result]      accuracy_pct, parity_margin_pp, parity_vs ("cuda")

Pure: TOML and run-set files in, findings out (no torch).
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medqa_core.compare.inputs import device_label
from medqa_core.compare.runsets import (
    DEFAULT_ALPHA,
    DEFAULT_LOSS_MARGIN_NATS,
    DIFFERS,
    EQUIVALENT,
    MIN_RUNS,
    SetSummary,
    compare_sets,
    prediction_bound,
    summarize_loaded,
)
from medqa_core.results.runset import LoadedRun, RunSet, load_runset

HOLDS, CONTRADICTED, NOT_CHECKABLE = "holds", "contradicted", "not checkable here"
EXIT_HOLDS, EXIT_CONTRADICTED, EXIT_BAD_INPUT, EXIT_NOTHING_CHECKABLE = 0, 1, 2, 4

# Each table's keys and their types: a claim with another key or type is refused, naming file and key.
SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "claim": {"title": str, "source": str, "attributed_to": str, "note": str},
    "model": {"name": str, "family": str, "parameters_b": (int, float), "pretrained": bool},
    "method": {"fine_tune": str, "quant": str, "dtype": str, "attention": str},
    "hardware": {"gpu": str, "count": int, "backend": str},
    "software": {"rocm": str, "cuda": str, "torch": str},
    "dataset": {"name": str, "split": str},
    "training": {"epochs": (int, float), "wall_time_h": (int, float)},
    "result": {"accuracy_pct": (int, float), "parity_margin_pp": (int, float), "parity_vs": str},
}
SUITE_DATASET = "MedQA"  # what this suite fine-tunes and scores (USMLE 4-option, lm-evaluation-harness medqa_4options)
SUITE_FAMILY = "mistral"  # the architecture the presets and the loader are written for


class ClaimError(ValueError):
    """A claim file cannot be read: bad TOML, an unknown key, a value of the wrong type."""


@dataclass(frozen=True)
class Claim:
    """A claim file's tables (``SCHEMA``), as read."""

    path: str
    tables: dict[str, dict[str, Any]]

    def get(self, table: str, key: str) -> Any:
        return self.tables.get(table, {}).get(key)

    @property
    def title(self) -> str:
        return str(self.get("claim", "title"))


def load_claim(path: str | Path) -> Claim:
    """Read and validate a claim file.

    Raises:
        ClaimError: one line naming the file and the key (or TOML's line and column).
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ClaimError(f"{path}: cannot read ({e.strerror})") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ClaimError(f"{path}: not TOML ({e})") from e
    for table, values in data.items():
        if table not in SCHEMA:
            raise ClaimError(f"{path}: [{table}]: unknown table; expected one of {', '.join(SCHEMA)}")
        if not isinstance(values, dict):
            raise ClaimError(f"{path}: {table}: expected a table [{table}], got a {type(values).__name__}")
        for key, value in values.items():
            kind = SCHEMA[table].get(key)
            if kind is None:
                raise ClaimError(f"{path}: [{table}] {key}: unknown key; expected one of "
                                 f"{', '.join(SCHEMA[table])}")
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                want = kind.__name__ if isinstance(kind, type) else "a number"
                raise ClaimError(f"{path}: [{table}] {key}: expected {want}, got {value!r}")
    if not data.get("claim", {}).get("title"):
        raise ClaimError(f"{path}: [claim] title: missing; every claim names what it claims")
    return Claim(str(path), data)


@dataclass(frozen=True)
class ClaimLine:
    """One line of a claim, judged: what it says, the status, why."""

    item: str
    claimed: str
    status: str
    why: str


@dataclass(frozen=True)
class LoadedSet:
    """A run set given to ``check``: the file, its content, its runs and summary."""

    path: str
    runset: RunSet
    runs: tuple[LoadedRun, ...]
    summary: SetSummary

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.runset.fingerprint

    @property
    def model(self) -> dict[str, Any]:
        return self.runset.config.get("model", {})

    @property
    def device(self) -> str:
        return device_label(self.fingerprint)

    @property
    def backend(self) -> str:
        return str(self.fingerprint.get("backend", "unknown"))

    @property
    def what(self) -> str:
        return f"{Path(self.path).name} ({self.device}, {self.backend})"


def load_sets(paths: Sequence[str | Path]) -> list[LoadedSet]:
    """Read run-set files for ``check`` (RunSetError names a bad one)."""
    out = []
    for p in paths:
        runset, runs = load_runset(p)
        out.append(LoadedSet(str(p), runset, runs, summarize_loaded(runs, runset.target_loss_nats, Path(p).name)))
    return out


def _norm(text: Any) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


def _random_weights(s: LoadedSet) -> bool:
    return not s.model.get("path")


def _sets_text(sets: Sequence[LoadedSet]) -> str:
    return "; ".join(s.what for s in sets) or "no run set given"


def _matching_hardware(claim: Claim, sets: Sequence[LoadedSet]) -> list[LoadedSet]:
    gpu = claim.get("hardware", "gpu")
    if not gpu:
        return list(sets)
    # "AMD Instinct MI250" matches a device named "AMD Instinct MI250X / MI250": the model number decides.
    key = _norm(str(gpu).split()[-1])
    return [s for s in sets if key and key in _norm(s.device)]


def _model_line(claim: Claim, sets: Sequence[LoadedSet]) -> ClaimLine | None:
    name, family = claim.get("model", "name"), claim.get("model", "family")
    if not name:
        return None
    claimed = f"{name}{' (pretrained weights)' if claim.get('model', 'pretrained') else ''}"
    if family and _norm(family) != SUITE_FAMILY:
        return ClaimLine("model", claimed, NOT_CHECKABLE, f"another model: this suite runs the {SUITE_FAMILY} "
                         f"architecture only, the claim a {family} model")
    if not sets:
        return ClaimLine("model", claimed, NOT_CHECKABLE, "no run set given")
    named = [s for s in sets if s.model.get("path") and _norm(name) in _norm(Path(s.model["path"]).name)]
    if named:
        return ClaimLine("model", claimed, HOLDS, f"{', '.join(s.what for s in named)} fine-tuned a model folder "
                         f"named {Path(named[0].model['path']).name}")
    presets = sorted({str(s.model.get("preset")) for s in sets if _random_weights(s)})
    if presets:
        return ClaimLine("model", claimed, NOT_CHECKABLE, f"random weights: the sets ran the {', '.join(presets)} "
                         "preset (the architecture's shape, seeded random weights), not the published model")
    return ClaimLine("model", claimed, NOT_CHECKABLE, f"another model: the sets ran {_sets_text(sets)}")


def _method_line(claim: Claim, sets: Sequence[LoadedSet]) -> ClaimLine | None:
    fine_tune, quant, dtype = (claim.get("method", k) for k in ("fine_tune", "quant", "dtype"))
    if not (fine_tune or quant or dtype):
        return None
    claimed = ", ".join(str(x) for x in (fine_tune, f"quant {quant}" if quant else None,
                                           f"{dtype} compute" if dtype else None) if x)
    if not sets:
        return ClaimLine("method", claimed, NOT_CHECKABLE, "no run set given")
    ran = []
    for s in sets:
        numerics = s.runs[0].record.numerics or {}
        compute = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(numerics.get("compute_dtype"), "?")
        ran.append((s, str(s.model.get("quant")), compute))
    want_quant = quant or ("nf4" if fine_tune and _norm(fine_tune) == "qlora" else None)
    same = [s for s, q, c in ran if (want_quant is None or q == want_quant) and (dtype is None or c == dtype)]
    if same:
        return ClaimLine("method", claimed, HOLDS, f"the same method ran in {', '.join(s.what for s in same)}")
    settings = "; ".join(f"{s.what}: quant {q}, {c} compute" for s, q, c in ran)
    return ClaimLine("method", claimed, NOT_CHECKABLE, f"another method ran ({settings}); the suite runs it with "
                     f"--quant {want_quant or 'none'}{' --dtype ' + dtype if dtype else ''}")


def _hardware_lines(claim: Claim, sets: Sequence[LoadedSet]) -> list[ClaimLine]:
    gpu, backend = claim.get("hardware", "gpu"), claim.get("hardware", "backend")
    lines = []
    if gpu:
        count = claim.get("hardware", "count")
        claimed = f"{count or 1} x {gpu}{f' ({backend})' if backend else ''}"
        match = _matching_hardware(claim, sets)
        if match:
            lines.append(ClaimLine("hardware", claimed, HOLDS, f"{', '.join(s.what for s in match)} ran on it"))
        else:
            lines.append(ClaimLine("hardware", claimed, NOT_CHECKABLE,
                                   f"no such hardware among the run sets ({_sets_text(sets)})"))
    for key, field in (("rocm", "torch_hip"), ("cuda", "torch_cuda")):
        version = claim.get("software", key)
        if not version:
            continue
        ran = [s for s in _matching_hardware(claim, sets) if s.fingerprint.get(field)]
        claimed = f"{key.upper() if key == 'cuda' else 'ROCm'} {version}"
        if not ran:
            lines.append(ClaimLine("software", claimed, NOT_CHECKABLE,
                                   f"no run set on the claim's hardware with {key} ({_sets_text(sets)})"))
            continue
        same = [s for s in ran if str(s.fingerprint[field]).startswith(str(version))]
        status = HOLDS if same else NOT_CHECKABLE
        why = ("ran with it" if same else f"ran with {key} {ran[0].fingerprint[field]}, not {version}")
        lines.append(ClaimLine("software", claimed, status, f"{', '.join(s.what for s in (same or ran))} {why}"))
    attention = claim.get("method", "attention")
    if attention:
        ran = [s for s in sets if any(_norm(attention) in _norm(r.record.attention.get("requested", ""))
                                      for r in s.runs)]
        kernels = ", ".join(sorted({str(s.model.get("attn")) for s in sets})) or "none"
        lines.append(ClaimLine("attention", str(attention), HOLDS if ran else NOT_CHECKABLE,
                               f"{', '.join(s.what for s in ran)} ran it" if ran else
                               f"no run set ran it (the sets ran {kernels}; the suite runs it with --attn "
                               f"{attention})"))
    return lines


def _dataset_line(claim: Claim, sets: Sequence[LoadedSet]) -> ClaimLine | None:
    name = claim.get("dataset", "name")
    if not name:
        return None
    if _norm(name) != _norm(SUITE_DATASET):
        return ClaimLine("dataset", str(name), NOT_CHECKABLE,
                         f"another dataset: this suite fine-tunes and scores {SUITE_DATASET} (USMLE, 4 options) only")
    if not sets:
        return ClaimLine("dataset", str(name), NOT_CHECKABLE, "no run set given")
    bundled = [s for s in sets if not s.runset.config.get("data", {}).get("data_dir")]
    why = f"{SUITE_DATASET} in {', '.join(s.what for s in sets)}"
    if bundled:
        why += (f" ({', '.join(s.what for s in bundled)}: the bundled subset, not the full splits: "
                "give --data DIR for those)")
    return ClaimLine("dataset", str(name), HOLDS, why)


def _epochs_line(claim: Claim, sets: Sequence[LoadedSet]) -> ClaimLine | None:
    epochs = claim.get("training", "epochs")
    if epochs is None:
        return None
    if not sets:
        return ClaimLine("epochs", f"{epochs:g}", NOT_CHECKABLE, "no run set given")
    ran = [(s, s.runs[0].record.train.epochs if s.runs[0].record.train else math.nan) for s in sets]
    same = [s for s, e in ran if math.isclose(e, epochs, rel_tol=0.02)]
    if same:
        return ClaimLine("epochs", f"{epochs:g}", HOLDS, f"{', '.join(s.what for s in same)} trained {epochs:g} "
                         "epochs (of its train split)")
    return ClaimLine("epochs", f"{epochs:g}", NOT_CHECKABLE,
                     "the sets trained " + ", ".join(f"{e:.3g} epochs ({s.what})" for s, e in ran))


def _comparable_for_figures(claim: Claim, sets: Sequence[LoadedSet]) -> tuple[list[LoadedSet], str]:
    """The sets whose figures can stand against the claim's (same hardware, pretrained weights, the dataset)."""
    if claim.get("dataset", "name") and _norm(claim.get("dataset", "name")) != _norm(SUITE_DATASET):
        return [], f"another dataset ({claim.get('dataset', 'name')})"
    if claim.get("model", "family") and _norm(claim.get("model", "family")) != SUITE_FAMILY:
        return [], f"another model ({claim.get('model', 'name')})"
    if not sets:
        return [], "no run set given"
    pretrained = [s for s in sets if not _random_weights(s)]
    if not pretrained:
        return [], "random weights: the sets' accuracy measures the pipeline, not medical knowledge"
    name = claim.get("model", "name")
    same = [s for s in pretrained if not name or _norm(name) in _norm(Path(str(s.model["path"])).name)]
    if not same:
        names = ", ".join(Path(str(s.model["path"])).name for s in pretrained)
        return [], f"another model: the sets fine-tuned {names}"
    return same, ""


def _wall_time_line(claim: Claim, sets: Sequence[LoadedSet]) -> ClaimLine | None:
    hours = claim.get("training", "wall_time_h")
    if hours is None:
        return None
    claimed = f"about {hours:g} h" if hours >= 1 else f"about {60 * hours:.0f} min"
    on_hw = _matching_hardware(claim, sets) if claim.get("hardware", "gpu") else []
    if not on_hw:
        return ClaimLine("wall time", claimed, NOT_CHECKABLE, f"no such hardware among the run sets "
                         f"({_sets_text(sets)}): time depends on it")
    usable, why = _comparable_for_figures(claim, on_hw)
    if not usable and "random weights" not in why:
        return ClaimLine("wall time", claimed, NOT_CHECKABLE, why)
    times = [r.record.wall_time_s for s in on_hw for r in s.runs if r.entry.role == "seed" and r.record.wall_time_s]
    if not times:
        return ClaimLine("wall time", claimed, NOT_CHECKABLE, "the runs recorded no wall time")
    low, high = min(times) / 3600, max(times) / 3600
    # "About" a time: within a factor of 1.5 either way holds; beyond a factor of 2 contradicts.
    if hours / 1.5 <= high and low <= hours * 1.5:
        return ClaimLine("wall time", claimed, HOLDS, f"the runs took {low:.2f}-{high:.2f} h")
    if high < hours / 2 or low > hours * 2:
        return ClaimLine("wall time", claimed, CONTRADICTED, f"the runs took {low:.2f}-{high:.2f} h, over a factor "
                         "of 2 away")
    return ClaimLine("wall time", claimed, NOT_CHECKABLE, f"the runs took {low:.2f}-{high:.2f} h: between a factor "
                     "of 1.5 and 2 away, neither about the claim nor clearly not")


def _accuracy_line(claim: Claim, sets: Sequence[LoadedSet], alpha: float) -> ClaimLine | None:
    pct = claim.get("result", "accuracy_pct")
    if pct is None:
        return None
    claimed = f"{pct:g}%"
    usable, why = _comparable_for_figures(claim, sets)
    if not usable:
        return ClaimLine("accuracy", claimed, NOT_CHECKABLE, why)
    s = usable[0]
    acc = s.summary.accuracy
    low, high = prediction_bound(acc, alpha / 2), prediction_bound(acc, alpha / 2, higher_is_better=False)
    if acc.n < MIN_RUNS or not math.isfinite(low):
        return ClaimLine("accuracy", claimed, NOT_CHECKABLE, f"{s.what}: {acc.n} seed runs; a spread to judge a "
                         f"figure by needs {MIN_RUNS} or more")
    inside = 100 * low <= pct <= 100 * high
    return ClaimLine("accuracy", claimed, HOLDS if inside else CONTRADICTED,
                     f"{s.what}: {acc.n} seeds, mean {100 * acc.mean:.2f}%, sd {100 * acc.sd:.2f} pp; a run's "
                     f"{100 * (1 - alpha):g}% prediction interval {100 * low:.2f}-{100 * high:.2f}% "
                     f"{'holds' if inside else 'excludes'} {pct:g}%")


def _parity_line(claim: Claim, sets: Sequence[LoadedSet], alpha: float) -> ClaimLine | None:
    margin, versus = claim.get("result", "parity_margin_pp"), claim.get("result", "parity_vs") or "cuda"
    if margin is None:
        return None
    claimed = f"accuracy within {margin:g} pp of {versus}"
    on_hw = _matching_hardware(claim, sets)
    claimed_backend = claim.get("hardware", "backend")
    subjects = [s for s in on_hw if claimed_backend is None or s.backend == claimed_backend]
    references = [s for s in sets if s.backend == versus and s not in subjects]
    if not subjects or not references:
        missing = "the claim's hardware" if not subjects else f"a {versus} set"
        context = ""
        spreads = [s for s in sets if s.summary.accuracy.n >= 2]
        if spreads:
            context = "; for scale, one machine against itself: " + ", ".join(
                f"{s.what} seed sd {100 * s.summary.accuracy.sd:.2f} pp" for s in spreads)
        return ClaimLine("parity", claimed, NOT_CHECKABLE, f"no run set on {missing} ({_sets_text(sets)}){context}")
    comparison = compare_sets(references[0].summary, subjects[0].summary, float(margin), DEFAULT_LOSS_MARGIN_NATS,
                              alpha)
    effect = comparison.effects[0]
    status = {EQUIVALENT: HOLDS, DIFFERS: CONTRADICTED}.get(effect.status, NOT_CHECKABLE)
    if effect.status == DIFFERS and abs(effect.diff) < margin:
        status = HOLDS  # a detectable shift, still under the claimed margin: the claim says "under", and it is
    return ClaimLine("parity", claimed, status, f"{subjects[0].what} vs {references[0].what}: {effect.status}: "
                     f"{effect.why}")


def _attribution_lines(claim: Claim) -> list[ClaimLine]:
    """Each field the claim shares with the source it is attributed to, compared: a repeated claim whose cited
    source says otherwise is contradicted by that source."""
    target = claim.get("claim", "attributed_to")
    if not target:
        return []
    path = Path(claim.path).parent / target
    source = load_claim(path)
    lines = []
    for table, keys in SCHEMA.items():
        if table == "claim":
            continue
        for key in keys:
            ours, theirs = claim.get(table, key), source.get(table, key)
            if ours is None:
                continue
            item = f"source: {table}.{key}"
            if theirs is None:
                lines.append(ClaimLine(item, str(ours), NOT_CHECKABLE, f"the cited source ({path.name}) does not "
                                       "say"))
            elif _norm(ours) == _norm(theirs) or (isinstance(ours, int | float) and isinstance(theirs, int | float)
                                                  and math.isclose(ours, theirs, rel_tol=0.05)):
                lines.append(ClaimLine(item, str(ours), HOLDS, f"the cited source ({path.name}) says so"))
            else:
                lines.append(ClaimLine(item, str(ours), CONTRADICTED, f"the cited source ({path.name}) says "
                                       f"{theirs!r}"))
    return lines


def check_claim(claim: Claim, sets: Sequence[LoadedSet], alpha: float = DEFAULT_ALPHA) -> list[ClaimLine]:
    """Every line of ``claim`` judged against ``sets`` (and against its cited source, where it names one).

    Raises:
        ClaimError: the cited source cannot be read.
    """
    lines = [_model_line(claim, sets), _method_line(claim, sets), *_hardware_lines(claim, sets),
             _dataset_line(claim, sets), _epochs_line(claim, sets), _wall_time_line(claim, sets),
             _accuracy_line(claim, sets, alpha), _parity_line(claim, sets, alpha)]
    return [line for line in lines if line is not None] + _attribution_lines(claim)


def exit_code(lines: Sequence[ClaimLine]) -> int:
    """1 when a line is contradicted, else 4 when no line could be checked, else 0."""
    if any(line.status == CONTRADICTED for line in lines):
        return EXIT_CONTRADICTED
    if not any(line.status == HOLDS for line in lines):
        return EXIT_NOTHING_CHECKABLE
    return EXIT_HOLDS


def render_lines(claim: Claim, lines: Sequence[ClaimLine]) -> list[str]:
    """The check as ``medqa-parity check`` prints it: a head, one line per claim line, a count."""
    out = [f"claim: {claim.title} ({claim.path})"]
    width = max((len(line.item) for line in lines), default=0)
    for line in lines:
        out.append(f"  {line.status.upper():<18} {line.item:<{width}}  {line.claimed}: {line.why}")
    counts = {s: sum(line.status == s for line in lines) for s in (HOLDS, CONTRADICTED, NOT_CHECKABLE)}
    out.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return out
