"""RWP `one_pass`: two-batch RWP on the two halves of each micro-batch in one
forward. Checked against an independent computation: plain autograd on the halves, the noisy half
through a deep copy of the model with ε written into its weights (the serial two-batch formula on
[C, D] by hand), both for `reference_update` (its serial form) and for the one-pass form in plain
torch (a context with a row-splittable loss), which must also run exactly one forward per micro-batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cl_flat.config import LoraSection, RunConfig
from cl_flat.errors import UserError
from cl_flat.flatness import build_method, reference_update
from cl_flat.flatness.noise import compact_scale, frozen_targets, keyed_noise, noise_key
from cl_flat.flatness.reference import TorchContext
from cl_flat.loss import target_loss, target_split_losses

SIGMA, SEED, STEP = 0.05, 4, 2


def _tiny_peft(family="llama", targets=("q_proj", "v_proj")):
    """A frozen trained-looking adapter 'old' and the current 'new' (B ≠ 0 so A gets a gradient)."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.models import load_model

    model, _ = load_model(f"tiny-random:{family}", "fp32", seed=5)
    stack = AdapterStack(model, LoraSection(r=4, target_modules=list(targets)), seed=5)
    for i, name in enumerate(("old", "new")):
        stack.add_task(i, name)
        with torch.no_grad():
            for n, p in stack.model.named_parameters():
                if f"lora_B.{name}." in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3 + i)) * 0.1)
    return stack.model.eval()


def _batch(rows, seed):
    """`rows` examples of 9 tokens, targets after the 4th (the -100s differ per row: halves have their own counts)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (rows, 9), generator=gen)
    labels = ids.clone()
    for r in range(rows):
        labels[r, : 3 + r % 3] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _rows(batch, part):
    return {k: v[part] for k, v in batch.items()}


def _grads(model, batch, weight):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(target_loss(model, batch) * weight, list(params.values()))))


def _noisy_copy(model, scope, noise_type, key):
    """Deep copy with ε = Z ⊙ S(noise_type) written into W0 (adapted layers) and/or the current adapter."""
    noisy = copy.deepcopy(model)
    targets = {t.name: t.weight.detach() for t in frozen_targets(model)} if scope in ("full", "base") else {}
    trainable = ({n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
                 if scope in ("lora", "full") else {})
    with torch.no_grad():
        for name, w in targets.items():
            eps = keyed_noise(w, compact_scale(noise_type, w, SIGMA), noise_key(*key, name))
            module = noisy.get_submodule(name)
            module.weight.add_(eps if isinstance(module, nn.Linear) else eps.t())  # Conv1D stores [in, out]
        params = dict(noisy.named_parameters())
        for name, w in trainable.items():
            params[name].add_(keyed_noise(w, compact_scale(noise_type, w, SIGMA), noise_key(*key, name)))
    return noisy


def _expected(model, batches, scope, noise_type, a, b):
    """(1/N) Σ_i [a·∇L(θ; C_i) + b·∇L(θ+ε; D_i)], C_i = first ⌊m/2⌋ rows, ε keyed (seed, step, rank 0, 1)."""
    noisy = _noisy_copy(model, scope, noise_type, (SEED, STEP, 0, 1))
    n, total = len(batches), {}
    for batch in batches:
        h = batch["input_ids"].shape[0] // 2
        clean = _grads(model, _rows(batch, slice(None, h)), a / n)
        dirty = _grads(noisy, _rows(batch, slice(h, None)), b / n)
        for k in clean:
            total[k] = total.get(k, 0) + clean[k] + dirty[k]
    return total


def _one_pass(model, config, batches):
    """The one-pass form in plain torch: gradients, stats and the number of forwards."""
    method = build_method(config)
    method.begin_task(model)
    ctx = TorchContext(model, target_loss, step=STEP, total_steps=10, seed=SEED,
                       split_loss_fn=target_split_losses)
    forwards = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_hook(lambda *args: forwards.append(1))
    try:
        stats = method.window(ctx, batches)
    finally:
        handle.remove()
    grads = {n: p.grad.detach().clone() for n, p in ctx.params.items()}
    for p in ctx.params.values():
        p.grad = None
    return grads, stats, len(forwards)


CASES = [  # (family, targets, scope, noise_type, rows, micro-batches)
    ("llama", ("q_proj", "v_proj"), "lora", "gauss_standard", 4, 1),
    ("llama", ("q_proj", "v_proj"), "full", "gauss_element", 4, 2),
    ("llama", ("q_proj", "v_proj"), "base", "lpf_sgd", 5, 1),   # odd: 2 clean rows, 3 noisy
    ("gpt2", ("c_attn",), "full", "gauss_element", 4, 1),        # Conv1D layers, no fused head
]


@pytest.mark.parametrize("family,targets,scope,noise_type,rows,n", CASES)
def test_one_pass_equals_serial_two_batch_on_the_halves(family, targets, scope, noise_type, rows, n):
    model = _tiny_peft(family, targets)
    frozen_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [_batch(rows, seed=10 + i) for i in range(n)]
    cfg = {"method": "rwp", "scope": scope, "noise_type": noise_type, "noise_std": SIGMA, "a": 0.3, "b": 0.7,
           "two_batch": True, "one_pass": True}
    expected = _expected(model, batches, scope, noise_type, 0.3, 0.7)
    serial = reference_update(cfg, model, batches, target_loss, step=STEP, total_steps=10, seed=SEED)
    one, stats, forwards = _one_pass(model, cfg, batches)
    assert forwards == n  # one forward per micro-batch (the serial form runs two)
    for name, g in expected.items():
        assert torch.allclose(serial[name], g, atol=1e-6, rtol=1e-5), name
        assert (one[name] - g).abs().max() <= 1e-5, name
    # the noise mattered: the same halves without noise give another gradient
    plain = _expected(model, batches, scope, noise_type, 0.3, 0.0)
    clean_d = _expected_noiseless(model, batches)
    assert any(not torch.allclose(expected[k] - plain[k], 0.7 * clean_d[k], atol=1e-6) for k in expected)
    # the log: mean clean loss over the C_i, mean noisy loss over the D_i
    noisy = _noisy_copy(model, scope, noise_type, (SEED, STEP, 0, 1))
    with torch.no_grad():
        lc = [target_loss(model, _rows(b, slice(None, rows // 2))) for b in batches]
        ln = [target_loss(noisy, _rows(b, slice(rows // 2, None))) for b in batches]
    assert float(stats["loss"]) == pytest.approx(float(sum(lc)) / n, rel=1e-5)
    assert float(stats["noisy_loss"]) == pytest.approx(float(sum(ln)) / n, rel=1e-5)
    for k, v in model.named_parameters():  # nothing left behind, frozen or trainable
        assert torch.equal(v.detach(), frozen_before[k]), k


def _expected_noiseless(model, batches):
    """(1/N) Σ_i ∇L(θ; D_i): the noisy halves' gradient without noise."""
    total = {}
    for batch in batches:
        h = batch["input_ids"].shape[0] // 2
        for k, g in _grads(model, _rows(batch, slice(h, None)), 1 / len(batches)).items():
            total[k] = total.get(k, 0) + g
    return total


def test_one_pass_a_zero_and_split_losses():
    model = _tiny_peft()
    batch = _batch(4, seed=3)
    cfg = {"method": "rwp", "scope": "full", "noise_std": SIGMA, "a": 0.0, "b": 1.0, "two_batch": True,
           "one_pass": True}
    one, _, _ = _one_pass(model, cfg, [batch])
    expected = _expected(model, [batch], "full", "gauss_standard", 0.0, 1.0)
    for name, g in expected.items():
        assert (one[name] - g).abs().max() <= 1e-5, name
    # the split loss of an unperturbed model: each half's own mean over its targets
    with torch.no_grad():
        lc, ln = target_split_losses(model, batch, 2)
        assert float(lc) == pytest.approx(float(target_loss(model, _rows(batch, slice(None, 2)))), rel=1e-6)
        assert float(ln) == pytest.approx(float(target_loss(model, _rows(batch, slice(2, None)))), rel=1e-6)


def _training(flatness, mbs=2, gas=1):
    return RunConfig.model_validate({"model": {"name_or_path": "tiny-random:llama"},
                                     "tasks": [{"name": "a", "source": "builtin"}],
                                     "training": {"micro_batch_size": mbs, "gradient_accumulation_steps": gas},
                                     "flatness": flatness}).training


def test_one_pass_check_messages():
    ok = {"method": "rwp", "two_batch": True, "one_pass": True}
    assert build_method(ok).check(_training(ok)) == []  # one micro-batch suffices
    bad = {"method": "rwp", "one_pass": True}
    assert any("needs two_batch" in p for p in build_method(bad).check(_training(bad)))
    assert any("micro_batch_size ≥ 2" in p for p in build_method(ok).check(_training(ok, mbs=1)))
    fisher = {**ok, "noise_type": "fisher"}
    assert any("fisher" in p for p in build_method(fisher).check(_training(fisher)))
    with pytest.raises(UserError, match="micro_batch_size ≥ 2"):
        reference_update(ok, _tiny_peft(), [_batch(1, seed=0)], target_loss)
    with pytest.raises(UserError, match="two_batch"):
        reference_update(bad, _tiny_peft(), [_batch(2, seed=0)], target_loss)


def test_one_pass_under_bf16_autocast_equals_the_serial_form_within_bf16():
    """bf16 training (`cl_flat.precision`: bf16 frozen weights, fp32 adapter, forwards under autocast): the split
    linears cast their operands as autocast casts F.linear's, so the one-pass gradient equals the serial
    two-batch formula on the halves (independent autograd, also under autocast) up to bf16 rounding. Tolerance:
    3% of each gradient's largest entry (bf16 keeps 8 bits; the fp32 cases above hold 1e-5)."""
    model = _tiny_peft()
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    frozen_before = {k: v.detach().clone() for k, v in model.named_parameters()}
    batches = [_batch(4, seed=21)]
    cfg = {"method": "rwp", "scope": "full", "noise_type": "gauss_element", "noise_std": SIGMA, "a": 0.3, "b": 0.7,
           "two_batch": True, "one_pass": True}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _expected(model, batches, "full", "gauss_element", 0.3, 0.7)
        one, _, forwards = _one_pass(model, cfg, batches)
        plain = _expected(model, batches, "full", "gauss_element", 0.3, 0.0)
    assert forwards == 1
    for name, g in expected.items():
        assert one[name].dtype == torch.float32, name  # the adapter's gradient stays fp32
        assert (one[name] - g).abs().max() <= 0.03 * g.abs().max(), name
    # the noisy half mattered, beyond the tolerance: without it the gradient is another one
    assert any((expected[k] - plain[k]).abs().max() > 0.1 * expected[k].abs().max() for k in expected)
    for k, v in model.named_parameters():
        assert torch.equal(v.detach(), frozen_before[k]), k
