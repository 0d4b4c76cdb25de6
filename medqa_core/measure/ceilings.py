"""Hardware ceilings measured in the same run: peak bf16 matmul FLOP/s, copy bandwidth, energy.

MFU is reported twice: against the datasheet peak (medqa_core.measure.flops, the figure others quote) and
against these measured numbers, which hold for the clocks, driver and power cap the run actually had.
Nothing here probes hardware at import time; every measurement happens on call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

import torch

from medqa_core.measure.timing import Stats, Timer

logger = logging.getLogger(__name__)

# Matrix side for the FLOP/s probe. 8192 keeps tensor cores saturated on an H100/MI300 (one
# matmul is ~1.1 TFLOP); on a 2-core AMX Xeon 2048 takes ~10 ms. A slower CPU halves it, not below 256.
MATMUL_N_GPU = 8192
# A GPU is probed at several sides and the best rep wins: a cold clock or a throttled start reads low,
# never high, so the maximum is the ceiling (one side alone read 15% under a later run on an H200).
MATMUL_SIDES_GPU = (4096, 8192, 16384)
MATMUL_N_CPU = 2048
MATMUL_N_MIN = 256
# Copy probe buffer: far larger than any L2/LLC (50 MB on H100, 256 MB on MI300X's Infinity Cache),
# so the copy streams through HBM/DRAM.
COPY_BYTES_GPU = 2 * 2**30
COPY_BYTES_CPU = 256 * 2**20
# Each timed rep runs enough back-to-back ops to last this long: a sync and a clock read cost
# ~10 us, which would be 1% of a single 1 ms matmul.
MIN_REP_S = 0.02
REPS = 7
CPU_BUDGET_S = 1.5  # per probe on CPU, so the bench's start-up stays short


class HardwareProbeError(RuntimeError):
    """A ceiling cannot be measured on this device."""


def _time_op(op: Callable[[], None], device: torch.device, reps: int, budget_s: float | None) -> Stats:
    """Seconds per call of ``op``: median of ``reps`` timed reps after a warm-up call.

    Each rep runs ``op`` ``inner`` times between two synchronizations, with ``inner`` chosen from
    the warm-up so a rep lasts at least ``MIN_REP_S``; ``budget_s`` caps the total time.
    """
    with Timer(device) as warm:  # first call: allocator, kernel selection, oneDNN/cuBLAS init
        op()
    with Timer(device) as probe:
        op()
    one_s = max(probe.elapsed_s, 1e-7)
    inner = max(1, int(MIN_REP_S / one_s))
    if budget_s is not None:
        reps = max(3, min(reps, int(budget_s / (one_s * inner))))
    logger.debug("probe: warm-up %.4f s, one call %.6f s, %d reps x %d calls", warm.elapsed_s, one_s, reps, inner)
    per_call: list[float] = []
    for _ in range(reps):
        with Timer(device) as timer:
            for _ in range(inner):
                op()
        per_call.append(timer.elapsed_s / inner)
    return Stats.from_values(per_call)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: int | None = None,
                         reps: int = REPS) -> float:
    """Peak matmul throughput of ``device``, measured now.

    Args:
        device: where to run (``cuda`` covers ROCm too).
        dtype: element type; bf16 is what the NF4 layers compute in.
        n: side of the square matrices; default ``MATMUL_N_GPU`` on a GPU, ``MATMUL_N_CPU`` on CPU
            (halved while a call is too slow for ``CPU_BUDGET_S``).
        reps: timed reps; their median is used. On CPU fewer run if they would exceed ``CPU_BUDGET_S``.

    Returns:
        FLOP/s: ``2 n^3`` per matmul over the fastest rep's seconds per matmul; on a GPU with ``n``
        unset, the best over :data:`MATMUL_SIDES_GPU`.

    Raises:
        HardwareProbeError: the device cannot multiply matrices of ``dtype``.
    """
    if n is None and device.type == "cuda":
        return max(measure_matmul_flops(device, dtype, side, reps) for side in MATMUL_SIDES_GPU)
    cpu = device.type == "cpu"
    sized_down = n is None and cpu  # a CPU without bf16 units can be 50x slower than this one
    n = n or (MATMUL_N_GPU if device.type == "cuda" else MATMUL_N_CPU)
    gen = torch.Generator(device=device).manual_seed(0)
    try:
        while True:
            a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # [n, n]
            b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)  # [n, n]
            out = torch.empty(n, n, device=device, dtype=dtype)
            with Timer(device) as first:
                torch.mm(a, b, out=out)
            # _time_op makes at least 5 calls: halve n until they fit the budget.
            if not sized_down or n <= MATMUL_N_MIN or 5 * first.elapsed_s <= CPU_BUDGET_S:
                break
            n //= 2
        stats = _time_op(lambda: torch.mm(a, b, out=out), device, reps, CPU_BUDGET_S if cpu else None)
    except RuntimeError as e:
        raise HardwareProbeError(f"{dtype} matmul of {n}x{n} failed on {device}: {str(e).splitlines()[0]}") from e
    flops = 2 * n**3 / stats.min  # the best rep: slowness is noise here, speed is the ceiling
    logger.info("measured %s matmul on %s: %.3g FLOP/s (n=%d, best of %d reps, IQR %.2g s)", dtype, device, flops,
                n, stats.n, stats.iqr)
    return flops


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = REPS) -> float:
    """Device memory bandwidth of a large device-to-device copy, measured now.

    Args:
        device: where the buffers live.
        nbytes: size of the copied buffer; default ``COPY_BYTES_GPU`` on a GPU, ``COPY_BYTES_CPU`` on CPU.
        reps: timed reps; their median is used.

    Returns:
        Bytes/s counting the read and the write: ``2 * nbytes`` over the median seconds per copy.

    Raises:
        HardwareProbeError: the buffers cannot be allocated or copied.
    """
    nbytes = nbytes or (COPY_BYTES_GPU if device.type == "cuda" else COPY_BYTES_CPU)
    try:
        src = torch.ones(nbytes, device=device, dtype=torch.uint8)  # [nbytes]; ones: pages really mapped
        dst = torch.empty_like(src)
        stats = _time_op(lambda: dst.copy_(src), device, reps, CPU_BUDGET_S if device.type == "cpu" else None)
    except RuntimeError as e:
        raise HardwareProbeError(f"copy of {nbytes} bytes failed on {device}: {str(e).splitlines()[0]}") from e
    bandwidth = 2 * nbytes / stats.median
    logger.info("measured copy bandwidth on %s: %.3g B/s (%d bytes, IQR %.2g s)", device, bandwidth, nbytes,
                stats.iqr)
    return bandwidth


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads to produce one token (batch 1).

    Counts every parameter's storage (a 4-bit weight is its packed uint8 buffer) plus each
    bitsandbytes quant state's absmax (and the nested absmax of double quantization). The input
    embedding table counts one row, since a step looks up one token, unless it is tied to the LM
    head, which reads all of it.

    Args:
        model: a causal LM, peft-wrapped or not.

    Returns:
        Bytes; the decode roofline is (memory bandwidth) / this.
    """
    total = 0
    for param in model.parameters():
        total += param.numel() * param.element_size()
        state = getattr(param, "quant_state", None)
        if state is not None:
            total += state.absmax.numel() * state.absmax.element_size()
            nested = getattr(state, "state2", None)
            if getattr(state, "nested", False) and nested is not None:
                total += nested.absmax.numel() * nested.absmax.element_size()
    embed = model.get_input_embeddings().weight  # [V, H]
    head = model.get_output_embeddings()
    if head is None or head.weight is not embed:
        total -= embed.numel() * embed.element_size() - embed.shape[1] * embed.element_size()
    return total


class EnergyMeter:
    """Reads a GPU's cumulative energy counter: NVML on NVIDIA (Volta and newer), amdsmi on ROCm.

    ``source`` is ``"unavailable"`` (with ``reason``) on CPU, without the Python bindings
    (``nvidia-ml-py`` / ``amdsmi``), or where the driver does not expose the counter; callers then
    report the string ``"unavailable"`` rather than a number.

    Example::

        with EnergyMeter(device) as meter:
            start = meter.read_j()
            work()
            joules = meter.read_j() - start  # only when meter.available
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source = "unavailable"
        self.reason: str | None = None
        self._read: Callable[[], float] | None = None
        self._close: Callable[[], None] | None = None
        if device.type != "cuda":
            self.reason = f"no energy counter for device type {device.type!r}"
        elif torch.version.hip:
            self._open_amdsmi()
        else:
            self._open_nvml()
        if self._read is not None:
            try:
                self._read()
            except Exception as e:  # the binding's own error types differ by version; report, don't raise
                self._fail(f"{self.source} counter read failed: {e}")
        logger.info("energy meter on %s: %s%s", device, self.source, f" ({self.reason})" if self.reason else "")

    def _fail(self, reason: str) -> None:
        if self._close is not None:
            self._close()
        self.source, self.reason, self._read, self._close = "unavailable", reason, None, None

    def _open_nvml(self) -> None:
        try:
            import pynvml  # distributed as nvidia-ml-py
        except ImportError:
            self.reason = "pynvml not importable; pip install nvidia-ml-py"
            return
        try:
            # torch maps its device index to NVML's, honouring CUDA_VISIBLE_DEVICES (also used by
            # torch.cuda.power_draw); private, so a missing helper is reported, not worked around.
            handle = torch.cuda._get_pynvml_handler(self.device)
        except (AttributeError, ImportError, RuntimeError, pynvml.NVMLError) as e:
            self.reason = f"no NVML handle for {self.device}: {e}"
            return
        # NVML reports millijoules since the driver was loaded.
        self.source = "nvml"
        self._read = lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1e3
        self._close = pynvml.nvmlShutdown

    def _open_amdsmi(self) -> None:
        try:
            import amdsmi
        except ImportError:
            self.reason = "amdsmi not importable; install the amdsmi package shipped with ROCm"
            return
        try:
            handle = torch.cuda._get_amdsmi_handler(self.device)
        except (AttributeError, ImportError, RuntimeError, amdsmi.AmdSmiException) as e:
            self.reason = f"no amdsmi handle for {self.device}: {e}"
            return

        def read() -> float:
            count: dict[str, Any] = amdsmi.amdsmi_get_energy_count(handle)
            # The accumulator is "power" in ROCm 6.0-6.1 bindings, "energy_accumulator" later;
            # counter_resolution is microjoules per count.
            ticks = count.get("energy_accumulator", count.get("power"))
            return float(ticks) * float(count["counter_resolution"]) / 1e6

        self.source = "amdsmi"
        self._read = read
        self._close = amdsmi.amdsmi_shut_down

    @property
    def available(self) -> bool:
        return self._read is not None

    def read_j(self) -> float:
        """The cumulative energy counter now, in joules (differences of two readings are what matter).

        Raises:
            RuntimeError: the meter is unavailable; check :attr:`available` first.
        """
        if self._read is None:
            raise RuntimeError(f"energy meter unavailable on {self.device}: {self.reason}")
        return self._read()

    def close(self) -> None:
        """Shut the NVML/amdsmi session down; the meter is unavailable afterwards."""
        if self._close is not None:
            self._close()
        self._read = self._close = None
        if self.source != "unavailable":
            self.source, self.reason = "unavailable", "closed"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
