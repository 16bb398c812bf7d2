"""The process group and its collectives: set-up and shutdown, rank, world size, barrier,
all-reduce, broadcast, gather. Every helper is a no-op (or the identity) in a single process.

One process without a launcher gets the environment DeepSpeed needs (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT; otherwise it tries MPI discovery). Under `deepspeed`
or `torchrun` these come from the launcher. CPU runs use gloo, CUDA runs nccl.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from cl_flat import host_memory


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _grouped() -> bool:
    """Whether this process is one of several in a process group."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def init_distributed(timeout_minutes: float | None = None) -> None:
    """Start (once) the process group DeepSpeed uses; a lone process becomes rank 0 of 1.
    `timeout_minutes`: how long a collective may wait for the other ranks before it fails (a
    dead rank then ends the run instead of hanging it; `deepspeed.timeout_minutes`). Also sets the
    process's host heap policy (`host_memory`)."""
    host_memory.keep_freed_heap()  # every process that computes starts here
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    if torch_dist.is_available() and torch_dist.is_initialized():
        return
    _skip_shm_op()
    lone = "RANK" not in os.environ
    if lone:
        os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"})
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    timeout = {} if timeout_minutes is None else {"timeout": timedelta(minutes=timeout_minutes)}
    for attempt in range(5):
        if lone:  # a free port can be taken by another process before the store binds it: draw again
            os.environ["MASTER_PORT"] = str(_free_port())
        try:
            deepspeed.init_distributed(dist_backend=backend, verbose=False, **timeout)
            return
        except (RuntimeError, torch_dist.DistError) as exc:
            if not (lone and "address already in use" in str(exc).lower()) or attempt == 4:
                raise


def _skip_shm_op() -> None:
    """Keep DeepSpeed from JIT-building (or loading) its CPU shared-memory op `deepspeed_shm_comm`.

    Why: DeepSpeed's TorchBackend builds it at init on every CPU run, only for `inference_all_reduce`,
    which no cl-flat code calls (our collectives go through torch.distributed). The build takes minutes
    on first use, and a process killed during it leaves $TORCH_EXTENSIONS_DIR/.../deepspeed_shm_comm/lock
    behind, on which every later run waited forever. DeepSpeed builds the op only if
    `deepspeed.ops.__compatible_ops__` marks it compatible; that dict is cached and meant to be edited."""
    if torch.cuda.is_available():
        return  # the CUDA accelerator has no such op
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def shutdown() -> None:
    """Leave the process group cleanly (an abrupt exit of a gloo group occasionally aborts)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def rank() -> int:
    return torch_dist.get_rank() if torch_dist.is_available() and torch_dist.is_initialized() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1


def is_main() -> bool:
    """Rank 0: the only rank that writes files."""
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    if _grouped():
        torch_dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place; returns it."""
    if _grouped():
        torch_dist.all_reduce(tensor)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    if not _grouped():
        return [value]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not _grouped():
        return value
    box = [value]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]
