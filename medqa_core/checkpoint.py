"""Training checkpoints: LoRA adapter, optimizer, scheduler, RNG states, progress; atomic; last K kept.

A checkpoint is a folder ``step-000040/`` holding ``adapter_model.safetensors`` (peft), ``optim.pt``
(optimizer and scheduler state: tensors and numbers only, loaded with ``weights_only=True``),
``rng.safetensors`` (torch RNG states of every device) and ``state.json`` (progress, config,
Python RNG). It is written under a temporary name and renamed into place, so a crash mid-write
leaves the previous checkpoint as the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

CHECKPOINT_SCHEMA_VERSION = 1
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or from another config or schema version."""


@dataclass(frozen=True)
class TrainProgress:
    """Where training stood after ``step`` optimizer steps (the data order follows from seed and step)."""

    step: int
    examples_seen: int
    loss_per_step: tuple[float, ...]
    step_time_s: tuple[float, ...]
    step_tokens: tuple[int, ...]


def _rng_tensors() -> dict[str, torch.Tensor]:
    """torch RNG states as uint8 tensors, for safetensors (no pickle in a checkpoint)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):  # every device (HIP on ROCm)
            tensors[f"cuda.{i}"] = state
    return tensors


def _set_rng_state(tensors: dict[str, torch.Tensor], python_state: list[Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    progress: TrainProgress, config: dict[str, Any], keep: int) -> Path:
    """Write one checkpoint under ``root`` and delete all but the newest ``keep``.

    Returns:
        The checkpoint folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp)  # adapter_model.safetensors + adapter_config.json
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        save_file(_rng_tensors(), tmp / "rng.safetensors")
        state = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "config": config, "progress": asdict(progress),
                 "python_rng": random.getstate()}
        (tmp / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint %s", final)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temporary folders are skipped)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file())


def _config_diff(found: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: checkpoint {a!r}, now {b!r}")
    return diffs


def load_checkpoint(root: Path, model: Any, optimizer: torch.optim.Optimizer, scheduler: Any,
                    config: dict[str, Any]) -> TrainProgress:
    """Restore the newest complete checkpoint under ``root`` into model, optimizer and scheduler.

    Args:
        config: the training-relevant config of this run; it must equal the checkpoint's.

    Raises:
        CheckpointError: no complete checkpoint, another schema version, or another config
            (the message lists each field that differs).
    """
    checkpoints = list_checkpoints(root)
    if not checkpoints:
        raise CheckpointError(f"{root}: no complete checkpoint to resume from")
    path = checkpoints[-1]
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    found = state.get("schema_version")
    if found != CHECKPOINT_SCHEMA_VERSION:
        raise CheckpointError(f"{path}: checkpoint schema_version {found!r}, expected {CHECKPOINT_SCHEMA_VERSION}")
    diffs = _config_diff(state["config"], config)
    if diffs:
        raise CheckpointError(f"{path}: written by another config; " + "; ".join(diffs))
    from peft import set_peft_model_state_dict

    device = next(p.device for p in model.parameters() if p.requires_grad)
    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors", device=str(device)))
    optim = torch.load(path / "optim.pt", map_location=device, weights_only=True)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    _set_rng_state(load_file(path / "rng.safetensors"), state["python_rng"])
    p = state["progress"]
    logger.info("resuming from %s (step %d)", path, p["step"])
    return TrainProgress(p["step"], p["examples_seen"], tuple(p["loss_per_step"]), tuple(p["step_time_s"]),
                         tuple(p["step_tokens"]))
