"""Planner variants timed in turn in one process: paired ratios that this host's drift cancels.

Separate processes run one after another on a shared VM differ by more than the effects worth
measuring (session 23 read one setting at 46.1 and 53.5 ms in two processes). Here every
variant is a view of the same model in the same process; they plan the same state (``--batch``
environments, default 1) in turn, ``--calls`` plans each per round, for ``--seconds``; each
round's median is divided by the first variant's in the same round, and the median of those
ratios is reported with the values' difference to the first variant.

A variant is a precision spec followed by optional ``name=0|1`` settings of the view:
:class:`~tdmpc_opt.fast_model.FastWorldModel`'s constructor flags (``fused_kernel``,
``whole_networks``, ``ref_codes``, ``packed_networks``, ``ref_outputs``) or, set before its
first plan, its attributes (e.g. ``fused_outputs=0 fused_decode=0`` for fp32+compile without
the output-layer kernels)::

    python benchmarks/bench_paired.py "fp32+compile" "fp32+compile fused_outputs=0 fused_decode=0"
    python benchmarks/bench_paired.py "fp32" "fp32 whole_networks=0" --seconds 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import _plan_inputs
from tdmpc_opt.fast_model import FastWorldModel
from tdmpc_opt.planner import plan

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
CONSTRUCTOR_FLAGS = ("fused_kernel", "whole_networks", "ref_codes", "packed_networks",
                     "ref_outputs")


def build_view(model, variant: str) -> FastWorldModel:
    """The view a variant string names (see the module docstring)."""
    spec, *settings = variant.split()
    flags, attrs = {}, {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or value not in ("0", "1"):
            raise SystemExit(f"bench_paired: {item!r}: settings are name=0 or name=1")
        (flags if name in CONSTRUCTOR_FLAGS else attrs)[name] = value == "1"
    fm = FastWorldModel(model, spec, **flags)
    for name, value in attrs.items():
        if not isinstance(getattr(fm, name, None), bool):
            raise SystemExit(f"bench_paired: {name!r} is no on/off setting of a view")
        setattr(fm, name, value)
    return fm


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", help="precision spec [name=0|1 ...], first = base")
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="environments planned at once")
    p.add_argument("--calls", type=int, default=10, help="plans per variant per round")
    p.add_argument("--seconds", type=float, default=60.0, help="timed rounds for this long")
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(args.threads)
    agent = load_agent(args.checkpoint)
    if args.batch < 1:
        raise SystemExit(f"bench_paired: --batch must be at least 1, got {args.batch}")
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, args.batch)
    views = [build_view(agent.model, v) for v in args.variants]
    plans = [lambda fm=fm: plan(fm, agent.planner, z, task, prev, t0, True, noise, gamma)
             for fm in views]
    first = [f() for f in plans]  # also compiles
    for f in plans:
        for _ in range(3):
            f()
    rounds: list[list[float]] = [[] for _ in plans]
    end = time.perf_counter() + args.seconds
    while time.perf_counter() < end:
        for times, f in zip(rounds, plans, strict=True):
            calls = []
            for _ in range(args.calls):
                start = time.perf_counter()
                f()
                calls.append(time.perf_counter() - start)
            times.append(statistics.median(calls))
    print(f"{len(rounds[0])} rounds of {args.calls} plans per variant, batch {args.batch}, "
          f"{args.threads} threads")
    print("| variant | median ms | paired ratio to the first | max action diff |")
    print("| --- | ---: | ---: | ---: |")
    for variant, times, (action, _) in zip(args.variants, rounds, first, strict=True):
        ratio = statistics.median(t / b for t, b in zip(times, rounds[0], strict=True))
        diff = (action - first[0][0]).abs().max().item()
        print(f"| {variant} | {1e3 * statistics.median(times):.2f} | {ratio:.4f} | {diff:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
