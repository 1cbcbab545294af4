"""Resident memory of a long evaluation, with and without handing freed memory back.

Every episode of :func:`tdmpc_opt.evaluation.run_episodes` builds a MuJoCo environment and
closes it at the end (~25 MB of model and data buffers each). The evaluation loop calls
:func:`tdmpc_opt.allocator.release_freed_memory` after closing environments; the other arm
replaces that call by nothing, which is how the loop ran before. Both arms run in fresh
processes with the command line's allocator setting (:func:`keep_freed_memory`), alternating,
and print the growth of resident memory over the run (MB above the level after loading the
model) every ``--every`` episodes, its peak, and the wall time.

    python benchmarks/bench_eval_memory.py --episodes 16 --max-steps 100 --rounds 1
    python benchmarks/bench_eval_memory.py --planner mppi --episodes 4 --max-steps 20
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
TASKS = "walker-walk,cheetah-run,finger-spin,cup-catch,hopper-stand,reacher-easy"
ARMS = ("release", "no-release")


def resident_mb() -> float:
    """This process's resident memory in MB (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def measure(args: argparse.Namespace, arm: str) -> dict:
    """One process's run: growth of resident memory every ``args.every`` episodes."""
    import torch

    import tdmpc_opt.evaluation as evaluation
    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.allocator import keep_freed_memory
    from tdmpc_opt.config import PlannerConfig

    keep_freed_memory()
    torch.set_num_threads(args.threads)
    if arm == "no-release":
        evaluation.release_freed_memory = lambda: None
    agent = load_agent(args.checkpoint, "cpu", PlannerConfig(mpc=args.planner == "mppi"))
    base, growth, done = resident_mb(), [], [0]

    def on_result(_):
        done[0] += 1
        if done[0] % args.every == 0:
            growth.append(round(resident_mb() - base, 1))

    specs = evaluation.episode_specs(args.tasks.split(","), args.episodes, 1)
    start = time.perf_counter()
    evaluation.run_episodes(agent, specs, args.batch_size, args.max_steps, on_result=on_result)
    return {"arm": arm, "episodes": len(specs), "growth_mb": growth,
            "peak_mb": max(growth, default=0.0), "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--tasks", default=TASKS)
    p.add_argument("--episodes", type=int, default=16, help="episodes per task")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--planner", choices=("policy", "mppi"), default="policy")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--every", type=int, default=12, help="episodes between memory readings")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one process's run
    args = p.parse_args()
    if args.arm:
        print(json.dumps(measure(args, args.arm)))
        return
    for _ in range(args.rounds):
        for arm in ARMS:
            out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--arm", arm],
                                 capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"{row['arm']:>10}  episodes {row['episodes']:4d}  peak +{row['peak_mb']:6.1f} "
                  f"MB  wall {row['wall_s']:6.1f} s  growth {row['growth_mb']}", flush=True)


if __name__ == "__main__":
    main()
