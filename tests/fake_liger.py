"""pytest plugin for tests/test_peers.py: the ``liger`` peer becomes the reference recipe under a no-op patch.

Liger's kernels need a GPU; with this plugin the bench's peer case takes its timed path on CPU (collate,
rounds, figures, ratios), through the real LigerArm and patch bookkeeping, with nothing patched.
"""

from __future__ import annotations

import pytest
import torch

from medqa_core.arms import peers
from medqa_core.arms.reference import load_reference
from medqa_core.engine.config import RunConfig
from medqa_core.measure.device import resolve_device


def load_fake_liger(cfg: RunConfig, device: torch.device | None = None) -> peers.LigerArm:
    patch, patched = peers.patch_mistral(lambda: None)
    return peers.LigerArm(load_reference(cfg, device or resolve_device(cfg.backend)), patch, patched,
                          "fake (no-op patch)", {})


def pytest_configure(config: pytest.Config) -> None:
    peers.LOADERS["liger"] = load_fake_liger
