"""Pick the attention kernel (--attn) and report which one actually ran.

A forced kernel that cannot run fails loudly: torch raises "No available kernel" for a forced
SDPA backend it cannot use, and we never catch that to try another.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode

from medqa_core.engine.config import ATTN_KERNELS

_SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_TRANSFORMERS_NAME = {"eager": "eager", "flex": "flex_attention", "flash_attention_2": "flash_attention_2"}

# Profiler op names -> the kernel they mean, most specific first.
_KERNEL_OPS = (
    ("_scaled_dot_product_flash_attention_for_cpu", "sdpa-flash (cpu)"),
    ("_scaled_dot_product_flash_attention", "sdpa-flash"),
    ("_scaled_dot_product_efficient_attention", "sdpa-efficient"),
    ("_scaled_dot_product_cudnn_attention", "sdpa-cudnn"),
    ("_scaled_dot_product_attention_math", "sdpa-math"),
    ("_flash_attn_forward", "flash_attention_2"),
    ("_flash_attn_varlen_forward", "flash_attention_2"),
    ("flex_attention", "flex"),
)


# torch's words (lower-cased) when a forced SDPA backend has no kernel for this device, dtype or shape.
NO_KERNEL_MESSAGES = ("no available kernel", "no viable backend")


def is_no_kernel(exc: BaseException) -> bool:
    """Whether ``exc`` is torch finding no kernel for a forced SDPA backend (a RuntimeError naming none)."""
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in NO_KERNEL_MESSAGES)


class AttentionError(ValueError):
    """The requested attention kernel is unknown or cannot run on this machine."""


@dataclass(frozen=True)
class AttentionChoice:
    """What --attn asked for, and how transformers and torch are told to run it."""

    requested: str
    attn_implementation: str  # transformers' name
    sdpa_backend: SDPBackend | None = None  # forced SDPA backend, None: torch chooses


def resolve_attention(kernel: str) -> AttentionChoice:
    """Map an --attn value to transformers' ``attn_implementation`` and an SDPA backend.

    Raises:
        AttentionError: unknown name, or a kernel whose package or torch feature is missing.
    """
    if kernel not in ATTN_KERNELS:
        raise AttentionError(f"unknown --attn {kernel!r}; choose one of {', '.join(ATTN_KERNELS)}")
    if kernel == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise AttentionError("--attn flash_attention_2 needs the flash-attn package (CUDA, or ROCm's build of it); "
                             "it is not installed. Use --attn sdpa-flash for torch's own flash kernel")
    if kernel == "flex" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise AttentionError(f"--attn flex needs torch.nn.attention.flex_attention; torch {torch.__version__} lacks it")
    if kernel.startswith("sdpa"):
        return AttentionChoice(kernel, "sdpa", _SDPA_BACKENDS.get(kernel))
    return AttentionChoice(kernel, _TRANSFORMERS_NAME[kernel])


def check_trainable(choice: AttentionChoice, device: torch.device) -> None:
    """Raise where ``choice`` cannot train on ``device``: flex attention has no backward on CPU.

    Raises:
        AttentionError: naming the kernel and what to use instead.
    """
    if choice.requested == "flex" and device.type == "cpu":
        raise AttentionError(f"flex attention has no backward on CPU (torch {torch.__version__}), so it cannot "
                             "train there; train with sdpa (a profile: add +attn=sdpa, e.g. max-speed+attn=sdpa)")


def training_attention(kernel: str, device: torch.device) -> AttentionChoice:
    """The attention kernel of the training steps (``TrainConfig.attn``), resolved and checked to train on ``device``.

    The one place a training kernel is chosen: ``run`` calls it before the model loads, ``train`` when it
    switches kernels, the bench before a case.

    Raises:
        AttentionError: an unknown or missing kernel, or one without a backward on ``device`` (flex on CPU).
    """
    choice = resolve_attention(kernel)
    check_trainable(choice, device)
    return choice


def attention_info(choice: AttentionChoice, ran: str) -> dict[str, str]:
    """What a run record and a bench case say of attention: the kernel asked for, the one that ran (see
    :func:`detect_kernel`) and transformers' implementation."""
    return {"requested": choice.requested, "ran": ran, "attn_implementation": choice.attn_implementation}


def switch_attention(model: Any, choice: AttentionChoice) -> str:
    """Run ``model`` (peft-wrapped or not) with ``choice``'s transformers implementation from now on.

    transformers reads the implementation at each forward (the mask builder and every attention layer), so
    training can run another kernel than scoring without a reload.

    Returns:
        The implementation it had before, for switching back.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if choice.attn_implementation != before:
        base.set_attn_implementation(choice.attn_implementation)
    return before


@contextlib.contextmanager
def attention_context(choice: AttentionChoice) -> Iterator[None]:
    """Force the chosen SDPA backend inside the block (forward and backward); no-op otherwise."""
    if choice.sdpa_backend is None:
        yield
        return
    with sdpa_kernel([choice.sdpa_backend]):
        yield


class _OpRecorder(TorchDispatchMode):
    """Names every aten op a block runs, without the profiler (whose native start/stop lines reach the console)."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


def detect_kernel(model: Any, input_ids: torch.Tensor, choice: AttentionChoice,
                  position_ids: torch.Tensor | None = None, autocast_dtype: torch.dtype | None = None) -> str:
    """Run one forward and name the attention op that ran.

    The ops are read off the dispatcher; flex attention, a higher-order op that no dispatch mode sees
    inside, is read off the profiler instead.

    Args:
        model: a causal LM taking ``input_ids``.
        input_ids: a small batch [B, T] on the model's device.
        choice: the resolved --attn choice (its context applies).
        position_ids: [B, T] restarting inside a row, to probe the packed (masked) path that
            training and scoring take; SDPA may pick another kernel with a mask than without.
        autocast_dtype: the run's autocast dtype (None: no autocast, fp32): SDPA picks its kernel by dtype,
            so the probe runs as training and scoring do.

    Returns:
        e.g. ``"sdpa-flash"``, ``"sdpa-math"``, or ``"eager"`` when no fused attention op ran.

    Raises:
        AttentionError: the forced kernel cannot run here (torch found no usable kernel).
    """
    from torch.profiler import ProfilerActivity, profile

    autocast = torch.autocast(input_ids.device.type, dtype=autocast_dtype) if autocast_dtype is not None \
        else contextlib.nullcontext()
    recorder = profile(activities=[ProfilerActivity.CPU]) if choice.requested == "flex" else _OpRecorder()
    try:
        with torch.no_grad(), attention_context(choice), autocast, recorder:
            model(input_ids=input_ids, position_ids=position_ids, use_cache=False)
    except RuntimeError as e:
        if not is_no_kernel(e):
            raise
        raise AttentionError(f"--attn {choice.requested} cannot run on {input_ids.device.type} with this model "
                             f"(torch: {str(e).splitlines()[0]}); pick another --attn, or sdpa to let torch choose"
                             ) from e
    names = recorder.names if isinstance(recorder, _OpRecorder) else {event.name for event in recorder.events()}
    for op, kernel in _KERNEL_OPS:
        if any(op in name for name in names):
            return kernel
    return "eager"
