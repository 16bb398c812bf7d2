"""Malformed configs and data files through `cl-flat validate`, in this process: one message naming the
file (file:line) or the field, exit 2, no traceback, nothing written."""

from __future__ import annotations

import os
import time

import pytest

from helpers import assert_clean_failure, unchanged, write_yaml


def refused(cli_here, tmp_path, config, *needles):
    with unchanged(tmp_path):
        assert_clean_failure(cli_here(["validate", str(config)], tmp_path), *needles, code=2)


def test_config_not_utf8(project, cli_here):
    tmp_path, raw = project
    config = write_yaml(tmp_path / "run.yaml", raw)
    config.write_bytes(config.read_bytes() + b"# caf\xe9\n")
    refused(cli_here, tmp_path, config, "run.yaml:", "not UTF-8 text (byte 0xe9)")


def test_duplicate_yaml_key_names_both_lines(project, cli_here):
    tmp_path, raw = project
    config = write_yaml(tmp_path / "run.yaml", raw)
    config.write_text(config.read_text() + "training:\n  max_steps: 5\n")
    lines = config.read_text().splitlines()
    first = lines.index("training:") + 1
    refused(cli_here, tmp_path, config, f"key 'training' is given twice (lines {first} and {len(lines) - 1})")


def test_alias_bomb_refused_quickly(project, cli_here):
    tmp_path, raw = project
    config = write_yaml(tmp_path / "run.yaml", raw)
    bomb = "\n".join(f"  l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10))
    config.write_text(config.read_text() + "deepspeed:\n  extra:\n    l0: &l0 [lol]\n" + bomb.replace("  l", "    l")
                      + "\n")
    start = time.monotonic()
    refused(cli_here, tmp_path, config, "once its aliases (*name) are expanded")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("section", "key", "value", "needle"), [
    ("training", "learning_rate", float("inf"), "training.learning_rate: Input should be a finite number"),
    ("deepspeed", "timeout_minutes", 1e-9, "deepspeed.timeout_minutes"),
])
def test_meaningless_numbers(project, cli_here, section, key, value, needle):
    tmp_path, raw = project
    raw.setdefault(section, {})[key] = value
    refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw), needle)


@pytest.mark.parametrize(("labels", "needle"), [(["pos", ""], "a label is empty"),
                                                (["pos", "neg", "pos"], "label(s) ['pos'] repeated")])
def test_empty_or_repeated_labels(project, cli_here, labels, needle):
    tmp_path, raw = project
    raw["tasks"][0]["labels"] = labels
    refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw), "tasks.0.labels", needle)


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"input": "a", "output": "pos"}\n{"input": "caf\xe9", "output": "neg"}\n',
     "senti_train.jsonl:2: not UTF-8 text"),
    (b'{"input": "a", "output": "pos"}\n{"input": "\\ud800", "output": "neg"}\n',
     "senti_train.jsonl:2: a lone surrogate escape"),
    (b"[" * 100_000 + b"]" * 100_000 + b"\n", "senti_train.jsonl:1: JSON nested too deeply"),
])
def test_bad_jsonl(project, cli_here, content, needle):
    tmp_path, raw = project
    (tmp_path / "senti_train.jsonl").write_bytes(content)
    refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw), needle)


def test_jsonl_with_bom_accepted(project, cli_here):
    tmp_path, raw = project
    train = tmp_path / "senti_train.jsonl"
    train.write_bytes(b"\xef\xbb\xbf" + train.read_bytes())
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert result.returncode == 0, result.stderr


def test_data_path_is_a_directory_or_fifo(project, cli_here):
    tmp_path, raw = project
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")
    for name, needle in (("folder", "is a directory"), ("pipe", "is not a regular file")):
        raw["tasks"][0]["train"] = str(tmp_path / name)
        refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw), f"{tmp_path / name}: {needle}")


@pytest.mark.parametrize(("key", "value"), [("micro_batch_size", 1e12), ("gradient_accumulation_steps", 3)])
def test_fewer_examples_than_one_global_batch(project, cli_here, key, value):
    tmp_path, raw = project  # 4 training examples, micro_batch_size 2
    raw["training"][key] = value
    refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw), "tasks[senti]: 4 training examples are "
            "fewer than one global batch")


def test_output_dir_is_a_file(project, cli_here):
    tmp_path, raw = project
    (tmp_path / "results").write_text("not a folder\n")
    refused(cli_here, tmp_path, write_yaml(tmp_path / "run.yaml", raw),
            f"run.output_dir: {tmp_path / 'results'} is a file, not a folder")


def test_metrics_refuses_scores_outside_0_100(tmp_path, cli_here):
    path = tmp_path / "acc_matrix.csv"
    path.write_text("after_task,a,b\nzero_shot,10,20\na,50,140\nb,40,60\n")
    with unchanged(tmp_path):
        assert_clean_failure(cli_here(["metrics", str(path)], tmp_path),
                             f"{path}:3", "a score must lie in [0, 100], got '140'", code=2)


def test_train_log_line_not_an_object(tmp_path):
    from cl_flat.errors import DataError
    from cl_flat.rundir import RunDir
    from cl_flat.rundir.resume import truncate_log

    run_dir = RunDir(tmp_path)
    run_dir.log_path.write_text('{"task_index": 0, "step": 1}\n[1, 2]\n')
    with unchanged(tmp_path), pytest.raises(DataError, match=r"train_log.jsonl:2: expected an update's record"):
        truncate_log(run_dir, 1)


def test_report_skips_and_lists_a_folder_with_invalid_yaml(tmp_path):
    from cl_flat.report import build_report, render_markdown
    from report_runs import make_results

    results = make_results(tmp_path / "results")
    (results / "foreign").mkdir()
    (results / "foreign" / "config.yaml").write_text("a: [unclosed\n")
    report = build_report([str(results)])
    assert any(note.startswith(f"skipped {results / 'foreign'}: ") and "not valid YAML" in note
               for note in report.notes)
    assert f"skipped {results / 'foreign'}" in render_markdown(report)


def test_the_batch_check_counts_replayed_examples():
    """A task smaller than one global batch is refused before anything is written, unless experience
    replay fills the batch (2 own + 8 replayed examples ≥ 4)."""
    from cl_flat.config import validate_config
    from cl_flat.data import load_tasks
    from cl_flat.errors import ConfigError
    from cl_flat.recipes.skeleton import check_batches

    raw = {"model": {"name_or_path": "tiny-random:llama"}, "training": {"micro_batch_size": 4},
           "tasks": [{"name": "a", "source": "builtin", "task": "food_sentiment", "n_train": 16},
                     {"name": "b", "source": "builtin", "task": "service_sentiment", "n_train": 2}]}
    with pytest.raises(ConfigError, match=r"tasks\[b\]: 2 training examples are fewer than one global batch"):
        config = validate_config(raw)
        check_batches(config, load_tasks(config), world=1)
    config = validate_config({**raw, "replay": {"examples_per_task": 8}})
    check_batches(config, load_tasks(config), world=1)
