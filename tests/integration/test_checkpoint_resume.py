"""In-task checkpoints: a task interrupted after a checkpoint and resumed from it ends
with exactly the adapter of an uninterrupted task, for every method (RWP's Fisher EMA included),
under the real DeepSpeed loop."""

from __future__ import annotations

import json

import pytest
import torch

from cl_flat.adapters import AdapterStack
from cl_flat.checkpoint import TaskCheckpoints
from cl_flat.config import validate_config
from cl_flat.data.batches import Encoded
from cl_flat.data.plan import TrainTask
from cl_flat.flatness import build_method
from cl_flat.models import load_model
from cl_flat.train import train_task

METHODS = {
    "none": {"method": "none"},
    "sam-adaptive": {"method": "sam", "rho": 0.05, "adaptive": True},
    "rwp-fisher": {"method": "rwp", "scope": "full", "noise_type": "fisher", "noise_std": 0.05, "fisher_decay": 0.5},
    "lpf_sgd": {"method": "lpf_sgd", "noise_std": 0.01},
    "flat_lora": {"method": "flat_lora", "noise_std": 0.05},
    # SAM updates at 0, 4, 8: the direction stored at update 4 is reused at 6 and 7, after the resume from 6
    "looksam": {"method": "looksam", "rho": 0.05, "interval": 4},
    "gsam": {"method": "gsam", "rho": 0.05, "alpha": 0.3},
    # the auxiliary adapter and its Adam moments are method state (a fresh one after the resume would differ)
    "bilora": {"method": "bilora", "rho": 0.05, "rank": 2, "lr": 0.05},
    # C-Flat at updates 0, 4, 8 (the schedule reads the update index: the resume from 6 keeps its phase)
    "cflat": {"method": "cflat", "rho": 0.05, "lamb": 0.4, "interval": 4},
}


class Crash(Exception):
    pass


@pytest.fixture(autouse=True, scope="module")
def process_group():
    from cl_flat import dist

    dist.init_distributed()


def _config(flatness: dict, zero: int = 0, family: str = "llama"):
    targets = ["q_proj", "v_proj"] if family == "llama" else ["c_attn"]
    return validate_config({
        "run": {"name": "ckpt", "seed": 3},
        "model": {"name_or_path": f"tiny-random:{family}"},
        "lora": {"r": 4, "alpha": 8, "target_modules": targets},
        "tasks": [{"name": "a", "source": "builtin"}, {"name": "b", "source": "builtin"}],
        "training": {"micro_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 9, "learning_rate": 0.02,
                     "lr_scheduler": "cosine", "warmup_ratio": 0.2, "checkpoint_every": 3},
        "flatness": flatness,
        "deepspeed": {"zero_stage": zero},
        "logging": {"progress": False},
    })


def _train(config, folder, crash_after: int | None = None, log=None):
    """Train task 'b' on a fresh stack (as a new process would build it); raise Crash after
    `crash_after` updates. Returns the trained adapter's tensors."""
    model, _ = load_model(config.model.name_or_path, seed=3)
    model.eval()  # no dropout (GPT-2 has some): the comparisons are exact
    stack = AdapterStack(model, config.lora, seed=3)
    stack.add_task(0, "a")
    stack.add_task(1, "b")
    generator = torch.Generator().manual_seed(11)
    examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=generator).tolist()),
                        tuple([-100] * 5 + ids[5:])) for _ in range(64)]
    method = build_method(config.flatness)
    if crash_after is not None:
        window, calls = method.window, []

        def crashing(ctx, batches):
            if len(calls) == crash_after:
                raise Crash
            calls.append(1)
            return window(ctx, batches)

        method.window = crashing
    checkpoints = TaskCheckpoints(folder, config.training.checkpoint_every)
    train_task(TrainTask(1, "b", examples, 256), stack.model, method, config.training, config.deepspeed,
               config.run.seed, log if log is not None else (lambda record: None), checkpoints=checkpoints)
    return {n: p.detach().clone() for n, p in stack.model.named_parameters() if ".b." in n}


@pytest.mark.parametrize("name", list(METHODS))
def test_resumed_task_equals_the_uninterrupted_one(name, tmp_path):
    config = _config(METHODS[name])
    uninterrupted = _train(config, tmp_path / "straight")
    assert TaskCheckpoints(tmp_path / "straight", 3).latest() == 6  # run_sequence removes it after the row
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=7)  # checkpoints after 3 and 6 updates, dies in the 8th
    checkpoints = TaskCheckpoints(tmp_path / "broken", 3)
    assert checkpoints.latest() == 6
    assert [p.name for p in (tmp_path / "broken").iterdir() if p.is_dir()] == ["update-0000006"]  # older removed
    logged = []
    resumed = _train(config, tmp_path / "broken", log=logged.append)
    assert [r["step"] for r in logged] == [7, 8, 9]
    assert resumed.keys() == uninterrupted.keys() and len(resumed) == 8
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    # and the trained adapter is not the initial one (the comparison is not vacuous)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in resumed.items() if "lora_B" in k)


def test_resume_under_zero_2(tmp_path):
    config = _config(METHODS["rwp-fisher"], zero=2)
    uninterrupted = _train(config, tmp_path / "straight")
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=4)
    resumed = _train(config, tmp_path / "broken")
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # GPT-2 ties its output head to the embedding
def test_a_checkpoint_holds_only_the_trainable_state(tmp_path, family):
    config = _config(METHODS["rwp-fisher"], family=family)
    with pytest.raises(Crash):
        _train(config, tmp_path / "c", crash_after=4)
    folder = tmp_path / "c" / "update-0000003"
    state = json.loads((folder / "state.json").read_text())
    assert state == {"updates": 3, "skipped": 0, "world_size": 1}
    fisher = torch.load(folder / "method_rank0.pt", weights_only=True)["fisher"]
    assert len(fisher) == (4 + 8 if family == "llama" else 2 + 4)  # W0 of each adapted layer + its A, B
    saved = torch.load(next(folder.glob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    trainable = 8 if family == "llama" else 4
    assert len(saved) == trainable and all(".b." in key for key in saved)  # no frozen weight, tied or not


def test_an_unfinished_checkpoint_write_is_ignored(tmp_path):
    config = _config(METHODS["none"])
    uninterrupted = _train(config, tmp_path / "straight")
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=5)
    partial = tmp_path / "broken" / ".tmp-update-0000006"  # what a kill during the next write leaves
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"\x80\x02truncated")
    assert TaskCheckpoints(tmp_path / "broken", 3).latest() == 3
    resumed = _train(config, tmp_path / "broken")
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not partial.exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


CORRUPTIONS = {  # what a crash of the disk or a hand leaves in the newest checkpoint, and the notice's reason
    "garbage state.json": (lambda f: (f / "state.json").write_text("{not json"), "state.json: "),
    "state.json without skipped": (lambda f: (f / "state.json").write_text('{"updates": 3, "world_size": 1}'),
                                   "state.json has no integer skipped"),
    "truncated model states": (lambda f: _truncate(f / "mp_rank_00_model_states.pt"), "mp_rank_00_model_states.pt: "),
    "no method state": (lambda f: (f / "method_rank0.pt").unlink(), "method_rank0.pt missing"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_an_unreadable_checkpoint_restarts_the_task(corruption, tmp_path, capfd):
    config = _config(METHODS["rwp-fisher"])
    uninterrupted = _train(config, tmp_path / "straight")
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=4)
    folder = tmp_path / "broken" / "update-0000003"  # the only one kept: the fallback is the task's start
    corrupt, reason = CORRUPTIONS[corruption]
    corrupt(folder)
    assert TaskCheckpoints(tmp_path / "broken", 3).latest() == 0
    capfd.readouterr()
    logged = []
    resumed = _train(config, tmp_path / "broken", log=logged.append)
    notices = [line for line in capfd.readouterr().err.splitlines() if line.startswith("note: checkpoint")]
    assert len(notices) == 1, notices
    assert notices[0].startswith(f"note: checkpoint {folder} is unreadable ({reason}")
    assert notices[0].endswith("; resuming from the task's start")
    assert [r["step"] for r in logged] == list(range(1, 10))
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert not folder.exists()  # replaced by the checkpoints of the restarted task


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, capfd):
    config = _config(METHODS["none"])
    uninterrupted = _train(config, tmp_path / "straight")
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=4)
    newer = tmp_path / "broken" / "update-0000006"  # as if two were kept, the newer one unreadable
    newer.mkdir()
    (newer / "state.json").write_text("{}")
    capfd.readouterr()
    logged = []
    resumed = _train(config, tmp_path / "broken", log=logged.append)
    assert f"note: checkpoint {newer} is unreadable (state.json has no integer updates, skipped, world_size); " \
           "resuming from update-0000003" in capfd.readouterr().err
    assert [r["step"] for r in logged] == list(range(4, 10))
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key


def test_a_truncated_zero_2_optimizer_partition_restarts_the_task(tmp_path, capfd):
    config = _config(METHODS["none"], zero=2)
    uninterrupted = _train(config, tmp_path / "straight")
    with pytest.raises(Crash):
        _train(config, tmp_path / "broken", crash_after=4)
    folder = tmp_path / "broken" / "update-0000003"
    partitions = list(folder.glob("*optim_states.pt"))  # ZeRO writes one optimizer partition per rank
    assert len(partitions) == 1, sorted(p.name for p in folder.iterdir())
    _truncate(partitions[0])
    capfd.readouterr()
    resumed = _train(config, tmp_path / "broken")
    assert f"note: checkpoint {folder} is unreadable ({partitions[0].name}: " in capfd.readouterr().err
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
