"""C-Flat `reference_update` against a closed form on a quadratic (where ∇L = H w, so every finite
difference is exact) and against an independent implementation written here from the paper's
algorithm (plain autograd on a tiny peft model, two micro-batches)."""

from __future__ import annotations

import math

import torch

from cl_flat.flatness import build_method, reference_update
from helpers import Quadratic, lm_loss, quad_loss, tiny_peft_model


def test_cflat_closed_form_on_a_quadratic():
    # w = (1, 2), H = diag(2, 1), one micro-batch: g₀ = (2, 2), ‖g₀‖ = 2√2, ρ = 0.1·√2 gives ε₀ = (0.1, 0.1),
    # g₁ = H(w + ε₀) = (2.2, 2.1); g₁ − g₀ = (0.2, 0.1), ‖·‖ = √0.05, so ε₁ = ρ·(0.2, 0.1)/√0.05 = (0.02, 0.01)·√40.
    # g₂ = H(w + ε₁); on a quadratic g₃ − g₂ = H·ε₂ = ρ·H g₂/‖g₂‖ exactly; the update is g₁ + λ(g₃ − g₂).
    rho, lamb = 0.1 * math.sqrt(2), 0.5
    h = torch.tensor([2.0, 1.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    eps1 = torch.tensor([0.02, 0.01], dtype=torch.float64) * math.sqrt(40)
    g2 = h * (w + eps1)
    expected = torch.tensor([2.2, 2.1], dtype=torch.float64) + lamb * rho * h * g2 / g2.norm()
    torch.testing.assert_close(expected, torch.tensor([2.30430, 2.14776], dtype=torch.float64), rtol=0, atol=1e-5)
    model = Quadratic([1.0, 2.0])
    got = reference_update({"method": "cflat", "rho": rho, "lamb": lamb}, model, [h], quad_loss)
    torch.testing.assert_close(got["w"], expected, rtol=0, atol=1e-12)
    assert torch.equal(model.w.detach(), w)  # restored bit for bit


def test_cflat_window_on_a_quadratic_and_lamb_zero_is_sam():
    """Two micro-batches: ε₀ from the window mean, g₁ on B₂, the finite difference against B₂'s own clean gradient."""
    model = Quadratic([1.0, -3.0])
    w = model.w.detach().clone()
    h1, h2 = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)
    rho, lamb = 0.3, 0.7
    g = (h1 + h2) / 2 * w
    eps0 = rho * g / g.norm()
    g1 = h2 * (w + eps0)
    d = g1 - h2 * w  # = H₂ ε₀
    eps1 = rho * d / d.norm()
    g2 = h2 * (w + eps1)
    expected = g1 + lamb * h2 * (rho * g2 / g2.norm())
    got = reference_update({"method": "cflat", "rho": rho, "lamb": lamb}, model, [h1, h2], quad_loss)
    torch.testing.assert_close(got["w"], expected, rtol=0, atol=1e-12)
    sam = reference_update({"method": "cflat", "rho": rho, "lamb": 0.0}, model, [h1, h2], quad_loss)
    torch.testing.assert_close(sam["w"], g1, rtol=0, atol=1e-12)


def _grads(model, params, batch) -> list[torch.Tensor]:
    return list(torch.autograd.grad(lm_loss(model, batch), params))


def _unit(xs: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    n = torch.sqrt(sum((x * x).sum() for x in xs))
    return [rho * x / (n + 1e-12) for x in xs]


def _grads_at(model, params, batch, moves: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for move in moves:
            for p, e in zip(params, move):
                p.add_(e)
    try:
        return _grads(model, params, batch)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _independent_cflat(model, batches, rho, lamb) -> list[torch.Tensor]:
    """Algorithm 1 of the paper / the authors' C_Flat.step, with ε₀ from the window mean."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_batch = [_grads(model, params, b) for b in batches]
    g0 = [sum(gs) / len(batches) for gs in zip(*per_batch)]
    last = batches[-1]
    eps0 = _unit(g0, rho)
    g1 = _grads_at(model, params, last, [eps0])
    eps1 = _unit([a - b for a, b in zip(g1, per_batch[-1])], rho)
    g2 = _grads_at(model, params, last, [eps1])
    eps2 = _unit(g2, rho)
    g3 = _grads_at(model, params, last, [eps1, eps2])
    return [a + lamb * (c - b) for a, b, c in zip(g1, g2, g3)]


def _batches(seed: int, n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (2, 10), generator=gen) for _ in range(n)]


def test_cflat_matches_independent_on_peft_and_interval_gives_the_plain_mean_between():
    model = tiny_peft_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = {"method": "cflat", "rho": 0.05, "lamb": 0.4, "interval": 2}
    method = build_method(config)
    method.begin_task(model)
    first = _batches(2, 2)
    got = reference_update(config, model, first, lm_loss, step=0, method=method)
    expected = _independent_cflat(model, first, 0.05, 0.4)
    plain = [sum(gs) / 2 for gs in zip(*[_grads(model, params, b) for b in first])]
    for name, x in zip(names, expected):
        torch.testing.assert_close(got[name], x, rtol=0, atol=1e-6)
    # the perturbations and the first-order term are visible at this tolerance (the comparison is not vacuous)
    assert max((got[n] - p).abs().max().item() for n, p in zip(names, plain)) > 1e-4
    lamb0 = reference_update({**config, "lamb": 0.0}, model, first, lm_loss)
    assert max((got[n] - lamb0[n]).abs().max().item() for n in names) > 1e-5
    # update 1 (1 mod 2 ≠ 0): the plain window mean; update 2: C-Flat again
    second = _batches(4, 2)
    off = reference_update(config, model, second, lm_loss, step=1, method=method)
    mean = [sum(gs) / 2 for gs in zip(*[_grads(model, params, b) for b in second])]
    for name, x in zip(names, mean):
        torch.testing.assert_close(off[name], x, rtol=0, atol=1e-6)
    on = reference_update(config, model, second, lm_loss, step=2, method=method)
    for name, x in zip(names, _independent_cflat(model, second, 0.05, 0.4)):
        torch.testing.assert_close(on[name], x, rtol=0, atol=1e-6)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
