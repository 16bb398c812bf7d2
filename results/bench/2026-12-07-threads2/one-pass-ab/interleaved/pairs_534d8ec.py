"""pairs.py for the code of 534d8ec (before _EngineTimer): the same engine, batches and alternation,
the update as that code's bench ran it (window, then engine.step)."""

import json
import sys
import time
from pathlib import Path

from cl_flat import bench, dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import load_config
from cl_flat.flatness import build_method
from cl_flat.loss import target_loss, target_split_losses
from cl_flat.models import load_model
from cl_flat.train import BatchShape, EngineContext, TaskPlan, create_engine

sys.path.insert(0, str(Path(__file__).parent))
from pairs import alternate  # noqa: E402


def main() -> None:
    pairs = int(sys.argv[1])
    flatness, _ = bench.VARIANTS["rwp_full_one_pass"]
    dist.init_distributed()
    config = load_config("configs/bench_cpu.yaml", [f"flatness={json.dumps(flatness)}"])
    model, _ = load_model(config.model.name_or_path, config.model.dtype, config.run.seed)
    stack = AdapterStack(model, config.lora, config.run.seed)
    stack.add_task(0, config.tasks[0].name)
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    batches = bench._batches(config, model.config.vocab_size, dist.device())
    total, t = 4 * pairs + 10, config.training  # the schedule's length only (as recorded in results.txt)
    plan = TaskPlan(BatchShape.of(t, 1), total, total)
    engine = create_engine(t, config.deepspeed, stack.model, list(params.values()), plan)

    def timer(method, step: int) -> float:
        start = time.perf_counter()
        ctx = EngineContext(engine, target_loss, params, step=step, total_steps=total, seed=config.run.seed, rank=0,
                            world_size=1, split_loss_fn=target_split_losses)
        method.window(ctx, batches)
        engine.step()
        return time.perf_counter() - start

    method, none = build_method(config.flatness), build_method({"method": "none"})
    method.begin_task(engine.module)
    none.begin_task(engine.module)
    alternate(timer, method, none, pairs)


if __name__ == "__main__":
    main()
