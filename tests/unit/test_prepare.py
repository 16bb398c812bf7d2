"""`cl-flat data prepare` on small hand-written sources in each real schema (no downloads): O-LoRA's
CL_Benchmark files (tests/fixtures/olora/CL_Benchmark) and hub rows (an in-memory `datasets.Dataset`
with each hub dataset's column names, in place of the download). Plus the shipped O-LoRA configs:
published task orders, task definitions, and a prepared benchmark read through one of them."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cl_flat.config import load_config
from cl_flat.data import Example, check_local_data, load_tasks
from cl_flat.data import prepare as prep
from cl_flat.data.benchmarks import ORDERS, TASKS
from cl_flat.errors import ConfigError, DataError
from helpers import OLORA_BENCHMARK, ROOT

FIXTURE = OLORA_BENCHMARK
CONFIGS = ROOT / "configs" / "benchmarks"
TC = "What is the topic of the following paragraph? Choose one from the option."
SC = "What is the sentiment of the following paragraph? Choose one from the option."
STANDARD_FILES = {f"{t}/{s}.jsonl" for t in ("dbpedia", "amazon", "yahoo", "agnews") for s in ("train", "test")}


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def fixture_rows(category: str, dataset: str, split: str) -> list[dict]:
    rows = json.loads((FIXTURE / category / dataset / f"{split}.json").read_text(encoding="utf-8"))
    return [{"input": r["sentence"], "output": r["label"]} for r in rows]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache", raising=False)


# ---------------------------------------------------------------- from O-LoRA's CL_Benchmark files


def test_cl_benchmark_tasks_become_jsonl_with_their_labels_and_instruction(tmp_path):
    out = tmp_path / "olora"
    manifest = prep.prepare_benchmark("standard", out, str(FIXTURE))
    assert {str(p.relative_to(out)) for p in out.rglob("*.jsonl")} == STANDARD_FILES
    # O-LoRA's own files are the published sample: every row kept, in the file's order
    for name, category, dataset in (("dbpedia", "TC", "dbpedia"), ("amazon", "SC", "amazon"),
                                    ("yahoo", "TC", "yahoo"), ("agnews", "TC", "agnews")):
        for split in ("train", "test"):
            assert jsonl(out / name / f"{split}.jsonl") == fixture_rows(category, dataset, split), (name, split)
    agnews = manifest["tasks"]["agnews"]
    assert agnews["labels"] == ["World", "Sports", "Business", "Science or Technology"]
    assert agnews["instruction"] == TC
    assert manifest["tasks"]["amazon"]["instruction"] == SC
    assert agnews["prompt_template"] == "Task:TC\nDataset:agnews\n{instruction}\nOption: {options} \n{input}\nAnswer:"
    assert agnews["splits"]["train"]["per_label"] == {"World": 2, "Sports": 2, "Business": 1,
                                                       "Science or Technology": 1}
    assert agnews["splits"]["test"]["per_label"] == {"World": 1, "Sports": 0, "Business": 1,
                                                      "Science or Technology": 1}
    dbpedia = manifest["tasks"]["dbpedia"]["splits"]["train"]["per_label"]
    assert {k: v for k, v in dbpedia.items() if v} == {"Company": 2, "Film": 1, "Animal": 1, "Written Work": 1}
    assert manifest["tasks"]["dbpedia"]["published"] == {"train": 14000, "test": 7600}


def test_rows_without_one_of_the_task_labels_are_dropped_and_counted():
    # O-LoRA's MNLI test file holds 131 rows labelled "-" (no gold label); the fixture one
    rows = prep.read_cl_benchmark(FIXTURE, TASKS["mnli"], "test")
    assert [label for _, label in rows.pairs] == ["entailment", "contradiction", "neutral"]
    assert rows.dropped == {"-": 1}


def test_manifest_holds_benchmark_source_seed_sizes_and_each_files_sha256(tmp_path):
    out = tmp_path / "olora"
    prep.prepare_benchmark("standard", out, str(FIXTURE), seed=7)
    manifest = json.loads((out / "prepared.json").read_text())
    assert manifest["benchmark"] == "standard"
    assert manifest["source"] == {"kind": "cl_benchmark", "path": str(FIXTURE.resolve())}
    assert manifest["seed"] == 7
    assert manifest["sampling"]["train_per_class"] == 1000
    assert set(manifest["files"]) == STANDARD_FILES
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    for name, task in manifest["tasks"].items():
        for split, entry in task["splits"].items():
            assert entry["examples"] == len(jsonl(out / name / f"{split}.jsonl")) == sum(entry["per_label"].values())
    assert manifest["tasks"]["yahoo"]["splits"]["train"]["origin"] == "TC/yahoo/train.json"


def test_same_source_and_seed_give_byte_identical_output(tmp_path):
    first = prep.prepare_benchmark("standard", tmp_path / "a", str(FIXTURE), seed=3)
    prep.prepare_benchmark("standard", tmp_path / "b", str(FIXTURE), seed=3)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    assert len(folder_bytes(tmp_path / "a")) == len(first["files"]) + 1


# ---------------------------------------------------------------- malformed sources: one message, file:line


def copy_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "CL_Benchmark"
    shutil.copytree(FIXTURE, root)
    return root


@pytest.mark.parametrize("damage, needle", [
    (lambda root: (root / "TC/yahoo/test.json").unlink(), "TC/yahoo/test.json: file not found"),
    (lambda root: (root / "SC/amazon/train.json").write_text('[\n {"label": "neutral", "sentence": "ok"},\n'
                                                            ' {"label": "neutral"}\n]\n'),
     "SC/amazon/train.json:3: row 2: expected an object with string fields"),
    (lambda root: (root / "TC/dbpedia/test.json").write_text('{"label": "Film"}\n'), "TC/dbpedia/test.json:1: "
                                                                                      "expected a JSON array"),
    (lambda root: (root / "TC/agnews/labels.json").write_text('["World", "Sports", "Business", "Sci/Tech"]\n'),
     "TC/agnews/labels.json:1: labels"),
    (lambda root: (root / "TC/agnews/test.json").write_text('[\n {"label": "World", "sentence": "a"}\n'
                                                            ' {"label": "World", "sentence": "b"}\n]\n'),
     "TC/agnews/test.json:3:2: not valid JSON (expected ',' or ']' after row 1)"),
], ids=["missing-file", "row-without-label", "not-an-array", "other-labels", "missing-comma"])
def test_each_malformed_source_names_its_file_and_line(tmp_path, damage, needle):
    root = copy_fixture(tmp_path)
    damage(root)
    with pytest.raises(DataError) as info:
        prep.prepare_benchmark("standard", tmp_path / "out", str(root))
    assert needle in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bad_options_are_refused_before_anything_is_written(tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError) as info:
        prep.prepare_benchmark("medium", taken, str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "unknown benchmark 'medium'" in message and "--source" in message and "--overwrite" in message
    assert (taken / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


# ---------------------------------------------------------------- --tasks: a partial copy of CL_Benchmark


def test_tasks_prepare_a_partial_copy_in_the_benchmarks_order(tmp_path):
    root = copy_fixture(tmp_path)
    shutil.rmtree(root / "TC" / "dbpedia")
    shutil.rmtree(root / "TC" / "yahoo")
    out = tmp_path / "olora"
    manifest = prep.prepare_benchmark("standard", out, str(root), tasks=["agnews", "amazon"])
    assert manifest["prepared_tasks"] == ["amazon", "agnews"]  # standard: dbpedia, amazon, yahoo, agnews
    assert list(manifest["tasks"]) == ["amazon", "agnews"]
    assert {str(p.relative_to(out)) for p in out.rglob("*.jsonl")} == \
        {f"{t}/{s}.jsonl" for t in ("amazon", "agnews") for s in ("train", "test")}
    assert jsonl(out / "agnews" / "train.jsonl") == fixture_rows("TC", "agnews", "train")
    # the long sequence from the same partial copy: MNLI and AG News, in order 6 (long.sh: mnli first)
    long = prep.prepare_benchmark("long", tmp_path / "long", str(FIXTURE), tasks=["agnews", "mnli"])
    assert long["prepared_tasks"] == [t for t in ORDERS[6] if t in ("agnews", "mnli")]


def test_a_missing_task_folder_is_one_error_naming_it_before_anything_is_written(tmp_path):
    root = copy_fixture(tmp_path)
    shutil.rmtree(root / "TC" / "yahoo")
    with pytest.raises(DataError) as info:
        prep.prepare_benchmark("standard", tmp_path / "out", str(root), tasks=["yahoo", "amazon"])
    assert str(info.value) == f"{root / 'TC' / 'yahoo'}: no such folder (task yahoo)"
    with pytest.raises(DataError) as info:  # every task by default: the hint names the tasks present
        prep.prepare_benchmark("standard", tmp_path / "out", str(root))
    assert str(info.value) == (f"{root / 'TC' / 'yahoo'}: no such folder (task yahoo); prepare the tasks this "
                               "copy has with --tasks dbpedia,amazon,agnews")
    with pytest.raises(ConfigError, match="--tasks: sst3: not a task of the standard benchmark; its tasks: "
                                          "dbpedia, amazon, yahoo, agnews"):
        prep.prepare_benchmark("standard", tmp_path / "out", str(root), tasks=["amazon", "sst3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CL_Benchmark"]  # nothing written, no partial folder


# ---------------------------------------------------------------- an interrupted preparation


def test_an_interrupted_preparation_leaves_no_complete_looking_folder(tmp_path, monkeypatch):
    writes = []
    original = prep._write_jsonl

    def interrupted(path, pairs):
        writes.append(path)
        if len(writes) == 5:
            raise KeyboardInterrupt
        return original(path, pairs)

    monkeypatch.setattr(prep, "_write_jsonl", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_benchmark("standard", tmp_path / "olora", str(FIXTURE))
    assert list(tmp_path.iterdir()) == []

    # an existing complete preparation survives an interrupted --overwrite untouched
    monkeypatch.setattr(prep, "_write_jsonl", original)
    prep.prepare_benchmark("standard", tmp_path / "olora", str(FIXTURE))
    before = folder_bytes(tmp_path / "olora")
    monkeypatch.setattr(prep, "_write_manifest", lambda path, manifest: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        prep.prepare_benchmark("standard", tmp_path / "olora", str(FIXTURE), seed=9, overwrite=True)
    assert folder_bytes(tmp_path / "olora") == before
    assert [p.name for p in tmp_path.iterdir()] == ["olora"]


# ---------------------------------------------------------------- from the hub (rows built in memory)


def hub_tables(dropped_label: int = -1) -> dict[tuple[str, str | None, str], dict[str, list]]:
    """Columns as each hub dataset names them; texts say which class a row is from."""
    def rows(per_class: dict[int, int], make) -> dict[str, list]:
        built = [make(cls, i) for cls, n in per_class.items() for i in range(n)]
        return {key: [row[key] for row in built] for key in built[0]}

    def dbpedia(cls, i):
        return {"label": cls, "title": f"T{cls}-{i}", "content": f" c{cls}-{i}"}

    def amazon(cls, i):
        return {"class_index": cls, "review_title": f"t{cls}-{i}", "review_text": f"stars {cls} #{i}"}

    def yahoo(cls, i):
        return {"id": i, "topic": cls, "question_title": f"q{cls}-{i}",
                "question_content": "" if i % 2 else f"more {cls}-{i}", "best_answer": f"a{cls}-{i}"}

    def agnews(cls, i):
        return {"text": f"news {cls}-{i}", "label": cls}

    return {
        ("fancyzhx/dbpedia_14", None, "train"): rows({c: 1003 for c in range(14)}, dbpedia),
        ("fancyzhx/dbpedia_14", None, "test"): rows({c: 545 for c in range(14)}, dbpedia),  # 7630 > 7600
        ("yassiracharki/Amazon_Reviews_for_Sentiment_Analysis_fine_grained_5_classes", None, "train"):
            rows({c: 1002 for c in range(1, 6)}, amazon),
        ("yassiracharki/Amazon_Reviews_for_Sentiment_Analysis_fine_grained_5_classes", None, "test"):
            rows({c: 2 for c in range(1, 6)}, amazon),
        ("community-datasets/yahoo_answers_topics", None, "train"): rows({c: 1001 for c in range(10)}, yahoo),
        ("community-datasets/yahoo_answers_topics", None, "test"): rows({2: 1, 7: 2}, yahoo),
        ("fancyzhx/ag_news", None, "train"): rows({0: 1001, 1: 1001, 2: 1001, 3: 999}, agnews),
        ("fancyzhx/ag_news", None, "test"): rows({0: 2, 3: 1, dropped_label: 1}, agnews),  # -1: GLUE-style no label
    }


@pytest.fixture
def hub(monkeypatch):
    import datasets

    tables = {key: datasets.Dataset.from_dict(columns) for key, columns in hub_tables().items()}
    calls = []

    def load(dataset, config, split):
        calls.append((dataset, config, split))
        return tables[(dataset, config, split)]

    monkeypatch.setattr(prep, "load_hub_split", load)
    return calls


def test_hub_rows_are_sampled_per_class_rendered_and_labelled(tmp_path, hub):
    out = tmp_path / "olora"
    manifest = prep.prepare_benchmark("standard", out, "hub", seed=5)
    assert sorted(set(hub)) == sorted(hub_tables())
    tasks = manifest["tasks"]
    # 14 x 1003 rows > the published 14000: 1000 of every class; 7630 test rows > 7600: 7600 drawn
    assert set(tasks["dbpedia"]["splits"]["train"]["per_label"].values()) == {1000}
    assert tasks["dbpedia"]["splits"]["test"]["examples"] == 7600
    assert set(tasks["amazon"]["splits"]["train"]["per_label"].values()) == {1000}
    assert set(tasks["yahoo"]["splits"]["train"]["per_label"].values()) == {1000}
    # a class with fewer than 1000 rows gives all of them
    assert tasks["agnews"]["splits"]["train"]["per_label"] == {"World": 1000, "Sports": 1000, "Business": 1000,
                                                                "Science or Technology": 999}
    assert tasks["agnews"]["splits"]["test"]["dropped"] == {"-1": 1}
    assert manifest["source"] == {"kind": "hub"}

    dbpedia = jsonl(out / "dbpedia" / "train.jsonl")
    names = ["Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
             "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work"]
    for row in dbpedia[:50] + dbpedia[-50:]:
        cls, i = row["input"].split("\n")[0].removeprefix("Title: T").split("-")
        assert row == {"input": f"Title: T{cls}-{i}\nText:  c{cls}-{i}\n", "output": names[int(cls)]}
    amazon = jsonl(out / "amazon" / "test.jsonl")
    assert amazon[0] == {"input": "Title: t1-0\nText: stars 1 #0\n", "output": "very negative"}
    assert amazon[-1] == {"input": "Title: t5-1\nText: stars 5 #1\n", "output": "very positive"}
    assert jsonl(out / "yahoo" / "test.jsonl") == [
        {"input": "Title: q2-0\nQuestion: more 2-0\nAnswer: a2-0\n", "output": "Health"},
        {"input": "Title: q7-0\nQuestion: more 7-0\nAnswer: a7-0\n", "output": "Entertainment & Music"},
        {"input": "Question: q7-1\nAnswer: a7-1\n", "output": "Entertainment & Music"}]
    assert jsonl(out / "agnews" / "test.jsonl") == [
        {"input": "Text: news 0-0\n", "output": "World"}, {"input": "Text: news 0-1\n", "output": "World"},
        {"input": "Text: news 3-0\n", "output": "Science or Technology"}]
    # sampled rows keep their source order
    numbers = [int(r["input"].split("-")[1].split("\n")[0]) for r in dbpedia if r["output"] == "Company"]
    assert numbers == sorted(numbers) and len(set(numbers)) == 1000


def test_hub_samples_follow_the_seed_and_only_the_seed(tmp_path, hub):
    prep.prepare_benchmark("standard", tmp_path / "a", "hub", seed=1)
    prep.prepare_benchmark("standard", tmp_path / "b", "hub", seed=1)
    prep.prepare_benchmark("standard", tmp_path / "c", "hub", seed=2)
    assert folder_bytes(tmp_path / "a") == folder_bytes(tmp_path / "b")
    a, c = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "c")
    assert a["dbpedia/train.jsonl"] != c["dbpedia/train.jsonl"]
    assert a["amazon/test.jsonl"] == c["amazon/test.jsonl"]  # kept whole: no draw


def test_a_hub_dataset_without_the_expected_column_is_one_message(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(prep, "load_hub_split", lambda *a: datasets.Dataset.from_dict({"text": ["x"], "y": [0]}))
    with pytest.raises(DataError) as info:
        prep.prepare_benchmark("standard", tmp_path / "out", "hub")
    assert "hub dataset fancyzhx/dbpedia_14 split 'train': no column 'label'" in str(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the shipped O-LoRA configs


BENCHMARK_CONFIGS = [(f"standard_order{n}.yaml", n) for n in (1, 2, 3)] + \
    [(f"long_order{n}.yaml", n) for n in (4, 5, 6)] + [(f"olora_order{n}.yaml", n) for n in range(1, 7)]


@pytest.mark.parametrize("name, order", BENCHMARK_CONFIGS, ids=[n for n, _ in BENCHMARK_CONFIGS])
def test_benchmark_configs_hold_the_published_order_and_task_definitions(name, order):
    config = load_config(CONFIGS / name)
    assert tuple(t.name for t in config.tasks) == ORDERS[order]
    for index, task in enumerate(config.tasks):
        spec = TASKS[task.name]
        assert (task.source, task.dataset, task.text_field, task.label_field) == \
            ("hf", f"data/olora/{task.name}", "input", "output")
        assert tuple(task.labels) == spec.labels
        assert task.instruction == spec.instruction
        assert task.prompt_template == spec.prompt_template
        training = config.task_training(index)
        assert training.learning_rate == (1e-3 if index == 0 else 1e-4)
        assert training.epochs == (2 if task.name == "mnli" and order >= 4 else 1)
    assert config.model.name_or_path == "meta-llama/Llama-2-7b-hf"
    assert (config.lora.r, config.lora.alpha, config.lora.dropout) == (8, 32, 0.1)
    assert config.training.micro_batch_size * config.training.gradient_accumulation_steps * 8 == 64
    assert (config.evaluation.metric, config.evaluation.max_new_tokens) == ("exact_match", 50)
    assert config.evaluation.max_samples_per_task is None
    if name.startswith("olora_"):
        assert (config.lora.strategy, config.lora.lambda_orth, config.lora.lambda_l2) == ("olora", 0.5, 0.0)
        plain = yaml.safe_load((CONFIGS / f"{'standard' if order <= 3 else 'long'}_order{order}.yaml").read_text())
        mine = yaml.safe_load((CONFIGS / name).read_text())
        for raw in (plain, mine):
            raw.pop("lora"), raw.pop("run")
        assert mine == plain  # the same run but for O-LoRA's terms
    else:
        assert config.lora.strategy == "inclora"


def test_task_table_labels_and_orders_are_consistent():
    # the hub's label names must be the task's, or a hub preparation could not be read by the configs
    for spec in TASKS.values():
        assert set(spec.hub.label_names) == set(spec.labels), spec.name
    assert set(ORDERS[1]) == set(ORDERS[2]) == set(ORDERS[3])
    assert set(ORDERS[4]) == set(ORDERS[5]) == set(ORDERS[6]) == set(TASKS)
    assert all(len(order) == len(set(order)) for order in ORDERS.values())


def test_a_prepared_benchmark_is_read_offline_through_a_shipped_config(tmp_path, monkeypatch, offline):
    prep.prepare_benchmark("standard", tmp_path / "data" / "olora", str(FIXTURE))
    monkeypatch.chdir(tmp_path)  # the configs' data/olora/<task> is relative to where one runs
    config = load_config(CONFIGS / "standard_order1.yaml")
    assert check_local_data(config) == []
    tasks = load_tasks(config)
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]
    for task, (category, dataset) in zip(tasks, [("TC", "dbpedia"), ("SC", "amazon"), ("TC", "yahoo"),
                                                 ("TC", "agnews")]):
        for split in ("train", "test"):
            expected = tuple(Example(r["input"], r["output"]) for r in fixture_rows(category, dataset, split))
            assert getattr(task, split) == expected
    dbpedia = tasks[0]
    assert dbpedia.prompt(dbpedia.train[0]) == (
        "Task:TC\nDataset:dbpedia\nWhat is the topic of the following paragraph? Choose one from the option.\n"
        "Option: Company, Educational Institution, Artist, Athlete, Office Holder, Mean of Transportation, Building, "
        "Natural Place, Village, Animal, Plant, Album, Film, Written Work \n"
        "Title: Northwind Anvils\nText:  Northwind Anvils is a maker of forged tools based in Ohio.\n\nAnswer:")
    assert Counter(e.output for e in tasks[3].train) == {"World": 2, "Sports": 2, "Business": 1,
                                                          "Science or Technology": 1}


def test_a_split_smaller_than_the_paper_s_is_a_warning():
    from cl_flat.data.prepare import size_against_published

    # dbpedia: 14 classes x 1000 training examples, 7600 test examples in O-LoRA's paper
    assert size_against_published("dbpedia", "train", 14000) == ""
    assert size_against_published("dbpedia", "test", 40) == \
        "; warning: the paper used 7600, 7560 fewer here (a partial source?)"
    assert size_against_published("dbpedia", "test", 7601) == "; the paper used 7600"
