"""Tokenised training examples and padded batches for causal LMs.

A target is tokenised in context: `prompt + " " + target` is tokenised whole and the target's
tokens are what follows the prompt tokens (`prompt_and_targets`), so training and rank
classification both use exactly the tokens the model reads in running text. Only target
tokens carry a loss (prompt and padding are -100).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def prompt_and_targets(tokenizer, prompt: str, targets: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt tokens shared by every tokenised `prompt + " " + target`, and each target's tokens after them.

    Why in context: a target tokenised on its own is not what the model reads. SentencePiece
    tokenizers of the Llama-2 family turn " positive" alone into a lone "▁" then "▁positive",
    while "Answer: positive" ends in "▁positive"; byte-level BPE gives " positive" either way.
    Where a tokenizer merges across the prompt/target boundary, the merged token goes to the
    targets (the shared prefix stops before it), so every target follows the same context.
    """
    head = prompt_ids(tokenizer, prompt)
    wholes = tokenizer([f"{prompt} {target}" for target in targets], add_special_tokens=True)["input_ids"]
    shared = len(head)
    for whole in wholes:
        common = next((k for k, (a, b) in enumerate(zip(head, whole)) if a != b), min(len(head), len(whole)))
        shared = min(shared, common, len(whole) - 1)  # every target keeps at least one token
    return head[:shared], [whole[shared:] for whole in wholes]


def encode(prompt: list[int], target: list[int], max_length: int) -> Encoded:
    """prompt + target, truncating the prompt from the left so the target always fits."""
    keep = max(max_length - len(target), 1)
    prompt = prompt[-keep:]
    return Encoded(tuple(prompt + target), tuple([IGNORE] * len(prompt) + target))


def encode_examples(task, tokenizer, examples, max_length: int, with_eos: bool = True) -> list[Encoded]:
    eos = [tokenizer.eos_token_id] if with_eos and tokenizer.eos_token_id is not None else []
    encoded = []
    for example in examples:
        prompt, (target,) = prompt_and_targets(tokenizer, task.prompt(example), [example.output])
        encoded.append(encode(prompt, target + eos, max_length))
    return encoded


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
