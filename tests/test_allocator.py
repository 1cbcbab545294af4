"""keep_freed_memory: freed activations are reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc and minor page faults are Linux's")

# Allocate eight 9 MiB tensors, free them, 10 times, and count the loop's minor page faults.
# Whether glibc's own settings fault freed blocks in again depends on its dynamic thresholds and
# the heap's layout (in a planning process they do, benchmarks/README.md); the test makes them
# do it for sure with a fixed 128 KiB mmap threshold from the environment, which
# keep_freed_memory must override.
_CHILD = """
import json, os, resource
import torch
from tdmpc_opt.allocator import keep_freed_memory
kept = keep_freed_memory()
def round():
    live = [torch.ones(6144, 384) for _ in range(8)]
    del live
for _ in range(3):
    round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    round()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before,
                  "env": os.environ.get("MALLOC_MMAP_THRESHOLD_")}))
"""
_RETURN_FREED = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _run(**env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "TDMPC_OPT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_is_reused():
    default = _run(TDMPC_OPT_MALLOC="default", **_RETURN_FREED)
    kept = _run(**_RETURN_FREED)
    assert not default["kept"] and kept["kept"]
    # 80 allocations of 9 MiB: 2,304 pages each when faulted in again, none when reused
    assert default["faults"] > 80 * 1000
    assert kept["faults"] < 1000


def test_child_processes_inherit_the_setting():
    from tdmpc_opt.allocator import MMAP_THRESHOLD

    assert _run()["env"] == str(MMAP_THRESHOLD)
    assert _run(TDMPC_OPT_MALLOC="default")["env"] is None


# Fill 180 MiB of heap (20 blocks of 9 MiB, below keep_freed_memory's mmap threshold), pin the
# heap's top with a small block, free the big ones: they stay resident (the top is not free,
# and 512 MiB must lie free there before glibc trims) until release_freed_memory.
_RELEASE_CHILD = """
import json
import torch
from tdmpc_opt.allocator import keep_freed_memory, release_freed_memory
def resident_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
assert keep_freed_memory()
big = [torch.ones(6144, 384) for _ in range(20)]
pin = torch.ones(1000)
del big
held = resident_mb()
release_freed_memory()
print(json.dumps({"held": held, "released": resident_mb()}))
"""


def test_release_freed_memory_hands_free_heap_pages_back():
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "TDMPC_OPT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _RELEASE_CHILD], env=clean,
                         capture_output=True, text=True, check=True).stdout
    mb = json.loads(out.strip().splitlines()[-1])
    assert mb["held"] - mb["released"] > 150, mb  # of the 180 MiB freed
