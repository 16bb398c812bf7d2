"""Config schema (docs/configuration.md's contract): every error names its dotted path and
what was expected, all errors at once; `--set` overrides are applied to the raw dict before
validation and parsed as YAML. Expected paths and values below are written from docs/configuration.md."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from cl_flat.config import load_config, validate_config
from cl_flat.errors import ConfigError


def minimal() -> dict:
    return {
        "model": {"name_or_path": "tiny-random:llama"},
        "tasks": [{"name": "alpha", "source": "builtin"}],
    }


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    problems = info.value.problems
    assert isinstance(problems, list) and problems, "ConfigError.problems must be a non-empty list"
    assert all(isinstance(p, str) for p in problems)
    return problems


def has(problems: list[str], path: str, *words: str) -> bool:
    """A problem line for `path` ("<dotted.path>: <what>") that mentions every word."""
    return any(p.startswith(f"{path}:") and all(w.lower() in p.lower() for w in words) for p in problems)


def write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
    return path


# ---------------------------------------------------------------- a valid config


def test_minimal_config_is_valid_and_gets_the_documented_defaults():
    config = validate_config(minimal())
    # the defaults of docs/configuration.md's example block
    assert config.training.micro_batch_size == 8
    assert config.training.learning_rate == pytest.approx(1.0e-3)
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.evaluation.batch_size == 32
    assert config.flatness.method == "none"
    assert [t.name for t in config.tasks] == ["alpha"]


# ---------------------------------------------------------------- unknown keys


def test_unknown_top_level_key():
    raw = minimal()
    raw["trainng"] = {"epochs": 1}
    problems = problems_of(raw)
    assert has(problems, "trainng", "unknown")


def test_unknown_nested_key():
    raw = minimal()
    raw["training"] = {"learning_rte": 1e-3}
    assert has(problems_of(raw), "training.learning_rte", "unknown")


def test_unknown_deeply_nested_key():
    raw = minimal()
    raw["logging"] = {"wandb": {"projekt": "x"}}
    assert has(problems_of(raw), "logging.wandb.projekt", "unknown")


def test_unknown_key_inside_a_task():
    raw = minimal()
    raw["tasks"].append({"name": "beta", "source": "builtin", "n_trian": 5})
    # the second task (index 1); the discriminator tag is not part of the user's path
    assert has(problems_of(raw), "tasks.1.n_trian", "unknown")


def test_parameter_of_another_method_is_an_error():
    raw = minimal()
    raw["flatness"] = {"method": "none", "rho": 0.1}
    assert has(problems_of(raw), "flatness.rho", "unknown")


def test_parameter_of_another_method_inside_sam_block():
    raw = minimal()
    raw["flatness"] = {"method": "sam", "rho": 0.05, "noise_std": 0.01}
    problems = problems_of(raw)
    assert has(problems, "flatness.noise_std", "unknown")
    assert not any(p.startswith("flatness.rho") for p in problems)


def test_a_jsonl_task_rejects_an_hf_field():
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": "a.jsonl", "test": "b.jsonl",
                     "labels": ["x", "y"], "text_field": "text"}]
    assert has(problems_of(raw), "tasks.0.text_field", "unknown")


# ---------------------------------------------------------------- types and ranges


def test_wrong_type_integer():
    raw = minimal()
    raw["lora"] = {"r": "eight"}
    assert has(problems_of(raw), "lora.r", "integer")


def test_a_boolean_is_not_a_number():
    # YAML reads `r: yes` as true, which pydantic alone would take as r = 1
    raw = minimal()
    raw["lora"] = {"r": True}
    raw["training"] = {"learning_rate": False}
    raw["flatness"] = {"method": "sam", "rho": True}
    problems = problems_of(raw)
    assert has(problems, "lora.r", "integer", "true")
    assert has(problems, "training.learning_rate", "number", "false")
    assert has(problems, "flatness.rho", "number", "true")
    raw = minimal()
    raw["deepspeed"] = {"bf16": True}  # booleans where booleans belong stay valid
    assert validate_config(raw).deepspeed.bf16 is True


def test_wrong_type_list():
    raw = minimal()
    raw["lora"] = {"target_modules": "q_proj"}
    assert has(problems_of(raw), "lora.target_modules", "list")


def test_wrong_type_section():
    raw = minimal()
    raw["training"] = 5
    assert any(p.startswith("training:") for p in problems_of(raw))


@pytest.mark.parametrize("section,key,value", [
    ("lora", "r", 0),
    ("training", "warmup_ratio", 1.5),
    ("training", "learning_rate", 0),
    ("training", "micro_batch_size", 0),
    ("lora", "dropout", 1.0),
    ("deepspeed", "zero_stage", 3),
])
def test_out_of_range(section, key, value):
    raw = minimal()
    raw[section] = {key: value}
    problems = problems_of(raw)
    assert any(p.startswith(f"{section}.{key}:") for p in problems), problems


def test_in_range_boundaries_are_accepted():
    raw = minimal()
    raw["lora"] = {"r": 1}
    raw["training"] = {"warmup_ratio": 0.0}
    config = validate_config(raw)
    assert config.lora.r == 1 and config.training.warmup_ratio == 0.0


def test_unknown_flatness_method_lists_the_methods():
    from cl_flat.registry import METHODS

    raw = minimal()
    raw["flatness"] = {"method": "magic"}
    problems = problems_of(raw)
    line = next(p for p in problems if p.startswith("flatness"))
    assert "magic" in line
    assert {"none", "sam", "rwp", "lpf_sgd", "flat_lora"} <= set(METHODS.names())
    for name in METHODS.names():
        assert f"'{name}'" in line or name in line.split("expected", 1)[-1], (name, line)


def test_flatness_block_without_method_is_an_error():
    raw = minimal()
    raw["flatness"] = {"rho": 0.1}
    assert any(p.startswith("flatness") for p in problems_of(raw))


def test_unknown_task_source():
    raw = minimal()
    raw["tasks"].append({"name": "beta", "source": "ftp"})
    problems = problems_of(raw)
    line = next(p for p in problems if p.startswith("tasks.1"))
    assert "ftp" in line
    for source in ("builtin", "jsonl", "hf"):
        assert source in line


def test_duplicate_task_names():
    raw = minimal()
    raw["tasks"] = [{"name": "same", "source": "builtin"}, {"name": "other", "source": "builtin"},
                    {"name": "same", "source": "builtin"}]
    problems = problems_of(raw)
    assert any("same" in p and "tasks" in p and "unique" in p for p in problems)
    assert not any("'other'" in p for p in problems)


def test_cross_field_errors_start_with_their_dotted_path():
    raw = minimal()
    raw["tasks"].append({"name": "alpha", "source": "builtin"})
    assert has(problems_of(raw), "tasks", "alpha")
    raw = minimal()
    raw["model"]["dtype"] = "bf16"
    assert has(problems_of(raw), "model.dtype", "bf16")


# ---------------------------------------------------------------- all errors at once


def test_several_schema_errors_are_reported_together():
    raw = minimal()
    raw["colour"] = "blue"
    raw["lora"] = {"r": 0}
    raw["training"] = {"warmup_ratio": 1.5, "epochs": "one"}
    raw["flatness"] = {"method": "none", "rho": 0.1}
    problems = problems_of(raw)
    assert has(problems, "colour", "unknown")
    assert any(p.startswith("lora.r:") for p in problems)
    assert any(p.startswith("training.warmup_ratio:") for p in problems)
    assert any(p.startswith("training.epochs:") for p in problems)
    assert has(problems, "flatness.rho", "unknown")
    assert len(problems) == 5, problems


def test_several_cross_field_errors_are_reported_together():
    raw = minimal()
    raw["tasks"].append({"name": "alpha", "source": "builtin"})
    raw["model"]["dtype"] = "bf16"
    problems = problems_of(raw)
    assert any("duplicate" in p for p in problems)
    assert any("model.dtype" in p for p in problems)


def test_cross_field_errors_are_reported_with_schema_errors():
    raw = minimal()
    raw["tasks"].append({"name": "alpha", "source": "builtin"})
    raw["lora"] = {"r": 0}
    problems = problems_of(raw)
    assert any(p.startswith("lora.r:") for p in problems)
    assert any("duplicate" in p for p in problems)


def test_union_field_error_names_the_config_path():
    raw = minimal()
    raw["tasks"] = [{"name": "h", "source": "hf", "dataset": "csv", "data_files": 5, "labels": ["a", "b"]}]
    problems = problems_of(raw)
    assert problems and all(p.startswith("tasks.0.data_files:") for p in problems), problems


# ---------------------------------------------------------------- cross checks


def test_deepspeed_extra_must_not_define_optimizer():
    raw = minimal()
    raw["deepspeed"] = {"extra": {"optimizer": {"type": "SGD"}}}
    assert has(problems_of(raw), "deepspeed.extra", "optimizer")


def test_deepspeed_extra_must_not_define_scheduler():
    raw = minimal()
    raw["deepspeed"] = {"extra": {"scheduler": {"type": "WarmupLR"}}}
    assert has(problems_of(raw), "deepspeed.extra", "scheduler")


def test_deepspeed_extra_other_keys_are_allowed():
    raw = minimal()
    raw["deepspeed"] = {"extra": {"wall_clock_breakdown": True}}
    assert validate_config(raw).deepspeed.extra == {"wall_clock_breakdown": True}


def test_bf16_model_needs_deepspeed_bf16():
    raw = minimal()
    raw["model"]["dtype"] = "bf16"
    problems = problems_of(raw)
    assert any("model.dtype" in p and "deepspeed.bf16" in p for p in problems)
    raw["deepspeed"] = {"bf16": True}
    assert validate_config(raw).model.dtype == "bf16"


def test_jsonl_task_without_labels_under_accuracy_is_an_error():
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": "a.jsonl", "test": "b.jsonl"}]
    problems = problems_of(raw)
    assert any("tasks.0.labels" in p and "accuracy" in p for p in problems)


def test_jsonl_task_without_labels_is_fine_for_exact_match():
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": "a.jsonl", "test": "b.jsonl",
                     "metric": "exact_match"}]
    validate_config(raw)
    raw["tasks"][0].pop("metric")
    raw["evaluation"] = {"metric": "exact_match"}
    validate_config(raw)


def test_top_level_must_be_a_mapping():
    with pytest.raises(ConfigError) as info:
        validate_config([1, 2])
    assert info.value.problems


# ---------------------------------------------------------------- load_config and --set


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return write_yaml(tmp_path / "run.yaml", minimal())


def test_override_float(config_file):
    config = load_config(config_file, ["training.learning_rate=5e-4"])
    assert config.training.learning_rate == pytest.approx(5e-4)


def test_override_list_index(config_file):
    config = load_config(config_file, ["tasks.0.name=x"])
    assert [t.name for t in config.tasks] == ["x"]


def test_override_creates_new_nested_keys(config_file):
    # neither `logging` nor `deepspeed` is in the file
    config = load_config(config_file, ["logging.wandb.group=sweep1", "deepspeed.extra.wall_clock_breakdown=true"])
    assert config.logging.wandb.group == "sweep1"
    assert config.deepspeed.extra == {"wall_clock_breakdown": True}


def test_override_values_are_parsed_as_yaml(config_file):
    config = load_config(config_file, ["logging.progress=false", "training.max_steps=3",
                                       "lora.target_modules=[q_proj, k_proj]", "lora.alpha=32",
                                       "logging.wandb.tags=[a, b]"])
    assert config.logging.progress is False
    assert config.training.max_steps == 3 and isinstance(config.training.max_steps, int)
    assert config.lora.target_modules == ["q_proj", "k_proj"]
    assert config.lora.alpha == 32.0
    assert config.logging.wandb.tags == ["a", "b"]


def test_override_applied_before_validation_can_fix_an_invalid_file(tmp_path):
    raw = minimal()
    raw["lora"] = {"r": 0}
    path = write_yaml(tmp_path / "bad.yaml", raw)
    with pytest.raises(ConfigError):
        load_config(path)
    assert load_config(path, ["lora.r=2"]).lora.r == 2


def test_override_applied_before_validation_can_break_a_valid_file(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["training.warmup_ratio=1.5"])
    assert any(p.startswith("training.warmup_ratio:") for p in info.value.problems)


def test_override_of_unknown_key_is_validated(config_file):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, ["training.learning_rte=1"])
    assert has(info.value.problems, "training.learning_rte", "unknown")


def test_later_override_wins(config_file):
    config = load_config(config_file, ["lora.r=2", "lora.r=6"])
    assert config.lora.r == 6


def test_override_does_not_touch_the_file(config_file):
    before = config_file.read_text()
    load_config(config_file, ["lora.r=2"])
    assert config_file.read_text() == before


@pytest.mark.parametrize("bad", ["foo", "=3", "training..lr=1", "tasks.7.name=x", "model.name_or_path.x=1"])
def test_bad_override_is_a_config_error(config_file, bad):
    with pytest.raises(ConfigError) as info:
        load_config(config_file, [bad])
    assert any(bad in p for p in info.value.problems), info.value.problems


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert any("nope.yaml" in p for p in info.value.problems)


# ---------------------------------------------------------------- paths and YAML errors


def test_relative_jsonl_paths_resolve_next_to_the_config(tmp_path, monkeypatch):
    folder = tmp_path / "cfgdir"
    (folder / "data").mkdir(parents=True)
    for split in ("train", "test"):
        (folder / "data" / f"{split}.jsonl").write_text('{"input": "a", "output": "x"}\n')
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": "data/train.jsonl", "test": "data/test.jsonl",
                     "labels": ["x", "y"]}]
    path = write_yaml(folder / "run.yaml", raw)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path)
    assert Path(config.tasks[0].train).resolve() == (folder / "data" / "train.jsonl").resolve()
    assert Path(config.tasks[0].test).resolve() == (folder / "data" / "test.jsonl").resolve()


def test_config_folder_wins_over_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "cfgdir"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.jsonl").write_text('{"input": "next to config", "output": "x"}\n')
    cwd = tmp_path / "cwd"
    (cwd / "data").mkdir(parents=True)
    (cwd / "data" / "train.jsonl").write_text('{"input": "in cwd", "output": "x"}\n')
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": "data/train.jsonl", "test": "data/train.jsonl",
                     "labels": ["x", "y"]}]
    path = write_yaml(folder / "run.yaml", raw)
    monkeypatch.chdir(cwd)
    config = load_config(path)
    assert Path(config.tasks[0].train).resolve() == (folder / "data" / "train.jsonl").resolve()


def test_absolute_jsonl_path_is_kept(tmp_path):
    data = tmp_path / "abs.jsonl"
    data.write_text('{"input": "a", "output": "x"}\n')
    raw = minimal()
    raw["tasks"] = [{"name": "j", "source": "jsonl", "train": str(data), "test": str(data), "labels": ["x", "y"]}]
    config = load_config(write_yaml(tmp_path / "sub.yaml", raw))
    assert Path(config.tasks[0].train) == data


def test_malformed_yaml_reports_file_and_line(tmp_path):
    # line 3 is indented by one space under a mapping at column 0: the parse error is on line 3
    path = write_yaml(tmp_path / "broken.yaml", "run:\n  name: a\n bad: 1\nmodel: {name_or_path: x}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(f"{path}:3" in p for p in info.value.problems), info.value.problems


def test_malformed_yaml_with_a_tab_reports_its_line(tmp_path):
    path = write_yaml(tmp_path / "tabs.yaml", "model:\n  name_or_path: x\ntasks:\n\t- name: a\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(f"{path}:4" in p for p in info.value.problems), info.value.problems


def test_load_config_errors_name_the_file(tmp_path):
    raw = minimal()
    raw["lora"] = {"r": 0}
    path = write_yaml(tmp_path / "named.yaml", raw)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "named.yaml" in str(info.value)
    assert any(p.startswith("lora.r:") for p in info.value.problems)


def test_validate_does_not_mutate_its_input():
    raw = minimal()
    snapshot = copy.deepcopy(raw)
    validate_config(raw)
    assert raw == snapshot


def test_methods_say_where_they_differ_from_the_method_notes():
    """`cl-flat methods` states, one line per method, which form is implemented where write-ups of it differ."""
    from cl_flat.flatness import describe_methods

    lines = {m["method"]: m["versus_notes"] for m in describe_methods()}
    assert "T²" in lines["sam"] and "standard deviation" in lines["lpf_sgd"] and "mean" in lines["rwp"]
    assert all("\n" not in line for line in lines.values())


def _per_task(**task_b):
    return {"model": {"name_or_path": "tiny-random:llama"}, "training": {"epochs": 1, "learning_rate": 0.01},
            "flatness": {"method": "sam", "rho": 0.05},
            "tasks": [{"name": "a", "source": "builtin"}, {"name": "b", "source": "builtin", **task_b}]}


def test_per_task_settings_override_the_run_level_blocks():
    config = validate_config(_per_task(training={"epochs": 3}, flatness={"rho": 0.1}))
    assert (config.task_training(0).epochs, config.task_training(1).epochs) == (1, 3)
    assert config.task_training(1).learning_rate == 0.01  # not overridden: the run's value, not the default
    assert (config.task_flatness(0).rho, config.task_flatness(1).rho) == (0.05, 0.1)
    assert config.task_flatness(1).method == "sam"
    # another method replaces the block: its own defaults, nothing of sam's
    other = validate_config(_per_task(flatness={"method": "rwp", "scope": "base"})).task_flatness(1)
    assert (other.method, other.scope, other.noise_std) == ("rwp", "base", 0.0015)
    # saved and read back (config.yaml), the effective blocks are stable
    from cl_flat.config import config_to_dict

    saved = config_to_dict(config)
    assert saved["tasks"][1]["training"]["epochs"] == 3 and saved["tasks"][0]["training"] is None
    assert config_to_dict(validate_config(saved)) == saved


def test_per_task_errors_name_their_dotted_path():
    raw = _per_task(training={"epochs": 0, "max_seq_length": 64, "learning_rte": 1}, flatness={"rhoo": 1})
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    text = str(info.value)
    for path in ("tasks.1.training.epochs", "tasks.1.training.learning_rte", "tasks.1.flatness.rhoo",
                 "tasks.1.training.max_seq_length: one length serves the whole run"):
        assert path in text, (path, text)


def test_a_run_folder_or_its_config_yaml_loads_as_that_run(tmp_path):
    from cl_flat.config import config_to_dict

    raw = {"run": {"name": "first", "output_dir": "somewhere/else"}, "model": {"name_or_path": "tiny-random:llama"},
           "tasks": [{"name": "t", "source": "builtin"}]}
    saved = config_to_dict(load_config(write_yaml(tmp_path / "c.yaml", raw)))
    folder = tmp_path / "moved" / "renamed"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(saved | {"meta": {"results_format": 1}}))
    for given in (folder, folder / "config.yaml"):
        config = load_config(given, ["training.learning_rate=0.5"])
        assert (config.run.output_dir, config.run.name) == (folder.parent, "renamed")
        assert config.training.learning_rate == 0.5
