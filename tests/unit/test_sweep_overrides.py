"""wandb sweeps, in process: `cl-flat train` reads overrides in every form an agent writes (${args},
${args_no_equals}, ${args_no_hyphens}) and `--set`, validated like the file; run.name templates and the
folder-naming rule under a sweep; every grid point of launch/sweep.yaml is a valid run with its own name.
The command lines are expanded from the sweep file exactly as wandb's agent does (helpers.agent_command).
Those command lines run: tests/integration/test_sweep.py."""

from __future__ import annotations

import pytest
import yaml

from helpers import ROOT, agent_command, grid_points, write_yaml

SWEEP_FILE = ROOT / "launch" / "sweep.yaml"
FORMS = ("args", "args_no_equals", "args_no_hyphens", "set")


def overrides_of(line: list[str]) -> list[str]:
    """What `cl-flat train` makes of the arguments after CONFIG: the agent forms, then --set."""
    from cl_flat.overrides import overrides_from_args

    rest = line[line.index("train") + 2:]
    sets = [rest[i + 1] for i, part in enumerate(rest) if part == "--set"]
    others = [part for i, part in enumerate(rest) if part != "--set" and (i == 0 or rest[i - 1] != "--set")]
    return overrides_from_args(others) + sets


def test_every_agent_form_gives_the_same_overrides():
    from cl_flat.overrides import apply_overrides

    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    parameters = {"flatness": {"method": "sam", "rho": 0.01, "adaptive": True}, "run.seed": 2,
                  "training.max_steps": None, "training.learning_rate": 1e-05, "lora.target_modules": ["q_proj"],
                  "run.name": "{flatness}-s{run.seed}"}
    expected = {"flatness": {"method": "sam", "rho": 0.01, "adaptive": True}, "run": {"seed": 2,
                "name": "{flatness}-s{run.seed}"}, "training": {"max_steps": None, "learning_rate": 1e-05},
                "lora": {"target_modules": ["q_proj"]}}
    for form in FORMS:
        line = agent_command(sweep["command"], parameters, form)
        assert line[:4] == ["/usr/bin/env", "cl-flat", "train", "configs/quickstart.yaml"], line
        assert apply_overrides({}, overrides_of(line)) == expected, (form, line)


@pytest.mark.parametrize("args, needle", [(["--lora.r"], "--lora.r: no value"),
                                          (["stray"], "unexpected argument 'stray'"),
                                          (["--lora.r", "--training.max_steps=2"], "--lora.r: no value")])
def test_malformed_arguments_are_config_errors(args, needle):
    from cl_flat.errors import ConfigError
    from cl_flat.overrides import overrides_from_args

    with pytest.raises(ConfigError) as info:
        overrides_from_args(args)
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_launch_sweep_yaml_every_grid_point_is_a_valid_run_with_its_own_name():
    from cl_flat.config import load_config

    sweep = yaml.safe_load(SWEEP_FILE.read_text())
    assert sweep["method"] == "grid" and "${args}" in sweep["command"]
    points = grid_points(sweep)
    assert len(points) == 27
    assert {p["flatness"]["method"] for p in points} == {"none", "sam", "rwp", "lpf_sgd", "flat_lora"}
    names = []
    for point in points:
        line = agent_command(sweep["command"], point)
        config = load_config(ROOT / line[3], overrides_of(line), sweep_run_id="abcd1234")
        assert config.flatness.method == point["flatness"]["method"] and config.run.seed == point["run.seed"]
        names.append(config.run.name)
    # the template names every swept key: no run id is appended, and no two runs share a folder
    assert len(set(names)) == 27 and not any(name.endswith("abcd1234") for name in names), names
    assert "sweep-none-s0" in names and "sweep-sam-rho0.01-s2" in names


@pytest.mark.parametrize("template, overrides, run_id, name", [
    ("{flatness.method}-s{run.seed}", ["flatness.method=sam", "run.seed=3"], None, "sam-s3"),
    ("{flatness.method}-s{run.seed}", ["flatness.method=sam", "run.seed=3"], "r1", "sam-s3"),
    ("{flatness}-s{run.seed}", ["flatness.rho=0.1", "flatness.method=sam", "run.seed=3"], "r1", "sam-rho0.1-s3"),
    ("{flatness}", ["flatness={method: none}", "logging.wandb.mode=offline", "run.output_dir=x"], "r1", "none"),
    ("{flatness.method}", ["flatness={method: sam}"], "r1", "sam-r1"),  # the block may hold more than method
    ("m{flatness.method}", ["flatness.method=sam", "run.seed=3"], "r1", "msam-r1"),
    ("fixed", ["run.seed=3"], "r1", "fixed-r1"),
    ("fixed", ["run.seed=3"], None, "fixed"),
    ("{model}-{lora.target_modules}-{lora.alpha}", [], None, "tiny-random_llama-q_proj_v_proj-8.0"),
])
def test_run_name_template_and_the_sweep_suffix_rule(tmp_path, tiny_config, template, overrides, run_id, name):
    from cl_flat.config import load_config

    tiny_config["run"]["name"] = template
    path = write_yaml(tmp_path / "tiny.yaml", tiny_config)
    assert load_config(path, overrides, sweep_run_id=run_id).run.name == name


@pytest.mark.parametrize("template, needle", [("{flatness.rho}", "{flatness.rho} is not a key"),
                                              ("{run.name}", "{run.name} is not a key"),
                                              ("{tasks.5.name}", "{tasks.5.name} is not a key"),
                                              ("a/b", "run.name")])
def test_a_bad_template_is_a_config_error_naming_it(tmp_path, tiny_config, template, needle):
    from cl_flat.config import load_config
    from cl_flat.errors import ConfigError

    tiny_config["run"]["name"] = template
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml(tmp_path / "tiny.yaml", tiny_config))
    assert any(needle in p for p in info.value.problems), info.value.problems
