"""torch.compile of the decoder layers, with a visible fall-back to eager.

Regional compilation: each decoder layer gets ``nn.Module.compile``. The layers share one code object,
so Dynamo traces one graph and reuses it for all of them (compile time of one layer, not of the model),
and Inductor fuses what eager runs as separate kernels: RMSNorm, rotary, SwiGLU, and LoRA's
dropout / scale / add around the 4-bit matmuls (bitsandbytes' ops are registered torch custom ops,
so they stay in the graph). Inductor emits Triton on CUDA and ROCm and C++ on CPU: one code path.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
class CompileCache:
    """Inductor's compiled artifacts for one machine and set of settings: torch.compiler's portable "mega-cache"
    (FX graphs, AOT autograd, autotuning), saved after a run's compile and loaded by the next run with the same
    key, so that run's compile skips code generation and autotuning (Dynamo still traces every time).

    ``state``: "warm" (artifacts loaded before compiling), "cold" (none yet; saved after the warm-up), or
    "off: <why>". ``fx_graph_hits``/``fx_graph_misses`` are Inductor's own counts during the compile,
    ``autograd_cache_hits``/``autograd_cache_misses``/``autograd_cache_bypasses`` AOTAutograd's (a hit skips
    tracing the joint graph; a bypass never looks: bitsandbytes' 4-bit matmul is a ``torch.autograd.Function``,
    which Dynamo traces as ``autograd_function_apply``, a target AOTAutograd's cache does not accept).
    """

    path: Path | None
    state: str
    artifacts_loaded: int = 0
    saved_bytes: int = 0
    fx_graph_hits: int = 0
    fx_graph_misses: int = 0
    autograd_cache_hits: int = 0
    autograd_cache_misses: int = 0
    autograd_cache_bypasses: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "file": str(self.path) if self.path else None,
                "artifacts_loaded": self.artifacts_loaded, "saved_bytes": self.saved_bytes,
                "fx_graph_hits": self.fx_graph_hits, "fx_graph_misses": self.fx_graph_misses,
                "autograd_cache_hits": self.autograd_cache_hits, "autograd_cache_misses": self.autograd_cache_misses,
                "autograd_cache_bypasses": self.autograd_cache_bypasses}


# Settings that change no compiled graph: two runs that differ only here share a cache entry.
_CACHE_NEUTRAL = ("lr", "epochs", "max_steps", "seed", "warmup_steps", "timing_warmup_steps", "checkpoint_every",
                  "keep_checkpoints", "log_every")


def compile_cache_key(device: torch.device, model_config: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """A hash of what decides the compiled code: torch, Triton and Python versions, the device, the model's
    architecture and quantization, and the training settings that shape the graphs."""
    import importlib.metadata as md

    try:
        triton = md.version("triton")
    except md.PackageNotFoundError:
        triton = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    key = {"torch": torch.__version__, "triton": triton, "python": platform.python_version(), "device": name,
           "model": dict(model_config), "settings": {k: v for k, v in settings.items() if k not in _CACHE_NEUTRAL}}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def open_compile_cache(folder: Path, key: str) -> CompileCache:
    """Load the artifacts saved under ``key`` in ``folder``, if any, before anything compiles."""
    if not hasattr(torch.compiler, "load_cache_artifacts"):
        return CompileCache(None, f"off: torch {torch.__version__} has no portable compile cache")
    path = folder / f"{key}.bin"
    if not path.is_file():
        return CompileCache(path, "cold")
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as e:  # a damaged or foreign file: compile from scratch, visibly, and replace it
        logger.warning("compile cache %s not loaded (%s: %s); compiling from scratch", path, type(e).__name__, e)
        return CompileCache(path, "cold")
    loaded = sum(len(getattr(info, f, ())) for f in ("inductor_artifacts", "autotune_artifacts",
                                                      "aot_autograd_artifacts", "pgo_artifacts")) if info else 0
    return CompileCache(path, "warm" if loaded else "cold", artifacts_loaded=loaded)


def save_compile_cache(cache: CompileCache) -> None:
    """After the compile: count Inductor's cache hits, and save the artifacts where none were loaded (atomically;
    a failed write is logged, never fatal: the cache only saves time)."""
    from torch._dynamo.utils import counters

    cache.fx_graph_hits = int(counters["inductor"]["fxgraph_cache_hit"])
    cache.fx_graph_misses = int(counters["inductor"]["fxgraph_cache_miss"])
    cache.autograd_cache_hits = int(counters["aot_autograd"]["autograd_cache_hit"])
    cache.autograd_cache_misses = int(counters["aot_autograd"]["autograd_cache_miss"])
    cache.autograd_cache_bypasses = int(counters["aot_autograd"]["autograd_cache_bypass"])
    if cache.state != "cold" or cache.path is None:
        return
    saved = torch.compiler.save_cache_artifacts()
    if not saved:
        return
    data, _ = saved
    try:
        cache.path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache.path.parent, delete=False, suffix=".tmp") as tmp:
            tmp.write(data)
        os.replace(tmp.name, cache.path)
        cache.saved_bytes = len(data)
    except OSError as e:
        logger.warning("compile cache not saved to %s: %s", cache.path, e)


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
    cache: CompileCache | None = None

    @property
    def recompiles(self) -> int:
        """Graphs compiled during training steps, after the warm-up."""
        return sum(self.graphs_per_step)

    def as_dict(self) -> dict[str, Any]:
        return {"requested": self.requested, "ran": self.ran, "detail": self.detail, "graphs": self.counter.graphs,
                "compile_s": self.counter.seconds, "warmup_graphs": self.warmup_graphs, "warmup_s": self.warmup_s,
                "recompiles": self.recompiles,
                "recompile_steps": [i for i, n in enumerate(self.graphs_per_step) if n],
                "cache": self.cache.as_dict() if self.cache else None}


def compile_unavailable(device: torch.device) -> str | None:
    """Why Inductor cannot run on ``device`` here, or None when it can."""
    if device.type == "cuda":  # CUDA and ROCm builds both: Inductor writes Triton kernels
        from torch.utils._triton import has_triton

        return None if has_triton() else "Triton is not installed for this torch build"
    if device.type == "cpu":
        compiler = os.environ.get("CXX", "c++")
        return None if shutil.which(compiler) or shutil.which("g++") else f"no C++ compiler ({compiler}) on PATH"
    return f"Inductor does not support device type {device.type!r}"


def compile_layers(model: Any, device: torch.device, mode: str, cache_folder: Path | None = None,
                   settings: Mapping[str, Any] | None = None) -> CompileState:
    """Compile each decoder layer of ``model`` in place, as ``mode`` (TrainConfig.compile) asks and Inductor can.

    "on" falls back to eager, with the reason recorded, where Inductor cannot run; "auto" compiles on GPUs only.
    With ``cache_folder``, the compile cache of this machine and ``settings`` is loaded first
    (:func:`open_compile_cache`; the caller saves it after the warm-up with :func:`save_compile_cache`).
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
    if cache_folder is not None:
        from torch._dynamo.utils import counters

        counters["inductor"].clear()  # hits and misses of this compile only
        counters["aot_autograd"].clear()
        config = model.config.to_dict() if hasattr(model, "config") else {}
        state.cache = open_compile_cache(cache_folder, compile_cache_key(device, config, settings or {}))
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
