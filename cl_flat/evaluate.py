"""Evaluate every task of the sequence, batched and sharded over ranks.

- `accuracy`: rank classification. For each label, the mean log-probability of the label's
  tokens after the prompt (length-normalised log-likelihood), the label tokenised in context
  as in training (`prompt_and_targets`); the argmax label is the prediction. No generation:
  deterministic and cheap.
  Encoder-decoder models (`cl_flat.family`): the label tokenised alone + EOS, scored through the
  decoder given the prompt in the encoder: (1/n) Σ_t log p(y_t | prompt, y_<t), n = label tokens + 1
  (the encoder runs once per prompt, its output shared by every label's decoder pass).
- `exact_match`: greedy generation (causal: the continuation after the prompt; encoder-decoder:
  the decoder's output), compared after normalisation (case, spacing, trailing punctuation).
The test set is capped by `max_samples_per_task` with a fixed sample (a permutation keyed by
(seed, task name)); rank r scores every world-th example; the results are all-gathered, so
each task's score is its per-sample mean over the same sample whatever the world size.
"""

from __future__ import annotations

import re

import torch
from transformers.modeling_outputs import BaseModelOutput

from cl_flat import dist
from cl_flat.config import EvaluationSection
from cl_flat.data.batches import (
    Encoded,
    Seq2SeqEncoded,
    collate,
    encode,
    encode_seq2seq,
    prompt_and_targets,
    prompt_ids,
    target_ids,
)
from cl_flat.data.sources import TaskData
from cl_flat.family import SEQ2SEQ, family_of
from cl_flat.loss import IGNORE
from cl_flat.seeding import keyed_generator


def eval_indices(n: int, cap: int | None, seed: int, task_name: str) -> list[int]:
    """The fixed sample of a task's n test examples: all of them, or `cap` of them keyed by (seed, task)."""
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(torch.randperm(n, generator=keyed_generator(seed, "eval", task_name))[:cap].tolist())


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?;:,")


@torch.no_grad()
def target_logprobs(model: torch.nn.Module, items: list[Encoded] | list[Seq2SeqEncoded], pad_id: int,
                    device, per_prompt: int = 1) -> list[float]:
    """Mean log-probability of each item's target tokens given its prompt (`Seq2SeqEncoded`: the
    decoder's, position t predicting label t; `Encoded`: position t predicting token t + 1).
    `per_prompt`: seq2seq items come in runs of that many with the same prompt, whose encoder
    output is computed once and shared by the run's decoder passes."""
    batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
    if "decoder_input_ids" in batch:
        mask = batch["attention_mask"]
        encoded = model.get_encoder()(input_ids=batch["input_ids"][::per_prompt], attention_mask=mask[::per_prompt])
        shared = BaseModelOutput(last_hidden_state=encoded.last_hidden_state.repeat_interleave(per_prompt, 0))
        logits = model(attention_mask=mask, encoder_outputs=shared, decoder_input_ids=batch["decoder_input_ids"]).logits
        labels = batch["labels"]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return (picked.sum(-1) / mask.sum(-1)).tolist()


@torch.no_grad()
def next_token_logprobs(model: torch.nn.Module, prompts: list[list[int]], token_ids: list[list[int]], pad_id: int,
                        device) -> list[list[float]]:
    """log p(token | prompt) for each prompt and each of its candidate tokens: one forward per
    prompt (right padding; the distribution is read at each prompt's last real position)."""
    items = [Encoded(tuple(p), tuple([IGNORE] * len(p))) for p in prompts]
    batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    last = batch["attention_mask"].sum(1) - 1
    rows = torch.log_softmax(logits[torch.arange(len(items), device=logits.device), last].float(), dim=-1)
    return rows.gather(1, torch.tensor(token_ids, device=rows.device)).tolist()


def _seq2seq_pairs(tokenizer, task: TaskData, indices: list[int], max_length: int) -> list[Seq2SeqEncoded]:
    """(prompt, label + EOS) for every example and label, label-major within an example."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    label_ids = [target_ids(tokenizer, label) + eos for label in task.labels]
    return [encode_seq2seq(prompt_ids(tokenizer, task.prompt(task.test[i])), ids, max_length)
            for i in indices for ids in label_ids]


def _rank_classification(model, tokenizer, task: TaskData, indices: list[int], batch_size: int,
                         max_length: int, device) -> list[tuple[int, bool]]:
    labels = list(task.labels)
    per_prompt, step = 1, batch_size
    if family_of(model) == SEQ2SEQ:
        pairs = _seq2seq_pairs(tokenizer, task, indices, max_length)
        # whole examples per batch: the encoder runs once per prompt for all of its labels
        per_prompt, step = len(labels), max(batch_size // len(labels), 1) * len(labels)
    else:
        contexts = [prompt_and_targets(tokenizer, task.prompt(task.test[i]), labels) for i in indices]
        if all(len(ids) == 1 for _, label_ids in contexts for ids in label_ids):
            # single-token labels: the length-normalised log-likelihood is the next-token log-prob,
            # so one forward per prompt scores every label
            scores: list[float] = []
            for start in range(0, len(contexts), batch_size):
                chunk = contexts[start:start + batch_size]
                rows = next_token_logprobs(model, [prompt[-(max_length - 1):] for prompt, _ in chunk],
                                           [[ids[0] for ids in label_ids] for _, label_ids in chunk],
                                           tokenizer.pad_token_id, device)
                scores += [s for row in rows for s in row]
            return _predictions(task, indices, labels, scores)
        # every label is scored after the same prompt window: cut once, to fit the longest label
        pairs = []
        for prompt, label_ids in contexts:
            keep = max(max_length - max(len(ids) for ids in label_ids), 1)
            pairs += [encode(prompt[-keep:], ids, max_length) for ids in label_ids]
    scores = []
    for start in range(0, len(pairs), step):
        scores += target_logprobs(model, pairs[start:start + step], tokenizer.pad_token_id, device, per_prompt)
    return _predictions(task, indices, labels, scores)


def _predictions(task: TaskData, indices: list[int], labels: list[str], scores: list[float]) -> list[tuple[int, bool]]:
    """(index, argmax label == gold) per example; `scores` holds len(labels) per example, in order."""
    results = []
    for k, i in enumerate(indices):
        row = scores[k * len(labels):(k + 1) * len(labels)]
        predicted = labels[max(range(len(labels)), key=row.__getitem__)]
        results.append((i, predicted == task.test[i].output))
    return results


def _exact_match(model, tokenizer, task: TaskData, indices: list[int], batch_size: int, max_length: int,
                 max_new_tokens: int, device) -> list[tuple[int, bool]]:
    results = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [Encoded(tuple(ids := prompt_ids(tokenizer, task.prompt(task.test[i]))[-max_length:]),
                         tuple([IGNORE] * len(ids))) for i in chunk]
        batch = collate(items, tokenizer.pad_token_id, left_pad=True)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        # a causal LM's output starts with its prompt; a decoder's with its start token (special)
        prompt_width = 0 if family_of(model) == SEQ2SEQ else batch["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, prompt_width:], skip_special_tokens=True)
        results += [(i, normalise(text) == normalise(task.test[i].output)) for i, text in zip(chunk, texts)]
    return results


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[TaskData], section: EvaluationSection,
                   max_length: int, seed: int, device) -> list[float]:
    """Score (percent) of every task, in order; identical on every rank. `max_length` is
    training.max_seq_length, `seed` the run seed (it fixes the test sample)."""
    was_training = model.training
    model.eval()
    scores = []
    try:
        for task in tasks:
            indices = eval_indices(len(task.test), section.max_samples_per_task, seed, task.name)
            mine = indices[dist.rank()::dist.world_size()]
            if task.metric == "accuracy":
                local = _rank_classification(model, tokenizer, task, mine, section.batch_size, max_length, device)
            else:
                local = _exact_match(model, tokenizer, task, mine, section.batch_size, max_length,
                                     section.max_new_tokens, device)
            merged = [r for part in dist.all_gather_objects(local) for r in part]
            scores.append(100.0 * sum(ok for _, ok in merged) / len(merged))
    finally:
        model.train(was_training)
    return scores
