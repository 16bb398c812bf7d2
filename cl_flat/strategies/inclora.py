"""IncLoRA (`lora.strategy: inclora`, the default; O-LoRA's baseline): task t gets a new rank-r LoRA
adapter on the target modules, named after the task; the adapters of tasks 1..t-1 stay active in
every forward pass, frozen. Adapter t's A is drawn from a generator keyed by (seed, t)
(`cl_flat.adapters.AdapterStack`), so a task's initial state never depends on earlier work."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from cl_flat.config import LoraSection
from cl_flat.registry import STRATEGIES
from cl_flat.strategies.base import AdapterStrategy


class IncLoraConfig(LoraSection):
    strategy: Literal["inclora"] = "inclora"


@STRATEGIES.register("inclora", IncLoraConfig)
class IncLora(AdapterStrategy):
    """A new adapter per task on top of the frozen earlier ones."""

    def adapter_name(self, task_name: str) -> str:
        return task_name

    def saved_adapters(self, task_names: Sequence[str], upto: str) -> list[tuple[str, str]]:
        """Every task's adapter up to `upto`, each in its own folder."""
        return [(name, name) for name in task_names[:list(task_names).index(upto) + 1]]
