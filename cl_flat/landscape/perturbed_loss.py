"""The model side of landscapes and sharpness: which weights move, and the loss at θ + ε.

**Which weights move.** A perturbation ε lives in one of two spaces; everything else is fixed.
- `adapter`: the A (r × n_in) and B (n_out × r) matrices of ONE adapter (the task's own
  adapter for IncLoRA, the shared `seqlora` adapter for SeqLoRA) in every adapted layer. The
  base model and the other adapters of the stack do not move. Rows of A and rows of B are
  normalised to their own rows. (A B that is still 0 gets no perturbation; only A moves then.)
- `merged`: the merged weight W' = W0 + Σ_k s_k B_k A_k (k over the active adapters of the
  stack) of every adapted layer, as Flat-LoRA draws its noise. Direction rows are normalised to
  ‖W'_i‖ (`cl_flat.lora_layers.merged_row_norms`). The perturbation is applied to W0 inside the
  forward pass (W0 + ε, the adapters on top unchanged), which is exactly W' + ε.
Biases, norm weights, embeddings and non-adapted layers never move. ε is laid out [out, in]
(rows are output channels), also for a GPT-2 Conv1D base weight stored [in, out].

**Nothing is written.** Perturbed weights are handed to `torch.func.functional_call` as new
tensors (value + ε); the model's parameters, their `requires_grad` flags and `.grad` fields are
untouched (gradients for the ascent come from `torch.autograd.grad` w.r.t. ε only), and the
train/eval mode is restored. A live (DeepSpeed-trained) model is left bit for bit as it was.

**Loss.** Mean target-token cross-entropy (the training loss: label tokens + EOS, prompt and
padding ignored), token-weighted over a fixed held-out sample: split `test` (default) or
`train`, capped by `evaluation.landscape_samples()` unless `max_samples` says otherwise, with the
same fixed permutation as the accuracy evaluation (`cl_flat.evaluate.eval_indices`), encoded
once, batched by `evaluation.batch_size`, collated once and reused at every grid point. Logits
are computed only at target positions when the model supports `logits_to_keep`. Sharded over
ranks (each rank sums its slice; sums all-reduced), so every rank gets the same value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cl_flat import dist
from cl_flat.config import EvaluationSection
from cl_flat.data.batches import Encoded, collate, encode_examples
from cl_flat.errors import UserError
from cl_flat.evaluate import eval_indices
from cl_flat.landscape.geometry import Params
from cl_flat.lora_layers import lora_layers, merged_row_norms, row_norms, stored_transposed
from cl_flat.loss import IGNORE

Space = Literal["adapter", "merged"]
Split = Literal["test", "train"]


@dataclass
class Moved:
    """One tensor that a space perturbs. ε is laid out (out, in) = rows are output channels;
    `transposed` when the parameter itself is stored (in, out) (GPT-2's Conv1D)."""
    name: str                    # parameter name in model.named_parameters() (the override target)
    value: torch.Tensor          # the parameter (detached view; never written)
    norms: torch.Tensor | None   # ‖W_i‖ per output row of the normalisation reference
    transposed: bool = False

    @property
    def shape(self) -> torch.Size:
        return self.value.T.shape if self.transposed else self.value.shape


def unwrap_engine(model: nn.Module) -> nn.Module:
    """The trained module inside a DeepSpeed engine (a probe pass must not go through engine hooks)."""
    return model.module if type(model).__name__ == "DeepSpeedEngine" else model


def moved_weights(model: nn.Module, space: Space, adapter: str) -> list[Moved]:
    """The tensors `space` perturbs (see the module docstring), sorted by name."""
    model = unwrap_engine(model)
    params = dict(model.named_parameters())
    moved: list[Moved] = []
    with torch.no_grad():
        for name, layer in lora_layers(model):
            if space == "adapter":
                if adapter not in layer.lora_A:
                    continue
                for part in ("lora_A", "lora_B"):
                    pname = f"{name}.{part}.{adapter}.weight"
                    moved.append(Moved(pname, params[pname].detach(), row_norms(params[pname])))
            else:
                pname = f"{name}.base_layer.weight"
                moved.append(Moved(pname, params[pname].detach(), merged_row_norms(layer),
                                   stored_transposed(layer.base_layer)))
    if not moved:
        raise UserError(f"space {space!r}: no weights to perturb (adapter {adapter!r} not found in any LoRA layer)")
    return sorted(moved, key=lambda m: m.name)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


def held_out_batches(task, tokenizer, evaluation: EvaluationSection, *, max_length: int, seed: int,
                     split: Split = "test", max_samples: int | None = None, device: torch.device | str = "cpu",
                     rank: int | None = None, world: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The fixed held-out sample of `task` (this rank's share; cap: `max_samples`, default
    `evaluation.landscape_samples()`; `seed` the run seed), encoded as for training (prompt +
    target + EOS, `max_length` = training.max_seq_length), sorted by length, batched by
    evaluation.batch_size and collated once. `keep` marks the positions whose next token is a
    target (encoder-decoder: the decoder positions of target tokens); `targets` lists those tokens."""
    examples = task.test if split == "test" else task.train
    if not examples:
        raise UserError(f"task {task.name!r} has no {split} examples")
    cap = evaluation.landscape_samples() if max_samples is None else max_samples
    indices = eval_indices(len(examples), cap, seed, task.name)
    rank = dist.rank() if rank is None else rank
    world = dist.world_size() if world is None else world
    mine = indices[rank::world]
    encoded: list[Encoded] = encode_examples(task, tokenizer, [examples[i] for i in mine], max_length)
    encoded.sort(key=lambda e: len(e.input_ids))
    size = evaluation.batch_size
    batches = []
    for start in range(0, len(encoded), size):
        batch = collate(encoded[start:start + size], tokenizer.pad_token_id)
        if "decoder_input_ids" in batch:  # encoder-decoder: decoder position t predicts label t
            batch["keep"] = batch["labels"] != IGNORE
            batch["targets"] = batch["labels"][batch["keep"]]
        else:
            keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
            keep[:, :-1] = batch["labels"][:, 1:] != IGNORE
            batch["keep"] = keep
            batch["targets"] = batch["labels"][:, 1:][keep[:, :-1]]
        batches.append({k: v.to(device) for k, v in batch.items()})
    return batches


class PerturbedLoss:
    """Mean target-token cross-entropy of `model` at θ + ε on fixed batches, ε applied
    functionally to the `moved` tensors (nothing written). Callable: ε (or None) -> float."""

    def __init__(self, model: nn.Module, batches: list[dict[str, torch.Tensor]], moved: list[Moved]):
        self.model = unwrap_engine(model)
        self.batches = batches
        self.moved = {m.name: m for m in moved}
        self.keep_logits = _accepts_logits_to_keep(self.model)
        count = torch.tensor(float(sum(int(b["targets"].numel()) for b in batches)), dtype=torch.float64)
        self.tokens = float(dist.all_reduce_sum(count.to(self._device())).item())
        if self.tokens == 0:
            raise UserError("the held-out sample has no target tokens")
        self.evaluations = 0  # passes over the sample: forward-only + forward+backward
        self.gradients = 0    # forward+backward passes (loss_and_grad)
        self.products = 0     # Hessian-vector products (`hessian`): one backward through the kept graph each

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _overrides(self, eps: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        if eps is None:
            return {}
        out = {}
        for name, delta in eps.items():
            m = self.moved[name]
            delta = delta.T if m.transposed else delta
            out[name] = (m.value.float() + delta).to(m.value.dtype)
        return out

    def _ce_sum(self, batch: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor]) -> torch.Tensor:
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "decoder_input_ids" in batch:
            kwargs["decoder_input_ids"] = batch["decoder_input_ids"]
            logits = torch.func.functional_call(self.model, overrides, args=(), kwargs=kwargs).logits
            return F.cross_entropy(logits[batch["keep"]].float(), batch["targets"], reduction="sum")
        if self.keep_logits:
            kwargs["logits_to_keep"] = batch["keep"]
        logits = torch.func.functional_call(self.model, overrides, args=(), kwargs=kwargs).logits
        if self.keep_logits:
            logits = logits.reshape(-1, logits.shape[-1])
        else:
            logits = logits[:, :-1][batch["keep"][:, :-1]]
        return F.cross_entropy(logits.float(), batch["targets"], reduction="sum")

    @contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def __call__(self, eps: Mapping[str, torch.Tensor] | None = None) -> float:
        with torch.no_grad(), self._eval_mode():
            overrides = self._overrides(eps)
            total = torch.zeros((), dtype=torch.float64, device=self._device())
            for batch in self.batches:
                total += self._ce_sum(batch, overrides).double()
        self.evaluations += 1
        return float(dist.all_reduce_sum(total).item()) / self.tokens

    def loss_and_grad(self, eps: Mapping[str, torch.Tensor]) -> tuple[float, Params]:
        """Loss at θ+ε and its gradient w.r.t. ε (torch.autograd.grad: no .grad is touched)."""
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in eps.items()}
        names = sorted(leaves)
        grads = [torch.zeros_like(leaves[k]) for k in names]
        total = torch.zeros((), dtype=torch.float64, device=self._device())
        with torch.enable_grad(), self._eval_mode():
            for batch in self.batches:
                value = self._ce_sum(batch, self._overrides(leaves))
                parts = torch.autograd.grad(value, [leaves[k] for k in names], allow_unused=True)
                for acc, part in zip(grads, parts):
                    if part is not None:
                        acc += part
                total += value.detach().double()
        flat = dist.all_reduce_sum(torch.cat([g.flatten() for g in grads]))
        total = dist.all_reduce_sum(total)
        self.evaluations += 1
        self.gradients += 1
        out, offset = {}, 0
        for k, g in zip(names, grads):
            out[k] = flat[offset:offset + g.numel()].view_as(g) / self.tokens
            offset += g.numel()
        return float(total.item()) / self.tokens, out

    @contextmanager
    def hessian(self) -> Iterator[Callable[[Mapping[str, torch.Tensor]], Params]]:
        """A function v -> Hv, H = ∇²_ε L(θ+ε) at ε = 0: the Hessian of the held-out loss w.r.t. the moved
        weights (laid out like ε), exact, by double backward (Pearlmutter 1994): Hv = ∇_ε ⟨∇_ε L, v⟩. On
        entry one forward and one backward with create_graph per batch build ∇_ε L and its graph, kept
        until exit (memory: the double-backward graph of the whole held-out sample); each Hv is then one
        backward through it, summed over the batches and all-reduced, so every rank gets the same Hv (a
        collective: every rank calls it with the same v). Attention runs torch's math kernel here: the
        fused SDPA kernels have no second derivative."""
        names = sorted(self.moved)
        device = self._device()
        leaves = [torch.zeros(tuple(self.moved[k].shape), dtype=torch.float32, device=device).requires_grad_(True)
                  for k in names]
        with torch.enable_grad(), self._eval_mode(), sdpa_kernel([SDPBackend.MATH]):
            graphs = []  # per batch: (index of the leaf, its gradient) where the gradient still depends on ε
            for batch in self.batches:
                value = self._ce_sum(batch, self._overrides(dict(zip(names, leaves))))
                grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
                graphs.append([(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad])

            def hvp(v: Mapping[str, torch.Tensor]) -> Params:
                out = [torch.zeros_like(leaf) for leaf in leaves]
                for pairs in graphs:
                    if not pairs:  # the loss is linear in ε on this batch (e.g. every B and A still 0)
                        continue
                    parts = torch.autograd.grad([g for _, g in pairs], leaves,
                                                grad_outputs=[v[names[i]].to(g) for i, g in pairs],
                                                retain_graph=True, allow_unused=True)
                    for acc, part in zip(out, parts):
                        if part is not None:
                            acc += part
                flat = dist.all_reduce_sum(torch.cat([t.flatten() for t in out]))
                self.products += 1
                result, offset = {}, 0
                for k, t in zip(names, out):
                    result[k] = flat[offset:offset + t.numel()].view_as(t) / self.tokens
                    offset += t.numel()
                return result

            yield hvp
