"""Reference-exact scoring: ``--dtype fp32 --quant none`` gives lm-evaluation-harness's log-likelihoods.

lm-evaluation-harness runs its own ``medqa_4options`` task file (prompt, choices, target and metrics
included from the installed package) on a local JSONL of the bundled test questions, offline, on the
tiny Mistral folder; medqa-parity scores the same folder. Per question, all four log-likelihoods must
agree within :data:`TOLERANCE_NATS`, packed and unpacked, and the predictions must be equal. bf16 must
not agree that closely, or the comparison could not tell the two dtypes apart.

Needs the optional ``numerics`` extra: ``pip install -e ".[numerics]"``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from medqa_core.engine.config import RunConfig
from medqa_core.engine.data import CHOICES, MedQAItem, bundled_data_dir, find_split, load_medqa
from medqa_core.engine.evaluate import evaluate
from medqa_core.engine.session import load_session

lm_eval = pytest.importorskip(
    "lm_eval", reason='lm-evaluation-harness is not installed; pip install -e ".[numerics]" to run this test')

pytestmark = pytest.mark.slow

N_QUESTIONS = 50
TOLERANCE_NATS = 1e-4  # issue 15's bar for "the same four log-likelihoods"
TASK = "medqa_4options_local"


def _to_lm_eval_fields(item: MedQAItem) -> dict[str, object]:
    """One question in the fields of GBaker/MedQA-USMLE-4-options-hf, the dataset ``medqa_4options`` reads."""
    return {"id": item.qid, "sent1": item.question, "sent2": "",
            **{f"ending{i}": text for i, text in enumerate(item.options)}, "label": item.answer_idx}


def _write_task(folder: Path, items: list[MedQAItem]) -> None:
    """A task that includes the installed ``medqa_4options`` and only points it at a local JSONL."""
    data = folder / "medqa_test.jsonl"
    data.write_text("".join(json.dumps(_to_lm_eval_fields(i)) + "\n" for i in items), encoding="utf-8")
    reference = Path(lm_eval.__file__).parent / "tasks" / "medqa" / "medqa.yaml"
    (folder / f"{TASK}.yaml").write_text(
        f"include: {reference}\n"
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {folder / 'hf-datasets'}\n"
        "training_split: null\nvalidation_split: null\ntest_split: test\n",  # zero-shot: no other split is read
        encoding="utf-8")


@pytest.fixture(scope="module")
def items() -> list[MedQAItem]:
    return load_medqa(find_split(bundled_data_dir(), "test"), limit=N_QUESTIONS)


@pytest.fixture(scope="module")
def reference_scores(tiny_model_dir: Path, items: list[MedQAItem],
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[float]]:
    """qid -> lm-evaluation-harness's four fp32 log-likelihoods (``acc``'s inputs, choice order A..D)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(var, "1")
        folder = tmp_path_factory.mktemp("lm-eval-task")
        _write_task(folder, items)
        from lm_eval.tasks import TaskManager

        started = time.perf_counter()
        out = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={tiny_model_dir},dtype=float32", tasks=[TASK],
            task_manager=TaskManager(include_path=str(folder), include_defaults=False),
            device="cpu", batch_size=8, log_samples=True, bootstrap_iters=0)
        print(f"\nlm-evaluation-harness {lm_eval.__version__}: {N_QUESTIONS} questions in "
              f"{time.perf_counter() - started:.1f} s")
    samples = out["samples"][TASK]
    assert len(samples) == len(items)
    scores = {}
    for sample in samples:
        # One request per choice; each filtered response is (log-likelihood, is_greedy).
        assert [a[1] for a in sample["arguments"]] == [f" {c}" for c in CHOICES]  # lm-eval's continuations
        scores[sample["doc"]["id"]] = [float(ll) for ll, _ in sample["filtered_resps"]]
    return scores


def _parity_scores(tiny_config: RunConfig, items: list[MedQAItem], dtype: str, quant: str,
                   packing: bool) -> dict[str, list[float]]:
    cfg = dataclasses.replace(tiny_config, model=dataclasses.replace(tiny_config.model, dtype=dtype, quant=quant),
                              eval=dataclasses.replace(tiny_config.eval, packing=packing))
    session = load_session(cfg)
    result = evaluate(session.model, session.tokenizer, items, cfg.eval, session.device, session.attention,
                      "test", numerics=session.numerics)
    return {q.qid: list(q.logprobs) for q in result.questions}


def _drift(ours: dict[str, list[float]], reference: dict[str, list[float]]) -> tuple[torch.Tensor, str]:
    """Per-question max |ours - reference| [N] and a one-line summary of it."""
    assert ours.keys() == reference.keys()
    qids = sorted(reference)
    diff = (torch.tensor([ours[q] for q in qids], dtype=torch.float64)
            - torch.tensor([reference[q] for q in qids], dtype=torch.float64)).abs()  # [N, 4]
    per_question = diff.max(dim=1).values
    worst = qids[int(per_question.argmax())]
    return per_question, (f"max |diff| {diff.max():.2e} nats ({worst}), mean {diff.mean():.2e} nats "
                          f"over {len(qids)} questions x 4 options")


def _predictions(scores: dict[str, list[float]]) -> dict[str, int]:
    return {q: max(range(len(s)), key=s.__getitem__) for q, s in scores.items()}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "unpacked"])
def test_fp32_plain_base_scores_as_lm_evaluation_harness(tiny_config, items, reference_scores, packing) -> None:
    ours = _parity_scores(tiny_config, items, dtype="fp32", quant="none", packing=packing)
    per_question, summary = _drift(ours, reference_scores)
    print(f"\nfp32 {'packed' if packing else 'unpacked'} vs lm-evaluation-harness fp32: {summary}")
    assert (per_question <= TOLERANCE_NATS).all(), f"over {TOLERANCE_NATS} nats: {summary}"
    assert _predictions(ours) == _predictions(reference_scores)
    # Not vacuous: the scores spread over far more than the tolerance.
    spread = torch.tensor(list(reference_scores.values())).std()
    assert spread > 1000 * TOLERANCE_NATS, f"reference scores spread only {spread:.2e} nats"


def test_bf16_is_measurably_not_reference_exact(tiny_config, items, reference_scores) -> None:
    # bf16 asked for by name (auto is fp32 on a CPU without native bf16); plain base, so dtype alone differs.
    ours = _parity_scores(tiny_config, items, dtype="bf16", quant="none", packing=True)
    per_question, summary = _drift(ours, reference_scores)
    reference_predictions = _predictions(reference_scores)
    flipped = sum(p != reference_predictions[q] for q, p in _predictions(ours).items())
    print(f"\nbf16 packed vs lm-evaluation-harness fp32: {summary}; {flipped} predictions differ")
    assert (per_question > TOLERANCE_NATS).any(), f"bf16 agreed with fp32 within {TOLERANCE_NATS} nats: {summary}"
