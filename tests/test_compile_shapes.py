"""A compiled run compiles its graphs in the warm-up and none while it trains, over batches of every shape."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from medqa_core.engine.config import LoraSettings, TrainConfig
from medqa_core.engine.data import ROW_MULTIPLE, TrainExample, collate_packed, encode_train, iter_batches, load_medqa
from medqa_core.engine.model import add_lora, load_base_model, load_tokenizer
from medqa_core.engine.numerics import resolve_numerics
from medqa_core.engine.train import prepare_training

CPU = torch.device("cpu")
NUMERICS = resolve_numerics("auto", CPU)
PACK_LEN = 512


def test_static_shape_batches_have_one_width_and_even_row_counts() -> None:
    examples = [TrainExample(tuple(range(1, n + 1)), (-100,) * (n - 1) + (7,)) for n in (300, 250, 200, 90, 40)]
    for k in range(1, len(examples) + 1):
        batch = collate_packed(examples[:k], 0, PACK_LEN, static_shape=True)
        rows, width = batch["input_ids"].shape
        assert width == PACK_LEN and rows % ROW_MULTIPLE == 0
        assert int(batch["n_tokens"]) == sum(e.n_tokens for e in examples[:k])  # pad rows add no real tokens
        dynamic = collate_packed(examples[:k], 0, PACK_LEN)
        assert (batch["labels"] != -100).sum() == (dynamic["labels"] != -100).sum()  # the same loss positions


@pytest.fixture(scope="module")
def model_and_examples(tiny_model_dir):
    from medqa_core.engine.data import bundled_data_dir, find_split

    torch.manual_seed(0)
    base = load_base_model(tiny_model_dir, dataclasses.replace(_model_config(tiny_model_dir)), CPU, "sdpa",
                           NUMERICS.torch_dtype)
    model = add_lora(base, dataclasses.replace(LoraSettings(), dropout=0.0))
    tok = load_tokenizer(tiny_model_dir)
    items = load_medqa(find_split(bundled_data_dir(), "dev"), limit=40)
    return model, tok, [encode_train(tok, item, 512) for item in items]


def _model_config(folder):
    from medqa_core.engine.config import ModelConfig

    return ModelConfig(path=str(folder))


@pytest.fixture()
def trainer(model_and_examples):
    """Our training step on the tiny model, compiled; Dynamo's graphs counted through "aot_eager".

    Dynamo decides what compiles and when (guards, automatic dynamic shapes) whatever the backend; the
    "aot_eager" backend traces forward and backward as Inductor's does but generates no code, so these tests
    count the same graphs in seconds instead of minutes.
    """
    from medqa_core.engine.attention import resolve_attention

    model, tok, _ = model_and_examples
    cfg = TrainConfig(batch_size=6, pack_len=PACK_LEN, compile="on")
    step = prepare_training(model, cfg, CPU, resolve_attention("sdpa"), tok.pad_token_id, NUMERICS)
    if not step.compiled.ran:
        step.close()
        pytest.skip(f"torch.compile cannot run here: {step.compiled.detail}")
    step.compiled.counter.backend = "aot_eager"
    yield step
    step.close()
    torch._dynamo.reset()


def _two_epochs(examples, trainer):
    """Two epochs of 40 questions at 6 a batch: batches of 6 and the short last batch of 4, of varying lengths."""
    batches = iter_batches(examples, trainer.cfg.batch_size, trainer.cfg.seed)
    return [next(batches)[1] for _ in range(14)]


@pytest.mark.slow
def test_no_graph_compiles_after_the_warm_up(model_and_examples, trainer) -> None:
    steps = _two_epochs(model_and_examples[2], trainer)
    shapes = {tuple(trainer.collate(b)["input_ids"].shape) for b in steps}
    assert len(shapes) >= 2 and {w for _, w in shapes} == {PACK_LEN}  # row counts vary, one width
    assert any(len(b) < trainer.cfg.batch_size for b in steps)  # the last short batch is among them
    trainer.warm_up(trainer.collate(steps[0]))
    warm = trainer.compiled.counter.graphs
    # A bounded few (4 here, and 4 on an H200 with Inductor at d98e716), whatever the batches to come.
    assert 1 <= warm <= 4 and trainer.compiled.warmup_graphs == warm
    for step in steps:
        assert trainer(trainer.collate(step)) > 0
    assert trainer.compiled.graphs_per_step == [0] * len(steps)
    assert trainer.compiled.as_dict()["recompiles"] == 0 and trainer.compiled.counter.graphs == warm


@pytest.mark.slow
def test_dynamic_shapes_would_recompile_without_the_static_collate(model_and_examples, trainer) -> None:
    """The contrast that makes the test above mean something: the old row-width-per-batch collate recompiles."""
    pad_id = model_and_examples[1].pad_token_id
    for step in _two_epochs(model_and_examples[2], trainer):
        trainer(collate_packed(step, pad_id, PACK_LEN))  # widths vary per batch
    # Graphs compiled after the first step (which compiles the first width's): a later width compiled again
    assert sum(trainer.compiled.graphs_per_step[1:]) >= 1
