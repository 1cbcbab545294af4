"""Planning time with glibc's default handling of freed memory and with ``keep_freed_memory``.

Plans float32 MPPI steps (TD-MPC2's settings, eager, 2 threads) with the published 1M MT30
student at batch 1 and batch 16, in fresh processes that alternate between
``TDMPC_OPT_MALLOC=default`` (glibc's own behaviour) and the command line's setting
(:func:`tdmpc_opt.allocator.keep_freed_memory`), so that drift of a shared machine hits both
alike. Prints per round the milliseconds per environment step and the minor page faults per
planning call, then the medians over rounds.

    python benchmarks/bench_allocator.py --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
BATCHES = ((1, 30), (16, 5))
"""(batch size, timed calls) of each process."""


def measure(checkpoint: str, threads: int) -> dict:
    """One process's figures: ``{batch: (ms per env step, page faults per call)}``."""
    import torch

    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.allocator import keep_freed_memory
    from tdmpc_opt.cli.bench import _plan_inputs
    from tdmpc_opt.planner import plan

    kept = keep_freed_memory()
    torch.set_num_threads(threads)
    agent = load_agent(checkpoint)
    out = {"kept": kept}
    for b, calls in BATCHES:
        _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, b)

        def call(z=z, task=task, prev=prev, t0=t0, noise=noise, gamma=gamma):
            plan(agent.model, agent.planner, z, task, prev, t0, True, noise, gamma, "fp32")
        call()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
        out[str(b)] = (1e3 * statistics.median(times) / b, faults)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.checkpoint, args.threads)))
        return 0
    rows: dict[str, list[dict]] = {"default": [], "keep": []}
    print("| round | allocator | " + " | ".join(
        f"batch {b}: ms/step | faults/call" for b, _ in BATCHES) + " |")
    print("| ---: | --- | " + " | ".join("---: | ---:" for _ in BATCHES) + " |")
    for r in range(1, args.rounds + 1):
        for mode in ("default", "keep"):
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith("MALLOC_") and k != "TDMPC_OPT_MALLOC"}
            if mode == "default":
                env["TDMPC_OPT_MALLOC"] = "default"
            done = subprocess.run([sys.executable, __file__, "--child", "--checkpoint",
                                   args.checkpoint, "--threads", str(args.threads)],
                                  env=env, capture_output=True, text=True, check=True)
            res = json.loads(done.stdout.strip().splitlines()[-1])
            rows[mode].append(res)
            cells = " | ".join(f"{res[str(b)][0]:.1f} | {res[str(b)][1]:,.0f}" for b, _ in BATCHES)
            print(f"| {r} | {mode} (kept: {res['kept']}) | {cells} |", flush=True)
    for mode, results in rows.items():
        cells = " | ".join(
            f"{statistics.median(x[str(b)][0] for x in results):.1f} | "
            f"{statistics.median(x[str(b)][1] for x in results):,.0f}" for b, _ in BATCHES)
        print(f"| median | {mode} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
