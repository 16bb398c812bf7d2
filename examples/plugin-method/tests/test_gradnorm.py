"""The plugin's update against the formula, on a quadratic whose gradients are known in closed form."""

from __future__ import annotations

import pytest
import torch

from cl_flat.flatness import reference_update


class Quadratic(torch.nn.Module):
    """L(θ; (A, b)) = ½ θᵀAθ − bᵀθ, so ∇L(θ) = Aθ − b."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone())


def loss_fn(model: Quadratic, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    a, b = batch
    return 0.5 * model.theta @ a @ model.theta - b @ model.theta


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_update_is_the_finite_difference_penalty(alpha):
    theta = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    batches = [(torch.diag(torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64)), torch.tensor([1.0, 0.0, -1.0],
                                                                                             dtype=torch.float64)),
               (torch.diag(torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)), torch.tensor([0.0, 2.0, 1.0],
                                                                                             dtype=torch.float64))]
    r = 0.1
    a_mean = sum(a for a, _ in batches) / 2
    b_mean = sum(b for _, b in batches) / 2
    g0 = a_mean @ theta - b_mean                    # mean gradient over the window
    g1 = a_mean @ (theta + r * g0 / g0.norm()) - b_mean
    expected = (1 - alpha) * g0 + alpha * g1

    model = Quadratic(theta)
    got = reference_update({"method": "gradnorm", "alpha": alpha, "r": r}, model, batches, loss_fn)
    torch.testing.assert_close(got["theta"], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(model.theta.detach(), theta)  # the perturbation was undone
