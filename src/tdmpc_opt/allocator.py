"""How this process's memory allocator treats freed memory.

A planning step allocates and frees hundreds of activations of a few hundred KB to a few MB.
glibc's ``malloc`` hands such blocks back to the operating system when they are freed (above
its mmap threshold, or by trimming the top of the heap), so the next allocation of the same
size gets fresh pages that the kernel must fault in and zero one 4 KB page at a time: ~5,000
page faults per batch-1 float32 plan of the 1M model, ~115,000 per batch-16 plan, 11-12% of
the planning time on a 2-core CPU (benchmarks/README.md, 2026-12-03).
:func:`keep_freed_memory` tells glibc to keep freed blocks for reuse instead: blocks below
32 MiB come from the heap, and the heap is trimmed only when 512 MiB lie free at its top. The
process's resident memory then stays near its peak instead of shrinking between steps.

Closing a MuJoCo environment frees ~25 MB (a ~12 MB model, a ~14 MB data arena) in the middle
of the heap, where later small blocks keep it from being trimmed: an evaluation grew by ~2 MB
per episode. :func:`release_freed_memory` hands such free pages back; the evaluation loop calls
it whenever environments were closed (benchmarks/README.md, "evaluation memory").

The command line calls it at start (and rollout workers do), so ``tdmpc-opt eval``, ``bench``
and ``pipeline`` run with it; ``TDMPC_OPT_MALLOC=default`` keeps glibc's own behaviour. Other C
libraries (macOS, musl) are left alone. Child processes inherit it through glibc's
``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` environment variables, set here unless
already set.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

log = logging.getLogger(__name__)

ENV = "TDMPC_OPT_MALLOC"
"""``default``: leave the allocator as it is."""
MMAP_THRESHOLD = 32 << 20
"""Blocks below this many bytes come from the heap (glibc's largest allowed threshold)."""
TRIM_THRESHOLD = 512 << 20
"""The heap's top is handed back to the system only when this many bytes lie free there."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers
_kept: bool | None = None
"""Whether :func:`keep_freed_memory` put the setting in effect (None: not called yet)."""


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks for reuse (see the module doc); once per
    process. Returns whether the setting is in effect (False: opted out, or not glibc)."""
    global _kept
    if _kept is None:
        _kept = os.environ.get(ENV, "").lower() != "default" and _set_thresholds()
        if _kept:
            os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
            os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(TRIM_THRESHOLD))
        log.debug("keep freed memory: %s", _kept)
    return _kept


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim``; 1-2
    ms, ~35 ms on a fragmented 800 MB heap). Nothing happens on other C libraries."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def in_effect() -> bool:
    """Whether this process keeps freed memory (:func:`keep_freed_memory` called and took)."""
    return bool(_kept)


def _set_thresholds() -> bool:
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """glibc, when this process runs on it (it has ``mallopt`` and ``malloc_trim``)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - AttributeError where they are missing
    except (OSError, AttributeError):  # not glibc
        return None
    return libc
