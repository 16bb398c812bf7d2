"""The adapter stack on a frozen base model: the peft plumbing the CL strategies (cl_flat.strategies) use.

Each task trains one named LoRA adapter on the target modules (which one is the strategy's choice:
a new one per task for IncLoRA, one shared by every task for SeqLoRA); every adapter of the stack
stays active in every forward pass, the earlier ones frozen. After every change the trainable set is
asserted to be exactly the current adapter (peft has had bugs flipping `requires_grad` of the wrong
adapter). A new adapter's A is drawn from a generator keyed by (seed, task index)
(`cl_flat.seeding.adapter_init_seed`), so a task's initial state never depends on RNG state left
over by earlier work.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from cl_flat.config import LoraSection
from cl_flat.family import CAUSAL, Family, family_of, lora_targets
from cl_flat.files import writing
from cl_flat.seeding import adapter_init_seed


def lora_config(section: LoraSection, family: Family = CAUSAL):
    """peft's LoraConfig of one adapter; target names as `cl_flat.family.lora_targets` resolves them."""
    from peft import LoraConfig

    return LoraConfig(r=section.r, lora_alpha=section.alpha, lora_dropout=section.dropout,
                      target_modules=lora_targets(section.target_modules, family), bias="none")


def adapter_parameters(model: nn.Module, adapter: str) -> dict[str, nn.Parameter]:
    """Parameters that belong to one adapter (peft names them `...lora_A.<adapter>.weight`)."""
    marker = f".{adapter}."
    return {n: p for n, p in model.named_parameters() if marker in n and ".lora_" in n}


def _init_adapter(model: nn.Module, adapter: str, seed: int) -> None:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (peft's kaiming-uniform default), B = 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(adapter_parameters(model, adapter).items()):
            if ".lora_A." in name:
                bound = 1.0 / math.sqrt(param.shape[1])
                param.copy_(torch.rand(param.shape, generator=generator, dtype=torch.float32) * 2 * bound - bound)
            else:
                param.zero_()


class AdapterStack:
    """Owns the peft model; adds one adapter per task and keeps the invariants."""

    def __init__(self, base: nn.Module, section: LoraSection, seed: int):
        self.base = base
        self.section = section
        self.seed = seed
        self.model = None  # PeftModel once the first adapter exists
        self.adapters: list[str] = []

    @property
    def current(self) -> str:
        return self.adapters[-1]

    def add_task(self, task_index: int, name: str) -> None:
        """Prepare training of task `task_index` (0-based) on the adapter `name`: a new one (initialised
        from the task index), or the existing one of that name made trainable again; everything else
        frozen."""
        from peft import get_peft_model

        if name in self.adapters:
            if name != self.current:
                raise ValueError(f"adapter {name!r} is not the stack's last ({self.adapters}): only that one may "
                                 "train again")
            self._activate()
            return
        adapter_seed = adapter_init_seed(self.seed, task_index)
        if self.model is None:
            for param in self.base.parameters():
                param.requires_grad_(False)
            self.model = get_peft_model(self.base, lora_config(self.section, family_of(self.base)), adapter_name=name)
        else:
            self.model.add_adapter(name, lora_config(self.section, family_of(self.base)))
        self.adapters.append(name)
        _init_adapter(self.model, name, adapter_seed)
        self._activate()

    def _activate(self) -> None:
        self.model.base_model.set_adapter(list(self.adapters))  # all active (this makes all trainable)
        if len(self.adapters) > 1:
            self.model.set_requires_grad(self.adapters[:-1], requires_grad=False)
        self.check_trainable()

    def check_trainable(self) -> None:
        expected = set(adapter_parameters(self.model, self.current))
        actual = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if actual != expected:
            extra, missing = sorted(actual - expected)[:3], sorted(expected - actual)[:3]
            raise AssertionError(f"trainable set is not exactly adapter {self.current!r}: "
                                 f"unexpected {extra}, missing {missing}")
        active = self.model.base_model.active_adapters
        if list(active) != self.adapters:
            raise AssertionError(f"active adapters {active} != stack {self.adapters}")

    def freeze_all(self) -> None:
        for param in self.model.parameters():
            param.requires_grad_(False)

    def save_current(self, destination: Path) -> None:
        """Write the current adapter (peft safetensors) to `destination`, atomically."""
        with writing(destination):
            self._save_current(destination)

    def _save_current(self, destination: Path) -> None:
        destination.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".tmp-adapter-") as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[self.current])
            written = Path(tmp) / self.current
            source = written if written.is_dir() else Path(tmp)
            staged = Path(tmp) / "__staged__"
            shutil.copytree(source, staged, ignore=shutil.ignore_patterns("__staged__", "README.md"))
            if destination.exists():
                shutil.rmtree(destination)
            staged.rename(destination)

    @classmethod
    def load(cls, base: nn.Module, section: LoraSection, adapter_dirs: list[tuple[str, Path]],
             seed: int = 0) -> AdapterStack:
        """Rebuild a trained stack: adapters loaded in order, all active, all frozen
        (`add_task` may continue it: `seed` must then be the run seed)."""
        from peft import PeftModel

        stack = cls(base, section, seed=seed)
        for param in base.parameters():
            param.requires_grad_(False)
        for name, folder in adapter_dirs:
            if stack.model is None:
                stack.model = PeftModel.from_pretrained(base, str(folder), adapter_name=name, is_trainable=False)
            else:
                stack.model.load_adapter(str(folder), adapter_name=name, is_trainable=False)
            stack.adapters.append(name)
        stack.model.base_model.set_adapter(list(stack.adapters))
        stack.freeze_all()
        return stack
