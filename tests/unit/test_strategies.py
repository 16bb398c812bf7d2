"""CL strategies as plugins (cl_flat.strategies): the registry is exactly what `lora.strategy` accepts,
each strategy's adapter naming and saved-adapter order, SeqLoRA's shared adapter, replay composed with
any strategy, the hooks of several strategies called in order, and a strategy from outside the package
(one file, registered at runtime) accepted, validated and trained like a built-in. Expected values are
written by hand from docs/methods.md's description of each strategy."""

from __future__ import annotations

import importlib
import re
import sys

import pytest
import torch

from cl_flat.adapters import AdapterStack
from cl_flat.config import LoraSection, RunConfig, config_to_dict, validate_config
from cl_flat.data import Example, TaskData
from cl_flat.errors import ConfigError
from cl_flat.models import byte_tokenizer, load_model
from cl_flat.registry import STRATEGIES
from cl_flat.rundir import RunDir
from cl_flat.strategies import RunStrategies, Strategy, build_strategies
from cl_flat.strategies.inclora import IncLora
from cl_flat.strategies.replay import Replay, replay_examples

BUILT_IN = {"inclora", "seqlora", "olora"}  # docs/methods.md's lora.strategy values
TASKS = ["t0", "t1", "t2"]


def minimal(**sections) -> dict:
    return {"model": {"name_or_path": "tiny-random:llama"},
            "tasks": [{"name": name, "source": "builtin"} for name in TASKS], **sections}


def problems_of(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(raw)
    return info.value.problems


def tiny_stack(section: LoraSection, seed: int = 7) -> AdapterStack:
    model, _ = load_model("tiny-random:llama", seed=0)
    return AdapterStack(model.eval(), section, seed=seed)


def trainable(stack: AdapterStack) -> set[str]:
    return {n for n, p in stack.model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- the registry is the accepted values


def test_the_registry_and_the_accepted_lora_strategies_agree():
    names = set(STRATEGIES.names())
    assert names == BUILT_IN
    for name in sorted(names):
        config = validate_config(minimal(lora={"strategy": name}))
        entry = STRATEGIES.get(name)
        assert config.lora.strategy == name and type(config.lora) is entry.config_class
        assert type(build_strategies(config).adapters) is entry.cls
    (line,) = [p for p in problems_of(minimal(lora={"strategy": "ewc"})) if p.startswith("lora")]
    assert line.startswith("lora.strategy: ") and line.endswith("(got 'ewc')"), line
    assert set(re.findall(r"'(\w+)'", line.split("(got")[0])) == names, line


def test_a_lora_block_without_strategy_is_inclora():
    assert validate_config(minimal()).lora.strategy == "inclora"
    config = validate_config(minimal(lora={"r": 2}))
    assert (config.lora.strategy, config.lora.r, type(build_strategies(config).adapters)) == ("inclora", 2, IncLora)
    # every valid lora block stays valid: O-LoRA's λ are accepted (and saved) under every strategy
    for name in sorted(BUILT_IN):
        saved = config_to_dict(validate_config(minimal(lora={"strategy": name, "lambda_orth": 0.3})))["lora"]
        assert saved == {"strategy": name, "r": 8, "alpha": 16.0, "dropout": 0.0,
                         "target_modules": ["q_proj", "v_proj"], "lambda_orth": 0.3, "lambda_l2": 0.0}


def test_replay_composes_with_any_strategy_and_is_no_lora_strategy():
    assert any(p.startswith("lora.strategy:") for p in problems_of(minimal(lora={"strategy": "replay"})))
    for name in sorted(BUILT_IN):
        off = build_strategies(validate_config(minimal(lora={"strategy": name})))
        on = build_strategies(validate_config(minimal(lora={"strategy": name}, replay={"examples_per_task": 3})))
        assert [type(p) for p in off.parts] == [STRATEGIES.get(name).cls]
        assert [type(p) for p in on.parts] == [STRATEGIES.get(name).cls, Replay]


# ---------------------------------------------------------------- adapters: naming, saving, resuming


def test_each_strategy_names_and_reloads_its_adapters(tmp_path):
    run_dir = RunDir(tmp_path)
    for name, trained, after_t1 in (
        ("inclora", TASKS, [("t0", "t0"), ("t1", "t1")]),
        ("olora", TASKS, [("t0", "t0"), ("t1", "t1")]),
        ("seqlora", ["seqlora"] * 3, [("seqlora", "t1")]),
    ):
        config = validate_config(minimal(lora={"strategy": name}))
        strategies = build_strategies(config)
        assert [strategies.adapter_name(t) for t in TASKS] == trained
        folders = [(adapter, tmp_path / "adapters" / task) for adapter, task in after_t1]
        assert run_dir.adapter_dirs(config, "t1") == folders


def test_seqlora_keeps_one_trainable_adapter_through_tasks():
    config = validate_config(minimal(lora={"strategy": "seqlora", "r": 4, "alpha": 16}))
    strategies = build_strategies(config)
    stack = tiny_stack(config.lora)
    strategies.begin_task(stack, 0, "t0")
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # "trained" on task a
        for n, p in sorted(stack.model.named_parameters()):
            if ".lora_B.seqlora." in n:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    trained = {n: p.detach().clone() for n, p in stack.model.named_parameters() if p.requires_grad}
    strategies.end_task(stack, 0, "t0")
    for index, name in enumerate(TASKS[1:], start=1):
        strategies.begin_task(stack, index, name)
        assert stack.adapters == ["seqlora"]
        params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
        assert set(params) == set(trained)
        assert len(params) == 2 * 2 * 2  # 2 layers x {q_proj, v_proj} x {A, B}
        assert all(".seqlora." in n for n in params)
        for n, p in params.items():  # continues from where it was, no re-init
            assert torch.equal(p, trained[n]), n
        strategies.end_task(stack, index, name)
    assert not any(".lora_" in n and ".seqlora." not in n for n, _ in stack.model.named_parameters())


def test_inclora_adds_one_trainable_adapter_per_task_and_freezes_the_rest():
    config = validate_config(minimal(lora={"r": 4}))
    strategies = build_strategies(config)
    stack = tiny_stack(config.lora)
    for index, name in enumerate(TASKS):
        strategies.begin_task(stack, index, name)
        assert stack.adapters == TASKS[:index + 1]
        assert trainable(stack) and all(f".{name}." in n for n in trainable(stack))
        assert len(trainable(stack)) == 2 * 2 * 2
        strategies.end_task(stack, index, name)


# ---------------------------------------------------------------- replay


def _task(name: str, instruction: str, n: int) -> TaskData:
    train = tuple(Example(f"{name}{i}", "x") for i in range(n))
    return TaskData(name, instruction, ("x", "y"), "accuracy", "{instruction} {input}", train, train)


def test_replay_memory_is_a_fixed_sample_of_every_earlier_task():
    earlier = [_task("a", "", 20), _task("b", "", 3)]
    memory = replay_examples(earlier, 5, seed=7)
    assert [e.input[0] for e in memory] == ["a"] * 5 + ["b"] * 3  # b has only 3: all of them
    assert memory == replay_examples(earlier, 5, seed=7)  # keyed: the same on resume
    assert memory != replay_examples(earlier, 5, seed=8)
    assert replay_examples(earlier, 0, seed=7) == ()
    assert len(set(memory)) == 8 and all(e in earlier[0].train + earlier[1].train for e in memory)


def test_replay_mixes_earlier_tasks_each_with_its_own_prompt():
    tasks = [_task("a", "A.", 4), _task("b", "B.", 3), _task("c", "C.", 2)]
    tokenizer = byte_tokenizer()

    def prompts(encoded) -> list[str]:
        return [tokenizer.decode([i for i, label in zip(e.input_ids, e.labels) if label == -100]) for e in encoded]

    strategies = build_strategies(validate_config(minimal(replay={"examples_per_task": 2})))
    examples, replayed = strategies.training_set(tasks, 2, tokenizer, 64)
    assert replayed == 4 and len(examples) == 6  # c's own 2, then 2 of a and 2 of b
    got = prompts(examples)
    assert got[:2] == ["C. c0", "C. c1"]
    assert [p[:4] for p in got[2:]] == ["A. a", "A. a", "B. b", "B. b"]
    assert len(set(got[2:4])) == 2 and len(set(got[4:])) == 2
    assert strategies.training_set(tasks, 0, tokenizer, 64)[1] == 0  # nothing earlier to replay
    plain = build_strategies(validate_config(minimal()))
    examples, replayed = plain.training_set(tasks, 2, tokenizer, 64)
    assert (prompts(examples), replayed) == (["C. c0", "C. c1"], 0)


# ---------------------------------------------------------------- composition


class _Recorder(Strategy):
    """A composable strategy that records the hooks it sees and adds a constant loss term."""

    def __init__(self, config, label: str, value: float, calls: list):
        super().__init__(config)
        self.label, self.value, self.calls = label, value, calls

    def begin_task(self, stack, index, task_name):
        self.calls.append((self.label, "begin", index))

    def loss_terms(self, stack, index):
        value, label = self.value, self.label

        class Terms:
            def __call__(self, module=None):
                return torch.tensor(value)

            def stats(self):
                return {label: torch.tensor(value)}

        return Terms()

    def end_task(self, stack, index, task_name):
        self.calls.append((self.label, "end", index))


def test_hooks_run_in_order_and_loss_terms_add_up():
    config = validate_config(minimal(lora={"r": 4}))
    calls: list = []
    recorders = [_Recorder(config, "x", 1.5, calls), _Recorder(config, "y", 0.25, calls)]
    strategies = RunStrategies(IncLora(config), recorders)
    stack = tiny_stack(config.lora)
    strategies.begin_task(stack, 0, "t0")
    assert stack.adapters == ["t0"]  # the adapter strategy ran first
    terms = strategies.loss_terms(stack, 0)
    assert terms().item() == 1.75 and {k: v.item() for k, v in terms.stats().items()} == {"x": 1.5, "y": 0.25}
    strategies.end_task(stack, 0, "t0")
    assert calls == [("x", "begin", 0), ("y", "begin", 0), ("x", "end", 0), ("y", "end", 0)]
    assert build_strategies(config).loss_terms(stack, 0) is None  # IncLoRA alone: no regulariser


# ---------------------------------------------------------------- a strategy from outside: one file

OUTSIDE = '''
"""SquaredB: IncLoRA plus weight · Σ ‖B_t‖²_F of the new adapter (a strategy outside cl_flat)."""
from typing import Literal

from pydantic import Field

from cl_flat.config import LoraSection
from cl_flat.strategies import register
from cl_flat.strategies.inclora import IncLora


class SquaredBConfig(LoraSection):
    strategy: Literal["squared_b"] = "squared_b"
    weight: float = Field(default=1.0, ge=0)


class SquaredBTerms:
    def __init__(self, tensors, weight):
        self.tensors, self.weight = tensors, weight

    def __call__(self, module=None):
        return self.weight * sum(t.pow(2).sum() for t in self.tensors)

    def stats(self):
        return {"squared_b": sum(t.detach().pow(2).sum() for t in self.tensors)}


@register("squared_b", SquaredBConfig)
class SquaredB(IncLora):
    def loss_terms(self, stack, index):
        tensors = [p for n, p in stack.model.named_parameters() if f".lora_B.{stack.current}." in n]
        return SquaredBTerms(tensors, self.config.lora.weight)
'''


@pytest.fixture
def outside_strategy(tmp_path):
    """OUTSIDE imported from its own file (no install): it registers itself; the config schema, built
    once, is rebuilt to take it. Afterwards the registry and the schema are as before."""
    entries = STRATEGIES.load()
    before = dict(entries)
    (tmp_path / "squared_b_strategy.py").write_text(OUTSIDE)
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module("squared_b_strategy")
        RunConfig.model_rebuild(force=True)
        yield module
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("squared_b_strategy", None)
        entries.clear()
        entries.update(before)
        RunConfig.model_rebuild(force=True)


def test_an_outside_strategy_is_one_file(outside_strategy):
    assert set(STRATEGIES.names()) == BUILT_IN | {"squared_b"}
    (line,) = [p for p in problems_of(minimal(lora={"strategy": "ewc"})) if p.startswith("lora")]
    assert "'squared_b'" in line
    config = validate_config(minimal(lora={"strategy": "squared_b", "weight": 2.0, "r": 4}))
    assert type(config.lora) is outside_strategy.SquaredBConfig and (config.lora.weight, config.lora.r) == (2.0, 4)
    assert config_to_dict(validate_config(config_to_dict(config))) == config_to_dict(config)
    assert problems_of(minimal(lora={"weight": 2.0})) == ["lora.weight: unknown key (got 2.0)"]  # its key is its own
    assert problems_of(minimal(lora={"strategy": "squared_b", "weight": -1})) == [
        "lora.weight: Input should be greater than or equal to 0 (got -1)"]

    strategies = build_strategies(config)
    stack = tiny_stack(config.lora)
    strategies.begin_task(stack, 0, "t0")
    assert stack.adapters == ["t0"] and all(".t0." in n for n in trainable(stack))
    entries = 0
    with torch.no_grad():
        for n, p in stack.model.named_parameters():
            if ".lora_B.t0." in n:
                p.fill_(0.1)
                entries += p.numel()
    terms = strategies.loss_terms(stack, 0)
    assert terms().item() == pytest.approx(2.0 * 0.01 * entries)  # weight · Σ 0.1²
    assert terms.stats()["squared_b"].item() == pytest.approx(0.01 * entries)
    strategies.end_task(stack, 0, "t0")


def test_the_outside_strategy_is_gone_afterwards():
    assert set(STRATEGIES.names()) == BUILT_IN
    assert problems_of(minimal(lora={"strategy": "squared_b"}))[0].startswith("lora.strategy:")
