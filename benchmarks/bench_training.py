"""Training speed: TD-MPC2 updates per second, and sampling from memory-mapped datasets.

Updates: MT30 dimensions (obs 24, actions 6, 30 tasks), published sizes, batch 256, horizon 3,
random batches (sampling excluded), for each thread count and variant: ``fused`` (the default
forward passes, :class:`~tdmpc_opt.train_forward.FusedNets`) or ``model`` (the world model's own
methods, the structure of TD-MPC2's code), optionally with ``+bf16`` (``bf16=true``: autocast)
and ``+compile`` (``compile=true``: inductor). Reports the median and best of ``--repeats``
timed updates, the first update's time (compilation) and its losses (same model and batch in
every variant, so the losses after the last one show how far bf16 moves them).

Sampling: a synthetic dataset in our format with N stored transitions (MT30 layout, episodes of
501 observations) is written under ``--tmp`` and deleted afterwards; a fresh subprocess opens
it, samples ``--batches`` batches and reports the time per batch and its memory (anonymous RSS:
private memory; file-backed RSS is page cache that the kernel can drop).

    python benchmarks/bench_training.py                      # everything (a few minutes)
    python benchmarks/bench_training.py --sizes 1 --threads 2 --variants fused+bf16 --no-sampling
    python benchmarks/bench_training.py --device cuda --sizes 1,5,19,48,317 --threads 1 \
        --variants model,fused,fused+bf16 --no-sampling   # one GPU
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

from tdmpc_opt.cli.bench import synchronizer
from tdmpc_opt.config import model_config_for
from tdmpc_opt.tasks import TASK_SETS
from tdmpc_opt.training import Batch, TDMPC2Learner, TrainConfig
from tdmpc_opt.world_model import WorldModel


def parse_variant(variant: str) -> dict:
    """``fused``, ``model``, optionally ``+bf16`` and/or ``+compile`` -> TrainConfig fields."""
    forward, *flags = variant.split("+")
    if forward not in ("fused", "model") or not set(flags) <= {"bf16", "compile"}:
        raise SystemExit(f"bad variant {variant!r}: use fused|model[+bf16][+compile]")
    return {"fused": forward == "fused", "bf16": "bf16" in flags, "compile": "compile" in flags}


def bench_updates(size: int, threads: int, variants: list[str], batch: int,
                  repeats: int, device: str = "cpu") -> list[dict]:
    """Time every variant on the same model initialisation and batch, interleaved: round r
    times update r of each variant in turn, so machine drift hits them all alike. On a GPU
    every timed update ends with the device's completion."""
    torch.set_num_threads(threads)
    mc = model_config_for(TASK_SETS["mt30"], size)
    g = torch.Generator().manual_seed(0)
    b = Batch(*(t.to(device) for t in (
        torch.randn(4, batch, mc.obs_dim, generator=g),
        torch.rand(3, batch, mc.action_dim, generator=g) * 2 - 1,
        torch.rand(3, batch, 1, generator=g), torch.zeros(3, batch, 1),
        torch.randint(0, 30, (batch,), generator=g))))
    sync = synchronizer(device)
    learners, first_s, times, last = {}, {}, {v: [] for v in variants}, {}

    def update(v):
        out = learners[v].update(b)
        sync()
        return out

    for v in variants:
        torch.manual_seed(0)
        learners[v] = TDMPC2Learner(WorldModel(mc).to(device),
                                    TrainConfig(batch_size=batch, **parse_variant(v)))
        t = time.perf_counter()
        update(v)  # includes compilation for +compile
        first_s[v] = time.perf_counter() - t
        for _ in range(2):
            update(v)
    for _ in range(repeats):
        for v in variants:
            t = time.perf_counter()
            last[v] = update(v)
            times[v].append(time.perf_counter() - t)
    out = []
    for v in variants:
        med, best = statistics.median(times[v]), min(times[v])
        out.append({"size": size, "threads": threads, "variant": v, "upd_s_median": 1 / med,
                    "upd_s_best": 1 / best, "ms_median": med * 1e3,
                    "first_update_s": first_s[v],
                    "last_losses": {k: x for k, x in last[v].items() if k.endswith("_loss")}})
    return out


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
    p.add_argument("--variants", default="model,fused,fused+bf16,fused+bf16+compile",
                   help="comma list of fused|model[+bf16][+compile]")
    p.add_argument("--no-sampling", action="store_true")
    p.add_argument("--transitions", default="1000000,20000000")
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--tmp", default="/tmp")
    p.add_argument("--device", default="cpu", help="cpu, or cuda for one GPU's update rate")
    args = p.parse_args()
    load = Path("/proc/loadavg").read_text().split()[:3]
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        platform.processor() or platform.machine()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} {where} torch {torch.__version__}, "
          f"load average {load}")
    print("| size | threads | variant | upd/s (median) | upd/s (best) | ms/update | first update "
          "| losses after 3 + repeats updates: consistency / reward / value |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for size in map(int, args.sizes.split(",")):
        for threads in map(int, args.threads.split(",")):
            for r in bench_updates(size, threads, args.variants.split(","), args.batch,
                                   args.repeats, args.device):
                fl = r["last_losses"]
                print(f"| {size} | {threads} | {r['variant']} | {r['upd_s_median']:.2f} | "
                      f"{r['upd_s_best']:.2f} | {r['ms_median']:.0f} | "
                      f"{r['first_update_s']:.1f} s | {fl['consistency_loss']:.5f} / "
                      f"{fl['reward_loss']:.4f} / {fl['value_loss']:.4f} |", flush=True)
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
