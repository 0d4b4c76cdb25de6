"""The compiled decode path: a static cache Dynamo does not recompile, the eager tokens, one graph."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY

from medqa_core.engine.config import PRESET_COMMON
from medqa_core.engine.decoding import StaticDecoder, inductor_tuning, prefill_choice, static_cache

# Mistral-7B-v0.1 has a 4,096-token sliding window; a window of 64 puts the test's prompt + new tokens inside it.
WINDOW = 64
PROMPT, NEW = 20, 8


def _config(sliding_window: int | None):
    from transformers import MistralConfig

    return MistralConfig(**{**PRESET_COMMON, **TINY, "sliding_window": sliding_window})


def _fp32_model(device: str):
    from transformers import MistralForCausalLM

    torch.manual_seed(0)
    return MistralForCausalLM(_config(WINDOW)).to(device).eval()  # fp32: greedy tokens compare exactly


def _eager_tokens(model, ids: torch.Tensor) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                         min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]  # [B, NEW]


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize(("window", "max_len", "layers"), [(None, 32, "full"), (WINDOW, 32, "full"),
                                                           (WINDOW, WINDOW + 1, "sliding")])
def test_static_cache_is_full_within_the_window(window, max_len, layers) -> None:
    cache, kind = static_cache(_config(window), max_len)
    assert kind == layers
    assert [layer.is_sliding for layer in cache.layers] == [layers == "sliding"] * TINY["num_hidden_layers"]


@pytest.mark.parametrize("batch", [1, 2])
def test_static_decoder_gives_the_eager_tokens_from_one_graph(batch) -> None:
    # With sliding cache layers, their Python-int position made Dynamo recompile every step (7 graphs
    # for 8 tokens, then eager): the graph count is what caught it.
    model = _fp32_model("cpu")
    ids = torch.randint(3, PRESET_COMMON["vocab_size"], (batch, PROMPT))  # [B, T]
    eager = _eager_tokens(model, ids)
    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=batch, max_len=PROMPT + NEW, use_graph=True)
    before = _graphs()
    first = decoder.generate(ids, NEW)
    again = decoder.generate(ids, NEW)  # the same cache, reset in place
    assert _graphs() - before == 1  # one compiled step; the prefill ran eagerly
    assert decoder.setup.cache_layers == "full" and decoder.setup.graph == "none: graphs need a GPU"
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
    torch.testing.assert_close(decoder.generate(ids, 1), eager[:, :1], rtol=0, atol=0)  # prefill only


def test_a_compiled_prefill_gives_the_eager_tokens_and_other_lengths_run_eagerly(monkeypatch) -> None:
    # MEDQA_PREFILL=compiled on CPU: the path a GPU takes by default, less its graph
    monkeypatch.setenv("MEDQA_PREFILL", "compiled")
    model = _fp32_model("cpu")
    ids, ids2 = torch.randint(3, PRESET_COMMON["vocab_size"], (2, 2, PROMPT))  # two prompts [B, T]
    shorter = ids[:, : PROMPT - 5].clone()
    eager, eager2, eager_shorter = (_eager_tokens(model, p) for p in (ids, ids2, shorter))
    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=2, max_len=PROMPT + NEW, use_graph=True)
    assert decoder.setup.prefill.startswith("compiled: once for the first prompt's length")
    before = _graphs()
    first, second = decoder.generate(ids, NEW), decoder.generate(ids2, NEW)
    assert _graphs() - before == 2  # the step and the prefill, each compiled once
    other = decoder.generate(shorter, NEW)  # another length: an eager prefill, nothing compiled
    assert _graphs() - before == 2
    for tokens, expected in ((first, eager), (second, eager2), (other, eager_shorter),
                             (decoder.generate(ids, 1), eager[:, :1])):
        torch.testing.assert_close(tokens, expected, rtol=0, atol=0)


@pytest.mark.parametrize(("device", "env", "compiled"), [("cpu", None, False), ("cpu", "", False),
                                                         ("cpu", "compiled", True), ("cuda", None, True),
                                                         ("cuda", "", True), ("cuda", "eager", False)])
def test_the_prefill_is_compiled_on_a_gpu_or_when_asked(device, env, compiled, monkeypatch) -> None:
    if env is None:
        monkeypatch.delenv("MEDQA_PREFILL", raising=False)
    else:
        monkeypatch.setenv("MEDQA_PREFILL", env)
    on, line = prefill_choice(torch.device(device), graph=device == "cuda")
    assert on is compiled and line.startswith("compiled: " if compiled else "eager: ")
    assert ("CUDA graph" in line or "HIP graph" in line) if device == "cuda" and compiled else "graph)" not in line
    if env == "eager":  # the line compare.inference reads as an A/B arm
        assert line == "eager: MEDQA_PREFILL=eager"


def test_an_unknown_prefill_choice_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("MEDQA_PREFILL", "graph")
    with pytest.raises(ValueError, match="MEDQA_PREFILL='graph': choose one of compiled, eager"):
        StaticDecoder(_fp32_model("cpu"), batch=1, max_len=PROMPT + NEW, use_graph=False)


def test_a_step_alone_continues_the_prefill_and_stops_at_the_cache_end() -> None:
    # StaticDecoder.step is what the bench profiles: the same tokens as generate, one at a time
    model = _fp32_model("cpu")
    ids = torch.randint(3, PRESET_COMMON["vocab_size"], (1, PROMPT))
    eager = _eager_tokens(model, ids)
    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=1, max_len=PROMPT + NEW, use_graph=False)
    with pytest.raises(ValueError, match="call generate"):
        decoder.step()  # not compiled yet
    decoder.generate(ids, 2)
    decoder.generate(ids, 1)  # a fresh prefill: room for NEW more positions
    picked = []
    for _ in range(NEW):
        decoder.step()
        picked.append(decoder.token.clone())
    torch.testing.assert_close(torch.cat(picked, dim=1)[:, :NEW - 1], eager[:, 1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="at most max_len - prompt"):
        decoder.step()  # the cache is full


def test_static_decoder_refuses_what_its_cache_cannot_hold() -> None:
    decoder = StaticDecoder(_fp32_model("cpu"), batch=1, max_len=PROMPT + NEW, use_graph=False)
    with pytest.raises(ValueError, match="does not fit this decoder"):
        decoder.generate(torch.ones(1, PROMPT, dtype=torch.long), NEW + 1)
    with pytest.raises(ValueError, match="batch 1"):
        decoder.generate(torch.ones(2, PROMPT, dtype=torch.long), NEW)


def test_static_decoder_warns_beyond_the_sliding_window(caplog) -> None:
    decoder = StaticDecoder(_fp32_model("cpu"), batch=1, max_len=WINDOW + 1, use_graph=False)
    assert decoder.setup.cache_layers == "sliding"
    assert "exceeds the 64-token sliding window" in caplog.text and "recompile every step" in caplog.text


@pytest.mark.parametrize("prefill", ["eager", "compiled"])
def test_static_decoder_runs_the_qlora_model(tiny_session, prefill, monkeypatch) -> None:
    # bitsandbytes' 4-bit matmul is a registered custom op, so it stays inside the compiled step (and prefill).
    monkeypatch.setenv("MEDQA_PREFILL", prefill)
    torch._dynamo.reset()
    ids = torch.randint(3, PRESET_COMMON["vocab_size"], (1, PROMPT))
    before = _graphs()
    decoder = StaticDecoder(tiny_session.model, batch=1, max_len=PROMPT + NEW, use_graph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tokens = decoder.generate(ids, NEW)
        again = decoder.generate(ids, NEW)
    assert tokens.shape == (1, NEW) and int(tokens.min()) >= 0 and int(tokens.max()) < PRESET_COMMON["vocab_size"]
    torch.testing.assert_close(again, tokens, rtol=0, atol=0)
    assert _graphs() - before == (2 if prefill == "compiled" else 1)
    assert decoder.setup.prefill.startswith(prefill)


@pytest.mark.parametrize(("device", "env", "on"), [("cpu", "1", False), ("cuda", None, False), ("cuda", "0", False),
                                                   ("cuda", "1", True)])
def test_inductor_tunes_its_kernels_on_a_gpu_when_asked(device, env, on, monkeypatch) -> None:
    if env is None:
        monkeypatch.delenv("MEDQA_INDUCTOR_TUNING", raising=False)
    else:
        monkeypatch.setenv("MEDQA_INDUCTOR_TUNING", env)
    tune, line = inductor_tuning(torch.device(device))
    assert tune is on and line.startswith("on: " if on else "off: ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
@pytest.mark.parametrize(("batch", "tuning"), [(1, "0"), (2, "0"), (1, "1")])
def test_static_decoder_replays_one_graph_on_a_gpu(batch, tuning, monkeypatch) -> None:
    # with inductor tuning its kernels as they compile too: other block sizes, the same tokens
    monkeypatch.setenv("MEDQA_INDUCTOR_TUNING", tuning)
    model = _fp32_model("cuda")
    ids = torch.randint(3, PRESET_COMMON["vocab_size"], (batch, PROMPT), device="cuda")
    eager = _eager_tokens(model, ids)
    torch._dynamo.reset()
    decoder = StaticDecoder(model, batch=batch, max_len=PROMPT + NEW, use_graph=True)
    first, again = decoder.generate(ids, NEW), decoder.generate(ids, NEW)
    assert decoder.setup.graph == ("HIP graph" if torch.version.hip else "CUDA graph")
    assert decoder.setup.prefill.startswith("compiled: ") and decoder._prefill_graph is not None  # replayed again
    assert decoder.setup.inductor_tuning.startswith("on: " if tuning == "1" else "off: ")
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)
