"""Content hashes of a run's local data files, saved in config.yaml's meta (`data_fingerprints`), so that
`--resume` and `cl-flat eval` can tell that a file changed since the run started (its scores would not
be comparable). Folders written before fingerprints existed have none: nothing to check."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from cl_flat.config import HfTaskConfig, JsonlTaskConfig, RunConfig
from cl_flat.data.sources import hf_data_files

META_KEY = "data_fingerprints"


def local_files(config: RunConfig) -> list[Path]:
    """Every local data file of the run's tasks and probes (jsonl train/test, hf data_files), in order."""
    files: list[str | Path] = []
    for task in [*config.tasks, *config.probes]:
        if isinstance(task, JsonlTaskConfig):
            files += [path for path in (task.train, task.test) if path is not None]
        elif isinstance(task, HfTaskConfig):
            files += hf_data_files(task)
    return [Path(f) for f in dict.fromkeys(files) if Path(f).is_file()]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprints(config: RunConfig) -> dict[str, str]:
    """{file: sha256 of its bytes} of every local data file of the run."""
    return {str(path): sha256_of(path) for path in local_files(config)}


def data_changes(meta: dict[str, Any], config: RunConfig) -> list[str]:
    """Each data file whose content differs from the fingerprint in a stored config.yaml's `meta`:
    "data FILE: sha256 OLD → NEW" (NEW: "(missing)"). Empty where the meta holds no fingerprints."""
    stored = meta.get(META_KEY)
    if not isinstance(stored, dict):
        return []
    current = fingerprints(config)
    changes = []
    for name, old in stored.items():
        new = current.get(name) or (sha256_of(Path(name)) if Path(name).is_file() else "(missing)")
        if new != old:
            changes.append(f"data {name}: sha256 {str(old)[:12]} → {new[:12]}")
    return changes
