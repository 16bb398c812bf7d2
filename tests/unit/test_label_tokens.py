"""Labels are tokenised in context: the tokens a label gets in training and in
rank classification are those of `prompt + " " + label` after the prompt, so a SentencePiece
tokenizer's lone "▁" (what " positive" alone tokenises to first) never enters a target."""

from __future__ import annotations

import torch

from cl_flat import evaluate
from cl_flat.data.batches import encode_examples, prompt_and_targets
from cl_flat.data.sources import Example, TaskData
from cl_flat.loss import IGNORE
from helpers import sentencepiece_tokenizer

REVIEWS = ["the food was great", "the service was slow", "the price was fair", "the room was cold and dark"]
LABELS = ("positive", "negative", "neutral")
SENTENCES = [f"Review: {r}. Answer: {label}" for r in REVIEWS for label in LABELS] * 5


def sentiment_task() -> TaskData:
    test = tuple(Example(review, LABELS[i % 3]) for i, review in enumerate(REVIEWS))
    return TaskData("reviews", "", LABELS, "accuracy", "Review: {input}. Answer:", test, test)


def test_the_tokenizer_reproduces_the_lone_metaspace():
    tokenizer = sentencepiece_tokenizer(SENTENCES)
    alone = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone) == ["▁", "▁positive"]


def test_sentencepiece_label_is_its_word_token_in_context():
    tokenizer = sentencepiece_tokenizer(SENTENCES)
    prompt = "Review: the food was great. Answer:"
    head, targets = prompt_and_targets(tokenizer, prompt, LABELS)
    assert head == tokenizer(prompt)["input_ids"]
    assert [tokenizer.convert_ids_to_tokens(t) for t in targets] == [["▁positive"], ["▁negative"], ["▁neutral"]]
    for label, target in zip(LABELS, targets):
        assert head + target == tokenizer(f"{prompt} {label}")["input_ids"]


def test_training_targets_carry_no_lone_metaspace():
    tokenizer = sentencepiece_tokenizer(SENTENCES)
    (item,) = encode_examples(sentiment_task(), tokenizer, [Example("the food was great", "positive")], 64)
    target = [t for t in item.labels if t != IGNORE]
    assert tokenizer.convert_ids_to_tokens(target) == ["▁positive", "</s>"]


def test_a_merge_across_the_boundary_goes_to_the_target():
    """A tokenizer without word splitting may merge prompt end and label: the merged token is the
    target's, and prompt + target is still the whole text's tokenisation."""
    tokenizer = sentencepiece_tokenizer(SENTENCES, split_words=False)
    prompt = "Review: the food was great. Answer:"
    head, targets = prompt_and_targets(tokenizer, prompt, LABELS)
    whole = [tokenizer(f"{prompt} {label}")["input_ids"] for label in LABELS]
    alone = tokenizer(prompt)["input_ids"]
    assert len(head) < len(alone) and head == alone[:len(head)]  # the boundary merged: the head stops before it
    for target, ids in zip(targets, whole):
        assert head + target == ids and len(target) >= 1


def test_rank_classification_scores_the_in_context_tokens(monkeypatch):
    """Single-token labels in context take one packed forward per batch of prompts, and the prediction
    is the argmax of log p(label token | prompt) read from a direct forward of each whole text."""
    from transformers import AutoModelForCausalLM

    from cl_flat.models import tiny_config

    tokenizer = sentencepiece_tokenizer(SENTENCES)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval()
    task = sentiment_task()
    calls = []
    real = evaluate.packed_label_logprobs
    monkeypatch.setattr(evaluate, "packed_label_logprobs", lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(evaluate, "target_logprobs", lambda *a: (_ for _ in ()).throw(AssertionError("slow path")))
    results = evaluate._rank_classification(model, tokenizer, task, list(range(len(REVIEWS))), 8, 64, "cpu")
    assert calls
    for i, correct in results:
        scores = []
        for label in LABELS:
            ids = tokenizer(f"{task.prompt(task.test[i])} {label}")["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0]
            scores.append(torch.log_softmax(logits[-2], -1)[ids[-1]].item())
        assert correct == (LABELS[max(range(3), key=scores.__getitem__)] == task.test[i].output)
