"""GSAM and LookSAM `reference_update` against closed forms on a quadratic and against independent
implementations written here from the papers' formulas (plain autograd on a tiny peft model)."""

from __future__ import annotations

import math

import pytest
import torch

from cl_flat.flatness import build_method, reference_update
from helpers import Quadratic, lm_loss, quad_loss, tiny_peft_model

H = torch.tensor([2.0, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_gsam_closed_form(alpha):
    # w = (1, 2), H = diag(2, 1): g = (2, 2), ‖g‖ = 2√2; ρ = 0.1·√2 gives ε = (0.1, 0.1) and
    # g_p = H(w + ε) = (2.2, 2.1). ⟨g, g_p⟩ = 8.6, ‖g_p‖² = 9.25, so
    # g_⊥ = g − (8.6/9.25)·g_p = (2 − 18.92/9.25, 2 − 18.06/9.25) and the update is g_p − α·g_⊥.
    model = Quadratic([1.0, 2.0])
    got = reference_update({"method": "gsam", "rho": 0.1 * math.sqrt(2), "alpha": alpha}, model, [H], quad_loss)
    orthogonal = torch.tensor([2 - 18.92 / 9.25, 2 - 18.06 / 9.25], dtype=torch.float64)
    expected = torch.tensor([2.2, 2.1], dtype=torch.float64) - alpha * orthogonal
    torch.testing.assert_close(got["w"], expected, rtol=0, atol=1e-12)
    assert torch.equal(model.w.detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))  # restored


def test_gsam_orthogonal_part_is_orthogonal_and_alpha_zero_is_sam_on_the_window_mean():
    model = Quadratic([1.0, -3.0])
    h1, h2 = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)
    # α = 0: g_p at w + ρ·g/‖g‖ with g the window mean, on the last micro-batch
    g = (h1 + h2) / 2 * model.w.detach()
    eps = 0.3 * g / g.norm()
    g_p = h2 * (model.w.detach() + eps)
    got0 = reference_update({"method": "gsam", "rho": 0.3, "alpha": 0.0}, model, [h1, h2], quad_loss)
    torch.testing.assert_close(got0["w"], g_p, rtol=0, atol=1e-12)
    got1 = reference_update({"method": "gsam", "rho": 0.3, "alpha": 1.0}, model, [h1, h2], quad_loss)
    orthogonal = got0["w"] - got1["w"]  # α·g_⊥ with α = 1
    assert abs(float(orthogonal @ g_p)) < 1e-12  # g_⊥ ⊥ g_p


def _gradients(model, params, loss) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, params))


def _independent_sam_pieces(model, batches, rho):
    """(g: the window's mean gradient, g_s: the gradient at w + ρ·g/‖g‖ on the last micro-batch)."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_batch = [_gradients(model, params, lm_loss(model, b)) for b in batches]
    g = [sum(gs) / len(batches) for gs in zip(*per_batch)]
    g_norm = torch.sqrt(sum((x * x).sum() for x in g))
    with torch.no_grad():
        saved = [p.clone() for p in params]
        for p, x in zip(params, g):
            p.add_(x * rho / g_norm)
    g_s = _gradients(model, params, lm_loss(model, batches[-1]))
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    return g, g_s


def _batches(n: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.randint(3, 250, (2, 10), generator=gen) for _ in range(n)]


def test_gsam_matches_independent_on_peft():
    model = tiny_peft_model()
    batches = _batches(2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = reference_update({"method": "gsam", "rho": 0.05, "alpha": 0.4}, model, batches, lm_loss)
    g, g_p = _independent_sam_pieces(model, batches, 0.05)
    inner = sum((a * b).sum() for a, b in zip(g, g_p))
    gp_sq = sum((b * b).sum() for b in g_p)
    for name, x, xp in zip(names, g, g_p):
        expected = xp - 0.4 * (x - inner / gp_sq * xp)
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)


def test_looksam_sam_update_then_reuse_matches_independent_on_peft():
    """Update 0 (t mod k = 0) is the SAM gradient; update 1 reuses g_v stored at update 0:
    g + α·(‖g‖/‖g_v‖)·g_v with g the new clean mean and g_v = g_s − ⟨g_s, g⟩/‖g‖²·g from update 0."""
    model = tiny_peft_model()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    config = {"method": "looksam", "rho": 0.05, "interval": 2, "alpha": 0.7}
    method = build_method(config)
    method.begin_task(model)
    first, second = _batches(2), _batches(4)[2:]
    got0 = reference_update(config, model, first, lm_loss, step=0, method=method)
    g, g_s = _independent_sam_pieces(model, first, 0.05)
    for name, x in zip(names, g_s):
        torch.testing.assert_close(got0[name], x, rtol=0, atol=1e-6)
    inner = sum((a * b).sum() for a, b in zip(g_s, g))
    g_sq = sum((a * a).sum() for a in g)
    g_v = [a - inner / g_sq * b for a, b in zip(g_s, g)]

    got1 = reference_update(config, model, second, lm_loss, step=1, method=method)
    params = [p for p in model.parameters() if p.requires_grad]
    per_batch = [_gradients(model, params, lm_loss(model, b)) for b in second]
    g_new = [sum(gs) / 2 for gs in zip(*per_batch)]
    g_new_norm = torch.sqrt(sum((a * a).sum() for a in g_new))
    g_v_norm = torch.sqrt(sum((a * a).sum() for a in g_v))
    for name, x, v in zip(names, g_new, g_v):
        torch.testing.assert_close(got1[name], x + 0.7 * g_new_norm / g_v_norm * v, rtol=0, atol=1e-6)
    # a fresh method (no stored direction) takes the SAM gradient instead
    fresh = reference_update(config, model, second, lm_loss, step=1)
    assert any(not torch.allclose(fresh[n], got1[n], atol=1e-6) for n in names)


def test_looksam_interval_one_is_sam_on_the_window_mean():
    model = Quadratic([1.0, -3.0])
    h1, h2 = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([1.0, 4.0], dtype=torch.float64)
    g = (h1 + h2) / 2 * model.w.detach()
    expected = h2 * (model.w.detach() + 0.3 * g / g.norm())
    method = build_method({"method": "looksam", "rho": 0.3, "interval": 1})
    method.begin_task(model)
    for step in range(3):
        got = reference_update({"method": "looksam"}, model, [h1, h2], quad_loss, step=step, method=method)
        torch.testing.assert_close(got["w"], expected, rtol=0, atol=1e-12)
