"""The update path holds the GPU rule on a CPU: per update, ONE host sync (the loop's fetch; transformers adds its
causal-mask check once per forward), an optimizer step whose device work does not grow with the number of LoRA
tensors, and device ops within 15% of the hand-written torch + peft floor per forward pass.

Counted in `update_ops_worker.py` with `cl_flat.opcount.DeviceWork` (aten ops that launch a kernel on a GPU, and
host syncs) through the real `train.one_update` with configs/bench_gpu.yaml's deepspeed and precision sections
(ZeRO-0, bf16: autocast over fp32 adapters) on a tiny Llama, torch AdamW on its multi-tensor path as on a GPU.
Why it matters on a GPU: there an update of a 1B model is launch-bound at a few hundred tensors, and every host
sync drains the device's queue (DeepSpeed's bf16 wrapper of ZeRO-0 cost one sync and ~20 launches per LoRA
tensor: 1.7× the floor's time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cl_flat.registry import METHODS
from helpers import ROOT, quiet_env

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("update_ops_worker.py")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # bench_gpu's: 28 LoRA tensors
QV = ["q_proj", "v_proj"]  # 8 LoRA tensors
ADAPTED_LAYERS = 2 * len(ALL)  # the tiny Llama's two decoder layers
LORA_TENSORS = 2 * ADAPTED_LAYERS

# work a method's formula does per adapted layer beyond its passes' forwards and backwards (per layer as a
# forward is, never per optimizer step): Flat-LoRA's row norms of the merged weight (`merged_row_norms`: about
# a dozen ops per layer); RWP one_pass splits each noisy linear (every W0 and LoRA A, B) into two matmuls in the
# forward and in the backward, and forms θ+ε for each LoRA tensor (about 4 ops per split linear); Bi-LoRA adds
# its auxiliary product x·A₂ᵀB₂ᵀ to every adapted layer's output and takes both factors' gradients in the
# same backward (a second low-rank branch per layer and micro-batch: about 18 ops per layer here, 814 ops in
# all against the floor's 494; folding A₂, B₂ into the peft layer's own matmuls is the way to fewer)
PER_LAYER = {"flat_lora": 12 * ADAPTED_LAYERS, "rwp_one_pass": 4 * (ADAPTED_LAYERS + LORA_TENSORS),
             "bilora": 18 * ADAPTED_LAYERS}


def _cases() -> list[dict]:
    # every method the package registers (`cl-flat methods`; an installed outside plugin is its author's), with
    # its defaults, and the variants that take other code paths
    methods = [name for name in METHODS.names() if METHODS.get(name).cls.__module__.startswith("cl_flat.")]
    cases = [{"label": "floor", "targets": ALL}, {"label": "floor_qv", "targets": QV},
             {"label": "none_qv", "targets": QV, "flatness": {"method": "none"}}]
    cases += [{"label": name, "targets": ALL, "flatness": {"method": name}} for name in methods]
    cases += [{"label": "floor_fp32", "targets": ALL, "fp32": True},  # fp32 (configs/bench_cpu.yaml) too
              {"label": "none_fp32", "targets": ALL, "flatness": {"method": "none"}, "fp32": True}]
    cases += [{"label": "asam", "targets": ALL, "flatness": {"method": "sam", "adaptive": True}},
              {"label": "rwp_one_pass", "targets": ALL,
               "flatness": {"method": "rwp", "scope": "full", "two_batch": True, "one_pass": True}}]
    return cases


@pytest.fixture(scope="module")
def counts() -> dict:
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(_cases())], cwd=ROOT, env=quiet_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_host_sync_per_update(counts):
    for label, c in counts.items():
        assert c["syncs"] == [1] * len(c["syncs"]), (label, c["syncs"])  # the fetch (floor: its loss.item())
        assert c["mask_syncs"] == c["forwards"], (label, c)  # transformers' mask check, once per forward


def test_optimizer_step_does_not_grow_with_lora_tensors(counts):
    small, large = counts["none_qv"], counts["none"]
    assert (small["lora_tensors"], large["lora_tensors"]) == (8, LORA_TENSORS)
    assert small["step_ops"] == large["step_ops"], (small["step_ops"], large["step_ops"])
    assert 0 < large["step_ops"][0] < 40  # norm, clip, check, fused/foreach AdamW: a few dozen ops at most
    for label, c in counts.items():
        if label != "floor":  # every method ends in the same step (its own stats ride along in the fetch)
            assert max(c["step_ops"]) <= large["step_ops"][0] + 8, (label, c["step_ops"])


def test_device_ops_within_15_percent_of_the_floor_per_pass(counts):
    for label, c in counts.items():
        if label.startswith("floor"):
            continue
        floor = counts[{"none_qv": "floor_qv", "none_fp32": "floor_fp32"}.get(label, "floor")]["ops"]
        assert len(set(floor)) == 1, floor
        for ops, passes in zip(c["ops"], c["forwards"]):
            bound = 1.15 * passes * floor[0] + PER_LAYER.get(label, 0)
            assert ops <= bound, (label, ops, passes, floor[0], round(ops / (passes * floor[0]), 3))
