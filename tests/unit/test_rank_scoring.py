"""Rank classification scores every label of a prompt in one packed forward (`packed_label_logprobs`);
each score must equal the one of an independent reference: one unpadded forward of prefix + label
alone per (prompt, label) pair, (1/n) Σ_i log p(label_i | prefix, label_<i), computed here by hand.

The models are drawn with large weights (std 0.3) so that a score depends strongly on its context:
a mask letting a label see another label's tokens, or a wrong position, moves a score by far more
than the 1e-5 tolerance (checked in `test_the_reference_is_sensitive_to_context`)."""

from __future__ import annotations

import pytest
import torch

from cl_flat import evaluate
from cl_flat.data.batches import prompt_and_targets
from cl_flat.data.sources import Example, TaskData
from cl_flat.evaluate import packed_label_logprobs, packs_labels, rank_scores

VOCAB = 300
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "max_position_embeddings": 256,
         "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
CONFIGS = {kind: SMALL for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3")} | {
    "gpt2": {"vocab_size": VOCAB, "n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256,
             "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}}


def sharp_model(kind: str, attention: str = "sdpa"):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, **CONFIGS[kind])
    config._attn_implementation = attention
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.eval()


def reference(model, prefix: list[int], label: list[int]) -> float:
    """The pair alone: one forward of prefix + label, no padding, no mask, default positions."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prefix + label])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    return sum(logprobs[len(prefix) - 1 + i, token].item() for i, token in enumerate(label)) / len(label)


def random_rows(seed: int = 0):
    """Prompts of different lengths, labels of 1 to 5 tokens (and a row of one-token labels only)."""
    g = torch.Generator().manual_seed(seed)

    def draw(n):
        return torch.randint(3, VOCAB, (n,), generator=g).tolist()

    return [(draw(6), [draw(1), draw(3), draw(2)]), (draw(11), [draw(4), draw(1), draw(5)]),
            (draw(2), [draw(2), draw(2), draw(1)]), (draw(8), [draw(1), draw(1), draw(1)])]


def assert_matches_reference(model, rows, scores):
    for (prefix, labels), row in zip(rows, scores, strict=True):
        expected = [reference(model, prefix, label) for label in labels]
        assert row == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_packed_scores_equal_pair_scores(kind):
    """Every supported model type, several rows per forward (left padding of different widths)."""
    model = sharp_model(kind)
    assert packs_labels(model)
    rows = random_rows()
    assert_matches_reference(model, rows, packed_label_logprobs(model, rows, 0, "cpu"))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scores_one_row_per_forward_and_both_attentions(attention):
    model = sharp_model("llama", attention)
    rows = random_rows(1)
    for row in rows:
        assert_matches_reference(model, [row], packed_label_logprobs(model, [row], 0, "cpu"))


def shared_start_rows(start: int, seed: int = 2):
    """`random_rows` behind one common start of `start` tokens (a task's instruction and options)."""
    common = torch.randint(3, VOCAB, (start,), generator=torch.Generator().manual_seed(seed)).tolist()
    return [(common + prefix, labels) for prefix, labels in random_rows(seed)]


def test_shared_prefix_length_by_hand():
    assert evaluate.shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9, 9], [1, 2, 5]]) == 2
    assert evaluate.shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # the shortest keeps its last token
    assert evaluate.shared_prefix_length([[4, 2], [1, 2]]) == 0
    assert evaluate.shared_prefix_length([[7]]) == 0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_a_shared_start_is_computed_once_and_scores_are_unchanged(kind):
    """Rows that share 12 leading tokens: the start runs in a forward of its own (then every row reads it
    from the KV cache), and every score still equals the pair alone's."""
    model = sharp_model(kind)
    rows = shared_start_rows(12)
    widths = []
    hook = model.register_forward_pre_hook(lambda _, args, kwargs: widths.append(kwargs["input_ids"].shape),
                                           with_kwargs=True)
    scores = packed_label_logprobs(model, rows, 0, "cpu")
    hook.remove()
    assert widths[0] == (1, 12)
    assert len(widths) == 2 and widths[1][0] == len(rows)
    assert_matches_reference(model, rows, scores)


def test_a_start_shorter_than_the_minimum_is_not_cached():
    model = sharp_model("llama")
    rows = shared_start_rows(evaluate.SHARED_PREFIX_MIN - 1)
    calls = []
    hook = model.register_forward_pre_hook(lambda *_: calls.append(1))
    scores = packed_label_logprobs(model, rows, 0, "cpu")
    hook.remove()
    assert len(calls) == 1
    assert_matches_reference(model, rows, scores)


def test_the_reference_is_sensitive_to_context():
    """What the packed forward must get right moves a score far beyond the tolerance: the prefix
    (another label's tokens in front of a label) and the positions (a shifted start)."""
    model = sharp_model("gpt2")
    (prefix, labels), _, _, _ = random_rows()
    honest = reference(model, prefix, labels[1])
    assert abs(reference(model, prefix + labels[0], labels[1]) - honest) > 1e-2
    ids = torch.tensor([prefix + labels[1]])
    with torch.no_grad():
        shifted = model(input_ids=ids, position_ids=torch.arange(3, 3 + ids.shape[1])[None])
    logprobs = torch.log_softmax(shifted.logits[0].float(), -1)
    moved = sum(logprobs[len(prefix) - 1 + i, t].item() for i, t in enumerate(labels[1])) / len(labels[1])
    assert abs(moved - honest) > 1e-2


def test_a_peft_wrapped_model_packs_too():
    from cl_flat.family import family_of
    from helpers import tiny_peft_model

    model = tiny_peft_model().eval()
    assert packs_labels(model) and family_of(model) == "causal"
    rows = [([5, 6, 7, 8], [[9, 10], [11], [12, 13, 14]]), ([20, 21], [[22], [23, 24], [25]])]
    assert_matches_reference(model, rows, packed_label_logprobs(model, rows, 256, "cpu"))


def test_unsupported_models_fall_back_to_today_scoring(monkeypatch):
    """flash attention and ALiBi models do not pack; the fallback (right padding, one forward per prompt
    for one-token labels, per pair otherwise) equals the reference too, batch sizes 1 and 3."""
    from transformers import BloomConfig, BloomForCausalLM

    assert not packs_labels(BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4)))
    flash = sharp_model("llama")
    flash.config._attn_implementation = "flash_attention_2"
    assert not packs_labels(flash)
    model = sharp_model("llama")
    monkeypatch.setattr(evaluate, "packs_labels", lambda m: False)
    rows = random_rows(2)
    single = [row for row in rows if all(len(label) == 1 for label in row[1])]
    for batch_size in (1, 3):
        # the longest label is 5 tokens: max_length 64 keeps every prefix whole
        assert_matches_reference(model, rows, evaluate._causal_scores(model, rows, batch_size, 0, 64, "cpu"))
        assert_matches_reference(model, single, evaluate._causal_scores(model, single, batch_size, 0, 64, "cpu"))


def boundary_task():
    """Prompts ending where a tokenizer without word splitting merges prompt end and label: the labels'
    in-context tokens start at different points of the prompt's tail."""
    labels = ("positive", "negative", "neutral", "mixed feelings")
    test = tuple(Example(review, labels[i % 4]) for i, review in enumerate(
        ["the food was great", "the service was slow", "the price was fair", "cold room, warm staff, long wait"]))
    return TaskData("reviews", "", labels, "accuracy", "Review: {input}. Answer:", test, test)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_rank_scores_of_in_context_labels_equal_whole_text_scores(batch_size):
    """Through `rank_scores` with a SentencePiece tokenizer whose pieces span words (boundary merges):
    each label's score is that of its tokens after the shared prefix, from a forward of the whole text
    `prompt + " " + label` tokenised as such."""
    from transformers import AutoModelForCausalLM

    from cl_flat.models import tiny_config
    from helpers import sentencepiece_tokenizer

    task = boundary_task()
    # trained on two of the labels only: the others split into several pieces
    sentences = [f"Review: {e.input}. Answer: {label}" for e in task.test for label in task.labels[:2]] * 5
    tokenizer = sentencepiece_tokenizer(sentences, split_words=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    indices = list(range(len(task.test)))
    got = rank_scores(model, tokenizer, task, indices, batch_size, 128, "cpu")
    merged = 0
    for i, row in zip(indices, got, strict=True):
        prompt = task.prompt(task.test[i])
        head, targets = prompt_and_targets(tokenizer, prompt, task.labels)
        merged += len(head) < len(tokenizer(prompt)["input_ids"])
        wholes = [tokenizer(f"{prompt} {label}")["input_ids"] for label in task.labels]
        assert len({len(t) for t in targets}) > 1  # labels of different lengths
        expected = [reference(model, whole[:len(head)], whole[len(head):]) for whole in wholes]
        assert row == pytest.approx(expected, abs=1e-5)
    assert merged  # at least one prompt's tail went to the labels


def test_seq2seq_scores_equal_pair_scores():
    """Encoder-decoder: (1/n) Σ_t log p(y_t | prompt, y_<t) over label + EOS, one pair alone by hand."""
    from cl_flat.models import load_model

    model, tokenizer = load_model("tiny-random:t5", seed=3)
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    task = boundary_task()
    got = rank_scores(model, tokenizer, task, [0, 2, 3], 5, 64, "cpu")
    for i, row in zip([0, 2, 3], got, strict=True):
        prompt = tokenizer(task.prompt(task.test[i]))["input_ids"]
        expected = []
        for label in task.labels:
            y = tokenizer(label, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            decoder = [tokenizer.pad_token_id] + y[:-1]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([decoder])).logits[0]
            logprobs = torch.log_softmax(logits.float(), -1)
            expected.append(sum(logprobs[t, token].item() for t, token in enumerate(y)) / len(y))
        assert row == pytest.approx(expected, abs=1e-5)
