"""Prompt templates that name any field of the example (`{premise}`, `{hypothesis}`), for jsonl and hf
tasks: the fields read, the prompt filled, and every malformed input refused by `cl-flat validate` with one
message (file:line, or the config path), exit 2, nothing written.

Expected prompts are written out by hand; line numbers are those of the files written here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cl_flat.config import template_fields, validate_config
from cl_flat.data import DataError, Example, load_task
from cl_flat.errors import ConfigError
from helpers import assert_clean_failure, unchanged, write_yaml

MNLI_LABELS = ["entailment", "neutral", "contradiction"]
TWO_FIELDS = "{instruction}\nPremise: {premise}\nHypothesis: {hypothesis}\nOptions: {options}\nAnswer:"
MNLI_ROWS = [
    {"premise": "A man plays a guitar.", "hypothesis": "A man plays music.", "output": "entailment", "id": 7},
    {"premise": "A dog runs.", "hypothesis": "A cat sleeps.", "output": "contradiction"},
]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def mnli_task(tmp_path: Path, rows: list[dict] = MNLI_ROWS, **extra) -> dict:
    data = write_rows(tmp_path / "mnli.jsonl", rows)
    return {"name": "mnli", "source": "jsonl", "train": str(data), "test": str(data), "labels": MNLI_LABELS,
            "instruction": "Does the premise entail the hypothesis?", "prompt_template": TWO_FIELDS, **extra}


def run_config(task: dict):
    return validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": [task]})


def loaded(task: dict):
    config = run_config(task)
    return load_task(config.tasks[0], config.run.seed, config.evaluation.metric)


# ---------------------------------------------------------------- the template's fields


@pytest.mark.parametrize(("template", "fields"), [
    ("{instruction}\nOptions: {options}\nInput: {input}\nAnswer:", ("input",)),
    (TWO_FIELDS, ("premise", "hypothesis")),
    ("{hypothesis} {{literal}} {premise} {hypothesis}", ("hypothesis", "premise")),
])
def test_template_fields_in_order_of_first_use(template, fields):
    assert template_fields(template) == fields


@pytest.mark.parametrize(("template", "needle"), [
    ("Input: {input", "not a valid template"),
    ("Input: input}", "not a valid template"),
    ("{0} {input}", "placeholder {0} is not a field name"),
    ("{} {input}", "placeholder {} is not a field name"),
    ("{a.b} {input}", "placeholder {a.b} is not a field name"),
    ("{a[0]} {input}", "placeholder {a[0]} is not a field name"),
    ("{input!r}", "placeholder {input!r} is not a field name"),
    ("{input:>9}", "placeholder {input:>9} is not a field name"),
    ("{instruction} {options}", "names no field of the example"),
    ("{input} -> {output}", "{output} is the target"),
])
def test_bad_templates(template, needle):
    with pytest.raises(ValueError) as info:
        template_fields(template)
    assert needle in str(info.value)


def test_bad_template_is_a_config_error_at_its_path(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_config(mnli_task(tmp_path, prompt_template="{premise} {0}"))
    assert "tasks.0.prompt_template" in str(info.value) and "placeholder {0}" in str(info.value)


def test_builtin_tasks_have_only_input():
    with pytest.raises(ConfigError) as info:
        run_config({"name": "food_sentiment", "source": "builtin", "prompt_template": "{input} {premise}"})
    assert "tasks.0.prompt_template" in str(info.value) and "['premise']" in str(info.value)


def test_hf_label_column_not_in_the_prompt(tmp_path):
    task = {"name": "h", "source": "hf", "dataset": "json", "data_files": "x.json", "label_field": "gold",
            "prompt_template": "{premise} {gold}"}
    with pytest.raises(ConfigError) as info:
        run_config(task)
    assert "tasks.0" in str(info.value) and "names {gold}, the label_field column" in str(info.value)


def test_chat_system_without_chat_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        run_config(mnli_task(tmp_path, chat_system="Be brief."))
    assert "tasks.0.chat_system" in str(info.value) and "prompt_format: chat" in str(info.value)


# ---------------------------------------------------------------- jsonl


def test_jsonl_two_field_prompt_filled_by_hand(tmp_path):
    data = loaded(mnli_task(tmp_path))
    assert data.train[0] == Example("", "entailment", (("premise", "A man plays a guitar."),
                                                        ("hypothesis", "A man plays music.")))
    assert data.prompt(data.train[1]) == ("Does the premise entail the hypothesis?\nPremise: A dog runs.\n"
                                          "Hypothesis: A cat sleeps.\nOptions: entailment, neutral, contradiction\n"
                                          "Answer:")


def test_jsonl_input_needed_only_when_the_template_names_it(tmp_path):
    rows = [{"input": "x {y}", "premise": "p", "output": "neutral"}]
    data = loaded(mnli_task(tmp_path, rows, prompt_template="{premise} | {input} ?"))
    assert data.prompt(data.test[0]) == "p | x {y} ?"
    with pytest.raises(DataError) as info:
        loaded(mnli_task(tmp_path, [{"premise": "p", "output": "neutral"}], prompt_template="{premise} {input}"))
    assert f'{tmp_path / "mnli.jsonl"}:1: no field "input"' in str(info.value)


@pytest.mark.parametrize(("row", "needle"), [
    ({"premise": "p", "output": "neutral"},
     ':2: no field "hypothesis" (the prompt_template names it); fields: [\'output\', \'premise\']'),
    ({"premise": "p", "hypothesis": "h"}, ':2: no field "output" (the target)'),
    ({"premise": "p", "hypothesis": 3, "output": "neutral"}, ':2: field "hypothesis" must be a string, got int'),
    ({"premise": "p", "hypothesis": None, "output": "neutral"}, ':2: field "hypothesis" must be a string'),
    ({"premise": "\ud800", "hypothesis": "h", "output": "neutral"}, ":2: a lone surrogate escape"),
])
def test_jsonl_bad_field(tmp_path, row, needle):
    with pytest.raises(DataError) as info:
        loaded(mnli_task(tmp_path, [MNLI_ROWS[0], row]))
    assert f"{tmp_path / 'mnli.jsonl'}{needle}" in str(info.value)


# ---------------------------------------------------------------- hf, offline, local json


@pytest.fixture
def offline(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-cache"),
                        raising=False)  # outside the project folder, which `refused` finds unchanged


def hf_mnli(tmp_path: Path, rows: list[dict], **extra) -> dict:
    write_rows(tmp_path / "mnli.json", rows)
    return {"name": "mnli", "source": "hf", "dataset": "json", "labels": MNLI_LABELS,
            "data_files": {"train": str(tmp_path / "mnli.json"), "test": str(tmp_path / "mnli.json")},
            "instruction": "Does the premise entail the hypothesis?", "prompt_template": TWO_FIELDS, **extra}


def test_hf_two_field_prompt_with_integer_labels(tmp_path, offline):
    rows = [{"premise": "It rains.", "hypothesis": "It is wet.", "label": 0},
            {"premise": "It rains.", "hypothesis": "It is dry.", "label": 2}]
    data = loaded(hf_mnli(tmp_path, rows))
    assert data.train[1] == Example("", "contradiction", (("premise", "It rains."), ("hypothesis", "It is dry.")))
    assert data.prompt(data.train[0]) == ("Does the premise entail the hypothesis?\nPremise: It rains.\n"
                                          "Hypothesis: It is wet.\nOptions: entailment, neutral, contradiction\n"
                                          "Answer:")


def test_hf_text_field_fills_input_beside_other_columns(tmp_path, offline):
    rows = [{"sentence": "s1", "topic": 5, "label": 1}]  # a non-string column is read with str()
    data = loaded(hf_mnli(tmp_path, rows, text_field="sentence", prompt_template="[{topic}] {input}:"))
    assert data.prompt(data.test[0]) == "[5] s1:"


@pytest.mark.parametrize(("rows", "needle"), [
    ([{"premise": "p", "label": 0}],
     "tasks[mnli]: split 'train' has no column 'hypothesis' (the prompt_template names it); "
     "columns: ['premise', 'label']"),
    ([{"premise": "p", "hypothesis": "h", "label": 0}, {"premise": "p", "hypothesis": None, "label": 1}],
     "tasks[mnli]: train row 2: column 'hypothesis' is empty (null)"),
])
def test_hf_missing_or_null_column(tmp_path, offline, rows, needle):
    with pytest.raises(DataError) as info:
        loaded(hf_mnli(tmp_path, rows))
    assert needle in str(info.value)


# ---------------------------------------------------------------- through `cl-flat validate`


def refused(cli_here, tmp_path, raw, *needles):
    config = write_yaml(tmp_path / "run.yaml", raw)
    with unchanged(tmp_path):
        assert_clean_failure(cli_here(["validate", str(config)], tmp_path), *needles, code=2)


def test_validate_accepts_a_two_field_task(project, cli_here):
    tmp_path, raw = project
    raw["tasks"] = [mnli_task(tmp_path, MNLI_ROWS * 2)]
    result = cli_here(["validate", str(write_yaml(tmp_path / "run.yaml", raw))], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "{premise}" in result.stdout and "prompt_format: plain" in result.stdout


def test_validate_refuses_missing_jsonl_field(project, cli_here):
    tmp_path, raw = project
    raw["tasks"] = [mnli_task(tmp_path, [MNLI_ROWS[0], {"premise": "p", "output": "neutral"}])]
    refused(cli_here, tmp_path, raw, f'{tmp_path / "mnli.jsonl"}:2: no field "hypothesis"')


def test_validate_refuses_missing_hf_column(project, cli_here, offline):
    tmp_path, raw = project
    raw["tasks"] = [hf_mnli(tmp_path, [{"premise": "p", "label": 0}])]
    refused(cli_here, tmp_path, raw, "tasks[mnli]: split 'train' has no column 'hypothesis'")


def test_validate_refuses_bad_template(project, cli_here):
    tmp_path, raw = project
    raw["tasks"][0]["prompt_template"] = "{instruction} {input"
    refused(cli_here, tmp_path, raw, "tasks.0.prompt_template", "not a valid template")


def test_validate_refuses_chat_without_a_chat_template(project, cli_here):
    tmp_path, raw = project
    raw["tasks"][0]["prompt_format"] = "chat"
    refused(cli_here, tmp_path, raw, "tasks.0.prompt_format: chat needs a tokenizer with a chat template",
            "tiny-random:llama has none")
