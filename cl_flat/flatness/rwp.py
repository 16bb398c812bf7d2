"""Random weight perturbation (RWP / m-RWP) with noise on the adapter, the whole model or the base."""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Literal

import torch
from pydantic import Field

from cl_flat.config import Strict, TrainingSection
from cl_flat.errors import UserError
from cl_flat.flatness.base import FlatnessMethod, register
from cl_flat.flatness.noise import (
    FISHER_ESTIMATES,
    NOISE_TARGETS,
    NOISE_TYPES,
    SCOPES,
    NoiseBuffers,
    RowFisher,
    compact_scale,
    compact_scales,
    frozen_targets,
    param_module,
    perturbed,
)
from cl_flat.flatness.noise.split import split_perturbed, split_rows


class RwpConfig(Strict):
    method: Literal["rwp"]
    scope: Literal[SCOPES] = "full"
    noise_type: Literal[NOISE_TYPES] = "gauss_standard"
    noise_std: float = Field(default=0.0015, ge=0)
    a: float = Field(default=0.5, ge=0, description="weight of the clean gradient")
    b: float = Field(default=0.5, ge=0, description="weight of the noisy gradient")
    two_batch: bool = False
    one_pass: bool = Field(default=False, description="two_batch in one forward: first half of each micro-batch "
                                                      "clean, second half noisy")
    parallel: bool = False
    fisher_decay: float = Field(default=0.95, ge=0, lt=1)
    fisher_eta: float = Field(default=1.0, ge=0, description="η on F normalised to mean 1 per layer")
    fisher_estimate: Literal[FISHER_ESTIMATES] = "minibatch"
    noise_targets: Literal[NOISE_TARGETS] = "adapted"


@register("rwp", RwpConfig)
class Rwp(FlatnessMethod):
    """Random weight perturbation (RWP / m-RWP): a·clean gradient + b·gradient at θ + random noise.

    Li et al., "Revisiting Random Weight Perturbation for Efficiently Improving Generalization",
    TMLR 2024. The mixed loss a·L(θ) + b·E_ε L(θ+ε), one noise sample per update:

        g = a·(1/N) Σ_{i=1..N} ∇L(θ; B_i) + b·∇L(θ+ε; B_N),   ε = Z ⊙ S (S from `noise_type`).

    Window of N micro-batches (as distributed RWP implementations do): clean passes on every micro-batch (their
    backward scaled by a/N), then one noisy pass on the last, B_N (scaled by b). `two_batch`: the
    clean mean runs over B_1..B_{N-1} only and the noisy pass over B_N (the paper's two-batch
    variant; needs N ≥ 2). With a = 0 the clean passes are skipped.
    `one_pass` (with `two_batch`): the two batches are the two halves of every micro-batch B_i of m
    examples, C_i = its first ⌊m/2⌋ examples (clean) and D_i = the other ⌈m/2⌉ (noisy), one ε per
    update with the key of the serial two-batch's noisy pass on the window [C_i, D_i], (seed, update,
    rank, 1):

        g = (1/N) Σ_{i=1..N} [a·∇L(θ; C_i) + b·∇L(θ+ε; D_i)],

    i.e. the mean over i of the serial two-batch formula on [C_i, D_i] (for N = 1 exactly the serial
    two-batch on [C_1, D_1]), each L the mean over its own half's target tokens. In training it runs in
    ONE forward and backward per micro-batch: the rows of C_i compute with W0 and θ, those of D_i with
    W0 + ε and θ + ε (`noise.split`: one W0 + ε per layer and two matmuls; the adapter's perturbed
    copy for the noisy rows), and the pass's loss is a·L(C_i) + b·L(D_i) (`StepContext.split_losses`).
    Where the context cannot split its loss (`reference_update`; O-LoRA's terms) the same formula runs
    as two passes per micro-batch. Needs micro_batch_size ≥ 2; not with `fisher` (its estimate needs
    clean-only passes) nor `parallel`; LoRA dropout draws other masks than the serial passes.
    `scope`: lora = the current adapter's A, B (in place, restored from a copy); full = A, B and the
    frozen W0 of every adapted layer (functionally, W0 is never written); base = W0 only.
    `noise_type: flat_lora` on W0 scales with the rows of the merged weight W' = W0 + Σ s·BA (as the
    method `flat_lora`); on A, B with their own rows. `noise_targets: all_linear` extends W0 noise to
    every linear layer of the base model except the output head. `fisher` shrinks the noise of rows with a
    large Fisher: S_i = σ‖W_i,:‖/√(1 + η·F̃_i), F̃ = the EMA of squared row gradients from the clean passes
    divided by its mean over the layer (so η means the same at any batch size; `cl_flat.flatness.noise.fisher`;
    needs a > 0). The EMA
    state lives in the method instance and restarts in `begin_task`; `reference_update` builds a
    fresh method, so it equals training exactly only for fisher_decay = 0 (or the first update).
    Noise key: (seed, update, rank, micro-batch index, tensor name).

    Several ranks: each rank draws its own ε (its rank is in the key); the applied gradient is the
    all-reduced mean of the ranks' mixed gradients. `parallel: true` (m-RWP's parallel scheme, ≥ 2
    ranks): even ranks compute only the clean gradient mean_i ∇L(θ; B_i), odd ranks only the noisy
    mean_i ∇L(θ+ε_i; B_i) (fresh ε per micro-batch), scaled by a·W/n_clean and b·W/n_noisy
    (= 2a and 2b for an even world size W), so the all-reduce mean is a·clean + b·noisy at the
    wall time of plain training. `reference_update(..., rank=r, world_size=W)` then returns rank r's
    own share; the mean of the shares over r = 0..W-1 is the mixed gradient.
    """

    formula = "g = a·(1/N) Σ_i ∇L(θ; B_i) + b·∇L(θ+ε; B_N), ε = Z ⊙ S(noise_type, σ)"
    versus_notes = ("fisher: m-RWP's F_i = Σ_j EMA((∂L/∂W_ij)²) enters S as F_i / mean_k F_k (mean 1 per layer), "
                    "so that η means the same at any batch size and EMA decay")

    def __init__(self, config: RwpConfig):
        super().__init__(config)
        self.targets = []
        self.fisher = RowFisher(config.fisher_decay, config.fisher_estimate)
        self.buffers = NoiseBuffers()

    def begin_task(self, model):
        self.fisher.reset()
        self.buffers.clear()
        self.targets = frozen_targets(model, self.config.noise_targets) if self.config.scope in ("full", "base") else []

    def state_dict(self):
        return {"fisher": dict(self.fisher.state)}

    def load_state_dict(self, state):
        self.fisher.state = dict(state["fisher"])

    def check(self, training: TrainingSection) -> list[str]:
        c, problems = self.config, []
        n = training.gradient_accumulation_steps
        if c.two_batch and n < 2 and not c.one_pass:
            problems.append("flatness.two_batch: needs training.gradient_accumulation_steps ≥ 2 "
                            "(clean gradient on B_1..B_{N-1}, noisy on B_N), or one_pass: true")
        if c.one_pass:
            if not c.two_batch:
                problems.append("flatness.one_pass: needs two_batch: true (it is the two-batch formula in one pass)")
            if training.micro_batch_size < 2:
                problems.append("flatness.one_pass: needs training.micro_batch_size ≥ 2 (a clean and a noisy half)")
            if c.noise_type == "fisher":
                problems.append("flatness.one_pass: noise_type fisher needs clean-only passes; set one_pass: false")
        if c.parallel:
            world = os.environ.get("WORLD_SIZE")
            if world is not None and int(world) < 2:
                problems.append("flatness.parallel: needs ≥ 2 ranks (half clean, half noisy); launch with "
                                "torchrun/deepspeed or set parallel: false")
            if c.two_batch:
                problems.append("flatness.parallel: cannot be combined with two_batch")
            if c.noise_type == "fisher":
                problems.append("flatness.parallel: noise_type fisher needs clean passes on every rank")
        if c.noise_type == "fisher" and c.a == 0:
            problems.append("flatness.noise_type: fisher estimates F in the clean passes and needs a > 0")
        if c.noise_targets == "all_linear" and c.scope == "lora":
            problems.append("flatness.noise_targets: all_linear needs scope full or base")
        return problems

    def _noise(self, ctx, fisher_rows: bool):
        """(frozen targets with scales, trainable params with scales) for this update."""
        c = self.config
        frozen, trainable = [], []
        for t in self.targets:
            fisher = self.fisher.rows(t.name) if fisher_rows else None
            frozen.append((t, compact_scale(c.noise_type, t.weight, c.noise_std, fisher_rows=fisher,
                                            eta=c.fisher_eta, rows=t.reference_rows(c.noise_type))))
        if c.scope in ("lora", "full") and not fisher_rows:  # the adapter's scales in a few multi-tensor ops
            trainable = list(zip(ctx.params, ctx.params.values(),
                                 compact_scales(c.noise_type, list(ctx.params.values()), c.noise_std)))
        elif c.scope in ("lora", "full"):
            for name, p in ctx.params.items():
                trainable.append((name, p, compact_scale(c.noise_type, p, c.noise_std,
                                                         fisher_rows=self.fisher.rows(name), eta=c.fisher_eta)))
        return frozen, trainable

    def _fisher_modules(self, ctx, model) -> dict:
        c = self.config
        modules = {t.name: t.grad_module for t in self.targets}
        if c.scope in ("lora", "full"):
            modules.update({n: m for n in ctx.params if (m := param_module(model, n)) is not None})
        return modules

    def window(self, ctx, micro_batches):
        c = self.config
        n = len(micro_batches)
        if c.one_pass:
            return self._one_pass(ctx, micro_batches)
        if c.two_batch and n < 2:
            raise UserError("flatness.two_batch: needs training.gradient_accumulation_steps ≥ 2")
        model = ctx.module
        if c.parallel:
            return self._parallel(ctx, micro_batches)
        clean_batches = micro_batches[:-1] if c.two_batch else micro_batches
        use_fisher = c.noise_type == "fisher"
        losses = []
        if c.a > 0:
            weight = c.a / len(clean_batches)
            capture = (self.fisher.capture(self._fisher_modules(ctx, model), 1.0 / (weight ** 2 * len(clean_batches)))
                       if use_fisher else nullcontext())
            with capture:
                losses = [ctx.accumulate(batch, weight, last=False) for batch in clean_batches]
            if use_fisher:
                self.fisher.update()
        frozen, trainable = self._noise(ctx, use_fisher)
        with perturbed(frozen, trainable, (ctx.seed, ctx.step, ctx.rank, n - 1), self.buffers):
            noisy = ctx.accumulate(micro_batches[-1], c.b, last=True)
        clean = torch.stack(losses).mean() if losses else noisy
        return {"loss": clean.float(), "noisy_loss": noisy.float()}

    def _one_pass(self, ctx, micro_batches):
        """two_batch on the halves of every micro-batch (class docstring); one pass each where the
        context splits its loss, else the serial formula on the halves."""
        c = self.config
        if not c.two_batch or c.parallel or c.noise_type == "fisher":
            raise UserError("flatness.one_pass: needs two_batch: true, parallel: false and a noise_type other than "
                            "fisher")
        n, a, b = len(micro_batches), c.a / len(micro_batches), c.b / len(micro_batches)
        halves = [split_rows(batch) for batch in micro_batches]
        if any(split == 0 for split, _, _ in halves):
            raise UserError("flatness.one_pass: needs training.micro_batch_size ≥ 2 (a clean and a noisy half)")
        frozen, trainable = self._noise(ctx, False)
        key = (ctx.seed, ctx.step, ctx.rank, 1)  # the serial two-batch's noisy pass on [C_i, D_i]
        clean, noisy = [], []
        if ctx.split_loss_fn is not None:
            model = ctx.module
            linears = []
            for name, _, scale in trainable:
                module = param_module(model, name)
                if module is None:
                    raise UserError(f"flatness.one_pass: trainable parameter {name} is not an nn.Linear weight")
                linears.append((name, module, scale))
            for i, (batch, (split, _, _)) in enumerate(zip(micro_batches, halves)):
                rows = next(iter(batch.values())).shape[0]
                with split_perturbed(frozen, linears, key, self.buffers, split, rows):
                    lc, ln = ctx.split_losses(batch, split)
                    # a half whose weight is 0 adds nothing (not even a non-finite value's NaN)
                    terms = [w * loss for w, loss in ((a, lc), (b, ln)) if w > 0]
                    ctx.backward(sum(terms[1:], terms[0]) if terms else ln * 0, last=i == n - 1)
                clean.append(lc.detach())
                noisy.append(ln.detach())
        else:
            if c.a > 0:
                clean = [ctx.accumulate(first, a, last=False) for _, first, _ in halves]
            with perturbed(frozen, trainable, key, self.buffers):
                noisy = [ctx.accumulate(second, b, last=i == n - 1) for i, (_, _, second) in enumerate(halves)]
        noisy_mean = torch.stack(noisy).float().mean()
        return {"loss": torch.stack(clean).float().mean() if clean else noisy_mean, "noisy_loss": noisy_mean}

    def _parallel(self, ctx, micro_batches):
        c = self.config
        world = ctx.world_size
        if world < 2:
            raise UserError("flatness.parallel: needs ≥ 2 ranks (half clean, half noisy); "
                            f"this run has {world}. Launch with torchrun/deepspeed or set parallel: false")
        n_clean, n_noisy = (world + 1) // 2, world // 2
        noisy_rank = ctx.rank % 2 == 1
        weight = (c.b * world / n_noisy if noisy_rank else c.a * world / n_clean) / len(micro_batches)
        noise = self._noise(ctx, False) if noisy_rank else ([], [])
        losses = []
        for i, batch in enumerate(micro_batches):
            with perturbed(*noise, (ctx.seed, ctx.step, ctx.rank, i), self.buffers) if noisy_rank else nullcontext():
                losses.append(ctx.accumulate(batch, weight, last=i == len(micro_batches) - 1))
        return {"loss": torch.stack(losses).float().mean(), "noisy_rank": float(noisy_rank)}

