"""The Hessian measures of flatness against analytic and dense Hessians.

Pure core on quadratics L(w) = ½ wᵀHw with H = Q diag(λ) Qᵀ built from eigenvalues set here:
power iteration returns the eigenvalue of largest magnitude, and `top_eigenvalue` the largest one
(Lanczos where the first is negative); Hutchinson's estimate with Rademacher
probes is exactly tr(H) for a diagonal H (zᵀHz = Σ H_ii z_i² = Σ H_ii), and for a dense H its mean over
many probes lies within a few standard errors of tr(H), with a standard error that matches the
analytic Var(zᵀHz) = 2 Σ_{i≠j} H_ij². Model side: the Hessian-vector product of the held-out loss
equals the dense Hessian that torch.autograd.functional.hessian forms from the model's own HF loss (a
computation independent of `PerturbedLoss`), on a causal and a seq2seq (T5) LoRA stack.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cl_flat import landscape as ls
from cl_flat.config import EvaluationSection, LoraSection
from cl_flat.landscape.hessian import hutchinson_trace, lanczos_largest, power_iteration, rademacher, top_eigenvalue
from cl_flat.rundir import RunDir

D = torch.float64
SHAPES = {"b": torch.Size([3]), "a": torch.Size([2, 2])}  # 7 entries; flattened in sorted name order: a, b


def _flat(v):
    return torch.cat([v[k].flatten() for k in sorted(v)])


def _unflat(x):
    out, offset = {}, 0
    for k in sorted(SHAPES):
        n = SHAPES[k].numel()
        out[k] = x[offset:offset + n].view(SHAPES[k])
        offset += n
    return out


def _quadratic(eigenvalues, seed=0):
    """H = Q diag(λ) Qᵀ with a random orthogonal Q, and its HVP on dict vectors."""
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=D))
    H = q @ torch.diag(torch.tensor(eigenvalues, dtype=D)) @ q.T
    return H, lambda v: _unflat(H @ _flat(v).double())


def test_power_iteration_returns_the_top_eigenvalue_of_a_quadratic():
    eigenvalues = [5.0, 2.0, 1.0, 0.5, 0.1, 0.0, -0.3]
    _, hvp = _quadratic(eigenvalues)
    top = power_iteration(hvp, SHAPES, torch.Generator().manual_seed(1), iters=200, tol=1e-10, dtype=D)
    assert top.value == pytest.approx(5.0, rel=1e-8)
    assert top.converged and top.iterations < 200 and len(top.history) == top.iterations
    # the cap is respected, and without convergence it says so
    capped = power_iteration(hvp, SHAPES, torch.Generator().manual_seed(1), iters=2, tol=1e-12, dtype=D)
    assert capped.iterations == 2 and not capped.converged
    assert capped.history == top.history[:2]  # the same start: the same seeded v₀
    # Rayleigh quotients never exceed λ_max
    assert max(top.history) <= 5.0 + 1e-9


def test_power_iteration_finds_the_largest_magnitude_even_if_negative():
    """At a saddle the dominant eigenvalue can be negative; it is reported as is."""
    _, hvp = _quadratic([-7.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0], seed=2)
    top = power_iteration(hvp, SHAPES, torch.Generator().manual_seed(0), iters=300, tol=1e-12, dtype=D)
    assert top.value == pytest.approx(-7.0, rel=1e-6)


@pytest.mark.parametrize("eigenvalues, largest", [
    ([-7.0, 3.0, 1.0, 0.0, 0.0, 0.0, 0.0], 3.0),          # indefinite: a saddle
    ([-7.0, -3.0, -1.0, -0.5, -0.2, -0.1, -2.0], -0.1),   # negative definite: the largest is still negative
])
def test_top_eigenvalue_is_the_largest_even_where_the_dominant_is_negative(eigenvalues, largest):
    _, hvp = _quadratic(eigenvalues, seed=2)
    top = top_eigenvalue(hvp, SHAPES, torch.Generator().manual_seed(0), iters=2000, tol=1e-13, dtype=D)
    assert top.dominant == pytest.approx(-7.0, rel=1e-6)
    assert top.value == pytest.approx(largest, abs=1e-6) and top.converged
    first = power_iteration(hvp, SHAPES, torch.Generator().manual_seed(0), iters=2000, tol=1e-13, dtype=D)
    assert top.iterations == len(top.history) > first.iterations  # both runs' products are counted
    assert top.history[:first.iterations] == first.history
    # Ritz values interlace H's eigenvalues: never above λ_max
    assert max(top.history[first.iterations:]) <= largest + 1e-9


def test_lanczos_bounds_from_below_stops_on_its_residual_and_says_when_capped():
    """60 dimensions, spectrum in [−30, 2] with λ₁ = 2 and λ₂ = 1.9: every Ritz value is ≤ λ_max; a run capped
    at 3 products is not converged; run to its residual bound, the value is within tol·|θ| of λ_max."""
    g = torch.Generator().manual_seed(3)
    eigenvalues = torch.cat([torch.tensor([2.0, 1.9], dtype=D), torch.rand(58, generator=g, dtype=D) * -30.0])
    q, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=D))
    H = q @ torch.diag(eigenvalues) @ q.T
    shapes = {"w": torch.Size([60])}

    def hvp(v):
        return {"w": H @ v["w"]}

    capped = lanczos_largest(hvp, shapes, torch.Generator().manual_seed(0), iters=3, tol=1e-6, dtype=D)
    assert capped.iterations == 3 and not capped.converged and capped.value <= 2.0
    top = lanczos_largest(hvp, shapes, torch.Generator().manual_seed(0), iters=200, tol=1e-6, dtype=D)
    assert top.converged and top.iterations < 60 and top.value == pytest.approx(2.0, rel=1e-5)
    assert all(x <= 2.0 + 1e-9 for x in top.history) and top.history[:3] == capped.history


def test_top_eigenvalue_where_the_dominant_is_positive_is_one_power_iteration():
    _, hvp = _quadratic([5.0, 2.0, 1.0, 0.5, 0.1, 0.0, -4.0])
    top = top_eigenvalue(hvp, SHAPES, torch.Generator().manual_seed(1), iters=500, tol=1e-12, dtype=D)
    plain = power_iteration(hvp, SHAPES, torch.Generator().manual_seed(1), iters=500, tol=1e-12, dtype=D)
    assert top.value == plain.value == top.dominant and top.history == plain.history
    assert top.value == pytest.approx(5.0, rel=1e-8)


def test_power_iteration_on_a_zero_hessian_is_zero_and_converged():
    top = power_iteration(lambda v: {k: torch.zeros_like(t) for k, t in v.items()}, SHAPES,
                          torch.Generator().manual_seed(0), iters=10, tol=1e-3)
    assert top.value == 0.0 and top.converged and top.iterations == 1


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    diag = torch.tensor([3.0, -1.0, 0.5, 2.0, 0.0, 7.0, 1.5], dtype=D)
    est = hutchinson_trace(lambda v: _unflat(diag * _flat(v).double()), SHAPES, torch.Generator().manual_seed(4),
                           probes=5, dtype=D)
    assert all(s == pytest.approx(13.0, abs=1e-12) for s in est.samples)
    assert est.value == pytest.approx(13.0, abs=1e-12) and est.se == pytest.approx(0.0, abs=1e-12)
    assert est.probes == 5


def test_hutchinson_mean_within_its_standard_error_and_the_analytic_variance():
    H, hvp = _quadratic([4.0, 3.0, -2.0, 1.0, 0.5, 0.25, 0.0], seed=3)
    m = 4000
    est = hutchinson_trace(hvp, SHAPES, torch.Generator().manual_seed(7), probes=m, dtype=D)
    truth = float(torch.trace(H))
    assert truth == pytest.approx(6.75)
    off = H - torch.diag(torch.diag(H))
    analytic_se = math.sqrt(2 * float((off ** 2).sum()) / m)  # Var(zᵀHz) = 2 Σ_{i≠j} H_ij² for Rademacher z
    assert est.se == pytest.approx(analytic_se, rel=0.1)
    assert abs(est.value - truth) <= 4 * analytic_se
    one = hutchinson_trace(hvp, SHAPES, torch.Generator().manual_seed(7), probes=1, dtype=D)
    assert one.se is None and one.samples == est.samples[:1]


def test_rademacher_is_plus_minus_one_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    z = rademacher({"a": torch.Size([50, 40])}, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)
    values = z["a"]
    assert set(values.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(values.mean())) < 0.1  # 2000 fair signs: |mean| < 0.1 with probability > 1 − 1e-5
    assert torch.equal(values, rademacher({"a": torch.Size([50, 40])}, torch.Generator().manual_seed(0))["a"])


def test_bounds_of_the_new_evaluation_keys():
    from pydantic import ValidationError

    section = EvaluationSection()
    assert section.sharpness and section.hessian_iters > 0 and section.hessian_probes > 0  # on by default
    assert not section.sharpness_every_task
    for bad in ({"hessian_iters": -1}, {"hessian_probes": -1}, {"hessian_tol": 0}, {"hessian_tol": 1.0},
                {"hessian_iters": 1001}):
        with pytest.raises(ValidationError):
            EvaluationSection(**bad)
    EvaluationSection(hessian_iters=0, hessian_probes=0)  # 0: not measured


# ---------------------------------------------------------------- model side: dense Hessians


def make_task(n: int):
    from cl_flat.data import Example, TaskData

    labels = ("yes", "yes no", "no")
    examples = tuple(Example(f"sample number {i} " + "x" * (i % 4), labels[i % 3]) for i in range(n))
    return TaskData(name="t", labels=labels, train=examples, test=examples, metric="accuracy",
                    template="{instruction}\nOptions: {options}\nInput: {input}\nAnswer:", instruction="Pick one.")


def _dense_hessian(model, batch, names):
    """The Hessian of the model's own HF loss (`labels`: mean target-token cross-entropy) on one batch,
    w.r.t. the tensors `names` flattened in sorted order and laid out as stored."""
    params = dict(model.named_parameters())
    values = [params[n].detach() for n in names]
    sizes = [v.numel() for v in values]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids", "labels") if k in batch}

    def loss(x):
        parts = torch.split(x, sizes)
        overrides = {n: v + p.view_as(v) for n, v, p in zip(names, values, parts)}
        return torch.func.functional_call(model, overrides, args=(), kwargs=inputs).loss

    model.eval()
    with sdpa_kernel([SDPBackend.MATH]):
        return torch.autograd.functional.hessian(loss, torch.zeros(sum(sizes)))


def _check_against_dense(model, task, tokenizer, adapter, layer_filter, max_length):
    section = EvaluationSection(batch_size=64, max_samples_per_task=None)
    batches = ls.held_out_batches(task, tokenizer, section, max_length=max_length, seed=0, max_samples=6,
                                  rank=0, world=1)
    assert len(batches) == 1  # the HF loss of the one batch is the token-weighted mean PerturbedLoss takes
    moved = [m for m in ls.moved_weights(model, "adapter", adapter) if layer_filter in m.name]
    names = sorted(m.name for m in moved)
    assert len(names) == 2 and not any(m.transposed for m in moved)  # one layer's A and B
    H = _dense_hessian(model, batches[0], names)
    assert torch.allclose(H, H.T, atol=1e-5)
    evaluator = ls.PerturbedLoss(model, batches, moved)
    shapes = {m.name: m.shape for m in moved}
    g = torch.Generator().manual_seed(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with evaluator.hessian() as hvp:
        for _ in range(3):
            v = {k: torch.randn(shapes[k], generator=g) for k in names}
            hv = hvp(v)
            expected = H @ torch.cat([v[k].flatten() for k in names])
            got = torch.cat([hv[k].flatten() for k in names])
            assert torch.allclose(got, expected, rtol=1e-3, atol=1e-5 * float(expected.abs().max())), (got, expected)
        eigenvalues = torch.linalg.eigvalsh(H.double())
        dominant = float(eigenvalues[eigenvalues.abs().argmax()])
        top = top_eigenvalue(hvp, shapes, torch.Generator().manual_seed(1), iters=500, tol=1e-7)
        assert top.dominant == pytest.approx(dominant, rel=1e-3)
        # the largest eigenvalue (here λ₁ and λ₂ differ by 0.6%: Lanczos must still tell them apart)
        assert top.value == pytest.approx(float(eigenvalues.max()), rel=1e-3)
        trace = hutchinson_trace(hvp, shapes, torch.Generator().manual_seed(2), probes=30)
        assert abs(trace.value - float(torch.trace(H))) <= 4 * trace.se
    assert evaluator.products == 3 + top.iterations + 30
    for n, p in model.named_parameters():  # nothing written, no .grad left behind
        assert torch.equal(p.detach(), before[n]) and p.grad is None, n


def test_hvp_equals_the_dense_hessian_causal():
    from cl_flat.adapters import AdapterStack
    from cl_flat.models import load_model

    model, tokenizer = load_model("tiny-random:llama", seed=1)
    stack = AdapterStack(model, LoraSection(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), seed=1)
    stack.add_task(0, "t1")
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    _check_against_dense(stack.model, make_task(6), tokenizer, "t1", "layers.1.self_attn.q_proj", 64)


def test_hvp_equals_the_dense_hessian_seq2seq():
    from cl_flat.adapters import AdapterStack
    from cl_flat.models import load_model

    model, tokenizer = load_model("tiny-random:t5", seed=2)
    stack = AdapterStack(model, LoraSection(r=2, alpha=4), seed=3)
    stack.add_task(0, "t1")
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    _check_against_dense(stack.model, make_task(6), tokenizer, "t1", "decoder.block.1.layer.0.SelfAttention.q", 64)


# ---------------------------------------------------------------- the records


def test_compute_sharpness_records_the_hessian_entries(tiny_config):
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import validate_config
    from cl_flat.data import load_tasks
    from cl_flat.models import load_model

    config = validate_config(tiny_config, "tiny")
    model, tokenizer = load_model("tiny-random:llama", "fp32", seed=1)
    stack = AdapterStack(model, config.lora, seed=1)
    stack.add_task(0, "t1")
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if ".lora_B.t1." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    task = load_tasks(config)[0]
    options = ls.LandscapeOptions(samples=2, ascent_steps=1, hessian_iters=4, hessian_probes=3, hessian_tol=1e-9)
    record = ls.compute_sharpness(stack.model, tokenizer, task, "t1", config.evaluation,
                                  max_length=config.training.max_seq_length, seed=1, options=options)
    assert record["hessian_iters"] == 4 and record["hessian_probes"] == 3 and record["hessian_tol"] == 1e-9
    assert record["power_iterations"] == 4 and record["lambda_converged"] is False  # tol 1e-9 is not met in 4
    assert record["passes"]["hessian_vector"] == 4 + 3
    assert record["lambda_max"] > 0 and record["trace"] is not None and record["trace_se"] >= 0
    again = ls.compute_sharpness(stack.model, tokenizer, task, "t1", config.evaluation,
                                 max_length=config.training.max_seq_length, seed=1, options=options)
    assert again == record  # keyed generators: the same numbers
    off = ls.compute_sharpness(stack.model, tokenizer, task, "t1", config.evaluation,
                               max_length=config.training.max_seq_length, seed=1,
                               options=options.model_copy(update={"hessian_iters": 0, "hessian_probes": 1}))
    assert off["lambda_max"] is None and off["power_iterations"] == 0 and off["trace_se"] is None
    assert off["passes"]["hessian_vector"] == 1


def test_sharpness_matrix_rows_and_empty_cells(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.merge_sharpness("t1", {"avg": 0.5, "worst": 1.0, "lambda_max": 3.0, "trace": 9.0, "trace_se": None})
    run_dir.merge_sharpness("t1_after_t2", {"avg": 0.25, "worst": 2.0, "lambda_max": None, "trace": 4.0,
                                            "trace_se": 0.5})
    path = run_dir.write_sharpness_matrix([("t1", "t1", "t1"), ("t2", "t1", "t1_after_t2"), ("t2", "t2", "t2")],
                                          "adapter")
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["after_task", "task", "space", "avg", "worst", "lambda_max", "trace", "trace_se"]
    assert rows[1] == ["t1", "t1", "adapter", "0.5", "1.0", "3.0", "9.0", ""]
    assert rows[2] == ["t2", "t1", "adapter", "0.25", "2.0", "", "4.0", "0.5"]
    assert rows[3] == ["t2", "t2", "adapter", "", "", "", "", ""]  # not measured: empty, not 0
    assert set(json.loads(run_dir.sharpness_path.read_text())) == {"t1", "t1_after_t2"}


def test_hvp_of_the_sharded_sample_is_the_token_weighted_sum_of_the_shards():
    """Each rank's Hv covers its slice of the held-out sample (the all-reduce adds the slices): the
    whole sample's Hv·T equals Σ_shards Hv_shard·T_shard (T: target tokens), as 2 ranks would sum it."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.models import load_model

    model, tokenizer = load_model("tiny-random:llama", seed=1)
    stack = AdapterStack(model, LoraSection(r=2, alpha=4, target_modules=["q_proj", "v_proj"]), seed=1)
    stack.add_task(0, "t1")
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    task = make_task(7)
    section = EvaluationSection(batch_size=2, max_samples_per_task=None)
    moved = ls.moved_weights(stack.model, "adapter", "t1")
    shapes = {m.name: m.shape for m in moved}
    v = {k: torch.randn(shapes[k], generator=torch.Generator().manual_seed(9)) for k in sorted(shapes)}
    parts = []
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        batches = ls.held_out_batches(task, tokenizer, section, max_length=64, seed=0, max_samples=7, rank=rank,
                                      world=world)
        evaluator = ls.PerturbedLoss(stack.model, batches, moved)
        with evaluator.hessian() as hvp:
            parts.append((evaluator.tokens, hvp(v)))
    (total, whole), (t0, h0), (t1, h1) = parts
    assert total == t0 + t1 and t0 > 0 and t1 > 0
    for k in v:
        assert torch.allclose(whole[k] * total, h0[k] * t0 + h1[k] * t1, rtol=1e-4, atol=1e-6)
