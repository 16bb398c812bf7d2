"""RWP, LPF-SGD and Flat-LoRA `reference_update` against hand derivations: quadratic losses
(∇L = H(w+ε) is linear in ε, so a fixed ε gives a closed form), the σ = 0 limits, the noisy gradient
of a tiny peft model against an independent copy with the noise written into its weights, the
schedules, and 100-update runs that must leave no perturbation behind."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from cl_flat.config import LoraSection, RunConfig
from cl_flat.errors import UserError
from cl_flat.flatness import build_method, reference_update
from cl_flat.flatness.lpf_sgd import lpf_radius
from cl_flat.flatness.noise import Scale, compact_scale, frozen_targets, keyed_noise, noise_key
from cl_flat.schedules import ramp_factor
from helpers import lm_loss

F64 = torch.float64


class Quadratic(nn.Module):
    def __init__(self, *tensors):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.tensor(t, dtype=F64)) for t in tensors])


def quad_loss(model, batch):
    """batch = one diagonal H per parameter: L = Σ_k ½ Σ_j H_kj w_kj², ∇L = H w."""
    return sum(0.5 * (h * w * w).sum() for h, w in zip(batch, model.ws))


W0 = [1.0, -2.0, 0.5]
H1 = [torch.tensor([2.0, 1.0, 0.0], dtype=F64)]
H2 = [torch.tensor([0.0, 3.0, 1.0], dtype=F64)]
SEED, STEP = 7, 3


def eps_for(w, sigma, micro, rank=0, step=STEP, noise_type="gauss_standard"):
    """The ε a pass draws for parameter ws.0 (key: seed, step, rank, micro-batch, name)."""
    w = torch.tensor(w, dtype=F64)
    return keyed_noise(w, compact_scale(noise_type, w, sigma), noise_key(SEED, step, rank, micro, "ws.0"))


def ref(config, batches, **kw):
    model = Quadratic(W0)
    g = reference_update(config, model, batches, quad_loss, step=kw.pop("step", STEP), total_steps=kw.pop("T", 10),
                         seed=SEED, **kw)
    assert torch.equal(model.ws[0].detach(), torch.tensor(W0, dtype=F64))  # restored
    return g["ws.0"]


# ---------------------------------------------------------------- RWP


def test_rwp_sigma_zero_is_a_plus_b_times_gradient():
    # ∇L = H1 w = (2, -2, 0); (a + b) = 1.2
    g = ref({"method": "rwp", "scope": "lora", "noise_std": 0.0, "a": 0.3, "b": 0.9}, [H1])
    assert torch.allclose(g, 1.2 * torch.tensor([2.0, -2.0, 0.0], dtype=F64), atol=1e-12)


def test_rwp_window_closed_form():
    # g = a·(H1 w + H2 w)/2 + b·H2 (w + ε), ε drawn for the last micro-batch (index 1)
    w = torch.tensor(W0, dtype=F64)
    eps = eps_for(W0, 0.5, micro=1)
    g = ref({"method": "rwp", "scope": "lora", "noise_std": 0.5, "a": 0.4, "b": 0.6}, [H1, H2])
    expected = 0.4 * (H1[0] * w + H2[0] * w) / 2 + 0.6 * H2[0] * (w + eps)
    assert eps.abs().min() > 0
    assert torch.allclose(g, expected, atol=1e-12)


def test_rwp_two_batch_closed_form():
    # clean on B1 only, noisy on B2: g = a·H1 w + b·H2(w + ε)
    w = torch.tensor(W0, dtype=F64)
    eps = eps_for(W0, 0.5, micro=1, noise_type="gauss_element")
    g = ref({"method": "rwp", "scope": "lora", "noise_std": 0.5, "noise_type": "gauss_element", "a": 0.4, "b": 0.6,
             "two_batch": True}, [H1, H2])
    assert torch.allclose(g, 0.4 * H1[0] * w + 0.6 * H2[0] * (w + eps), atol=1e-12)
    with pytest.raises(UserError, match="two_batch"):
        ref({"method": "rwp", "scope": "lora", "two_batch": True}, [H1])


def test_rwp_parallel_shares_mix_to_the_serial_formula():
    # rank 0 (clean) on B1, rank 1 (noisy) on B2: shares 2a·H1 w and 2b·H2(w + ε_rank1); mean = a·clean + b·noisy
    w = torch.tensor(W0, dtype=F64)
    cfg = {"method": "rwp", "scope": "lora", "noise_std": 0.5, "a": 0.3, "b": 0.7, "parallel": True}
    share0 = ref(cfg, [H1], rank=0, world_size=2)
    share1 = ref(cfg, [H2], rank=1, world_size=2)
    assert torch.allclose(share0, 2 * 0.3 * H1[0] * w, atol=1e-12)
    eps = eps_for(W0, 0.5, micro=0, rank=1)
    assert torch.allclose((share0 + share1) / 2, 0.3 * H1[0] * w + 0.7 * H2[0] * (w + eps), atol=1e-12)
    # the same noisy gradient as a serial rwp (a = 0, b = 1) on rank 1's batch
    serial = ref({**cfg, "parallel": False, "a": 0.0, "b": 1.0}, [H2], rank=1)
    assert torch.allclose(share1, 2 * 0.7 * serial, atol=1e-12)
    with pytest.raises(UserError, match="≥ 2 ranks"):
        ref(cfg, [H1])


def test_rwp_noise_differs_by_rank_and_step():
    cfg = {"method": "rwp", "scope": "lora", "noise_std": 0.5, "a": 0.0, "b": 1.0}
    assert not torch.equal(ref(cfg, [H1], rank=0), ref(cfg, [H1], rank=1))
    assert not torch.equal(ref(cfg, [H1], step=1), ref(cfg, [H1], step=2))
    assert torch.equal(ref(cfg, [H1], step=1), ref(cfg, [H1], step=1))


def _run_config(flatness, gas=1):
    return RunConfig.model_validate({"model": {"name_or_path": "tiny-random:llama"},
                                     "tasks": [{"name": "a", "source": "builtin"}],
                                     "training": {"gradient_accumulation_steps": gas}, "flatness": flatness})


def test_rwp_check_messages(monkeypatch):
    assert build_method({"method": "rwp"}).check(_run_config({"method": "rwp"}).training) == []
    two_batch = {"method": "rwp", "two_batch": True}
    problems = build_method(two_batch).check(_run_config(two_batch).training)
    assert any("two_batch" in p for p in problems)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = {"method": "rwp", "parallel": True}
    assert any("≥ 2 ranks" in p for p in build_method(cfg).check(_run_config(cfg).training))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert build_method(cfg).check(_run_config(cfg).training) == []
    cfg = {"method": "rwp", "noise_type": "fisher", "a": 0.0}
    assert any("a > 0" in p for p in build_method(cfg).check(_run_config(cfg).training))
    cfg = {"method": "rwp", "scope": "lora", "noise_targets": "all_linear"}
    assert any("all_linear" in p for p in build_method(cfg).check(_run_config(cfg).training))


# ---------------------------------------------------------------- LPF-SGD and Flat-LoRA schedules


def test_lpf_radius_schedule():
    # t = 0..T−1 over T = 101 updates: γ_t = γ0(α/2·(1 − cos(π t/100)) + 1)
    assert lpf_radius(0.01, 6.0, 0, 101) == pytest.approx(0.01)
    assert lpf_radius(0.01, 6.0, 50, 101) == pytest.approx(0.01 * 4)  # α/2·(1 − cos(π/2)) + 1 = 4
    assert lpf_radius(0.01, 6.0, 100, 101) == 0.01 * 7.0  # the last update: exactly (α + 1)γ0
    assert lpf_radius(0.01, 2.0, 25, 101) == pytest.approx(0.01 * (1 - math.cos(math.pi / 4) + 1))
    # T = 5: the last update gets 7γ0 (t/T would give γ0(3(1 − cos(4π/5)) + 1) = 6.43γ0)
    assert lpf_radius(1.0, 6.0, 4, 5) == 7.0
    assert lpf_radius(1.0, 6.0, 0, 1) == 7.0  # a one-update task: the end radius


def test_lpf_sgd_closed_form_and_sigma_zero():
    # g = (H1(w+ε_0) + H2(w+ε_1))/2, ε_i ~ γ_t|w_j| (1-D weight: every element is its own row)
    w = torch.tensor(W0, dtype=F64)
    gamma = lpf_radius(0.2, 6.0, STEP, 10)
    scale = compact_scale("lpf_sgd", w, gamma)
    assert torch.allclose(scale.full(w), gamma * w.abs())
    e0, e1 = (keyed_noise(w, scale, noise_key(SEED, STEP, 0, i, "ws.0")) for i in (0, 1))
    g = ref({"method": "lpf_sgd", "scope": "lora", "noise_std": 0.2}, [H1, H2])
    assert torch.allclose(g, (H1[0] * (w + e0) + H2[0] * (w + e1)) / 2, atol=1e-12)
    g0 = ref({"method": "lpf_sgd", "scope": "full", "noise_std": 0.0}, [H1, H2])
    assert torch.allclose(g0, (H1[0] * w + H2[0] * w) / 2, atol=1e-12)


def test_flat_lora_ramp():
    for kind in ("cosine", "linear", "constant"):
        for total in (1, 2, 5, 37):  # the last update gets exactly 1, whatever T (so whatever the world size)
            assert ramp_factor(kind, total - 1, total) == 1.0
    assert ramp_factor("cosine", 0, 5) == 0.0
    assert ramp_factor("cosine", 2, 5) == pytest.approx(0.5)
    assert ramp_factor("cosine", 1, 5) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    assert ramp_factor("linear", 1, 5) == pytest.approx(0.25)
    assert ramp_factor("constant", 0, 5) == 1.0


# ---------------------------------------------------------------- tiny peft model


def _tiny_peft(dtype="fp32", family="llama", targets=("q_proj", "v_proj")):
    """Two adapters: a frozen, trained-looking 'old' and the current 'new' (B ≠ 0 so A gets a gradient)."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.models import load_model

    model, _ = load_model(f"tiny-random:{family}", dtype, seed=5)
    stack = AdapterStack(model, LoraSection(r=4, target_modules=list(targets)), seed=5)
    for i, name in enumerate(("old", "new")):
        stack.add_task(i, name)
        with torch.no_grad():
            for n, p in stack.model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3 + i)) * 0.1)
    return stack.model.eval()  # no dropout (GPT-2 has some): the comparisons are exact


def _batches(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (2, 8), generator=gen) for _ in range(n)]


def _plain_grads(model, batch, scale=1.0):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(lm_loss(model, batch) * scale, list(params.values()))
    return dict(zip(params, grads))


def _noisy_copy(model, frozen_eps: dict, trainable_eps: dict):
    """An independent perturbed model: ε written into a copy's weights (W0 in [out, in] orientation)."""
    noisy = copy.deepcopy(model)
    with torch.no_grad():
        for name, eps in frozen_eps.items():
            module = noisy.get_submodule(name)
            if isinstance(module, nn.Linear):
                module.weight.add_(eps)
            else:  # Conv1D stores [in, out]
                module.weight.add_(eps.t())
        params = dict(noisy.named_parameters())
        for name, eps in trainable_eps.items():
            params[name].add_(eps)
    return noisy


def _expected_eps(model, scope, sigma, micro, step=0, seed=0, rank=0, noise_type="gauss_standard"):
    targets = {t.name: t.weight.detach() for t in frozen_targets(model)} if scope in ("full", "base") else {}
    trainable = ({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
                 if scope in ("lora", "full") else {})
    key = (seed, step, rank, micro)
    def eps(w, name):
        return keyed_noise(w, compact_scale(noise_type, w, sigma), noise_key(*key, name))

    frozen_eps = {n: eps(w, n) for n, w in targets.items()}
    train_eps = {n: eps(w, n) for n, w in trainable.items()}
    return frozen_eps, train_eps


@pytest.mark.parametrize("scope", ["lora", "full", "base"])
def test_rwp_noisy_gradient_matches_independent_copy(scope):
    model = _tiny_peft()
    b1, b2 = _batches()
    cfg = {"method": "rwp", "scope": scope, "noise_std": 0.02, "noise_type": "lpf_sgd", "a": 0.25, "b": 0.75}
    g = reference_update(cfg, model, [b1, b2], lm_loss)
    frozen_eps, train_eps = _expected_eps(model, scope, 0.02, micro=1, noise_type="lpf_sgd")
    assert len(frozen_eps) == (4 if scope != "lora" else 0) and len(train_eps) == (8 if scope != "base" else 0)
    clean1, clean2 = _plain_grads(model, b1), _plain_grads(model, b2)
    noisy = _plain_grads(_noisy_copy(model, frozen_eps, train_eps), b2)
    for name in g:
        expected = 0.25 * (clean1[name] + clean2[name]) / 2 + 0.75 * noisy[name]
        assert torch.allclose(g[name], expected, atol=1e-6, rtol=1e-5), name
        assert not torch.allclose(noisy[name], clean2[name], atol=1e-6), name  # the noise did something


def test_rwp_all_linear_targets_and_gradient():
    model = _tiny_peft()
    names = [t.name for t in frozen_targets(model, "all_linear")]
    assert len(names) == 2 * 7 and not any("lm_head" in n or "lora_" in n for n in names)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" in names
    assert "base_model.model.model.layers.1.mlp.down_proj" in names
    [batch] = _batches(1)
    cfg = {"method": "rwp", "scope": "base", "noise_std": 0.01, "a": 0.0, "b": 1.0, "noise_targets": "all_linear"}
    g = reference_update(cfg, model, [batch], lm_loss)
    frozen_eps = {n: keyed_noise(t.weight.detach(), Scale(0.01), noise_key(0, 0, 0, 0, n))
                  for n, t in zip(names, frozen_targets(model, "all_linear"))}
    noisy = _plain_grads(_noisy_copy(model, frozen_eps, {}), batch)
    for name in g:
        assert torch.allclose(g[name], noisy[name], atol=1e-6, rtol=1e-5), name


def _merged_weight(model, base_name: str) -> torch.Tensor:
    """W' = W0 + Σ_k s_k B_k A_k of one adapted layer of `_tiny_peft`, written out by hand."""
    layer = model.get_submodule(base_name[: -len(".base_layer")])
    return (layer.base_layer.weight + sum(layer.lora_B[k].weight @ layer.lora_A[k].weight * layer.scaling[k]
                                          for k in ("old", "new"))).detach()


def test_flat_lora_matches_independent_merged_weight_noise():
    model = _tiny_peft()
    b1, b2 = _batches()
    sigma, step, total = 0.3, 2, 5
    ramp = 0.5 * (1 - math.cos(math.pi * step / (total - 1)))  # = 0.5
    g = reference_update({"method": "flat_lora", "noise_std": sigma}, model, [b1, b2], lm_loss, step=step,
                         total_steps=total, seed=4)
    grads = {}
    for micro, batch in enumerate((b1, b2)):
        frozen_eps = {}
        for name, module in model.named_modules():
            if name.endswith(".base_layer"):
                merged = _merged_weight(model, name)
                std = ramp * sigma / math.sqrt(merged.shape[1]) * merged.norm(dim=1, keepdim=True)
                eps = keyed_noise(module.weight.detach(), Scale(std), noise_key(4, step, 0, micro, name))
                frozen_eps[name] = eps
        noisy = _plain_grads(_noisy_copy(model, frozen_eps, {}), batch, scale=0.5)
        grads = {n: grads.get(n, 0) + v for n, v in noisy.items()}
    for name in g:
        assert torch.allclose(g[name], grads[name], atol=1e-6, rtol=1e-5), name


def test_flat_lora_on_gpt2_conv1d():
    model = _tiny_peft(family="gpt2", targets=("c_attn",))
    [batch] = _batches(1)
    g = reference_update({"method": "flat_lora", "noise_std": 0.5, "ramp": "constant"}, model, [batch], lm_loss)
    frozen_eps = {}
    for t in frozen_targets(model):
        layer = t.lora
        w0 = t.module.weight.detach().t()  # [out, in]
        merged = w0 + sum(layer.lora_B[k].weight @ layer.lora_A[k].weight * layer.scaling[k] for k in ("old", "new"))
        std = 0.5 / math.sqrt(merged.shape[1]) * merged.detach().norm(dim=1, keepdim=True)
        frozen_eps[t.name] = keyed_noise(w0, Scale(std), noise_key(0, 0, 0, 0, t.name))
    noisy = _plain_grads(_noisy_copy(model, frozen_eps, {}), batch)
    clean = _plain_grads(model, batch)
    for name in g:
        assert torch.allclose(g[name], noisy[name], atol=1e-6, rtol=1e-5), name
        assert not torch.allclose(g[name], clean[name], atol=1e-6), name


@pytest.mark.parametrize("config, factor", [
    ({"method": "rwp", "scope": "full", "noise_std": 0.0, "a": 0.3, "b": 0.9}, 1.2),
    ({"method": "rwp", "scope": "base", "noise_std": 0.0, "noise_type": "fisher"}, 1.0),
    ({"method": "lpf_sgd", "scope": "full", "noise_std": 0.0}, 1.0),
    ({"method": "flat_lora", "noise_std": 0.0, "ramp": "constant"}, 1.0),
])
def test_sigma_zero_limits_on_peft(config, factor):
    model = _tiny_peft()
    [batch] = _batches(1)
    g = reference_update(config, model, [batch], lm_loss)
    plain = _plain_grads(model, batch)
    for name in g:
        assert torch.allclose(g[name], factor * plain[name], atol=1e-7, rtol=1e-6), name


def test_fisher_estimate_and_limits():
    model = _tiny_peft()
    [batch] = _batches(1)
    base = {"method": "rwp", "scope": "full", "noise_std": 0.02, "a": 0.5, "b": 0.5, "fisher_decay": 0.0}
    # η = 0: the Fisher type is the row-norm (lpf_sgd) type exactly
    g_f = reference_update({**base, "noise_type": "fisher", "fisher_eta": 0.0}, model, [batch], lm_loss)
    g_l = reference_update({**base, "noise_type": "lpf_sgd"}, model, [batch], lm_loss)
    assert all(torch.equal(g_f[n], g_l[n]) for n in g_f)
    # the estimate covers every noised tensor with positive rows; a huge η suppresses the noise
    method = build_method({**base, "noise_type": "fisher", "fisher_eta": 1e14})
    from cl_flat.flatness import TorchContext
    ctx = TorchContext(model, lm_loss, step=0, total_steps=1, seed=0)
    method.begin_task(model)
    method.window(ctx, [batch])
    grads = {n: p.grad.clone() for n, p in ctx.params.items()}
    for p in ctx.params.values():
        p.grad = None
    assert len(method.fisher.state) == 4 + 8
    assert all(rows.min() > 0 for rows in method.fisher.state.values())
    plain = _plain_grads(model, batch)
    for name in grads:
        assert torch.allclose(grads[name], plain[name], atol=1e-6, rtol=1e-4), name


def test_fisher_noise_differs_from_lpf_sgd_at_the_default_eta():
    """With F normalised to mean 1 per layer, η = 1 shrinks a row of average Fisher to 1/√2 of its
    lpf_sgd std; over a tiny model's noised tensors the total noise variance must fall well below
    lpf_sgd's (the un-normalised per-token estimate gave 0.97-1.0×, the knob did nothing)."""
    from cl_flat.flatness import TorchContext
    from cl_flat.flatness.noise import compact_scale

    model = _tiny_peft()
    method = build_method({"method": "rwp", "noise_type": "fisher", "noise_std": 0.01})  # default η, decay, scope
    method.begin_task(model)
    for step, batch in enumerate(_batches(3)):
        ctx = TorchContext(model, lm_loss, step=step, total_steps=3, seed=0)
        method.window(ctx, [batch])
        for p in ctx.params.values():
            p.grad = None
    frozen, trainable = method._noise(ctx, True)
    pairs = [(t.weight, scale, compact_scale("lpf_sgd", t.weight, 0.01, rows=t.reference_rows("lpf_sgd")))
             for t, scale in frozen]
    pairs += [(p, scale, compact_scale("lpf_sgd", p, 0.01)) for _, p, scale in trainable]
    fisher = sum(s.full(w).square().sum() for w, s, _ in pairs)
    lpf = sum(s.full(w).square().sum() for w, _, s in pairs)
    assert len(pairs) == 4 + 8 and fisher / lpf < 0.8


# ---------------------------------------------------------------- 100 updates leave nothing behind

RUNS = {
    "rwp-lora": {"method": "rwp", "scope": "lora", "noise_std": 0.05, "noise_type": "gauss_element"},
    "rwp-full": {"method": "rwp", "scope": "full", "noise_std": 0.01},
    "rwp-base-fisher": {"method": "rwp", "scope": "base", "noise_std": 0.05, "noise_type": "fisher"},
    "rwp-full-two-batch-all-linear": {"method": "rwp", "scope": "full", "noise_std": 0.05, "noise_type": "lpf_sgd",
                                      "two_batch": True, "noise_targets": "all_linear"},
    "lpf_sgd-lora": {"method": "lpf_sgd", "scope": "lora", "noise_std": 0.01},
    "lpf_sgd-full": {"method": "lpf_sgd", "scope": "full", "noise_std": 0.01},
    "lpf_sgd-base": {"method": "lpf_sgd", "scope": "base", "noise_std": 0.01},
    "flat_lora": {"method": "flat_lora", "noise_std": 0.1},
}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("run", list(RUNS))
def test_hundred_updates_leave_no_perturbation(run, dtype):
    """Frozen weights bit-for-bit unchanged; trainable weights equal a shadow copy that only the
    optimizer touched (same gradients), so no noise is ever left behind."""
    model = _tiny_peft(dtype)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    shadow = {n: nn.Parameter(p.detach().clone()) for n, p in params.items()}
    initial = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=1e-3)
    shadow_opt = torch.optim.AdamW(list(shadow.values()), lr=1e-3)
    batches = _batches(2, seed=9)
    method_config = RUNS[run]
    total = 100
    for step in range(total):
        g = reference_update(method_config, model, batches, lm_loss, step=step, total_steps=total, seed=1)
        for n, p in params.items():
            p.grad = g[n]
            shadow[n].grad = g[n].clone()
        opt.step()
        shadow_opt.step()
        opt.zero_grad(set_to_none=True)
        shadow_opt.zero_grad(set_to_none=True)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
        else:
            assert torch.equal(p.detach(), shadow[n].detach()), n
    assert all((p.detach() - initial[n]).abs().max() > 1e-3 for n, p in params.items())  # it trained


def test_rwp_flat_lora_noise_type_scales_w0_noise_by_the_merged_rows():
    """`noise_type: flat_lora` means Flat-LoRA's noise: on W0 its std is σ/√n·‖W'_i‖ with the merged
    W' = W0 + Σ s·BA (the trained-looking adapters make W' ≠ W0), as in the method `flat_lora`."""
    model = _tiny_peft()
    [batch] = _batches(1)
    sigma = 0.3
    g = reference_update({"method": "rwp", "scope": "base", "noise_type": "flat_lora", "noise_std": sigma,
                          "a": 0.0, "b": 1.0}, model, [batch], lm_loss, seed=4)
    frozen_eps = {}
    for name, module in model.named_modules():
        if name.endswith(".base_layer"):
            merged = _merged_weight(model, name)
            assert not torch.allclose(merged.norm(dim=1), module.weight.norm(dim=1), rtol=1e-3)
            std = sigma / math.sqrt(merged.shape[1]) * merged.norm(dim=1, keepdim=True)
            frozen_eps[name] = keyed_noise(module.weight.detach(), Scale(std), noise_key(4, 0, 0, 0, name))
    expected = _plain_grads(_noisy_copy(model, frozen_eps, {}), batch)
    for name in g:
        assert torch.allclose(g[name], expected[name], atol=1e-6, rtol=1e-5), name
    # the same update as Flat-LoRA itself at ramp 1 with one micro-batch (same noise keys)
    flat = reference_update({"method": "flat_lora", "noise_std": sigma, "ramp": "constant"}, model, [batch], lm_loss,
                            seed=4)
    assert all(torch.equal(g[n], flat[n]) for n in g)


def test_begin_task_restarts_the_fisher_estimate():
    from cl_flat.flatness import TorchContext

    model = _tiny_peft()
    b1, b2 = _batches()
    method = build_method({"method": "rwp", "scope": "full", "noise_type": "fisher", "noise_std": 0.02,
                           "fisher_decay": 0.5})

    def update(step, batch):
        ctx = TorchContext(model, lm_loss, step=step, total_steps=3, seed=0)
        method.window(ctx, [batch])
        grads = {n: p.grad.clone() for n, p in ctx.params.items()}
        for p in ctx.params.values():
            p.grad = None
        return grads

    method.begin_task(model)
    first = update(0, b1)
    update(1, b2)  # the EMA now holds two batches' estimate
    carried = update(0, b1)  # the same batch and index, but the noise now sees the carried estimate
    assert any(not torch.equal(first[n], carried[n]) for n in first)
    method.begin_task(model)  # a new task: the estimate starts empty again, whatever the update index
    again = update(0, b1)
    assert all(torch.equal(first[n], again[n]) for n in first)
