"""Plan with an exported TD-MPC2 model using numpy and onnxruntime only (no PyTorch).

    pip install -r requirements.txt
    python example.py                      # the model in this script's folder
    python example.py --model DIR --task cartpole-balance --steps 5 --batch 2

Observations here are random numbers of the task's size; in a real deployment they come from
the environment (unpadded or zero-padded to the model's obs_dim).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_planner import OnnxAgent  # noqa: E402


def positive(text: str) -> int:
    """argparse type: a whole number > 0 (this folder runs without tdmpc_opt installed, so
    the package's own ``positive_int`` is not imported)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(Path(__file__).resolve().parent),
                   help="folder written by `tdmpc-opt export` (default: this script's)")
    p.add_argument("--task", default=None, help="task name (default: the model's first)")
    p.add_argument("--steps", type=positive, default=3, help="planning steps to run")
    p.add_argument("--batch", type=positive, default=1, help="environments planned at once")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        agent = OnnxAgent(args.model, seed=args.seed)
        tasks = agent.model.meta["tasks"]
        task = args.task or (tasks[0] if tasks else None)
        if task is not None:
            agent.task_index(task)  # an unknown name fails here, before planning
        rng = np.random.default_rng(args.seed)
        for step in range(args.steps):
            obs = rng.standard_normal((args.batch, agent.model.obs_dim)).astype(np.float32)
            start = time.perf_counter()
            action = agent.act(obs, task=task, t0=step == 0)
            ms = (time.perf_counter() - start) * 1e3
            print(f"step {step}: {ms:.0f} ms, "
                  f"action[0] = [{', '.join(f'{v:.3f}' for v in action[0])}]")
    except (ValueError, OSError) as e:  # bad input: one line, exit code 2
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
