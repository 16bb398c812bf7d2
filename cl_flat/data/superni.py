"""SAPT's SuperNI continual-learning benchmark (Zhao et al., "SAPT: A Shared Attention Framework for
Parameter-Efficient Continual Learning of Large Language Models", ACL 2024; also GainLoRA, Liang et al., NeurIPS
2025) as data: 15 generation tasks of Super-NaturalInstructions (Wang et al., EMNLP 2022), prepared by
`cl-flat data prepare superni --source PATH` (cl_flat.data.prepare) and scored with ROUGE-L.

Every name, number and string below is read off the authors' repository circle-hit/SAPT (commit 52a52b9; the
SuperNI files of liangyanshuo/gainlora are the same blobs); paths are relative to it.
- Data: `CL_Benchmark/SuperNI/<task>/{train,dev,test}.json`, each one Super-NaturalInstructions task file
  (`"Definition": [instruction]`, `"Instances": [{"id", "input", "output": [references...]}]`, plus "Positive
  Examples" etc., unused here): the authors' own sample of each task, kept whole ("sampling strategy": "full"
  in `configs/SuperNI/<task>/{train,dev,test}_tasks.json`). Its sizes are `SuperNITask.train_size` and
  `test_size`: 1000 training and 100 test instances, or fewer where the task has fewer. dev.json is
  byte-identical to test.json in every task, so SAPT's best-checkpoint selection on dev (`--load_best_model_at_end
  --metric_for_best_model eval_rougeL`) looks at the test set; cl-flat prepares train and test only.
- Instruction: the task's Definition (its first element, stripped, `src/cl_dataset.py` line 245). Prompt: SAPT's
  zero-shot SuperNI prompt `PROMPT_TEMPLATE` (`src/cl_dataset.py` lines 245-271: "Definition: " + definition +
  "\\n\\n", then "Now complete the following example -\\nInput: {0}\\nOutput: ").
- Targets: an instance's `output` is a list of references (a string in the three classification tasks). SAPT
  trains on one reference drawn at random and scores ROUGE-L against that one (`src/cl_dataset.py` lines 277-280,
  `src/compute_metrics.py` `compute_metrics`: `gold = [gold]`); the prepared rows keep the first as `output`
  and all of them as `references` (Super-NaturalInstructions' own evaluation takes the best over all references).
- Task orders: `gen_script_superni_{t5,llama}.py` lines 28-59 (`order_idx` 1 and 2), the same sequences as
  GainLoRA's `gen_script_superni_order{1,2}_t5_*.sh` (`--task_order`).

There is no hub source: the samples are the authors' draw from Super-NaturalInstructions, which no hub dataset
reproduces; the preparation refuses `--source hub` rather than guess one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cl_flat.errors import DataError
from cl_flat.files import json_array, line_col, skip_space

SUPERNI = "superni"
SOURCE_HINT = "PATH (a copy of SAPT's CL_Benchmark/SuperNI folder; there is no hub source)"
PROMPT_TEMPLATE = "Definition: {instruction}\n\nNow complete the following example -\nInput: {input}\nOutput: "


@dataclass(frozen=True)
class SuperNITask:
    name: str  # SAPT's folder name, the cl-flat task name and its folder in the prepared data
    train_size: int  # instances in SAPT's train.json
    test_size: int  # instances in SAPT's test.json (= dev.json)


SUPERNI_TASKS: dict[str, SuperNITask] = {t.name: t for t in (
    SuperNITask("task1572_samsum_summary", 160, 20),
    SuperNITask("task363_sst2_polarity_classification", 1000, 100),
    SuperNITask("task1290_xsum_summarization", 1000, 100),
    SuperNITask("task181_outcome_extraction", 338, 43),
    SuperNITask("task002_quoref_answer_generation", 1000, 100),
    SuperNITask("task1510_evalution_relation_extraction", 1000, 100),
    SuperNITask("task639_multi_woz_user_utterance_generation", 142, 18),
    SuperNITask("task1729_personachat_generate_next", 1000, 100),
    SuperNITask("task073_commonsenseqa_answer_generation", 975, 100),
    SuperNITask("task1590_diplomacy_text_generation", 126, 16),
    SuperNITask("task748_glucose_reverse_cause_event_detection", 1000, 100),
    SuperNITask("task511_reddit_tifu_long_text_summarization", 1000, 100),
    SuperNITask("task591_sciq_answer_generation", 1000, 100),
    SuperNITask("task1687_sentiment140_classification", 1000, 100),
    SuperNITask("task875_emotion_classification", 1000, 100),
)}

SUPERNI_ORDERS: dict[int, tuple[str, ...]] = {
    1: tuple(SUPERNI_TASKS),
    2: ("task748_glucose_reverse_cause_event_detection", "task073_commonsenseqa_answer_generation",
        "task1590_diplomacy_text_generation", "task639_multi_woz_user_utterance_generation",
        "task1572_samsum_summary", "task1687_sentiment140_classification", "task591_sciq_answer_generation",
        "task363_sst2_polarity_classification", "task1510_evalution_relation_extraction",
        "task1729_personachat_generate_next", "task181_outcome_extraction",
        "task511_reddit_tifu_long_text_summarization", "task002_quoref_answer_generation",
        "task1290_xsum_summarization", "task875_emotion_classification"),
}


@dataclass
class SuperNISplit:
    """One split of one task as read from SAPT's file: the Definition and (input, references) in file order."""

    instruction: str
    examples: list[tuple[str, list[str]]]
    origin: str


def superni_root(source: Path) -> Path:
    """The folder holding the task folders: `source` itself, or `source/SuperNI` when given CL_Benchmark/."""
    return source / "SuperNI" if (source / "SuperNI").is_dir() else source


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"{path}: file not found (SAPT's layout: CL_Benchmark/SuperNI/<task>/{{train,test}}.json)")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _top_level(path: Path, text: str) -> tuple[dict, int | None]:
    """The task file's top-level object, and the offset of its "Instances" value (None when absent)."""
    try:
        task = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}:{exc.colno}: not valid JSON ({exc.msg})") from None
    if not isinstance(task, dict):
        raise DataError(f"{path}:1: expected a Super-NaturalInstructions task (a JSON object with "
                        "\"Definition\" and \"Instances\")")
    decoder, where = json.JSONDecoder(), None
    pos = skip_space(text, skip_space(text, 0) + 1)
    while not text.startswith("}", pos):  # the object is valid JSON: walk its keys to find where Instances starts
        key, pos = decoder.raw_decode(text, pos)
        pos = skip_space(text, skip_space(text, pos) + 1)  # past ':'
        if key == "Instances":
            where = pos
        pos = skip_space(text, decoder.raw_decode(text, pos)[1])
        pos = skip_space(text, pos + 1) if text.startswith(",", pos) else pos
    return task, where


def _definition(path: Path, text: str, task: dict) -> str:
    definition = task.get("Definition")
    if isinstance(definition, list) and definition:
        definition = definition[0]
    if not isinstance(definition, str) or not definition.strip():
        line = line_col(text, text.find('"Definition"'))[0] if '"Definition"' in text else 1
        raise DataError(f"{path}:{line}: \"Definition\" must be a non-empty string or a list whose first element "
                        "is one (the task's instruction)")
    return definition.strip()


def read_superni(root: Path, name: str, split: str) -> SuperNISplit:
    """One split of a task from SAPT's CL_Benchmark/SuperNI folder `root`: its Definition and every instance's
    input with its references (a string output is one reference); malformed rows are one error at file:line."""
    path = root / name / f"{split}.json"
    text = _read_text(path)
    task, start = _top_level(path, text)
    instruction = _definition(path, text, task)
    if start is None or not isinstance(task["Instances"], list):
        raise DataError(f"{path}:1: expected \"Instances\": a JSON array of {{\"input\", \"output\"}} objects")
    examples: list[tuple[str, list[str]]] = []
    for number, (row, line) in enumerate(json_array(path, text, start)[0], start=1):
        output = row.get("output") if isinstance(row, dict) else None
        references = [output] if isinstance(output, str) else output
        if not isinstance(row, dict) or not isinstance(row.get("input"), str) or not isinstance(references, list) \
                or not references or not all(isinstance(r, str) for r in references):
            raise DataError(f"{path}:{line}: instance {number}: expected an object with a string \"input\" and an "
                            "\"output\" that is a string or a non-empty list of strings")
        examples.append((row["input"], references))
    if not examples:
        raise DataError(f"{path}: no instances")
    return SuperNISplit(instruction, examples, str(Path(name) / f"{split}.json"))


def dev_is_test(root: Path, name: str) -> bool | None:
    """Whether the task's dev.json is byte-identical to its test.json (SAPT's are); None without a dev.json."""
    dev = root / name / "dev.json"
    return dev.read_bytes() == (root / name / "test.json").read_bytes() if dev.is_file() else None
