"""`cl-flat train` with a generation task scored by `rouge_l` beside a rank-classified one (tiny Llama and T5):
the matrix's rouge_l cells against the mean best ROUGE-L F-measure (x 100, rouge-score in the test) of the
trained stack's greedy outputs decoded by hand, the console title naming both metrics, and
`cl-flat eval RUN --metric rouge_l --max-samples all` scoring the full test set the same way."""

from __future__ import annotations

import json

import pytest
import yaml
from rouge_score import rouge_scorer

from cl_flat.config import load_config
from cl_flat.data import load_tasks
from cl_flat.data.batches import example_prompt_ids
from cl_flat.evaluate import eval_indices
from cl_flat.matrix_csv import read_acc_matrix
from cl_flat.models import load_run_model
from cl_flat.rundir import RunDir
from cl_flat.rundir.checks import require_run
from helpers import greedy_by_hand, run_cli, write_jsonl_task

pytestmark = pytest.mark.integration

PHRASES = [("a red apple", ["a red apple", "one red apple"]), ("the blue sky", ["the blue sky"]),
           ("running fast", ["running fast", "runs fast", "quick run"]), ("green grass", ["grass is green"])]


def write_generation_task(folder, n_train: int = 8, n_test: int = 6) -> dict:
    """Short phrases to repeat; each test row lists every acceptable phrase as its references."""
    for split, n in (("train", n_train), ("test", n_test)):
        with (folder / f"gen_{split}.jsonl").open("w") as handle:
            for i in range(n):
                output, references = PHRASES[i % len(PHRASES)]
                row = {"input": f"say {output} ({i})", "output": output}
                handle.write(json.dumps(row | ({"references": references} if split == "test" else {})) + "\n")
    return {"name": "gen", "source": "jsonl", "train": str(folder / "gen_train.jsonl"),
            "test": str(folder / "gen_test.jsonl"), "instruction": "Repeat the phrase."}


# seeds whose random base model generates word characters, so that a zero-shot score lies between 0 and 100
@pytest.mark.parametrize("name,targets,seed", [("tiny-random:llama", ["q_proj", "v_proj"], 5),
                                               ("tiny-random:t5", ["q", "v"], 4)])
def test_rouge_l_run_and_rescore(tmp_path, name, targets, seed):
    data = tmp_path / "data"
    classify = write_jsonl_task(data, "cls", ["yes", "no"], n_train=4, n_test=4) | {"metric": "accuracy"}
    raw = {"run": {"name": "gen", "output_dir": str(tmp_path / "results"), "seed": seed},
           "model": {"name_or_path": name},
           "lora": {"r": 2, "target_modules": targets},
           "tasks": [classify, write_generation_task(data)],
           "training": {"micro_batch_size": 2, "max_steps": 2, "learning_rate": 0.01},
           "evaluation": {"metric": "rouge_l", "max_samples_per_task": 4, "batch_size": 3, "max_new_tokens": 8,
                          "sharpness": False},
           "logging": {"progress": False, "wandb": {"mode": "disabled"}}}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    # a random model's generations share no word with the phrases: each test row also lists the base model's
    # own generation plus a word, so its zero_shot scores are neither 0 nor 100
    config = load_config(config_path)
    model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
    task = load_tasks(config)[1]
    texts = [greedy_by_hand(model, tokenizer, example_prompt_ids(tokenizer, task, example), 8) for example in task.test]
    rows = [json.loads(line) for line in (data / "gen_test.jsonl").read_text().splitlines()]
    (data / "gen_test.jsonl").write_text("".join(json.dumps(row | {"references": row["references"] + [f"{text} zebra"]})
                                                 + "\n" for row, text in zip(rows, texts)))
    proc = run_cli(["train", str(config_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mixed metrics (accuracy, rouge_l) matrix (%)" in proc.stdout, proc.stdout
    run_dir = tmp_path / "results" / "gen"
    proc = run_cli(["eval", str(run_dir), "--metric", "rouge_l", "--max-samples", "all", "--tasks", "gen"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "re-scored, mixed metrics (accuracy, rouge_l) (%)" in proc.stdout, proc.stdout

    run = require_run(RunDir(run_dir))
    config = run.config
    task = load_tasks(config)[1]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    names, rows, zero_shot = read_acc_matrix(run_dir / "acc_matrix.csv")
    lines = (run_dir / "eval" / "rouge_l-all.csv").read_text().splitlines()
    assert names == ["cls", "gen"] and lines[0] == "after_task,gen"
    rescored = {line.split(",")[0]: float(line.split(",")[1]) for line in lines[1:]}
    for after, saved in (("zero_shot", zero_shot[1]), ("cls", rows[0][1]), ("gen", rows[1][1])):
        model, tokenizer = load_run_model(config.model, config.deepspeed, config.run.seed)
        if after != "zero_shot":
            model = RunDir(run_dir).load_stack(model, config, after).model
        model.eval()
        texts = [greedy_by_hand(model, tokenizer, example_prompt_ids(tokenizer, task, example), 8)
                 for example in task.test]
        best = [max(scorer.score(target, text)["rougeL"].fmeasure for target in example.references)
                for text, example in zip(texts, task.test)]
        sample = eval_indices(len(task.test), 4, config.run.seed, "gen")  # the 4 of 6 the run scored
        assert saved == pytest.approx(100 * sum(best[i] for i in sample) / 4, abs=1e-9), (after, texts)
        assert rescored[after] == pytest.approx(100 * sum(best) / len(best), abs=1e-9), (after, texts)
    assert 0 < rescored["zero_shot"] < 100, rescored
