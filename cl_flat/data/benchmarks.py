"""O-LoRA's continual-learning benchmarks (Wang et al., EMNLP Findings 2023) as data.

Two benchmarks, prepared by `cl-flat data prepare` (cl_flat.data.prepare):
- `standard`: DBpedia, Amazon, Yahoo, AG News (task orders 1-3);
- `long`: the 15-task sequence (orders 4-6): Yelp, Amazon, MNLI, CB, COPA, QQP, RTE, IMDB, SST-2,
  DBpedia, AG News, Yahoo, MultiRC, BoolQ, WiC.

Every number and string below is read off the authors' repository cmnfriend/O-LoRA (commit 07117e1);
paths are relative to it.
- Label names and their order (the order the prompt's option list shows): `CL_Benchmark/<category>/
  <dataset>/labels.json` of each task.
- Instructions: `configs/instruction_config.json`, one per category (NLI, QQP, SC, TC, BoolQA, MultiRC,
  WiC); COPA has none: its prompt is the question itself then "Answer:" (`src/uie_dataset_lora.py`
  line 413). The prompt is `Task:<category>\\nDataset:<dataset>\\n` (`src/uie_collator.py` lines 59-67,
  the scripts pass `--add_task_name True --add_dataset_name True`) + the instruction + `Option: <labels
  joined by ", "> \\n<sentence>\\nAnswer:` (`src/uie_dataset_lora.py` lines 283, 310, 336, ...).
- Sample sizes: O-LoRA trains and tests on the whole of its CL_Benchmark files (`"sampling strategy":
  "full"` in `configs/*_configs/<task>/{train,test}_tasks.json`; the test split is never capped,
  `src/uie_dataset_lora.py` line 229). Their sizes are the `train_samples` of the authors' released runs
  and the step of `predict_samples` from one stage to the next (each stage predicts every task seen so
  far), in `logs_and_outputs/long_olora/outputs/<k>-<task>/all_results.json`:

  | task | train | line | test | lines (predict_samples) |
  |---|---|---|---|---|
  | yelp | 5000 | 1-yelp:21 | 7600 | 1-yelp:16 |
  | amazon | 5000 | 2-amazon:24 | 7600 | 2-amazon:19 − 1-yelp:16 |
  | mnli | 3000 | 3-MNLI:30 | 7600 | 3-MNLI:25 − 2-amazon:19 |
  | cb | 250 | 4-CB:33 | 56 | 4-CB:28 − 3-MNLI:25 |
  | copa | 400 | 5-COPA:36 | 100 | 5-COPA:31 − 4-CB:28 |
  | qqp | 2000 | 6-QQP:39 | 7600 | 6-QQP:34 − 5-COPA:31 |
  | rte | 2000 | 7-RTE:42 | 277 | 7-RTE:37 − 6-QQP:34 |
  | imdb | 2000 | 8-IMDB:45 | 7600 | 8-IMDB:40 − 7-RTE:37 |
  | sst2 | 2000 | 9-SST-2:48 | 872 | 9-SST-2:43 − 8-IMDB:40 |
  | dbpedia | 14000 | 10-dbpedia:54 | 7600 | 10-dbpedia:49 − 9-SST-2:43 |
  | agnews | 4000 | 11-agnews:57 | 7600 | 11-agnews:52 − 10-dbpedia:49 |
  | yahoo | 10000 | 12-yahoo:60 | 7600 | 12-yahoo:55 − 11-agnews:52 |
  | multirc | 2000 | 13-MultiRC:63 | 4848 | 13-MultiRC:58 − 12-yahoo:55 |
  | boolq | 2000 | 14-BoolQA:66 | 3270 | 14-BoolQA:61 − 13-MultiRC:58 |
  | wic | 2000 | 15-WiC:69 | 638 | 15-WiC:64 − 14-BoolQA:61 |

  The standard benchmark's run (`logs_and_outputs/order1_icrlora/outputs/<k>-<task>/all_results.json`:
  train_samples at 1-dbpedia:21, 2-amazon:27, 3-yahoo:30, 4-agnews:33; predict_samples 7600 more per
  stage) has the same four sizes. Every train size is 1000 examples per class, or the whole training set
  where it is smaller (CB 250, COPA 400): `TRAIN_PER_CLASS`. Every test size is 7600 examples, or the
  whole validation set where it is smaller (CB, COPA, RTE, SST-2, MultiRC, BoolQ, WiC): `TaskSpec.test_size`.
  O-LoRA's files are random, not per-class balanced, samples (AG News train: 968 to 1040 per class).
- Task orders: `scripts/order_{1,2,3}.sh` (`--task_config_dir` of each stage, lines 17, 53, 89, 125) and
  `scripts/long.sh` (order 6); orders 4 and 5 are the paper's appendix table of task orders (taken from
  Razdaibiedina et al. 2023), the same sequences as the follow-up N-LoRA's `scripts/order_{4,5}.sh`.

Hub sources (`--source hub`) render each row as the CL_Benchmark `sentence` of that task; two differ:
AG News on the hub has one `text` field (title and description joined), rendered `Text: <text>`, and the
hub's MNLI validation set has no "-" (no gold label) rows, which O-LoRA's MNLI test file has 131 of.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TRAIN_PER_CLASS = 1000
ORDERS: dict[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: ("mnli", "cb", "wic", "copa", "qqp", "boolq", "rte", "imdb", "yelp", "amazon", "sst2", "dbpedia", "agnews",
        "multirc", "yahoo"),
    5: ("multirc", "boolq", "wic", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yelp",
        "amazon", "yahoo"),
    6: ("yelp", "amazon", "mnli", "cb", "copa", "qqp", "rte", "imdb", "sst2", "dbpedia", "agnews", "yahoo", "multirc",
        "boolq", "wic"),
}

INSTRUCTIONS = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
           'Choose one from the option.',
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? Choose one from the option.',
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.",
    "TC": "What is the topic of the following paragraph? Choose one from the option.",
    "BoolQA": "According to the following passage, is the question true or false? Choose one from the option.",
    "MultiRC": "According to the following passage and question, is the candidate answer true or false? "
               "Choose one from the option.",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both sentence? "
           "Choose one from the option.",
}


@dataclass(frozen=True)
class HubSource:
    """Where a task lives on the Hugging Face hub and how a row becomes its CL_Benchmark sentence."""

    dataset: str
    config: str | None
    train_split: str
    test_split: str
    label_column: str
    label_names: tuple[str, ...]  # the task label of raw label value `label_offset + i`
    render: Callable[[dict], str]
    label_offset: int = 0

    def label(self, raw) -> str | None:
        """The task label of a raw label value, None for one outside the names (e.g. GLUE's -1)."""
        if isinstance(raw, bool) or not isinstance(raw, int):
            return None
        index = raw - self.label_offset
        return self.label_names[index] if 0 <= index < len(self.label_names) else None


@dataclass(frozen=True)
class TaskSpec:
    name: str  # the cl-flat task name and its folder in the prepared data
    category: str  # O-LoRA's task type: CL_Benchmark/<category>/, the instruction, "Task:<category>"
    dataset: str  # O-LoRA's dataset name: CL_Benchmark/<category>/<dataset>/, "Dataset:<dataset>"
    labels: tuple[str, ...]
    train_size: int
    test_size: int
    hub: HubSource

    @property
    def instruction(self) -> str | None:
        return INSTRUCTIONS.get(self.category)

    @property
    def prompt_template(self) -> str:
        """O-LoRA's prompt in cl-flat's template fields (`{options}`: the labels joined by ", ")."""
        head = f"Task:{self.category}\nDataset:{self.dataset}\n"
        if self.instruction is None:
            return head + "{input}\nAnswer:"
        return head + "{instruction}\nOption: {options} \n{input}\nAnswer:"


def _yahoo(row: dict) -> str:
    title, content, answer = row["question_title"], row["question_content"], row["best_answer"]
    question = f"Title: {title}\nQuestion: {content}" if content else f"Question: {title}"
    return f"{question}\nAnswer: {answer}\n"


def _copa(row: dict) -> str:
    return (f'Which sentence is the {row["question"]} of "{row["premise"]}"? Choose one between A and B.\n'
            f'A: {row["choice1"]}\nB: {row["choice2"]}')


def _pair(first: str, second: str, a: str, b: str) -> Callable[[dict], str]:
    return lambda row: f"{first}: {row[a]}\n{second}: {row[b]}"


SENTIMENT5 = ("very negative", "negative", "neutral", "positive", "very positive")
DBPEDIA = ("Company", "Educational Institution", "Artist", "Athlete", "Office Holder", "Mean of Transportation",
           "Building", "Natural Place", "Village", "Animal", "Plant", "Album", "Film", "Written Work")
YAHOO = ("Society & Culture", "Science & Mathematics", "Health", "Education & Reference", "Computers & Internet",
         "Sports", "Business & Finance", "Entertainment & Music", "Family & Relationships", "Politics & Government")
AGNEWS = ("World", "Sports", "Business", "Science or Technology")
FALSE_TRUE = ("False", "True")
GLUE, SUPERGLUE = "nyu-mll/glue", "aps/super_glue"


def _task(name, category, dataset, labels, train_size, test_size, hub) -> TaskSpec:
    return TaskSpec(name, category, dataset, tuple(labels), train_size, test_size, hub)


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _task("dbpedia", "TC", "dbpedia", DBPEDIA, 14000, 7600,
          HubSource("fancyzhx/dbpedia_14", None, "train", "test", "label", DBPEDIA,
                    lambda r: f"Title: {r['title']}\nText: {r['content']}\n")),
    _task("amazon", "SC", "amazon", SENTIMENT5, 5000, 7600,
          HubSource("yassiracharki/Amazon_Reviews_for_Sentiment_Analysis_fine_grained_5_classes", None, "train",
                    "test", "class_index", SENTIMENT5,
                    lambda r: f"Title: {r['review_title']}\nText: {r['review_text']}\n", label_offset=1)),
    _task("yahoo", "TC", "yahoo", YAHOO, 10000, 7600,
          HubSource("community-datasets/yahoo_answers_topics", None, "train", "test", "topic", YAHOO, _yahoo)),
    _task("agnews", "TC", "agnews", AGNEWS, 4000, 7600,
          HubSource("fancyzhx/ag_news", None, "train", "test", "label", AGNEWS, lambda r: f"Text: {r['text']}\n")),
    _task("yelp", "SC", "yelp", SENTIMENT5, 5000, 7600,
          HubSource("fancyzhx/yelp_review_full", None, "train", "test", "label", SENTIMENT5,
                    lambda r: f"Text: {r['text']}\n")),
    _task("mnli", "NLI", "MNLI", ("neutral", "entailment", "contradiction"), 3000, 7600,
          HubSource(GLUE, "mnli", "train", "validation_matched", "label", ("entailment", "neutral", "contradiction"),
                    _pair("sentence 1", "sentence 2", "premise", "hypothesis"))),
    _task("cb", "NLI", "CB", ("entailment", "contradiction", "neutral"), 250, 56,
          HubSource(SUPERGLUE, "cb", "train", "validation", "label", ("entailment", "contradiction", "neutral"),
                    _pair("sentence 1", "sentence 2", "premise", "hypothesis"))),
    _task("copa", "COPA", "COPA", ("A", "B"), 400, 100,
          HubSource(SUPERGLUE, "copa", "train", "validation", "label", ("A", "B"), _copa)),
    _task("qqp", "QQP", "QQP", FALSE_TRUE, 2000, 7600,
          HubSource(GLUE, "qqp", "train", "validation", "label", FALSE_TRUE,
                    _pair("first sentence", "second sentence", "question1", "question2"))),
    _task("rte", "NLI", "RTE", ("contradiction", "entailment"), 2000, 277,
          HubSource(GLUE, "rte", "train", "validation", "label", ("entailment", "contradiction"),
                    _pair("sentence 1", "sentence 2", "sentence1", "sentence2"))),
    _task("imdb", "SC", "IMDB", ("Good", "Bad"), 2000, 7600,
          HubSource("stanfordnlp/imdb", None, "train", "test", "label", ("Bad", "Good"), lambda r: r["text"])),
    _task("sst2", "SC", "SST-2", ("Good", "Bad"), 2000, 872,
          HubSource(GLUE, "sst2", "train", "validation", "label", ("Bad", "Good"), lambda r: f"Text: {r['sentence']}")),
    _task("multirc", "MultiRC", "MultiRC", FALSE_TRUE, 2000, 4848,
          HubSource(SUPERGLUE, "multirc", "train", "validation", "label", FALSE_TRUE,
                    lambda r: f"paragraph: {r['paragraph']}\nquestion: {r['question']}\n"
                              f"candidate answer: {r['answer']}")),
    _task("boolq", "BoolQA", "BoolQA", ("True", "False"), 2000, 3270,
          HubSource(SUPERGLUE, "boolq", "train", "validation", "label", FALSE_TRUE,
                    lambda r: f"question: {r['question']}\npassage: {r['passage']}")),
    _task("wic", "WiC", "WiC", ("True", "False"), 2000, 638,
          HubSource(SUPERGLUE, "wic", "train", "validation", "label", FALSE_TRUE,
                    lambda r: f"word: {r['word']}\n{r['sentence1']}\n{r['sentence2']}")),
)}

BENCHMARKS: dict[str, tuple[str, ...]] = {"standard": ORDERS[1], "long": ORDERS[6]}
SOURCE_HINT = "PATH (a copy of O-LoRA's CL_Benchmark folder) or --source hub"  # what --source takes
BENCHMARK_ORDERS: dict[str, tuple[int, ...]] = {"standard": (1, 2, 3), "long": (4, 5, 6)}


def benchmark_tasks(benchmark: str) -> list[TaskSpec]:
    return [TASKS[name] for name in BENCHMARKS[benchmark]]
