"""Our NF4 kernel's launches compiled ahead, by several processes at once, into Triton's on-disk cache.

Triton compiles a kernel specialization the first time it launches, one at a time, in the launching process: a
decode tile took about 15-20 s of one CPU core for sm_90a, and a 7B decode step launches four distinct tiles (q+k+v,
o, gate+up, down), so a GPU's first decode paid a minute of compiling (the bench's ``first_call_s``: 77-95 s
without, about 30 s where a sweep had compiled them before, session 47). Here each job launches its tile once on
a small random weight of the same shape in a spawned process, so the specialization lands in the cache, and the
launch that matters loads it.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import signal

import torch

from medqa_core.engine.kernels.nf4_tiles import TileConfig


@dataclasses.dataclass(frozen=True)
class CompileJob:
    """One launch to compile: ``tile`` at ``rows`` rows on a weight of ``sizes`` rows (siblings as segments) over
    ``k`` columns, with LoRA of ``rank`` (0: none), quantized as the model's (``blocksize``, ``double_quant``),
    its input in ``dtype`` (a torch dtype's name), with a bias or not, reading tiled copies of the weights or not
    (``tiled``, v22)."""

    tile: TileConfig
    rows: int
    sizes: tuple[int, ...]
    k: int
    rank: int = 0
    blocksize: int = 64
    double_quant: bool = True
    dtype: str = "bfloat16"
    bias: bool = False
    tiled: bool = False


def _compile(job: tuple) -> str | None:
    """Worker of :func:`compile_ahead` (a spawned process): a job's launch once on a fresh weight, LoRA's chunks
    as the parent's ``LORA_MIN_CHUNK`` makes them. What went wrong, in one line, or None."""
    fields, lora_min_chunk, device = job
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import quantize_4bit

        from medqa_core.engine.kernels import nf4_matmul as kernels
        from medqa_core.engine.kernels.nf4_matmul import nf4_matmul
        from medqa_core.engine.kernels.nf4_weight import nf4_weight, tile_nf4

        kernels.LORA_MIN_CHUNK = lora_min_chunk
        j = CompileJob(**{**fields, "tile": TileConfig(**fields["tile"])})
        dtype = getattr(torch, j.dtype)
        n = sum(j.sizes)
        weights = []
        for size in j.sizes:  # each sibling quantized alone, as a model's layers are
            w = torch.randn(size, j.k, device=device, dtype=dtype) * 0.02
            packed, state = quantize_4bit(w, blocksize=j.blocksize, quant_type="nf4",
                                          compress_statistics=j.double_quant)
            weight = nf4_weight(bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, bnb_quantized=True))
            weights.append(tile_nf4(weight, j.tile) if j.tiled else weight)
        x = torch.randn(j.rows, j.k, device=device, dtype=dtype)
        lora = {}
        if j.rank:
            lora = dict(lora_a=torch.randn(j.rank * len(j.sizes), j.k, device=device, dtype=dtype) * 0.02,
                        lora_b=torch.randn(n, j.rank, device=device, dtype=dtype) * 0.02, scaling=[2.0] * len(j.sizes))
        bias = torch.zeros(n, device=device, dtype=dtype) if j.bias else None
        nf4_matmul(x, weights if len(weights) > 1 else weights[0], bias, config=j.tile, **lora)
        return None
    except Exception as e:  # the launch itself compiles what failed here, and reports it there
        return f"{type(e).__name__}: {e}"[:200]


def compile_ahead(jobs: list[CompileJob], device: torch.device, workers: int,
                  timeout_s: float = 600.0) -> list[str | None]:
    """Every job's kernel compiled by ``workers`` spawned processes at once into Triton's on-disk cache. All the
    jobs go to one pool: a pool per shape paid its processes' start each time (session 43: 56-58 s each for 29
    tiles on 8 processes). One line per job, None where it compiled; a pool that fails (its workers ended by a
    SIGINT too) or outlasts ``timeout_s`` is reported and left (the launches compile what is missing). A
    KeyboardInterrupt of the calling thread stops the workers and is raised again, for the caller's handler."""
    from medqa_core.engine.kernels import nf4_matmul as kernels

    args = [(dataclasses.asdict(j), kernels.LORA_MIN_CHUNK, str(device)) for j in jobs]
    pool = concurrent.futures.ProcessPoolExecutor(max(1, min(workers, len(args))),
                                                  mp_context=multiprocessing.get_context("spawn"),
                                                  initializer=_exit_on_sigint)
    try:
        done = list(pool.map(_compile, args, timeout=timeout_s))
        pool.shutdown()
        return done
    except KeyboardInterrupt:  # the caller's own Ctrl-C: its handler has the one line to say
        _stop(pool)
        raise
    except Exception as e:  # a broken or slow pool (its workers ended by a signal too) costs its head start only
        _stop(pool)
        return [f"compile ahead: {type(e).__name__}: {str(e)[:200]}"] * len(jobs)


def _exit_on_sigint() -> None:
    """A worker's SIGINT handler. Ctrl-C, or a time limit's SIGINT, reaches the whole process group: a worker
    ends at once, with no traceback (an idle one would print its KeyboardInterrupt's), and the pool then reports
    itself broken to the caller, which goes on without the head start."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))


def _stop(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    """No worker left compiling and launching while the caller times its kernels (the executor has no public
    way)."""
    for process in list(getattr(pool, "_processes", {}).values()):
        process.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
