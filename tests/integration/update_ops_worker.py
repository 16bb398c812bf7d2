"""Count, per update, the aten operations and host syncs of the REAL update (`train.one_update` on a DeepSpeed
engine built by `train.create_engine`, as training and `cl-flat bench` run it) and of the hand-written floor
(`cl_flat.bench.floor_update`: plain torch + peft + foreach AdamW), with configs/bench_gpu.yaml's deepspeed and
precision sections on a tiny Llama (bf16 base, ZeRO-0). Counted by `cl_flat.opcount.DeviceWork`, per phase:
`step` (train._step: gradient norm, non-finite check, clipping, optimizer and schedule step), `mask`
(transformers' causal-mask construction, which checks the attention mask on the host once per forward) and the
rest. Usage: python update_ops_worker.py '<json list of cases>' -> prints {label: {...per-update lists...}}."""

from __future__ import annotations

import json
import sys

import torch

import cl_flat.train as train
from cl_flat import dist as ds
from cl_flat.adapters import AdapterStack
from cl_flat.bench import floor_optimizer, floor_update
from cl_flat.config import load_config
from cl_flat.data.plan import BatchShape, TaskPlan
from cl_flat.flatness import build_method
from cl_flat.loss import target_loss, target_split_losses
from cl_flat.models import load_run_model
from cl_flat.opcount import DeviceWork, optimizer_host_tensors
from cl_flat.precision import Compute, compute_dtype

WARMUP, COUNTED = 2, 5  # looksam (interval 5) does its SAM pass once in the counted updates


def phased(counter_of, name, original):
    def wrapper(*args, **kwargs):
        counter = counter_of()
        if counter is None:
            return original(*args, **kwargs)
        with counter.phase(name):
            return original(*args, **kwargs)
    return wrapper


def run_case(case: dict, live: dict) -> dict:
    overrides = ["model.name_or_path=tiny-random:llama", "training.micro_batch_size=4", "training.max_seq_length=16",
                 f"lora.target_modules={json.dumps(case['targets'])}", "training.learning_rate=0.01"]
    if case.get("fp32"):  # configs/bench_cpu.yaml's precision
        overrides += ["model.dtype=fp32", "deepspeed.bf16=false"]
    if "zero" in case:
        overrides.append(f"deepspeed.zero_stage={case['zero']}")
    if case.get("flatness"):
        overrides.append(f"flatness={json.dumps(case['flatness'])}")
    config = load_config("configs/bench_gpu.yaml", overrides)
    model, _ = load_run_model(config.model, config.deepspeed, seed=0)
    stack = AdapterStack(model, config.lora, seed=0)
    stack.add_task(0, "a")
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    generator = torch.Generator().manual_seed(0)
    t = config.training
    batches = []
    for _ in range(t.gradient_accumulation_steps):
        ids = torch.randint(3, model.config.vocab_size, (t.micro_batch_size, t.max_seq_length), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    forwards = [0]
    model.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
    if case["label"].startswith("floor"):
        optimizer = floor_optimizer(list(params.values()), t.learning_rate)

        def update(step):
            floor_update(stack.model, list(params.values()), optimizer, batches, config.deepspeed.bf16,
                         t.max_grad_norm)
    else:
        method = build_method(config.flatness)
        plan = TaskPlan(BatchShape.of(t, 1), WARMUP + COUNTED, WARMUP + COUNTED)
        engine = train.create_engine(t, config.deepspeed, stack.model, list(params.values()), plan)
        method.begin_task(engine.module)
        optimizer = engine.optimizer
        compute = Compute(engine.module, compute_dtype(config.deepspeed.bf16))

        def update(step):
            ctx = train.EngineContext(engine, target_loss, params, step=step, total_steps=plan.updates, seed=0,
                                      split_loss_fn=target_split_losses, compute=compute)
            bad, _ = train.one_update(engine, method, ctx, batches, train.StepRule.of(t, config.deepspeed))
            assert not bad, bad
    out: dict[str, list[int]] = {k: [] for k in ("ops", "step_ops", "syncs", "mask_syncs", "forwards")}
    for step in range(WARMUP + COUNTED):
        if step < WARMUP:
            update(step)
            continue
        forwards[0] = 0
        with DeviceWork(optimizer_host_tensors(optimizer)) as counter:
            live["counter"] = counter
            update(step)
        live["counter"] = None
        out["ops"].append(sum(counter.ops.values()))
        out["step_ops"].append(counter.ops["step"])
        out["syncs"].append(sum(counter.syncs.values()) - counter.syncs["mask"])
        out["mask_syncs"].append(counter.syncs["mask"])
        out["forwards"].append(forwards[0])
    out["lora_tensors"] = len(params)
    return out


def main(cases: list[dict]) -> None:
    ds.init_distributed()
    live = {"counter": None}
    train._step = phased(lambda: live["counter"], "step", train._step)
    from transformers.models.llama import modeling_llama

    modeling_llama.create_causal_mask = phased(lambda: live["counter"], "mask", modeling_llama.create_causal_mask)
    print(json.dumps({case["label"]: run_case(case, live) for case in cases}))
    ds.shutdown()


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
