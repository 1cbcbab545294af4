"""Distillation speed: updates per second of student-only training, distillation with the live
teacher, distillation from the teacher-target cache, and the live ``plan`` term.

MT30 dimensions, random initialisations (speed does not depend on the weights), a synthetic
dataset in our format (written under ``--tmp``, deleted afterwards), the real training loop
(`tdmpc_opt.distill_trainer.distill_offline`: sampling, teacher targets, update). Each mode
runs ``--warmup`` updates, then ``--updates`` timed ones (the rate is taken from the difference
of the two runs, so set-up costs cancel), ``--repeats`` times with the modes interleaved; the
best and median rates are reported. The cache is built once, and its build time is reported too.

    python benchmarks/bench_distill.py                          # teacher 5M, student 1M, batch 256
    python benchmarks/bench_distill.py --teacher-size 1 --student-size 1 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_training import make_dataset  # noqa: E402  (the same synthetic MT30 layout)

from tdmpc_opt.config import model_config_for  # noqa: E402
from tdmpc_opt.data import Dataset  # noqa: E402
from tdmpc_opt.distill_trainer import distill_offline, prepare_cache  # noqa: E402
from tdmpc_opt.distillation import DistillConfig  # noqa: E402
from tdmpc_opt.tasks import TASK_SETS  # noqa: E402
from tdmpc_opt.trainer import build_learner  # noqa: E402
from tdmpc_opt.training import TrainConfig  # noqa: E402
from tdmpc_opt.world_model import WorldModel  # noqa: E402

MODES = {
    "student only": (DistillConfig(reward_coef=0.0), False),
    "live teacher (paper's reward term)": (DistillConfig(reward_coef=0.45), False),
    "cached teacher (paper's reward term)": (DistillConfig(reward_coef=0.45), True),
    "live teacher, plan term (4 sequences)": (DistillConfig(reward_coef=0.0, plan_coef=1.0), False),
}


def timed_run(teacher, student_cfg, dataset, dcfg, cache_dir, steps, batch) -> float:
    """Seconds for ``steps`` updates of a fresh student (sampler and hook included)."""
    learner = build_learner(student_cfg, TrainConfig(steps=steps, batch_size=batch, eval_freq=0,
                                                     seed=0))
    start = time.perf_counter()
    distill_offline(learner, teacher, "bench", dataset, np.arange(len(TASK_SETS["mt30"])), dcfg,
                    None, cache_dir=cache_dir)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher-size", type=int, default=5)
    ap.add_argument("--student-size", type=int, default=1)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--transitions", type=int, default=50_000)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--updates", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmp", default=None, help="where the synthetic dataset goes")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = TASK_SETS["mt30"]
    torch.manual_seed(0)
    teacher = WorldModel(model_config_for(tasks, args.teacher_size)).eval().requires_grad_(False)
    student_cfg = model_config_for(tasks, args.student_size)
    tmp = Path(tempfile.mkdtemp(dir=args.tmp))
    rows = []
    try:
        make_dataset(tmp / "data", args.transitions)
        dataset = Dataset(tmp / "data")
        start = time.perf_counter()
        prepare_cache(teacher, "bench", dataset, np.arange(len(tasks)), tmp / "cache", latent=False)
        build_s = time.perf_counter() - start
        print(f"cache of {dataset.obs.shape[0]:,} rows built in {build_s:.1f} s "
              f"({dataset.obs.shape[0] / build_s:,.0f} rows/s)")
        rates: dict[str, list[float]] = {name: [] for name in MODES}
        for dcfg, cached in MODES.values():  # warm-up of every mode
            timed_run(teacher, student_cfg, dataset, dcfg, tmp / "cache" if cached else None,
                      args.warmup, args.batch)
        for _ in range(args.repeats):  # modes interleaved: machine drift hits all alike
            for name, (dcfg, cached) in MODES.items():
                cache = tmp / "cache" if cached else None
                full = timed_run(teacher, student_cfg, dataset, dcfg, cache,
                                 args.warmup + args.updates, args.batch)
                short = timed_run(teacher, student_cfg, dataset, dcfg, cache, args.warmup,
                                  args.batch)
                rates[name].append(args.updates / max(full - short, 1e-9))
        for name, r in rates.items():
            rows.append({"mode": name, "upd_s_median": statistics.median(r),
                         "upd_s_best": max(r)})
            print(f"{name:40s} {statistics.median(r):6.2f} upd/s (best {max(r):.2f})",
                  flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    info = {"teacher_size": args.teacher_size, "student_size": args.student_size,
            "batch": args.batch, "threads": args.threads, "cache_build_s": build_s,
            "teacher_params": sum(p.numel() for p in teacher.parameters()),
            "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "results": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(info, indent=1))
    base = rows[0]["upd_s_median"]
    print("| mode | upd/s (median) | upd/s (best) | vs student only |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mode']} | {r['upd_s_median']:.2f} | {r['upd_s_best']:.2f} | "
              f"{r['upd_s_median'] / base:.2f}x |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
