"""The adapter stack (one adapter per task, as IncLoRA uses it; SeqLoRA's in test_strategies.py) on a
tiny random Llama, and the scoring helpers of evaluation. Expected values are computed by hand: the
LoRA forward W x + s·Σ B_k A_k x with s = alpha / r, and the mean log-softmax probability of the
target tokens from an unpadded forward of each item on its own."""

from __future__ import annotations

import pytest
import torch

from cl_flat.adapters import AdapterStack
from cl_flat.config import LoraSection
from cl_flat.data.batches import IGNORE, Encoded
from cl_flat.models import load_model

TASKS = ["t0", "t1", "t2"]
SECTION = LoraSection(r=4, alpha=16, target_modules=["q_proj", "v_proj"])
SCALE = 16 / 4  # alpha / r
N_LAYERS = 2  # tiny-random:llama


def tiny():
    model, tokenizer = load_model("tiny-random:llama", seed=0)
    model.eval()
    return model, tokenizer


def stack_with(tasks=TASKS, section=SECTION, seed=7) -> AdapterStack:
    model, _ = tiny()
    stack = AdapterStack(model, section, seed=seed)
    for index, name in enumerate(tasks):
        stack.add_task(index, name)
    return stack


def lora_params(model, adapter: str, kind: str) -> dict[str, torch.Tensor]:
    marker = f".lora_{kind}.{adapter}."
    return {n: p for n, p in model.named_parameters() if marker in n}


def fill_b(model, adapter: str, seed: int, scale: float = 0.1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(lora_params(model, adapter, "B").items()):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


INPUT = torch.tensor([[5, 17, 42, 99, 3, 120, 64]])


def logits(model, input_ids=INPUT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---------------------------------------------------------------- trainable set


def test_after_each_task_only_the_current_adapter_is_trainable():
    model, _ = tiny()
    stack = AdapterStack(model, SECTION, seed=7)
    for index, name in enumerate(TASKS):
        stack.add_task(index, name)
        trainable = {n for n, p in stack.model.named_parameters() if p.requires_grad}
        # 2 layers x {q_proj, v_proj} x {A, B}
        assert len(trainable) == N_LAYERS * 2 * 2
        for n in trainable:
            assert f".lora_A.{name}." in n or f".lora_B.{name}." in n, n
        expected = set(lora_params(stack.model, name, "A")) | set(lora_params(stack.model, name, "B"))
        assert trainable == expected


def test_all_adapters_are_active():
    stack = stack_with()
    assert list(stack.model.base_model.active_adapters) == TASKS
    assert stack.adapters == TASKS
    assert stack.current == "t2"


def test_base_weights_are_never_trainable():
    model, _ = tiny()
    stack = AdapterStack(model, SECTION, seed=7)
    for index, name in enumerate(TASKS):
        stack.add_task(index, name)
        base = [n for n, p in stack.model.named_parameters() if ".lora_" not in n]
        assert base, "expected base parameters"
        assert not [n for n, p in stack.model.named_parameters() if ".lora_" not in n and p.requires_grad]


def test_each_adapter_sits_on_exactly_the_target_modules():
    stack = stack_with()
    for name in TASKS:
        names = lora_params(stack.model, name, "A")
        assert len(names) == N_LAYERS * 2
        assert sorted({n.split(".lora_A.")[0].rsplit(".", 1)[-1] for n in names}) == ["q_proj", "v_proj"]


# ---------------------------------------------------------------- forward


def test_fresh_adapters_do_not_change_the_output():
    # B = 0 for every new adapter, so the stack computes the base model's function
    stack = stack_with()
    with_adapters = logits(stack.model)
    with stack.model.disable_adapter():
        base = logits(stack.model)
    assert torch.equal(with_adapters, base)


def test_an_earlier_adapter_affects_the_output():
    stack = stack_with()
    fill_b(stack.model, "t0", seed=1)  # only the first, frozen adapter is non-zero
    with_adapters = logits(stack.model)
    with stack.model.disable_adapter():
        base = logits(stack.model)
    assert (with_adapters - base).abs().max() > 1e-4


def test_lora_layer_computes_base_plus_scaled_sum_of_all_adapters():
    stack = stack_with()
    for k, name in enumerate(TASKS):
        fill_b(stack.model, name, seed=10 + k)
    layer = stack.model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    W = layer.base_layer.weight.detach()
    expected = x @ W.T
    for name in TASKS:
        A = layer.lora_A[name].weight.detach()
        B = layer.lora_B[name].weight.detach()
        expected = expected + SCALE * (x @ A.T @ B.T)
    with torch.no_grad():
        actual = layer(x)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- initialisation


def a_weights(stack: AdapterStack, name: str) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in sorted(lora_params(stack.model, name, "A").items())]


def test_new_adapter_init_is_deterministic_and_independent_of_global_rng():
    torch.manual_seed(1)
    first = stack_with(seed=7)
    torch.manual_seed(12345)
    _ = torch.rand(1000)  # consume global RNG state in between
    second = stack_with(seed=7)
    for name in TASKS:
        for a, b in zip(a_weights(first, name), a_weights(second, name)):
            assert torch.equal(a, b)


def test_init_depends_on_task_index_not_on_task_name():
    first = stack_with(["t0", "t1"], seed=7)
    second = stack_with(["other0", "other1"], seed=7)
    for a, b in zip(a_weights(first, "t1"), a_weights(second, "other1")):
        assert torch.equal(a, b)
    # different task index -> a different draw
    assert not torch.equal(a_weights(first, "t0")[0], a_weights(first, "t1")[0])


def test_init_depends_on_the_seed():
    a = stack_with(["t0"], seed=7)
    b = stack_with(["t0"], seed=8)
    assert not torch.equal(a_weights(a, "t0")[0], a_weights(b, "t0")[0])


def test_new_adapter_a_is_uniform_in_kaiming_bound_and_b_is_zero():
    stack = stack_with()
    for name in TASKS:
        for p in lora_params(stack.model, name, "A").values():
            bound = 1.0 / p.shape[1] ** 0.5  # fan_in = 64 -> 0.125
            assert p.shape == (4, 64)
            assert p.abs().max() <= bound
            assert p.abs().max() > 0.5 * bound  # a real draw, not zeros
        for n, p in lora_params(stack.model, name, "B").items():
            assert torch.count_nonzero(p) == 0, n


def test_adding_a_task_leaves_earlier_adapters_untouched():
    model, _ = tiny()
    stack = AdapterStack(model, SECTION, seed=7)
    stack.add_task(0, "t0")
    fill_b(stack.model, "t0", seed=3)
    before = {n: p.detach().clone() for n, p in stack.model.named_parameters()}
    stack.add_task(1, "t1")
    after = dict(stack.model.named_parameters())
    for n, value in before.items():
        assert torch.equal(after[n], value), n


# ---------------------------------------------------------------- save / load


def test_save_and_load_round_trip_gives_identical_logits(tmp_path):
    model, _ = tiny()
    stack = AdapterStack(model, SECTION, seed=7)
    dirs = []
    for index, name in enumerate(TASKS):
        stack.add_task(index, name)
        fill_b(stack.model, name, seed=20 + index)  # stands in for training
        stack.save_current(tmp_path / "adapters" / name)
        dirs.append((name, tmp_path / "adapters" / name))
    expected = logits(stack.model)

    base, _ = tiny()
    loaded = AdapterStack.load(base, SECTION, dirs)
    loaded.model.eval()
    assert list(loaded.model.base_model.active_adapters) == TASKS
    assert not any(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(logits(loaded.model), expected, atol=0, rtol=0)


def test_save_current_writes_only_the_current_adapter(tmp_path):
    stack = stack_with(["t0", "t1"])
    stack.save_current(tmp_path / "t1")
    files = {p.name for p in (tmp_path / "t1").iterdir()}
    assert "adapter_config.json" in files
    assert any(f.startswith("adapter_model") for f in files)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "t1" / "adapter_model.safetensors"))
    assert len(tensors) == N_LAYERS * 2 * 2
    # no temp folders left next to it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t1"]


def test_an_adapter_trains_again_only_as_the_stacks_last():
    stack = stack_with(["t0", "t1"])
    stack.add_task(2, "t1")  # the last one: trainable again (what SeqLoRA does every task)
    assert stack.adapters == ["t0", "t1"] and stack.current == "t1"
    with pytest.raises(ValueError, match="'t0' is not the stack's last"):
        stack.add_task(3, "t0")


# ---------------------------------------------------------------- evaluation helpers


def by_hand_mean_logprob(model, item: Encoded) -> float:
    ids = torch.tensor([item.input_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    values = [logp[j - 1, item.input_ids[j]].item() for j in range(1, len(item.input_ids))
              if item.labels[j] != IGNORE]
    return sum(values) / len(values)


def test_target_logprobs_batched_equals_unpadded_by_hand():
    from cl_flat.evaluate import target_logprobs

    stack = stack_with()
    for k, name in enumerate(TASKS):
        fill_b(stack.model, name, seed=30 + k)
    model = stack.model
    model.eval()
    items = [
        Encoded((10, 11, 12, 13, 14, 15, 16, 17, 200), (IGNORE,) * 8 + (200,)),
        Encoded((20, 21, 201, 202, 203), (IGNORE, IGNORE, 201, 202, 203)),
        Encoded((30, 31, 32, 33, 204, 205), (IGNORE,) * 4 + (204, 205)),
        Encoded((40, 206), (IGNORE, 206)),
    ]
    pad_id = 256
    got = target_logprobs(model, items, pad_id, torch.device("cpu"))
    assert len(got) == len(items)
    for value, item in zip(got, items):
        assert value == pytest.approx(by_hand_mean_logprob(model, item), abs=1e-5)


def test_eval_indices_cap_and_determinism():
    from cl_flat.evaluate import eval_indices

    assert eval_indices(7, 10, seed=1, task_name="a") == list(range(7))
    assert eval_indices(7, 7, seed=1, task_name="a") == list(range(7))
    assert eval_indices(7, None, seed=1, task_name="a") == list(range(7))

    torch.manual_seed(0)
    first = eval_indices(100, 10, seed=1, task_name="a")
    torch.manual_seed(999)
    second = eval_indices(100, 10, seed=1, task_name="a")
    assert first == second
    assert len(first) == 10 and len(set(first)) == 10
    assert first == sorted(first)
    assert all(0 <= i < 100 for i in first)
    assert first != list(range(10))  # a sample, not the head of the test set
    others = [eval_indices(100, 10, seed=s, task_name=t) for s, t in ((2, "a"), (1, "b"))]
    assert all(o != first for o in others)
