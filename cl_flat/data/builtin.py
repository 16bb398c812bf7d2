"""Builtin, download-free continual-learning benchmark: restaurant-review classification.

Design
------
Every task reads the *same kind of input*: a short synthetic restaurant review made of
two or three clauses, each clause giving an opinion on one **aspect** of the visit
(``food``, ``service``, ``price``, ``atmosphere``), e.g.::

    The soup was bland, but the waiter was really friendly.
    The decor was charming, the bill was steep, and the pasta was delicious.

Reviews are assembled from word lists and templates (aspect nouns, aspect-specific
positive / negative adjectives, intensifiers, connectives, optional openers), so any number
of examples can be generated deterministically from a seed: no data files, no downloads.
The tasks are classic aspect-based sentiment analysis (ABSA) and aspect classification:

* ``food_sentiment`` / ``service_sentiment`` / ``price_sentiment`` /
  ``atmosphere_sentiment`` -- "what is the sentiment toward <aspect>?" -> positive / negative.
  The target aspect is always mentioned; the other clauses have *independent* polarities.
* ``complaint_aspect`` -- "which aspect does the reviewer criticize?" -> food / service /
  price / atmosphere (exactly one clause is negative).
* ``praise_aspect`` -- "which aspect does the reviewer praise?" -> same four labels
  (exactly one clause is positive).

As in O-LoRA-style benchmarks, each task has its own instruction and its label options
are listed in the prompt (the prompt itself is built by the trainer, not here).

Why this produces forgetting
----------------------------
The tasks share one input distribution *and* their label words, but label the same
review differently: "The soup was bland, but the waiter was friendly." is ``negative``
for ``food_sentiment`` and ``positive`` for ``service_sentiment``; the aspect tasks give
``food`` for "complaint" and ``service`` for "praise". Because the polarities of the
clauses are independent, a later task's labels are uncorrelated with (or opposite to) an
earlier task's labels on the same inputs. With IncLoRA (earlier adapters frozen but still
active) the new adapter is trained only to make the *new* labelling win, so it shifts
the shared output words (``positive`` / ``negative``, aspect names) in a way that
overrides the earlier adapter on earlier prompts, which differ only by the aspect word
in the instruction. This gives clear backward transfer below zero, while each task alone
stays easy to learn from a few hundred examples (a few tens of updates).

Measured (SmolLM2-135M-Instruct, IncLoRA r=8 / alpha=16 on q_proj,v_proj, AdamW lr 2e-3,
3 warm-up steps then constant, 30 updates of batch 8 per task, 100 test reviews per task,
seed 0, order food_sentiment -> service_sentiment -> price_sentiment)::

    zero-shot   58   50   50
    after t1   100   55   59
    after t2    69   97   47
    after t3    58   75  100      BWT = -32 points

API
---
``BUILTIN_TASKS`` is the ordered registry; ``builtin_examples(task, split, n, seed)``
returns ``[{"input": text, "output": label}, ...]``, deterministic in its arguments
(the RNG seed is derived with :mod:`hashlib`, never Python's salted ``hash``), with
labels balanced (round robin over the labels, then shuffled) and train / test inputs
disjoint (every review text is assigned to exactly one split by a stable hash of the
text itself, so the splits can never share an input, whatever the seeds and sizes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

from cl_flat.errors import DataError
from cl_flat.seeding import builtin_key

__all__ = [
    "ASPECTS",
    "BuiltinTask",
    "BUILTIN_TASKS",
    "builtin_examples",
    "split_of_text",
]

ASPECTS: tuple[str, ...] = ("food", "service", "price", "atmosphere")
POLARITIES: tuple[str, ...] = ("positive", "negative")

# Aspect vocabularies: noun phrases (subject of "was") and polar adjectives.
_NOUNS: dict[str, tuple[str, ...]] = {
    "food": (
        "the pasta", "the soup", "the steak", "the pizza", "the curry", "the dessert",
        "the bread", "the salad", "the burger", "the fish", "the risotto", "the food",
    ),
    "service": (
        "the waiter", "the waitress", "the staff", "the service", "the host",
        "the bartender", "the manager", "the sommelier",
    ),
    "price": (
        "the bill", "the price", "the wine list", "the lunch menu", "the set menu",
        "the tasting menu", "the cost",
    ),
    "atmosphere": (
        "the music", "the decor", "the room", "the terrace", "the lighting",
        "the atmosphere", "the dining room", "the patio",
    ),
}
_ADJECTIVES: dict[str, dict[str, tuple[str, ...]]] = {
    "food": {
        "positive": ("delicious", "tasty", "fresh", "flavorful", "perfectly cooked", "superb"),
        "negative": ("bland", "cold", "stale", "burnt", "greasy", "undercooked"),
    },
    "service": {
        "positive": ("friendly", "attentive", "quick", "helpful", "polite", "welcoming"),
        "negative": ("rude", "slow", "careless", "unfriendly", "dismissive", "sloppy"),
    },
    "price": {
        "positive": ("cheap", "reasonable", "fair", "a bargain", "affordable", "good value"),
        "negative": ("overpriced", "expensive", "steep", "outrageous", "a rip-off", "too high"),
    },
    "atmosphere": {
        "positive": ("cozy", "charming", "calm", "lovely", "elegant", "relaxing"),
        "negative": ("noisy", "gloomy", "cramped", "shabby", "dull", "chaotic"),
    },
}
_INTENSIFIERS: tuple[str, ...] = ("", "", "", "really ", "very ", "quite ", "truly ")
_OPENERS: tuple[str, ...] = (
    "", "", "", "", "", "", "Dinner: ", "Lunch: ", "Date night. ", "Friday night. ",
)

# Test share of the text space (by stable hash of the review text).
_TEST_BUCKETS = 4  # 1 bucket out of 4 -> 25 % of all possible texts are test-only


def _clause(rng: random.Random, aspect: str, polarity: str) -> str:
    noun = rng.choice(_NOUNS[aspect])
    adj = rng.choice(_ADJECTIVES[aspect][polarity])
    intens = "" if adj.startswith("a ") or adj.startswith("too ") else rng.choice(_INTENSIFIERS)
    return f"{noun} was {intens}{adj}"


def _review(rng: random.Random, aspects: list[str], polarities: list[str]) -> str:
    """Join one clause per (aspect, polarity) into a short review sentence."""
    clauses = [_clause(rng, a, p) for a, p in zip(aspects, polarities)]
    if len(clauses) == 1:
        body = clauses[0]
    elif len(clauses) == 2:
        conj = "and" if polarities[0] == polarities[1] else rng.choice(("but", "but", "while"))
        body = f"{clauses[0]}, {conj} {clauses[1]}"
    else:
        conj = "and" if polarities[-1] == polarities[-2] else "but"
        body = ", ".join(clauses[:-1]) + f", {conj} " + clauses[-1]
    return rng.choice(_OPENERS) + body[0].upper() + body[1:] + "."


def _aspect_sentiment(target: str):
    def generate(rng: random.Random, label: str) -> str:
        others = [a for a in ASPECTS if a != target]
        n_other = rng.choice((1, 1, 1, 2))
        aspects = [target, *rng.sample(others, n_other)]
        rng.shuffle(aspects)
        pols = [label if a == target else rng.choice(POLARITIES) for a in aspects]
        return _review(rng, aspects, pols)

    return generate


def _odd_one_out(odd_polarity: str):
    """Review where exactly one aspect (the label) has ``odd_polarity``."""
    other_polarity = "negative" if odd_polarity == "positive" else "positive"

    def generate(rng: random.Random, label: str) -> str:
        others = [a for a in ASPECTS if a != label]
        n_other = rng.choice((1, 1, 1, 2))
        aspects = [label, *rng.sample(others, n_other)]
        rng.shuffle(aspects)
        pols = [odd_polarity if a == label else other_polarity for a in aspects]
        return _review(rng, aspects, pols)

    return generate


@dataclass(frozen=True)
class BuiltinTask:
    """One builtin classification task (instruction + label options + a generator)."""

    name: str
    instruction: str
    labels: tuple[str, ...]
    description: str = ""
    # generator(rng, label) -> input text whose gold label is ``label``
    _generate: object = field(default=None, repr=False, compare=False)

    def sample_for_label(self, rng: random.Random, label: str) -> str:
        """Draw one input text whose gold label is ``label``."""
        if label not in self.labels:
            raise ValueError(f"label {label!r} is not one of {self.labels} for task {self.name!r}")
        return self._generate(rng, label)  # type: ignore[operator]


def _sentiment_task(aspect: str) -> BuiltinTask:
    return BuiltinTask(
        name=f"{aspect}_sentiment",
        instruction=f"What does the reviewer think of the {aspect}?",
        labels=POLARITIES,
        description=f"Aspect-based sentiment: polarity of the clause about the {aspect}.",
        _generate=_aspect_sentiment(aspect),
    )


BUILTIN_TASKS: dict[str, BuiltinTask] = {
    t.name: t
    for t in (
        _sentiment_task("food"),
        _sentiment_task("service"),
        _sentiment_task("price"),
        _sentiment_task("atmosphere"),
        BuiltinTask(
            name="complaint_aspect",
            instruction="Which aspect does the reviewer criticize?",
            labels=ASPECTS,
            description="Aspect classification: the only aspect described negatively.",
            _generate=_odd_one_out("negative"),
        ),
        BuiltinTask(
            name="praise_aspect",
            instruction="Which aspect does the reviewer praise?",
            labels=ASPECTS,
            description="Aspect classification: the only aspect described positively.",
            _generate=_odd_one_out("positive"),
        ),
    )
}


def split_of_text(text: str) -> Literal["train", "test"]:
    """The split a review text belongs to (stable, independent of task and seed)."""
    return "test" if builtin_key("cl-flat-builtin-split", text) % _TEST_BUCKETS == 0 else "train"


def builtin_examples(
    task: str, split: Literal["train", "test"], n: int, seed: int
) -> list[dict[str, str]]:
    """``n`` examples ``{"input", "output"}`` of builtin ``task`` for ``split``.

    Deterministic in ``(task, split, n, seed)``; labels are balanced (round robin over
    the task's labels, then shuffled); an input text is never in both splits and texts
    are unique within a call as long as the generator can supply enough distinct ones.
    """
    if task not in BUILTIN_TASKS:
        raise DataError(f"unknown builtin task {task!r}; available: {', '.join(BUILTIN_TASKS)}")
    spec = BUILTIN_TASKS[task]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(builtin_key("cl-flat-builtin", seed, task, split))
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    for i in range(n):
        label = spec.labels[i % len(spec.labels)]
        text = None
        for attempt in range(1000):
            cand = spec.sample_for_label(rng, label)
            if split_of_text(cand) != split:
                continue
            text = cand
            if cand not in seen or attempt >= 200:  # allow repeats only if space exhausted
                break
        if text is None:  # pragma: no cover - practically unreachable
            raise RuntimeError(f"could not generate a {split} example for {task!r}")
        seen.add(text)
        rows.append({"input": text, "output": label})
    rng.shuffle(rows)
    return rows
