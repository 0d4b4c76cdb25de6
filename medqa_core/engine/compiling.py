"""torch.compile of the decoder layers, with a visible fall-back to eager.

Regional compilation: each decoder layer gets ``nn.Module.compile``. The layers share one code object,
so Dynamo traces one graph and reuses it for all of them (compile time of one layer, not of the model),
and Inductor fuses what eager runs as separate kernels: RMSNorm, rotary, SwiGLU, and LoRA's
dropout / scale / add around the 4-bit matmuls (bitsandbytes' ops are registered torch custom ops,
so they stay in the graph). Inductor emits Triton on CUDA and ROCm and C++ on CPU: one code path.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from medqa_core.engine.model import decoder_layers

logger = logging.getLogger(__name__)
T = TypeVar("T")


class GraphCounter:
    """A Dynamo backend that hands each graph to Inductor and counts it: a recompile is one more graph.

    ``seconds`` is the time spent compiling forward graphs (tracing, AOT autograd, Inductor); the
    backward graph is compiled at the first backward and shows in that step's time instead.
    """

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend  # tests count Dynamo's graphs through "aot_eager", which generates no code
        self.graphs = 0
        self.seconds = 0.0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._dynamo import lookup_backend

        start = time.perf_counter()
        compiled = lookup_backend(self.backend)(gm, example_inputs)
        self.graphs += 1
        self.seconds += time.perf_counter() - start
        logger.debug("compiled graph %d in %.1f s", self.graphs, time.perf_counter() - start)
        return compiled


@dataclass
class CompileState:
    """What a run asked for ("auto", "on", "off") and what ran: ``detail`` says which layers compiled, or why not.

    ``graphs`` counts the graphs Dynamo compiled (the layers share one code object, so one graph serves every
    layer); ``warmup_graphs`` of them were compiled before the first training step, and ``graphs_per_step``
    says how many each step added: after the warm-up it should be all zeros.
    """

    requested: str
    ran: bool = False
    detail: str = "off"
    counter: GraphCounter = field(default_factory=GraphCounter, repr=False)
    warmup_graphs: int = 0
    warmup_s: float = 0.0
    graphs_per_step: list[int] = field(default_factory=list)

    @property
    def recompiles(self) -> int:
        """Graphs compiled during training steps, after the warm-up."""
        return sum(self.graphs_per_step)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "ran": self.ran, "detail": self.detail, "graphs": self.counter.graphs,
                "compile_s": self.counter.seconds, "warmup_graphs": self.warmup_graphs, "warmup_s": self.warmup_s,
                "recompiles": self.recompiles,
                "recompile_steps": [i for i, n in enumerate(self.graphs_per_step) if n]}


def compile_unavailable(device: torch.device) -> str | None:
    """Why Inductor cannot run on ``device`` here, or None when it can."""
    if device.type == "cuda":  # CUDA and ROCm builds both: Inductor writes Triton kernels
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed for this torch build"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "c++")
        return None if shutil.which(compiler) or shutil.which("g++") else f"no C++ compiler ({compiler}) on PATH"
    return f"Inductor does not support device type {device.type!r}"


def compile_layers(model: Any, device: torch.device, mode: str) -> CompileState:
    """Compile each decoder layer of ``model`` in place, as ``mode`` (TrainConfig.compile) asks and Inductor can.

    "on" falls back to eager, with the reason recorded, where Inductor cannot run; "auto" compiles on GPUs only.
    """
    state = CompileState(requested=mode)
    if mode == "off":
        return state
    if mode == "auto" and device.type == "cpu":
        state.detail = "off: auto compiles on GPUs only (on CPU a short run would not pay back the compile time)"
        return state
    why_not = compile_unavailable(device)
    if why_not:
        state.detail = f"eager: {why_not}"
        logger.warning("torch.compile not run: %s", why_not)
        return state
    layers = decoder_layers(model)
    # Dynamo's cache is per code object, and every layer shares Module._call_impl's: graphs left by an earlier
    # compile (another backend object, other settings) count towards its recompile limit, past which Dynamo runs
    # the layers eagerly without a word. A fresh cache per compile keeps that from happening; Inductor's own
    # on-disk cache still spares the code generation of a graph it has seen.
    torch._dynamo.reset()
    for layer in layers:
        layer.compile(backend=state.counter)
    state.ran, state.detail = True, f"inductor, {len(layers)} decoder layers"
    return state


def uncompile_layers(model: Any) -> None:
    """Undo :func:`compile_layers`: the layers run eagerly again."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None  # what nn.Module.compile set; None is eager's default


def is_compile_error(exc: BaseException) -> bool:
    """An error raised by Dynamo or Inductor (tracing or code generation), not by the model's own math."""
    return type(exc).__module__.startswith(("torch._dynamo", "torch._inductor"))


def with_eager_fallback(step: Callable[..., T], model: Any, state: CompileState,
                        before_retry: Callable[..., None]) -> Callable[..., T]:
    """``step``, falling back to eager layers (once, visibly, recorded in ``state``) when compiling fails.

    Args:
        step: one training step through the compiled layers; the wrapper passes its arguments on.
        model: the model whose layers :func:`compile_layers` compiled.
        state: updated when the fall-back happens.
        before_retry: called with the same arguments before the rerun, to restore what the failed attempt
            may have touched (gradients, RNG).
    """

    def guarded(*args: Any) -> T:
        try:
            return step(*args)
        except Exception as exc:
            if not (state.ran and is_compile_error(exc)):
                raise
            uncompile_layers(model)
            state.ran = False
            state.detail = f"eager: compiling failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
            logger.warning("torch.compile failed, the layers run eagerly: %s", state.detail)
            before_retry(*args)
            return step(*args)

    return guarded
