"""Distillation at our scale (docs/distillation.md): students with and without a teacher.

Every run is ``tdmpc-opt distill`` then ``tdmpc-opt eval`` in its own run directory under
--out, so an interrupted sweep started again skips finished runs and resumes unfinished ones
from their checkpoints. Runs go --jobs at a time, one torch thread each. Results are gathered
into OUT/results.json, OUT/table.md and OUT/scores.png.

    python experiments/distill_sweep.py --stage main     # none, reward 0.05/0.45/0.9 x seeds
    python experiments/distill_sweep.py --stage screen   # each extra term, first seed
    python experiments/distill_sweep.py --stage best --best value   # the best extra, all seeds
    python experiments/distill_sweep.py --stage table    # gather what is finished
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "checkpoints"
STUDENT = ["enc_dim=96", "mlp_dim=96", "latent_dim=64", "task_dim=16", "num_q=2"]
MAIN = {
    "none": ["--coef", "0"],
    "reward 0.05": ["--coef", "0.05"],
    "reward 0.45": ["--coef", "0.45"],
    "reward 0.9": ["--coef", "0.9"],
}
EXTRAS = {  # each on top of the paper's term at 0.45
    "horizon": ["--coef", "0.45", "--reward-horizon-coef", "0.45"],
    "value": ["--coef", "0.45", "--value-coef", "0.1"],
    "policy": ["--coef", "0.45", "--policy-coef", "0.1"],
    "latent": ["--coef", "0.45", "--latent-coef", "1.0"],
    "plan": ["--coef", "0.45", "--plan-coef", "1.0"],  # live teacher: ~3x slower updates
}


def cli() -> list[str]:
    return [sys.executable, "-c", "import sys; from tdmpc_opt.cli import main; "
            "sys.exit(main(sys.argv[1:]))"]


def run_one(args, name: str, flags: list[str], seed: int) -> Path:
    """Train and evaluate one student; returns its evaluation JSON (skips finished work)."""
    run = args.out / f"{name.replace(' ', '-').replace('+', '')}-s{seed}"
    result = run / "eval.json"
    if result.is_file():
        return result
    env = dict(os.environ, OMP_NUM_THREADS="1")
    log = open(run.with_suffix(".log"), "a")  # noqa: SIM115 - closed below
    try:
        trained = run / "trained.ok"
        if not trained.is_file():
            resume = ["--resume"] if any((run / "checkpoints").glob("step-*.pt")) else []
            # the latent term needs teacher latents in its cache: a cache of its own, so that
            # no run rebuilds a cache another run is reading
            cache = args.cache.with_name(args.cache.name + "-latent") \
                if "--latent-coef" in flags else args.cache
            subprocess.run([*cli(), "distill", "--teacher", args.teacher, "--data", args.data,
                            *flags, "--run-dir", str(run), "--cache-teacher", str(cache),
                            "--quiet", *resume, *STUDENT, f"steps={args.steps}",
                            f"seed={seed}", "eval_freq=0", "threads=1",
                            f"checkpoint_freq={max(1, args.steps // 4)}"],
                           check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
            trained.write_text("ok\n")
        subprocess.run([*cli(), "eval", "--checkpoint", str(run / "model.safetensors"),
                        "--tasks", args.tasks, "--episodes", str(args.episodes), "--seed", "1",
                        "--threads", "1", "--quiet", "--json", str(result)],
                       check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
    finally:
        log.close()
    return result


def gather(out: Path) -> list[dict]:
    """One row per configuration: per-seed scores, mean and spread."""
    rows: dict[str, dict] = {}
    for path in sorted(out.glob("*-s*/eval.json")):
        name, seed = path.parent.name.rsplit("-s", 1)
        data = json.loads(path.read_text())
        row = rows.setdefault(name, {"config": name, "seeds": {}, "tasks": {}})
        row["seeds"][int(seed)] = data["normalized_score"]
        for task, v in data["tasks"].items():
            row["tasks"].setdefault(task, []).append(v["mean_return"])
    for row in rows.values():
        s = list(row["seeds"].values())
        row["mean"] = statistics.mean(s)
        row["std"] = statistics.stdev(s) if len(s) > 1 else 0.0
    return list(rows.values())


def table(rows: list[dict]) -> str:
    tasks = list(rows[0]["tasks"]) if rows else []
    lines = ["| config | seeds | score mean | score std | per seed | " +
             " | ".join(tasks) + " |", "|" + "---|" * (5 + len(tasks))]
    for r in rows:
        per_seed = ", ".join(f"{v:.1f}" for _, v in sorted(r["seeds"].items()))
        means = " | ".join(f"{statistics.mean(r['tasks'][t]):.0f}" for t in tasks)
        lines.append(f"| {r['config']} | {len(r['seeds'])} | {r['mean']:.1f} | {r['std']:.1f} "
                     f"| {per_seed} | {means} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, r in enumerate(rows):
        ax.scatter([i] * len(r["seeds"]), list(r["seeds"].values()), color="gray", s=12)
        ax.errorbar(i, r["mean"], yerr=r["std"], fmt="o", color="C0", capsize=4)
    ax.set_xticks(range(len(rows)), [r["config"] for r in rows], rotation=30, ha="right")
    ax.set_ylabel("normalized score")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=("main", "screen", "best", "table"), required=True)
    p.add_argument("--best", choices=tuple(EXTRAS), help="the extra term for --stage best")
    p.add_argument("--teacher", default=str(SHARED / "tdmpc-opt-mt30-1M-fp16.pt"))
    p.add_argument("--data", default="data/distill-mt4")
    p.add_argument("--tasks", default="cartpole-balance,cartpole-balance-sparse,"
                   "finger-turn-easy,pendulum-spin")
    p.add_argument("--out", type=Path, default=Path("runs/distill-sweep"))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--episodes", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.cache = args.out / "teacher-cache"
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage == "main":
        todo = [(n, f, s) for n, f in MAIN.items() for s in seeds]
    elif args.stage == "screen":
        # slowest first (the plan term runs the teacher live), so the pool ends together
        todo = sorted(((f"+{n}", f, seeds[0]) for n, f in EXTRAS.items()),
                      key=lambda t: "--plan-coef" not in t[1])
    elif args.stage == "best":
        if not args.best:
            p.error("--stage best needs --best NAME")
        todo = [(f"+{args.best}", EXTRAS[args.best], s) for s in seeds]
    else:
        todo = []
    if todo:
        if not (args.cache / "meta.json").is_file():  # built once, before the others start
            run_one(args, *todo[0])
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda t: run_one(args, *t), todo))
    rows = gather(args.out)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    (args.out / "table.md").write_text(table(rows) + "\n")
    if rows:
        plot(rows, args.out / "scores.png")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
