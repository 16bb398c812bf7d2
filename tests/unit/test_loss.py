"""The training loss: the fused head + cross-entropy against values derived by hand, and against
transformers' own `model(**batch).loss` on tiny peft models (value and LoRA gradients)."""

from __future__ import annotations

import math

import pytest
import torch

import cl_flat.loss as loss_module
from cl_flat.adapters import AdapterStack
from cl_flat.config import LoraSection
from cl_flat.loss import IGNORE, LinearCrossEntropy, fused_head, target_loss
from cl_flat.models import load_model


def hand_ce(logits: list[float], label: int) -> tuple[float, list[float]]:
    """CE of one row and its gradient softmax − onehot, in plain floats."""
    z = sum(math.exp(v) for v in logits)
    return math.log(z) - logits[label], [math.exp(v) / z - (i == label) for i, v in enumerate(logits)]


def test_value_and_gradient_by_hand(monkeypatch):
    # W rows e1, e2, e1+e2; h = (1,0), (0,2), (1,1) give logits (1,0,1), (0,2,2), (1,1,2).
    # Labels 0, 2, IGNORE: L = (CE((1,0,1), 0) + CE((0,2,2), 2)) / 2 and dL/dh_t = (p_t − e_{y_t})ᵀW / 2.
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    hidden = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 2, IGNORE])
    (l0, d0), (l1, d1) = hand_ce([1, 0, 1], 0), hand_ce([0, 2, 2], 2)
    expected_grad = [[(d[0] + d[2]) / 2, (d[1] + d[2]) / 2] for d in (d0, d1)] + [[0.0, 0.0]]
    for chunk_bytes in (2**20, 4 * 3):  # one chunk; one row per chunk
        monkeypatch.setattr(loss_module, "CHUNK_BYTES", chunk_bytes)
        value = LinearCrossEntropy.apply(hidden, weight, labels)
        (grad,) = torch.autograd.grad(value * 3.0, hidden)  # an upstream factor reaches dL/dh
        assert value.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
        assert torch.allclose(grad, 3.0 * torch.tensor(expected_grad, dtype=torch.float64), atol=1e-6)


def test_no_targets_gives_zero_loss_and_gradient():
    hidden = torch.randn(4, 3, requires_grad=True)
    value = LinearCrossEntropy.apply(hidden, torch.randn(5, 3), torch.full((4,), IGNORE))
    (grad,) = torch.autograd.grad(value, hidden)
    assert value.item() == 0.0 and not grad.any()


def peft_model(family: str, dtype: str = "fp32"):
    model, _ = load_model(f"tiny-random:{family}", dtype, 0)
    targets = ["c_attn", "c_fc"] if family == "gpt2" else ["q_proj", "v_proj", "down_proj"]
    stack = AdapterStack(model, LoraSection(r=4, alpha=8, target_modules=targets), 0)
    stack.add_task(0, "t")
    with torch.no_grad():  # B = 0 at init would hide the adapter's part of the gradient
        for name, p in stack.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return stack.model.eval()  # GPT-2's dropout would draw other masks in each forward


def batch_with_padding(vocab: int) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0  # right padding
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    labels[:, :5] = IGNORE  # a prompt without loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_loss_equals_transformers_loss(family, monkeypatch):
    monkeypatch.setattr(loss_module, "CHUNK_BYTES", 4 * 1024 * 7)  # several chunks per batch
    model = peft_model(family)
    assert fused_head(model) is not None
    batch = batch_with_padding(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    reference = model(**batch).loss
    expected = torch.autograd.grad(reference, params)
    fused = target_loss(model, batch)
    got = torch.autograd.grad(fused, params)
    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)


def test_fused_loss_in_bf16_matches_transformers_within_bf16():
    model = peft_model("llama", "bf16")
    batch = batch_with_padding(model.config.vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model(**batch).loss, params)
    got = torch.autograd.grad(target_loss(model, batch), params)
    for g, e in zip(got, expected):
        assert (g.float() - e.float()).norm() <= 0.02 * e.float().norm()


def test_other_heads_use_the_model_loss():
    model = peft_model("llama")
    batch = batch_with_padding(model.config.vocab_size)
    model.get_base_model().lm_head.weight.requires_grad_(True)  # a trained head is not fused
    assert fused_head(model) is None
    assert torch.equal(target_loss(model, batch), model(**batch).loss)
    model.get_base_model().lm_head.weight.requires_grad_(False)
    model.config.model_type = "gemma2"  # logits soft-capped: not the plain head product
    assert fused_head(model) is None
