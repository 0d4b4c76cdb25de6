"""QLoRA training and option scoring on the tiny model (CPU)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from medqa_core.engine.config import EvalConfig, LoraSettings, TrainConfig
from medqa_core.engine.data import (
    IGNORE_INDEX,
    collate,
    collate_packed,
    encode_scoring,
    encode_train,
    find_split,
    load_medqa,
    pack_rows,
)
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.model import load_adapter, load_base_model, save_adapter
from medqa_core.engine.numerics import resolve_numerics
from medqa_core.engine.session import load_session
from medqa_core.engine.train import answer_loss, token_losses, train

NUMERICS = resolve_numerics("auto", torch.device("cpu"))  # bf16 where this CPU has it natively, else fp32


def _questions(n):
    from medqa_core.engine.data import bundled_data_dir

    return load_medqa(find_split(bundled_data_dir(), "dev"), limit=n)


def test_answer_loss_equals_full_vocab_loss(tiny_session):
    """The fast path (LM head only at labelled positions) computes the same loss as transformers'."""
    tok, model = tiny_session.tokenizer, tiny_session.model
    model.eval()
    batch = collate([encode_train(tok, q, 512) for q in _questions(4)], tok.pad_token_id)
    with torch.no_grad():
        ours = answer_loss(model, batch["input_ids"], batch["labels"])
        logits = model(input_ids=batch["input_ids"]).logits.float()  # [B, T, V]
        ref = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_scoring_picks_highest_logprob_and_matches_full_forward(tiny_session):
    tok, model = tiny_session.tokenizer, tiny_session.model
    items = _questions(6)
    result = evaluate(model, tok, items, EvalConfig(batch_size=4), torch.device("cpu"), tiny_session.attention, "dev",
                      numerics=NUMERICS)
    for item, q in zip(items, result.questions, strict=True):
        assert q.pred == max(range(4), key=lambda i: q.logprobs[i])
        # Reference: lm-evaluation-harness style, each continuation scored in its own full forward.
        ex = encode_scoring(tok, [item], 2048)[0]
        for choice, cont in enumerate(ex.continuation_ids):
            ids = torch.tensor([ex.context_ids + cont])
            with torch.no_grad():
                lp = model(input_ids=ids).logits.float().log_softmax(-1)[0, len(ex.context_ids) - 1, cont[0]]
            assert abs(float(lp) - q.logprobs[choice]) < 2e-2  # bf16 compute, padded batch vs single row
    assert result.n_questions == 6 and 0.0 <= result.accuracy <= 1.0
    lo, hi = result.accuracy_ci95
    assert lo <= result.accuracy <= hi


@pytest.mark.slow
def test_qlora_overfits_a_few_questions(tiny_config):
    # No LoRA dropout: the curve then depends on the data alone, not on the dropout masks' shapes.
    session = load_session(dataclasses.replace(tiny_config, lora=LoraSettings(dropout=0.0)))
    tok, cpu = session.tokenizer, torch.device("cpu")
    questions = _questions(4)
    examples = [encode_train(tok, q, 512) for q in questions]
    before = evaluate(session.model, tok, questions, EvalConfig(), cpu, session.attention, "dev",
                      numerics=NUMERICS)
    cfg = TrainConfig(max_steps=30, batch_size=4, lr=5e-3, warmup_steps=0, timing_warmup_steps=1)
    result = train(session.model, examples, cfg, cpu, session.attention, tok.pad_token_id, session.numerics)
    after = evaluate(session.model, tok, questions, EvalConfig(), cpu, session.attention, "dev",
                      numerics=NUMERICS)
    assert result.steps == 30 and len(result.loss_per_step) == 30
    # The frozen random LM head bounds how far the answer logits can move (about 1-2 nats on this
    # model): the loss falls by most of that, and every training question ends up answered right.
    assert sum(result.loss_per_step[-5:]) / 5 < result.loss_per_step[0] - 0.8
    assert before.accuracy < 1.0 and after.accuracy == 1.0
    assert result.tokens == 30 * sum(e.n_tokens for e in examples)
    assert result.throughput.tokens_per_s > 0 and result.memory.peak_mem_gib is None  # CPU: no device memory figure


def test_adapter_round_trip_gives_identical_logprobs(tiny_config, tmp_path):
    session = load_session(tiny_config)
    tok = session.tokenizer
    examples = [encode_train(tok, q, 512) for q in _questions(4)]
    train(session.model, examples, TrainConfig(max_steps=3, batch_size=4, lr=1e-2), torch.device("cpu"),
          session.attention, tok.pad_token_id,
          session.numerics)
    save_adapter(session.model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    items = _questions(5)
    cfg, cpu = EvalConfig(batch_size=5), torch.device("cpu")
    trained = evaluate(session.model, tok, items, cfg, cpu, session.attention, "dev",
                      numerics=NUMERICS)
    reloaded = [
        evaluate(load_adapter(load_base_model(session.model_dir, tiny_config.model, cpu, "sdpa",
                                                   session.numerics.torch_dtype), tmp_path / "adapter"),
                 tok, items, cfg, cpu, session.attention, "dev", numerics=NUMERICS)
        for _ in range(2)
    ]
    # The saved adapter, loaded twice, scores bit for bit as the model that was trained in memory.
    assert [q.logprobs for q in reloaded[0].questions] == [q.logprobs for q in trained.questions]
    assert [q.logprobs for q in reloaded[1].questions] == [q.logprobs for q in trained.questions]


@pytest.mark.parametrize("loss_on", ["answer", "all"])
def test_packing_keeps_attention_within_examples(tiny_session, loss_on):
    """A packed row gives each example the loss it gets alone: no token attends across examples."""
    tok, model = tiny_session.tokenizer, tiny_session.model
    model.eval()
    examples = [encode_train(tok, q, 512, loss_on) for q in _questions(6)]
    packed = collate_packed(examples, tok.pad_token_id, row_len=1024)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples really share rows
    with torch.no_grad():
        together = token_losses(model, packed["input_ids"], packed["labels"], packed["position_ids"])
        alone = []
        for row in pack_rows([e.n_tokens for e in examples], 1024):  # the packed order
            for i in row:
                one = collate([examples[i]], tok.pad_token_id)
                alone.append(token_losses(model, one["input_ids"], one["labels"]))
    # bf16 compute: a different sequence length changes the reduction order of the matmuls.
    # (Dropping position_ids, i.e. attending across examples, moves losses by 0.06 to 0.3 here.)
    torch.testing.assert_close(together, torch.cat(alone), rtol=2e-3, atol=2e-3)


def test_packed_and_padded_steps_give_the_same_loss(tiny_session):
    tok, model = tiny_session.tokenizer, tiny_session.model
    model.eval()
    examples = [encode_train(tok, q, 512) for q in _questions(8)]
    padded, packed = collate(examples, tok.pad_token_id), collate_packed(examples, tok.pad_token_id, 2048)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # packing cut the padding
    assert int(packed["n_tokens"]) == int(padded["n_tokens"])
    with torch.no_grad():
        a = answer_loss(model, padded["input_ids"], padded["labels"])
        b = answer_loss(model, packed["input_ids"], packed["labels"], packed["position_ids"])
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_gradients_reach_every_lora_layer_after_scoring(tiny_config):
    """bitsandbytes' CPU inference repacking (no autograd) must not leak into training: after the
    eval-mode forwards of loading and scoring, every LoRA matrix of the first layer gets a gradient."""
    session = load_session(tiny_config)
    tok, cpu = session.tokenizer, torch.device("cpu")
    questions = _questions(4)
    evaluate(session.model, tok, questions, EvalConfig(), cpu, session.attention, "dev",
                      numerics=NUMERICS)
    session.model.train()
    batch = collate([encode_train(tok, q, 512) for q in questions], tok.pad_token_id)
    answer_loss(session.model, batch["input_ids"], batch["labels"]).backward()
    first = {n: p.grad for n, p in session.model.named_parameters() if ".layers.0." in n and "lora_B" in n}
    assert len(first) == 7  # q, k, v, o, gate, up, down
    assert all(g is not None and float(g.abs().max()) > 0 for g in first.values())
