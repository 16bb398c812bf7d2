"""cl_flat.landscape against hand derivations.

Pure core on quadratics L(w) = ½ wᵀHw: the 1-D/2-D surfaces are exact polynomials in
(alpha, beta); average-case sharpness over filter-normalised directions has the closed form
ρ²/(2n) Σ_i ‖W_i‖² tr(H_ii); the worst case lives in the filter-wise ball ‖ε_i‖ ≤ ρ‖W_i‖, whose
maximum on a row-separable quadratic at 0 is Σ_i ½(ρ‖W_i‖)² λ_max(H_ii) (one row: r²λ_max/2),
and the projected per-row ascent reaches it without ever leaving the ball. Model side on a tiny
peft stack: the loss is the training loss, perturbations are applied exactly as an in-place
edit of a copy would, nothing in the live model changes, bit for bit, and the number of passes
over the held-out sample is what the module docstring promises.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
from pathlib import Path

import pytest
import torch
import yaml

from cl_flat import landscape as ls
from cl_flat.recipes import landscape as recipe
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import require_run

D = torch.float64


def quad(H: torch.Tensor, center: torch.Tensor):
    """loss(ε) = ½ (c+ε)ᵀH(c+ε) on a dict {"w": tensor shaped like c}; ε None = unperturbed."""

    def loss(eps):
        w = center.flatten() + (0 if eps is None else eps["w"].flatten())
        return float(0.5 * w @ H @ w)

    def loss_and_grad(eps):
        w = center.flatten() + eps["w"].flatten()
        return float(0.5 * w @ H @ w), {"w": (H @ w).view_as(center)}

    return loss, loss_and_grad


# ---------------------------------------------------------------- directions


def test_filter_normalize_hand_values():
    W = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1.0, 2.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=D)
    d = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 7.0, 0.0], [1.0, 0.0, 0.0, 0.0]], dtype=D)
    out = ls.filter_normalize(d, W)
    # row 0: |d| = 2, |W| = 5 -> 2.5 each; row 1: |d| = 7, |W| = 3 -> (0,0,3,0); row 2: |W| = 0 -> 0
    expected = torch.tensor([[2.5, 2.5, 2.5, 2.5], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=D)
    assert torch.equal(out, expected)
    assert torch.equal(out.norm(dim=1), W.norm(dim=1))
    # biases / norm weights: no perturbation; a zero direction row stays zero
    assert torch.equal(ls.filter_normalize(torch.ones(4, dtype=D), torch.ones(4, dtype=D)), torch.zeros(4, dtype=D))
    assert torch.equal(ls.filter_normalize(torch.zeros(2, 2, dtype=D), torch.ones(2, 2, dtype=D)),
                       torch.zeros(2, 2, dtype=D))


def test_random_direction_rows_seeded_and_no_global_rng():
    W = {"a": torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]], dtype=D), "b": torch.tensor([1.0, 2.0], dtype=D)}
    norms = {k: ls.reference_norms(v) for k, v in W.items()}
    shapes = {k: v.shape for k, v in W.items()}
    state = torch.get_rng_state()
    d = ls.random_direction(norms, shapes, torch.Generator().manual_seed(3), dtype=D)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never used
    assert torch.allclose(d["a"].norm(dim=1), torch.tensor([5.0, 2.0], dtype=D), rtol=0, atol=1e-12)
    assert torch.equal(d["b"], torch.zeros(2, dtype=D))  # 1-D tensors never move
    again = ls.random_direction(norms, shapes, torch.Generator().manual_seed(3), dtype=D)
    other = ls.random_direction(norms, shapes, torch.Generator().manual_seed(4), dtype=D)
    assert torch.equal(d["a"], again["a"]) and not torch.equal(d["a"], other["a"])


def test_orthogonalize_hand_values_and_properties():
    # row 0: d1 = (1, 0), d2 = (1, 1) -> residual (0, 1) -> scaled to |W_0| = 2: (0, 2)
    # row 1: d1 = (1, 1), d2 = (2, 0) -> residual (2,0) - 1·(1,1) = (1, -1) -> scaled to |W_1| = √2: (1, -1)
    norms = {"w": torch.tensor([2.0, math.sqrt(2.0)], dtype=D)}
    d1 = {"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=D)}
    d2 = {"w": torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=D)}
    out = ls.orthogonalize(d2, d1, norms)
    assert torch.allclose(out["w"], torch.tensor([[0.0, 2.0], [1.0, -1.0]], dtype=D), atol=1e-15)
    # random, larger: exactly orthogonal over the whole vector and exactly filter-normalised
    W = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), dtype=D)
    n, s = {"w": ls.reference_norms(W)}, {"w": W.shape}
    g = torch.Generator().manual_seed(1)
    a = ls.random_direction(n, s, g, dtype=D)
    b = ls.orthogonalize(ls.random_direction(n, s, g, dtype=D), a, n)
    assert abs(ls.dot(a, b)) < 1e-12 * ls.l2_norm(a) * ls.l2_norm(b)
    assert torch.allclose(b["w"].norm(dim=1), W.norm(dim=1), rtol=1e-12)


# ---------------------------------------------------------------- surfaces


def test_1d_curve_is_the_parabola():
    # H = [[2,1],[1,3]], w = (1,0), d = (0,1): L(w) = 1, dᵀHw = 1, dᵀHd = 3 -> 1 + α + 1.5α²
    H = torch.tensor([[2.0, 1.0], [1.0, 3.0]], dtype=D)
    loss, _ = quad(H, torch.tensor([1.0, 0.0], dtype=D))
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    curve = ls.loss_surface(loss, [{"w": torch.tensor([0.0, 1.0], dtype=D)}], [(a,) for a in alphas])
    assert curve == pytest.approx([1.5, 0.875, 1.0, 1.875, 3.5], abs=1e-14)
    # w = 0: exactly ½α²dᵀHd
    loss0, _ = quad(H, torch.zeros(2, dtype=D))
    d = {"w": torch.tensor([1.0, -2.0], dtype=D)}  # dᵀHd = 2 - 4 + 12 = 10
    assert ls.loss_surface(loss0, [d], [(a,) for a in alphas]) == pytest.approx([5 * a * a for a in alphas], abs=1e-14)


def test_2d_surface_is_the_quadric():
    # H = diag(2, 4), w = 0, d1 = e1, d2 = e2: L = α² + 2β²
    H = torch.diag(torch.tensor([2.0, 4.0], dtype=D))
    loss, _ = quad(H, torch.zeros(2, dtype=D))
    d1, d2 = {"w": torch.tensor([1.0, 0.0], dtype=D)}, {"w": torch.tensor([0.0, 1.0], dtype=D)}
    grid = [-1.0, 0.0, 1.0]
    coords = [(a, b) for a in grid for b in grid]
    surface = ls.loss_surface(loss, [d1, d2], coords)
    assert surface == pytest.approx([a * a + 2 * b * b for a, b in coords], abs=1e-14)


# ---------------------------------------------------------------- sharpness


def _block_hessian(m: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(m * n, m * n, generator=g, dtype=D)
    return X @ X.T / (m * n) + torch.eye(m * n, dtype=D)


def test_average_sharpness_closed_form_filter_normalised():
    """Rows of d uniform on spheres of radius |W_i|, ε = ρ d: E[L(W+ε) − L(W)] = E[εᵀHW] + ½E[εᵀHε]
    = 0 + ρ²/(2n) Σ_i |W_i|² tr(H_ii)."""
    m, n, rho, M = 3, 4, 0.3, 20000
    W = torch.randn(m, n, generator=torch.Generator().manual_seed(7), dtype=D) * torch.tensor([[1.0], [2.0], [0.5]],
                                                                                             dtype=D)
    H = _block_hessian(m, n, 8)
    loss, _ = quad(H, W)
    norms, shapes = {"w": ls.reference_norms(W)}, {"w": W.shape}
    g = torch.Generator().manual_seed(9)
    radii = ls.row_radii(norms, rho)  # r_i = ρ|W_i|: each row of ε = ρ d lies on its sphere
    est = ls.estimate_sharpness(loss, lambda: ls.random_direction(norms, shapes, g, dtype=D), radii, M)
    closed = rho**2 / (2 * n) * sum(W[i].norm().item() ** 2
                                    * torch.trace(H[i * n:(i + 1) * n, i * n:(i + 1) * n]).item() for i in range(m))
    samples = torch.tensor(est.random, dtype=D)
    stderr = samples.std().item() / math.sqrt(M)
    assert est.avg == pytest.approx(samples.mean().item(), abs=1e-12)
    assert abs(est.avg - closed) < 4 * stderr, (est.avg, closed, stderr)
    assert est.base == pytest.approx(loss(None))
    assert est.radius == pytest.approx(rho * W.norm().item(), rel=1e-12)  # sqrt(Σ r_i²) = ρ|W|_F


def test_average_sharpness_isotropic_sphere_and_worst_case_ascent():
    """One row w (1 × n), so the filter-wise ball is the ordinary L2 ball |ε| ≤ r: at w = 0, ε
    uniform on the sphere of radius r in R^n: E[½εᵀHε] = r² tr(H)/(2n) and
    max_{|ε|<=r} ½εᵀHε = r² λ_max/2, approached by the projected ascent."""
    n, r, M = 4, 0.3, 20000
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(1), dtype=D))
    lam = torch.tensor([4.0, 2.0, 1.0, 0.5], dtype=D)
    H = Q @ torch.diag(lam) @ Q.T
    loss, loss_and_grad = quad(H, torch.zeros(1, n, dtype=D))
    radii = {"w": torch.tensor([r], dtype=D)}
    g = torch.Generator().manual_seed(2)
    sample = lambda: {"w": torch.randn(1, n, generator=g, dtype=D)}  # noqa: E731  (scaled onto the sphere inside)
    est = ls.estimate_sharpness(loss, sample, radii, M, loss_and_grad=loss_and_grad, ascent_steps=60)
    closed_avg = r * r * lam.sum().item() / (2 * n)
    stderr = torch.tensor(est.random, dtype=D).std().item() / math.sqrt(M)
    assert abs(est.avg - closed_avg) < 4 * stderr
    top = r * r * lam.max().item() / 2
    assert est.worst == pytest.approx(top, rel=1e-9)
    assert est.worst <= top * (1 + 1e-12)  # projected: never outside the ball
    # with few random samples and no ascent, the worst case is only the best random sample
    g2 = torch.Generator().manual_seed(3)
    few = ls.estimate_sharpness(loss, lambda: {"w": torch.randn(1, n, generator=g2, dtype=D)}, radii, 3)
    assert few.worst == max(few.random) and few.ascent == ()
    assert few.worst < top
    # a few ascent steps from the best of 3 directions already get close to the top
    g3 = torch.Generator().manual_seed(3)
    five = ls.estimate_sharpness(loss, lambda: {"w": torch.randn(1, n, generator=g3, dtype=D)}, radii, 3,
                                 loss_and_grad=loss_and_grad, ascent_steps=5)
    assert few.worst <= five.worst <= top * (1 + 1e-12) and five.worst > 0.9 * top
    assert len(five.ascent) == 6  # start + 5 iterates
    # the worst ε is kept: its loss is the worst case, it lies in the ball, and it points along H's
    # leading eigenvector (λ = 4): with c = cos to it, worst ≤ ½r²(4c² + 2(1 − c²)), so worst > 0.9·top
    # = 0.9·½r²·4 needs c² > 0.8, |c| > 0.894
    top_eps = five.worst_perturbation["w"]
    assert loss(five.worst_perturbation) == five.worst + five.base and top_eps.norm() <= r * (1 + 1e-12)
    assert abs(float(top_eps.flatten() @ Q[:, 0])) / float(top_eps.norm()) > 0.894
    assert five.random == few.random  # same draws: worst = max(best random, ascent) >= best random
    # a known L(θ) is not recomputed
    g4 = torch.Generator().manual_seed(3)
    calls = []
    counted = lambda eps: calls.append(eps is None) or loss(eps)  # noqa: E731
    again = ls.estimate_sharpness(counted, lambda: {"w": torch.randn(1, n, generator=g4, dtype=D)}, radii, 3,
                                  loss_and_grad=loss_and_grad, ascent_steps=5, base=0.0)
    assert not any(calls) and len(calls) == 3 + 1 == sum(ls.sharpness_passes(3, 5, base=False)) - 5
    assert again.worst == five.worst and again.avg == five.avg


def test_project_rows_hand_values():
    eps = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]], dtype=D), "b": torch.ones(2, dtype=D)}
    radii = {"w": torch.tensor([1.0, 1.0, 2.0], dtype=D), "b": None}
    out = ls.project_rows(eps, radii)
    # row 0: |ε_0| = 5 > 1 -> (0.6, 0.8); row 1: 0.5 <= 1 kept; row 2: 0 kept; tensors without radius -> 0
    assert torch.allclose(out["w"], torch.tensor([[0.6, 0.8], [0.3, 0.4], [0.0, 0.0]], dtype=D), atol=1e-15)
    assert torch.equal(out["b"], torch.zeros(2, dtype=D))
    assert ls.radius_norm(radii) == pytest.approx(math.sqrt(6.0))
    assert ls.row_radii({"w": torch.tensor([2.0, 4.0], dtype=D), "b": None}, 0.5)["w"].tolist() == [1.0, 2.0]


def _recording(loss_and_grad, radii, seen):
    """loss_and_grad that asserts every iterate it is asked about lies in the filter-wise ball."""

    def wrapped(eps):
        for k, e in eps.items():
            lengths = e.flatten(1).norm(dim=1)
            assert torch.all(lengths <= radii[k] * (1 + 1e-12)), (k, lengths, radii[k])
        seen.append(eps)
        return loss_and_grad(eps)

    return wrapped


def test_worst_case_filter_wise_ball_two_rows_hand_derived():
    """Two rows of very different norms, |W_0| = 10, |W_1| = 0.1, ρ = 0.1 -> r = (1, 0.01); L(θ+ε)
    = ½εᵀHε with H = diag(1, 2, 3 | 50, 5, 1) (separable: H_00 = diag(1,2,3), H_11 = diag(50,5,1)).
    The filter-wise maximum: row 0 -> ±r_0 e_3: ½·1²·3 = 1.5; row 1 -> ±r_1 e_1: ½·0.01²·50 = 0.0025;
    sum 1.5025. A plain L2 ball of radius ρ|W|_F = 0.1·√100.01 would put everything on the λ = 50
    axis of the SMALL row, moving it by 100× its own radius: ½·0.01·100.01·50 = 25.0025."""
    W = torch.tensor([[6.0, 8.0, 0.0], [0.0, 0.06, 0.08]], dtype=D)
    rho = 0.1
    H = torch.diag(torch.tensor([1.0, 2.0, 3.0, 50.0, 5.0, 1.0], dtype=D))
    loss, loss_and_grad = quad(H, torch.zeros(2, 3, dtype=D))
    norms, shapes = {"w": ls.reference_norms(W)}, {"w": W.shape}
    radii = ls.row_radii(norms, rho)
    assert torch.allclose(radii["w"], torch.tensor([1.0, 0.01], dtype=D), rtol=1e-12)
    top = 0.5 * 1.0**2 * 3.0 + 0.5 * 0.01**2 * 50.0  # 1.5025
    g = torch.Generator().manual_seed(0)
    seen = []
    est = ls.estimate_sharpness(loss, lambda: ls.random_direction(norms, shapes, g, dtype=D), radii, 4,
                                loss_and_grad=_recording(loss_and_grad, radii, seen),
                                ascent_steps=200)
    assert est.worst == pytest.approx(top, rel=1e-9)
    assert est.worst <= top * (1 + 1e-12)
    assert est.worst >= max(est.random)
    assert len(seen) == 200
    final = seen[-1]["w"]  # the iterate ends on the top axis of each row, each on its own sphere
    assert abs(final[0, 2].item()) == pytest.approx(1.0, rel=1e-6)
    assert abs(final[1, 0].item()) == pytest.approx(0.01, rel=1e-6)
    # the same weights seen as ONE row (the old plain L2 ball of radius ρ|W|_F) reach ~25
    flat_loss, flat_grad = quad(H, torch.zeros(1, 6, dtype=D))
    g = torch.Generator().manual_seed(0)
    plain = ls.estimate_sharpness(flat_loss, lambda: {"w": torch.randn(1, 6, generator=g, dtype=D)},
                                  {"w": torch.tensor([rho * W.norm().item()], dtype=D)}, 4,
                                  loss_and_grad=flat_grad, ascent_steps=200)
    assert plain.worst == pytest.approx(0.5 * rho**2 * 100.01 * 50.0, rel=1e-9)
    assert plain.worst > 16 * est.worst


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("steps", [0, 1, 5, 30])
def test_worst_case_never_exceeds_the_filter_wise_bound(seed, steps):
    """Any row-separable quadratic at its minimum, rows of norms 1e-3 .. 30: every random sample and
    every ascent iterate lies in the ball, and worst <= Σ_i ½ r_i² λ_max(H_ii)."""
    m, n, rho = 3, 4, 0.05
    gen = torch.Generator().manual_seed(100 + seed)
    W = torch.randn(m, n, generator=gen, dtype=D) * torch.tensor([[1e-3], [1.0], [30.0]], dtype=D)
    blocks = [_block_hessian(1, n, 1000 * seed + i) * (10.0 ** (i - 1)) for i in range(m)]
    H = torch.block_diag(*blocks)
    loss, loss_and_grad = quad(H, torch.zeros(m, n, dtype=D))
    norms, shapes = {"w": ls.reference_norms(W)}, {"w": W.shape}
    radii = ls.row_radii(norms, rho)
    bound = sum(0.5 * radii["w"][i].item() ** 2 * torch.linalg.eigvalsh(blocks[i]).max().item() for i in range(m))
    seen = []
    est = ls.estimate_sharpness(loss, lambda: ls.random_direction(norms, shapes, gen, dtype=D), radii, 3,
                                loss_and_grad=_recording(loss_and_grad, radii, seen), ascent_steps=steps)
    assert len(seen) == steps
    assert max(est.random) <= bound * (1 + 1e-12)
    assert est.worst <= bound * (1 + 1e-12)
    assert est.worst >= max(est.random)
    if steps >= 30:
        assert est.worst > 0.95 * bound  # near the top (slower where a block has a small eigengap)


# ---------------------------------------------------------------- model side


@pytest.fixture
def tiny_stack(tiny_config):
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import validate_config
    from cl_flat.data import load_tasks
    from cl_flat.models import load_model

    config = validate_config(tiny_config, "tiny")
    model, tokenizer = load_model("tiny-random:llama", "fp32", seed=1)
    stack = AdapterStack(model, config.lora, seed=1)
    g = torch.Generator().manual_seed(5)
    for index, name in enumerate(("t1", "t2")):
        stack.add_task(index, name)
        with torch.no_grad():  # a trained-looking adapter: B != 0
            for pname, p in stack.model.named_parameters():
                if f".lora_B.{name}." in pname:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    tasks = load_tasks(config)
    return config, stack, tokenizer, tasks


def _snapshot(model):
    return ({n: p.detach().clone() for n, p in model.named_parameters()},
            {n: p.requires_grad for n, p in model.named_parameters()}, model.training)


def _assert_unchanged(model, snapshot):
    values, flags, training = snapshot
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), values[n]), n
        assert p.requires_grad == flags[n], n
        assert p.grad is None, n
    assert model.training == training


def test_moved_weights_per_space(tiny_stack):
    config, stack, _, _ = tiny_stack
    moved = ls.moved_weights(stack.model, "adapter", "t2")
    names = {m.name for m in moved}
    assert names == {n for n, _ in stack.model.named_parameters() if ".t2." in n}
    assert len(names) == 2 * 2 * 2  # 2 layers × (q, v) × (A, B)
    params = dict(stack.model.named_parameters())
    for m in moved:
        assert torch.equal(m.norms, params[m.name].detach().norm(dim=1))
    merged = ls.moved_weights(stack.model, "merged", "t2")
    assert {m.name for m in merged} == {n for n in params if n.endswith("base_layer.weight")}
    s = config.lora.alpha / config.lora.r
    for m in merged:
        prefix = m.name[:-len("base_layer.weight")]
        W = params[m.name].detach() + sum(s * params[f"{prefix}lora_B.{a}.weight"].detach()
                                          @ params[f"{prefix}lora_A.{a}.weight"].detach() for a in ("t1", "t2"))
        assert torch.allclose(m.norms, W.norm(dim=1), rtol=1e-5)


def test_loss_is_training_loss_and_perturbation_equals_inplace_edit(tiny_stack):
    config, stack, tokenizer, tasks = tiny_stack
    from cl_flat.data.batches import collate, encode_examples
    from cl_flat.train import target_loss

    model = stack.model
    model.eval()
    config.evaluation.batch_size = 5  # several batches, padded differently
    batches = ls.held_out_batches(tasks[0], tokenizer, config.evaluation, max_length=config.training.max_seq_length,
                                  seed=config.run.seed, split="test", max_samples=12, device="cpu", rank=0, world=1)
    assert sum(len(b["input_ids"]) for b in batches) == len(tasks[0].test) == 12
    for space in ("adapter", "merged"):
        moved = ls.moved_weights(model, space, "t2")
        f = ls.PerturbedLoss(model, batches, moved)
        # unperturbed: the HF mean target-token loss over one batch holding the whole sample
        whole = collate(encode_examples(tasks[0], tokenizer, tasks[0].test, config.training.max_seq_length),
                        tokenizer.pad_token_id)
        with torch.no_grad():
            reference = target_loss(model, whole).item()
        assert f(None) == pytest.approx(reference, rel=1e-5)
        assert f.keep_logits  # logits only at target positions ...
        f.keep_logits = False
        assert f(None) == pytest.approx(reference, rel=1e-5)  # ... or everywhere: the same loss
        f.keep_logits = True
        # perturbed functionally == the same weights edited in place on a deep copy
        norms, shapes = {m.name: m.norms for m in moved}, {m.name: m.shape for m in moved}
        d = ls.random_direction(norms, shapes, torch.Generator().manual_seed(0))
        twin = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in twin.named_parameters():
                if name in d:
                    p.add_(0.5 * d[name])
            edited = target_loss(twin, whole).item()
        assert f({k: 0.5 * v for k, v in d.items()}) == pytest.approx(edited, rel=1e-5)
        assert abs(edited - reference) > 1e-4  # the perturbation does something
        # gradient w.r.t. ε against a central finite difference along d
        eps = {k: 0.1 * v for k, v in d.items()}
        _, grad = f.loss_and_grad(eps)
        h = 1e-3
        fd = (f({k: v + h * d[k] for k, v in eps.items()}) - f({k: v - h * d[k] for k, v in eps.items()})) / (2 * h)
        assert ls.dot(grad, d) == pytest.approx(fd, rel=2e-2)


@pytest.mark.parametrize("space", ["adapter", "merged"])
def test_compute_sharpness_leaves_live_model_bit_for_bit(tiny_stack, space):
    config, stack, tokenizer, tasks = tiny_stack
    model = stack.model
    model.train()  # as right after training: current adapter trainable, train mode
    before = _snapshot(model)
    options = ls.LandscapeOptions(space=space, samples=3, ascent_steps=2, max_samples=12)
    result = ls.compute_sharpness(model, tokenizer, tasks[1], "t2", config.evaluation,
                                  max_length=config.training.max_seq_length, seed=config.run.seed, options=options)
    _assert_unchanged(model, before)
    stack.check_trainable()
    assert set(result) >= {"avg", "worst", "rho", "samples"}
    assert result["samples"] == 3 and result["rho"] == config.evaluation.sharpness_rho
    assert result["worst"] >= result["avg"] and result["worst"] > 0
    assert result["examples"] == 12 and result["space"] == space and result["ball"] == "filter-wise"
    # L(θ) + 3 samples + the last ascent iterate forward-only; 2 ascent steps of one forward+backward each;
    # the Hessian: the power iterations run and one product per trace probe
    hessian = result["power_iterations"] + config.evaluation.hessian_probes
    assert result["passes"] == {"forward": 1 + 3 + 1, "forward_backward": 2, "hessian_vector": hessian}
    # one power iteration, and a second (shifted, its own cap) where the dominant eigenvalue is negative
    runs = 1 if result["lambda_dominant"] >= 0 else 2
    assert 1 <= result["power_iterations"] <= runs * config.evaluation.hessian_iters
    assert result["lambda_max"] >= result["lambda_dominant"]
    assert sum(ls.sharpness_passes(3, 2)) == 5 + 2
    again = ls.compute_sharpness(model, tokenizer, tasks[1], "t2", config.evaluation,
                                 max_length=config.training.max_seq_length, seed=config.run.seed, options=options)
    assert again == result  # seeded: the same numbers


def test_compute_sharpness_stays_in_the_filter_wise_ball(tiny_stack, monkeypatch):
    """Adapter space with a small B (as after training): every ε evaluated — random samples and
    ascent iterates — moves row i of every A and B by at most ρ‖W_i‖, so B moves by at most ρ
    times its OWN row norms, however much larger A is; the ascent never lowers the worst case."""
    config, stack, tokenizer, tasks = tiny_stack
    model = stack.model
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B.t2." in name:
                p.mul_(1e-3)
    rho = config.evaluation.sharpness_rho
    limits = {m.name: rho * m.norms for m in ls.moved_weights(model, "adapter", "t2")}
    seen = []

    def check(eps):
        if eps is not None:
            for k, e in eps.items():
                lengths = e.flatten(1).norm(dim=1)
                assert torch.all(lengths <= limits[k] * (1 + 1e-5) + 1e-12), k
            seen.append(eps)

    call, grad = ls.PerturbedLoss.__call__, ls.PerturbedLoss.loss_and_grad
    monkeypatch.setattr(ls.PerturbedLoss, "__call__", lambda self, eps=None: check(eps) or call(self, eps))
    monkeypatch.setattr(ls.PerturbedLoss, "loss_and_grad", lambda self, eps: check(eps) or grad(self, eps))
    result = ls.compute_sharpness(model, tokenizer, tasks[1], "t2", config.evaluation,
                                  max_length=config.training.max_seq_length, seed=config.run.seed,
                                  options=ls.LandscapeOptions(samples=4, ascent_steps=3))
    assert len(seen) == 4 + 3 + 1
    big_b = max(float(limits[k].max()) for k in limits if ".lora_B." in k)
    small_a = min(float(limits[k].min()) for k in limits if ".lora_A." in k)
    assert big_b < 1e-2 * small_a  # the case the plain L2 ball got wrong: B tiny next to A
    assert result["worst"] >= result["avg"] and math.isfinite(result["worst"])
    assert result["radius"] == pytest.approx(math.sqrt(sum(float((v.double() ** 2).sum()) for v in limits.values())),
                                             rel=1e-6)


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_compute_landscape_on_a_saved_run(tiny_stack, tmp_path):
    from cl_flat.config import config_to_dict
    from cl_flat.errors import UserError

    config, stack, tokenizer, tasks = tiny_stack
    run_dir = tmp_path / "run"
    (run_dir / "adapters").mkdir(parents=True)
    # save t1 alone (as after task 1), then t2
    for name in ("t1", "t2"):
        stack.model.save_pretrained(str(tmp_path / "saved"), selected_adapters=[name])
        saved = tmp_path / "saved" / name if (tmp_path / "saved" / name).is_dir() else tmp_path / "saved"
        saved.rename(run_dir / "adapters" / name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    (run_dir / "acc_matrix.csv").write_text("after_task,t1,t2\nzero_shot,50.0,50.0\nt1,50.0,50.0\n")
    before = _hashes(run_dir / "adapters")
    out = recipe.compute_landscape(run_dir, "t1", ls.LandscapeOptions(dims=1, points=5, samples=2), progress=False)
    rows = list(csv.DictReader(out.csv.open()))
    assert out.csv == run_dir / "landscape" / "t1_1d.csv"
    assert [float(r["alpha"]) for r in rows] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert float(rows[2]["loss"]) == out.sharpness["loss"] == out.loss  # alpha 0 = unperturbed, computed once
    # passes over the sample: L(θ) once (grid origin + sharpness baseline), 4 other grid points, 2 random
    # samples, the last ascent iterate; 5 ascent steps (config default) of one forward+backward each
    assert config.evaluation.sharpness_ascent_steps == 5
    # the Hessian: the power iterations run (at most hessian_iters) and one product per trace probe
    assert out.passes == {"forward": 1 + 4 + 2 + 1, "forward_backward": 5,
                          "hessian_vector": out.sharpness["power_iterations"] + config.evaluation.hessian_probes}
    assert out.sharpness["lambda_max"] > 0 and out.sharpness["hessian_probes"] == config.evaluation.hessian_probes
    assert out.examples == 8  # min(max_samples_per_task = 12, landscape_max_samples = 8)
    assert config.evaluation.landscape_max_samples == 8
    assert out.png.read_bytes()[:4] == b"\x89PNG"
    assert _hashes(run_dir / "adapters") == before
    with pytest.raises(UserError, match="not trained yet"):
        recipe.compute_landscape(run_dir, "t2", progress=False)
    with pytest.raises(UserError, match="unknown task"):
        recipe.compute_landscape(run_dir, "t7", progress=False)
    with pytest.raises(UserError, match="not found"):
        recipe.compute_landscape(tmp_path / "missing", "t1", progress=False)


def test_worst_direction_landscape_rises_at_least_as_fast_as_a_random_one(tiny_stack, tmp_path):
    """--direction worst: the first axis is the sharpness ascent's worst ε, filter-normalised; at
    alpha = rho (the ball's boundary) the loss along it is at least that along a random axis, and is
    the worst case itself (every row of that ε lies on its sphere); files do not overwrite the random ones."""
    from cl_flat.config import config_to_dict

    config, stack, _, _ = tiny_stack
    run_dir = tmp_path / "run"
    (run_dir / "adapters").mkdir(parents=True)
    stack.model.save_pretrained(str(tmp_path / "saved"), selected_adapters=["t1"])
    saved = tmp_path / "saved" / "t1" if (tmp_path / "saved" / "t1").is_dir() else tmp_path / "saved"
    saved.rename(run_dir / "adapters" / "t1")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    (run_dir / "acc_matrix.csv").write_text("after_task,t1,t2\nzero_shot,50.0,50.0\nt1,50.0,50.0\n")
    rho = config.evaluation.sharpness_rho
    options = {"points": 41, "samples": 2, "ascent_steps": 3}  # alpha = -1 + 2i/40: i = 21 is alpha = rho = 0.05
    random_run = recipe.compute_landscape(run_dir, "t1", ls.LandscapeOptions(**options), progress=False)
    worst_run = recipe.compute_landscape(run_dir, "t1", ls.LandscapeOptions(direction="worst", **options),
                                         progress=False)
    assert worst_run.csv == run_dir / "landscape" / "t1_worst_1d.csv" and random_run.csv.is_file()
    assert worst_run.sharpness == random_run.sharpness  # one sharpness entry, "t1", for both
    at_rho = 21
    assert -1 + 2 * at_rho / 40 == pytest.approx(rho)
    assert worst_run.grid[at_rho] >= random_run.grid[at_rho] > worst_run.loss
    assert worst_run.grid[at_rho] == pytest.approx(worst_run.loss + worst_run.sharpness["worst"], rel=1e-4)
    two_d = recipe.compute_landscape(run_dir, "t1", ls.LandscapeOptions(direction="worst", dims=2, points=3, samples=2,
                                                                     ascent_steps=1), progress=False)
    assert two_d.csv == run_dir / "landscape" / "t1_worst_2d.csv"
    # --set evaluation.*: the Hessian's settings of this measurement, recorded in its entry
    [again] = recipe.landscapes(run_dir, ls.LandscapeOptions(points=3, samples=2, ascent_steps=1), progress=False,
                                overrides=["evaluation.hessian_iters=2", "evaluation.hessian_probes=0"])
    assert again.sharpness["hessian_iters"] == 2 and 1 <= again.sharpness["power_iterations"] <= 4
    assert again.sharpness["hessian_probes"] == 0 and again.sharpness["trace"] is None


def test_stem_names():
    assert ls.landscape_stem("t1", "t3", "merged", "worst") == "t1_after_t3_merged_worst"
    assert ls.landscape_stem("t1") == "t1"
    assert ls.landscape_stem("t1", "t1") == "t1"
    assert ls.landscape_stem("t1", "t3") == "t1_after_t3"
    assert ls.landscape_stem("t1", "t3", "merged") == "t1_after_t3_merged"


def test_cli_bad_input(tiny_stack, tmp_path):
    """Each bad request raises UserError with a clear message (main() prints it, exit 1)."""
    from typer.testing import CliRunner

    from cl_flat.cli import app
    from cl_flat.config import config_to_dict
    from cl_flat.errors import UserError

    config, _, _, _ = tiny_stack
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_to_dict(config)))
    (run_dir / "acc_matrix.csv").write_text("after_task,t1,t2\nzero_shot,50.0,50.0\nt1,50.0,50.0\n")
    cases = [([str(tmp_path / "missing")], "run folder not found"),
             ([str(run_dir), "--task", "nope"], "unknown task"),
             ([str(run_dir), "--task", "t2"], "not trained yet"),
             ([str(run_dir), "--task", "t1", "--after", "t2"], "not trained yet"),
             ([str(run_dir), "--dims", "3"], "--dims"),
             ([str(run_dir), "--points", "1"], "--points"),
             ([str(run_dir), "--space", "full"], "--space"),
             ([str(run_dir), "--split", "dev"], "--split"),
             ([str(run_dir), "--rho", "0"], "--rho"),
             ([str(run_dir), "--ascent-steps", "-1"], "--ascent-steps"),
             ([str(run_dir), "--max-samples", "0"], "--max-samples"),
             ([str(run_dir), "--direction", "best"], "--direction"),
             ([str(run_dir), "--set", "lora.r=4"], "--set lora.r: only evaluation.* settings can change"),
             ([str(run_dir), "--set", "evaluation.hessian_iters=-1"], "evaluation.hessian_iters")]
    for args, message in cases:
        result = CliRunner().invoke(app, ["landscape", *args])
        assert isinstance(result.exception, UserError), (args, result.output)
        assert message in str(result.exception), (args, str(result.exception))
    (run_dir / "acc_matrix.csv").write_text("after_task,t1,t2\nzero_shot,50.0,50.0\nt1,50.0,50.0\nt2,50.0,50.0\n")
    result = CliRunner().invoke(app, ["landscape", str(run_dir), "--task", "t2", "--after", "t1"])
    assert isinstance(result.exception, UserError) and "--after must be" in str(result.exception)
    assert recipe.resolve_tasks(require_run(RunDir(run_dir)), None, None) == ["t1", "t2"]  # default: every trained task
    assert recipe.resolve_tasks(require_run(RunDir(run_dir)), None, "t1") == ["t1"]
