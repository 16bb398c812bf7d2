"""Tokenised training examples and padded batches, for both model families (`cl_flat.family`).

Causal LMs (`Encoded`): a target is tokenised in context: `prompt + " " + target` is tokenised
whole and the target's tokens are what follows the prompt tokens (`prompt_and_targets`), so
training and rank classification both use exactly the tokens the model reads in running text.
Only target tokens carry a loss (prompt and padding are `IGNORE`).

Chat prompts (`prompt_format: chat`, `render_prompt`): the filled template is the user turn of the
tokenizer's chat template, rendered with the generation prompt (the assistant turn's header); the
rendered text holds its own special tokens, so it is tokenised without adding any, and the target
follows the header directly (no " " between them). Training, rank classification, generation and
the landscapes all read prompts through `example_prompt_ids`/`example_prompt_and_targets`.

Encoder-decoder LMs (`Seq2SeqEncoded`): the encoder reads the prompt tokens; the labels are the
target tokenised alone + EOS; the decoder reads them shifted right behind the start token
(the pad token: decoder_input_ids = [pad, y_1, …, y_{n−1}]), so decoder position t predicts y_t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cl_flat.family import SEQ2SEQ, tokenizer_family
from cl_flat.loss import IGNORE


@dataclass(frozen=True)
class Encoded:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


@dataclass(frozen=True)
class Seq2SeqEncoded:
    """An encoder-decoder example: `input_ids` = encoder tokens (the prompt), `labels` = the
    decoder's target tokens (every one carries a loss)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def render_prompt(tokenizer, task, example) -> str:
    """The text before the target: `task.prompt(example)`, or for a chat task that text as the user
    message (after `task.chat_system` as the system message, when set) through the tokenizer's chat
    template with the assistant turn's header (`add_generation_prompt=True`)."""
    text = task.prompt(example)
    if not task.chat:
        return text
    messages = ([{"role": "system", "content": task.chat_system}] if task.chat_system is not None else []) \
        + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    # a rendered chat prompt holds its special tokens already (BOS too, where the template writes it)
    return tokenizer(prompt, add_special_tokens=not chat)["input_ids"]


def example_prompt_ids(tokenizer, task, example) -> list[int]:
    """The tokens of `example`'s prompt as `task` renders it (`render_prompt`)."""
    return prompt_ids(tokenizer, render_prompt(tokenizer, task, example), task.chat)


def example_prompt_and_targets(tokenizer, task, example,
                               targets: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """`prompt_and_targets` of `example`'s prompt as `task` renders it."""
    return prompt_and_targets(tokenizer, render_prompt(tokenizer, task, example), targets, task.chat)


def prompt_and_targets(tokenizer, prompt: str, targets: Sequence[str],
                       chat: bool = False) -> tuple[list[int], list[list[int]]]:
    """The prompt tokens shared by every tokenised `prompt + " " + target`, and each target's tokens after them.

    Why in context: a target tokenised on its own is not what the model reads. SentencePiece
    tokenizers of the Llama-2 family turn " positive" alone into a lone "▁" then "▁positive",
    while "Answer: positive" ends in "▁positive"; byte-level BPE gives " positive" either way.
    `chat`: a rendered chat prompt (module docstring): `prompt + target`, no special tokens added.
    Where a tokenizer merges across the prompt/target boundary, the merged token goes to the
    targets (the shared prefix stops before it), so every target follows the same context.
    """
    head = prompt_ids(tokenizer, prompt, chat)
    gap = "" if chat else " "  # a chat prompt ends with the assistant header: the answer starts there
    wholes = tokenizer([f"{prompt}{gap}{target}" for target in targets], add_special_tokens=not chat)["input_ids"]
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


def target_ids(tokenizer, target: str) -> list[int]:
    """An encoder-decoder target's tokens: `target` alone, no special tokens (EOS is added by the caller)."""
    return tokenizer(target, add_special_tokens=False)["input_ids"]


def encode_seq2seq(prompt: list[int], target: list[int], max_length: int) -> Seq2SeqEncoded:
    """Encoder input = the prompt's last `max_length` tokens; labels = the target's first `max_length`."""
    return Seq2SeqEncoded(tuple(prompt[-max_length:]), tuple(target[:max_length]))


def encode_examples(task, tokenizer, examples, max_length: int,
                    with_eos: bool = True) -> list[Encoded] | list[Seq2SeqEncoded]:
    """Training encodings of `examples` for the tokenizer's family (see the module docstring)."""
    eos = [tokenizer.eos_token_id] if with_eos and tokenizer.eos_token_id is not None else []
    if tokenizer_family(tokenizer) == SEQ2SEQ:
        return [encode_seq2seq(example_prompt_ids(tokenizer, task, example),
                               target_ids(tokenizer, example.output) + eos, max_length) for example in examples]
    encoded = []
    for example in examples:
        prompt, (target,) = example_prompt_and_targets(tokenizer, task, example, [example.output])
        encoded.append(encode(prompt, target + eos, max_length))
    return encoded


def collate(items: list[Encoded] | list[Seq2SeqEncoded], pad_id: int,
            left_pad: bool = False) -> dict[str, torch.Tensor]:
    """Padded batch: input_ids (pad_id), attention_mask, labels (IGNORE at padding); for encoder-decoder
    items also decoder_input_ids = labels shifted right behind pad_id (IGNORE read as pad_id)."""
    if items and isinstance(items[0], Seq2SeqEncoded):
        return _collate_seq2seq(items, pad_id, left_pad)
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


def _collate_seq2seq(items: list[Seq2SeqEncoded], pad_id: int, left_pad: bool) -> dict[str, torch.Tensor]:
    encoder = collate([Encoded(item.input_ids, item.input_ids) for item in items], pad_id, left_pad)
    width = max(len(item.labels) for item in items)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    for row, item in enumerate(items):
        labels[row, :len(item.labels)] = torch.tensor(item.labels, dtype=torch.long)
    decoder = torch.cat([torch.full((len(items), 1), pad_id, dtype=torch.long), labels[:, :-1]], 1)
    decoder[decoder == IGNORE] = pad_id
    return {"input_ids": encoder["input_ids"], "attention_mask": encoder["attention_mask"], "labels": labels,
            "decoder_input_ids": decoder}
