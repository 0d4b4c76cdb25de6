"""The compiled decode path: a static cache Dynamo does not recompile, and the eager tokens."""

from __future__ import annotations

import pytest
import torch

from medqa_core.config import PRESET_COMMON
from medqa_core.decoding import compiled_decoding, static_cache
from tests.conftest import TINY

# Mistral-7B-v0.1 has a 4,096-token sliding window; a window of 64 puts the test's prompt + new tokens inside it.
WINDOW = 64


def _config(sliding_window: int | None):
    from transformers import MistralConfig

    return MistralConfig(**{**PRESET_COMMON, **TINY, "sliding_window": sliding_window})


@pytest.mark.parametrize(("window", "max_len", "layers"), [(None, 32, "full"), (WINDOW, 32, "full"),
                                                           (WINDOW, WINDOW + 1, "sliding")])
def test_static_cache_is_full_within_the_window(window, max_len, layers) -> None:
    cache, kind = static_cache(_config(window), max_len)
    assert kind == layers
    assert [layer.is_sliding for layer in cache.layers] == [layers == "sliding"] * TINY["num_hidden_layers"]


def test_compiled_decoding_gives_the_eager_tokens_from_one_graph() -> None:
    # Before static_cache used full layers inside the window, the sliding layers' Python-int position made
    # Dynamo recompile every step (8 graphs, then eager): the count below is what caught it.
    from torch._dynamo.utils import counters
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(_config(WINDOW)).eval()  # fp32: greedy tokens compare exactly
    ids = torch.randint(3, PRESET_COMMON["vocab_size"], (1, 20))  # [1, T]
    new = 8

    def generate(**options) -> torch.Tensor:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, pad_token_id=0, **options)

    eager = generate()
    with compiled_decoding(model, ids.shape[1] + new, "default") as decoding:
        graphs_before = counters["stats"]["unique_graphs"]
        first = generate(**decoding.generate_options())
        second = generate(**decoding.generate_options())  # the same cache, reset in place
        decoding.skip_guards()
        unguarded = generate(**decoding.generate_options())
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        assert "forward" in model.__dict__
    assert graphs == 1  # one [1, 1] decode step; the prefill ran eagerly
    assert decoding.cache_layers == "full"
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
    torch.testing.assert_close(unguarded, eager, rtol=0, atol=0)
    assert "forward" not in model.__dict__  # the class's eager forward is back
