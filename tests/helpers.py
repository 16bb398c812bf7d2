"""Test helpers (not tests): the one `cl-flat` runner in a subprocess (a quiet, offline, single-thread
environment), the one check of a refused command, small task files, and what a wandb grid agent does
with a sweep file."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OLORA_BENCHMARK = ROOT / "tests" / "fixtures" / "olora" / "CL_Benchmark"  # O-LoRA's source files, small


def quiet_env() -> dict[str, str]:
    # without the process-group variables an in-process test's init_distributed left behind:
    # a child would join (or bind) the parent's store instead of starting its own
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update({"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"})
    return env


def run_cli(args: list[str], cwd: Path, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`cl-flat ARGS` in one process, or under torchrun with `nproc` processes."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "cl_flat.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "cl_flat.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=quiet_env(), capture_output=True, text=True, timeout=timeout)


def assert_clean_failure(result: subprocess.CompletedProcess, *needles: str, code: int | None = None,
                         max_lines: int | None = None) -> None:
    """A refused command: a non-zero exit (`code` when given), no traceback, exactly one `error: ` line
    on stderr (at most `max_lines` lines in all, when given), and every needle in stderr."""
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    if code is not None:
        assert result.returncode == code, (result.returncode, output)
    assert "Traceback" not in output, output
    lines = result.stderr.strip().splitlines()
    assert sum(line.startswith("error: ") for line in lines) == 1, result.stderr
    if max_lines is not None:
        assert len(lines) <= max_lines, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


def listing(folder: Path) -> dict[str, int]:
    """Every path under `folder` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


@contextmanager
def unchanged(folder: Path) -> Iterator[None]:
    """Asserts that the block creates, deletes and touches nothing under `folder`."""
    before = listing(folder)
    yield
    after = listing(folder)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_jsonl_task(folder: Path, name: str, labels: list[str], n_train: int = 32, n_test: int = 12) -> dict:
    """A small two-label jsonl task whose label is visible in the input (learnable)."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        with (folder / f"{name}_{split}.jsonl").open("w") as handle:
            for i in range(n):
                label = labels[i % len(labels)]
                handle.write(json.dumps({"input": f"{label} sample {i} of {split}", "output": label}) + "\n")
    return {"name": name, "source": "jsonl", "train": str(folder / f"{name}_train.jsonl"),
            "test": str(folder / f"{name}_test.jsonl"), "labels": labels}


def grid_points(sweep: dict) -> list[dict]:
    """Every run of a wandb grid sweep: {parameter: value}, the product of the parameters' `values`
    (a `value` is constant)."""
    parameters = sweep["parameters"]
    names = sorted(parameters)
    choices = [parameters[n]["values"] if "values" in parameters[n] else [parameters[n]["value"]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def agent_command(command: list[str], parameters: dict, form: str = "args") -> list[str]:
    """The command line a wandb agent runs for `parameters` (as in wandb's Agent._command_run: each element
    "${macro}" becomes that macro's argument list). `form` replaces the sweep's ${args} by another macro, or
    ("set") by `--set k=v` pairs."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in parameters.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"],
               "set": [part for text in macros["args_no_hyphens"] for part in ("--set", text)]}
    line: list[str] = []
    for part in command:
        part = str(part)
        if part == "${args}":
            part = "${" + form + "}"
        line += macros.get(part[2:-1]) or [] if part.startswith("${") and part.endswith("}") else [part]
    return line


def write_yaml(path: Path, document: dict) -> Path:
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def olora_stack(lambda_orth: float = 0.5, lambda_l2: float = 0.0):
    """A tiny-random llama with O-LoRA adapters "one" and "two" (seed 5): (stack, the penalty while
    training "one", the penalty while training "two")."""
    from cl_flat.adapters import AdapterStack
    from cl_flat.config import LoraSection
    from cl_flat.models import load_model
    from cl_flat.strategies.olora import OrthogonalPenalty

    model, _ = load_model("tiny-random:llama", seed=5)
    stack = AdapterStack(model, LoraSection(strategy="olora", r=4, target_modules=["q_proj", "v_proj"],
                                            lambda_orth=lambda_orth, lambda_l2=lambda_l2), seed=5)
    stack.add_task(0, "one")
    first = OrthogonalPenalty.of(stack.model, "one", [], lambda_orth, lambda_l2)
    stack.add_task(1, "two")
    return stack, first, OrthogonalPenalty.of(stack.model, "two", ["one"], lambda_orth, lambda_l2)


def tiny_bench_config(folder: Path) -> Path:
    """bench.yaml in `folder`: one builtin task on tiny-random:llama, micro-batch 2 of 16 tokens."""
    config = {"run": {"name": "bt", "seed": 0}, "model": {"name_or_path": "tiny-random:llama"},
              "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
              "tasks": [{"name": "food_sentiment", "source": "builtin"}],
              "training": {"micro_batch_size": 2, "max_seq_length": 16}, "logging": {"progress": False}}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sentencepiece_tokenizer(sentences: list[str], vocab_size: int = 200, split_words: bool = True):
    """A Llama-2-style SentencePiece BPE tokenizer trained offline on `sentences`: spaces become
    "▁", a "▁" is prepended, words split before each "▁" (unless not `split_words`: then pieces
    may span words), a BOS is added. Like Llama-2's, it tokenises " positive" alone as a lone "▁"
    then "▁positive"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if split_words:
        core.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.train_from_iterator(sentences, trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=["▁"],
                                                            special_tokens=["<unk>", "<s>", "</s>"]))
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")


def lm_loss(model, batch):
    """The causal-LM loss of a token batch on itself (the unit tests' `loss_fn`)."""
    return model(input_ids=batch, labels=batch).loss


def tiny_peft_model(name: str = "tiny-random:llama", seed: int = 5):
    """A tiny random model (`name`, `seed`) with one trainable LoRA adapter "t" whose B is non-zero (at
    B = 0 every A-gradient would be zero)."""
    import torch

    from cl_flat.adapters import AdapterStack
    from cl_flat.config import LoraSection
    from cl_flat.models import load_model

    model, _ = load_model(name, seed=seed)
    stack = AdapterStack(model, LoraSection(r=4, target_modules=["q_proj", "v_proj"]), seed=seed)
    stack.add_task(0, "t")
    with torch.no_grad():
        for name, p in stack.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.05)
    return stack.model


def one_task_config(folder: Path, name: str, r: int = 2, n_train: int = 4, n_test: int = 4) -> Path:
    """config.yaml in `folder`: one small jsonl task on tiny-random:llama, one update of 2 examples, the
    run `name` under folder/results."""
    raw = {"run": {"name": name, "output_dir": str(folder / "results"), "seed": 1},
           "model": {"name_or_path": "tiny-random:llama"},
           "lora": {"r": r, "target_modules": ["q_proj"]},
           "tasks": [write_jsonl_task(folder / "data", "t1", ["yes", "no"], n_train, n_test)],
           "training": {"micro_batch_size": 2, "max_steps": 1},
           "evaluation": {"max_samples_per_task": 4, "batch_size": 4},
           "logging": {"progress": False, "wandb": {"mode": "disabled"}}}
    return write_yaml(folder / "config.yaml", raw)


class Quadratic(nn.Module):
    """L(w; h) = ½ Σ_j h_j w_j², so ∇L = h ⊙ w and the Hessian is diag(h): methods' updates by hand."""

    def __init__(self, w: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=torch.float64))


def quad_loss(model: Quadratic, h):
    return 0.5 * (h * model.w * model.w).sum()


def greedy_by_hand(model, tokenizer, prompt: list[int], steps: int) -> str:
    """Greedy decoding, one unpadded example: the argmax next token until EOS or `steps` tokens."""
    from cl_flat.family import SEQ2SEQ, family_of

    seq2seq = family_of(model) == SEQ2SEQ
    out = [tokenizer.pad_token_id] if seq2seq else list(prompt)
    start = len(out)
    with torch.no_grad():
        for _ in range(steps):
            if seq2seq:
                logits = model(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([out])).logits
            else:
                logits = model(input_ids=torch.tensor([out])).logits
            out.append(int(logits[0, -1].argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(out[start:], skip_special_tokens=True)
