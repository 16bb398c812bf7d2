"""Every seed recipe of the tool, in one place. No recipe touches torch's or Python's global RNG
(each draw gets its own generator, seeded from the run seed and a key), except `seed_dropout`:
dropout layers draw from the global generator, so it is re-seeded before every update.

Key namespace of `derive_seed(run_seed, namespace, ...)` (sha256 of the '/'-joined parts):
- `"data", task_index, epoch`: the order of a task's training examples in one epoch;
- `"method", task_index`: the seed a flatness method keys its noise with (see `noise_key`);
- `"eval", task_name`: the fixed test sample of a task (accuracy and landscape alike);
- `"train-subset", task_name`: the fixed subset kept by `max_train_samples`;
- `"replay", task_name`: the training examples of a task replayed in later tasks (`replay`);
- `"landscape", task_name, space`: the directions of a loss landscape;
- `"sharpness", task_name, space`: the random directions of the sharpness estimate;
- `"hessian", task_name, space`: the power iteration's start and the Hutchinson probes;
- `"dropout", task_index, update`: torch's global generator before update `update` (`seed_dropout`).
`noise_key(method_seed, update, rank, micro_batch, tensor_name)` (blake2b) keys one tensor's noise
in one pass. `adapter_init_seed(run_seed, task_index)` seeds a new adapter's A. `builtin_key(...)`
keys the builtin benchmark's generator and its train/test split of texts.

The outputs of these recipes are part of what a seed means: resume, the builtin benchmark and the
tests depend on them staying bit-identical.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (stable across processes and Python runs)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keyed_generator(*parts: Any, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device` seeded with `derive_seed(*parts)`."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def noise_key(*parts: Any) -> int:
    """A 63-bit noise key from any parts (stable across processes, devices and runs)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def adapter_init_seed(run_seed: int, task_index: int) -> int:
    """The seed of task `task_index`'s new adapter (its A), whatever ran before it."""
    return run_seed * 1_000_003 + task_index


def builtin_key(*parts: object) -> int:
    """A 64-bit integer from any parts, for the builtin benchmark's generators and split."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def seed_dropout(run_seed: int, task_index: int, update: int) -> None:
    """Seed torch's global generator (every device) for one update's dropout masks, so a rerun
    and a resumed task draw the same masks."""
    torch.manual_seed(derive_seed(run_seed, "dropout", task_index, update))


def deterministic_kernels() -> None:
    """Ask torch for deterministic kernels (`CL_FLAT_DETERMINISTIC=1`): bitwise-repeatable GPU runs
    at some speed cost; an op without a deterministic kernel then raises."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
