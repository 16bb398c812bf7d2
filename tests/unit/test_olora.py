"""O-LoRA's terms (lora.strategy: olora): values and gradients against hand-computed matrices, the
penalty read from a real peft stack, the gradient every method gets, and the orthogonality
shrinking over a tiny run of the real loop."""

from __future__ import annotations

import math

import torch

from cl_flat.olora import OrthogonalPenalty


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


def _stack(lambda_orth=0.5, lambda_l2=0.0):
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import LoraSection
    from cl_flat.models import load_model

    model, _ = load_model("tiny-random:llama", seed=5)
    stack = AdapterStack(model, LoraSection(strategy="olora", r=4, target_modules=["q_proj", "v_proj"],
                                            lambda_orth=lambda_orth, lambda_l2=lambda_l2), seed=5)
    stack.add_task(0, "one")
    first = OrthogonalPenalty.of(stack.model, "one", [], lambda_orth, lambda_l2)
    stack.add_task(1, "two")
    return stack, first, OrthogonalPenalty.of(stack.model, "two", ["one"], lambda_orth, lambda_l2)


def test_the_penalty_reads_every_adapted_layer_of_the_stack():
    stack, first, second = _stack(lambda_l2=0.2)
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

    stack, _, penalty = _stack()
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


def test_orthogonality_shrinks_over_a_tiny_run():
    from cl_flat import dist
    from cl_flat.config import validate_config
    from cl_flat.data.batches import Encoded
    from cl_flat.flatness import build_method
    from cl_flat.train import TrainTask, train_task

    dist.init_distributed()
    stack, _, penalty = _stack(lambda_orth=0.5)
    config = validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": [{"name": "x", "source":
                              "builtin"}], "training": {"micro_batch_size": 2, "max_steps": 8, "learning_rate": 0.01},
                              "logging": {"progress": False}})
    gen = torch.Generator().manual_seed(2)
    examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=gen).tolist()),
                        tuple([-100] * 5 + ids[5:])) for _ in range(16)]
    logs = []
    train_task(TrainTask(1, "two", examples, 256), stack.model, build_method({"method": "sam"}), config.training,
               config.deepspeed, 0, logs.append, regulariser=penalty)
    orth = [r["olora_orth"] for r in logs]
    assert len(orth) == 8 and orth[-1] < 0.8 * orth[0], orth


def test_a_task_trains_with_its_own_weights():
    """tasks[i].lora: the loop's penalty for task 2 carries that task's λ (λ1 = 0 here: only λ2·l2),
    task 1 the run's; no penalty for IncLoRA."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import validate_config
    from cl_flat.models import load_model
    from cl_flat.recipes.train import olora_penalty

    raw = {"model": {"name_or_path": "tiny-random:llama"},
           "lora": {"strategy": "olora", "r": 4, "lambda_orth": 0.5, "lambda_l2": 0.1},
           "tasks": [{"name": "one", "source": "builtin", "task": "food_sentiment"},
                     {"name": "two", "source": "builtin", "task": "service_sentiment", "lora": {"lambda_orth": 0.0}}]}
    config = validate_config(raw)
    model, _ = load_model("tiny-random:llama", "fp32", seed=2)
    stack = AdapterStack(model, config.lora, seed=2)
    stack.add_task(0, "one")
    first = olora_penalty(config, stack, 0)
    assert (first.lambda_orth, first.lambda_l2) == (0.5, 0.1)
    stack.add_task(1, "two")
    second = olora_penalty(config, stack, 1)
    assert (second.lambda_orth, second.lambda_l2) == (0.0, 0.1)
    assert second.orthogonality().item() > 0  # still logged, no longer weighted
    assert torch.allclose(second(), 0.1 * second.l2())
    raw["lora"]["strategy"] = "inclora"
    del raw["tasks"][1]["lora"]
    assert olora_penalty(validate_config(raw), stack, 1) is None
