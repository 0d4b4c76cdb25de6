"""The hardware-bound decode path: a static KV cache, the one-token decode step under ``torch.compile``.

Eager ``generate`` at batch 1 is bound by Python and kernel launches, not by the device (a few percent
of the memory-bandwidth roofline), so CUDA and ROCm would look alike for the wrong reason. Here the
prompt's prefill runs eagerly, as transformers' own generate-compile does: the static cache allocates
and marks its tensors as static addresses there, which CUDA/HIP graphs ("reduce-overhead") need to
replay in-place cache updates. Each one-token step then runs one compiled graph with fixed shapes.

Once warm, Dynamo's guard checks (on every parameter and quantization state of the model) cost more
host time per step than the GPU work (about 5 ms on an H200, measured with torch.profiler). With a
single graph there is nothing for the guards to choose between, so after warm-up the caller may
skip them (``skip_guards``), as torch's ``set_stance(skip_guard_eval_unsafe=True)`` intends.

transformers' automatic generate-compile refuses bitsandbytes models, so :func:`compiled_decoding`
does what it would do and tells ``generate`` not to try (``disable_compile``).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class StaticDecoding:
    """``generate`` options for the compiled decode path, and what it ran with.

    Attributes:
        mode: the ``torch.compile`` mode of the one-token step.
        cache_layers: "full" or "sliding" (see :func:`static_cache`).
        cache: the static KV cache, reused (reset) by every ``generate`` call so its addresses stay fixed.
        guards_skipped: whether steps run without Dynamo's guard checks (after :meth:`skip_guards`).
    """

    mode: str
    cache_layers: str
    cache: Any
    _cache_kwarg: str
    guards_skipped: bool = False

    def skip_guards(self) -> None:
        """From now on, run the compiled step without guard checks. Call only once it has compiled and run."""
        self.guards_skipped = True

    def generate_options(self) -> dict[str, Any]:
        """Keyword arguments for one ``generate`` call; resets the cache in place first."""
        self.cache.reset()
        return {self._cache_kwarg: self.cache, "disable_compile": True}


def static_cache(config: Any, max_len: int) -> tuple[Any, str]:
    """A ``StaticCache`` for ``max_len`` tokens of a model with ``config``, and its layer kind.

    A config with a sliding window gets sliding static layers, which keep the position as a Python int:
    Dynamo specializes on it and recompiles every decode step until its limit (8), then runs eagerly.
    While ``max_len`` fits in the window, a sliding layer attends to exactly what a full layer does, so
    full layers are used then.

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


@contextmanager
def compiled_decoding(model: Any, max_len: int, mode: str) -> Iterator[StaticDecoding]:
    """Within: ``model`` (a peft or transformers causal LM) decodes one token per compiled step.

    Args:
        model: the model ``generate`` is called on.
        max_len: prompt plus new tokens; the static cache holds exactly this many.
        mode: ``torch.compile`` mode of the decode step ("reduce-overhead": CUDA/HIP graphs).

    Yields:
        The options to pass to each ``generate`` call. On exit the model's eager forward is back and
        Dynamo's compiled graphs (and their graph memory pools) are dropped.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    eager = type(base).forward.__get__(base)
    # dynamic=False: a single graph for the [B, 1] step, no symbolic shapes.
    step = torch.compile(eager, mode=mode, dynamic=False)

    # transformers 5.24 names generate's cache argument `cache`; earlier 5.x `past_key_values`.
    kwarg = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    cache, layers = static_cache(base.config, max_len)
    decoding = StaticDecoding(mode=mode, cache_layers=layers, cache=cache, _cache_kwarg=kwarg)

    def forward(*args: Any, **kwargs: Any) -> Any:
        ids = kwargs.get("input_ids", args[0] if args else None)  # [B, T]
        if ids is None or ids.shape[1] != 1:
            return eager(*args, **kwargs)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=decoding.guards_skipped):
            return step(*args, **kwargs)

    torch._dynamo.reset()
    base.forward = forward
    try:
        yield decoding
    finally:
        base.__dict__.pop("forward", None)  # the class's eager forward again
        torch._dynamo.reset()
