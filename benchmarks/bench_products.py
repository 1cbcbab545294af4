"""How close a plan's matrix products alone come to the FLOP floor, and what the rest costs.

Records every matrix product (``mm``, ``addmm``, ``addmm_``, ``_int_mm``, this package's AVX2
int8 kernel) one eager batch-1
plan issues, with its operands, then per round times: the plan itself (eager, and compiled if
``--compile``), the recorded products replayed back to back in the plan's order, and the
matrix-product peak as ``tdmpc-opt bench planner`` measures it. The floor is the planner's
executed FLOPs over that peak (the highest of the rounds), so the table reads: of the plan's
time, how much is products at the rate BLAS reaches on these shapes, and how much is
everything else (LayerNorm + Mish, elementwise work, dispatch, threads' fork/join).

    python benchmarks/bench_products.py --precision fp32 --compile --rounds 4
    python benchmarks/bench_products.py --precision int8 --compile --rounds 4
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
from tdmpc_opt.cli.bench import _plan_inputs, matmul_peak, planning_flops
from tdmpc_opt.fast_model import FastWorldModel
from tdmpc_opt.planner import plan

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
aten = torch.ops.aten
PRODUCTS = {aten.mm.default, aten.addmm.default, aten.addmm_.default, aten._int_mm.default}
INT8_KERNEL = torch.ops.tdmpc_opt_cpu.int8_mm_packed.default \
    if cpu_kernels.int8_mm_available() else None
"""``(x [M, K], packed weight, N)``: :func:`tdmpc_opt.cpu_kernels.int8_mm`."""
if INT8_KERNEL is not None:
    PRODUCTS.add(INT8_KERNEL)


class RecordProducts(TorchDispatchMode):
    """Keeps ``(op, operands cloned)`` of every matrix product run inside it."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in PRODUCTS:
            self.calls.append((func, [a.clone() if isinstance(a, torch.Tensor) else a
                                      for a in args], dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def product_flops(func, args) -> int:
    """2 * M * K * N of one recorded product."""
    if func == INT8_KERNEL:
        return 2 * args[0].shape[0] * args[0].shape[1] * args[2]
    x, w = (args[1], args[2]) if func in (aten.addmm.default, aten.addmm_.default) else args[:2]
    return 2 * x.shape[0] * x.shape[1] * w.shape[1]


def shape_key(func, args) -> tuple:
    """``(op name, operand shapes...)`` of one recorded product."""
    return (func.__name__.split(".")[0],
            *[tuple(t.shape) for t in args if isinstance(t, torch.Tensor)])


def ms(fn, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return 1e3 * (time.perf_counter() - start) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "int8"])
    p.add_argument("--compile", action="store_true", help="also time the +compile plan")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=10, help="calls per measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(args.threads)
    agent = load_agent(args.checkpoint)
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, 1)
    views = {args.precision: FastWorldModel(agent.model, args.precision)}
    if args.compile:
        views[args.precision + "+compile"] = FastWorldModel(agent.model,
                                                            args.precision + "+compile")
    plans = {name: (lambda fm=fm: plan(fm, agent.planner, z, task, prev, t0, True, noise,
                                       gamma)) for name, fm in views.items()}
    # eager float32 runs whole networks inside one C++ call, hiding their products from the
    # recorder: record them from a layer-by-layer view (the operations +compile calls)
    layered = FastWorldModel(agent.model, args.precision, whole_networks=False)
    with RecordProducts() as rec:
        plan(layered, agent.planner, z, task, prev, t0, True, noise, gamma)
    calls = rec.calls
    recorded = sum(product_flops(f, a) for f, a, _ in calls)
    shapes = collections.Counter(shape_key(f, a) for f, a, _ in calls)
    executed = planning_flops(agent.cfg, agent.planner)["executed"]
    print(f"{len(calls)} products, {recorded / 1e9:.2f} GFLOP as issued to BLAS (zero padding "
          f"included; the action inputs' share is summed in the LayerNorm kernel), "
          f"{executed / 1e9:.2f} GFLOP counted from the architecture; {len(shapes)} shapes")

    def replay():
        for f, a, kw in calls:
            f(*a, **kw)
    for fn in plans.values():  # warm up, compile
        fn()
    head = ["round", "peak GFLOP/s", "products replayed ms", "products GFLOP/s",
            *[f"{name} ms" for name in plans]]
    print("| " + " | ".join(head) + " |")
    print("|" + " ---: |" * len(head))
    rows, peak = [], 0.0
    for r in range(1, args.rounds + 1):
        peak_r = matmul_peak(args.precision, agent.cfg.mlp_dim)
        peak = max(peak, peak_r)
        replay_ms = ms(replay, args.calls)
        times = [ms(fn, args.calls) for fn in plans.values()]
        rows.append((replay_ms, times))
        print(f"| {r} | {peak_r:.0f} | {replay_ms:.1f} | {recorded / replay_ms / 1e6:.0f} | "
              + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)
    print("\nEach shape alone (its first recorded call repeated), against the peak product "
          "measured just before it (median of 3 alternations, so the machine's drift cancels):")
    print("| op | operand shapes | calls per plan | share of FLOPs | rate / peak |")
    print("| --- | --- | ---: | ---: | ---: |")
    first = {}
    for f, a, kw in calls:
        first.setdefault(shape_key(f, a), (f, a, kw))
    for key, (f, a, kw) in sorted(first.items(), key=lambda kv: -shapes[kv[0]]
                                  * product_flops(kv[1][0], kv[1][1])):
        fl = product_flops(f, a)
        ratios = [fl / ms(lambda f=f, a=a, kw=kw: f(*a, **kw), 30) / 1e6
                  / matmul_peak(args.precision, agent.cfg.mlp_dim, seconds=0.1)
                  for _ in range(3)]
        print(f"| {key[0]} | {' '.join('x'.join(map(str, s)) for s in key[1:])} | {shapes[key]} "
              f"| {100 * shapes[key] * fl / recorded:.1f}% | {statistics.median(ratios):.2f} |")
    floor = executed / (peak * 1e9) * 1e3
    print(f"floor at the highest peak ({peak:.0f}): {floor:.1f} ms; as multiples of it:")
    for r, (replay_ms, times) in enumerate(rows, 1):
        print(f"round {r}: products {replay_ms / floor:.2f}x, "
              + ", ".join(f"{name} {t / floor:.2f}x (rest {t - replay_ms:.1f} ms)"
                          for name, t in zip(plans, times, strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
