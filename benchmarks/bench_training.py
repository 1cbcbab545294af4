"""Training speed: TD-MPC2 updates per second, and sampling from memory-mapped datasets.

Updates: MT30 dimensions (obs 24, actions 6, 30 tasks), published sizes, batch 256, horizon 3,
random batches (sampling excluded), for each thread count, with the fused forward passes
(``fused=True``, the default) and with the world model's own methods (``fused=False``, the
structure of TD-MPC2's code). Reports the median and best of ``--repeats`` timed updates.

Sampling: a synthetic dataset in our format with N stored transitions (MT30 layout, episodes of
501 observations) is written under ``--tmp`` and deleted afterwards; a fresh subprocess opens
it, samples ``--batches`` batches and reports the time per batch and its memory (anonymous RSS:
private memory; file-backed RSS is page cache that the kernel can drop).

    python benchmarks/bench_training.py                      # everything (a few minutes)
    python benchmarks/bench_training.py --sizes 1 --threads 2 --no-sampling
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tdmpc_opt.config import model_config_for
from tdmpc_opt.tasks import TASK_SETS
from tdmpc_opt.training import Batch, TDMPC2Learner, TrainConfig
from tdmpc_opt.world_model import WorldModel


def bench_updates(size: int, threads: int, fused: bool, batch: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    mc = model_config_for(TASK_SETS["mt30"], size)
    learner = TDMPC2Learner(WorldModel(mc), TrainConfig(batch_size=batch, fused=fused))
    g = torch.Generator().manual_seed(0)
    b = Batch(torch.randn(4, batch, mc.obs_dim, generator=g),
              torch.rand(3, batch, mc.action_dim, generator=g) * 2 - 1,
              torch.rand(3, batch, 1, generator=g), torch.zeros(3, batch, 1),
              torch.randint(0, 30, (batch,), generator=g))
    for _ in range(3):
        learner.update(b)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        learner.update(b)
        times.append(time.perf_counter() - t)
    med, best = statistics.median(times), min(times)
    return {"size": size, "threads": threads, "fused": fused, "upd_s_median": 1 / med,
            "upd_s_best": 1 / best, "ms_median": med * 1e3}


def make_dataset(path: Path, transitions: int, steps: int = 501) -> None:
    from tdmpc_opt.data import DatasetWriter

    episodes = -(-transitions // (steps - 1))
    rng = np.random.default_rng(0)
    chunk = 200
    obs = rng.standard_normal((chunk, steps, 24)).astype(np.float32)
    act = rng.uniform(-1, 1, (chunk, steps, 6)).astype(np.float32)
    rew = rng.uniform(0, 1, (chunk, steps)).astype(np.float32)
    with DatasetWriter(path, TASK_SETS["mt30"], 24, 6) as w:
        for e0 in range(0, episodes, chunk):
            n = min(chunk, episodes - e0)
            w.add_episodes(obs[:n], act[:n], rew[:n], np.arange(e0, e0 + n) % 30)
        w.close()


_SAMPLE_CHILD = """
import json, resource, sys, time, numpy as np, torch
from tdmpc_opt.data import Dataset
from tdmpc_opt.replay import SequenceSampler
def mem():
    f = dict(l.split(':', 1) for l in open('/proc/self/status') if ':' in l)
    return {k: int(f[k].split()[0]) / 1024 for k in ('RssAnon', 'RssFile')}
base = mem()
ds = Dataset(sys.argv[1])
s = SequenceSampler(ds, 256, 3, seed=0, task_map=np.arange(30))
s.sample()
n = int(sys.argv[2]); t = time.perf_counter()
for _ in range(n):
    s.sample()
dt = (time.perf_counter() - t) / n
end = mem()
print(json.dumps({"ms_per_batch": dt * 1e3, "rss_anon_mb": end["RssAnon"],
                  "rss_anon_growth_mb": end["RssAnon"] - base["RssAnon"],
                  "rss_file_mb": end["RssFile"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def bench_sampling(transitions: int, tmp: Path, batches: int) -> dict:
    d = Path(tempfile.mkdtemp(dir=tmp, prefix="tdmpc-bench-"))
    try:
        t = time.perf_counter()
        make_dataset(d / "ds", transitions)
        write_s = time.perf_counter() - t
        size_gb = sum(f.stat().st_size for f in (d / "ds").iterdir()) / 1e9
        out = subprocess.run([sys.executable, "-c", _SAMPLE_CHILD, str(d / "ds"), str(batches)],
                             check=True, capture_output=True, text=True).stdout
        return {"transitions": transitions, "disk_gb": size_gb, "write_s": write_s,
                **json.loads(out)}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1,5")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-unfused", action="store_true", help="skip fused=False")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--transitions", default="1000000,20000000")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--tmp", default="/tmp")
    args = p.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3]
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__}, load average {load}")
    print("| size | threads | forward | upd/s (median) | upd/s (best) | ms/update |")
    print("| --- | --- | --- | --- | --- | --- |")
    for size in map(int, args.sizes.split(",")):
        for threads in map(int, args.threads.split(",")):
            for fused in (True,) if args.no_unfused else (False, True):
                r = bench_updates(size, threads, fused, args.batch, args.repeats)
                print(f"| {size} | {threads} | {'fused' if fused else 'model'} | "
                      f"{r['upd_s_median']:.2f} | {r['upd_s_best']:.2f} | {r['ms_median']:.0f} |",
                      flush=True)
    if args.no_sampling:
        return
    print("\n| transitions | on disk | ms/batch (256 x 4) | anon RSS | anon growth | file RSS "
          "| peak RSS |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for n in map(int, args.transitions.split(",")):
        r = bench_sampling(n, Path(args.tmp), args.batches)
        print(f"| {n:,} | {r['disk_gb']:.2f} GB | {r['ms_per_batch']:.2f} | "
              f"{r['rss_anon_mb']:.0f} MB | {r['rss_anon_growth_mb']:.1f} MB | "
              f"{r['rss_file_mb']:.0f} MB | {r['peak_rss_mb']:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
