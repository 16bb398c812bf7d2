"""The host heap policy (`cl_flat.host_memory`): which settings it makes, and when it leaves them to the user.
That freed heap memory then stays resident (measured in a fresh interpreter):
tests/integration/test_host_memory_policy.py."""

from __future__ import annotations

import pytest

from cl_flat import host_memory

MIB = 2**20


@pytest.fixture
def no_user_policy(monkeypatch):
    for name in (*host_memory.USER_SETTINGS, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host_memory, "_done", False)


class _RecordingLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 1


@pytest.mark.parametrize("setting", [("MALLOC_ARENA_MAX", "2"), ("MALLOC_TRIM_THRESHOLD_", "0"),
                                     ("LD_PRELOAD", "libjemalloc.so.2")])
def test_a_policy_the_user_chose_wins(no_user_policy, monkeypatch, setting):
    libc = _RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    monkeypatch.setenv(*setting)
    assert not host_memory.keep_freed_heap()
    assert libc.calls == []


def test_sets_both_thresholds(no_user_policy, monkeypatch):
    libc = _RecordingLibc()
    monkeypatch.setattr(host_memory, "_glibc", lambda: libc)
    assert host_memory.keep_freed_heap()
    assert sorted(libc.calls) == [(-3, 32 * MIB), (-1, 2**31 - 1)]  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD


def test_no_op_without_glibc(no_user_policy, monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert not host_memory.keep_freed_heap()
