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
    env = dict(os.environ)
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
