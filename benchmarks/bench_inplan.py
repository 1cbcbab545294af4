"""Each matrix product and layer kernel of a plan: its time inside plans against its time hot.

`bench_products.py` replays a plan's products back to back; this script times every call where
it happens, inside real plans (a layer-by-layer eager view, whose operations are the ones the
compiled graphs call), then times the same call alone, repeated on a copy of its operands (so
weights and activations stay in cache), and reports per operation and shape both medians and
what the difference costs per plan. It answers how much of a plan's distance from its FLOP
floor is the operations running slower in sequence (weights and activations fetched from
farther away) rather than their own arithmetic.

    python benchmarks/bench_inplan.py --threads 1
    python benchmarks/bench_inplan.py --threads 2 --plans 20

The timer wraps each call only (the dispatch to the kernel is in both measurements); the
bookkeeping between calls is outside it, so plans run slower under it, which does not change
what an operation itself takes.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tdmpc_opt import cpu_kernels
from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import _plan_inputs
from tdmpc_opt.fast_model import FastWorldModel
from tdmpc_opt.planner import plan

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
TIMED_PREFIXES = ("aten.mm", "aten.addmm", "aten._int_mm", "tdmpc_opt_cpu.")
"""Operations timed: BLAS products and this package's kernels."""


def call_key(func, args) -> tuple:
    """``(op name, shapes of its tensor arguments)`` of one call."""
    return (str(func).removesuffix(".default"),
            tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))


class TimeCalls(TorchDispatchMode):
    """Wall time of every timed call (:data:`TIMED_PREFIXES`) run inside it, by
    :func:`call_key`, and the first call of each key with its operands copied."""

    def __init__(self):
        super().__init__()
        self.seconds: dict[tuple, list[float]] = collections.defaultdict(list)
        self.first: dict[tuple, tuple] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not str(func).startswith(TIMED_PREFIXES):
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        key = call_key(func, args)
        self.seconds[key].append(elapsed)
        if key not in self.first:
            self.first[key] = (func, [a.clone() if isinstance(a, torch.Tensor) else a
                                      for a in args], dict(kwargs))
        return out


def hot_seconds(func, args, kwargs, calls: int = 50) -> float:
    """Median seconds of ``func(*args, **kwargs)`` repeated (after 10 untimed calls)."""
    for _ in range(10):
        func(*args, **kwargs)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        func(*args, **kwargs)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plans", type=int, default=10, help="timed plans")
    args = p.parse_args()
    if not Path(args.checkpoint).is_file():
        print(f"bench_inplan: no checkpoint at {args.checkpoint}", file=sys.stderr)
        return 2
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(args.threads)
    agent = load_agent(args.checkpoint)
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, 1)
    whole = {"whole_networks": False} if args.precision == "fp32" and \
        cpu_kernels.available() else {}
    fm = FastWorldModel(agent.model, args.precision, **whole)

    def one_plan():
        plan(fm, agent.planner, z, task, prev, t0, True, noise, gamma)
    for _ in range(5):
        one_plan()
    start = time.perf_counter()
    for _ in range(args.plans):
        one_plan()
    plain_ms = 1e3 * (time.perf_counter() - start) / args.plans
    timer = TimeCalls()
    with timer:
        for _ in range(args.plans):
            one_plan()
    print(f"{fm.layers}, {args.threads} threads: {plain_ms:.1f} ms per plan untimed; "
          f"{args.plans} plans timed call by call")
    print("| operation | shapes | calls per plan | in plan us | hot us | in plan / hot "
          "| in plan ms per plan | hot ms per plan |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    total_in, total_hot = 0.0, 0.0
    for key, times in sorted(timer.seconds.items(), key=lambda kv: -sum(kv[1])):
        per_plan = len(times) / args.plans
        inplan = statistics.median(times)
        hot = hot_seconds(*timer.first[key])
        total_in += per_plan * inplan
        total_hot += per_plan * hot
        shapes = " ".join("x".join(map(str, s)) for s in key[1])
        print(f"| {key[0]} | {shapes} | {per_plan:g} | {1e6 * inplan:.1f} | {1e6 * hot:.1f} | "
              f"{inplan / hot:.2f} | {1e3 * per_plan * inplan:.2f} | {1e3 * per_plan * hot:.2f} |")
    print(f"total (medians x calls): in plan {1e3 * total_in:.1f} ms, hot {1e3 * total_hot:.1f} "
          f"ms per plan ({total_in / total_hot:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
