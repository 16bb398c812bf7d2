"""Every config shipped in configs/ validates (schema, local data, target modules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cl_flat.config import load_config
from cl_flat.data import check_local_data
from cl_flat.flatness import build_method
from cl_flat.models import check_target_modules, module_names

CONFIGS = sorted((Path(__file__).parents[2] / "configs").rglob("*.yaml"))


def test_configs_exist():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_validates(path: Path):
    config = load_config(path)
    assert build_method(config.flatness).check(config) == []
    check_local_data(config)
    names = module_names(config.model.name_or_path)
    if names is not None:
        check_target_modules(config.lora.target_modules, names)
