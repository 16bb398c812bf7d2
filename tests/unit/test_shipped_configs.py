"""Every config shipped in configs/ validates (schema, local data, target modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_flat.config import load_config
from cl_flat.data import check_local_data
from cl_flat.flatness import build_method
from cl_flat.models import check_target_modules, module_names

CONFIG_DIR = Path(__file__).parents[2] / "configs"
# every YAML under configs/ is a run config, except the wandb sweep files next to the studies' base configs
CONFIGS = sorted(p for p in CONFIG_DIR.rglob("*.yaml") if p.name != "sweep.yaml")


def test_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(CONFIG_DIR)) for p in CONFIGS])
def test_shipped_config_validates(path: Path):
    config = load_config(path)
    assert build_method(config.flatness).check(config.training) == []
    check_local_data(config)
    names = module_names(config.model.name_or_path)
    if names is not None:
        check_target_modules(config.lora.target_modules, names)
