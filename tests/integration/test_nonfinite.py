"""`training.on_nonfinite`: a non-finite update stops the run naming the task, the
update and the pass (stop), or is dropped without any state change and counted (skip); the log
stays strict JSON."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cl_flat import dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import validate_config
from cl_flat.data.batches import Encoded
from cl_flat.data.plan import TrainTask
from cl_flat.flatness import FlatnessMethod, build_method
from cl_flat.models import load_model
from cl_flat.train import train_task
from helpers import run_cli

pytestmark = pytest.mark.integration


def _strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"non-JSON constant {constant}")

    return json.loads(line, parse_constant=refuse)


def _one_task(flatness: dict):
    """(config, the model with task a's adapter trainable, 16 training examples): 4 updates of 2."""
    dist.init_distributed()
    config = validate_config({
        "run": {"name": "nan", "seed": 3}, "model": {"name_or_path": "tiny-random:llama"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "tasks": [{"name": "a", "source": "builtin"}],
        "training": {"micro_batch_size": 2, "max_steps": 4, "learning_rate": 0.02, "on_nonfinite": "skip",
                     "max_skipped_fraction": 0.25},
        "flatness": flatness,
        "logging": {"progress": False}})
    model, _ = load_model("tiny-random:llama", seed=3)
    stack = AdapterStack(model, config.lora, seed=3)
    stack.add_task(0, "a")
    generator = torch.Generator().manual_seed(11)
    examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=generator).tolist()),
                        tuple([-100] * 5 + ids[5:])) for _ in range(16)]
    return config, stack.model, examples


def _poison_second_update(window):
    """`window` whose second call leaves a NaN gradient and loss."""
    calls = []

    def poisoned(ctx, batches):
        stats = window(ctx, batches)
        calls.append(1)
        if len(calls) == 2:
            for p in ctx.params.values():
                p.grad.fill_(math.nan)
            stats["loss"] = math.nan
        return stats

    return poisoned


def test_skip_drops_the_update_without_any_state_change():
    config, model, examples = _one_task({"method": "rwp", "noise_type": "fisher", "noise_std": 0.05,
                                         "fisher_decay": 0.5})
    method = build_method(config.flatness)
    method.window = _poison_second_update(method.window)  # update 2's gradient and loss are NaN
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    after, fisher, records = [], [], []

    def log(record):
        records.append(record)
        after.append({n: p.detach().clone() for n, p in trainable.items()})
        fisher.append(dict(method.fisher.state))

    stats = train_task(TrainTask(0, "a", examples, 256), model, method, config.training, config.deepspeed,
                       config.run.seed, log)
    assert stats["skipped"] == 1 and [r.get("skipped", False) for r in records] == [False, True, False, False]
    assert records[1]["nonfinite"] == ["loss", "grad_norm"]
    assert all(torch.equal(after[1][n], after[0][n]) for n in trainable)  # no step
    assert all(torch.equal(fisher[1][k], fisher[0][k]) for k in fisher[0])  # the EMA did not fold the NaN pass in
    assert any(not torch.equal(after[2][n], after[1][n]) for n in trainable)  # the next update steps again
    assert all(torch.isfinite(p).all() for p in trainable.values())
    for record in records:
        _strict_json(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                                 for k, v in record.items()}, allow_nan=False))



def test_a_dropped_update_leaves_bilora_auxiliary_adapter_as_it_was():
    """Bi-LoRA's auxiliary adapter ascends inside `window` (before the loop sees the NaN): the dropped
    update rolls it and its Adam moments back; the next update ascends again."""
    config, model, examples = _one_task({"method": "bilora", "rho": 0.05, "rank": 2, "lr": 0.05})
    method = build_method(config.flatness)
    method.window = _poison_second_update(method.window)
    states = []

    def log(record):
        states.append({k: v.detach().clone() for part in ("aux", "exp_avg", "exp_avg_sq")
                       for k, v in ((f"{part}.{k}", v) for k, v in method.state_dict()[part].items())})

    stats = train_task(TrainTask(0, "a", examples, 256), model, method, config.training, config.deepspeed,
                       config.run.seed, log)
    assert stats["skipped"] == 1 and method.state_dict()["t"] == 3  # updates 1, 3, 4 ascended
    assert states[1].keys() == states[0].keys() and all(torch.equal(states[1][k], states[0][k]) for k in states[0])
    assert any(not torch.equal(states[2][k], states[1][k]) for k in states[1])
    assert all(torch.isfinite(v).all() for v in states[-1].values())


class CountingMethod(FlatnessMethod):
    """Plain training plus a counter of applied updates that it updates IN PLACE (`state_dict` returns the
    live tensor): the loop's rollback of a dropped update must not depend on the method copying."""

    name = "counting"
    formula = "g = (1/N) Σ_i ∇L(θ; B_i)"

    def __init__(self):
        super().__init__(config=None)
        self.updates = torch.zeros((), dtype=torch.int64)

    def state_dict(self):
        return {"updates": self.updates}

    def load_state_dict(self, state):
        self.updates.copy_(state["updates"])

    def window(self, ctx, micro_batches):
        self.updates += 1
        n = len(micro_batches)
        losses = [ctx.accumulate(batch, 1 / n, last=i == n - 1) for i, batch in enumerate(micro_batches)]
        return {"loss": torch.stack(losses).mean()}


def test_a_dropped_update_restores_a_method_that_updates_its_state_in_place():
    config, model, examples = _one_task({"method": "none"})
    method = CountingMethod()
    method.window = _poison_second_update(method.window)
    stats = train_task(TrainTask(0, "a", examples, 256), model, method, config.training, config.deepspeed,
                       config.run.seed, lambda record: None)
    assert stats["skipped"] == 1
    assert method.updates.item() == 3  # 4 windows ran, the second was dropped and rolled back

def _write(tmp_path, tiny_config, **training):
    tiny_config["training"].update(training)
    tiny_config["flatness"] = {"method": "rwp", "noise_std": 1.0e38}  # the noisy pass overflows
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    return path


def test_stop_names_task_update_and_pass_and_the_run_resumes_with_a_changed_config(tmp_path, tiny_config):
    path = _write(tmp_path, tiny_config)
    run_dir = tmp_path / "results" / "tiny"
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 1
    message = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "Traceback" not in proc.stderr
    assert "task 't1' (index 0), update 1 of 3: non-finite noisy_loss = None" in message[0] or \
        "task 't1' (index 0), update 1 of 3: non-finite noisy_loss = nan" in message[0], message
    assert "in the rwp update" in message[0]
    lines = (run_dir / "train_log.jsonl").read_text().splitlines()
    assert [_strict_json(line)["nonfinite"] for line in lines] == [["noisy_loss", "grad_norm"]]
    assert (run_dir / "acc_matrix.csv").read_text().splitlines()[1].startswith("zero_shot")
    # the same config again: refused, naming the field to change; a changed config continues
    proc = run_cli(["train", str(path), "--resume", "--set", "flatness.noise_std=0.001"], cwd=tmp_path)
    assert proc.returncode != 0 and "flatness.noise_std: 1e+38 → 0.001" in proc.stderr, proc.stderr[-2000:]
    proc = run_cli(["train", str(path), "--resume", "--allow-config-change", "--set", "flatness.noise_std=0.001"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = yaml.safe_load((run_dir / "config.yaml").read_text())["meta"]
    assert meta["config_changes"] == [{"before_task": "t1", "changes": ["flatness.noise_std: 1e+38 → 0.001"]}]
    log = [_strict_json(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [(r["task"], r["step"]) for r in log] == [(t, s) for t in ("t1", "t2") for s in (1, 2, 3)]


def test_skip_counts_and_stops_past_the_allowed_fraction(tmp_path, tiny_config):
    path = _write(tmp_path, tiny_config, on_nonfinite="skip", max_skipped_fraction=1.0)
    run_dir = tmp_path / "results" / "tiny"
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["skipped_updates"] == {"t1": 3, "t2": 3}
    log = [_strict_json(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert all(r["skipped"] and r["noisy_loss"] is None for r in log)

    path = _write(tmp_path, tiny_config, on_nonfinite="skip", max_skipped_fraction=0.5)
    proc = run_cli(["train", str(path), "--set", "run.name=tiny2"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "task 't1' (index 0), update 2 of 3: 2 skipped non-finite updates exceed " \
           "training.max_skipped_fraction = 0.5 of 3" in proc.stderr, proc.stderr[-2000:]


def test_a_diverging_learning_rate_stops_in_its_task_and_keeps_the_completed_ones(tmp_path, tiny_config):
    """GPT-2 at lr 1e30 overflows on its second update: t1 (a sane lr) completes and keeps its row,
    t2 (its own lr, a per-task setting) stops at update 2 with exit 1."""
    tiny_config["model"]["name_or_path"] = "tiny-random:gpt2"
    tiny_config["lora"]["target_modules"] = ["c_attn"]
    tiny_config["tasks"][1]["training"] = {"learning_rate": 1.0e30}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    proc = run_cli(["train", str(path)], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "task 't2' (index 1), update 2 of 3: non-finite loss = nan, grad_norm = nan in the none update" \
        in proc.stderr, proc.stderr[-2000:]
    rows = (tmp_path / "results/tiny/acc_matrix.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows] == ["after_task", "zero_shot", "t1"]
    assert (tmp_path / "results/tiny/adapters/t1/adapter_model.safetensors").is_file()
