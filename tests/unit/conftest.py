"""Unit tests start no process group and no DeepSpeed engine (test_structure checks that they start no
subprocess either): a test that tries belongs in tests/integration."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_process_group(monkeypatch):
    import torch.distributed

    from cl_flat import dist

    def refused(*args, **kwargs):
        raise AssertionError("a unit test starts no process group or DeepSpeed engine: it belongs in "
                             "tests/integration")

    monkeypatch.setattr(dist, "init_distributed", refused)
    monkeypatch.setattr(torch.distributed, "init_process_group", refused)
