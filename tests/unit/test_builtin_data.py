"""Unit tests for the builtin, download-free benchmark (cl_flat.data.builtin)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cl_flat.data.builtin import (
    BUILTIN_TASKS,
    BuiltinTask,
    builtin_examples,
    split_of_text,
)
from cl_flat.errors import DataError

TASKS = list(BUILTIN_TASKS)


def test_registry_is_nonempty_and_well_formed():
    assert len(TASKS) >= 3
    for name, task in BUILTIN_TASKS.items():
        assert isinstance(task, BuiltinTask)
        assert task.name == name
        assert task.instruction.strip()
        assert len(task.labels) >= 2
        assert len(set(task.labels)) == len(task.labels)
        assert all(label and label == label.strip() for label in task.labels)


@pytest.mark.parametrize("task", TASKS)
def test_sample_for_label_returns_text(task):
    spec = BUILTIN_TASKS[task]
    rng = random.Random(0)
    for label in spec.labels * 10:
        text = spec.sample_for_label(rng, label)
        assert isinstance(text, str) and text.strip()
    with pytest.raises(ValueError):
        spec.sample_for_label(rng, "not-a-label")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_deterministic(task, split):
    a = builtin_examples(task, split, 40, seed=7)
    b = builtin_examples(task, split, 40, seed=7)
    assert a == b
    assert len(a) == 40
    assert all(set(row) == {"input", "output"} for row in a)


@pytest.mark.parametrize("task", TASKS)
def test_different_seed_gives_different_rows(task):
    a = builtin_examples(task, "train", 40, seed=0)
    b = builtin_examples(task, "train", 40, seed=1)
    assert a != b
    assert {r["input"] for r in a} != {r["input"] for r in b}


def test_different_tasks_and_splits_use_different_streams():
    a = builtin_examples("food_sentiment", "train", 20, seed=0)
    b = builtin_examples("service_sentiment", "train", 20, seed=0)
    c = builtin_examples("food_sentiment", "test", 20, seed=0)
    assert [r["input"] for r in a] != [r["input"] for r in b]
    assert [r["input"] for r in a] != [r["input"] for r in c]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("n", [1, 7, 64, 101])
def test_labels_balanced(task, n):
    labels = BUILTIN_TASKS[task].labels
    rows = builtin_examples(task, "train", n, seed=3)
    counts = Counter(r["output"] for r in rows)
    assert sum(counts.values()) == n
    full = [counts.get(label, 0) for label in labels]
    assert max(full) - min(full) <= 1
    # round robin: the first n % L labels get the extra example
    expected = Counter(labels[i % len(labels)] for i in range(n))
    assert counts == expected


@pytest.mark.parametrize("task", TASKS)
def test_rows_are_shuffled_not_round_robin(task):
    labels = BUILTIN_TASKS[task].labels
    rows = builtin_examples(task, "train", 60, seed=0)
    round_robin = [labels[i % len(labels)] for i in range(60)]
    assert [r["output"] for r in rows] != round_robin


@pytest.mark.parametrize("task", TASKS)
def test_outputs_are_task_labels(task):
    labels = set(BUILTIN_TASKS[task].labels)
    for split in ("train", "test"):
        for row in builtin_examples(task, split, 100, seed=11):
            assert row["output"] in labels
            assert row["input"].strip()


@pytest.mark.parametrize("task", TASKS)
def test_no_train_test_overlap(task):
    train = builtin_examples(task, "train", 500, seed=0)
    # different seeds for the two splits must not create overlap either
    test_a = builtin_examples(task, "test", 200, seed=0)
    test_b = builtin_examples(task, "test", 200, seed=5)
    train_inputs = {r["input"] for r in train}
    assert not train_inputs & {r["input"] for r in test_a}
    assert not train_inputs & {r["input"] for r in test_b}
    assert all(split_of_text(r["input"]) == "train" for r in train)
    assert all(split_of_text(r["input"]) == "test" for r in test_a)


def test_no_overlap_across_tasks_and_splits():
    train = {r["input"] for t in TASKS for r in builtin_examples(t, "train", 200, seed=0)}
    test = {r["input"] for t in TASKS for r in builtin_examples(t, "test", 100, seed=0)}
    assert not train & test


@pytest.mark.parametrize("task", TASKS)
def test_inputs_unique_within_split(task):
    rows = builtin_examples(task, "train", 400, seed=0)
    assert len({r["input"] for r in rows}) == len(rows)


def test_sentiment_label_follows_target_aspect_clause():
    # food_sentiment: the food clause carries the label polarity
    from cl_flat.data import builtin as b

    food_words = b._ADJECTIVES["food"]
    for row in builtin_examples("food_sentiment", "train", 100, seed=0):
        text = row["input"]
        hits = {pol for pol, adjs in food_words.items() if any(f"was {a}" in text or f" {a}" in text for a in adjs)}
        assert row["output"] in hits


def test_prompt_inputs_are_short():
    for task in TASKS:
        for row in builtin_examples(task, "test", 50, seed=0):
            assert len(row["input"].split()) <= 30


def test_zero_and_negative_n():
    assert builtin_examples(TASKS[0], "train", 0, seed=0) == []
    with pytest.raises(ValueError):
        builtin_examples(TASKS[0], "train", -1, seed=0)


def test_bad_split():
    with pytest.raises(ValueError):
        builtin_examples(TASKS[0], "validation", 5, seed=0)  # type: ignore[arg-type]


def test_unknown_task_error_lists_available_names():
    with pytest.raises(DataError) as info:
        builtin_examples("no_such_task", "train", 5, seed=0)
    msg = str(info.value)
    assert "no_such_task" in msg
    for name in TASKS:
        assert name in msg
