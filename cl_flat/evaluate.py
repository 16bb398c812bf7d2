"""Evaluate every task of the sequence, batched and sharded over ranks.

- `accuracy`: rank classification. For each label, the mean log-probability of the label's
  tokens after the prompt (length-normalised log-likelihood), the label tokenised in context
  as in training (`prompt_and_targets`; a chat task's prompt rendered as in training); the argmax
  label is the prediction. No generation:
  deterministic and cheap. Causal models score all labels of a prompt in ONE forward
  (`packed_label_logprobs`: the shared prompt prefix, then every label's tokens behind it with a
  block-causal 4-D mask and positions restarting after the prefix), several prompts per forward
  (`batch_size` prompts), the tokens every prompt of the batch starts with (a task's instruction and
  options) computed once and read from a KV cache (`shared_prefix_length`); model types or attention
  implementations that take no custom 4-D mask (`packs_labels`) fall back to one forward per prompt
  for one-token labels and one per (prompt, label) otherwise.
  Encoder-decoder models (`cl_flat.family`): the label tokenised alone + EOS, scored through the
  decoder given the prompt in the encoder: (1/n) Σ_t log p(y_t | prompt, y_<t), n = label tokens + 1
  (the encoder runs once per prompt, its output shared by every label's decoder pass).
- `exact_match` and `rouge_l`: greedy generation of up to `max_new_tokens` tokens (causal: the
  continuation after the prompt; encoder-decoder: the decoder's output), compared with the example's
  answers (a jsonl row's `references`, else its output) and scored by the best of them:
  `exact_match` 1 when the prediction equals an answer after normalisation (case, spacing, trailing
  punctuation), else 0; `rouge_l` the ROUGE-L F-measure (`rouge_l`).
The test set is capped by `max_samples_per_task` with a fixed sample (a permutation keyed by
(seed, task name)); rank r scores every world-th example; the results are all-gathered, so
each task's score is its per-sample mean (x 100: percent) over the same sample whatever the world size.
"""

from __future__ import annotations

import functools
import inspect
import math
import re
from collections.abc import Sequence

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
    example_prompt_and_targets,
    example_prompt_ids,
    target_ids,
)
from cl_flat.data.sources import TaskData
from cl_flat.family import SEQ2SEQ, family_of
from cl_flat.loss import IGNORE
from cl_flat.progress import counter
from cl_flat.seeding import keyed_generator


def eval_indices(n: int, cap: int | None, seed: int, task_name: str) -> list[int]:
    """The fixed sample of a task's n test examples: all of them, or `cap` of them keyed by (seed, task)."""
    if cap is None or n <= cap:
        return list(range(n))
    return sorted(torch.randperm(n, generator=keyed_generator(seed, "eval", task_name))[:cap].tolist())


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?;:,")


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals a normalised answer (`normalise`), else 0.0."""
    return float(any(normalise(prediction) == normalise(answer) for answer in answers))


@functools.cache
def _rouge_l_scorer():
    from rouge_score import rouge_scorer  # imported for a rouge_l task only: nltk is slow to load

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F-measure of the prediction against its best answer: max over answers a of
    F = 2·P·R / (P + R), P = LCS(p, a) / |p|, R = LCS(p, a) / |a| in tokens (LCS: the longest common
    subsequence; F = 0 when the LCS is empty).

    Google's `rouge-score` package, `RougeScorer(["rougeL"], use_stemmer=True)`: text lower-cased, every
    run of characters other than a-z and 0-9 a token boundary (so text in other scripts has no tokens and
    scores 0), tokens longer than 3 characters Porter-stemmed ("running" -> "run"). Super-NaturalInstructions
    (Wang et al., 2022) scores its generation tasks so: rougeL with use_stemmer=True, the max over a test
    example's outputs (eval/automatic/evaluation.py of allenai/natural-instructions; Tk-Instruct's
    src/compute_metrics.py, with a copy of this package); SAPT's src/compute_metrics.py uses the same
    scorer against one output per example."""
    scorer = _rouge_l_scorer()
    return max(scorer.score(target=answer, prediction=prediction)["rougeL"].fmeasure for answer in answers)


# how a generation is scored against its answers, per generation metric (in [0, 1])
GENERATION_METRICS = {"exact_match": exact_match, "rouge_l": rouge_l}


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


# Model types whose causal LM takes a custom 4-D additive attention mask as is (transformers' masking_utils
# returns a 4-D mask unchanged) and reads positions from position_ids (RoPE or learned absolute positions:
# not ALiBi, whose biases follow the key index); each is checked against per-pair scoring in
# tests/unit/test_rank_scoring.py. Attention implementations that add the mask to the scores: sdpa, eager
# (flash attention takes no arbitrary mask).
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "gpt2"})
PACKED_ATTENTION = frozenset({"sdpa", "eager"})


def packs_labels(model) -> bool:
    """Whether a causal model scores all labels of a prompt in one packed forward (`packed_label_logprobs`);
    otherwise rank classification reads single-token labels from one forward per prompt
    (`next_token_logprobs`) and scores multi-token labels one forward per (prompt, label) (`target_logprobs`)."""
    config = getattr(model.get_base_model() if hasattr(model, "get_base_model") else model, "config", None)
    return (getattr(config, "model_type", None) in PACKED_MODEL_TYPES
            and getattr(config, "_attn_implementation", None) in PACKED_ATTENTION)


SHARED_PREFIX_MIN = 8  # tokens: a shorter common start saves less than its extra forward costs


def shared_prefix_length(prefixes: list[list[int]]) -> int:
    """How many leading tokens every prefix shares (compared as token ids, so a tokenisation boundary
    can never differ), leaving each prefix at least its last token (read for the first label token)."""
    shared = min(map(len, prefixes)) - 1
    for prefix in prefixes[1:]:
        shared = next((k for k in range(shared) if prefix[k] != prefixes[0][k]), shared)
    return max(shared, 0)


def _cache_keyword(model) -> str:
    """The KV cache's name in the model's forward and output: `past_key_values` until transformers
    renamed it `cache` (5.x; the old name is refused from 5.40 on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _cached_start(model, rows: list[tuple[list[int], list[list[int]]]], keyword: str, device):
    """(s, the KV cache of the s tokens every row starts with, the rows without them), the start run once
    for the batch; (0, None, rows) when fewer than `SHARED_PREFIX_MIN` tokens are shared."""
    shared = shared_prefix_length([prefix for prefix, _ in rows])
    if shared < SHARED_PREFIX_MIN:
        return 0, None, rows
    cache = model(input_ids=torch.tensor([rows[0][0][:shared]], device=device), use_cache=True)[keyword]
    cache.batch_repeat_interleave(len(rows))
    return shared, cache, [(prefix[shared:], labels) for prefix, labels in rows]


def _block_causal_mask(owner: torch.Tensor, shared: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive 4-D mask [rows, 1, query, shared + key] of packed rows: `owner` is −2 for a pad, −1 for a
    prefix token, j for label j's tokens; a position sees earlier positions of the prefix and of its own
    label (a pad only itself), and every row sees the `shared` cached start tokens."""
    rows, width = owner.shape
    index = torch.arange(width)
    causal = index[:, None] >= index[None, :]                        # [query, key]
    key, query = owner[:, None, :], owner[:, :, None]
    allowed = (causal & (key != -2) & ((key == -1) | (key == query))) | torch.eye(width, dtype=torch.bool)
    allowed = torch.cat([torch.ones(rows, width, shared, dtype=torch.bool), allowed], dim=2)  # the cached start
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


@torch.no_grad()
def packed_label_logprobs(model: torch.nn.Module, rows: list[tuple[list[int], list[list[int]]]], pad_id: int,
                          device) -> list[list[float]]:
    """Mean log-probability of each label's tokens after its prompt, every label of a row in ONE forward.

    A row is (prefix, labels): the prefix is the prompt tokens shared by every label in context, each
    label its tokens after them (`prompt_and_targets`). The packed sequence is the prefix followed by
    every label's tokens but its last (which is only predicted, never read): label j's token i sits at
    position len(prefix) + i (position_ids restart after the prefix for each label) and attends to the
    prefix and to label j's earlier tokens only (a block-causal 4-D mask), so it sees exactly the
    sequence prefix + label_j[:i] that a forward of that pair alone would. Scores:
    (1/n_j) Σ_i log p(label_j[i] | prefix, label_j[:i]), read at the last prefix position for i = 0
    and at label j's token i − 1 otherwise. Rows are left-padded (a pad attends to itself only, so
    every softmax has a key) and only the last logits are computed (`logits_to_keep`): the scored
    positions of every row lie in its tail. The tokens all rows start with (at least `SHARED_PREFIX_MIN`)
    run once, and every row attends to their keys and values from the cache at positions 0..s−1."""
    if any(not prefix for prefix, _ in rows):
        raise ValueError("rank classification needs at least one prompt token before the labels")
    keyword = _cache_keyword(model)
    shared, cache, rows = _cached_start(model, rows, keyword, device)
    seqs, owners, positions = [], [], []
    for prefix, labels in rows:
        n = len(prefix)
        seqs.append(list(prefix) + [t for label in labels for t in label[:-1]])
        owners.append([-1] * n + [j for j, label in enumerate(labels) for _ in label[:-1]])
        positions.append(list(range(n)) + [n + i for label in labels for i in range(len(label) - 1)])
    width, tail = max(map(len, seqs)), max(len(s) - len(p) for s, (p, _) in zip(seqs, rows)) + 1
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    owner = torch.full((len(rows), width), -2, dtype=torch.long)  # -2 pad, -1 prefix, j label j
    position = torch.zeros((len(rows), width), dtype=torch.long)
    for r, (seq, own, pos) in enumerate(zip(seqs, owners, positions)):
        ids[r, width - len(seq):], owner[r, width - len(seq):] = torch.tensor(seq), torch.tensor(own)
        position[r, width - len(seq):] = torch.tensor(pos)
    mask = _block_causal_mask(owner, shared, model.get_input_embeddings().weight.dtype)
    # the kept positions as an index tensor, not a count: the slice a count makes is a strided view, on
    # which the vocabulary projection took a batched-matmul path ~10x slower on CPU
    keep = torch.arange(width - tail, width, device=device)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                   position_ids=(position + shared).to(device), logits_to_keep=keep,
                   use_cache=cache is not None, **{keyword: cache}).logits
    where, tokens, pair = [], [], []                                  # (row, kept position), token, (row, label)
    for r, (prefix, labels) in enumerate(rows):
        start = width - len(seqs[r])                                  # first real position of row r
        cursor = start + len(prefix)                                  # where label tokens begin
        for j, label in enumerate(labels):
            reads = [start + len(prefix) - 1] + list(range(cursor, cursor + len(label) - 1))
            cursor += len(label) - 1
            where += [(r, p - (width - tail)) for p in reads]
            tokens += label
            pair += [(r, j)] * len(label)
    rows_at, cols_at = torch.tensor(where).T.to(logits.device)
    picked = torch.log_softmax(logits[rows_at, cols_at].float(), -1).gather(
        1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    sums: dict[tuple[int, int], list[float]] = {}
    for at, value in zip(pair, picked):
        sums.setdefault(at, []).append(value)
    return [[sum(sums[r, j]) / len(sums[r, j]) for j in range(len(labels))] for r, (_, labels) in enumerate(rows)]


def _seq2seq_pairs(tokenizer, task: TaskData, indices: list[int], max_length: int) -> list[Seq2SeqEncoded]:
    """(prompt, label + EOS) for every example and label, label-major within an example."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    label_ids = [target_ids(tokenizer, label) + eos for label in task.labels]
    return [encode_seq2seq(example_prompt_ids(tokenizer, task, task.test[i]), ids, max_length)
            for i in indices for ids in label_ids]


def rank_scores(model, tokenizer, task: TaskData, indices: list[int], batch_size: int, max_length: int,
                device) -> list[list[float]]:
    """Each example's score of every label of `task` (in `task.labels` order): its mean log-probability
    after the prompt (see the module docstring), `max_length` bounding the prompt window."""
    labels = list(task.labels)
    if family_of(model) == SEQ2SEQ:
        pairs = _seq2seq_pairs(tokenizer, task, indices, max_length)
        # whole examples per batch: the encoder runs once per prompt for all of its labels
        step, scores = max(batch_size // len(labels), 1) * len(labels), []
        for start in range(0, len(pairs), step):
            scores += target_logprobs(model, pairs[start:start + step], tokenizer.pad_token_id, device, len(labels))
        return [scores[k:k + len(labels)] for k in range(0, len(scores), len(labels))]
    rows = []
    for i in indices:
        prompt, label_ids = example_prompt_and_targets(tokenizer, task, task.test[i], labels)
        # every label is scored after the same prompt window: cut once, to fit the longest label
        rows.append((prompt[-max(max_length - max(len(ids) for ids in label_ids), 1):], label_ids))
    return _causal_scores(model, rows, batch_size, tokenizer.pad_token_id, max_length, device)


def _rank_classification(model, tokenizer, task: TaskData, indices: list[int], batch_size: int,
                         max_length: int, device) -> list[tuple[int, bool]]:
    """(index, argmax label == gold) per example."""
    results = []
    for i, row in zip(indices, rank_scores(model, tokenizer, task, indices, batch_size, max_length, device)):
        predicted = task.labels[max(range(len(row)), key=row.__getitem__)]
        results.append((i, predicted == task.test[i].output))
    return results


def _causal_scores(model, rows: list[tuple[list[int], list[list[int]]]], batch_size: int, pad_id: int,
                   max_length: int, device) -> list[list[float]]:
    """Every (prefix, labels) row's label scores: `batch_size` rows per packed forward, or
    (a model that `packs_labels` not) one forward per prompt for single-token labels, else per pair."""
    if packs_labels(model):
        # rows of similar length share a forward (less padding); the scores go back to the rows' order
        order = sorted(range(len(rows)), key=lambda r: len(rows[r][0]) + sum(map(len, rows[r][1])))
        by_row: list[list[float]] = [[] for _ in rows]
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            for r, row in zip(chunk, packed_label_logprobs(model, [rows[r] for r in chunk], pad_id, device)):
                by_row[r] = row
        return by_row
    if all(len(ids) == 1 for _, label_ids in rows for ids in label_ids):
        # the length-normalised log-likelihood of a one-token label is its next-token log-prob
        found: list[list[float]] = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            found += next_token_logprobs(model, [prefix for prefix, _ in chunk],
                                         [[ids[0] for ids in label_ids] for _, label_ids in chunk], pad_id, device)
        return found
    pairs = [encode(prefix, ids, max_length) for prefix, label_ids in rows for ids in label_ids]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        scores += target_logprobs(model, pairs[start:start + batch_size], pad_id, device)
    n = len(rows[0][1]) if rows else 1  # labels per row
    return [scores[k:k + n] for k in range(0, len(scores), n)]


def generate(model, tokenizer, task: TaskData, indices: list[int], batch_size: int, max_length: int,
             max_new_tokens: int, device) -> list[tuple[int, str]]:
    """(index, greedy generation) per example: the prompt's last `max_length` tokens, left-padded in
    batches of `batch_size`, at most `max_new_tokens` new tokens, special tokens dropped."""
    results = []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start:start + batch_size]
        items = [Encoded(tuple(ids := example_prompt_ids(tokenizer, task, task.test[i])[-max_length:]),
                         tuple([IGNORE] * len(ids))) for i in chunk]
        batch = collate(items, tokenizer.pad_token_id, left_pad=True)
        out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        # a causal LM's output starts with its prompt; a decoder's with its start token (special)
        prompt_width = 0 if family_of(model) == SEQ2SEQ else batch["input_ids"].shape[1]
        texts = tokenizer.batch_decode(out[:, prompt_width:], skip_special_tokens=True)
        results += list(zip(chunk, texts))
    return results


PROGRESS_BATCHES = 8  # batches scored between two progress steps (length sorting works within them)


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[TaskData], section: EvaluationSection,
                   max_length: int, seed: int, device, progress: str | None = None) -> list[float]:
    """Score (percent) of every task, in order; identical on every rank. `max_length` is
    training.max_seq_length, `seed` the run seed (it fixes the test sample). `progress`: the description
    of a progress bar (plain lines without a terminal) over this rank's examples; None: none."""
    was_training = model.training
    model.eval()
    scores = []
    samples = [eval_indices(len(task.test), section.max_samples_per_task, seed, task.name) for task in tasks]
    mine = [indices[dist.rank()::dist.world_size()] for indices in samples]
    step = section.batch_size * PROGRESS_BATCHES
    try:
        with counter(progress is not None, progress or "", sum(map(len, mine)), unit="examples") as advance:
            for task, own in zip(tasks, mine):
                local = []
                for start in range(0, len(own), step):
                    part = own[start:start + step]
                    if task.metric == "accuracy":
                        local += [(i, float(ok)) for i, ok in _rank_classification(
                            model, tokenizer, task, part, section.batch_size, max_length, device)]
                    else:
                        compare = GENERATION_METRICS[task.metric]
                        local += [(i, compare(text, task.test[i].answers)) for i, text in generate(
                            model, tokenizer, task, part, section.batch_size, max_length, section.max_new_tokens,
                            device)]
                    advance(len(part))
                merged = [r for part in dist.all_gather_objects(local) for r in part]
                # fsum: exactly rounded, so the order the ranks' parts arrive in changes no bit
                scores.append(100.0 * math.fsum(score for _, score in merged) / len(merged))
    finally:
        model.train(was_training)
    return scores
