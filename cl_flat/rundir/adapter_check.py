"""The one check of a saved adapter folder before peft loads it: adapter_config.json parses and states the
config's `r`, adapter_model.safetensors opens (its header read, not its tensors) and holds LoRA weights of
that rank. peft would otherwise fail mid-load with a traceback, or a size mismatch deep in torch."""

from __future__ import annotations

import json
from pathlib import Path

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _saved_rank(folder: Path) -> tuple[int | None, str | None]:
    """(r of the saved LoRA weights, None) or (None, what is wrong with the weights file)."""
    from safetensors import safe_open

    path = folder / WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as weights:
            ranks = {weights.get_slice(key).get_shape()[0] for key in weights.keys() if ".lora_A." in key}
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ValueError...
        return None, f"{path}: not a readable safetensors file ({exc})"
    if len(ranks) != 1:
        return None, f"{path}: holds no LoRA weights of one rank (ranks {sorted(ranks)})"
    return ranks.pop(), None


def adapter_problem(folder: Path, r: int) -> str | None:
    """What keeps the adapter saved in `folder` from loading as an adapter of rank `r`, or None."""
    config_path = folder / CONFIG
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return f"{config_path}: not a readable adapter config ({exc.strerror if isinstance(exc, OSError) else exc})"
    if not isinstance(saved, dict) or type(saved.get("r")) is not int:
        return f"{config_path}: no integer 'r'"
    rank, problem = _saved_rank(folder)
    if problem is not None:
        return problem
    for found in (saved["r"], rank):
        if found != r:
            return f"{folder}: saved with r = {found}, the config says r = {r}"
    return None


def adapter_problems(folders: list[Path], r: int) -> list[str]:
    """`adapter_problem` of every folder that has a weights file (a missing one is the callers' own message)."""
    problems = (adapter_problem(f, r) for f in dict.fromkeys(folders) if (f / WEIGHTS).is_file())
    return [p for p in problems if p is not None]
