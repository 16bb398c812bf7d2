"""MNLI-shaped tasks (premise, hypothesis -> entailment/neutral/contradiction) through a two-field prompt
template train end to end on the tiny Llama, from jsonl and from an hf `data_files` json source, and
`cl-flat eval` re-scores them from the run folder; `train` refuses `prompt_format: chat` on a model whose
tokenizer has no chat template before writing anything."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from helpers import assert_clean_failure, run_cli, unchanged, write_yaml

pytestmark = pytest.mark.integration

LABELS = ["entailment", "neutral", "contradiction"]
TEMPLATE = "{instruction}\nPremise: {premise}\nHypothesis: {hypothesis}\nOptions: {options}\nAnswer:"


def mnli_rows(n: int, integer_labels: bool) -> list[dict]:
    rows = []
    for i in range(n):
        k = i % 3
        rows.append({"premise": f"sample {i}: the {['cat', 'dog', 'bird'][k]} sits", "hypothesis": f"an animal {k}",
                     "label" if integer_labels else "output": k if integer_labels else LABELS[k]})
    return rows


def write_rows(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def mnli_config(tmp_path: Path) -> dict:
    data = tmp_path / "data"
    jsonl = {"name": "mnli_jsonl", "source": "jsonl", "labels": LABELS, "prompt_template": TEMPLATE,
             "train": write_rows(data / "j_train.jsonl", mnli_rows(8, False)),
             "test": write_rows(data / "j_test.jsonl", mnli_rows(6, False))}
    hf = {"name": "mnli_hf", "source": "hf", "dataset": "json", "labels": LABELS, "prompt_template": TEMPLATE,
          "data_files": {"train": write_rows(data / "h_train.json", mnli_rows(8, True)),
                         "test": write_rows(data / "h_test.json", mnli_rows(6, True))}}
    return {"run": {"name": "mnli", "output_dir": str(tmp_path / "results"), "seed": 1},
            "model": {"name_or_path": "tiny-random:llama"},
            "lora": {"r": 2, "target_modules": ["q_proj"]},
            "tasks": [jsonl, hf],
            "training": {"micro_batch_size": 2, "max_steps": 2},
            "evaluation": {"max_samples_per_task": 6, "batch_size": 4, "sharpness": False},
            "logging": {"progress": False, "wandb": {"mode": "disabled"}}}


def test_two_field_tasks_train_and_rescore(tmp_path):
    config = write_yaml(tmp_path / "config.yaml", mnli_config(tmp_path))
    proc = run_cli(["train", str(config)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "results" / "mnli"
    with open(folder / "acc_matrix.csv") as handle:
        rows = list(csv.reader(handle))
    assert [row[0] for row in rows] == ["after_task", "zero_shot", "mnli_jsonl", "mnli_hf"]
    assert rows[0][1:] == ["mnli_jsonl", "mnli_hf"]
    # 6 test examples per task: every score (in %) is a multiple of 100/6
    assert all(abs(float(v) * 0.06 - round(float(v) * 0.06)) < 1e-6 for row in rows[1:] for v in row[1:])
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert [t["prompt_template"] for t in saved["tasks"]] == [TEMPLATE, TEMPLATE]
    assert len(saved["meta"]["data_fingerprints"]) == 4
    proc = run_cli(["eval", str(folder)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_refuses_chat_without_a_chat_template(tmp_path):
    raw = mnli_config(tmp_path)
    raw["tasks"][1]["prompt_format"] = "chat"
    config = write_yaml(tmp_path / "config.yaml", raw)
    with unchanged(tmp_path):
        assert_clean_failure(run_cli(["train", str(config)], cwd=tmp_path),
                             "tasks.1.prompt_format: chat needs a tokenizer with a chat template",
                             "tiny-random:llama has none", code=2)
