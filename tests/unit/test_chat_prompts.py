"""`prompt_format: chat`: the filled template becomes the user turn of the tokenizer's chat template, and
training, rank classification and generation all read that rendered text, the target right after it.

The expected texts are written out by hand from the templates given here (and from SmolLM2's own
template for the builtin model); token ids come from tokenising those hand-written strings with a
byte-level tokenizer without merges, where a text's tokens are its bytes' tokens in order."""

from __future__ import annotations

import pytest
import torch

from cl_flat.data.batches import encode_examples, example_prompt_and_targets, example_prompt_ids, render_prompt
from cl_flat.data.sources import Example, TaskData
from cl_flat.loss import IGNORE

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
EXAMPLE = Example("", "entailment", (("premise", "It rains."), ("hypothesis", "It is wet.")))
LABELS = ("entailment", "neutral", "contradiction")


def chat_task(system: str | None = "Answer with one word.", chat: bool = True) -> TaskData:
    return TaskData("mnli", "Entailment?", LABELS, "accuracy", "{instruction} P: {premise} H: {hypothesis}",
                    (EXAMPLE,), (EXAMPLE,), system, chat)


def chat_tokenizer(template: str = TEMPLATE):
    from cl_flat.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    tokenizer.chat_template = template
    return tokenizer


RENDERED = "<|system|>Answer with one word.\n<|user|>Entailment? P: It rains. H: It is wet.\n<|assistant|>"


def test_render_with_and_without_a_system_message():
    tokenizer = chat_tokenizer()
    assert render_prompt(tokenizer, chat_task(), EXAMPLE) == RENDERED
    assert render_prompt(tokenizer, chat_task(None), EXAMPLE) == (
        "<|user|>Entailment? P: It rains. H: It is wet.\n<|assistant|>")
    assert render_prompt(tokenizer, chat_task(chat=False), EXAMPLE) == "Entailment? P: It rains. H: It is wet."


def test_training_encoding_puts_the_target_right_after_the_rendered_prompt():
    tokenizer = chat_tokenizer()
    ids = tokenizer(RENDERED)["input_ids"]
    assert len(ids) == len(RENDERED.encode("utf-8"))  # one token a byte: the tokenizer adds nothing
    label = tokenizer("entailment")["input_ids"]
    (item,) = encode_examples(chat_task(), tokenizer, [EXAMPLE], max_length=256)
    assert item.input_ids == tuple(ids + label + [tokenizer.eos_token_id])
    assert item.labels == tuple([IGNORE] * len(ids) + label + [tokenizer.eos_token_id])
    # plain: a space between prompt and target
    (plain,) = encode_examples(chat_task(chat=False), tokenizer, [EXAMPLE], max_length=256)
    assert plain.input_ids[-len(label) - 2:] == tuple(tokenizer(" ")["input_ids"] + label + [tokenizer.eos_token_id])


def test_a_rendered_prompt_gets_no_second_bos():
    """A tokenizer that starts every text with a BOS and a template that writes it: one BOS, not two."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = chat_tokenizer("<eos>" + TEMPLATE)  # <eos> stands in for a BOS token here
    bos = tokenizer.eos_token_id
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", bos)])
    assert tokenizer("x")["input_ids"][0] == bos  # plain text gets its BOS from the tokenizer
    head, (target,) = example_prompt_and_targets(tokenizer, chat_task(), EXAMPLE, ["neutral"])
    assert head == [bos] + tokenizer(RENDERED, add_special_tokens=False)["input_ids"]
    assert target == tokenizer("neutral", add_special_tokens=False)["input_ids"]
    assert example_prompt_ids(tokenizer, chat_task(), EXAMPLE) == head


def sharp_tiny_llama(vocab: int):
    from transformers import AutoModelForCausalLM

    from cl_flat.models import tiny_config

    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def test_rank_scores_read_the_rendered_prompt():
    """Each label's score equals (1/n) Σ_i log p(label_i | rendered prompt, label_<i) from one forward of
    the hand-written rendered text + label; the plain prompt's scores differ."""
    from cl_flat.evaluate import rank_scores

    tokenizer = chat_tokenizer()
    model = sharp_tiny_llama(len(tokenizer))
    head = tokenizer(RENDERED)["input_ids"]
    expected = []
    for label in LABELS:
        tokens = tokenizer(label)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([head + tokens])).logits[0].float(), -1)
        expected.append(sum(logprobs[len(head) - 1 + i, t].item() for i, t in enumerate(tokens)) / len(tokens))
    (got,) = rank_scores(model, tokenizer, chat_task(), [0], 4, 256, "cpu")
    assert got == pytest.approx(expected, abs=1e-5)
    (plain,) = rank_scores(model, tokenizer, chat_task(chat=False), [0], 4, 256, "cpu")
    assert plain != pytest.approx(expected, abs=1e-3)


def test_generation_reads_the_rendered_prompt(monkeypatch):
    from cl_flat import evaluate

    tokenizer = chat_tokenizer()
    model = sharp_tiny_llama(len(tokenizer))
    seen, generate = [], model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or generate(**kw))
    evaluate.generate(model, tokenizer, chat_task(), [0], 1, 256, 2, "cpu")
    assert seen == [tokenizer(RENDERED)["input_ids"]]


def test_smollm2_chat_template():
    """The builtin model's tokenizer (SmolLM2-135M-Instruct's ChatML template, written out by hand)."""
    from cl_flat.models import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2-135m")
    if tokenizer is None:
        pytest.skip("the builtin model's package is not installed")
    user = "Entailment? P: It rains. H: It is wet."
    assert render_prompt(tokenizer, chat_task(), EXAMPLE) == (
        f"<|im_start|>system\nAnswer with one word.<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render_prompt(tokenizer, chat_task(None), EXAMPLE) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n")
    head, targets = example_prompt_and_targets(tokenizer, chat_task(), EXAMPLE, list(LABELS))
    assert tokenizer.decode(head) == render_prompt(tokenizer, chat_task(), EXAMPLE)
    assert [tokenizer.decode(t) for t in targets] == list(LABELS)
    assert head.count(tokenizer.convert_tokens_to_ids("<|im_start|>")) == 3  # special tokens read as such


def test_load_tokenizer_of_tiny_models_has_no_chat_template():
    from cl_flat.models import load_tokenizer

    assert not load_tokenizer("tiny-random:llama").chat_template
