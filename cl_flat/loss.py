"""The training loss: mean cross-entropy over the target tokens of a micro-batch.

    L = (1/|T|) Σ_{t∈T} (logsumexp(z_t) − z_t[y_t]),   z_t = W h_t,

W the output head and T the positions whose y_t is not `IGNORE` (-100). Causal LMs: h_t the final hidden
state at position t, y_t the label of position t + 1 (transformers' causal-LM loss). Encoder-decoder
LMs (T5 family): h_t the decoder's final hidden state at position t (times d_model^-0.5 where T5
ties the head to the embedding, `scale_decoder_outputs`), y_t the label of position t itself
(transformers' seq2seq loss). Either way `model(**batch).loss`.

Where the logits are the plain head product (`FUSED_HEAD_MODEL_TYPES`, `FUSED_SEQ2SEQ_MODEL_TYPES`; a
frozen bias-free head), head and loss are fused (`LinearCrossEntropy`): tokens pass in chunks of
about `CHUNK_BYTES` of fp32 logits, and each chunk's gradient dL/dh_t = (softmax(z_t) − e_{y_t})ᵀW/|T|
is formed at once, so the [tokens × vocab] logits, their log-softmax and their gradients never
exist (same flops, a lower peak memory; measured in results/README.md). Other models (and a head
that is trained or carries LoRA) use `model(**batch).loss` as is. A micro-batch without targets has
L = 0 and no gradient (transformers gives NaN).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

IGNORE = -100  # the label of a position without a loss (prompt, padding): transformers' ignore_index
CHUNK_BYTES = 32 * 2**20
# logits = lm_head(final hidden state), nothing else (no soft-capping, no logit scale)
FUSED_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
# encoder-decoder: logits = lm_head(decoder output [× d_model^-0.5 when scale_decoder_outputs])
FUSED_SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5"})


class LinearCrossEntropy(torch.autograd.Function):
    """Σ_{t∈T} CE(W h_t, y_t) / |T| for h [tokens, d], W [vocab, d] frozen, y [tokens] (IGNORE = not a target).
    Forward also forms dL/dh chunk by chunk (when h needs a gradient); backward only scales it."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels != IGNORE
        count = targets.sum().clamp_min(1).to(torch.float32)
        want_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        rows = max(1, CHUNK_BYTES // (4 * weight.shape[0]))
        for start in range(0, hidden.shape[0], rows):
            h, mask = hidden[start:start + rows], targets[start:start + rows]
            y = labels[start:start + rows].clamp_min(0).unsqueeze(1)
            logits = (h @ weight.t()).float()  # as transformers: head in the model's dtype, loss in fp32
            lse = torch.logsumexp(logits, dim=1, keepdim=True)
            total += ((lse - logits.gather(1, y)).squeeze(1) * mask).sum()
            if want_grad:
                probs = logits.sub_(lse).exp_()  # softmax, in place of the logits
                probs.scatter_add_(1, y, -mask.to(probs.dtype).unsqueeze(1)).mul_(mask.unsqueeze(1))
                torch.matmul(probs.to(hidden.dtype), weight, out=grad_hidden[start:start + rows])
        if want_grad:
            ctx.save_for_backward(grad_hidden, count)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, count = ctx.saved_tensors
        return grad_hidden * (grad_loss / count).to(grad_hidden.dtype), None, None


def _frozen_plain_head(lm: nn.Module) -> nn.Linear | None:
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None or head.weight.requires_grad:
        return None
    return head


def fused_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder body, output head) of a causal LM whose loss can be fused, else None."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    head = _frozen_plain_head(lm)
    if getattr(lm.config, "model_type", None) not in FUSED_HEAD_MODEL_TYPES or head is None:
        return None
    body = getattr(lm, lm.base_model_prefix, None)
    return None if body is None else (body, head)


def fused_seq2seq_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(T5-family model, output head) of an encoder-decoder LM whose loss can be fused, else None."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = _frozen_plain_head(lm)
    if getattr(lm.config, "model_type", None) not in FUSED_SEQ2SEQ_MODEL_TYPES or head is None:
        return None
    return lm, head


def _seq2seq_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    parts = fused_seq2seq_head(model)
    if parts is None:
        return model(**batch).loss
    lm, head = parts
    encoded = lm.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    hidden = lm.decoder(input_ids=batch["decoder_input_ids"], encoder_hidden_states=encoded,
                        encoder_attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    if getattr(lm.config, "scale_decoder_outputs", False):
        hidden = hidden * (lm.config.d_model ** -0.5)
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, batch["labels"].reshape(-1))


def target_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the target tokens of the micro-batch, either family (see the module
    docstring); an encoder-decoder batch is recognised by its `decoder_input_ids`."""
    if "decoder_input_ids" in batch:
        return _seq2seq_loss(model, batch)
    parts = fused_head(model)
    if parts is None:
        return model(**batch).loss
    body, head = parts
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    hidden = body(**inputs, use_cache=False).last_hidden_state
    labels = F.pad(batch["labels"], (0, 1), value=IGNORE)[:, 1:]  # position t predicts token t + 1
    return LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), head.weight, labels.reshape(-1))


def _mean_ce(logits: torch.Tensor, labels: torch.Tensor, shift: bool = True) -> torch.Tensor:
    """Mean CE over the targets of [rows, T, V] logits (fp32, as transformers; 0 without targets); `shift`:
    position t predicts label t + 1 (causal), else label t (encoder-decoder)."""
    shifted = (F.pad(labels, (0, 1), value=IGNORE)[:, 1:] if shift else labels).reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted, ignore_index=IGNORE, reduction="sum")
    return total / (shifted != IGNORE).sum().clamp_min(1)


def target_split_losses(model: nn.Module, batch: dict[str, torch.Tensor],
                           split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L(batch[:split]), L(batch[split:])) from ONE forward over the whole micro-batch, each the
    mean cross-entropy over its own rows' target tokens (the module docstring's L on each half)."""
    inputs: dict[str, Any] = {k: v for k, v in batch.items() if k != "labels"}
    labels = batch["labels"]
    if "decoder_input_ids" in batch:  # encoder-decoder: the model's logits (scaled as its own loss does)
        logits = model(**inputs).logits
        return (_mean_ce(logits[:split], labels[:split], shift=False),
                _mean_ce(logits[split:], labels[split:], shift=False))
    parts = fused_head(model)
    if parts is None:
        logits = model(**inputs).logits
        return _mean_ce(logits[:split], labels[:split]), _mean_ce(logits[split:], labels[split:])
    body, head = parts
    hidden = body(**inputs, use_cache=False).last_hidden_state
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    d = hidden.shape[-1]
    return tuple(LinearCrossEntropy.apply(hidden[rows].reshape(-1, d), head.weight, shifted[rows].reshape(-1))
                 for rows in (slice(None, split), slice(split, None)))
