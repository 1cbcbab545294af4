"""The int8 planner's row kernel (``cpu_kernels.ln_mish_int8``) alone, against another version.

Times one call on the 1M model's planner shape (``--rows`` 536 = 512 samples + 24 policy
trajectories, ``--width`` 384) in the three ways an int8 plan calls it: a hidden layer (int32
products), a first layer (products + ``--actions`` action inputs) and reference-row codes
(``ref_groups=1``, the default codes of a plan). Prints microseconds per call and nanoseconds
per element. With ``--against FILE`` (another version of ``csrc/int8_layer.cpp``, built under
another op namespace) both run in this process in alternating rounds, so that a shared host's
drift cancels: the paired ratio (this tree / FILE, median of rounds) and whether their outputs
are bitwise equal on every mode, shape and thread count tried.

    git show HEAD~1:src/tdmpc_opt/csrc/int8_layer.cpp > /tmp/int8_layer_before.cpp
    python benchmarks/bench_row_kernel.py --threads 1 --against /tmp/int8_layer_before.cpp
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from tdmpc_opt import cpu_kernels


def build_other(source: Path) -> object:
    """``source`` built as the op namespace ``tdmpc_other``; returns its ``ln_mish_int8_v3``."""
    from torch.utils.cpp_extension import load
    work = Path(tempfile.mkdtemp(prefix="bench_row_kernel_"))
    renamed = work / "int8_layer_other.cpp"
    renamed.write_text(source.read_text().replace("tdmpc_opt_cpu", "tdmpc_other"))
    isa = torch.backends.cpu.get_cpu_capability()
    load("tdmpc_other", [str(renamed)], build_directory=str(work), is_python_module=False,
         extra_cflags=["-O3", "-fopenmp", *cpu_kernels._ISA_FLAGS.get(isa, [])], verbose=False)
    return torch.ops.tdmpc_other.ln_mish_int8_v3


def mode_args(mode: str, m: int, n: int, na: int, g: torch.Generator) -> tuple:
    """Arguments of ``ln_mish_int8_v3`` for ``mode`` (hidden, first, reference) on [m, n]."""
    groups = 1 if mode == "reference" else 0
    acc = torch.randint(-300_000, 300_000, (m + 2 * groups, n), generator=g, dtype=torch.int32)
    col_scale = torch.rand(n, generator=g) * 1e-4
    row_scale = torch.rand(m + groups, 1, generator=g) * 0.1
    a = torch.randn(m, na, generator=g) if mode != "hidden" else None
    wa = torch.randn(na, n, generator=g) if mode != "hidden" else None
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.3
    return (torch.randn(1, n, generator=g), acc, col_scale, row_scale, a, wa, w, b, 1e-5,
            False, groups)


def same_outputs(this, other, threads: int) -> bool:
    """Bitwise equal outputs on every mode, on odd shapes too, with 1 and ``threads`` threads."""
    g = torch.Generator().manual_seed(0)
    for mode, (m, n), t in itertools.product(("hidden", "first", "reference"),
                                             ((536, 384), (33, 101), (5, 20), (77, 136)),
                                             sorted({1, threads})):
        torch.set_num_threads(t)
        args = mode_args(mode, m, n, 6, g)
        if not all(torch.equal(x, y) for x, y in zip(this(*args), other(*args), strict=True)):
            return False
    return True


def per_call(fn, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=536)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--actions", type=int, default=6)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=100, help="calls per round")
    p.add_argument("--seconds", type=float, default=20.0, help="timed rounds per mode")
    p.add_argument("--against", type=Path, help="another version of csrc/int8_layer.cpp")
    args = p.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("bench_row_kernel: the CPU kernels do not build here")
    this = torch.ops.tdmpc_opt_cpu.ln_mish_int8_v3
    other = build_other(args.against) if args.against else None
    if other is not None:
        print("bitwise equal outputs:", same_outputs(this, other, args.threads))
    torch.set_num_threads(args.threads)
    print(f"{args.rows} x {args.width}, {args.actions} actions, {args.threads} threads")
    print("| mode | us/call | ns/element |" + (" other us/call | paired ratio |" if other else ""))
    print("| --- | ---: | ---: |" + (" ---: | ---: |" if other else ""))
    g = torch.Generator().manual_seed(1)
    for mode in ("hidden", "first", "reference"):
        call_args = mode_args(mode, args.rows, args.width, args.actions, g)
        fns = [this] if other is None else [this, other]
        rounds: list[list[float]] = [[] for _ in fns]
        for fn in fns:
            per_call(fn, call_args, 10)
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            for times, fn in zip(rounds, fns, strict=True):
                times.append(per_call(fn, call_args, args.calls))
        us = [1e6 * min(t) for t in rounds]
        row = f"| {mode} | {us[0]:.1f} | {1e3 * us[0] / (args.rows * args.width):.2f} |"
        if other is not None:
            ratio = statistics.median(a / b for a, b in zip(*rounds, strict=True))
            row += f" {us[1]:.1f} | {ratio:.3f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
