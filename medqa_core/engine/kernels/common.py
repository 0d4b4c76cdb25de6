"""What our Triton kernels share: the interpreter switch, exact rounding and dots that give the GPU's numbers
under Triton's CPU interpreter, and the arrival counters that let a launch's last program finish its work."""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

try:  # NVIDIA's griddepcontrol; a Triton built without the CUDA backend has none (PDL is then never on)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    gdc_launch_dependents = gdc_wait = None

logger = logging.getLogger(__name__)


def interpreting() -> bool:
    """Triton's CPU interpreter is on (tests): kernels then run on CPU tensors, one fixed config."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def programmatic_launch(device: torch.device) -> bool:
    """Launch our kernels with programmatic dependent launch (PDL): an NVIDIA GPU of sm_90 on (Hopper's
    ``griddepcontrol``), not the interpreter, and ``MEDQA_PDL`` not ``0`` (the A/B switch). A kernel so launched may
    start while the kernel before it finishes: its programs load what no earlier kernel writes (the weights and
    their scales) and then wait (:func:`wait_for_inputs`) before reading x or writing anything."""
    return os.environ.get("MEDQA_PDL", "1") != "0" and not interpreting() and _griddepcontrol(device)


@functools.cache
def _griddepcontrol(device: torch.device) -> bool:
    """An NVIDIA GPU of sm_90 on, and a Triton that can emit ``griddepcontrol`` (read once a device: every launch
    of ours asks)."""
    return (device.type == "cuda" and torch.version.hip is None and gdc_wait is not None
            and torch.cuda.get_device_capability(device) >= (9, 0))


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the kernel launched before this one has finished and its writes are visible
    (``griddepcontrol.wait``). Every program passes here before it reads an input another kernel writes or writes
    anything itself (another kernel may still read the memory an output reuses)."""
    if PDL:
        gdc_wait()


@triton.jit
def let_dependents_launch(PDL: tl.constexpr):
    """With PDL: the next kernel may start its programs once every program of this launch got here
    (``griddepcontrol.launch_dependents``); they wait for this launch's end before they read what it writes."""
    if PDL:
        gdc_launch_dependents()


@triton.jit
def round_to_dtype(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """float32 ``x`` rounded to ``dtype`` (round to nearest even).

    On a GPU a plain cast. Triton's CPU interpreter truncates float32 -> bf16 and multiplies bf16 dots as raw
    integers, so there (EMULATE) the rounding is done on the bits and the value stays float32: the kernel then
    computes the same numbers as on a GPU, with float32 dots.
    """
    if EMULATE:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            return bits.to(tl.float32, bitcast=True)
        else:
            return x.to(dtype).to(tl.float32)
    else:
        return x.to(dtype)


@triton.jit
def dot_nt(x, w, acc, dtype: tl.constexpr, EMULATE: tl.constexpr):
    """acc + x @ w^T: x [BM, J], w [BN, J]; float32 products of ``dtype`` values (exact), float32 sums."""
    if EMULATE:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    elif dtype == tl.float32:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")  # not TF32: bitsandbytes' fp32 is exact
    else:
        return tl.dot(x.to(dtype), tl.trans(w.to(dtype)), acc)


@triton.jit
def wait_for_lora(lora_counter_ptr, LORA_RANKS: tl.constexpr):
    """Spin until the LoRA programs have written t for all the launch's LORA_RANKS ranks (nf4_matmul's "lora"
    counters: ranks done, then waiters finished). The LoRA programs come first in the grid, dispatched before any
    waiter, so a waiter never holds the slot one of them needs."""
    done = tl.atomic_add(lora_counter_ptr, 0, sem="acquire", scope="gpu")
    while done < LORA_RANKS:
        done = tl.atomic_add(lora_counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def lora_waiter_finished(lora_counter_ptr, waiters):
    """This program has passed :func:`wait_for_lora`: the last of the launch's ``waiters`` to get here sets both
    counters back for the next call. Relaxed (v16; acq_rel before): the count orders nothing but itself, since a
    waiter counts itself only after its acquiring wait returned and the next call's programs start after this
    launch ends; so no fence (a wait for the program's output stores) at the end of every waiter."""
    tl.debug_barrier()  # every warp of the program past the wait
    finished = tl.atomic_add(lora_counter_ptr + 1, 1, sem="relaxed", scope="gpu")
    if finished == waiters - 1:
        tl.atomic_xchg(lora_counter_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(lora_counter_ptr + 1, 0, sem="relaxed", scope="gpu")

# Arrival counters, per device and purpose (nf4_matmul: "split_k", one int32 per output tile, and "lora", two;
# decode attention: "attention", one per query group). Zero between calls: each call's last program sets them
# back. Kept, not allocated per call, because torch.zeros would add a memset launch to every call; so calls must
# not run concurrently on two streams of one device (decode runs one stream).
ARRIVAL_COUNTERS: dict[tuple[torch.device, str], torch.Tensor] = {}


def arrival_counters(device: torch.device, purpose: str, count: int) -> torch.Tensor:
    """At least ``count`` zeroed int32 counters of ``device`` for ``purpose``, the same buffer each call."""
    counters = ARRIVAL_COUNTERS.get((device, purpose))
    if counters is not None and counters.numel() >= count:
        return counters
    counters = torch.zeros(max(count, 4096), device=device, dtype=torch.int32)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # Memory from the graph's pool, zeroed by a memset the graph replays: right for this graph, not kept.
        logger.info("%s counters allocated inside a CUDA graph capture (%d); a warm-up call before capture keeps "
                    "them out of the graph", purpose, count)
        return counters
    ARRIVAL_COUNTERS[(device, purpose)] = counters
    return counters
