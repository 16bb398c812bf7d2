"""wandb sweeps: `cl-flat train` reads overrides in every form an agent writes (${args}, ${args_no_equals},
${args_no_hyphens}) and `--set`, validated like the file; run.name templates; the folder-naming rule under a
sweep. The command lines are expanded from the sweep files exactly as wandb's agent does (its own argument
formatter, then its macro substitution) and run offline, with WANDB_SWEEP_ID unset and set."""

from __future__ import annotations

import copy
import itertools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, free_port, quiet_env

SWEEP_FILE = ROOT / "launch" / "sweep.yaml"
FORMS = ("args", "args_no_equals", "args_no_hyphens", "set")


def grid(sweep: dict) -> list[dict]:
    """Every parameter set of a grid sweep: {name: value}."""
    parameters = sweep["parameters"]
    names = sorted(parameters)
    choices = [parameters[n]["values"] if "values" in parameters[n] else [parameters[n]["value"]] for n in names]
    return [dict(zip(names, combo)) for combo in itertools.product(*choices)]


def agent_command(command: list[str], parameters: dict, form: str = "args") -> list[str]:
    """The command line a wandb agent runs for `parameters` (as in wandb's Agent._command_run: each element
    "${macro}" becomes that macro's argument list). `form` replaces the sweep's ${args} by another macro, or
    ("set") by `--set k=v` pairs."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    macros = create_sweep_command_args({"args": {k: {"value": v} for k, v in parameters.items()}})
    macros |= {"env": ["/usr/bin/env"], "interpreter": ["python"],
               "set": [part for text in macros["args_no_hyphens"] for part in ("--set", text)]}
    line: list[str] = []
    for part in command:
        part = str(part)
        if part == "${args}":
            part = "${" + form + "}"
        line += macros.get(part[2:-1]) or [] if part.startswith("${") and part.endswith("}") else [part]
    return line


def overrides_of(line: list[str]) -> list[str]:
    """What `cl-flat train` makes of the arguments after CONFIG: the agent forms, then --set."""
    from cl_flat.overrides import overrides_from_args

    rest = line[line.index("train") + 2:]
    sets = [rest[i + 1] for i, part in enumerate(rest) if part == "--set"]
    others = [part for i, part in enumerate(rest) if part != "--set" and (i == 0 or rest[i - 1] != "--set")]
    return overrides_from_args(others) + sets


# ---------------------------------------------------------------- in process: forms, names, launch/sweep.yaml


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
    points = grid(sweep)
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


def write_config(folder: Path, config: dict) -> Path:
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


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
    path = write_config(tmp_path, tiny_config)
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
        load_config(write_config(tmp_path, tiny_config))
    assert any(needle in p for p in info.value.problems), info.value.problems


# ---------------------------------------------------------------- the command lines, run offline


def run_line(line: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(line, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def sweep_env(tmp_path: Path, parameters: dict | None = None, run_id: str | None = None) -> dict[str, str]:
    """The environment of the test's command lines: the venv's python and cl-flat first on PATH, wandb offline
    (its server a closed local port, no key); with `run_id`, what a sweep agent adds (WANDB_SWEEP_ID,
    WANDB_RUN_ID and the run's parameters file WANDB_SWEEP_PARAM_PATH)."""
    env = quiet_env()
    env.pop("WANDB_API_KEY", None)
    env |= {"PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}", "WANDB_ERROR_REPORTING": "false",
            "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    if run_id is not None:
        params = tmp_path / "wandb" / "sweep-sweep0001" / f"config-{run_id}.yaml"
        params.parent.mkdir(parents=True, exist_ok=True)
        params.write_text(yaml.safe_dump({k: {"value": v} for k, v in parameters.items()}))
        env |= {"WANDB_SWEEP_ID": "sweep0001", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params)}
    return env


def assert_trained(proc: subprocess.CompletedProcess, folder: Path) -> None:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"results: {folder}" in proc.stdout, proc.stdout[-2000:]
    assert (folder / "metrics.json").is_file()


def assert_refused(proc: subprocess.CompletedProcess, folder: Path) -> None:
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"{folder} already holds a complete run" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.integration
def test_sweep_command_lines_train_distinct_folders_and_reruns_are_refused(tmp_path, tiny_config):
    launch = yaml.safe_load(SWEEP_FILE.read_text())
    tiny_config["training"]["max_steps"] = 2
    config = write_config(tmp_path, tiny_config)
    # a sweep of launch/sweep.yaml's shape on the tiny config: its command and its templated run.name
    sweep = copy.deepcopy(launch)
    sweep["command"] = [str(config) if part == "configs/quickstart.yaml" else part for part in launch["command"]]
    sweep["parameters"]["flatness"] = {"values": [{"method": "none"}, {"method": "sam", "rho": 0.1}]}
    sweep["parameters"]["run.seed"] = {"values": [1]}
    first, second = grid(sweep)
    results = tmp_path / "results"
    folder_a, folder_b = results / "sweep-none-s1", results / "sweep-sam-rho0.1-s1"

    # by hand (no WANDB_SWEEP_ID): ${args} in one process, ${args_no_equals} under a launcher in 2 processes
    env = sweep_env(tmp_path)
    assert_trained(run_line(agent_command(sweep["command"], first, "args"), tmp_path, env), folder_a)
    launcher = ["${env}", "${interpreter}", "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port()), "-m", "cl_flat.cli", "train", str(config), "${args}"]
    proc = run_line(agent_command(launcher, second, "args_no_equals"), tmp_path, env)
    assert_trained(proc, folder_b)
    (wandb_run,) = (folder_a / "wandb").glob("offline-run-*")  # offline: WANDB_MODE beats the sweep's online
    assert b"sweep0001" not in next(wandb_run.glob("run-*.wandb")).read_bytes()
    # every rank's output in its own log; rank 0's holds what it printed to the console
    logs = {rank: (folder_b / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)}
    assert "rank 0 of 2" in logs[0].splitlines()[0] and "rank 1 of 2" in logs[1].splitlines()[0]
    assert "accuracy matrix" in logs[0] and f"results: {folder_b}" in logs[0]
    assert "accuracy matrix" not in logs[1]

    # the same parameters in the other forms name the same folders: refused as reruns
    assert_refused(run_line(agent_command(sweep["command"], first, "args_no_hyphens"), tmp_path, env), folder_a)
    assert_refused(run_line(agent_command(sweep["command"], second, "set"), tmp_path, env), folder_b)

    # under an agent: the template names every swept key, so the name is the by-hand run's: refused
    agent = sweep_env(tmp_path, first, run_id="run0000a")
    assert_refused(run_line(agent_command(sweep["command"], first), tmp_path, agent), folder_a)

    # a template that does not name the swept `flatness` block: the wandb run id makes the name unique, and the
    # run is the agent's wandb run (its id and sweep)
    partial = first | {"run.name": "tiny-{flatness.method}"}
    agent = sweep_env(tmp_path, partial, run_id="run0000a")
    folder_c = results / "tiny-none-run0000a"
    assert_trained(run_line(agent_command(sweep["command"], partial), tmp_path, agent), folder_c)
    (wandb_run,) = (folder_c / "wandb").glob("offline-run-*")
    assert wandb_run.name.endswith("-run0000a")
    assert b"sweep0001" in (wandb_run / "run-run0000a.wandb").read_bytes()
    assert_refused(run_line(agent_command(sweep["command"], partial, "args_no_equals"), tmp_path, agent), folder_c)
    assert sorted(p.name for p in results.iterdir()) == sorted(p.name for p in (folder_a, folder_b, folder_c))
