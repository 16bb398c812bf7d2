"""The encoder-decoder family on `tiny-random:t5`, each value against an independent computation:
the training loss against transformers' own `labels=` loss on unpadded single examples, rank
classification against per-pair log-probabilities read off the logits, exact match against a
hand-written greedy decoding loop, LoRA targets and noise targets against the architecture's
known layer list, and every flatness method's update on T5."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from cl_flat.adapters import AdapterStack
from cl_flat.config import EvaluationSection, LoraSection, validate_config
from cl_flat.data import Example, TaskData
from cl_flat.data.batches import collate, encode_examples
from cl_flat.errors import ConfigError
from cl_flat.evaluate import evaluate_tasks
from cl_flat.family import SEQ2SEQ, family_of, tokenizer_family
from cl_flat.flatness import reference_update
from cl_flat.flatness.noise import frozen_targets
from cl_flat.landscape.perturbed_loss import PerturbedLoss, held_out_batches
from cl_flat.loss import fused_seq2seq_head, target_loss
from cl_flat.models import check_target_modules, load_model, model_family, module_names

LABELS = ["yes", "yes no", "no"]  # a label that is a prefix of another: the EOS decides


def make_task(n: int = 6, outputs: list[str] | None = None) -> TaskData:
    outputs = outputs or [LABELS[i % 3] for i in range(n)]
    examples = tuple(Example(f"sample number {i} " + "x" * (i % 4), out) for i, out in enumerate(outputs))
    return TaskData(name="t", labels=tuple(LABELS), train=examples, test=examples, metric="accuracy",
                    template="{instruction}\nOptions: {options}\nInput: {input}\nAnswer:", instruction="Pick one.")


@pytest.fixture(scope="module")
def t5():
    model, tokenizer = load_model("tiny-random:t5", seed=2)
    stack = AdapterStack(model, LoraSection(r=4, alpha=8), seed=3)
    stack.add_task(0, "a")
    with torch.no_grad():  # a non-zero adapter, so the LoRA path is part of every value
        for name, p in stack.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    return stack, tokenizer


def independent_ids(tokenizer, task: TaskData, example: Example, target: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer(task.prompt(example))["input_ids"]
    return prompt, tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_tiny_t5_is_an_encoder_decoder_with_t5_names():
    model, tokenizer = load_model("tiny-random:t5")
    assert type(model).__name__ == "T5ForConditionalGeneration" and family_of(model) == SEQ2SEQ
    assert tokenizer_family(tokenizer) == SEQ2SEQ and model_family("tiny-random:t5") == SEQ2SEQ
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id
    assert {"q", "k", "v", "o", "wi_0", "wi_1", "wo", "lm_head"} <= module_names("tiny-random:t5")
    same, _ = load_model("tiny-random:t5")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


def test_default_lora_targets_become_q_and_v(t5):
    stack, _ = t5
    adapted = sorted(n for n, m in stack.model.named_modules() if hasattr(m, "lora_A"))
    # 2 encoder blocks (self-attention) + 2 decoder blocks (self- and cross-attention) = 6 attentions
    expected = sorted(f"base_model.model.{part}.block.{b}.layer.{layer}.{attn}.{w}"
                      for part, layers in (("encoder", [(0, "SelfAttention")]),
                                           ("decoder", [(0, "SelfAttention"), (1, "EncDecAttention")]))
                      for b in range(2) for layer, attn in layers for w in ("q", "v"))
    assert adapted == expected
    check_target_modules(["q_proj", "v_proj"], module_names("tiny-random:t5"), SEQ2SEQ)  # the default: q, v
    with pytest.raises(ConfigError, match="k_proj"):  # an explicit causal name is not translated
        check_target_modules(["q_proj", "k_proj"], module_names("tiny-random:t5"), SEQ2SEQ)


def test_encoding_is_prompt_in_encoder_target_plus_eos_in_decoder(t5):
    _, tokenizer = t5
    task = make_task(3)
    encoded = encode_examples(task, tokenizer, task.train, max_length=128)
    for item, example in zip(encoded, task.train):
        prompt, target = independent_ids(tokenizer, task, example, example.output)
        assert list(item.input_ids) == prompt and list(item.labels) == target
    short = encode_examples(task, tokenizer, task.train, max_length=20)[0]  # the prompt keeps its end
    assert list(short.input_ids) == independent_ids(tokenizer, task, task.train[0], "")[0][-20:]
    batch = collate(encoded, tokenizer.pad_token_id)
    row = batch["labels"][0]
    assert batch["decoder_input_ids"][0, 0] == tokenizer.pad_token_id
    n = int((row != -100).sum())
    assert batch["decoder_input_ids"][0, 1:n].tolist() == row[:n - 1].tolist()


@pytest.mark.parametrize("tied", [False, True])
def test_loss_is_the_token_mean_of_unpadded_single_example_losses(tied):
    """Fused loss on a padded batch = Σ over examples of (transformers' loss × tokens) / Σ tokens, each
    example alone, no padding. `tied`: T5 v1.0 style (head = embedding, output scaled by d^-½)."""
    model, tokenizer = load_model("tiny-random:t5", seed=4)
    if tied:
        from transformers import T5ForConditionalGeneration
        config = model.config
        config.tie_word_embeddings, config.scale_decoder_outputs = True, True
        with torch.random.fork_rng():  # the same weights whichever tests ran before
            torch.manual_seed(4)
            model = T5ForConditionalGeneration(config)
        model.lm_head.weight = model.shared.weight
        torch.nn.init.normal_(model.shared.weight, 0, 1.0, generator=torch.Generator().manual_seed(1))
    stack = AdapterStack(model, LoraSection(r=2), seed=0)
    stack.add_task(0, "a")
    assert fused_seq2seq_head(stack.model) is not None
    task = make_task(5)
    encoded = encode_examples(task, tokenizer, task.train, max_length=128)
    batch = collate(encoded, tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any() and (batch["labels"] == -100).any()  # padding on both sides
    fused = target_loss(stack.model, batch)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in task.train:
            prompt, target = independent_ids(tokenizer, task, example, example.output)
            loss = stack.model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).loss
            total, count = total + loss.item() * len(target), count + len(target)
    assert fused.item() == pytest.approx(total / count, rel=1e-5)
    # gradient: the fused loss and transformers' labels= loss give the same adapter gradient
    params = [p for p in stack.model.parameters() if p.requires_grad]
    fused_grads = torch.autograd.grad(fused, params)
    plain = stack.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss
    # fp32 roundoff (the two losses sum in different orders) scales with the gradient, not a fixed
    # 1e-7: on the tied head's O(1) gradients it reaches ~1e-6 of the largest element (8 eps)
    for a, b in zip(fused_grads, torch.autograd.grad(plain, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-12)


def pair_logprob(model, prompt: list[int], target: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).logits[0]
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(target)), target].mean().item()


def test_rank_classification_is_the_argmax_of_independent_logprobs(t5):
    stack, tokenizer = t5
    task = make_task(16)
    predicted = []
    for example in task.test:
        scores = [pair_logprob(stack.model, *independent_ids(tokenizer, task, example, label)) for label in LABELS]
        predicted.append(LABELS[max(range(3), key=scores.__getitem__)])
    # gold = the prediction on even examples, another label on odd ones: exactly 50% if scored alike
    gold = [p if i % 2 == 0 else LABELS[(LABELS.index(p) + 1) % 3] for i, p in enumerate(predicted)]
    task = make_task(16, gold)
    section = EvaluationSection(batch_size=5, max_samples_per_task=None)
    assert evaluate_tasks(stack.model, tokenizer, [task], section, max_length=128, seed=0, device="cpu") == [50.0]



def test_rank_classification_encodes_each_prompt_once_for_all_its_labels(t5):
    """The encoder sees one row per example (not per label); every label's score is still its own
    independent mean log-probability."""
    from cl_flat import evaluate

    stack, tokenizer = t5
    task = make_task(5)
    encoder_rows = []
    hook = stack.model.get_encoder().register_forward_hook(
        lambda module, args, kwargs, output: encoder_rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        pairs = evaluate._seq2seq_pairs(tokenizer, task, list(range(5)), 128)
        scores = evaluate.target_logprobs(stack.model, pairs, tokenizer.pad_token_id, "cpu", per_prompt=3)
        assert encoder_rows == [5]
        expected = [pair_logprob(stack.model, *independent_ids(tokenizer, task, example, label))
                    for example in task.test for label in LABELS]
        assert scores == pytest.approx(expected, abs=1e-5)
        encoder_rows.clear()
        evaluate._rank_classification(stack.model, tokenizer, task, list(range(5)), 7, 128, "cpu")
        assert encoder_rows == [2, 2, 1]  # batches of whole examples: 7 sequences hold 2 examples of 3 labels
    finally:
        hook.remove()

def greedy(model, tokenizer, prompt: list[int], steps: int) -> str:
    """Greedy decoding by hand: argmax of the decoder's next-token logits until EOS."""
    out = [tokenizer.pad_token_id]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([out])).logits[0, -1]
            out.append(int(logits.argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(out, skip_special_tokens=True)


def test_exact_match_against_hand_written_greedy_decoding(t5):
    stack, tokenizer = t5
    head = stack.model.get_base_model().lm_head.weight
    saved = head.detach().clone()
    with torch.no_grad():  # make letters the likely outputs, so the generations are non-empty text
        letters = tokenizer("abcdefgh", add_special_tokens=False)["input_ids"]
        head[letters] *= 8
    try:
        task = make_task(6)
        texts = [greedy(stack.model, tokenizer, tokenizer(task.prompt(e))["input_ids"], 4) for e in task.test]
        assert any(t.strip() for t in texts)
        gold = [t if i % 3 else t + "zz" for i, t in enumerate(texts)]  # 4 of 6 match
        task = make_task(6, gold)
        task = dataclasses.replace(task, metric="exact_match")
        section = EvaluationSection(batch_size=4, max_samples_per_task=None, max_new_tokens=4)
        score = evaluate_tasks(stack.model, tokenizer, [task], section, max_length=128, seed=0, device="cpu")
        assert score == [pytest.approx(100 * 4 / 6)]
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_noise_targets_are_t5s_linear_layers_without_the_head(t5):
    stack, _ = t5
    linear = sorted(t.name for t in frozen_targets(stack.model, "all_linear"))
    names = ([f"encoder.block.{b}.layer.0.SelfAttention.{w}" for b in range(2) for w in "qkvo"]
             + [f"encoder.block.{b}.layer.1.DenseReluDense.{w}" for b in range(2) for w in ("wi_0", "wi_1", "wo")]
             + [f"decoder.block.{b}.layer.{k}.{a}.{w}" for b in range(2)
                for k, a in ((0, "SelfAttention"), (1, "EncDecAttention")) for w in "qkvo"]
             + [f"decoder.block.{b}.layer.2.DenseReluDense.{w}" for b in range(2) for w in ("wi_0", "wi_1", "wo")])
    expected = sorted(f"base_model.model.{n}" + (".base_layer" if n[-1] in "qv" and n[-2] == "." else "")
                      for n in names)
    assert linear == expected and len(linear) == 36
    assert len(frozen_targets(stack.model, "adapted")) == 12


def test_sam_on_t5_is_the_gradient_at_the_ascent_point(t5):
    """SAM by hand: g at θ, ε = ρ g/‖g‖ (global norm), gradient at θ + ε."""
    stack, tokenizer = t5
    task = make_task(4)
    batch = collate(encode_examples(task, tokenizer, task.train, 128), tokenizer.pad_token_id)
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    got = reference_update({"method": "sam", "rho": 0.1}, stack.model, [batch], target_loss)
    grads = torch.autograd.grad(target_loss(stack.model, batch), list(params.values()))
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
    saved = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for p, g in zip(params.values(), grads):
            p.add_(0.1 * g / norm)
    expected = torch.autograd.grad(target_loss(stack.model, batch), list(params.values()))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
    for name, g in zip(params, expected):
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-7)


METHODS = {
    "sam": {"method": "sam", "rho": 0.05},
    "asam": {"method": "sam", "rho": 0.5, "adaptive": True},
    "rwp-lora": {"method": "rwp", "scope": "lora", "noise_std": 0.05},
    "rwp-full": {"method": "rwp", "scope": "full", "noise_std": 0.05},
    "rwp-base": {"method": "rwp", "scope": "base", "noise_std": 0.05},
    "rwp-base-all-linear": {"method": "rwp", "scope": "base", "noise_std": 0.05, "noise_targets": "all_linear"},
    "rwp-fisher": {"method": "rwp", "scope": "full", "noise_std": 0.05, "noise_type": "fisher"},
    "lpf_sgd": {"method": "lpf_sgd", "scope": "full", "noise_std": 0.05},
    "flat_lora": {"method": "flat_lora", "noise_std": 0.5},
    "cflat": {"method": "cflat", "rho": 0.05},
}


@pytest.mark.parametrize("name", list(METHODS))
def test_every_flatness_method_updates_t5(t5, name):
    """One update of each method: a finite gradient for every trainable tensor that differs from the
    plain gradient (the perturbation reached the T5 forward), every weight unchanged afterwards."""
    stack, tokenizer = t5
    task = make_task(4)
    batches = [collate(encode_examples(task, tokenizer, task.train[i:i + 2], 128), tokenizer.pad_token_id)
               for i in (0, 2)]
    before = {n: p.detach().clone() for n, p in stack.model.named_parameters()}
    plain = reference_update({"method": "none"}, stack.model, batches, target_loss)
    got = reference_update(METHODS[name], stack.model, batches, target_loss, step=1, total_steps=2, seed=9)
    assert set(got) == set(plain) and len(got) == 24
    assert all(torch.isfinite(g).all() for g in got.values())
    assert max((got[n] - plain[n]).abs().max().item() for n in got) > 1e-6
    assert all(torch.equal(p, before[n]) for n, p in stack.model.named_parameters())


def test_landscape_loss_is_the_training_loss_on_the_held_out_sample(t5):
    stack, tokenizer = t5
    task = make_task(5)
    section = EvaluationSection(batch_size=2, max_samples_per_task=None)
    batches = held_out_batches(task, tokenizer, section, max_length=128, seed=0, max_samples=5, rank=0, world=1)
    total, count = 0.0, 0
    with torch.no_grad():
        for example in task.test:
            prompt, target = independent_ids(tokenizer, task, example, example.output)
            loss = stack.model(input_ids=torch.tensor([prompt]), labels=torch.tensor([target])).loss
            total, count = total + loss.item() * len(target), count + len(target)
    assert PerturbedLoss(stack.model, batches, [])(None) == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("scope", ["lora", "base"])
def test_rwp_one_pass_on_t5_equals_the_serial_two_batch_on_the_halves(t5, scope):
    """Each half's loss from one T5 forward equals the loss of that half alone; one-pass RWP (clean rows
    through W0, noisy rows through W0 + ε, in encoder, decoder and cross-attention) equals the serial
    two-batch form of reference_update on the same halves."""
    from cl_flat.flatness import build_method
    from cl_flat.flatness.reference import TorchContext
    from cl_flat.loss import target_split_losses

    stack, tokenizer = t5
    model = stack.model
    task = make_task(5)
    batch = collate(encode_examples(task, tokenizer, task.train, 128), tokenizer.pad_token_id)
    with torch.no_grad():
        first, second = target_split_losses(model, batch, 2)
        for got, rows in ((first, slice(None, 2)), (second, slice(2, None))):
            assert got.item() == pytest.approx(target_loss(model, {k: v[rows] for k, v in batch.items()}).item(),
                                               rel=1e-5)
    cfg = {"method": "rwp", "scope": scope, "noise_std": 0.05, "a": 0.3, "b": 0.7, "two_batch": True,
           "one_pass": True}
    serial = reference_update(cfg, model, [batch], target_loss, step=2, total_steps=10, seed=4)
    method = build_method(cfg)
    method.begin_task(model)
    ctx = TorchContext(model, target_loss, step=2, total_steps=10, seed=4, split_loss_fn=target_split_losses)
    method.window(ctx, [batch])
    for name, p in ctx.params.items():
        assert (p.grad - serial[name]).abs().max().item() <= 1e-5, name
        p.grad = None


def test_config_yaml_records_the_lora_targets_the_run_adapts(tiny_config):
    """The default targets (q_proj, v_proj) stay in the config as written; meta names what T5 adapts."""
    from cl_flat.recipes.skeleton import run_metadata

    model, _ = load_model("tiny-random:t5")
    tiny_config["model"]["name_or_path"] = "tiny-random:t5"
    assert run_metadata(validate_config(tiny_config), model)["lora_target_modules"] == ["q", "v"]
    tiny_config["lora"] = {"target_modules": ["q", "o", "wo"]}
    assert run_metadata(validate_config(tiny_config), model)["lora_target_modules"] == ["q", "o", "wo"]
    causal, _ = load_model("tiny-random:llama")
    tiny_config["model"]["name_or_path"], tiny_config["lora"] = "tiny-random:llama", {}
    assert run_metadata(validate_config(tiny_config), causal)["lora_target_modules"] == ["q_proj", "v_proj"]
