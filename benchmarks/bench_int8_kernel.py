"""The fused int8 CPU kernel against the PyTorch ops it replaces, inside the whole planner.

Plans batch-1 MPPI steps (TD-MPC2's settings) with the published 1M MT30 student in int8,
each layer's LayerNorm + Mish + quantisation computed either by PyTorch ops
(``fused_kernel=False``) or by ``cpu_kernels.ln_mish_int8``, eager and ``+compile`` (both
with 15-bit codes into the dynamics' and Q output products, which PyTorch ops can run); with
``--codes``, the fused ``+compile`` planner's activation codes: 8-bit everywhere, 15-bit into
the output products of ``WIDE_DEFAULT``, and reference-row codes (the default). Variants
are timed interleaved (one call of each in turn) so that drift of a shared machine hits them
alike; prints the median, quartile and minimum milliseconds per plan and the first action.
With ``--fp32``, the float32 planner instead, its LayerNorm + Mish by PyTorch ops (or inductor)
or by ``cpu_kernels.ln_mish_f32``, eager and ``+compile``. With ``--products``, the default
int8 planner (eager and ``+compile``) with its int8 products on this package's AVX2 kernel
(``cpu_kernels.int8_mm``) and through float32 BLAS (``TDMPC_OPT_PRODUCTS=kernel`` / ``float``,
the same int32 results), beside the float32 ``+compile`` planner.

    python benchmarks/bench_int8_kernel.py --threads 2 --calls 100
    python benchmarks/bench_int8_kernel.py --threads 2 --calls 100 --codes
    python benchmarks/bench_int8_kernel.py --threads 2 --calls 40 --fp32
    python benchmarks/bench_int8_kernel.py --threads 2 --calls 40 --products
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from tdmpc_opt import cpu_kernels
from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import _plan_inputs
from tdmpc_opt.fast_model import WIDE_DEFAULT, FastWorldModel
from tdmpc_opt.planner import plan

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
VARIANTS = (("int8", False, WIDE_DEFAULT, False), ("int8", True, WIDE_DEFAULT, False),
            ("int8+compile", False, WIDE_DEFAULT, False),
            ("int8+compile", True, WIDE_DEFAULT, False))
"""(precision, fused kernel, networks with 15-bit output codes, reference-row codes[, int8
products: ``TDMPC_OPT_PRODUCTS``])."""
FP32_VARIANTS = (("fp32", False, WIDE_DEFAULT, False), ("fp32", True, WIDE_DEFAULT, False),
                 ("fp32+compile", False, WIDE_DEFAULT, False),
                 ("fp32+compile", True, WIDE_DEFAULT, False))
CODE_VARIANTS = (("int8+compile", True, frozenset(), False),
                 ("int8+compile", True, WIDE_DEFAULT, False),
                 ("int8+compile", True, frozenset(), True))
PRODUCT_VARIANTS = (("int8", True, WIDE_DEFAULT, None, "float"),
                    ("int8", True, WIDE_DEFAULT, None, "kernel"),
                    ("int8+compile", True, WIDE_DEFAULT, None, "float"),
                    ("int8+compile", True, WIDE_DEFAULT, None, "kernel"),
                    ("fp32+compile", True, WIDE_DEFAULT, None, None))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--codes", action="store_true",
                   help="compare activation codes: 8-bit, 15-bit outputs, reference rows")
    p.add_argument("--fp32", action="store_true",
                   help="the float32 planner with and without its LayerNorm + Mish kernel")
    p.add_argument("--products", action="store_true",
                   help="int8 products on the AVX2 kernel against float32 BLAS")
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(args.threads)
    if not cpu_kernels.available():
        print(f"fused kernel unavailable: {cpu_kernels.unavailable_reason()}", file=sys.stderr)
        return 1
    agent = load_agent(args.checkpoint)
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, args.batch)
    views = []
    variants = FP32_VARIANTS if args.fp32 else CODE_VARIANTS if args.codes else \
        PRODUCT_VARIANTS if args.products else VARIANTS
    given = os.environ.get("TDMPC_OPT_PRODUCTS")
    for precision, fused, wide, ref, *products in variants:
        if products and products[0]:
            os.environ["TDMPC_OPT_PRODUCTS"] = products[0]  # read when the layers are made
        fm = FastWorldModel(agent.model, precision, fused, wide, ref)
        if given is None:
            os.environ.pop("TDMPC_OPT_PRODUCTS", None)
        else:
            os.environ["TDMPC_OPT_PRODUCTS"] = given
        start = time.perf_counter()
        action, _ = plan(fm, agent.planner, z, task, prev, t0, True, noise, gamma)
        name = f"{precision} {'fused kernel' if fused else 'PyTorch ops'}"
        if products and products[0]:
            name += {"kernel": ", int8 kernel", "float": ", float32 BLAS"}[products[0]]
        if args.codes:
            name += ", reference rows" if ref else \
                f", 15-bit into {','.join(sorted(wide)) or 'none'}"
        views.append((name, fm, time.perf_counter() - start, action[0, :3].tolist()))
    times: list[list[float]] = [[] for _ in views]
    for _ in range(args.calls):
        for i, (_, fm, _, _) in enumerate(views):
            start = time.perf_counter()
            plan(fm, agent.planner, z, task, prev, t0, True, noise, gamma)
            times[i].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {args.threads} threads, batch {args.batch}, "
          f"{args.calls} interleaved calls each, load average {load:.1f} at the end")
    print("| variant | median ms | p25 ms | min ms | steps/s (median) | first call s "
          "| action[:3] |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for (name, _, first, action), t in zip(views, times, strict=True):
        t = sorted(t)
        med = statistics.median(t)
        print(f"| {name} | {1e3 * med:.1f} | {1e3 * t[len(t) // 4]:.1f} | {1e3 * t[0]:.1f} | "
              f"{args.batch / med:.1f} | {first:.1f} | "
              f"{', '.join(f'{a:.3f}' for a in action)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
