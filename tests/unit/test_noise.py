"""Noise families (`noise_scale`) against hand-computed values, the statistics of the draws,
keyed generators, the functional noise on frozen layers and the row Fisher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cl_flat.flatness import noise_scale
from cl_flat.flatness.noise import (
    NOISE_TYPES,
    FrozenTarget,
    NoiseBuffers,
    RowFisher,
    Scale,
    compact_scale,
    compact_scales,
    frozen_targets,
    keyed_noise,
    noise_key,
    perturbed,
    standard_normal,
)

# W = [[3, 4], [0, -1]]: row norms 5 and 1, ‖W‖_F = √26, row length n = 2.
W = torch.tensor([[3.0, 4.0], [0.0, -1.0]], dtype=torch.float64)
SIGMA = 0.1


@pytest.mark.parametrize("noise_type, expected", [
    ("gauss_standard", [[0.1, 0.1], [0.1, 0.1]]),
    ("gauss_matrix", [[0.1 * math.sqrt(26)] * 2] * 2),
    ("gauss_element", [[0.3, 0.4], [0.0, 0.1]]),
    ("lpf_sgd", [[0.5, 0.5], [0.1, 0.1]]),
    ("fisher", [[0.5, 0.5], [0.1, 0.1]]),  # no Fisher estimate yet: F = 0
    ("flat_lora", [[0.5 / math.sqrt(2)] * 2, [0.1 / math.sqrt(2)] * 2]),
])
def test_noise_scale_formulas(noise_type, expected):
    s = noise_scale(noise_type, W, SIGMA)
    assert s.shape == W.shape
    assert torch.allclose(s, torch.tensor(expected, dtype=torch.float64), atol=1e-12)


def test_fisher_scale():
    # S_i = σ‖W_i‖/√(1+ηF_i): F = (3, 0), η = 1 -> (0.5/2, 0.1/1); F = (6, 2), η = 0.5 -> (0.5/2, 0.1/√2)
    s = noise_scale("fisher", W, SIGMA, fisher_rows=torch.tensor([3.0, 0.0]))
    assert torch.allclose(s, torch.tensor([[0.25, 0.25], [0.1, 0.1]], dtype=torch.float64), atol=1e-12)
    s = noise_scale("fisher", W, SIGMA, fisher_rows=torch.tensor([6.0, 2.0]), eta=0.5)
    assert torch.allclose(s, torch.tensor([[0.25, 0.25], [0.1 / math.sqrt(2)] * 2], dtype=torch.float64), atol=1e-12)


def test_flat_lora_uses_row_length():
    # 3×4: rows (1,1,1,1), (2,0,0,0), 0 -> norms 2, 2, 0; n = 4: S = σ·2/2 = σ, σ, 0
    w = torch.tensor([[1.0, 1, 1, 1], [2, 0, 0, 0], [0, 0, 0, 0]])
    s = noise_scale("flat_lora", w, 0.3)
    assert torch.allclose(s, torch.tensor([[0.3] * 4, [0.3] * 4, [0.0] * 4]))
    assert torch.equal(noise_scale("lpf_sgd", w, 0.3)[2], torch.zeros(4))


def test_unknown_type():
    with pytest.raises(ValueError, match="unknown noise type"):
        noise_scale("uniform", W, 0.1)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_empirical_std_matches_scale(noise_type):
    w = torch.tensor([[0.5, -1.0, 2.0, 0.25], [3.0, 1.0, -0.5, 1.5], [0.1, 0.2, -0.3, 0.4]])
    fisher = torch.tensor([0.5, 4.0, 0.0])
    scale = compact_scale(noise_type, w, 0.2, fisher_rows=fisher, eta=2.0)
    expected = noise_scale(noise_type, w, 0.2, fisher_rows=fisher, eta=2.0)
    draws = torch.stack([keyed_noise(w, scale, noise_key("std", i)) for i in range(4000)])
    empirical = draws.std(dim=0)
    assert draws.mean(dim=0).abs().max() < 0.1 * expected.max()
    for row in range(w.shape[0]):  # row by row, every element within 5%
        assert torch.allclose(empirical[row], expected[row].float(), rtol=0.05, atol=0), (noise_type, row)


def test_keyed_generator_reproducible_and_isolated():
    w = torch.ones(5, 7)
    state = torch.get_rng_state()
    a = keyed_noise(w, Scale(1.0), noise_key(1, 2, "layer", 0, 0))
    b = keyed_noise(w, Scale(1.0), noise_key(1, 2, "layer", 0, 0))
    c = keyed_noise(w, Scale(1.0), noise_key(1, 2, "layer", 1, 0))  # another rank
    d = keyed_noise(w, Scale(1.0), noise_key(1, 3, "layer", 0, 0))  # another step
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and not torch.equal(a, d)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    assert noise_key(1, 2) != noise_key(2, 1) and 0 <= noise_key(1, 2) < 2 ** 63


def _splitmix_box_muller(key: int, index: int) -> float:
    """Z_index under `key`, by hand from the published constants (integers, then math)."""
    mask = (1 << 64) - 1
    z = (key + (index + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    z ^= z >> 31
    u1, u2 = ((z >> 40) + 0.5) / 2 ** 24, (z & 0xFFFFFF) / 2 ** 24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def test_splitmix64_reference_value():
    # SplitMix64 seeded with 0: first output 0xE220A8397B1DCDAF (Vigna's reference implementation)
    mask = (1 << 64) - 1
    z = 0x9E3779B97F4A7C15
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    assert z ^ (z >> 31) == 0xE220A8397B1DCDAF


@pytest.fixture
def fresh_kernel(monkeypatch, tmp_path):
    """A not-yet-loaded CPU noise kernel, built into an empty cache."""
    from cl_flat.flatness.noise import keyed_normal

    monkeypatch.setenv("CL_FLAT_CACHE", str(tmp_path))
    monkeypatch.setattr(keyed_normal, "_KERNEL", keyed_normal._Kernel())
    return keyed_normal._KERNEL


@pytest.mark.parametrize("compiled", [True, False])
def test_cpu_draw_follows_the_counter_formula(compiled, fresh_kernel):
    fresh_kernel.eager = not compiled
    key = noise_key(3, 1, 0, 0, "layer")
    z = standard_normal((3, 7), key, "cpu", torch.float32)
    expected = torch.tensor([_splitmix_box_muller(key, i) for i in range(21)]).reshape(3, 7)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    w = torch.randn(3, 7, generator=torch.Generator().manual_seed(1))
    rows = torch.tensor([[0.5], [2.0], [-1.0]])
    torch.testing.assert_close(Scale(rows).add_to(w, key), w + expected * rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Scale(0.1, elementwise=True).draw(w, key), expected * w.abs() * 0.1,
                               rtol=1e-5, atol=1e-6)
    column_major = w.t().contiguous().t()  # same values, other strides (GPT-2's Conv1D weights)
    torch.testing.assert_close(Scale(rows).add_to(column_major, key), w + expected * rows, rtol=1e-5, atol=1e-5)
    # bf16: the fp32 result rounded once
    wb = w.bfloat16()
    assert torch.equal(Scale(rows).add_to(wb, key), (wb.float() + expected * rows).bfloat16())
    assert fresh_kernel.eager is not compiled  # the compiled kernel really ran (or really did not)


def test_cpu_draw_without_a_compiler_falls_back_to_the_same_formula(fresh_kernel, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    key = noise_key("no compiler")
    z = standard_normal((2, 5), key, "cpu", torch.float32)
    expected = torch.tensor([_splitmix_box_muller(key, i) for i in range(10)]).reshape(2, 5)
    torch.testing.assert_close(z, expected, rtol=1e-5, atol=1e-5)
    assert fresh_kernel.eager and "unavailable" in caplog.text


def test_cpu_draw_is_independent_of_threads_and_standard():
    shape = (5, 40_000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = standard_normal(shape, 123, "cpu", torch.float32)
        torch.set_num_threads(2)
        two = standard_normal(shape, 123, "cpu", torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    flat = one.reshape(-1)
    first, second = flat[:100_000], flat[100_000:]
    assert abs(float(torch.corrcoef(torch.stack([first, second]))[0, 1])) < 0.0142  # 4.5σ at n = 100000
    assert abs(float(torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1])) < 0.01  # neighbours: 4.5σ
    # N(0, 1): mean within 5 standard errors, variance within 2%, kurtosis 3 ± 0.1
    n = flat.numel()
    assert abs(float(flat.double().mean())) < 5 / math.sqrt(n)
    assert abs(float(flat.double().var()) - 1.0) < 0.02
    assert abs(float(flat.double().pow(4).mean()) - 3.0) < 0.1
    other = standard_normal(shape, 124, "cpu", torch.float32).reshape(-1)
    assert abs(float(torch.corrcoef(torch.stack([flat, other]))[0, 1])) < 0.01  # another key: independent


def test_add_to_is_weight_plus_draw():
    w = torch.randn(3, 40_005, generator=torch.Generator().manual_seed(0))
    for scale in (Scale(0.3), compact_scale("lpf_sgd", w, 0.2), compact_scale("gauss_element", w, 0.1)):
        # fused: 1 ulp
        torch.testing.assert_close(scale.add_to(w, 77), w + keyed_noise(w, scale, 77), rtol=1e-6, atol=1e-6)


def test_zero_weight_element_noise_is_zero():
    w = torch.tensor([[0.0, 1.0]])
    eps = keyed_noise(w, compact_scale("gauss_element", w, 0.5), 9)
    assert eps[0, 0] == 0 and eps[0, 1] != 0


class _Net(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


def _frozen_setup(layer):
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64, requires_grad=True)
    return x


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_functional_noise_forward_and_backward(kind):
    """y = x(W+ε)ᵀ + b exactly, grad_x = δ(W+ε), W untouched and never given a gradient."""
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(4, 5).double()
        weight = layer.weight  # [out, in]
    else:
        from transformers.pytorch_utils import Conv1D
        layer = Conv1D(5, 4).double()  # weight [in, out]: rows (output channels) are dim 1
        nn.init.normal_(layer.weight)
        nn.init.normal_(layer.bias)
        weight = layer.weight.t()
    x = _frozen_setup(layer)
    model = _Net(layer)
    [target] = [t for t in _targets(model)]
    before = layer.weight.detach().clone()
    scale = compact_scale("lpf_sgd", target.weight, 0.3)
    with perturbed([(target, scale)], [], (1, 2, 0, 0), NoiseBuffers()):
        y = model(x)
        y.backward(torch.ones_like(y))
    eps = keyed_noise(weight.detach(), scale, noise_key(1, 2, 0, 0, "layer"))
    assert eps.shape == (5, 4)
    expected = x.detach() @ (weight.detach() + eps).t() + layer.bias.detach()
    assert torch.allclose(y, expected, atol=1e-12)
    assert torch.allclose(x.grad, torch.ones(3, 2, 5, dtype=torch.float64) @ (weight.detach() + eps), atol=1e-12)
    assert torch.equal(layer.weight, before) and layer.weight.grad is None
    assert "forward" not in vars(layer)  # the forward is restored
    assert torch.allclose(model(x), x.detach() @ weight.detach().t() + layer.bias, atol=1e-12)


def _targets(model):
    """frozen_targets without peft layers: every linear-like module via all_linear."""
    return frozen_targets(model, "all_linear")


def test_trainable_perturbation_restored_exactly():
    p = nn.Parameter(torch.randn(4, 3, dtype=torch.bfloat16))
    before = p.detach().clone()
    scale = compact_scale("gauss_element", p, 0.37)
    with perturbed([], [("p", p, scale)], (0, 0, 0, 0), NoiseBuffers()):
        assert not torch.equal(p, before)
        assert torch.equal(p.detach(), before + keyed_noise(before, scale, noise_key(0, 0, 0, 0, "p")))
    assert torch.equal(p.detach(), before)


def _captured(estimate: str, x, delta, decay=0.5, scale=0.25):
    """A RowFisher fed one scaled backward whose output gradient is `delta` (loss = scale·Σ y ⊙ delta)."""
    layer = nn.Linear(x.shape[-1], delta.shape[-1], bias=False).double()
    fisher = RowFisher(decay=decay, estimate=estimate)
    with fisher.capture({"l": layer}, weight=1.0 / scale ** 2):
        (scale * (layer(x) * delta).sum()).backward()  # a scaled backward, as the clean passes do
    fisher.update()
    return fisher


# two tokens x1 = (1, 0), x2 = (1, 2) with output gradients δ1 = (1, 1), δ2 = (1, 0)
X = torch.tensor([[1.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
DELTA = torch.tensor([[1.0, 1.0], [1.0, 0.0]], dtype=torch.float64)


def test_row_fisher_minibatch_estimate_by_hand():
    """∂L/∂W = Σ_t δ_t x_tᵀ: row 0 = (1,0) + (1,2) = (2,2), ‖·‖² = 8; row 1 = (1,0), ‖·‖² = 1.
    F = (8, 1) has mean 4.5, so the noise sees F̃ = (16/9, 2/9)."""
    fisher = _captured("minibatch", X, DELTA)
    assert torch.allclose(fisher.state["l"], torch.tensor([8.0, 1.0], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(fisher.rows("l"), torch.tensor([16 / 9, 2 / 9], dtype=torch.float64), rtol=1e-12)
    fisher._window = {"l": torch.tensor([2.0, 5.0], dtype=torch.float64)}
    fisher.update()  # F ← 0.5·F + F̂ = (6, 5.5), mean 5.75
    assert torch.allclose(fisher.rows("l"), torch.tensor([6 / 5.75, 5.5 / 5.75], dtype=torch.float64), rtol=1e-12)
    # the normalised estimate does not depend on the loss scale of the batch (η means the same at any batch size)
    halved = _captured("minibatch", X, DELTA / 2)
    assert torch.allclose(halved.rows("l"), torch.tensor([16 / 9, 2 / 9], dtype=torch.float64), rtol=1e-12)
    # S_i = σ‖W_i‖/√(1 + η F̃_i) with ‖W_0‖ = 5, ‖W_1‖ = 1, σ = 0.1, η = 1
    W = torch.tensor([[3.0, 4.0], [0.0, 1.0]], dtype=torch.float64)
    s = noise_scale("fisher", W, 0.1, fisher_rows=fisher.rows("l"), eta=1.0)
    assert torch.allclose(s[:, 0], torch.tensor([0.5 / (1 + 6 / 5.75) ** 0.5, 0.1 / (1 + 5.5 / 5.75) ** 0.5],
                                                 dtype=torch.float64), rtol=1e-12)


def test_row_fisher_per_token_estimate_by_hand():
    """Σ_t δ_ti²‖x_t‖²: row 0 = 1·1 + 1·5 = 6, row 1 = 1·1 + 0·5 = 1; F̃ = (12/7, 2/7)."""
    fisher = _captured("per_token", X, DELTA)
    assert torch.allclose(fisher.state["l"], torch.tensor([6.0, 1.0], dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(fisher.rows("l"), torch.tensor([12 / 7, 2 / 7], dtype=torch.float64), rtol=1e-12)


def test_row_fisher_zero_gradient_is_no_shrinkage():
    fisher = _captured("minibatch", X, torch.zeros_like(DELTA))
    assert torch.equal(fisher.rows("l"), torch.zeros(2, dtype=torch.float64))


def test_activation_checkpointing_sees_the_same_noise():
    """A checkpointed block recomputes its forward in backward: the key (not a call counter) fixes ε,
    so the gradient equals the non-checkpointed one."""
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(4)
    frozen = nn.Linear(6, 6).double().requires_grad_(False)
    head = nn.Linear(6, 1).double()
    x = torch.randn(5, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    target = FrozenTarget("frozen", frozen, None)
    scale = compact_scale("gauss_standard", target.weight, 0.5)
    grads = []
    for use_checkpoint in (False, True):
        x.grad = None
        with perturbed([(target, scale)], [], (0, 1, 0, 0), NoiseBuffers()):
            hidden = checkpoint(frozen, x, use_reentrant=False) if use_checkpoint else frozen(x)
            head(torch.tanh(hidden)).sum().backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])



@pytest.mark.parametrize("noise_type", ["gauss_standard", "gauss_element", "gauss_matrix", "lpf_sgd", "flat_lora"])
def test_compact_scales_of_an_adapter_follow_the_formulas(noise_type):
    """The batched scales of a LoRA adapter's tensors (A: [r, in] of two widths, B: [out, r]) against each noise
    type's formula, written out row by row."""
    gen = torch.Generator().manual_seed(1)
    ws = [torch.randn(shape, generator=gen) for shape in ((4, 12), (7, 4), (4, 12), (4, 20), (12, 4))]
    sigma = 0.3
    for w, scale in zip(ws, compact_scales(noise_type, ws, sigma)):
        rows = torch.sqrt((w.double() ** 2).sum(1, keepdim=True))
        expected = {"gauss_standard": torch.full_like(w.double(), sigma),
                    "gauss_element": sigma * w.double().abs(),
                    "gauss_matrix": torch.full_like(w.double(), sigma * float(torch.sqrt((w.double() ** 2).sum()))),
                    "lpf_sgd": (sigma * rows).expand_as(w),
                    "flat_lora": (sigma / w.shape[1] ** 0.5 * rows).expand_as(w)}[noise_type]
        assert torch.allclose(scale.full(w).double(), expected, rtol=1e-6, atol=0), noise_type
