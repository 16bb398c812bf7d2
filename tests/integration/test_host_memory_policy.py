"""The host heap policy (`cl_flat.host_memory`): heap memory freed by one update stays resident for the next,
measured in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cl_flat import host_memory
from helpers import ROOT, quiet_env

pytestmark = pytest.mark.integration

MIB = 2**20

# Runs in a fresh interpreter: the pytest process's heap already holds whatever earlier tests freed
# (and keeps it, once an in-process test's init_distributed set the policy), so blocks allocated
# here would reuse those resident pages and the test could not tell a trim from a keep.
_MEASURE = """
import ctypes, os
from cl_flat import host_memory
MIB = 2**20
libc = host_memory._glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

def freed_and_kept(blocks=96):
    before = resident()
    pointers = [libc.malloc(MIB) for _ in range(blocks)]
    for pointer in pointers:
        ctypes.memset(pointer, 1, MIB)
    added = resident() - before
    for pointer in reversed(pointers):
        libc.free(pointer)
    return added, resident() - before

# control: glibc's default trim threshold (128 KiB, fixed) hands the freed top of the heap back
assert libc.mallopt(host_memory.M_TRIM_THRESHOLD, 128 * 1024)
control = freed_and_kept()
set_now = host_memory.keep_freed_heap()
policy = freed_and_kept()
print(*control, int(set_now), *policy, int(host_memory.keep_freed_heap()))
"""


@pytest.mark.skipif(host_memory._glibc() is None, reason="the policy is glibc's")
def test_freed_heap_stays_resident():
    # no policy the user chose in the child's environment
    env = {k: v for k, v in quiet_env().items() if k not in (*host_memory.USER_SETTINGS, "LD_PRELOAD")}
    run = subprocess.run([sys.executable, "-c", _MEASURE], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    control_added, control_kept, set_now, policy_added, policy_kept, set_again = map(int, run.stdout.split())
    for added in (control_added, policy_added):  # the 96 MiB came from fresh pages, or the test cannot tell
        assert added >= 48 * MIB
    assert control_kept < 16 * MIB
    assert set_now == 1
    assert policy_kept >= 80 * MIB
    assert set_again == 0  # once per process
