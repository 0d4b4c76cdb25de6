"""Inference per 4-bit kernel and batch, from bench files: what a buyer reads beside the training figures.

One row per compiled-decode case that names its 4-bit kernel (``test_decode_compiled[...-<kernel>]``, or
``...-<kernel>-attn-<attention>]`` where one session ran several attentions): ours
(the Triton NF4 kernels) and bitsandbytes' as arms of the same run, and the steps' attention (the model's, or
ours: the bench's ``--decode-attention``), which one device call may save as another file of the same cases.
README and docs/decode.md (tools/gen_docs.py) and the parity report build their inference tables from these
rows. No torch here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from medqa_core.compare.inputs import BenchFile, device_label
from medqa_core.results.benchcase import BenchCase

# (with several --decode-attention arms the name ends in the attention: ...-triton-attn-model])
_KERNEL = re.compile(r"^test_decode_compiled\[.*-(triton|bitsandbytes)(?:-attn-\w+)?\]$")
KERNEL_NAMES = {"triton": "ours (Triton)", "bitsandbytes": "bitsandbytes"}


@dataclass(frozen=True)
class InferenceRow:
    """One compiled-decode case: its kernel and batch, and the figures a buyer compares."""

    device: str
    kernel: str  # "triton" or "bitsandbytes"
    batch: int
    decode_tokens_per_s: float
    roofline_fraction: float | None  # of rows x measured copy bandwidth / weight bytes a step reads
    ttft_s: float | None  # time to first token (the decoder's prefill and its pick of the first token), median
    prefill_tokens_per_s: float | None  # the prompt's tokens over that time where the decoder compiled its prefill;
    # else the same file's prefill case at this batch (eager generate), if it ran
    joules_per_token: float | None
    path: str
    attention: str = "model"  # the decode steps' attention: "triton" (ours) or "model" (the model's own, --attn's)
    switch: str = ""  # a setting away from its default the case ran with ("MEDQA_PDL=0"): an A/B arm, "" if none
    prefill: str = "eager"  # how the decoder ran its prefill: "compiled" (MEDQA_PREFILL) or "eager" (files before)

    @property
    def kernel_name(self) -> str:
        return (KERNEL_NAMES[self.kernel] + (" + our attention" if self.attention == "triton" else "")
                + (f" ({self.switch})" if self.switch else ""))


def _switch(details: dict) -> str:
    """The decode setting a case ran with away from its default, from the lines it recorded (an A/B arm: PDL
    turned off, inductor's tuning turned on, the block scales decoded at load, the weights tiled at load), or "".
    The lines are those of medqa_core.engine.decoding's ``programmatic_dependent_launch``, ``inductor_tuning``,
    ``nf4_scales_line``, ``nf4_layout_line`` and ``prefill_choice`` (read here as text: no torch in compare/)."""
    switches = []
    if str(details.get("pdl", "")) == "off: MEDQA_PDL=0":
        switches.append("MEDQA_PDL=0")
    if str(details.get("inductor_tuning", "")).startswith("on"):
        switches.append("MEDQA_INDUCTOR_TUNING=1")
    if str(details.get("nf4_scales", "")).startswith("float32"):
        switches.append("MEDQA_NF4_SCALES=float32")
    if str(details.get("nf4_layout", "")).startswith("tiled"):
        switches.append("MEDQA_NF4_LAYOUT=tiled")
    if str(details.get("prefill", "")) == "eager: MEDQA_PREFILL=eager":
        switches.append("MEDQA_PREFILL=eager")
    return ", ".join(switches)


def inference_rows(bench: BenchFile) -> list[InferenceRow]:
    """The file's compiled-decode cases that name a 4-bit kernel, ours first, then by batch."""
    cases = {e.name: e.case for e in bench.entries}
    rows = []
    for name, case in cases.items():
        found = _KERNEL.match(name)
        # a missing, NaN or infinite decode figure is no row (the file's invalid figures say where)
        if not found or not case.decode_tokens_per_s or not math.isfinite(case.decode_tokens_per_s):
            continue
        batch = case.batch_size or 1
        compiled = str(case.details.get("prefill", "")).startswith("compiled")
        rows.append(InferenceRow(
            device=device_label(bench.fingerprint), kernel=found.group(1), batch=batch,
            decode_tokens_per_s=case.decode_tokens_per_s, roofline_fraction=case.roofline_fraction,
            ttft_s=_ttft(case), prefill_tokens_per_s=_prefill_rate(case, cases, batch, compiled),
            prefill="compiled" if compiled else "eager",
            joules_per_token=case.energy.joules_per_token if case.energy else None, path=bench.path,
            # (files before StaticDecoder's attention choice ran the model's)
            attention="triton" if str(case.details.get("decode_attention", "")).startswith("triton") else "model",
            switch=_switch(case.details)))
    return sorted(rows, key=_order)


def _ttft(case: BenchCase) -> float | None:
    """The case's median time to first token; None where it is missing, zero or not finite (a broken timer)."""
    ttft = case.ttft_s_median
    return ttft if ttft and math.isfinite(ttft) and ttft > 0 else None


def _prefill_rate(case: BenchCase, cases: dict[str, BenchCase], batch: int, compiled: bool) -> float | None:
    """Prefill tokens/s beside a decode case: its own prompt tokens over its time to first token where its prefill
    was compiled (the time the row's first-token column gives); else the file's eager prefill case at that batch."""
    if compiled:
        ttft = _ttft(case)
        return batch * case.seq_len / ttft if case.seq_len and ttft else None
    eager = cases.get(f"test_prefill[{case.attention_requested}-batch{batch}]")
    return eager.prefill_tokens_per_s if eager else None


def _order(row: InferenceRow) -> tuple[bool, bool, int]:
    """Ours first, the model's attention before ours, then by batch."""
    return row.kernel != "triton", row.attention == "triton", row.batch


def newest_inference_rows(benches: Iterable[BenchFile]) -> list[InferenceRow]:
    """Of ``benches`` (oldest first), per device and batch the newest code (git commit of the fingerprint) that
    timed our kernel there, and every arm that code ran at that batch: a row per kernel, attention and batch, the
    newest file's.

    One device call may save its arms and batches as separate files (one pytest session per kernel, or per batch
    range, so that a session cut short keeps what it finished), and a later call may time some batches only: the
    other batches keep the rows of the code that last ran them. At one batch, rows of another commit are never
    mixed in, nor rows of an A/B arm run with a setting away from its default (:attr:`InferenceRow.switch`): each
    row gives what a user's run of that code gets, beside the other arms of the same code.
    """
    benches = list(benches)
    newest: dict[tuple[str, int], str | None] = {}  # (device, batch): the commit that last timed ours there
    for bench in benches:
        newest.update({(r.device, r.batch): bench.fingerprint.get("git_commit")
                       for r in _defaults(bench) if r.kernel == "triton"})
    picked: dict[tuple[str, str, str, int], InferenceRow] = {}
    for bench in benches:  # oldest first: a newer file's row replaces an older one's
        commit = bench.fingerprint.get("git_commit")
        picked.update({(r.device, r.kernel, r.attention, r.batch): r for r in _defaults(bench)
                       if (r.device, r.batch) in newest and newest[(r.device, r.batch)] == commit})
    devices = dict.fromkeys(device for device, _ in newest)  # in the order they were first timed
    return [r for device in devices for r in sorted((r for r in picked.values() if r.device == device), key=_order)]


def _defaults(bench: BenchFile) -> list[InferenceRow]:
    return [r for r in inference_rows(bench) if not r.switch]
