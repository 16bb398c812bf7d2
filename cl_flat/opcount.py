"""What an update asks of the device, counted on any device (a CPU included): aten operations (on a GPU each is
one kernel launch or more) and host synchronisations (on a GPU each waits for the device to drain its queue).

`DeviceWork` is a `TorchDispatchMode`: it sees every aten operation below autograd (forward, backward, the
optimizer) wherever it comes from (the tool, DeepSpeed, transformers, peft, torch), and counts those that run
a kernel on a GPU (views, aliases, `detach` and bare allocations do not). Not seen: work outside aten, such as
the compiled CPU noise kernel (`flatness.noise.keyed_normal`; on CUDA a draw is two or three aten ops).
Counted as a host sync:
`aten._local_scalar_dense` (behind `.item()`, `float(t)`, `int(t)`, `bool(t)`, `if t:`), `aten.is_nonzero`,
`aten.equal`, and, seen at the Python level because on a CPU they do not dispatch, `Tensor.tolist`,
`Tensor.numpy`, `Tensor.cpu` and `torch.cuda.synchronize`.

`host` tensors are left out: tensors that live on the host on a GPU too, such as torch's optimizer step
counters (`capturable=False`, the default of the foreach path: a CPU scalar read with `.item()`, no device
work). Every operation whose tensors are all host tensors is skipped, so the counts are what a GPU would see.
Counts are kept per phase (`phase(name)`), e.g. the optimizer step apart from the passes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = ("_local_scalar_dense", "is_nonzero", "equal")
# no kernel on a GPU: metadata only (views and aliases are recognised by their schema), or an allocation
_NO_KERNEL = ("detach", "_unsafe_view", "lift_fresh", "promote_types", "empty", "empty_like", "empty_strided",
              "new_empty", "new_empty_strided", "result_type")
_PY_SYNCS = ("tolist", "numpy", "cpu")


def _pointer(t: torch.Tensor) -> int | None:
    try:
        return t.data_ptr()
    except RuntimeError:  # no storage (meta, some wrapper tensors)
        return None


def optimizer_host_tensors(optimizer) -> list[torch.Tensor]:
    """The step counters of a torch optimizer that stay on the host (a CPU tensor beside CUDA parameters:
    `capturable=False` and not fused); on a CPU they are every step counter. `optimizer` may be a wrapper
    (DeepSpeed's ZeRO optimizers): the torch optimizer is its `.optimizer`."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        return []
    found = []
    for group in optimizer.param_groups:
        if group.get("fused") or group.get("capturable"):
            continue  # then the counters live beside the parameters, on the device
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                found.append(step)
    return found


class DeviceWork(TorchDispatchMode):
    """Counts aten operations and host syncs per phase while active (see the module docstring)."""

    def __init__(self, host: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.host = {p for p in (_pointer(t) for t in host) if p is not None}
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.current = "update"
        self._saved: dict[str, Any] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    def _on_host(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and bool(self.host) and all(_pointer(t) in self.host for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        counted = func.namespace == "aten" and not func.is_view and name not in _NO_KERNEL
        if counted and not self._on_host([t for t in pytree.tree_leaves((args, kwargs or {}))
                                          if isinstance(t, torch.Tensor)]):
            self.ops[self.current] += 1
            if name in _SYNC_OPS:
                self.syncs[self.current] += 1
        return func(*args, **(kwargs or {}))

    def _counting(self, original):
        def wrapper(tensor, *args, **kwargs):
            if not self._on_host([tensor]):
                self.syncs[self.current] += 1
            return original(tensor, *args, **kwargs)
        return wrapper

    def __enter__(self):
        for name in _PY_SYNCS:
            self._saved[name] = getattr(torch.Tensor, name)
            setattr(torch.Tensor, name, self._counting(self._saved[name]))
        self._saved["synchronize"] = torch.cuda.synchronize

        def synchronize(*args, **kwargs):
            self.syncs[self.current] += 1
            return self._saved["synchronize"](*args, **kwargs)

        torch.cuda.synchronize = synchronize
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for name in _PY_SYNCS:
                setattr(torch.Tensor, name, self._saved[name])
            torch.cuda.synchronize = self._saved["synchronize"]

    def total(self) -> tuple[int, int]:
        """(aten ops, host syncs) over all phases."""
        return sum(self.ops.values()), sum(self.syncs.values())
