"""Run in 1 or 2 processes: train a tiny IncLoRA model with the real loop (DeepSpeed) and
replay the same updates in plain torch with `reference_update` (mean over ranks), then
compare. Usage: python equivalence_worker.py OUT.json '<json list of cases>'

Each case is a dict of overrides (flatness, gas, clip, zero, model: tiny-random:llama by default or
tiny-random:t5, whose examples are encoder-decoder ones); all cases run in one process group
(imports and start-up are paid once) and OUT.json gets one result per case."""

from __future__ import annotations

import copy
import json
import sys

import torch

from cl_flat import dist as ds
from cl_flat.adapters import AdapterStack
from cl_flat.config import validate_config
from cl_flat.data.batches import Encoded, Seq2SeqEncoded
from cl_flat.data.plan import TaskPlan, TrainTask, window_batches
from cl_flat.flatness import build_method, reference_update
from cl_flat.loss import target_loss
from cl_flat.models import load_model
from cl_flat.seeding import derive_seed
from cl_flat.train import train_task


def run_case(overrides: dict) -> dict:
    overrides = dict(overrides)
    bf16 = overrides.pop("bf16", False)  # model in bf16 under DeepSpeed bf16 (the replay is then approximate)
    name = overrides.pop("model", "tiny-random:llama")
    raw = {
        "run": {"name": "eq", "seed": 3},
        "model": {"name_or_path": name, "dtype": "bf16" if bf16 else "fp32"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},  # T5: q, v
        "tasks": [{"name": "a", "source": "builtin"}, {"name": "b", "source": "builtin"}],
        "training": {"micro_batch_size": 2, "gradient_accumulation_steps": overrides.pop("gas", 1),
                     "max_steps": 3, "learning_rate": 0.01, "max_grad_norm": overrides.pop("clip", None)},
        "flatness": overrides.pop("flatness", {"method": "none"}),
        "deepspeed": {"zero_stage": overrides.pop("zero", 0), "bf16": bf16},
        "logging": {"progress": False},
    }
    config = validate_config(raw)
    model, _ = load_model(name, "bf16" if bf16 else "fp32", seed=3)
    stack = AdapterStack(model, config.lora, seed=3)
    stack.add_task(0, "a")
    with torch.no_grad():  # a trained-looking first adapter, so the frozen stack matters
        for name, p in stack.model.named_parameters():
            if ".lora_B.a." in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.1)
    stack.add_task(1, "b")
    stack.model.to(ds.device())  # the replay runs on the training device (CPU here, CUDA in tests/gpu)
    reference = copy.deepcopy(stack.model)
    initial = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    frozen_before = {n: p.detach().clone() for n, p in stack.model.named_parameters() if not p.requires_grad}
    generator = torch.Generator().manual_seed(11)
    if name == "tiny-random:t5":  # encoder: 5 to 9 tokens; decoder target: 2 to 4 tokens (padding on both sides)
        examples = [Seq2SeqEncoded(tuple(torch.randint(3, 250, (5 + k % 5,), generator=generator).tolist()),
                                   tuple(torch.randint(3, 250, (2 + k % 3,), generator=generator).tolist()))
                    for k in range(64)]
    else:
        examples = [Encoded(tuple(ids := torch.randint(3, 250, (9,), generator=generator).tolist()),
                            tuple([-100] * 5 + ids[5:])) for _ in range(64)]
    method = build_method(config.flatness)
    logs: list[dict] = []
    task = TrainTask(1, "b", examples, 256)
    train_task(task, stack.model, method, config.training, config.deepspeed, config.run.seed, logs.append)

    # plain torch replay
    world = ds.world_size()
    ref_params = {n: p for n, p in reference.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(ref_params.values()), lr=0.01, weight_decay=0.0)
    plan = TaskPlan.for_task(config.training, len(examples), world, "b")
    seed = derive_seed(config.run.seed, "method", 1)
    replayed = [build_method(config.flatness) for _ in range(world)]  # each rank's method, over the whole task
    for rank_method in replayed:
        rank_method.begin_task(reference)
    for update in range(plan.updates):
        # Bi-LoRA's auxiliary adapter ascends on the ranks' mean gradient (the loop's all-reduce): each
        # rank's ascent is held back and replayed on the mean of the ranks' auxiliary gradients
        deferred: list[list[torch.Tensor]] = []
        if world > 1:
            for rank_method in replayed:
                if hasattr(rank_method, "ascend"):
                    rank_method.ascend = deferred.append
        per_rank = [reference_update(config.flatness, reference,
                                     window_batches(task, plan, update, config.run.seed, r, ds.device()),
                                     target_loss, step=update, total_steps=plan.updates, seed=seed,
                                     rank=r, world_size=world, method=replayed[r])
                    for r in range(world)]
        if deferred:
            mean = [sum(parts) / world for parts in zip(*deferred)]
            for rank_method in replayed:
                del rank_method.ascend  # the class's own again
                rank_method.ascend(mean)
        for n, p in ref_params.items():
            p.grad = sum(g[n] for g in per_rank) / world
        if config.training.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(ref_params.values()), config.training.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    trained = dict(stack.model.named_parameters())
    diff = max((trained[n].detach() - p.detach()).abs().max().item() for n, p in ref_params.items())
    moved = max((trained[n].detach() - initial[n]).abs().max().item() for n in ref_params)
    # bf16: the frozen weights are bf16 from the load, the trained adapter stays fp32 (autocast over it)
    frozen_identical = all(torch.equal(p0.to(trained[n].dtype), trained[n].detach()) for n, p0 in frozen_before.items())
    return {"max_abs_diff": diff, "frozen_identical": frozen_identical, "world": world, "moved": moved,
            "n_trainable": len(ref_params),
            "last_log": logs[-1]}


def main(out_path: str, cases: list[dict]) -> None:
    ds.init_distributed()
    results = [run_case(case) for case in cases]
    if ds.rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
