"""Planner speed for benchmarks/README.md: batch sizes x precisions, as a markdown table.

Every row is a ``tdmpc-opt bench planner`` measurement (see that command for the fields):
median milliseconds per planning call, environment steps per second, the executed matrix
FLOPs of a step, achieved GFLOP/s, the same process's measured matrix-product peak of that
precision, time over the FLOP floor, speed-up over the literal planner, and (1 thread only)
the CPU time per call, which a busy machine inflates less than the wall time.

    python benchmarks/bench_planner.py                                  # a few minutes
    python benchmarks/bench_planner.py --batch 1 --precision int8+compile --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import bench_rows, machine, time_literal

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"


def markdown(rows: list[dict], info: dict, literal_ms: float, command: str) -> str:
    """The README block: provenance line, then one table row per measurement."""
    lines = [f"{info['date']}, {info['cpu']} ({info['cores']} cores), {info['threads']} "
             f"threads, torch {info['torch']}, load average {info['loadavg']:.1f} before; "
             f"literal planner {literal_ms:.0f} ms/step. `{command}`", "",
             "| batch | precision | ms/call | env steps/s | GFLOP/step | GFLOP/s | peak GFLOP/s "
             "| x floor | vs literal | cpu ms/call | load |",
             "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cpu = "-" if r.get("cpu_ms_per_call") is None else f"{r['cpu_ms_per_call']:.1f}"
        lines.append(
            f"| {r['batch']} | {r['precision']} | {r['ms_per_call']:.1f} | "
            f"{r['env_steps_per_s']:.1f} | {r['gflop_per_step']:.2f} | "
            f"{r['achieved_gflops']:.0f} | {r['peak_gflops']:.0f} | {r['x_floor']:.2f} | "
            f"{r['speedup_vs_literal']:.1f}x | {cpu} | {r['loadavg']:.1f} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--precision", default="fp32,bf16,int8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--agreement", type=int, default=16)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(args.threads)
    agent = load_agent(args.checkpoint)
    info = machine()
    literal_s = time_literal(agent, 2)
    rows = bench_rows(agent, [int(b) for b in args.batch.split(",")],
                      args.precision.split(","), args.seconds, literal_s, args.agreement)
    command = "python benchmarks/bench_planner.py " + " ".join(sys.argv[1:])
    print(markdown(rows, info, 1e3 * literal_s, command.strip()))
    for r in rows:
        if r["agreement"] and r["batch"] == rows[0]["batch"]:
            print(f"\n{r['precision']} vs fp32: {json.dumps(r['agreement'])}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows,
                                               "when": time.time()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
