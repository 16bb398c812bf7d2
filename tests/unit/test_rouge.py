"""The `rouge_l` metric and a jsonl row's `references`: ROUGE-L F-measures against hand-derived LCS values
and against the rouge-score package's own multi-reference score; a task's score on a tiny T5 and a tiny
Llama against the mean best F-measure (x 100) of the model's greedy outputs decoded by hand; malformed
references refused with file:line."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from rouge_score import rouge_scorer

from cl_flat.config import EvaluationSection, validate_config
from cl_flat.data import Example, TaskData
from cl_flat.data.sources import read_jsonl
from cl_flat.errors import DataError
from cl_flat.evaluate import GENERATION_METRICS, evaluate_tasks, exact_match, rouge_l
from cl_flat.models import load_model
from helpers import assert_clean_failure, greedy_by_hand, write_yaml

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def f_measure(lcs: int, predicted: int, reference: int) -> float:
    """F = 2PR / (P + R) with P = lcs / |prediction|, R = lcs / |reference| (= 2·lcs / (|p| + |r|))."""
    p, r = lcs / predicted, lcs / reference
    return 0.0 if lcs == 0 else 2 * p * r / (p + r)


def test_rouge_l_against_hand_derived_lcs():
    # reference "the cat sat on the mat" (6 tokens), prediction "the cat on a mat" (5): the LCS is
    # the, cat, on, mat (4), so P = 4/5, R = 4/6, F = 8/11
    assert rouge_l("the cat on a mat", ["the cat sat on the mat"]) == pytest.approx(8 / 11)
    assert f_measure(4, 5, 6) == pytest.approx(8 / 11)
    # case and punctuation are no tokens: the same 4 of 5 and 6
    assert rouge_l("The CAT, on a mat!", ["the cat sat on the mat."]) == pytest.approx(8 / 11)
    # stemming: "running" and "runs" both become "run" (Porter), so the LCS is he, run, home (3 of 4 and 3):
    # F = 6/7; unstemmed only he, home would match (F = 4/7)
    assert rouge_l("he was running home", ["he runs home"]) == pytest.approx(f_measure(3, 4, 3)) == \
        pytest.approx(6 / 7)
    assert rouge_scorer.RougeScorer(["rougeL"]).score("he runs home", "he was running home")["rougeL"].fmeasure \
        == pytest.approx(4 / 7)
    # words of at most 3 characters are not stemmed: "ran" and "run" differ
    assert rouge_l("ran", ["run"]) == 0.0
    # an order change: LCS of "a b c d" and "d c b a" is one token
    assert rouge_l("a b c d", ["d c b a"]) == pytest.approx(f_measure(1, 4, 4)) == pytest.approx(0.25)


def test_rouge_l_takes_the_best_reference():
    refs = ["a dog barked", "the cat sat on the mat", "mat"]
    # against each: LCS 0 (F 0); 4 of 5 and 6 (8/11); 1 of 5 and 1 (2·(1/5)·1 / (6/5) = 1/3)
    assert rouge_l("the cat on a mat", refs) == pytest.approx(8 / 11)
    assert rouge_l("the cat on a mat", refs[::-1]) == pytest.approx(8 / 11)
    assert rouge_l("the cat on a mat", ["mat"]) == pytest.approx(f_measure(1, 5, 1)) == pytest.approx(1 / 3)
    assert rouge_l("", ["anything"]) == 0.0 == rouge_l("完全", ["完全"])  # no a-z0-9 token: nothing to match


@pytest.mark.parametrize(("prediction", "references"), [
    ("the quick brown fox", ["a quick brown dog", "the fox"]),
    ("Police arrested two men on Tuesday.", ["Two men were arrested by police", "arrests made"]),
    ("generating summaries is hard", ["generated summary", "summaries are hard to generate"]),
    ("42 apples", ["forty-two apples", "42"]),
    ("nothing in common", ["zebra"]),
])
def test_rouge_l_equals_the_packages_multi_reference_score(prediction, references):
    expected = SCORER.score_multi(references, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, references) == pytest.approx(expected, abs=1e-12)


def test_exact_match_takes_any_reference():
    assert exact_match("Paris.", ["London", "paris"]) == 1.0
    assert exact_match("Paris is", ["London", "paris"]) == 0.0
    assert set(GENERATION_METRICS) == {"exact_match", "rouge_l"}


# ------------------------------------------------------------------ a task's score on tiny models


@pytest.mark.parametrize("name", ["tiny-random:t5", "tiny-random:llama"])
def test_task_score_is_the_mean_best_rouge_l_of_the_greedy_outputs(name):
    model, tokenizer = load_model(name, seed=2)
    model.eval()
    with torch.no_grad():  # letters likely, so the generations hold word tokens (not only spaces)
        model.get_output_embeddings().weight[tokenizer("abcdefgh", add_special_tokens=False)["input_ids"]] *= 8
    inputs = [f"sample number {i} " + "x" * (i % 4) for i in range(6)]  # prompts of different lengths: padding
    task = TaskData("t", "Say it.", None, "rouge_l", "{instruction}\nInput: {input}\nAnswer:",
                    (), tuple(Example(text, "unused") for text in inputs))
    texts = [greedy_by_hand(model, tokenizer, tokenizer(task.prompt(e))["input_ids"], 5) for e in task.test]
    words = [re.findall(r"[a-z0-9]+", t.lower()) for t in texts]
    assert all(words), texts
    # each example's answers, built around its own generation t[i] (n[i] tokens): t itself; t plus a word;
    # unrelated words, then t between two words; unrelated only; t upper-cased with punctuation; t's first token
    t = texts
    answers = [(t[0],), (t[1] + " zebra",), ("zebra", f"quail {t[2]} yak"), ("zebra yak",), (t[4].upper() + "!",),
               (words[5][0],)]
    task = dataclasses.replace(task, test=tuple(Example(e.input, a[0], references=a)
                                                for e, a in zip(task.test, answers)))
    section = EvaluationSection(metric="rouge_l", batch_size=4, max_samples_per_task=None, max_new_tokens=5)
    score = evaluate_tasks(model, tokenizer, [task], section, max_length=128, seed=0, device="cpu")
    package = [max(SCORER.score(a, t)["rougeL"].fmeasure for a in ans) for t, ans in zip(texts, answers)]
    assert score == [pytest.approx(100 * sum(package) / len(package))]
    n = [len(w) for w in words]  # the same values by hand: F = 2·LCS / (|t| + |answer|)
    by_hand = [1.0, 2 * n[1] / (2 * n[1] + 1), 2 * n[2] / (2 * n[2] + 2), 0.0, 1.0, 2 / (n[5] + 1)]
    assert package == pytest.approx(by_hand)
    # exact match on the same generations: examples 0 and 4 (t, t upper-cased with "!"), and 5 when t is its
    # first token alone
    task = dataclasses.replace(task, metric="exact_match")
    alone = texts[5].strip().lower() == words[5][0]
    assert evaluate_tasks(model, tokenizer, [task], section, max_length=128, seed=0, device="cpu") == \
        [pytest.approx(100 * (2 + alone) / 6)]


# ------------------------------------------------------------------ references in a jsonl file


def write_rows(path, rows: list) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_references_are_read_and_default_to_the_output(tmp_path):
    path = tmp_path / "gen.jsonl"
    write_rows(path, [{"input": "a", "output": "x"}, {"input": "b", "output": "y", "references": ["y", "why"]}])
    first, second = read_jsonl(path)
    assert first == Example("a", "x") and first.answers == ("x",)
    assert second.references == ("y", "why") and second.answers == ("y", "why") and second.output == "y"


@pytest.mark.parametrize("bad", ["y", [], ["y", 3], None, {"a": "y"}])
def test_malformed_references_name_file_and_line(tmp_path, bad):
    path = tmp_path / "gen.jsonl"
    write_rows(path, [{"input": "a", "output": "x"}, {"input": "b", "output": "y", "references": bad}])
    with pytest.raises(DataError, match=r"gen\.jsonl:2: \"references\" must be a non-empty list of strings"):
        read_jsonl(path)


def test_malformed_references_refused_by_validate(project, cli_here):
    tmp_path, raw = project
    write_rows(tmp_path / "senti_test.jsonl", [{"input": "a", "output": "pos"},
                                               {"input": "b", "output": "neg", "references": "neg"}])
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert_clean_failure(result, "senti_test.jsonl:2: \"references\" must be a non-empty list of strings", code=2)


# ------------------------------------------------------------------ the config and what titles say


def test_rouge_l_is_a_metric_and_titles_name_mixed_metrics():
    task = {"name": "g", "source": "builtin", "task": "food_sentiment"}
    raw = {"model": {"name_or_path": "tiny-random:llama"}, "tasks": [task, dict(task, name="h")],
           "evaluation": {"metric": "rouge_l"}}
    config = validate_config(raw, "test")
    assert config.metric_label() == "rouge_l" and config.task_metric(1) == "rouge_l"
    raw["tasks"][0]["metric"] = "accuracy"
    config = validate_config(raw, "test")
    assert [config.task_metric(i) for i in (0, 1)] == ["accuracy", "rouge_l"]
    assert config.metric_label() == "mixed metrics (accuracy, rouge_l)"
