"""keep_freed_memory: freed activations are reused instead of faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="glibc's malloc and minor page faults are Linux's")

# Allocate eight 1.5 MB tensors (above glibc's default mmap threshold), free them, 50 times, and
# count the loop's minor page faults: with glibc's defaults the freed heap top (12 MB, above
# its trim threshold) goes back to the system and every round faults the pages in again.
_CHILD = """
import json, resource, sys
import torch
from tdmpc_opt.allocator import keep_freed_memory
kept = keep_freed_memory()
def round():
    live = [torch.ones(1000, 384) for _ in range(8)]
    del live
for _ in range(3):
    round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    round()
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before, "env": __import__("os").environ.get(
    "MALLOC_MMAP_THRESHOLD_")}))
"""


def _run(**env) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k != "TDMPC_OPT_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env={**clean, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_freed_memory_is_reused_and_children_inherit_it():
    default, kept = _run(TDMPC_OPT_MALLOC="default"), _run()
    assert not default["kept"] and kept["kept"]
    # 400 allocations of 1.5 MB: ~375 pages each when faulted in again, none when reused
    assert default["faults"] > 400 * 100
    assert kept["faults"] < 400
    assert default["env"] is None and kept["env"] is not None
