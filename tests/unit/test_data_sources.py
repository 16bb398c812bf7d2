"""Task sources (jsonl, hf offline from local files), the prompt format, and tokenised batches.

Expected values are written by hand: line numbers of the files written here, the prompt
template filled in by hand, and token lists chosen by hand for encode/collate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cl_flat.config import validate_config
from cl_flat.data import DataError, Example, TaskData, load_task
from cl_flat.data.batches import Encoded, collate, encode
from cl_flat.data.sources import read_jsonl
from cl_flat.loss import IGNORE


def run_config(task: dict):
    return validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": [task]})


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def row(text: str, label: str) -> str:
    return json.dumps({"input": text, "output": label})


# ---------------------------------------------------------------- jsonl


def test_jsonl_good_file(tmp_path):
    path = write_lines(tmp_path / "good.jsonl", [row("first", "pos"), row("second", "neg"), row("third", "pos")])
    assert read_jsonl(path, ["pos", "neg"]) == [Example("first", "pos"), Example("second", "neg"),
                                                Example("third", "pos")]


def test_jsonl_task_via_load_task(tmp_path):
    train = write_lines(tmp_path / "tr.jsonl", [row("a", "pos"), row("b", "neg")])
    test = write_lines(tmp_path / "te.jsonl", [row("c", "neg")])
    config = run_config({"name": "j", "source": "jsonl", "train": str(train), "test": str(test),
                         "labels": ["pos", "neg"], "instruction": "Judge it."})
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert data.name == "j"
    assert data.labels == ("pos", "neg")
    assert data.metric == "accuracy"
    assert data.train == (Example("a", "pos"), Example("b", "neg"))
    assert data.test == (Example("c", "neg"),)
    assert data.instruction == "Judge it."


def test_jsonl_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


def test_jsonl_missing_file_via_load_task(tmp_path):
    good = write_lines(tmp_path / "tr.jsonl", [row("a", "pos")])
    config = run_config({"name": "j", "source": "jsonl", "train": str(good), "test": str(tmp_path / "nope.jsonl"),
                         "labels": ["pos", "neg"]})
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert "nope.jsonl" in str(info.value)


def test_jsonl_malformed_line_reports_its_1_based_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", [
        row("one", "pos"),          # line 1
        "",                         # line 2 (blank lines still count)
        row("three", "neg"),        # line 3
        '{"input": "four", "output": ',  # line 4: truncated JSON
        row("five", "pos"),         # line 5
    ])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert f"{path}:4" in message
    assert f"{path}:5" not in message and f"{path}:3" not in message


def test_jsonl_malformed_first_line(tmp_path):
    path = write_lines(tmp_path / "bad1.jsonl", ["not json at all", row("b", "neg")])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"{path}:1" in str(info.value)


def test_jsonl_row_without_output(tmp_path):
    path = write_lines(tmp_path / "noout.jsonl", [row("a", "pos"), json.dumps({"input": "b", "label": "neg"})])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"{path}:2" in str(info.value)
    assert "output" in str(info.value)


def test_jsonl_non_string_output(tmp_path):
    path = write_lines(tmp_path / "num.jsonl", [json.dumps({"input": "a", "output": 1})])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert f"{path}:1" in str(info.value)


def test_jsonl_output_not_among_labels(tmp_path):
    path = write_lines(tmp_path / "lab.jsonl", [row("a", "pos"), row("b", "neg"), row("c", "maybe")])
    with pytest.raises(DataError) as info:
        read_jsonl(path, ["pos", "neg"])
    message = str(info.value)
    assert f"{path}:3" in message
    assert "maybe" in message


def test_jsonl_empty_file(tmp_path):
    path = write_lines(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError) as info:
        read_jsonl(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- hf, offline, local files


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)



def hf_config(tmp_path, dataset: str, train: str, test: str, **extra):
    """A one-task run config with an `hf` task over local files in tmp_path (labels a, b)."""
    return run_config({"name": "h", "source": "hf", "dataset": dataset, "labels": ["a", "b"],
                       "data_files": {"train": str(tmp_path / train), "test": str(tmp_path / test)}, **extra})

def test_hf_csv_with_integer_labels_mapped_through_labels(tmp_path, offline):
    (tmp_path / "train.csv").write_text("text,label\ngreat food,1\nawful service,0\nfine,1\n")
    (tmp_path / "test.csv").write_text("text,label\ncold soup,0\n")
    config = run_config({"name": "h", "source": "hf", "dataset": "csv",
                         "data_files": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")},
                         "labels": ["negative", "positive"]})
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert data.train == (Example("great food", "positive"), Example("awful service", "negative"),
                          Example("fine", "positive"))
    assert data.test == (Example("cold soup", "negative"),)
    assert data.labels == ("negative", "positive")


def test_hf_json_with_string_labels_and_custom_fields(tmp_path, offline):
    lines = [json.dumps({"sentence": "hello", "y": "greeting"}), json.dumps({"sentence": "bye", "y": "farewell"})]
    write_lines(tmp_path / "train.json", lines)
    write_lines(tmp_path / "test.json", lines[::-1])
    config = run_config({"name": "h", "source": "hf", "dataset": "json", "text_field": "sentence", "label_field": "y",
                         "data_files": {"train": str(tmp_path / "train.json"), "test": str(tmp_path / "test.json")},
                         "labels": ["greeting", "farewell"]})
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert data.train == (Example("hello", "greeting"), Example("bye", "farewell"))
    assert data.test == (Example("bye", "farewell"), Example("hello", "greeting"))


def test_hf_references_field_gives_every_acceptable_answer(tmp_path, offline):
    """`references_field` names a column of string lists: a row's references, as jsonl's "references" key."""
    rows = [{"text": "2+2", "answer": "4", "refs": ["4", "four"]}, {"text": "1+1", "answer": "2", "refs": ["2"]}]
    write_lines(tmp_path / "d.json", [json.dumps(r) for r in rows])
    task = {"name": "h", "source": "hf", "dataset": "json", "label_field": "answer", "references_field": "refs",
            "metric": "rouge_l", "data_files": {"train": str(tmp_path / "d.json"), "test": str(tmp_path / "d.json")}}
    config = run_config(task)
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert [(e.output, e.references) for e in data.test] == [("4", ("4", "four")), ("2", ("2",))]
    write_lines(tmp_path / "bad.json", [json.dumps({**rows[0], "refs": "4"})])
    bad = run_config({**task, "data_files": {"train": str(tmp_path / "bad.json"), "test": str(tmp_path / "bad.json")}})
    with pytest.raises(DataError, match=r'tasks\[h\]: train row 1: "refs" must be a non-empty list of strings'):
        load_task(bad.tasks[0], bad.run.seed, bad.evaluation.metric)
    missing = run_config({**task, "references_field": "answers"})
    with pytest.raises(DataError, match=r"no column 'answers' \(references_field\)"):
        load_task(missing.tasks[0], missing.run.seed, missing.evaluation.metric)


def test_hf_string_label_not_among_labels(tmp_path, offline):
    write_lines(tmp_path / "d.json", [json.dumps({"text": "x", "label": "a"}), json.dumps({"text": "y", "label": "c"})])
    config = hf_config(tmp_path, "json", "d.json", "d.json")
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert "'c'" in str(info.value)


def test_hf_integer_label_out_of_range(tmp_path, offline):
    (tmp_path / "d.csv").write_text("text,label\nx,0\ny,2\n")
    config = hf_config(tmp_path, "csv", "d.csv", "d.csv")
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert "2" in str(info.value) and "labels" in str(info.value)


@pytest.mark.parametrize("missing_field", ["text_field", "label_field"])
def test_hf_missing_column_is_named(tmp_path, offline, missing_field):
    (tmp_path / "d.csv").write_text("text,label\nx,0\ny,1\n")
    task = {"name": "h", "source": "hf", "dataset": "csv",
            "data_files": {"train": str(tmp_path / "d.csv"), "test": str(tmp_path / "d.csv")},
            "labels": ["a", "b"], missing_field: "no_such_column"}
    config = run_config(task)
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert "no_such_column" in str(info.value)


def test_hf_missing_data_file(tmp_path, offline):
    (tmp_path / "d.csv").write_text("text,label\nx,0\n")
    config = hf_config(tmp_path, "csv", "d.csv", "gone.csv")
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert "gone.csv" in str(info.value)


# ---------------------------------------------------------------- prompt format


def test_prompt_default_template_filled_by_hand():
    data = TaskData(name="t", instruction="Is the review positive?", labels=("positive", "negative", "mixed"),
                    metric="accuracy", template="{instruction}\nOptions: {options}\nInput: {input}\nAnswer:",
                    train=(), test=())
    assert data.prompt(Example("The soup was cold.", "negative")) == (
        "Is the review positive?\nOptions: positive, negative, mixed\nInput: The soup was cold.\nAnswer:")


def test_prompt_of_a_loaded_task_uses_the_default_template(tmp_path):
    train = write_lines(tmp_path / "tr.jsonl", [row("nice {braces} here", "pos")])
    config = run_config({"name": "j", "source": "jsonl", "train": str(train), "test": str(train),
                         "labels": ["pos", "neg"], "instruction": "Rate it."})
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert data.prompt(data.train[0]) == "Rate it.\nOptions: pos, neg\nInput: nice {braces} here\nAnswer:"


def test_prompt_custom_template(tmp_path):
    train = write_lines(tmp_path / "tr.jsonl", [row("2+2", "4")])
    config = run_config({"name": "j", "source": "jsonl", "train": str(train), "test": str(train),
                         "metric": "exact_match", "instruction": "Compute.",
                         "prompt_template": "Q: {input} ({instruction}) A:"})
    data = load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert data.labels is None
    assert data.prompt(data.train[0]) == "Q: 2+2 (Compute.) A:"


# ---------------------------------------------------------------- encode / collate


def test_encode_fits_without_truncation():
    enc = encode([1, 2, 3], [7, 8], max_length=10)
    assert enc.input_ids == (1, 2, 3, 7, 8)
    assert enc.labels == (IGNORE, IGNORE, IGNORE, 7, 8)


def test_encode_exactly_at_max_length():
    enc = encode([1, 2, 3], [7, 8], max_length=5)
    assert enc.input_ids == (1, 2, 3, 7, 8)
    assert enc.labels == (-100, -100, -100, 7, 8)


def test_encode_truncates_the_prompt_from_the_left():
    enc = encode([1, 2, 3, 4, 5, 6], [7, 8], max_length=5)
    assert enc.input_ids == (4, 5, 6, 7, 8)
    assert enc.labels == (-100, -100, -100, 7, 8)


def test_encode_keeps_the_whole_target_even_when_the_budget_is_tiny():
    enc = encode([1, 2, 3, 4], [7, 8, 9], max_length=3)
    assert enc.input_ids[-3:] == (7, 8, 9)
    assert enc.labels[-3:] == (7, 8, 9)
    assert all(label == -100 for label in enc.labels[:-3])
    assert 1 not in enc.input_ids  # the prompt was cut from the left


def test_collate_right_padding():
    items = [Encoded((1, 2, 3, 7), (-100, -100, -100, 7)), Encoded((4, 8), (-100, 8))]
    batch = collate(items, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [4, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7], [-100, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_left_padding():
    items = [Encoded((1, 2, 3, 7), (-100, -100, -100, 7)), Encoded((4, 8), (-100, 8))]
    batch = collate(items, pad_id=99, left_pad=True)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7], [99, 99, 4, 8]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 7], [-100, -100, -100, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]


def test_collate_pad_id_that_is_also_a_target_token_is_masked_by_labels():
    # pad_id 8 equals a real target token: only padding positions must be -100 / mask 0
    items = [Encoded((5, 8), (-100, 8)), Encoded((5,), (-100,))]
    batch = collate(items, pad_id=8)
    assert batch["input_ids"].tolist() == [[5, 8], [5, 8]]
    assert batch["labels"].tolist() == [[-100, 8], [-100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_encode_examples_with_the_byte_tokenizer():
    from cl_flat.data.batches import encode_examples
    from cl_flat.models import byte_tokenizer

    tokenizer = byte_tokenizer()
    data = TaskData(name="t", instruction="Pick.", labels=("pos", "neg"), metric="accuracy",
                    template="{instruction} {input}", train=(), test=())
    (enc,) = encode_examples(data, tokenizer, [Example("ok", "pos")], max_length=64)
    prompt = tokenizer("Pick. ok", add_special_tokens=True)["input_ids"]
    target = tokenizer(" pos", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(enc.input_ids) == prompt + target
    assert list(enc.labels) == [-100] * len(prompt) + target
    assert tokenizer.decode(target[:-1]) == " pos"


def test_hf_data_files_naming_a_directory_is_said_as_such(tmp_path, offline):
    (tmp_path / "d.csv").write_text("text,label\nx,0\n")
    (tmp_path / "folder").mkdir()
    config = hf_config(tmp_path, "csv", "d.csv", "folder")
    with pytest.raises(DataError) as info:
        load_task(config.tasks[0], config.run.seed, config.evaluation.metric)
    assert str(info.value) == f"tasks[h]: data_files {tmp_path / 'folder'}: is a directory (expected a file or a glob)"


def _hf_tasks(*datasets: str) -> list[dict]:
    return [{"name": f"x{i}", "source": "hf", "dataset": d, "labels": ["a", "b"]} for i, d in enumerate(datasets)]


def test_an_unprepared_benchmark_names_its_folders_and_the_prepare_command(tmp_path, monkeypatch):
    from cl_flat.data.sources import check_local_data, load_tasks

    monkeypatch.chdir(tmp_path)
    tasks = _hf_tasks("data/olora/mnli", "data/olora/cb")
    tasks.append({"name": "hub", "source": "hf", "dataset": "org/set", "labels": ["a", "b"]})
    config = validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": tasks})
    expected = ("dataset folder not found: tasks[x0] data/olora/mnli, tasks[x1] data/olora/cb; prepare them first: "
                "cl-flat data prepare long --out data/olora --source PATH (a copy of O-LoRA's CL_Benchmark folder) "
                "or --source hub; see docs/benchmarks.md")  # mnli and cb are tasks of the long sequence only
    assert check_local_data(config) == [expected, "tasks[hub]: hub dataset 'org/set' is not checked (no download)"]
    with pytest.raises(DataError) as info:
        load_tasks(config)
    assert str(info.value) == expected


def test_missing_folders_outside_one_benchmark_folder_are_only_named(tmp_path, monkeypatch):
    from cl_flat.data.sources import unprepared_message

    monkeypatch.chdir(tmp_path)
    (tmp_path / "here" / "agnews").mkdir(parents=True)  # present: not named
    config = validate_config({"model": {"name_or_path": "tiny-random:llama"},
                              "tasks": _hf_tasks("a/b/dbpedia", "./c/yahoo", "here/agnews", "./mine")})
    assert unprepared_message(config.tasks) == \
        "dataset folder not found: tasks[x0] a/b/dbpedia, tasks[x1] ./c/yahoo, tasks[x3] ./mine"
