"""The lines a run prints when it finishes, read from its saved record (never from live state).

``medqa-parity run`` prints them; the docs generator prints the same lines for the newest committed
record of the default run. No torch here.
"""

from __future__ import annotations

from typing import Any

from medqa_core.compare.inputs import device_label, record_settings
from medqa_core.results.record import EvalResult, RunRecord, TrainResult


def _accuracy(result: EvalResult | None) -> str:
    if result is None:
        return "-"
    lo, hi = result.accuracy_ci95
    return f"{100 * result.accuracy:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}, n={result.n_questions})"


Row = tuple[str, Any]


def summary_lines(record: RunRecord, path: Any) -> list[str]:
    """The table printed after a run; every figure is read from the saved record.

    Args:
        record: the saved record.
        path: where it was saved (printed as given).

    Returns:
        Lines, "name  value", then the record's notes.
    """
    rows = _setup_rows(record) + _train_rows(record) + _accuracy_rows(record) + _output_rows(record, path)
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in record.notes]
    return lines


def _setup_rows(record: RunRecord) -> list[Row]:
    """Where and what ran: backend, device, model, quantization, dtype, attention kernel."""
    fp = record.fingerprint
    q = record.model["quantization"]
    dtype = record_settings(record)["compute_dtype"]
    quant = f"none ({dtype})" if q["method"] == "none" else (
        f"{q['quant_type']} blocksize {q['blocksize']}, double quant {q['double_quant']}, compute {q['compute_dtype']}")
    # Trainable parameters exist where the job trained; a scoring job (evaluate) trains none.
    trained = "" if record.kind == "evaluate" else f", {record.model['trainable_parameters'] / 1e6:.2f}M trainable"
    return [
        ("backend", fp.get("backend")),
        ("device", device_label(fp)),
        ("model", f"{record.model['name']} ({record.model['parameters'] / 1e6:.1f}M params{trained})"),
        ("quantization", quant),
        ("compute dtype", f"{dtype}" + (f" ({record.numerics['reason']})" if record.numerics else
                                         " (recorded before --dtype existed)")),
        ("attention kernel", f"{record.attention['ran']} (asked: {record.attention['requested']})"),
    ]


def _train_rows(record: RunRecord) -> list[Row]:
    """Training: steps and loss, speed, memory, profile, compile, MFU, then the ranks; none for a scoring job."""
    tr = record.train
    if tr is None:
        return []
    tp, memory = tr.throughput, tr.memory
    peak = f"{memory.peak_mem_gib:.2f} GiB device" if memory.peak_mem_gib is not None else "n/a on cpu"
    peak += f", host RSS {memory.host_peak_rss_gib:.2f} GiB"
    rows: list[Row] = [
        ("train", f"{tr.steps} steps, {tr.epochs:.2f} epochs of {tr.n_examples} questions, "
                  f"loss {tr.loss_per_step[0]:.3f} -> {tr.loss_per_step[-1]:.3f}"),
        ("train tokens/s", f"{tp.tokens_per_s:,.0f} real tokens/s (step {1000 * tp.step_time_s_median:.0f} ms "
                           f"median, IQR {1000 * tp.step_time_s_iqr:.0f} ms)"),
        ("peak memory", peak),
    ]
    promise = record.profile
    if promise:
        held = {True: "held", False: "NOT held", None: "no device peak to check"}[promise["held"]]
        cap = f", promises <= {promise['memory_cap_gib']:g} GiB: {held}" if promise["memory_cap_gib"] else ""
        train_attn = record.config["train"].get("attn")
        rows.append(("profile", f"{promise['spec']} ({promise['chosen_by']}){cap}"
                                + (f"; trains with {train_attn} attention" if train_attn else "")))
    compiled = tr.compile
    if compiled and compiled.ran:
        cache = compiled.cache or {}
        graphs = "?" if compiled.graphs is None else compiled.graphs
        rows.append(("compile", f"{graphs} graphs, {compiled.warmup_s or 0:.1f} s "
                                f"before the first step, {compiled.recompiles or 0} recompiles in training"
                                + (f", compile cache {cache['state']}" if cache.get("state") else "")))
    if tp.mfu_datasheet is not None and tp.datasheet_peak is not None and tp.model_flops_per_s is not None:
        rows.append(("MFU", f"{100 * tp.mfu_datasheet:.1f}% of the {tp.datasheet_peak['name']} datasheet dense "
                            f"{tp.datasheet_peak['dtype']} peak ({tp.model_flops_per_s / 1e12:.0f} TFLOP/s of "
                            "model FLOPs)"))
    return rows + _parallel_rows(tr)


def _parallel_rows(tr: TrainResult) -> list[Row]:
    """Data parallel cost, how the ranks shared the model, and their balance; none on one rank."""
    if tr.world_size <= 1:
        return []
    tp = tr.throughput
    rows: list[Row] = [("data parallel", f"{tr.world_size} ranks, {tp.tokens_per_s / tr.world_size:,.0f} tokens/s "
                                         f"per rank; one all-reduce of the LoRA gradients "
                                         f"{1000 * tr.all_reduce_s:.1f} ms alone")]
    if tr.parallel:
        rows.append(("ranks share", _sharing(tr.parallel)))
    if tr.step_imbalance:
        imb = tr.step_imbalance
        rows.append(("rank balance", f"slowest rank {imb.time_max_over_mean:.2f}x the mean step time, most "
                                     f"tokens {imb.tokens_max_over_mean:.2f}x the mean (median of "
                                     f"{imb.steps} timed steps)"))
    return rows


def _accuracy_rows(record: RunRecord) -> list[Row]:
    """Accuracy before and after training, or the one scoring of an evaluate job, and scoring speed."""
    rows: list[Row] = []
    if record.kind == "evaluate":  # one scoring, of the base model or of a saved adapter: no before and after
        scored = record.eval_after or record.eval_before
        if scored is not None:
            rows.append(("accuracy", _accuracy(scored) + (" with the adapter" if record.eval_after else
                                                          ", base model")))
            rows.append(("scoring", f"{scored.questions_per_s:,.1f} questions/s"))
    else:
        if record.eval_before is not None:
            rows.append(("accuracy before", _accuracy(record.eval_before)))
        if record.eval_after is not None:
            rows.append(("accuracy after", _accuracy(record.eval_after)))
            rows.append(("scoring", f"{record.eval_after.questions_per_s:,.1f} questions/s"))
    return rows


def _output_rows(record: RunRecord, path: Any) -> list[Row]:
    """What the run left and what it took: adapter, wall time, phases, the record's path."""
    rows: list[Row] = []
    if record.adapter_dir:
        rows.append(("adapter", record.adapter_dir))
    if record.wall_time_s is not None:
        rows.append(("wall time", f"{record.wall_time_s:.0f} s, model loading included"))
    if record.phases_s:
        phases = ", ".join(f"{k.replace('_', ' ')} {v:.0f} s" for k, v in record.phases_s.items())
        rows.append(("time to result", phases))
    rows.append(("record", str(path)))
    return rows


def _sharing(parallel: dict) -> str:
    """How the ranks shared the model (distributed.ddp_info or sharded.sharding_info), in words."""
    if parallel.get("strategy") == "fsdp2":
        return (f"FSDP2, {parallel['groups']} groups sharded; {parallel['weights_gib_per_rank']:.2f} of "
                f"{parallel['weights_gib']:.2f} GiB of weights per rank")
    return (f"DDP, whole model on every rank; {len(parallel.get('bucket_mib', []))} gradient buckets of up to "
            f"{parallel.get('bucket_cap_mb')} MiB")
