"""SAM / ASAM `reference_update` against closed forms on quadratic losses L_i(w) = ½ wᵀH_i w
(gradient H_i w), and against an independent SAM on a small peft model."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_flat.flatness import reference_update
from helpers import lm_loss, tiny_peft_model


class Quadratic(nn.Module):
    def __init__(self, *tensors: list[float]):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.tensor(t, dtype=torch.float64)) for t in tensors])


def quad_loss(model: Quadratic, batch: list[torch.Tensor]) -> torch.Tensor:
    """batch = one diagonal H per parameter: L = Σ_k ½ Σ_j H_kj w_kj²."""
    return sum(0.5 * (h * w * w).sum() for h, w in zip(batch, model.ws))


H = [torch.tensor([2.0, 1.0], dtype=torch.float64)]


def test_sam_closed_form():
    # w = (1, 2), H = diag(2, 1): g0 = (2, 2), |g0| = 2√2. ρ = 0.1·√2 gives ε = (0.1, 0.1),
    # so g = H(w + ε) = (2·1.1, 1·2.1) = (2.2, 2.1).
    model = Quadratic([1.0, 2.0])
    g = reference_update({"method": "sam", "rho": 0.1 * math.sqrt(2)}, model, [H], quad_loss)
    assert torch.allclose(g["ws.0"], torch.tensor([2.2, 2.1], dtype=torch.float64), atol=1e-12)
    assert torch.equal(model.ws[0].detach(), torch.tensor([1.0, 2.0], dtype=torch.float64))  # restored


def test_asam_closed_form():
    # eta = 0: T = |w| = (1, 2); T·g0 = (2, 4), |T g0| = √20; T²g0 = (2, 8). ρ = 0.05·√20 gives
    # ε = (0.1, 0.4) and g = H(1.1, 2.4) = (2.2, 2.4).
    model = Quadratic([1.0, 2.0])
    g = reference_update({"method": "sam", "rho": 0.05 * math.sqrt(20), "adaptive": True, "eta": 0.0}, model, [H],
                         quad_loss)
    assert torch.allclose(g["ws.0"], torch.tensor([2.2, 2.4], dtype=torch.float64), atol=1e-12)
    # eta = 0.5: T = (1.5, 2.5); T·g0 = (3, 5), |T g0| = √34; T²g0 = (4.5, 12.5). ρ = √34/10 gives
    # ε = (0.45, 1.25) and g = H(1.45, 3.25) = (2.9, 3.25).
    g = reference_update({"method": "sam", "rho": math.sqrt(34) / 10, "adaptive": True, "eta": 0.5}, model, [H],
                         quad_loss)
    assert torch.allclose(g["ws.0"], torch.tensor([2.9, 3.25], dtype=torch.float64), atol=1e-12)


class LoraPair(nn.Module):
    """L = (a·b − 1)² with a = 1, b = 0: a LoRA pair at the start of a task (B = 0)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(0.0, dtype=torch.float64))


def pair_loss(model, batch):
    return (model.a * model.b - 1) ** 2


def test_asam_perturbs_a_fresh_adapter_only_with_eta():
    # g0 = (2(ab−1)b, 2(ab−1)a) = (0, −2). eta = 0: T = (1, 0), Tg0 = 0, ε = 0: the plain gradient (0, −2).
    # eta = η: T = (1+η, η); Tg0 = (0, −2η), ‖Tg0‖ = 2η; T²g0 = (0, −2η²); ε = (0, −ρη). At b' = −ρη:
    # g = (2(b'−1)b', 2(b'−1)) = (2ρη(1+ρη), −2(1+ρη)); ρ = 0.5, η = 0.01: (0.01005, −2.01).
    plain = reference_update({"method": "sam", "rho": 0.5, "adaptive": True, "eta": 0.0}, LoraPair(), [None],
                             pair_loss)
    assert [plain["a"].item(), plain["b"].item()] == [0.0, -2.0]
    g = reference_update({"method": "sam", "rho": 0.5, "adaptive": True}, LoraPair(), [None], pair_loss)  # eta 0.01
    assert [g["a"].item(), g["b"].item()] == pytest.approx([0.01005, -2.01], rel=1e-6)  # ε is formed in fp32


def test_global_vs_per_tensor_norm():
    # Two tensors: w1 = (3,) with H=1 -> g1 = 3; w2 = (4,) with H=1 -> g2 = 4; |g| = 5.
    # global, ρ = 5: ε = (3, 4) -> g = (6, 8).  per_tensor, ρ = 1: ε = (1, 1) -> g = (4, 5).
    batch = [torch.tensor([1.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    g = reference_update({"method": "sam", "rho": 5.0}, Quadratic([3.0], [4.0]), [batch], quad_loss)
    assert [g["ws.0"].item(), g["ws.1"].item()] == pytest.approx([6.0, 8.0])
    g = reference_update({"method": "sam", "rho": 1.0, "norm": "per_tensor"}, Quadratic([3.0], [4.0]), [batch],
                         quad_loss)
    assert [g["ws.0"].item(), g["ws.1"].item()] == pytest.approx([4.0, 5.0])


def test_window_epsilon_from_sum_gradient_from_last_batch():
    # B1: H1 = diag(1, 0); B2: H2 = diag(0, 1); w = (3, 4).
    # g0 = (H1 + H2) w = (3, 4), |g0| = 5; ρ = 5 -> ε = (3, 4); w + ε = (6, 8).
    # Adversarial gradient on B2 only: H2 (6, 8) = (0, 8).
    b1 = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    b2 = [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    g = reference_update({"method": "sam", "rho": 5.0}, Quadratic([3.0, 4.0]), [b1, b2], quad_loss)
    assert g["ws.0"].tolist() == pytest.approx([0.0, 8.0])


def test_none_is_the_window_mean():
    # (H1 w + H2 w)/2 with the window above = ((3, 0) + (0, 4))/2 = (1.5, 2).
    b1 = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    b2 = [torch.tensor([0.0, 1.0], dtype=torch.float64)]
    g = reference_update({"method": "none"}, Quadratic([3.0, 4.0]), [b1, b2], quad_loss)
    assert g["ws.0"].tolist() == pytest.approx([1.5, 2.0])


def test_rho_zero_is_plain_training():
    model = Quadratic([1.0, -2.0])
    plain = reference_update({"method": "none"}, model, [H], quad_loss)
    sam = reference_update({"method": "sam", "rho": 0.0}, model, [H], quad_loss)
    assert torch.equal(plain["ws.0"], sam["ws.0"])


@pytest.mark.parametrize("adaptive", [False, True])
def test_matches_independent_sam_on_peft(adaptive):
    """Independent SAM in the style of davda54/sam's two-step optimizer, written here from the
    formulas: first_step adds e_w = ρ·(T²)g/‖Tg‖ to every trainable weight, second_step restores."""
    model = tiny_peft_model()
    batch = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    rho = 0.5 if adaptive else 0.05
    expected = reference_update({"method": "sam", "rho": rho, "adaptive": adaptive}, model, [batch], lm_loss)

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    loss = lm_loss(model, batch)
    loss.backward()
    scale = [(p.abs() + 0.01 if adaptive else torch.ones_like(p)) for p in params]  # ASAM's T = |w| + η
    grad_norm = torch.norm(torch.stack([(s * p.grad).norm(2) for s, p in zip(scale, params)]), 2)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for s, p in zip(scale, params):
            p.add_(s * s * p.grad * (rho / (grad_norm + 1e-12)))
            p.grad = None
    lm_loss(model, batch).backward()
    independent = {n: p.grad.clone() for n, p in zip(names, params)}
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    for n in names:
        assert torch.allclose(expected[n], independent[n], atol=1e-5, rtol=0), n


def test_two_micro_batches_direction_matches_independent():
    model = tiny_peft_model()
    gen = torch.Generator().manual_seed(2)
    b1, b2 = torch.randint(3, 250, (2, 10), generator=gen), torch.randint(3, 250, (2, 10), generator=gen)
    expected = reference_update({"method": "sam", "rho": 0.05}, model, [b1, b2], lm_loss)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    (lm_loss(model, b1) + lm_loss(model, b2)).backward()
    norm = torch.norm(torch.stack([p.grad.norm() for p in params.values()]))
    with torch.no_grad():
        for p in params.values():
            p.add_(p.grad * 0.05 / norm)
            p.grad = None
    lm_loss(model, b2).backward()
    flat_e = torch.cat([expected[n].flatten() for n in params])
    flat_i = torch.cat([params[n].grad.flatten() for n in params])
    assert torch.nn.functional.cosine_similarity(flat_e, flat_i, dim=0) > 0.9999


def test_register_refuses_a_duplicate_name():
    from cl_flat.errors import PluginError
    from cl_flat.flatness import register
    from cl_flat.flatness.sam import SamConfig
    from cl_flat.registry import METHODS

    existing = METHODS.get("sam")

    class Other(existing.cls):
        pass

    with pytest.raises(PluginError, match=r"registered twice: by cl_flat\.flatness\.sam \(Sam\) and by .*\(.*Other\)"):
        register("sam", SamConfig)(Other)
    assert METHODS.get("sam") is existing
