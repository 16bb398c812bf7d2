"""Run the real update loop (DeepSpeed ZeRO-0, fp32, one process) on a tiny model and count, per
update, every call that brings a tensor's value to the host. Usage:
python host_syncs_worker.py '<json list of cases>'  -> prints {label: {"tool": [...], "mask": [...]}},
the counts per update outside and inside transformers' causal-mask construction.

Counted: Tensor.item, .tolist, .cpu, .numpy, float()/int()/bool()/index of a tensor, and
torch.cuda.synchronize, anywhere in the process (the tool, DeepSpeed, transformers, torch) while
an update runs. On CUDA each of these waits for the device; here, on CPU, they are counted all the
same, so the bound holds without a GPU. Not counted, by construction host-side: building the
micro-batches (`window_batches`: the data order is a CPU permutation, collation happens on the host
before the copy to the device) and torch's AdamW step, whose step counter is a CPU tensor
(`capturable=False`, torch's default) that it reads with `.item()` without touching the device.
Counted apart (`mask`): transformers' causal-mask construction, which tests the attention mask
(`mask.all()`, or without a mask the position ids for packed sequences) on the device once per
forward; outside the tool's reach short of materialising a 4-D mask, which would cost SDPA its
causal fast path."""

from __future__ import annotations

import json
import sys

import torch

import cl_flat.train as train
from cl_flat import dist as ds
from cl_flat.adapters import AdapterStack
from cl_flat.config import validate_config
from cl_flat.data.batches import Encoded
from cl_flat.data.plan import TrainTask
from cl_flat.flatness import build_method
from cl_flat.models import load_model

STATE = {"count": 0, "mask": 0, "paused": 0, "in_mask": 0}


def counting(original):
    def wrapper(*args, **kwargs):
        if not STATE["paused"]:
            STATE["mask" if STATE["in_mask"] else "count"] += 1
        return original(*args, **kwargs)
    return wrapper


def in_mask(original):
    def wrapper(*args, **kwargs):
        STATE["in_mask"] += 1
        try:
            return original(*args, **kwargs)
        finally:
            STATE["in_mask"] -= 1
    return wrapper


def paused(original):
    def wrapper(*args, **kwargs):
        STATE["paused"] += 1
        try:
            return original(*args, **kwargs)
        finally:
            STATE["paused"] -= 1
    return wrapper


def main(cases: list[dict]) -> None:
    ds.init_distributed()
    for name in ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__"):
        setattr(torch.Tensor, name, counting(getattr(torch.Tensor, name)))
    torch.cuda.synchronize = counting(torch.cuda.synchronize)
    train.window_batches = paused(train.window_batches)
    torch.optim.AdamW.step = paused(torch.optim.AdamW.step)
    from transformers.models.llama import modeling_llama

    modeling_llama.create_causal_mask = in_mask(modeling_llama.create_causal_mask)
    out = {}
    for case in cases:
        raw = {"run": {"name": "s", "seed": 0}, "model": {"name_or_path": "tiny-random:llama"},
               "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
               "tasks": [{"name": "a", "source": "builtin"}],
               "training": {"micro_batch_size": case.get("mbs", 2), "gradient_accumulation_steps": case.get("gas", 1),
                            "max_steps": 5, "learning_rate": 0.01, "max_grad_norm": 1.0},
               "flatness": case["flatness"], "deepspeed": {"zero_stage": 0}, "logging": {"progress": False}}
        config = validate_config(raw)
        model, _ = load_model("tiny-random:llama", "fp32", seed=0)
        stack = AdapterStack(model, config.lora, seed=0)
        stack.add_task(0, "a")
        generator = torch.Generator().manual_seed(0)
        examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=generator).tolist()),
                            tuple([-100] * 5 + ids[5:])) for _ in range(64)]
        marks: list[tuple[int, int]] = []

        def log(record, marks=marks):
            marks.append((STATE["count"], STATE["mask"]))

        train.train_task(TrainTask(0, "a", examples, 256), stack.model, build_method(config.flatness),
                         config.training, config.deepspeed, 0, log)
        # between two log lines lies exactly one update (the first one also holds the engine's set-up)
        out[case["label"]] = {kind: [b[i] - a[i] for a, b in zip(marks, marks[1:])]
                              for i, kind in enumerate(("tool", "mask"))}
    print(json.dumps(out))
    ds.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
