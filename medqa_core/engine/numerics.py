"""The compute dtype a run uses (``--dtype``), chosen from what the hardware does natively.

One dtype drives everything that is not the 4-bit storage: the dtype non-quantized weights load in,
the dtype NF4 dequantizes to, and the autocast dtype of training and scoring. ``auto`` picks bf16
where the device computes it natively, else fp16 on a GPU and fp32 on a CPU: a CPU without bf16
instructions (AVX2-only x86, most laptops, many AMD EPYC and older Xeon generations) runs bf16 on an
emulated path about 70x slower than fp32. The choice and its reason go into every record.

Nothing here probes hardware at import time; :func:`cpu_isa_flags` reads /proc/cpuinfo on call.
"""

from __future__ import annotations

import contextlib
import logging
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from medqa_core.engine.config import DTYPES
from medqa_core.measure.device import NATIVE_BF16_FLAGS, cpu_has_native_bf16, cpu_isa_flags
from medqa_core.results.dtypes import DTYPE_NAMES, SHORT_NAMES

logger = logging.getLogger(__name__)

TORCH_DTYPES = {short: getattr(torch, name) for short, name in DTYPE_NAMES.items()}


class DtypeError(ValueError):
    """A --dtype value is unknown or cannot run on this device."""


@dataclass(frozen=True)
class Numerics:
    """The dtype a run computes in, what was asked for, and why this one."""

    requested: str  # a --dtype value (config.DTYPES)
    compute_dtype: str  # "bfloat16", "float16" or "float32"
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.compute_dtype)

    @property
    def short(self) -> str:
        return SHORT_NAMES[self.compute_dtype]

    def as_dict(self) -> dict[str, str]:
        return {"requested": self.requested, "compute_dtype": self.compute_dtype, "reason": self.reason}


def resolve_numerics(requested: str, device: torch.device, cpu_flags: frozenset[str] | None = None) -> Numerics:
    """The compute dtype for ``requested`` on ``device``.

    Args:
        requested: ``auto`` (bf16 where native; else fp16 on a GPU, fp32 on a CPU) or an explicit dtype.
        device: where the model runs (``cuda`` covers ROCm).
        cpu_flags: the CPU's ISA flags; default :func:`cpu_isa_flags` (tests pass fakes).

    Raises:
        DtypeError: an unknown value.
    """
    if requested not in DTYPES:
        raise DtypeError(f"unknown --dtype {requested!r}; choose one of {', '.join(DTYPES)}")
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        where = f"{torch.cuda.get_device_name(device)} {'has' if native_bf16 else 'lacks'} native bf16"
        fallback = "fp16"
    else:
        flags = cpu_isa_flags() if cpu_flags is None else cpu_flags
        capability = torch.backends.cpu.get_cpu_capability()
        native_bf16 = cpu_has_native_bf16(flags, capability)
        found = sorted(flags & NATIVE_BF16_FLAGS)
        if native_bf16:
            where = f"CPU has native bf16 ({', '.join(found)})"
        elif found:
            where = (f"CPU has {', '.join(found)} but torch runs its {capability} kernels: "
                     "bf16 would run emulated, ~70x slower than fp32")
        else:
            where = (f"CPU ({platform.machine()}) has no native bf16 (no avx512_bf16/amx_bf16/bf16 flag): "
                     "bf16 would run emulated, ~70x slower than fp32")
        fallback = "fp32"
    if requested == "auto":
        chosen = "bf16" if native_bf16 else fallback
        reason = f"auto: {where}"
    else:
        chosen, reason = requested, f"--dtype {requested}"
        if requested == "bf16" and not native_bf16:
            reason += f" although {where}"
            logger.warning("--dtype bf16: %s", where)
    return Numerics(requested, DTYPE_NAMES[chosen], reason)


@contextlib.contextmanager
def autocast(device: torch.device, numerics: Numerics) -> Iterator[None]:
    """Autocast to the run's compute dtype; plain fp32 (no autocast) when that is the dtype.

    Under autocast peft's fp32 LoRA weights run their matmuls in the compute dtype, as the reference's
    ``TrainingArguments(bf16=True)`` does; without it they would run in fp32 and keep fp32 input copies.
    """
    if numerics.torch_dtype == torch.float32:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=numerics.torch_dtype):
        yield
