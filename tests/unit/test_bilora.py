"""Bi-LoRA's `reference_update` against an independent implementation written here from the paper's
formulas (Liu et al., ICLR 2026, Eqs. 7, 9, 10): the perturbation B₂A₂ written into a copy's frozen
weight, G = ∇_W L read from that weight, the auxiliary gradients G·A₂ᵀ and B₂ᵀ·G by the chain rule,
torch's own Adam/SGD with `maximize=True`, and the clipping on the explicit products' Frobenius norm."""

from __future__ import annotations

import copy

import pytest
import torch

from cl_flat.flatness import build_method, reference_update
from helpers import tiny_peft_model


def _llama_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _t5_loss(model, batch):
    return model(input_ids=batch[0], labels=batch[1]).loss


def _tiny_t5():
    return tiny_peft_model("tiny-random:t5", seed=2)


def _setup(family: str, n_updates: int, gas: int):
    gen = torch.Generator().manual_seed(2)
    if family == "llama":
        model, loss_fn = tiny_peft_model(), _llama_loss
        batches = [[torch.randint(3, 250, (2, 10), generator=gen) for _ in range(gas)] for _ in range(n_updates)]
    else:
        model, loss_fn = _tiny_t5(), _t5_loss
        batches = [[(torch.randint(3, 250, (2, 7), generator=gen), torch.randint(3, 250, (2, 3), generator=gen))
                    for _ in range(gas)] for _ in range(n_updates)]
    return model.double(), loss_fn, batches  # fp64: Adam's first steps (m/√v ≈ ±1) amplify fp32 rounding


def _lora_layer_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _initial_aux(model, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(9)
    aux = {}
    for name in _lora_layer_names(model):
        out_f, in_f = model.get_submodule(name).base_layer.weight.shape
        aux[f"{name}.A"] = torch.randn(rank, in_f, generator=gen, dtype=torch.float64) * 0.3
        aux[f"{name}.B"] = torch.randn(out_f, rank, generator=gen, dtype=torch.float64) * 0.3
    return aux


def _independent_update(model, loss_fn, batches, aux: dict[str, torch.Tensor]):
    """(primary gradient by name, G by layer) at W0 + B₂A₂, mean over the micro-batches."""
    twin = copy.deepcopy(model)
    layers = _lora_layer_names(twin)
    weights = {}
    for name in layers:
        w = twin.get_submodule(name).base_layer.weight
        with torch.no_grad():
            w.add_(aux[f"{name}.B"] @ aux[f"{name}.A"])
        w.requires_grad_(True)
        weights[name] = w
    primary = {n: p for n, p in twin.named_parameters() if "lora_" in n and p.requires_grad}
    for batch in batches:
        (loss_fn(twin, batch) / len(batches)).backward()
    return ({n: p.grad.clone() for n, p in primary.items()}, {n: w.grad.clone() for n, w in weights.items()})


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize(("optimizer", "lr", "clipped"), [("adam", 0.02, True), ("sgd", 0.5, False)])
def test_matches_independent_implementation(family, optimizer, lr, clipped):
    model, loss_fn, updates = _setup(family, n_updates=3, gas=2)
    rank = 3
    start = _initial_aux(model, rank)
    layers = _lora_layer_names(model)
    norm0 = torch.sqrt(sum(((start[f"{n}.B"] @ start[f"{n}.A"]) ** 2).sum() for n in layers))
    rho = float(norm0) * (0.5 if clipped else 100.0)
    config = {"method": "bilora", "rho": rho, "rank": rank, "lr": lr, "optimizer": optimizer}
    method = build_method(config)
    method.begin_task(model)
    method.load_state_dict({"aux": {k: v.clone() for k, v in start.items()}, "exp_avg": {}, "exp_avg_sq": {},
                            "t": 0})

    aux = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    opt = (torch.optim.Adam if optimizer == "adam" else torch.optim.SGD)(list(aux.values()), lr=lr, maximize=True)
    any_clipped = False
    for step, batches in enumerate(updates):
        got = reference_update(config, model, batches, loss_fn, step=step, total_steps=3, method=method)
        primary, g_w = _independent_update(model, loss_fn, batches, {k: v.detach() for k, v in aux.items()})
        for name, expected in primary.items():
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-10)
        for name in layers:  # Eq. 9: ∂L/∂B₂ = G A₂ᵀ, ∂L/∂A₂ = B₂ᵀ G
            aux[f"{name}.B"].grad = g_w[name] @ aux[f"{name}.A"].detach().t()
            aux[f"{name}.A"].grad = aux[f"{name}.B"].detach().t() @ g_w[name]
        opt.step()
        with torch.no_grad():  # Eq. 10: global clipping on √Σ‖B₂A₂‖²_F
            c = torch.sqrt(sum(((aux[f"{n}.B"] @ aux[f"{n}.A"]) ** 2).sum() for n in layers))
            if c > rho:
                any_clipped = True
                for v in aux.values():
                    v.mul_(torch.sqrt(rho / c))
        state = method.state_dict()["aux"]
        for key, expected in aux.items():
            torch.testing.assert_close(state[key].detach(), expected.detach(), rtol=0, atol=1e-10)
    assert any_clipped == clipped
    final = torch.sqrt(sum(((aux[f"{n}.B"] @ aux[f"{n}.A"]) ** 2).sum() for n in layers))
    assert final <= rho * (1 + 1e-5)


def test_fresh_auxiliary_is_lora_initialised_and_rho_zero_is_plain_lora():
    model, loss_fn, updates = _setup("llama", n_updates=3, gas=1)
    plain = [reference_update({"method": "none"}, model, b, loss_fn) for b in updates]
    method = build_method({"method": "bilora", "rho": 0.0})
    method.begin_task(model)
    for step, batches in enumerate(updates):
        got = reference_update({"method": "bilora"}, model, batches, loss_fn, step=step, method=method, seed=4)
        for name, expected in plain[step].items():
            torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-12)
        aux = {k: v.detach() for k, v in method.state_dict()["aux"].items()}
        assert all(float((aux[f"{n}.B"] @ aux[f"{n}.A"]).abs().max()) == 0 for n in _lora_layer_names(model))  # ε = 0

    fresh = build_method({"method": "bilora", "rank": 8})
    fresh.begin_task(model)
    first = reference_update({"method": "bilora"}, model, updates[0], loss_fn, seed=4, method=fresh)
    for name, expected in plain[0].items():  # B₂ = 0 at the start: the first update is plain LoRA
        torch.testing.assert_close(first[name], expected, rtol=0, atol=1e-12)
    again = build_method({"method": "bilora", "rank": 8, "lr": 1e-9})
    again.begin_task(model)
    reference_update({"method": "bilora"}, model, updates[0], loss_fn, seed=4, method=again)
    other_seed = build_method({"method": "bilora", "rank": 8})
    other_seed.begin_task(model)
    reference_update({"method": "bilora"}, model, updates[0], loss_fn, seed=5, method=other_seed)
    for name in _lora_layer_names(model):
        a_init = again.state_dict()["aux"][f"{name}.A"].detach()
        in_features = model.get_submodule(name).base_layer.weight.shape[1]
        assert a_init.shape == (8, in_features)
        # one Adam step of 1e-9 from A₂ ~ U(−1/√n, 1/√n) (B₂ = 0: ∂L/∂A₂ = B₂ᵀG = 0, A₂ unmoved)
        assert float(a_init.abs().max()) <= in_features ** -0.5
        assert torch.equal(a_init, fresh.state_dict()["aux"][f"{name}.A"])  # keyed by (seed, layer)
        assert not torch.equal(a_init, other_seed.state_dict()["aux"][f"{name}.A"])
        assert float(fresh.state_dict()["aux"][f"{name}.B"].detach().abs().max()) > 0  # B₂ ascended from 0


def test_the_auxiliary_adapter_leaves_the_model_untouched():
    """The hooks exist only during the passes: the model's loss after an update is its loss before,
    with a large ε in the method; the model holds no new parameters or buffers."""
    model, loss_fn, updates = _setup("llama", n_updates=1, gas=1)
    before = float(loss_fn(model, updates[0][0]))
    n_tensors = len(model.state_dict())
    method = build_method({"method": "bilora", "rho": 10.0, "rank": 2})
    method.begin_task(model)
    method.load_state_dict({"aux": _initial_aux(model, 2), "exp_avg": {}, "exp_avg_sq": {}, "t": 0})
    reference_update({"method": "bilora"}, model, updates[0], loss_fn, method=method)
    with torch.no_grad():
        assert float(loss_fn(model, updates[0][0])) == before
    assert len(model.state_dict()) == n_tensors
    assert all(not module._forward_hooks for module in model.modules())
