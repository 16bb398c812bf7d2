"""none and rwp_full_one_pass alternating on one engine (the bench's _EngineTimer, code from 3e52dc3 on),
each side's time kept per pair: `python pairs.py N [LABEL]`, run in the worktree under test."""

import json
import statistics
import sys

from cl_flat import bench, dist
from cl_flat.adapters import AdapterStack
from cl_flat.config import load_config
from cl_flat.flatness import build_method
from cl_flat.models import load_run_model


def alternate(timer, method, none, pairs: int) -> None:
    """One untimed update of each, then `pairs` timed (none, method) pairs; prints both sides and the ratios."""
    timer(method, 0)
    timer(none, 1)
    plain, noisy = [], []
    for i in range(pairs):
        plain.append(timer(none, 2 + 2 * i))
        noisy.append(timer(method, 3 + 2 * i))
    ratios = [m / n for m, n in zip(noisy, plain)]
    print("none", [f"{t:.2f}" for t in plain])
    print("meth", [f"{t:.2f}" for t in noisy])
    print(f"RESULT median none {statistics.median(plain):.3f} method {statistics.median(noisy):.3f} ratio-median "
          f"{statistics.median(ratios):.3f} ratio-of-medians {statistics.median(noisy) / statistics.median(plain):.3f}")


def main() -> None:
    pairs, label = int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "rwp_full_one_pass"
    flatness, _ = bench.variants()[label]
    dist.init_distributed()
    config = load_config("configs/bench_cpu.yaml", [f"flatness={json.dumps(flatness)}"])
    model, _ = load_run_model(config.model, config.deepspeed, config.run.seed)
    stack = AdapterStack(model, config.lora, config.run.seed)
    stack.add_task(0, config.tasks[0].name)
    params = {n: p for n, p in stack.model.named_parameters() if p.requires_grad}
    batches = bench._batches(config, model.config.vocab_size, dist.device())
    timer = bench._EngineTimer(config, stack.model, params, batches, 4 * pairs + 10)
    alternate(timer, timer.begin(build_method(config.flatness)), timer.begin(build_method({"method": "none"})), pairs)


if __name__ == "__main__":
    main()
