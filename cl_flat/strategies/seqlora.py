"""SeqLoRA (`lora.strategy: seqlora`), the sequential fine-tuning baseline: one adapter, named
`seqlora`, trained through every task in turn (initialised once, by the first task); adapters/<task>/
holds it as it was right after that task."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from cl_flat.config import LoraSection
from cl_flat.registry import STRATEGIES
from cl_flat.strategies.base import AdapterStrategy

SEQLORA_ADAPTER = "seqlora"


class SeqLoraConfig(LoraSection):
    strategy: Literal["seqlora"] = "seqlora"


@STRATEGIES.register("seqlora", SeqLoraConfig)
class SeqLora(AdapterStrategy):
    """One adapter shared by every task."""

    def adapter_name(self, task_name: str) -> str:
        return SEQLORA_ADAPTER

    def saved_adapters(self, task_names: Sequence[str], upto: str) -> list[tuple[str, str]]:
        """The shared adapter as saved after `upto`."""
        return [(SEQLORA_ADAPTER, upto)]
