"""Batched evaluation against one-at-a-time evaluation, for benchmarks/README.md.

Runs the same B episodes (B tasks' first episodes, cut at --steps agent steps) with
``run_episodes`` at batch size 1 and at batch size B, and reports agent steps per second of
the whole evaluation (environment stepping, encoding and planning included) and the ratio
batched / one-at-a-time, which the issue wants at least 0.6 * B. The returns of both runs
are compared too (every episode has its own seed, so they must be identical).

    python benchmarks/bench_eval.py                               # B = 8, 1M MT30 student
    python benchmarks/bench_eval.py --runtime int8 --threads 2
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import torch

from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import machine
from tdmpc_opt.evaluation import episode_specs, run_episodes
from tdmpc_opt.quantization import load_fast_agent

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"
TASKS = ("cartpole-balance", "walker-stand", "cheetah-run", "finger-spin", "reacher-easy",
         "pendulum-swingup", "hopper-stand", "cup-catch")


def timed(agent, specs, batch: int, steps: int) -> tuple[float, list[float]]:
    """Agent steps per second of evaluating ``specs`` ``batch`` at a time, and the returns."""
    start = time.perf_counter()
    results = run_episodes(agent, specs, batch_size=batch, max_steps=steps)
    seconds = time.perf_counter() - start
    return len(specs) * steps / seconds, [r.episode_return for r in results]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=40, help="agent steps per episode")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runtime", default="fp32", help="planner precision: fp32, bf16, int8")
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    warnings.filterwarnings("ignore", module="glfw")  # no display: dm_control warns at import
    torch.set_num_threads(args.threads)
    agent = load_fast_agent(args.checkpoint, runtime=args.runtime)
    tasks = [TASKS[i % len(TASKS)] for i in range(args.batch)]
    specs = [s for t in dict.fromkeys(tasks) for s in episode_specs([t], tasks.count(t), 1)]
    run_episodes(agent, specs[:1], batch_size=1, max_steps=2)  # warm-up (imports, first env)
    one, r1 = timed(agent, specs, 1, args.steps)
    batched, rb = timed(agent, specs, args.batch, args.steps)
    info = machine()
    print(f"{info['date']}, {info['cpu']} ({info['cores']} cores), {args.threads} threads, "
          f"runtime {args.runtime}, load average {info['loadavg']:.1f} after")
    print(f"| B | steps/episode | one-at-a-time steps/s | batched steps/s | ratio | 0.6*B | "
          f"same returns |\n| ---: | ---: | ---: | ---: | ---: | ---: | --- |\n"
          f"| {args.batch} | {args.steps} | {one:.2f} | {batched:.2f} | {batched / one:.2f} | "
          f"{0.6 * args.batch:.1f} | {r1 == rb} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
