"""Rank classification without packing (models that `packs_labels` not) reads one-token labels from the
next-token distribution once per prompt; it must give the same scores as scoring each (prompt, label) sequence."""

from __future__ import annotations

import torch

from cl_flat.data.batches import encode, prompt_ids
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

    model, tokenizer = load_model("tiny-random:llama", seed=4)
    task = TaskData("t", "Pick.", ("a", "abcdefgh"), "accuracy", "{input}", (), (Example("x" * 80, "a"),))
    seen = []
    real = evaluate.packed_label_logprobs

    def spy(model, rows, *rest):
        seen.extend(rows)
        return real(model, rows, *rest)

    monkeypatch.setattr(evaluate, "packed_label_logprobs", spy)
    evaluate._rank_classification(model, tokenizer, task, [0], 8, 32, "cpu")
    ((prefix, labels),) = seen
    assert [len(t) for t in labels] == [2, 9]  # byte-level: " a", " abcdefgh"
    whole = prompt_ids(tokenizer, task.prompt(task.test[0]))
    assert prefix == whole[-(32 - 9):]  # the prompt's last tokens, room left for the longest label
    assert all(len(prefix) + len(label) <= 32 for label in labels)
