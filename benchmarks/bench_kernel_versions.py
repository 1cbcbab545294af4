"""The int8 planner's CPU kernels alone, each against another version of its source.

``--kernel ln_mish_int8`` (``csrc/int8_layer.cpp``): one call on the 1M model's planner shape
(``--rows`` 536 = 512 samples + 24 policy trajectories, ``--width`` 384) in the three ways an
int8 plan calls it: a hidden layer (int32 products), a first layer (products + ``--actions``
action inputs) and reference-row codes (``ref_groups=1``, a plan's default codes).
``--kernel int8_mm`` (``csrc/int8_gemm.cpp``, the AVX2 int8 product): ``--rows`` x K @ K x N
for the plan's (K, N): (384, 384), (384, 128), (128, 384), (384, 101).

Prints microseconds per call (and nanoseconds per element, or GOP/s). With ``--against FILE``
(another version of that source, built under another op namespace) both run in this process
in alternating rounds, so that a shared host's drift cancels: the paired ratio (this tree /
FILE, median of rounds) and whether their outputs are bitwise equal on odd shapes too, with one
thread and with ``--threads``.

    git show HEAD~1:src/tdmpc_opt/csrc/int8_layer.cpp > /tmp/before.cpp
    python benchmarks/bench_kernel_versions.py --kernel ln_mish_int8 --against /tmp/before.cpp
    git show HEAD~1:src/tdmpc_opt/csrc/int8_gemm.cpp > /tmp/before.cpp
    python benchmarks/bench_kernel_versions.py --kernel int8_mm --threads 2 \\
        --against /tmp/before.cpp
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

OPS = {"ln_mish_int8": "ln_mish_int8_v3", "int8_mm": "int8_mm_packed"}


def build_other(source: Path, kernel: str) -> object:
    """``source`` built as the op namespace ``tdmpc_other``; returns its op for ``kernel``."""
    from torch.utils.cpp_extension import load
    work = Path(tempfile.mkdtemp(prefix="bench_kernel_versions_"))
    renamed = work / f"{kernel}_other.cpp"
    renamed.write_text(source.read_text().replace("tdmpc_opt_cpu", "tdmpc_other"))
    load("tdmpc_other", [str(renamed)], build_directory=str(work), is_python_module=False,
         extra_cflags=cpu_kernels.build_flags(), verbose=False)
    return getattr(torch.ops.tdmpc_other, OPS[kernel])


def row_args(mode: str, m: int, n: int, na: int, g: torch.Generator) -> tuple:
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


def product_args(m: int, k: int, n: int, g: torch.Generator) -> tuple:
    """Arguments of ``int8_mm_packed``: int8 inputs [m, k] and a packed int8 weight [k, n]."""
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (k, n), generator=g, dtype=torch.int8)
    return x, cpu_kernels.int8_pack(w), n


def cases(kernel: str, rows: int, width: int, actions: int, g: torch.Generator
          ) -> list[tuple[str, tuple, int]]:
    """``(label, op arguments, elements or multiply-adds)`` of the timed calls."""
    if kernel == "ln_mish_int8":
        return [(mode, row_args(mode, rows, width, actions, g), rows * width)
                for mode in ("hidden", "first", "reference")]
    return [(f"{rows}x{k} @ {k}x{n}", product_args(rows, k, n, g), rows * k * n)
            for k, n in ((384, 384), (384, 128), (128, 384), (384, 101))]


def check_cases(kernel: str, g: torch.Generator) -> list[tuple]:
    """Odd shapes for the bitwise comparison."""
    if kernel == "ln_mish_int8":
        return [row_args(mode, m, n, 6, g) for mode, (m, n) in itertools.product(
            ("hidden", "first", "reference"), ((536, 384), (33, 101), (5, 20), (77, 136)))]
    return [product_args(m, k, n, g) for m, k, n in
            ((536, 384, 384), (37, 384, 24), (130, 130, 200), (67, 1027, 33), (5, 7, 9))]


def same_outputs(kernel: str, this, other, threads: int) -> bool:
    """Bitwise equal outputs on every check case, with 1 and ``threads`` threads."""
    g = torch.Generator().manual_seed(0)
    for args, t in itertools.product(check_cases(kernel, g), sorted({1, threads})):
        torch.set_num_threads(t)
        mine, theirs = this(*args), other(*args)
        if isinstance(mine, torch.Tensor):
            mine, theirs = (mine,), (theirs,)
        if not all(torch.equal(x, y) for x, y in zip(mine, theirs, strict=True)):
            return False
    return True


def per_call(fn, args: tuple, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    return (time.perf_counter() - start) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernel", choices=sorted(OPS), default="ln_mish_int8")
    p.add_argument("--rows", type=int, default=536)
    p.add_argument("--width", type=int, default=384, help="ln_mish_int8's row width")
    p.add_argument("--actions", type=int, default=6, help="ln_mish_int8's action inputs")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--calls", type=int, default=100, help="calls per round")
    p.add_argument("--seconds", type=float, default=20.0, help="timed rounds per case")
    p.add_argument("--against", type=Path, help="another version of the kernel's source")
    args = p.parse_args()
    if not cpu_kernels.available() or (args.kernel == "int8_mm" and
                                       not cpu_kernels.int8_mm_available()):
        raise SystemExit(f"bench_kernel_versions: {args.kernel} does not build here")
    if args.against is not None and not args.against.is_file():
        raise SystemExit(f"bench_kernel_versions: no such file: {args.against}")
    this = getattr(torch.ops.tdmpc_opt_cpu, OPS[args.kernel])
    other = build_other(args.against, args.kernel) if args.against else None
    if other is not None:
        print("bitwise equal outputs:", same_outputs(args.kernel, this, other, args.threads))
    torch.set_num_threads(args.threads)
    rate = "ns/element" if args.kernel == "ln_mish_int8" else "GOP/s"
    print(f"{args.kernel}, {args.rows} rows, {args.threads} threads")
    print(f"| case | us/call | {rate} |" + (" other us/call | paired ratio |" if other else ""))
    print("| --- | ---: | ---: |" + (" ---: | ---: |" if other else ""))
    for label, call_args, size in cases(args.kernel, args.rows, args.width, args.actions,
                                        torch.Generator().manual_seed(1)):
        fns = [this] if other is None else [this, other]
        rounds: list[list[float]] = [[] for _ in fns]
        for fn in fns:
            per_call(fn, call_args, 10)
        end = time.perf_counter() + args.seconds
        while time.perf_counter() < end:
            for times, fn in zip(rounds, fns, strict=True):
                times.append(per_call(fn, call_args, args.calls))
        best = min(rounds[0])
        speed = 1e9 * best / size if args.kernel == "ln_mish_int8" else 2 * size / best / 1e9
        row = f"| {label} | {1e6 * best:.1f} | {speed:.2f} |"
        if other is not None:
            ratio = statistics.median(a / b for a, b in zip(*rounds, strict=True))
            row += f" {1e6 * min(rounds[1]):.1f} | {ratio:.3f} |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
