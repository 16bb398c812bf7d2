"""Rank classification with single-token labels reads the next-token distribution once per
prompt; it must give the same scores as scoring each (prompt, label) sequence."""

from __future__ import annotations

import torch

from cl_flat.data.batches import encode
from cl_flat.evaluate import next_token_logprobs, target_logprobs
from cl_flat.models import load_model


def test_single_token_shortcut_equals_pair_scoring():
    model, tokenizer = load_model("tiny-random:llama", seed=4)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (5, 9, 7)]
    candidates = [17, 42, 99]
    fast = next_token_logprobs(model, prompts, [candidates] * len(prompts), tokenizer.pad_token_id, "cpu")
    for prompt, row in zip(prompts, fast):
        pairs = target_logprobs(model, [encode(prompt, [c], 64) for c in candidates], tokenizer.pad_token_id, "cpu")
        assert torch.allclose(torch.tensor(row), torch.tensor(pairs), atol=1e-5)
    # and against a direct unpadded forward by hand for the first prompt
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    expected = torch.log_softmax(logits, -1)[candidates]
    assert torch.allclose(torch.tensor(fast[0]), expected, atol=1e-5)


def test_truncated_prompt_is_the_same_window_for_every_label(monkeypatch):
    """A prompt longer than max_length: every label is scored after the same prompt tokens (cut once
    to fit the longest label), so labels of different lengths compete on the same context."""
    from cl_flat import evaluate
    from cl_flat.data.sources import Example, TaskData
    from cl_flat.loss import IGNORE

    model, tokenizer = load_model("tiny-random:llama", seed=4)
    task = TaskData("t", "Pick.", ("a", "abcdefgh"), "accuracy", "{input}", (), (Example("x" * 80, "a"),))
    seen = []
    real = evaluate.target_logprobs

    def spy(model, items, pad_id, device, *rest):
        seen.extend(items)
        return real(model, items, pad_id, device, *rest)

    monkeypatch.setattr(evaluate, "target_logprobs", spy)
    evaluate._rank_classification(model, tokenizer, task, [0], 8, 32, "cpu")
    prompts = [item.input_ids[:sum(1 for t in item.labels if t == IGNORE)] for item in seen]
    lengths = [len(t) for t in evaluate.prompt_and_targets(tokenizer, task.prompt(task.test[0]), task.labels)[1]]
    assert lengths == [2, 9]  # byte-level: " a", " abcdefgh"
    assert prompts[0] == prompts[1] and len(prompts[0]) == 32 - 9
    assert all(len(item.input_ids) <= 32 for item in seen)
