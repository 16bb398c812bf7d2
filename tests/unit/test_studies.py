"""The studies' wandb sweeps (configs/studies/*/sweep.yaml), expanded as a grid agent would, give valid and
distinct runs, and the studies' base configs differ only where a study means them to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from cl_flat.config import config_to_dict, load_config
from cl_flat.flatness import build_method
from cl_flat.overrides import RUN_NAME, dotted_keys
from helpers import ROOT, grid_points

STUDIES = ROOT / "configs" / "studies"
SWEEPS = sorted(STUDIES.glob("*/sweep.yaml"))


def render_name(template: str, config: dict) -> str:
    flat = dotted_keys(config)
    missing = [key for key in re.findall(r"{([^{}]+)}", template) if key not in flat]
    assert not missing, f"run.name {template!r} names keys some runs lack: {missing}"
    return re.sub(r"{([^{}]+)}", lambda m: str(flat[m.group(1)]), template)


def test_every_study_has_a_base_config_and_a_sweep():
    assert {p.parent.name for p in SWEEPS} == {"q1", "q2", "q3", "baseline"}
    assert all((p.parent / "base.yaml").is_file() for p in SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS, ids=[p.parent.name for p in SWEEPS])
def test_study_sweep_gives_valid_distinct_runs(sweep: Path):
    spec = yaml.safe_load(sweep.read_text())
    assert spec["method"] == "grid"
    base = f"configs/studies/{sweep.parent.name}/base.yaml"
    assert spec["command"] == ["${env}", "cl-flat", "train", base, "${args}"]
    assert len(spec["parameters"]["run.seed"]["values"]) >= 5
    points = grid_points(spec)
    names = []
    for point in points:
        # ${args}: `--key=value`, the value as str() writes it (a flatness block is a YAML string)
        args = [f"--{key}={value}" for key, value in point.items() if key != "run.name"]
        config = load_config(ROOT / base, args)
        assert build_method(config.flatness).check(config.training) == [], point
        names.append(render_name(point["run.name"], config_to_dict(config)))
    assert len(set(names)) == len(points), names
    # a run's folder name, the '.' of float values (q2's a and b) included, which the template must render
    assert all(re.fullmatch(RUN_NAME, name) for name in names), names
    assert all(name.startswith(f"{sweep.parent.name}-" if sweep.parent.name != "baseline" else "studies-none-")
               for name in names)


def test_study_base_configs_differ_only_in_name_and_flatness():
    """So the one baseline (flatness none) pairs with the runs of every question in cl-flat report."""
    def rest(path: Path) -> dict:
        raw = yaml.safe_load(path.read_text())
        raw.pop("flatness")
        raw["run"].pop("name")
        return raw

    bases = [STUDIES / question / "base.yaml" for question in ("baseline", "q1", "q2", "q3")]  # the quickstart's
    assert all(rest(path) == rest(bases[0]) for path in bases)
