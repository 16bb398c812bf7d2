"""Host synchronisations per update, counted on CPU so the rule holds without a
GPU: the update loop brings an update's values (losses, method statistics, gradient norm,
non-finite flags) to the host in ONE transfer, and no method synchronises on its own. Counted
in `host_syncs_worker.py` by wrapping every call that reads a tensor's value on the host
(`.item()`, `.tolist()`, `.cpu()`, `float(t)`, `bool(t)`, ..., `torch.cuda.synchronize`), in the
tool, DeepSpeed, transformers and torch alike."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, quiet_env

pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("host_syncs_worker.py")

# (label, flatness block, micro-batches per update, forwards per update)
CASES = [
    ("none", {"method": "none"}, 1, 1),
    ("none_gas2", {"method": "none"}, 2, 2),
    ("sam", {"method": "sam", "rho": 0.05}, 1, 2),
    ("rwp_full", {"method": "rwp", "scope": "full"}, 1, 2),
    ("rwp_lora_gas2", {"method": "rwp", "scope": "lora"}, 2, 3),
    ("rwp_one_pass", {"method": "rwp", "scope": "full", "two_batch": True, "one_pass": True}, 1, 1),
    ("bilora_gas2", {"method": "bilora", "rho": 0.05}, 2, 2),
    ("cflat", {"method": "cflat", "rho": 0.05}, 1, 4),
]


def test_one_host_sync_per_update():
    cases = [{"label": label, "flatness": flatness, "gas": gas} for label, flatness, gas, _ in CASES]
    proc = subprocess.run([sys.executable, str(WORKER), json.dumps(cases)], cwd=ROOT, env=quiet_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])
    for label, _, _, forwards in CASES:
        tool, mask = counts[label]["tool"], counts[label]["mask"]
        assert len(tool) == 4, (label, counts[label])  # 5 updates -> 4 gaps between log lines
        # the loop's one transfer, not one for each of the grad-norm .item(), the non-finite
        # flags' .tolist() and the method's own .item() or .tolist()
        assert all(n == 1 for n in tool), (label, tool)
        # transformers' causal-mask check: one per forward, none anywhere else
        assert all(n == forwards for n in mask), (label, mask)
