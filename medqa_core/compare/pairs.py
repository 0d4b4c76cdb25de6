"""Pairwise comparison of two runs: can they be compared, and what differs (scores, loss, settings).

Both outputs stand on this: the report compares every run with its baseline, the gate each case
with the baseline's case of the same name. Pure functions of summaries (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from medqa_core.compare.inputs import BASE, FINE_TUNED, CompareError, RunSummary
from medqa_core.compare.parity import PairParity, ParityError, PhaseParity, Tolerances, compare_phase, loss_drift

# Not settings: the library version (shown in fingerprints) and bitsandbytes' CPU-only inference
# repacking, which medqa-parity always keeps off (model.keep_trainable_cpu_format). The compute dtype is
# compared as a setting of the run (RunSummary.settings), for every quantization.
_QUANT_IGNORED = ("bitsandbytes_version", "cpu_packed_inference", "compute_dtype")
# RunSummary.settings compared beside the quantization dict, with the name a difference is given.
_SETTINGS = {"compute_dtype": "compute dtype", "eval_packing": "eval packing", "fp8": "fp8 base matmuls"}


def check_comparable(a: RunSummary, b: RunSummary) -> None:
    """Refuse two runs of different models.

    Args:
        a: one run (the baseline).
        b: another.

    Raises:
        CompareError: different model names, base parameter counts or preset seeds; names both files.
    """
    where = f"{b.path} ({b.label}) vs {a.path} ({a.label})"
    if None not in (a.model_name, b.model_name) and a.model_name != b.model_name:
        raise CompareError(f"{where}: different models, {b.model_name!r} vs {a.model_name!r}; compare runs of one "
                           "model (same --preset or --model)")
    if None not in (a.base_parameters, b.base_parameters) and a.base_parameters != b.base_parameters:
        raise CompareError(f"{where}: different model shapes, {b.base_parameters:,} vs {a.base_parameters:,} base "
                           "parameters")
    if None not in (a.seed, b.seed) and a.seed != b.seed:
        raise CompareError(f"{where}: different model weights, preset seed {b.seed} vs {a.seed}")


def quantization_differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> tuple[str, ...]:
    """Settings that differ between two runs' quantization dicts (versions are not settings).

    Args:
        a: run A's quantization (record.model["quantization"] or a bench case's quantization).
        b: run B's.

    Returns:
        One ``"key: A vs B"`` string per differing setting, sorted by key; empty when they match.
    """
    if "none" in (a.get("method"), b.get("method")) and a.get("method") != b.get("method"):
        # Quantized against not: that is the difference; the other's block sizes and types do not exist.
        return (f"method: {a.get('method')} vs {b.get('method')}",)
    keys = sorted((a.keys() | b.keys()) - set(_QUANT_IGNORED))
    missing = "(not recorded)"
    return tuple(f"{k}: {a.get(k, missing)} vs {b.get(k, missing)}" for k in keys if a.get(k) != b.get(k))


def settings_differences(a: RunSummary, b: RunSummary) -> tuple[str, ...]:
    """Settings that move the numbers and differ: compute dtype, eval packing, fp8 base matmuls, NF4 settings.

    A setting one side did not record (a bench file's eval packing) is not compared; a case that ran
    out of memory before loading its model recorded no quantization, and none is compared.

    Args:
        a: run A.
        b: run B.

    Returns:
        ``"field: A vs B"`` strings, compute dtype and eval packing first, then quantization by key.
    """
    out = [f"{name}: {a.settings[k]} vs {b.settings[k]}" for k, name in _SETTINGS.items()
           if a.settings.get(k) is not None and b.settings.get(k) is not None and a.settings[k] != b.settings[k]]
    if a.quantization and b.quantization:
        out += quantization_differences(a.quantization, b.quantization)
    return tuple(out)


def same_adapter(adapter_a: str | None, adapter_b: str | None) -> bool:
    """Whether two records name the same saved adapter.

    The folder's last component is compared: an adapter copied to another machine keeps its
    timestamped name (runs/adapters/<UTC time>) but not its parent path.

    Args:
        adapter_a: run A's adapter_dir.
        adapter_b: run B's.

    Returns:
        True when both are set and their last path components are equal.
    """
    if not adapter_a or not adapter_b:
        return False
    return PurePath(adapter_a.rstrip("/\\")).name == PurePath(adapter_b.rstrip("/\\")).name


def same_base_weights(a: RunSummary, b: RunSummary) -> bool:
    """Whether two runs scored the same base weights: not where one quantized them and the other did not, or
    where they quantized to other types (NF4 against FP4). Other NF4 block sizes or compute dtypes are settings
    of the same weights (:func:`settings_differences` names them); a run that recorded no quantization is
    taken at its word.

    Args:
        a: run A.
        b: run B.

    Returns:
        False where both recorded a quantization and its method or type differ.
    """
    if not a.quantization or not b.quantization:
        return True
    return all(a.quantization.get(k) == b.quantization.get(k) for k in ("method", "quant_type"))


def compare_runs(a: RunSummary, b: RunSummary, tol: Tolerances) -> PairParity:
    """Compare run B with run A: each phase both scored, loss curves, settings.

    Args:
        a: the reference of the pair (the baseline, or the run that trained an adapter).
        b: the other run.
        tol: margin, KL tolerance, alpha.

    Returns:
        The comparison.

    Raises:
        CompareError: different models, or different questions in a phase both scored.
    """
    check_comparable(a, b)
    phases: list[PhaseParity] = []
    for phase in (BASE, FINE_TUNED):
        pa, pb = a.phases.get(phase), b.phases.get(phase)
        if pa is None or pb is None or not pa.questions or not pb.questions:
            continue
        same = same_base_weights(a, b) and (phase == BASE or same_adapter(a.adapter_dir, b.adapter_dir))
        try:
            phases.append(compare_phase(phase, pa.questions, pb.questions, same, tol))
        except ParityError as e:
            raise CompareError(f"{b.path} ({b.label}) vs {a.path} ({a.label}), {phase} scores: {e}") from e
    loss = loss_drift(a.loss_per_step, b.loss_per_step) if a.loss_per_step and b.loss_per_step else None
    same_hardware = (a.backend, a.device) == (b.backend, b.device)
    return PairParity(a.rid, b.rid, tuple(phases), loss, settings_differences(a, b), same_hardware)


def adapter_trainers(runs: Sequence[RunSummary]) -> list[tuple[RunSummary, RunSummary]]:
    """(trainer, scorer) for each evaluate record that scored an adapter a run among the inputs trained.

    Args:
        runs: all runs.

    Returns:
        Pairs in input order.
    """
    trainers = [r for r in runs if r.kind in ("run", "train") and r.adapter_dir]
    scorers = [r for r in runs if r.kind == "evaluate" and r.adapter_dir]
    return [(t, s) for s in scorers for t in trainers if same_adapter(t.adapter_dir, s.adapter_dir)]
