"""MedQA (USMLE, 4 options) JSONL -> MedQAItem -> prompts -> token batches.

Prompts follow lm-evaluation-harness's ``medqa_4options`` task (``preprocess_medqa.py``):
``"Question: {q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:"`` with continuations
``" A"`` .. ``" D"``, so our accuracies compare with theirs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from medqa_core.engine.config import DataConfig

CHOICES = ("A", "B", "C", "D")
TARGET_DELIMITER = " "  # lm-evaluation-harness's default between prompt and continuation
REQUIRED_FIELDS = ("question", "options", "answer_idx")
IGNORE_INDEX = -100  # label value that cross-entropy skips
# The most characters one token of the Mistral-7B tokenizer stands for (its longest pieces, such as
# "▁representations" or 16 dashes, are 16; tests/test_faults.py checks it). A prompt of more than
# MAX_TOKEN_CHARS * max_len characters is more than max_len tokens, so it is refused from its length
# alone, before the tokenizer spends minutes and gigabytes on it.
MAX_TOKEN_CHARS = 16


class MedQADataError(ValueError):
    """A MedQA file is missing or a line of it is malformed."""


@dataclass(frozen=True)
class MedQAItem:
    """One question. ``qid`` is ``<file name>:<line>`` so two runs can be joined question by question."""

    qid: str
    question: str
    options: tuple[str, str, str, str]
    answer_idx: int  # 0..3, index into CHOICES
    meta_info: str | None = None


@dataclass(frozen=True)
class TrainExample:
    """A tokenized prompt + answer. ``labels`` is ``IGNORE_INDEX`` where no loss is taken."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def n_labels(self) -> int:
        """Positions with a loss (the first token has nothing before it, so it never has one)."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class ScoringExample:
    """Context tokens and the four continuations' tokens, split as lm-evaluation-harness splits them."""

    context_ids: tuple[int, ...]
    continuation_ids: tuple[tuple[int, ...], ...]  # one per choice

    @property
    def single_token(self) -> bool:
        """True when every continuation is one token: then one forward of the context scores all four."""
        return all(len(c) == 1 for c in self.continuation_ids)


def bundled_data_dir() -> Path:
    """The MedQA subset shipped with the package (first lines of the real dev and test splits)."""
    return Path(str(resources.files("medqa_core") / "data"))


def find_split(data_dir: str | Path, split: str) -> Path:
    """Path of ``split`` in ``data_dir``, accepting the names MedQA is distributed under.

    Raises:
        MedQADataError: the folder or the split file is missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise MedQADataError(f"{data_dir}: MedQA folder not found; pass --data DIR with {split}.jsonl in it")
    candidates = (
        f"{split}.jsonl",
        f"phrases_no_exclude_{split}.jsonl",
        f"US/4_options/phrases_no_exclude_{split}.jsonl",
        f"questions/US/4_options/phrases_no_exclude_{split}.jsonl",
    )
    for name in candidates:
        if (data_dir / name).is_file():
            return data_dir / name
    raise MedQADataError(f"{data_dir}: no {split} split; expected one of {', '.join(candidates)}")


def has_split(data_dir: str | Path, split: str) -> bool:
    try:
        find_split(data_dir, split)
    except MedQADataError:
        return False
    return True


def _parse_item(obj: Any, where: str, qid: str) -> MedQAItem:
    if not isinstance(obj, dict):
        raise MedQADataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in REQUIRED_FIELDS:
        if key not in obj:
            raise MedQADataError(f'{where}: missing "{key}"; each line needs {", ".join(REQUIRED_FIELDS)}')
    question, options, answer_idx = obj["question"], obj["options"], obj["answer_idx"]
    if not isinstance(question, str) or not question.strip():
        raise MedQADataError(f'{where}: "question" must be a non-empty string')
    if not isinstance(options, dict):
        raise MedQADataError(f'{where}: "options" must be an object with keys A, B, C, D')
    missing = [c for c in CHOICES if c not in options]
    if missing:
        raise MedQADataError(f'{where}: "options" lacks {", ".join(missing)}; MedQA 4-option lines have A, B, C, D')
    for c in CHOICES:
        if not isinstance(options[c], str) or not options[c].strip():
            raise MedQADataError(f'{where}: "options.{c}" is empty; every option needs text')
    if answer_idx not in CHOICES:
        raise MedQADataError(f'{where}: "answer_idx" is {answer_idx!r}; it must be one of {", ".join(CHOICES)}')
    meta = obj.get("meta_info")
    return MedQAItem(
        qid=qid, question=question, options=tuple(options[c] for c in CHOICES),  # type: ignore[arg-type]
        answer_idx=CHOICES.index(answer_idx), meta_info=meta if isinstance(meta, str) else None,
    )


def load_medqa(path: str | Path, limit: int | None = None) -> list[MedQAItem]:
    """Read a MedQA JSONL file (schema: question, options{A..D}, answer_idx, optional meta_info).

    Args:
        path: the JSONL file.
        limit: keep only the first ``limit`` questions. Every line is still checked: a malformed line past
            the limit stops the run as one before it does (parsing is milliseconds per thousand lines).

    Returns:
        The questions in file order; blank lines are skipped.

    Raises:
        MedQADataError: the file is missing, empty, not UTF-8, or a line is malformed; the
            message names the file, the line number and the field.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise MedQADataError(f"{path}: cannot read MedQA file ({e.strerror})") from e
    items: list[MedQAItem] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise MedQADataError(f"{where}: not UTF-8 text (byte {e.start}); MedQA files are UTF-8 JSONL") from e
        except json.JSONDecodeError as e:
            raise MedQADataError(f"{where}: broken JSON ({e.msg} at column {e.colno})") from e
        except (ValueError, RecursionError) as e:  # e.g. a 5,000-digit number, or nesting too deep
            raise MedQADataError(f"{where}: unreadable JSON ({str(e)[:120]})") from e
        item = _parse_item(obj, where, qid=f"{path.name}:{lineno}")
        if limit is None or len(items) < limit:
            items.append(item)
    if not items:
        raise MedQADataError(f"{path}: no questions in file")
    return items


def format_prompt(item: MedQAItem) -> str:
    """The lm-evaluation-harness ``medqa_4options`` prompt for one question."""
    options = "".join(f"{letter}. {text}\n" for letter, text in zip(CHOICES, item.options, strict=True))
    return f"Question: {item.question}\n{options}Answer:"


def continuation(choice: int) -> str:
    return TARGET_DELIMITER + CHOICES[choice]


def check_prompt_lengths(items: Sequence[MedQAItem], max_len: int, setting: str = "--max-seq-len") -> None:
    """Refuse, from character counts alone, a question whose prompt cannot fit in ``max_len`` tokens.

    Args:
        items: the questions.
        max_len: the token limit they are encoded under.
        setting: the command-line option that sets ``max_len``, for the message.

    Raises:
        MedQADataError: a prompt is longer than ``MAX_TOKEN_CHARS * max_len`` characters; names file:line.
    """
    limit = MAX_TOKEN_CHARS * max_len
    for item in items:
        # The prompt's length without building it: a 10 MB question is refused without a copy.
        n_chars = len("Question: \nAnswer:") + len(item.question) + sum(len(o) + 4 for o in item.options)
        if n_chars > limit:
            raise MedQADataError(
                f"{item.qid}: question and options are {n_chars:,} characters; more than {limit:,} "
                f"({MAX_TOKEN_CHARS} per token at most) cannot fit in {setting} {max_len} tokens; "
                f"shorten the question or raise {setting}")


def _encode(tokenizer: Any, text: str) -> list[int]:
    # The model's own special tokens (BOS for Mistral), as lm-evaluation-harness's HF model adds them.
    return list(tokenizer(text)["input_ids"])


def _move_trailing_spaces(context: str, cont: str) -> tuple[str, str]:
    """lm-evaluation-harness's split: trailing spaces of the context belong to the continuation."""
    n_spaces = len(context) - len(context.rstrip())
    return (context[:-n_spaces], context[-n_spaces:] + cont) if n_spaces else (context, cont)


def encode_pair(tokenizer: Any, context: str, cont: str) -> tuple[list[int], list[int]]:
    """Split ``context + cont`` into context and continuation tokens as lm-evaluation-harness does.

    Trailing spaces of the context move into the continuation, the whole string is encoded once,
    and the continuation is what follows the context's own encoding. A tokenizer that merges
    across the boundary therefore still scores the full continuation.
    """
    context, cont = _move_trailing_spaces(context, cont)
    whole = _encode(tokenizer, context + cont)
    context_ids = _encode(tokenizer, context)
    return context_ids, whole[len(context_ids):]


def encode_scoring(tokenizer: Any, items: Sequence[MedQAItem], max_len: int) -> list[ScoringExample]:
    """Tokens to score each question's four continuations, split as :func:`encode_pair` splits them.

    All strings go to the tokenizer in one call (a fast tokenizer encodes a batch in parallel): the
    context once per question, and context + continuation for each option.

    Raises:
        MedQADataError: a question does not fit in ``max_len`` tokens (a far too long one is refused
            from its length before anything is tokenized).
    """
    check_prompt_lengths(items, max_len, "--eval-max-seq-len")
    texts: list[str] = []
    for item in items:
        prompt = format_prompt(item)
        context = _move_trailing_spaces(prompt, "")[0]
        texts.append(context)
        texts += [context + _move_trailing_spaces(prompt, continuation(i))[1] for i in range(len(CHOICES))]
    encoded = tokenizer(texts)["input_ids"]  # the model's own special tokens, as _encode adds them
    per_item = 1 + len(CHOICES)
    examples = []
    for n, item in enumerate(items):
        context_ids, *wholes = (list(ids) for ids in encoded[n * per_item: (n + 1) * per_item])
        continuations = tuple(tuple(whole[len(context_ids):]) for whole in wholes)
        longest = len(context_ids) + max(len(c) for c in continuations)
        if longest > max_len:
            raise MedQADataError(f"{item.qid}: question is {longest} tokens, over the scoring limit {max_len}; "
                                 "raise --eval-max-seq-len")
        examples.append(ScoringExample(tuple(context_ids), continuations))
    return examples


def encode_train(tokenizer: Any, item: MedQAItem, max_len: int, loss_on: str = "answer") -> TrainExample:
    """Prompt plus the right answer's continuation, labelled for the loss.

    ``loss_on="answer"`` takes the loss on the answer tokens only; ``"all"`` on every predicted token.
    A prompt longer than ``max_len`` is cut from the left so the answer is always kept.

    Raises:
        MedQADataError: the prompt is too long to tokenize (see :func:`check_prompt_lengths`).
    """
    check_prompt_lengths([item], max_len)
    context_ids, answer_ids = encode_pair(tokenizer, format_prompt(item), continuation(item.answer_idx))
    input_ids = context_ids + answer_ids
    if loss_on == "answer":
        labels = [IGNORE_INDEX] * len(context_ids) + answer_ids
    else:
        labels = [IGNORE_INDEX] + input_ids[1:]  # the first token has nothing before it to predict it
    if len(input_ids) > max_len:
        input_ids, labels = input_ids[-max_len:], labels[-max_len:]
    return TrainExample(tuple(input_ids), tuple(labels))


def collate(examples: Sequence[TrainExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch, one example per row. Right padding keeps causal attention exact without
    a mask (real tokens never see the pads after them), so every SDPA backend, flash included, runs it.

    Returns:
        ``input_ids`` and ``labels`` [B, T] and ``n_tokens``, the count of real (non-pad) tokens.
    """
    return _collate_rows([[e] for e in examples], pad_id, packed=False)


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Group sequences into rows of at most ``row_len`` tokens (first fit, longest first).

    A sequence longer than ``row_len`` gets a row of its own.

    Returns:
        Indices into ``lengths``, one list per row.
    """
    rows: list[list[int]] = []
    space: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(space) if free >= lengths[i]), None)
        if row is None:
            rows.append([i])
            space.append(row_len - lengths[i])
        else:
            rows[row].append(i)
            space[row] -= lengths[i]
    return rows


def collate_packed(examples: Sequence[TrainExample], pad_id: int, row_len: int,
                   static_shape: bool = False) -> dict[str, torch.Tensor]:
    """Pack a batch into as few rows as fit in ``row_len`` tokens, attention kept inside each example.

    ``position_ids`` restart at 0 for each example; with no attention mask, transformers reads the
    restarts as document boundaries (block-diagonal causal mask for sdpa/eager/flex, varlen for
    flash-attention). The same examples make the same loss as :func:`collate`, with far less padding.

    Args:
        static_shape: rows always ``row_len`` wide (or the longest example, if longer) and their count
            rounded up to a multiple of :data:`ROW_MULTIPLE` with rows of pads: a compiled step then
            sees one width and few row counts, so it compiles a bounded set of graphs, not one per batch.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` [R, T] and ``n_tokens`` (real tokens).
    """
    rows: list[list[TrainExample]] = [[examples[i] for i in row] for row in
                                      pack_rows([e.n_tokens for e in examples], row_len)]
    width = None
    if static_shape:
        width = max(row_len, max(e.n_tokens for e in examples))
        rows += [[] for _ in range(-len(rows) % ROW_MULTIPLE)]
    return _collate_rows(rows, pad_id, packed=True, width=width)


# Row counts of a static-shape packed batch are multiples of this: with at least 2 rows a compiled
# layer's row dimension is never specialized to 1, and half as many counts occur as row counts would.
ROW_MULTIPLE = 2


def _collate_rows(rows: Sequence[Sequence[TrainExample]], pad_id: int, packed: bool,
                  width: int | None = None) -> dict[str, torch.Tensor]:
    width = width or max(sum(e.n_tokens for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    # Pads get positions 0, 1, ... of their own: a segment of their own that no real token attends to.
    position_ids = torch.arange(width).repeat(len(rows), 1)
    for r, row in enumerate(rows):
        start = 0
        for e in row:
            end = start + e.n_tokens
            input_ids[r, start:end] = torch.tensor(e.input_ids)
            labels[r, start:end] = torch.tensor(e.labels)
            labels[r, start] = IGNORE_INDEX  # nothing of this example precedes its first token
            position_ids[r, start:end] = torch.arange(e.n_tokens)
            start = end
        position_ids[r, start:] = torch.arange(width - start)
    batch = {"input_ids": input_ids, "labels": labels,
             "n_tokens": torch.tensor(sum(e.n_tokens for row in rows for e in row))}
    if packed:
        batch["position_ids"] = position_ids
    return batch


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """A fixed shuffle of ``range(n)`` for one epoch: the same on every machine for the same seed."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def first_examples(tokenizer: Any, items: Sequence[MedQAItem], n: int, seed: int, max_len: int,
                   loss_on: str = "answer") -> list[TrainExample]:
    """The first ``n`` training examples of epoch 0 in the training loop's own shuffle, tokenized:
    the batch a benchmark or profile steps on, as the loop would draw it."""
    return [encode_train(tokenizer, items[i], max_len, loss_on) for i in epoch_order(len(items), seed, 0)[:n]]


def iter_batches(examples: Sequence[TrainExample], batch_size: int, seed: int,
                 start_epoch: int = 0) -> Iterator[tuple[int, list[TrainExample]]]:
    """Endless ``(epoch, batch)`` pairs, reshuffled each epoch; the last short batch is kept."""
    epoch = start_epoch
    while True:
        order = epoch_order(len(examples), seed, epoch)
        for i in range(0, len(order), batch_size):
            yield epoch, [examples[j] for j in order[i : i + batch_size]]
        epoch += 1


@dataclass(frozen=True)
class Splits:
    train: list[MedQAItem]
    train_name: str
    eval: list[MedQAItem]
    eval_name: str
    notes: tuple[str, ...]


def load_splits(cfg: DataConfig, evaluates: bool = True) -> Splits:
    """The fine-tuning and evaluation questions. Without a train split, dev stands in for it.

    Args:
        evaluates: whether the job scores the evaluation split (``train`` does not: its note then names only
            the split it fine-tuned on).
    """
    data_dir = Path(cfg.data_dir) if cfg.data_dir else bundled_data_dir()
    notes: list[str] = []
    train_split = cfg.train_split
    if train_split == "auto":
        train_split = "train" if has_split(data_dir, "train") else "dev"
        if train_split == "dev":
            scored = f", evaluated on {cfg.eval_split}" if evaluates else ""
            notes.append(f"no train split in {data_dir}: fine-tuned on dev{scored}")
    train_path, eval_path = find_split(data_dir, train_split), find_split(data_dir, cfg.eval_split)
    return Splits(
        train=load_medqa(train_path, cfg.train_limit), train_name=train_path.name,
        eval=load_medqa(eval_path, cfg.eval_limit), eval_name=eval_path.name, notes=tuple(notes),
    )
