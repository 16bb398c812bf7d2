"""Model families: what differs between a decoder-only LM (`causal`) and an encoder-decoder LM
(`seq2seq`, the T5 family: t5, flan-t5, mt5). Everything else (adapters, flatness methods, noise on
frozen linear layers, DeepSpeed) is shared.

- input: causal, one sequence (prompt tokens + target tokens); seq2seq, the encoder reads the prompt
  tokens and the decoder the target.
- target tokens: causal, those of `prompt + " " + target` after the prompt's (in context), + EOS;
  seq2seq, `target` tokenised alone (no special tokens), + EOS.
- loss: causal, L = (1/|T|) Σ_{t∈T} −log p(x_{t+1} | x_≤t) over the target positions T; seq2seq,
  L = (1/n) Σ_t −log p(y_t | prompt, y_<t) over the n target tokens.
- rank classification: causal, the mean log p(label tokens | prompt); seq2seq, the mean
  log p(label tokens + EOS | prompt) through the decoder.
- exact match: causal, the greedy continuation after the prompt; seq2seq, the greedy decoder output.
- LoRA targets by default: causal `q_proj`, `v_proj`; seq2seq (T5) `q`, `v`.

The decoder's input is the target shifted right behind its start token, which is the pad token in
the T5 family (`decoder_start_token_id == pad_token_id`, checked by `check_supported`). The family
is read from the model config (`is_encoder_decoder`); `models.load_model` also marks the tokenizer
with it (`mark_tokenizer`), so tokenising examples needs only the tokenizer.
"""

from __future__ import annotations

from typing import Literal

from cl_flat.errors import UserError

Family = Literal["causal", "seq2seq"]
CAUSAL: Family = "causal"
SEQ2SEQ: Family = "seq2seq"
SEQ2SEQ_MODEL_TYPES = frozenset({"t5", "mt5"})
CAUSAL_DEFAULT_TARGETS = ("q_proj", "v_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {CAUSAL: CAUSAL_DEFAULT_TARGETS, SEQ2SEQ: ("q", "v")}
_TOKENIZER_MARK = "cl_flat_family"


def config_family(config) -> Family:
    """`seq2seq` for an encoder-decoder model config (`is_encoder_decoder`), else `causal`."""
    return SEQ2SEQ if getattr(config, "is_encoder_decoder", False) else CAUSAL


def family_of(model) -> Family:
    """The family of a model, a peft wrapper around one or a DeepSpeed engine's module."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return config_family(getattr(lm, "config", None))


def check_supported(config) -> None:
    """Refuse encoder-decoder models outside the T5 family, and a decoder start other than the pad
    token (the batches shift targets right behind the pad token)."""
    if config_family(config) != SEQ2SEQ:
        return
    kind = getattr(config, "model_type", None)
    if kind not in SEQ2SEQ_MODEL_TYPES:
        raise UserError(f"model.name_or_path: encoder-decoder model type {kind!r} is not supported; "
                        f"supported: {sorted(SEQ2SEQ_MODEL_TYPES)} (and causal LMs)")
    start, pad = getattr(config, "decoder_start_token_id", None), getattr(config, "pad_token_id", None)
    if start != pad:
        raise UserError(f"model.name_or_path: decoder_start_token_id {start} differs from pad_token_id {pad}; "
                        "the T5 family starts the decoder at the pad token")


def lora_targets(targets: list[str] | tuple[str, ...], family: Family) -> list[str]:
    """The LoRA target module names for `family`: the list as configured, except that the causal
    default (`q_proj`, `v_proj`, the config's default) becomes the family's default (`q`, `v` for T5)."""
    if tuple(targets) == CAUSAL_DEFAULT_TARGETS:
        return list(DEFAULT_TARGETS[family])
    return list(targets)


def mark_tokenizer(tokenizer, family: Family) -> None:
    setattr(tokenizer, _TOKENIZER_MARK, family)


def tokenizer_family(tokenizer) -> Family:
    """The family `mark_tokenizer` recorded (`causal` for a tokenizer never marked)."""
    return getattr(tokenizer, _TOKENIZER_MARK, CAUSAL)
