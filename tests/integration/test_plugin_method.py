"""An outside flatness method (the installed package examples/plugin-method, entry-point group
`cl_flat.flatness`) is listed, validated and trained like a built-in; a broken or clashing plugin is
refused with one message naming its package, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import yaml

from helpers import quiet_env

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _plugin_installed():
    if not any(p.name == "gradnorm" for p in entry_points(group="cl_flat.flatness")):
        pytest.fail("the example plugin is not installed: pip install -e ./examples/plugin-method (README)")


def _cli(args: list[str], cwd: Path, extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = quiet_env()
    if extra_path is not None:
        env["PYTHONPATH"] = f"{extra_path}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else str(extra_path)
    return subprocess.run([sys.executable, "-m", "cl_flat.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _fake_distribution(root: Path, name: str, module: str, body: str) -> Path:
    """An installed-looking distribution on a path entry: its metadata, one entry point, its module."""
    info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[cl_flat.flatness]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(body)
    return root


def test_the_outside_method_is_listed_with_its_package(tmp_path):
    result = _cli(["methods", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    listed = {m["method"]: m for m in json.loads(result.stdout)}
    assert {"none", "sam", "rwp", "lpf_sgd", "flat_lora", "gradnorm"} <= set(listed)
    assert listed["gradnorm"]["source"].startswith("cl-flat-gradnorm (entry point cl_flat.flatness: gradnorm")
    assert {p["name"] for p in listed["gradnorm"]["parameters"]} == {"alpha", "r"}


def test_the_outside_method_trains_end_to_end(tmp_path, tiny_config):
    tiny_config["flatness"] = {"method": "gradnorm", "alpha": 0.5, "r": 0.05}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config))
    bad = _cli(["validate", str(config), "--set", "flatness.rho=0.1"], tmp_path)
    assert bad.returncode == 2 and "flatness.rho: unknown key" in bad.stderr  # validated like a built-in
    result = _cli(["train", str(config)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    run = Path(tiny_config["run"]["output_dir"]) / "tiny"
    assert len((run / "acc_matrix.csv").read_text().splitlines()) == 4  # header, zero-shot, 2 tasks
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all("perturbed_loss" in record for record in log)
    assert yaml.safe_load((run / "config.yaml").read_text())["flatness"] == {"method": "gradnorm", "alpha": 0.5,
                                                                              "r": 0.05}


@pytest.mark.parametrize("command", [["methods"], ["validate", "config.yaml"]])
def test_a_broken_plugin_is_one_message(tmp_path, tiny_config, command):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config))
    path = _fake_distribution(tmp_path / "site", "broken-method", "broken_method",
                              "raise ImportError('needs torch_xla')\n")
    result = _cli(command, tmp_path, path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == ("error: flatness method plugin broken-method (entry point cl_flat.flatness: "
                                     "broken_method = broken_method) failed to load: ImportError: needs torch_xla")


def test_a_plugin_reusing_a_built_in_name_is_refused_naming_both(tmp_path):
    body = ("from typing import Literal\nfrom cl_flat.config import Strict\n"
            "from cl_flat.flatness import FlatnessMethod, register\n\n"
            "class Config(Strict):\n    method: Literal['sam']\n\n"
            "@register('sam', Config)\nclass MySam(FlatnessMethod):\n    formula = ''\n\n"
            "    def window(self, ctx, micro_batches):\n        return {}\n")
    path = _fake_distribution(tmp_path / "site", "my-sam", "my_sam", body)
    result = _cli(["methods"], tmp_path, path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert ("flatness method 'sam' is registered twice: by cl_flat.flatness.sam (Sam) and by my-sam "
            "(entry point cl_flat.flatness: my_sam = my_sam) (MySam)") in result.stderr
