"""Test helpers (not tests): subprocess runners with a quiet, offline, single-thread environment,
and small task files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
