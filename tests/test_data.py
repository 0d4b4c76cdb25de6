from __future__ import annotations

import pytest
import torch
from conftest import QUESTION, write_jsonl

from medqa_core.engine.data import (
    IGNORE_INDEX,
    MedQADataError,
    bundled_data_dir,
    collate,
    continuation,
    encode_pair,
    encode_scoring,
    encode_train,
    epoch_order,
    find_split,
    format_prompt,
    load_medqa,
)


def test_prompt_is_lm_eval_medqa_4options_format(tmp_path):
    # Expected string built by hand from lm-evaluation-harness tasks/medqa/preprocess_medqa.py:
    # f"Question: {sent1}\n" + "".join(f"{k}. {v}\n") + "Answer:"
    item = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION]))[0]
    assert format_prompt(item) == (
        "Question: A 23-year-old woman has a fever. Which drug is best?\n"
        "A. Ampicillin\nB. Ceftriaxone\nC. Doxycycline\nD. Nitrofurantoin\nAnswer:"
    )
    assert item.answer_idx == 1 and item.qid == "q.jsonl:1"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('{"question": "x", "options": ', "broken JSON"),
        ({k: v for k, v in QUESTION.items() if k != "answer_idx"}, '"answer_idx"'),
        ({**QUESTION, "answer_idx": "E"}, '"answer_idx" is \'E\''),
        ({**QUESTION, "options": {**QUESTION["options"], "C": "  "}}, '"options.C" is empty'),
        ({**QUESTION, "options": {"A": "a", "B": "b", "C": "c"}}, "lacks D"),
        ({**QUESTION, "question": 7}, '"question"'),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_line_names_file_line_and_field(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "bad.jsonl", [QUESTION, QUESTION, line])
    with pytest.raises(MedQADataError) as e:
        load_medqa(path)
    assert f"{path}:3:" in str(e.value)
    assert expected in str(e.value)


def test_non_utf8_and_empty_files_are_named(tmp_path):
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"question": "caf\xe9"}\n')
    with pytest.raises(MedQADataError, match=r"latin1.jsonl:1: not UTF-8"):
        load_medqa(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(MedQADataError, match="no questions"):
        load_medqa(empty)
    with pytest.raises(MedQADataError, match="cannot read"):
        load_medqa(tmp_path / "missing.jsonl")


def test_bundled_subset_is_real_medqa():
    data_dir = bundled_data_dir()
    dev, test = load_medqa(find_split(data_dir, "dev")), load_medqa(find_split(data_dir, "test"))
    assert len(dev) == 512 and len(test) == 512
    # First test question of the real split (../shared/data/medqa/test.jsonl line 1): answer "B".
    assert test[0].question.startswith("A junior orthopaedic surgery resident")
    assert test[0].answer_idx == 1


def test_find_split_accepts_distribution_names(tmp_path):
    (tmp_path / "US" / "4_options").mkdir(parents=True)
    target = write_jsonl(tmp_path / "US" / "4_options" / "phrases_no_exclude_train.jsonl", [QUESTION])
    assert find_split(tmp_path, "train") == target
    with pytest.raises(MedQADataError, match="no dev split"):
        find_split(tmp_path, "dev")
    with pytest.raises(MedQADataError, match="folder not found"):
        find_split(tmp_path / "nope", "dev")


def test_continuations_split_like_lm_eval(tiny_session, tmp_path):
    tok = tiny_session.tokenizer
    item = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION]))[0]
    context, cont = encode_pair(tok, format_prompt(item), " B")
    # Mistral tokenizer: BOS first, " B" is one token (id 365) after "Answer:".
    assert context[0] == 1 and cont == [365]
    scoring = encode_scoring(tok, [item], max_len=512)[0]
    assert scoring.single_token and len(scoring.continuation_ids) == 4
    with pytest.raises(MedQADataError, match="over the scoring limit"):
        encode_scoring(tok, [item], max_len=20)


def test_batched_scoring_encoding_equals_one_pair_at_a_time(tiny_session):
    # One tokenizer call for all questions must split exactly as encode_pair does question by question.
    tok = tiny_session.tokenizer
    items = load_medqa(find_split(bundled_data_dir(), "test"))[:64]
    for item, example in zip(items, encode_scoring(tok, items, max_len=4096), strict=True):
        pairs = [encode_pair(tok, format_prompt(item), continuation(i)) for i in range(4)]
        assert example.context_ids == tuple(pairs[0][0])
        assert example.continuation_ids == tuple(tuple(c) for _, c in pairs)


def test_train_example_labels_only_the_answer(tiny_session, tmp_path):
    tok = tiny_session.tokenizer
    item = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION]))[0]
    ex = encode_train(tok, item, max_len=512)
    labelled = [t for t in ex.labels if t != IGNORE_INDEX]
    assert labelled == [365] and ex.input_ids[-1] == 365
    every = encode_train(tok, item, max_len=512, loss_on="all")
    assert every.labels[0] == IGNORE_INDEX and list(every.labels[1:]) == list(every.input_ids[1:])
    cut = encode_train(tok, item, max_len=16)
    assert cut.n_tokens == 16 and cut.input_ids[-1] == 365  # cut from the left: the answer stays


def test_collate_right_pads_and_counts_real_tokens(tiny_session, tmp_path):
    tok = tiny_session.tokenizer
    short = {**QUESTION, "question": "Fever?"}
    items = load_medqa(write_jsonl(tmp_path / "q.jsonl", [QUESTION, short]))
    exs = [encode_train(tok, i, 512) for i in items]
    batch = collate(exs, pad_id=2)
    assert batch["input_ids"].shape == (2, exs[0].n_tokens)
    assert int(batch["n_tokens"]) == exs[0].n_tokens + exs[1].n_tokens
    assert torch.all(batch["input_ids"][1, exs[1].n_tokens:] == 2)
    assert torch.all(batch["labels"][1, exs[1].n_tokens:] == IGNORE_INDEX)


def test_epoch_order_is_fixed_per_seed_and_epoch():
    assert epoch_order(10, seed=0, epoch=0) == epoch_order(10, seed=0, epoch=0)
    assert epoch_order(10, seed=0, epoch=0) != epoch_order(10, seed=0, epoch=1)
    assert sorted(epoch_order(10, seed=3, epoch=2)) == list(range(10))
