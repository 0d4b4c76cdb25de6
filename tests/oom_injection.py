"""pytest plugin for tests/test_bench_harness.py: one bench case runs out of memory.

Loaded with ``-p oom_injection --inject-oom NODE_ID_PART`` (tests/ on PYTHONPATH). In every case whose
node id contains NODE_ID_PART, attention raises ``torch.OutOfMemoryError``, as a batch too large for
the GPU would; the other cases run untouched.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

INJECTED_MESSAGE = "CUDA out of memory. Tried to allocate 2.00 GiB (injected by tests/oom_injection.py)"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--inject-oom", metavar="NODE_ID_PART",
                     help="make attention raise torch.OutOfMemoryError in cases whose node id contains this")


@pytest.fixture(autouse=True)
def _inject_oom(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    part = request.config.getoption("inject_oom")
    if part and part in request.node.nodeid:

        def out_of_memory(*args: Any, **kwargs: Any) -> torch.Tensor:
            raise torch.OutOfMemoryError(INJECTED_MESSAGE)

        # transformers' sdpa attention looks the function up on each call, so this reaches every layer.
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", out_of_memory)
    yield
