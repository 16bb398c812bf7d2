"""O-LoRA (lora.strategy: olora, cl_flat.strategies.olora): its terms' values and gradients against
hand-computed matrices, the penalty read from a real peft stack, the gradient every method gets, and its
config rules (a task's own λ). The orthogonality shrinking over a tiny run of the real loop:
tests/integration/test_olora_training.py."""

from __future__ import annotations

import math

import pytest
import torch

from cl_flat.strategies.olora import OrthogonalPenalty
from helpers import olora_stack


def test_terms_and_gradients_by_hand():
    a_old = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0]])
    a_new = torch.tensor([[1.0, 1.0, 0.0], [0.0, 2.0, 1.0]], requires_grad=True)
    b_new = torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]], requires_grad=True)
    penalty = OrthogonalPenalty(((a_new, (a_old,)),), (a_new, b_new), lambda_orth=0.5, lambda_l2=0.1)
    # A_old A_newᵀ = [[1, 2], [1, 1]]: Σ|·| = 5;  ‖A_new‖_F = √7, ‖B_new‖_F = 5
    assert penalty.orthogonality().item() == 5.0
    assert math.isclose(penalty.l2().item(), math.sqrt(7) + 5, rel_tol=1e-6)
    total = penalty()
    assert math.isclose(total.item(), 0.5 * 5 + 0.1 * (math.sqrt(7) + 5), rel_tol=1e-6)
    total.backward()
    # ∂Σ|A_old A_newᵀ|/∂A_new = sign(A_old A_newᵀ)ᵀ A_old = [[1, 1, 1], [1, 1, 1]];  ∂‖X‖_F/∂X = X/‖X‖_F
    expected_a = 0.5 * torch.ones(2, 3) + 0.1 * a_new.detach() / math.sqrt(7)
    assert torch.allclose(a_new.grad, expected_a, atol=1e-6)
    assert torch.allclose(b_new.grad, 0.1 * b_new.detach() / 5, atol=1e-6)
    assert penalty.stats() == {"olora_orth": 5.0, "olora_l2": penalty.l2().item()}


def test_the_penalty_reads_every_adapted_layer_of_the_stack():
    stack, first, second = olora_stack(lambda_l2=0.2)
    assert first.orthogonality().item() == 0.0  # nothing earlier to be orthogonal to
    layers = [m for n, m in stack.model.named_modules() if hasattr(m, "lora_A") and "two" in m.lora_A]
    assert len(second.pairs) == len(layers) == 4 and len(second.new) == 8
    by_hand = sum((m.lora_A["one"].weight @ m.lora_A["two"].weight.t()).abs().sum() for m in layers)
    assert torch.allclose(second.orthogonality(), by_hand)
    assert all(p.requires_grad for p in second.new) and not any(a.requires_grad for _, olds in second.pairs
                                                                  for a in olds)


def test_every_method_gets_the_gradient_of_the_full_loss():
    """reference_update of `none` with loss + R equals the plain gradient plus R's gradient from its
    formula (λ1·sign(A_k A_tᵀ)ᵀA_k summed over k for A_t; nothing for B_t when λ2 = 0)."""
    from cl_flat.flatness import reference_update

    stack, _, penalty = olora_stack()
    model = stack.model.eval()
    batch = torch.randint(3, 250, (2, 8), generator=torch.Generator().manual_seed(1))

    def lm(m, b):
        return m(input_ids=b, labels=b).loss

    g = reference_update({"method": "none"}, model, [batch], lambda m, b: lm(m, b) + penalty(m))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    plain = torch.autograd.grad(lm(model, batch), list(params.values()))
    for (name, p), base in zip(params.items(), plain):
        extra = torch.zeros_like(p)
        if ".lora_A.two." in name:
            layer = model.get_submodule(name.rsplit(".lora_A", 1)[0])
            a_old = layer.lora_A["one"].weight
            extra = 0.5 * torch.sign(a_old @ p.t()).t() @ a_old
        assert torch.allclose(g[name], base + extra, atol=1e-6), name


def test_a_task_trains_with_its_own_weights():
    """tasks[i].lora: the loop's penalty for task 2 carries that task's λ (λ1 = 0 here: only λ2·l2),
    task 1 the run's; no penalty for IncLoRA."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import validate_config
    from cl_flat.models import load_model
    from cl_flat.strategies import build_strategies

    raw = {"model": {"name_or_path": "tiny-random:llama"},
           "lora": {"strategy": "olora", "r": 4, "lambda_orth": 0.5, "lambda_l2": 0.1},
           "tasks": [{"name": "one", "source": "builtin", "task": "food_sentiment"},
                     {"name": "two", "source": "builtin", "task": "service_sentiment", "lora": {"lambda_orth": 0.0}}]}
    config = validate_config(raw)
    strategies = build_strategies(config)
    model, _ = load_model("tiny-random:llama", "fp32", seed=2)
    stack = AdapterStack(model, config.lora, seed=2)
    strategies.begin_task(stack, 0, "one")
    first = strategies.loss_terms(stack, 0)
    assert (first.lambda_orth, first.lambda_l2) == (0.5, 0.1)
    strategies.begin_task(stack, 1, "two")
    second = strategies.loss_terms(stack, 1)
    assert (second.lambda_orth, second.lambda_l2) == (0.0, 0.1)
    assert second.orthogonality().item() > 0  # still logged, no longer weighted
    assert torch.allclose(second(), 0.1 * second.l2())
    raw["lora"]["strategy"] = "inclora"
    del raw["tasks"][1]["lora"]
    assert build_strategies(validate_config(raw)).loss_terms(stack, 1) is None


# ---------------------------------------------------------------- config: a task's own λ


def _per_task(**task_b):
    return {"model": {"name_or_path": "tiny-random:llama"}, "training": {"epochs": 1, "learning_rate": 0.01},
            "flatness": {"method": "sam", "rho": 0.05},
            "tasks": [{"name": "a", "source": "builtin"}, {"name": "b", "source": "builtin", **task_b}]}


def test_per_task_olora_weights_merge_onto_the_run_level_ones():
    from cl_flat.config import config_to_dict, validate_config
    from cl_flat.strategies.olora import OLora

    raw = _per_task(lora={"lambda_l2": 0.3})
    raw["lora"] = {"strategy": "olora", "lambda_orth": 2.0}
    config = validate_config(raw)
    first, second = OLora(config).weights(0), OLora(config).weights(1)
    assert (first.lambda_orth, first.lambda_l2) == (2.0, 0.0)  # the run's λ1, λ2's default
    assert (second.lambda_orth, second.lambda_l2) == (2.0, 0.3)  # the run's λ1, its own λ2
    saved = config_to_dict(config)
    assert saved["tasks"][1]["lora"] == {"lambda_orth": 2.0, "lambda_l2": 0.3} and saved["tasks"][0]["lora"] is None
    assert config_to_dict(validate_config(saved)) == saved


def test_per_task_olora_weights_errors():
    from cl_flat.config import validate_config
    from cl_flat.errors import ConfigError

    raw = _per_task(lora={"lambda_orth": -1, "r": 4})
    raw["lora"] = {"strategy": "olora"}
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    assert "tasks.1.lora.lambda_orth" in str(info.value) and "tasks.1.lora.r" in str(info.value)
    with pytest.raises(ConfigError) as info:  # λ of a task only mean something under O-LoRA
        validate_config(_per_task(lora={"lambda_orth": 1.0}))
    assert "tasks.1.lora: a task's lambda_orth / lambda_l2 are O-LoRA's weights" in str(info.value)
    assert "(this run: inclora)" in str(info.value)
    with pytest.raises(ConfigError) as info:  # under seqlora too, reported with the schema's errors
        validate_config(_per_task(lora={"lambda_l2": 1.0}) | {"lora": {"strategy": "seqlora", "r": 0}})
    assert info.value.problems == ["lora.r: Input should be greater than or equal to 1 (got 0)",
                                   "tasks.1.lora: a task's lambda_orth / lambda_l2 are O-LoRA's weights; they need "
                                   "lora.strategy: olora (this run: seqlora)"]
