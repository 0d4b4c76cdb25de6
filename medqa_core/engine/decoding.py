"""The hardware-bound decode path: a static KV cache, one compiled step per token, replayed as a graph.

Eager ``generate`` at batch 1 is bound by Python and kernel launches, not by the device (a small fraction
of the memory-bandwidth roofline in our GPU bench files), so CUDA and ROCm would look alike for the wrong
reason. Compiling the step inside ``generate`` is not enough: under torch.profiler each step still
spent more host time in Dynamo's guard checks (one per parameter and 4-bit quantization state) and in
generate's own Python than the GPU spent on the step (docs/performance.md, "Decode").

So :class:`StaticDecoder` runs the loop itself, as gpt-fast does. The first prompt's prefill runs eagerly
into a static cache (which allocates the cache at fixed addresses); the one-token step (forward,
greedy pick, position + 1) keeps all of its state in tensors, is compiled once, and on a GPU is
captured as one CUDA graph (a HIP graph on ROCm, through the same ``torch.cuda`` API). Each token
is then a single graph launch: what is timed is the device's work. On a GPU the prefill of that prompt's
length is compiled and captured too (``MEDQA_PREFILL``, :func:`prefill_choice`): an eager prefill is bound by
the host's Python (on an H100 a 7B's prefill of 8 prompts took about as long as of one, 100-200 ms), so the time
to first token would measure the host, not the card.

On a GPU the 4-bit layers then run our fused Triton NF4 kernels (medqa_core.engine.kernels) instead of bitsandbytes'
batch-1 kernel and LoRA's separate small matmuls; ``nf4_kernel`` chooses, and :class:`DecodeSetup` records which ran.
Likewise ``attention`` may run the steps' attention with our split-key Triton kernel (reading the grouped KV cache in
place) instead of the model's own.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import inspect
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

NF4_KERNELS = ("auto", "triton", "bitsandbytes")  # StaticDecoder(nf4_kernel=...)
DECODE_ATTENTIONS = ("auto", "triton", "model")  # StaticDecoder(attention=...)


def _has_nf4_layers(model: torch.nn.Module) -> bool:
    return any(getattr(getattr(m, "weight", None), "quant_state", None) is not None for m in model.modules())


def triton_nf4_unavailable(device: torch.device) -> str | None:
    """Why our Triton NF4 kernels cannot run on ``device``, or None where they can.

    They run on CUDA and ROCm GPUs (both ``device.type == "cuda"``) with Triton installed; on CPU only under
    Triton's interpreter (``TRITON_INTERPRET=1``), which tests use and which is far too slow to time.
    """
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    from medqa_core.engine.kernels.common import interpreting

    if device.type != "cuda" and not interpreting():
        return f"Triton kernels need a GPU ({device.type} here; TRITON_INTERPRET=1 runs them on CPU for tests)"
    return None


# The GPUs whose decode bench measured ours ahead of bitsandbytes', with the batches (fewest, most) at which it did
# (results/bench/Linux-CPython-3.12-64bit/0026 against 0027, batches 1-64, v6; 0028 against 0029 at 1 and 8;
# v8: 0032 against 0033 at 1 and 8; the H200, v10: 0034 against 0035 at 1 and 8):
# "auto" takes ours there at those batches, and bitsandbytes' on every other GPU and batch (docs/decode.md).
AUTO_TRITON_BATCHES = {"NVIDIA H100 80GB HBM3": (1, 64), "NVIDIA H200": (1, 8)}


def nf4_kernel_choice(model: torch.nn.Module, device: torch.device, asked: str, rows: int = 1) -> tuple[str, str]:
    """Which kernel runs the 4-bit layers during decode of ``rows`` sequences: ("triton" | "bitsandbytes" |
    "none", why).

    Raises:
        ValueError: an unknown choice, or "triton" where it cannot run.
    """
    if asked not in NF4_KERNELS:
        raise ValueError(f"nf4_kernel {asked!r}: choose one of {', '.join(NF4_KERNELS)}")
    if not _has_nf4_layers(model):
        return "none", "no 4-bit layers"
    if asked == "bitsandbytes":
        return "bitsandbytes", "asked"
    why = triton_nf4_unavailable(device)
    if asked == "triton" and why:
        raise ValueError(f"nf4_kernel 'triton' cannot run here: {why}")
    if asked == "triton":
        return "triton", "asked"
    if why:
        return "bitsandbytes", why
    if device.type != "cuda":  # CPU behaviour unchanged: the interpreter is for tests, far too slow to use
        return "bitsandbytes", "auto: bitsandbytes' kernels off a GPU (ours runs on CPU only under the interpreter)"
    if torch.version.hip:
        return "bitsandbytes", "auto: ours has not run on ROCm (docs/rocm.md); nf4_kernel='triton' runs it"
    return _measured_ahead(AUTO_TRITON_BATCHES, torch.cuda.get_device_name(device), rows,
                           ("bitsandbytes", "bitsandbytes'", "nf4_kernel"))


def _measured_ahead(table: dict[str, tuple[int, int]], name: str, rows: int,
                    theirs: tuple[str, str, str]) -> tuple[str, str]:
    """"auto"'s choice from a table of GPUs where the bench measured ours ahead, at batches (fewest, most):
    ("triton", why), or (the other's name, why). ``theirs``: the other's name, how the reason names it, the option
    that asks for ours."""
    other, named, option = theirs
    if name not in table:
        return other, f"auto: ours has not been measured ahead on {name} (docs/decode.md); {option}='triton' runs it"
    fewest, most = table[name]
    batches = f"batch {most}" if fewest == most else f"batches {fewest} to {most}"
    if not fewest <= rows <= most:
        return other, (f"auto: ours is measured ahead on {name} at {batches} only, not {rows} (docs/decode.md); "
                       f"{option}='triton' runs it")
    return "triton", f"auto: ours, measured ahead of {named} on {name} at {batches}"


# The GPUs whose decode bench measured our decode attention ahead of the model's own (SDPA), with the batches
# (fewest, most) at which it did: the H200, 0034 (ours and SDPA arms of one session, at 1 and 8); the H100, v18's
# tiles at 32 and 64 (0057 against 0059, and with the dot_swap tiles the table held before, 0056 against 0058: one
# card, one session).
# "auto" takes ours there at those batches, the model's everywhere else (docs/decode.md).
AUTO_TRITON_ATTENTION = {"NVIDIA H200": (1, 8), "NVIDIA H100 80GB HBM3": (32, 64)}


def decode_attention_choice(model: torch.nn.Module, device: torch.device, asked: str,
                            rows: int = 1) -> tuple[str, str]:
    """Which attention the decode steps of ``rows`` sequences run: ("triton" | "model", why). "model" is the
    model's own (its ``attn_implementation``, SDPA in the bench); the prefill always runs it.

    Raises:
        ValueError: an unknown choice, or "triton" where it cannot run.
    """
    if asked not in DECODE_ATTENTIONS:
        raise ValueError(f"attention {asked!r}: choose one of {', '.join(DECODE_ATTENTIONS)}")
    if asked == "model":
        return "model", "asked"
    why = triton_nf4_unavailable(device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not why and not getattr(base, "_can_set_attn_implementation", lambda: False)():
        why = f"{type(base).__name__} does not follow transformers' AttentionInterface"
    if asked == "triton":
        if why:
            raise ValueError(f"attention 'triton' cannot run here: {why}")
        return "triton", "asked"
    if why:
        return "model", why
    if device.type != "cuda":
        return "model", "auto: the model's attention off a GPU (ours runs on CPU only under the interpreter)"
    return _measured_ahead({} if torch.version.hip else AUTO_TRITON_ATTENTION, torch.cuda.get_device_name(device),
                           rows, ("model", "the model's attention", "attention"))


def static_cache(config: Any, max_len: int) -> tuple[Any, str]:
    """A ``StaticCache`` for ``max_len`` tokens of a model with ``config``, and its layer kind.

    A config with a sliding window gets sliding static layers, which keep the position as a Python int:
    Dynamo specializes on it and recompiles every step (8 times, then runs eagerly), and a graph would
    freeze it. While ``max_len`` fits in the window, a sliding layer attends to exactly what a full
    layer does, so full layers are used then.

    Returns:
        The cache, and "full" or "sliding" (the window is shorter than ``max_len``).
    """
    from transformers import StaticCache

    window = getattr(config, "sliding_window", None)
    if window is None or max_len > window:
        return StaticCache(config=config, max_cache_len=max_len), "full" if window is None else "sliding"
    full = copy.deepcopy(config)
    full.sliding_window = None
    if getattr(full, "layer_types", None):
        full.layer_types = ["full_attention" if t == "sliding_attention" else t for t in full.layer_types]
    return StaticCache(config=full, max_cache_len=max_len), "full"


@dataclasses.dataclass(frozen=True)
class DecodeSetup:
    """How a :class:`StaticDecoder` ran: recorded beside its figures."""

    compile_mode: str
    graph: str  # "CUDA graph", "HIP graph", or "none: <why>"
    cache_layers: str  # see static_cache
    nf4_kernel: str = "none"  # "triton-nf4 (medqa_core.engine.kernels)", "bitsandbytes <version>" or "none" (no 4-bit)
    nf4_kernel_why: str = ""  # why that kernel: asked, auto and the device, or why Triton could not run
    nf4_fused_layers: int = 0  # 4-bit layers our kernel ran (of which with LoRA fused: nf4_fused_lora_layers)
    nf4_fused_lora_layers: int = 0
    nf4_launches: int = 0  # our kernel's launches a step: sibling layers (q/k/v, gate/up) share one (v10)
    nf4_modes: str = ""  # our kernel's inner loops at this batch, with their launch counts ("mma x128"); "" if not ours
    decode_attention: str = "model"  # the steps' attention: "model: <attn_implementation>" or "triton-decode (...)"
    decode_attention_why: str = ""
    pdl: str = "off"  # programmatic dependent launch of the step's kernels: "on: ..." or "off: <why>"
    nf4_scales: str = ""  # how our kernel reads the block scales: "nested: ..." or "float32: ..." (v20); "" if not ours
    nf4_layout: str = ""  # where our kernel reads the packed weights: "bitsandbytes: ..." or "tiled: ..." (v22)
    inductor_tuning: str = "off"  # inductor tuned its own kernels as the step compiled: "on: ..." or "off: <why>"
    prefill: str = "eager"  # "compiled: ..." (prefill_choice) or "eager: <why>"; files before it ran eagerly


PREFILLS = ("compiled", "eager")  # MEDQA_PREFILL


def prefill_choice(device: torch.device, graph: bool) -> tuple[bool, str]:
    """Whether a :class:`StaticDecoder` compiles its prefill (once, for the first prompt's length; with ``graph``
    captured as a CUDA/HIP graph of its own, beside the step's), from ``MEDQA_PREFILL``: ``"compiled"`` or
    ``"eager"``; unset, compiled on a GPU and eager elsewhere (CPU behaviour unchanged). The line the result files
    record.

    Raises:
        ValueError: another value of ``MEDQA_PREFILL``.
    """
    asked = os.environ.get("MEDQA_PREFILL") or None  # set but empty: unset
    if asked is not None and asked not in PREFILLS:
        raise ValueError(f"MEDQA_PREFILL={asked!r}: choose one of {', '.join(PREFILLS)}")
    if asked == "eager":
        return False, "eager: MEDQA_PREFILL=eager"
    if asked is None and device.type != "cuda":
        return False, "eager: the model's forward off a GPU (MEDQA_PREFILL=compiled compiles it)"
    how = f"replayed as a {'HIP' if torch.version.hip else 'CUDA'} graph" if graph else "no graph"
    return True, f"compiled: once for the first prompt's length, {how} (other lengths run eagerly)"


def programmatic_dependent_launch(device: torch.device) -> tuple[bool, str]:
    """Whether a decode step's kernels launch as programmatic dependents (PDL: each may start while the one
    before it finishes), ours (medqa_core.engine.kernels.common.programmatic_launch) and inductor's
    (``triton.enable_pdl``) together, and the line the result files record."""
    if device.type != "cuda" or torch.version.hip is not None or importlib.util.find_spec("triton") is None:
        return False, "off: an NVIDIA GPU with Triton only"
    from medqa_core.engine.kernels.common import programmatic_launch

    if os.environ.get("MEDQA_PDL", "1") == "0":
        return False, "off: MEDQA_PDL=0"
    if not programmatic_launch(device):
        major, minor = torch.cuda.get_device_capability(device)
        return False, (f"off: needs an NVIDIA GPU of sm_90 or later and Triton's CUDA backend (this one is "
                       f"sm_{major}{minor})")
    from torch._inductor import config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        return False, f"off: torch {torch.__version__}'s inductor has no triton.enable_pdl"
    return True, "on: inductor's kernels, and ours where they run (griddepcontrol)"


def nf4_scales_line() -> str:
    """How our kernel's launches read the block scales (``MEDQA_NF4_SCALES``, v20's A/B switch): the line the
    result files record."""
    from medqa_core.engine.kernels.nf4_weight import scale_layout

    if scale_layout() == "float32":
        return "float32: decoded once as the layers were swapped in (MEDQA_NF4_SCALES=float32)"
    return "nested: bitsandbytes' double-quantized absmax, decoded in the K loop"


def nf4_layout_line(tiled_launches: int, launches: int, tiled_bytes: int = 0) -> str:
    """Where our kernel's launches read the packed weights (``MEDQA_NF4_LAYOUT``, v22's A/B switch), with how many
    of the step's ``launches`` read tiled copies and what the copies hold (``tiled_bytes``, beside bitsandbytes'
    own): the line the result files record."""
    from medqa_core.engine.kernels.nf4_weight import weight_layout

    if weight_layout() == "tiled":
        return (f"tiled: {tiled_launches} of {launches} launches read copies in their MMA tile's order, made as the "
                f"layers were swapped in ({tiled_bytes / 2**30:.2f} GiB beside bitsandbytes' copy; "
                f"MEDQA_NF4_LAYOUT=tiled)")
    return "bitsandbytes: its packed weights, read in place"


def inductor_tuning(device: torch.device) -> tuple[bool, str]:
    """Whether inductor times its own kernels of the decode step (the norms, rotary embedding, SiLU: a few
    microseconds each, 195 launches of a 7B step) at other block sizes as it compiles them, and keeps the fastest
    (``coordinate_descent_tuning``, as gpt-fast decodes); ``MEDQA_INDUCTOR_TUNING=1`` turns it on (off by default:
    no gain at batch 1 on an H100, docs/decode.md's session 49). Its line for the result files."""
    if device.type != "cuda":
        return False, "off: inductor tunes its GPU (Triton) kernels only"
    if os.environ.get("MEDQA_INDUCTOR_TUNING", "0") != "1":
        return False, "off: MEDQA_INDUCTOR_TUNING=1 turns it on"
    return True, "on: coordinate descent over inductor's block sizes, as the step compiles"


class StaticDecoder:
    """Greedy decoding of ``batch`` prompts with a static KV cache and one compiled step per token.

    The model is not changed: its own forward runs the prefill, and a compiled function of it runs the
    steps (and, where :func:`prefill_choice` says so, the prefills of the first call's prompt length). Call
    :meth:`generate` under the same autocast and attention settings each time (they are captured into the graph
    on the first call).

    Args:
        model: a peft or transformers causal LM, in eval mode.
        batch: rows per call.
        max_len: prompt plus new tokens, at most; the cache holds exactly this many.
        use_graph: capture the step as a CUDA/HIP graph (GPUs only).
        nf4_kernel: "auto" (ours where the bench measured it ahead: :data:`AUTO_TRITON_BATCHES`; else
            bitsandbytes), "triton" or "bitsandbytes".
        attention: the steps' attention: "auto" (ours where the bench measured it ahead:
            :data:`AUTO_TRITON_ATTENTION`; else the model's), "triton" or "model".

    Raises:
        ValueError: ``nf4_kernel`` or ``attention`` unknown, or "triton" where Triton cannot run.
    """

    def __init__(self, model: Any, batch: int, max_len: int, use_graph: bool, nf4_kernel: str = "auto",
                 attention: str = "auto") -> None:
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA layers included
        self.device = self.base.device
        self.max_len = max_len
        self.cache, cache_layers = static_cache(self.base.config, max_len)
        params = inspect.signature(type(self.base).forward).parameters
        # transformers 5.24 names the cache argument `cache`; earlier 5.x `past_key_values` (and takes
        # `cache_position`, which 5.24 derives from the cache).
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._takes_cache_position = "cache_position" in params
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # [B, 1]: last token picked
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)  # [B, 1]: its position
        self._compiled = torch.compile(self._step, mode="default", dynamic=False)
        self._graph: torch.cuda.CUDAGraph | None = None
        # The compiled prefill's prompt [B, T] at a fixed address (its length the first call's), and its graph
        self._prompt: torch.Tensor | None = None
        self._prefill_graph: torch.cuda.CUDAGraph | None = None
        self._warm = False
        self._steps_left = 0  # steps the cache has room for (generate sets it after the prefill)
        self._want_graph = use_graph and self.device.type == "cuda"
        self._compile_prefill, prefill = prefill_choice(self.device, self._want_graph)
        self._compiled_prefill = torch.compile(self._prefill_step, mode="default", dynamic=False)
        graph = ("HIP graph" if torch.version.hip else "CUDA graph") if self._want_graph else \
            "none: graphs need a GPU" if self.device.type != "cuda" else "none: turned off"
        kernel, why = nf4_kernel_choice(self.base, self.device, nf4_kernel, batch)
        self._swap = None
        if kernel == "triton":
            from medqa_core.engine.kernels.nf4_layers import NF4Swap

            self._swap = NF4Swap(self.base, max_rows=batch)
            kernel_name = self._swap.info.kernel
        elif kernel == "bitsandbytes":
            import bitsandbytes

            kernel_name = f"bitsandbytes {bitsandbytes.__version__}"
        else:
            kernel_name = "none"
        attention_kind, attention_why = decode_attention_choice(self.base, self.device, attention, batch)
        self._attention_swap = None
        if attention_kind == "triton":
            from medqa_core.engine.kernels.decode_attention_swap import DecodeAttentionSwap

            self._attention_swap = DecodeAttentionSwap(self.base)
            attention_name = "triton-decode (medqa_core.engine.kernels)"
        else:
            attention_name = f"model: {self.base.config._attn_implementation}"
        self._pdl, pdl = programmatic_dependent_launch(self.device)
        self._tune, tuning = inductor_tuning(self.device)
        # Our kernel's launches a step in launch order, (layers, bytes each reads): what a step profile's kernels are
        self.nf4_launches: tuple[tuple[str, int], ...] = self._swap.launches if self._swap else ()
        self.setup = DecodeSetup(
            compile_mode="default", graph=graph, cache_layers=cache_layers, nf4_kernel=kernel_name,
            nf4_kernel_why=why, nf4_fused_layers=self._swap.info.layers if self._swap else 0,
            nf4_fused_lora_layers=self._swap.info.lora_layers if self._swap else 0,
            nf4_launches=self._swap.info.launches if self._swap else 0,
            nf4_modes=self._swap.modes(batch) if self._swap else "", decode_attention=attention_name,
            decode_attention_why=attention_why, pdl=pdl, inductor_tuning=tuning,
            nf4_scales=nf4_scales_line() if self._swap else "",
            nf4_layout=nf4_layout_line(self._swap.info.tiled_launches, self._swap.info.launches,
                                       self._swap.info.tiled_bytes) if self._swap else "", prefill=prefill)
        if cache_layers == "sliding":
            logger.warning("decode of %d tokens exceeds the %d-token sliding window: sliding cache layers make "
                           "torch.compile recompile every step, so this does not measure the compiled path; "
                           "use prompt + new tokens <= the window", max_len, self.base.config.sliding_window)

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits of the last position, [B, V], writing this call's keys and values into the cache."""
        kwargs: dict[str, Any] = {self._cache_kwarg: self.cache}
        if self._takes_cache_position:
            kwargs["cache_position"] = position_ids[0]  # [T]: every row is at the same position
        out = self.base(input_ids=input_ids, position_ids=position_ids, use_cache=True, logits_to_keep=1, **kwargs)
        return out.logits[:, -1]

    def _step(self) -> None:
        # One token for every row; all state stays in tensors, so a graph replay repeats it exactly.
        logits = self._forward(self.token, self.position)  # [B, V]
        self.token.copy_(logits.argmax(-1, keepdim=True))
        self.position.add_(1)

    def _prefill_step(self, input_ids: torch.Tensor) -> None:
        self.cache.reset()  # in place: the cache keeps its addresses (and, since transformers 5.24, its length)
        batch, length = input_ids.shape
        positions = torch.arange(length, device=self.device).expand(batch, length)  # [B, T]
        self.token.copy_(self._forward(input_ids, positions).argmax(-1, keepdim=True))
        self.position.fill_(length)

    def _prefill(self, input_ids: torch.Tensor) -> None:
        if self._prompt is None or self._prompt.shape != input_ids.shape:
            self._prefill_step(input_ids)  # eagerly: the first call (the cache's first use), or another length
            return
        self._prompt.copy_(input_ids)
        if self._prefill_graph is not None:
            self._prefill_graph.replay()
        else:
            self._compiled_prefill(self._prompt)

    def _warm_up(self, input_ids: torch.Tensor) -> None:
        """Compile the step (and the prefill of ``input_ids``' length, where chosen) and capture their graphs. The
        steps run here advance the state: prefill again after."""
        self._warm = True
        # inductor's kernels launched as programmatic dependents too (they wait for their inputs and let the next
        # kernel start), so that ours start while the kernel before them finishes; set as the step compiles
        from torch._inductor import config as inductor_config

        options = {"triton.enable_pdl": True} if self._pdl else {}
        if self._tune:
            options["coordinate_descent_tuning"] = True
        ahead = self._compile_ahead()
        try:
            with inductor_config.patch(options):
                self._compile_and_capture()
                if self._compile_prefill:
                    self._warm_up_prefill(input_ids)
        finally:
            if ahead is not None:
                ahead.join()  # no worker outlives the warm-up, nor a warm-up that failed

    def _compile_ahead(self) -> threading.Thread | None:
        """Our NF4 kernel's tiles compiled by other processes while Dynamo traces the step, so that the step's
        first launches load them from Triton's cache (``nf4_compile``: a minute of serial compiling on an H100)."""
        if self._swap is None or self.device.type != "cuda":
            return None
        from medqa_core.engine.kernels.nf4_compile import compile_ahead

        jobs = self._swap.compile_jobs(self.token.shape[0])

        def run() -> None:
            try:
                done = compile_ahead(jobs, self.device, min(len(jobs), os.cpu_count() or 1))
            except Exception as e:  # a pool that cannot start costs the head start only, never the decode
                done = [f"{type(e).__name__}: {e}"[:200]] * len(jobs)
            for job, failed in zip(jobs, done, strict=True):
                if failed:  # the step's own launch compiles it, and fails there if it must
                    logger.info("NF4 tile %s not compiled ahead: %s", job.tile, failed)

        thread = threading.Thread(target=run, name="nf4-compile-ahead", daemon=True)
        thread.start()
        return thread

    def _compile_and_capture(self) -> None:
        if not self._want_graph:
            self._compiled()
            return
        self._graph = self._capture(self._compiled)

    def _capture(self, run: Callable[[], None], pool: Any = None) -> torch.cuda.CUDAGraph:
        """``run`` twice on a side stream, as torch.cuda.graphs asks (compilation and autotuning happen there),
        then recorded as a graph (nothing runs), in memory ``pool`` where given."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            run()
        return graph

    def _warm_up_prefill(self, input_ids: torch.Tensor) -> None:
        """The compiled prefill of ``input_ids``' length ready; where it fails to compile or capture (not for want
        of memory), prefills stay eager, the record says why, and the step keeps its graph."""
        self._prompt = input_ids.clone()
        try:
            self._compile_and_capture_prefill()
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as e:  # Dynamo's and inductor's errors are RuntimeErrors too, as a capture's are
            self._prompt, self._prefill_graph = None, None
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            self.setup = dataclasses.replace(self.setup, prefill=f"eager: the compiled prefill failed: {why}")
            logger.warning("decode: %s", self.setup.prefill)

    def _compile_and_capture_prefill(self) -> None:
        """The prefill of ``self._prompt``'s length compiled, and where the step has a graph, captured as one too,
        in the step graph's memory pool: neither keeps a tensor of its own past its replay (what they produce goes
        to the decoder's state and the cache), and they never run at once."""
        if self._graph is None:
            self._compiled_prefill(self._prompt)
            return
        self._prefill_graph = self._capture(lambda: self._compiled_prefill(self._prompt), pool=self._graph.pool())

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, new_tokens: int,
                 after_prefill: Callable[[], None] | None = None) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` ([B, T], no padding): exactly ``new_tokens`` tokens, [B, N].
        ``after_prefill`` is called once the prefill (and its first token) is queued, before the first step: where
        a timer splits a call into its prefill and its steps.

        Raises:
            ValueError: the prompt and new tokens do not fit the cache, or the batch differs.
        """
        if input_ids.shape[0] != self.token.shape[0] or input_ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"prompt {tuple(input_ids.shape)} + {new_tokens} new tokens does not fit this decoder "
                             f"(batch {self.token.shape[0]}, {self.max_len} tokens); make a decoder for that size")
        with self._kernels():
            self._prefill(input_ids)
            if new_tokens > 1 and not self._warm:
                self._warm_up(input_ids)
                self._prefill(input_ids)
            if after_prefill is not None:
                after_prefill()
            self._steps_left = self.max_len - input_ids.shape[1]  # the cache's free positions
            tokens = [self.token.clone()]
            for _ in range(new_tokens - 1):
                self._advance()
                tokens.append(self.token.clone())
        return torch.cat(tokens, dim=1)

    def _advance(self) -> None:
        if self._graph is not None:
            self._graph.replay()
        else:
            self._compiled()
        self._steps_left -= 1

    @torch.no_grad()
    def step(self) -> None:
        """One more token for every row, after :meth:`generate` (compiled and warm): the step alone, as a
        profiler sees it. The token is left in the decoder's state.

        Raises:
            ValueError: not warm yet, or the cache is full (a step would write past it).
        """
        if not self._warm or self._steps_left <= 0:
            raise ValueError("StaticDecoder.step: call generate(ids, n > 1) first, and at most max_len - prompt "
                             "steps after its prefill")
        with self._kernels():
            self._advance()

    @contextlib.contextmanager
    def _kernels(self) -> Iterator[None]:
        """Our NF4 kernels in the 4-bit layers' places and our attention in the model's, where chosen."""
        with self._swap or contextlib.nullcontext(), self._attention_swap or contextlib.nullcontext():
            yield
