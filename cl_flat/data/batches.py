"""Tokenised training examples and padded batches for causal LMs.

The prompt and the target are tokenised separately and concatenated, so rank
classification scores exactly the label tokens the model was trained to produce.
Only target tokens carry a loss (prompt and padding are -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def target_ids(tokenizer, target: str) -> list[int]:
    return tokenizer(" " + target, add_special_tokens=False)["input_ids"]


def encode(prompt: list[int], target: list[int], max_length: int) -> Encoded:
    """prompt + target, truncating the prompt from the left so the target always fits."""
    keep = max(max_length - len(target), 1)
    prompt = prompt[-keep:]
    return Encoded(tuple(prompt + target), tuple([IGNORE] * len(prompt) + target))


def encode_examples(task, tokenizer, examples, max_length: int, with_eos: bool = True) -> list[Encoded]:
    eos = [tokenizer.eos_token_id] if with_eos and tokenizer.eos_token_id is not None else []
    return [encode(prompt_ids(tokenizer, task.prompt(e)), target_ids(tokenizer, e.output) + eos, max_length)
            for e in examples]


def collate(items: list[Encoded], pad_id: int, left_pad: bool = False) -> dict[str, torch.Tensor]:
    width = max(len(item.input_ids) for item in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item.input_ids)
        span = slice(width - n, width) if left_pad else slice(0, n)
        ids[row, span] = torch.tensor(item.input_ids)
        labels[row, span] = torch.tensor(item.labels)
        mask[row, span] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
