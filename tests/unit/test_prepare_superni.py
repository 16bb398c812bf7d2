"""`cl-flat data prepare superni` on a small hand-written copy of SAPT's CL_Benchmark/SuperNI (two tasks, in the
Super-NaturalInstructions task-file schema): rows with every reference, the Definition as instruction, --tasks on
a partial copy, and each bad input refused with one message (file:line) through the command. Plus the shipped
SuperNI configs (published orders, SAPT's hyper-parameters) and the message of an unprepared SuperNI config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cl_flat.data.superni import PROMPT_TEMPLATE, SUPERNI_ORDERS, SUPERNI_TASKS
from cl_flat.errors import DataError
from helpers import ROOT, assert_clean_failure

SAMSUM, SST2 = "task1572_samsum_summary", "task363_sst2_polarity_classification"
CONFIGS = ROOT / "configs" / "benchmarks"

# hand-written: samsum's outputs are reference lists (one with two), sst2's plain strings, as in SAPT's files
SAMSUM_TRAIN = """{
  "Contributors": ["someone"],
  "Definition": ["  Summarise the conversation. "],
  "Positive Examples": [{"input": "A: hi", "output": "A greets.", "explanation": "short"}],
  "Instances": [
    {"id": "task1572-a", "input": " Ann: lunch?, Bob: sure ", "output": [" Ann and Bob will have lunch. "]},
    {"id": "task1572-b", "input": "Cat: late again", "output": ["Cat is late.", "Cat will be late."]}
  ]
}
"""
SAMSUM_TEST = """{
  "Definition": ["Summarise the conversation."],
  "Instances": [
    {"id": "task1572-c", "input": "Dan: rain", "output": ["It rains."]}
  ]
}
"""
SST2_TRAIN = """{"Definition": ["Say POS or NEG."], "Instances": [
  {"id": "task363-a", "input": "great film", "output": "POS"},
  {"id": "task363-b", "input": "dull", "output": "NEG"},
  {"id": "task363-c", "input": "fine", "output": "POS"}
]}
"""
SST2_TEST = """{"Definition": "Say POS or NEG.", "Instances": [{"id": "task363-d", "input": "bad", "output": "NEG"}]}
"""


def write_copy(tmp_path: Path) -> Path:
    """A copy of SAPT's CL_Benchmark/ holding two of the SuperNI tasks (and dev.json = test.json, as SAPT's)."""
    root = tmp_path / "CL_Benchmark" / "SuperNI"
    for name, train, test in ((SAMSUM, SAMSUM_TRAIN, SAMSUM_TEST), (SST2, SST2_TRAIN, SST2_TEST)):
        (root / name).mkdir(parents=True)
        (root / name / "train.json").write_text(train, encoding="utf-8")
        for split in ("dev", "test"):
            (root / name / f"{split}.json").write_text(test, encoding="utf-8")
    return root


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def prepare(cli_here, tmp_path: Path, source: Path, *extra: str):
    return cli_here(["data", "prepare", "superni", "--out", str(tmp_path / "out"), "--source", str(source),
                     *extra], tmp_path)


def test_a_superni_copy_becomes_jsonl_with_every_reference_and_the_definition(tmp_path, cli_here):
    root = write_copy(tmp_path)
    result = prepare(cli_here, tmp_path, root.parent, "--tasks", f"{SST2},{SAMSUM}")  # CL_Benchmark/ also works
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert jsonl(out / SAMSUM / "train.jsonl") == [
        {"input": " Ann: lunch?, Bob: sure ", "output": " Ann and Bob will have lunch. ",
         "references": [" Ann and Bob will have lunch. "]},
        {"input": "Cat: late again", "output": "Cat is late.", "references": ["Cat is late.", "Cat will be late."]}]
    assert jsonl(out / SAMSUM / "test.jsonl") == [{"input": "Dan: rain", "output": "It rains.",
                                                   "references": ["It rains."]}]
    assert jsonl(out / SST2 / "train.jsonl") == [
        {"input": "great film", "output": "POS", "references": ["POS"]},
        {"input": "dull", "output": "NEG", "references": ["NEG"]},
        {"input": "fine", "output": "POS", "references": ["POS"]}]
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["benchmark"] == "superni"
    assert manifest["prepared_tasks"] == [SAMSUM, SST2]  # the benchmark's order (order 1), not --tasks'
    samsum = manifest["tasks"][SAMSUM]
    assert samsum["instruction"] == "Summarise the conversation."  # the Definition, stripped (SAPT's)
    assert manifest["tasks"][SST2]["instruction"] == "Say POS or NEG."  # a plain-string Definition
    assert samsum["prompt_template"] == PROMPT_TEMPLATE
    assert samsum["dev_is_test"] is True
    assert samsum["published"] == {"train": 160, "test": 20}
    assert samsum["splits"]["train"]["examples"] == 2 and samsum["splits"]["train"]["multi_reference"] == 1
    assert sorted(manifest["files"]) == sorted(f"{t}/{s}.jsonl" for t in (SAMSUM, SST2) for s in ("train", "test"))
    # sizes are said against SAPT's: 2 of samsum's 160 training instances here
    assert f"{SAMSUM}/train.jsonl: 2 examples; warning: the paper used 160, 158 fewer here" in result.stderr


def test_tasks_prepare_a_partial_copy_and_a_missing_folder_is_one_error(tmp_path, cli_here):
    root = write_copy(tmp_path)
    missing = prepare(cli_here, tmp_path, root)  # all 15 tasks asked of a two-task copy
    xsum = "task1290_xsum_summarization"
    assert_clean_failure(missing, f"{root / xsum}: no such folder (task {xsum})",
                         f"prepare the tasks this copy has with --tasks {SAMSUM},{SST2}", code=2, max_lines=1)
    assert not (tmp_path / "out").exists()
    one = prepare(cli_here, tmp_path, root, "--tasks", SST2)
    assert one.returncode == 0, one.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["prepared.json", SST2]


@pytest.mark.parametrize("name, split, text, where", [
    (SST2, "train", '{"Definition": ["x"], "Instances": [\n  {"input": "a", "output": "b"},\n  {"input": "c",\n]}\n',
     ":4:1: not valid JSON"),
    (SST2, "test", '{"Definition": ["x"],\n "Instances": [\n  {"input": "a", "output": "b"},\n  {"input": 3, '
     '"output": "b"}\n]}\n', ":4: instance 2: expected an object with a string \"input\""),
    (SAMSUM, "train", '{"Definition": ["x"], "Instances": [\n {"input": "a", "output": []}\n]}\n',
     ":2: instance 1: expected"),
    (SAMSUM, "test", '{\n "Definition": [],\n "Instances": []\n}\n', ":2: \"Definition\" must be a non-empty string"),
    (SAMSUM, "test", '[{"input": "a", "output": "b"}]\n', ":1: expected a Super-NaturalInstructions task"),
])
def test_a_malformed_task_file_is_one_error_naming_file_and_line(tmp_path, cli_here, name, split, text, where):
    root = write_copy(tmp_path)
    (root / name / f"{split}.json").write_text(text, encoding="utf-8")
    result = prepare(cli_here, tmp_path, root, "--tasks", f"{SAMSUM},{SST2}")
    assert_clean_failure(result, f"error: {root / name / split}.json{where}", code=2)
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")  # after the splits read before it
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["CL_Benchmark"]  # no partial folder left


def test_hub_is_refused_pointing_to_sapt_s_files(tmp_path, cli_here):
    result = cli_here(["data", "prepare", "superni", "--out", str(tmp_path / "out")], tmp_path)  # --source hub
    assert_clean_failure(result, "--source: hub: no hub dataset holds SAPT's SuperNI samples",
                         "local copy of SAPT's CL_Benchmark/SuperNI folder", code=2)
    assert not (tmp_path / "out").exists()


def test_task_table_and_orders_are_consistent():
    assert set(SUPERNI_ORDERS[1]) == set(SUPERNI_ORDERS[2]) == set(SUPERNI_TASKS)
    assert len(SUPERNI_ORDERS[1]) == len(set(SUPERNI_ORDERS[2])) == 15
    assert SUPERNI_ORDERS[1][:2] == (SAMSUM, SST2)  # gen_script_superni_t5.py, order_idx 1
    assert SUPERNI_ORDERS[2][0] == "task748_glucose_reverse_cause_event_detection"  # order_idx 2
    assert sum(t.train_size for t in SUPERNI_TASKS.values()) == 11741  # SAPT's 15 train.json files
    assert sum(t.test_size for t in SUPERNI_TASKS.values()) == 1197


SUPERNI_CONFIGS = [(f"{prefix}superni_order{n}.yaml", n) for prefix in ("", "t5_") for n in (1, 2)]


@pytest.mark.parametrize("name, order", SUPERNI_CONFIGS, ids=[n for n, _ in SUPERNI_CONFIGS])
def test_superni_configs_hold_the_published_order_and_settings(name, order):
    # read as YAML: the configs validate once the rouge_l metric exists (tests/unit/test_shipped_configs.py)
    raw = yaml.safe_load((CONFIGS / name).read_text())
    assert tuple(t["name"] for t in raw["tasks"]) == SUPERNI_ORDERS[order]
    for task in raw["tasks"]:
        assert (task["source"], task["train"], task["test"], task["metric"]) == \
            ("jsonl", f"data/superni/{task['name']}/train.jsonl", f"data/superni/{task['name']}/test.jsonl", "rouge_l")
        assert task["prompt_template"] == PROMPT_TEMPLATE and task["instruction"].strip() == task["instruction"] != ""
    training, lora = raw["training"], raw["lora"]
    t5 = name.startswith("t5_")
    assert (lora["r"], lora["alpha"], lora["dropout"]) == (4, 32, 0.0)
    assert (training["learning_rate"], training["epochs"]) == ((3e-4, 100) if t5 else (5e-5, 50))
    gpus = 1 if t5 else 4  # SAPT's scripts: one GPU for T5, deepspeed --num_gpus=4 for LLaMA
    assert training["micro_batch_size"] * training["gradient_accumulation_steps"] * gpus == 32
    assert (raw["evaluation"]["metric"], raw["evaluation"]["max_new_tokens"]) == ("rouge_l", 50)


def test_an_unprepared_superni_config_names_the_prepare_command(tmp_path, monkeypatch):
    from cl_flat.config import validate_config
    from cl_flat.data.sources import check_local_data, load_tasks

    monkeypatch.chdir(tmp_path)
    tasks = [{"name": n, "source": "jsonl", "train": f"data/superni/{n}/train.jsonl",
              "test": f"data/superni/{n}/test.jsonl", "metric": "exact_match"} for n in (SAMSUM, SST2)]
    tasks.append({"name": "mine", "source": "jsonl", "train": "data/mine/train.jsonl", "test": "data/mine/test.jsonl",
                  "metric": "exact_match"})
    config = validate_config({"model": {"name_or_path": "tiny-random:llama"}, "tasks": tasks})
    with pytest.raises(DataError) as info:
        load_tasks(config)
    folder = Path("data") / "superni"  # as the config names it, relative to where one runs
    assert str(info.value) == (
        f"dataset folder not found: tasks[{SAMSUM}] {folder / SAMSUM}, tasks[{SST2}] {folder / SST2}; prepare them "
        f"first: cl-flat data prepare superni --out {folder} --source PATH (a copy of SAPT's CL_Benchmark/SuperNI "
        "folder; there is no hub source); see docs/benchmarks.md")
    # a jsonl task outside any benchmark keeps its own error: its missing file
    with pytest.raises(DataError, match=r"data/mine/train.jsonl: file not found"):
        check_local_data(config)
