"""The host heap policy (`cl_flat.host_memory`): heap memory freed by one update stays resident for the next."""

from __future__ import annotations

import ctypes
import os

import pytest

from cl_flat import host_memory

GLIBC = host_memory._glibc()
MIB = 2**20


def _resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _freed_and_kept(blocks: int = 96) -> int:
    """Resident bytes still held after `blocks` touched 1 MiB heap blocks are freed, of those they added."""
    GLIBC.malloc.restype, GLIBC.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    GLIBC.free.argtypes = [ctypes.c_void_p]
    before = _resident()
    pointers = [GLIBC.malloc(MIB) for _ in range(blocks)]
    for pointer in pointers:
        ctypes.memset(pointer, 1, MIB)
    added = _resident() - before
    for pointer in reversed(pointers):
        GLIBC.free(pointer)
    assert added >= blocks * MIB // 2, "the blocks did not come from fresh pages; the test cannot tell"
    return _resident() - before


@pytest.fixture
def no_user_policy(monkeypatch):
    for name in (*host_memory.USER_SETTINGS, "LD_PRELOAD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(host_memory, "_done", False)


@pytest.mark.skipif(GLIBC is None, reason="the policy is glibc's")
def test_freed_heap_stays_resident(no_user_policy):
    # control: with glibc's default trim threshold (128 KiB, fixed) the freed top of the heap goes back
    assert GLIBC.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
    assert _freed_and_kept() < 16 * MIB
    assert host_memory.keep_freed_heap()
    assert _freed_and_kept() >= 80 * MIB
    assert not host_memory.keep_freed_heap()  # once per process


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
