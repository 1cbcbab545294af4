"""Inter-op parallelism on two cores: what giving each core its own rows would gain.

The planner parallelises inside each operation (every product and kernel splits its rows over
the intra-op threads, ~700 fork/joins per batch-1 plan). The alternative on a 2-core CPU is to
give each core its own work and synchronise rarely. Per round this prints milliseconds per
batch-1 plan of:

- ``2 threads``: :func:`~tdmpc_opt.planner.plan` as it is, two intra-op threads;
- ``two at once``: two independent plans in two Python threads with one intra-op thread each
  (the compiled graphs and PyTorch ops release the GIL) -- the most any split could gain;
- ``split``: one plan whose sequences are valued in two halves, one per Python thread with
  one intra-op thread each, joined once per MPPI iteration for the elite selection
  (:func:`split_plan`; same actions as ``plan`` up to float32 rounding, printed).

    python benchmarks/bench_interop.py --precision fp32+compile --rounds 3
"""

from __future__ import annotations

import argparse
import queue
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt import planner as P
from tdmpc_opt.agent import load_agent
from tdmpc_opt.allocator import keep_freed_memory
from tdmpc_opt.cli.bench import _plan_inputs
from tdmpc_opt.fast_model import FastWorldModel

DEFAULT_CKPT = Path(__file__).resolve().parents[2] / "shared" / "checkpoints" / \
    "tdmpc-opt-mt30-1M-fp16.pt"


class Helper:
    """One worker thread with one intra-op thread, running one call at a time."""

    def __init__(self):
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self):
        torch.set_num_threads(1)
        while True:
            fn, args = self.jobs.get()
            try:
                self.results.put((True, fn(*args)))
            except Exception as e:  # handed to the caller of result()
                self.results.put((False, e))

    def submit(self, fn, *args):
        self.jobs.put((fn, args))

    def result(self):
        ok, value = self.results.get()
        if not ok:
            raise value
        return value


def value_rows(fm, st, sampled, pi_noise, q_pick, z_pi, g_pi):
    """Values ``[B, R]`` of the sampled sequences ``sampled [B, H, S, A]``, after the policy
    sequences' rows (final latents ``z_pi``, returns ``g_pi``) where those are given."""
    b, _, s, _ = sampled.shape
    z, g = P._rollout(fm, st, sampled)
    z = z.view(b, s, -1)
    if z_pi is not None:
        z, g = torch.cat([z_pi, z], 1), torch.cat([g_pi, g], 1)
    a_last = fm.policy(z, st.rows, pi_noise, st.mask)
    return (g + st.disc_h * fm.q_average(z, a_last, st.rows, q_pick)).nan_to_num(0)


@torch.no_grad()
def split_plan(fm, cfg, helper, z0, task, prev_mean, t0, noise, discount):
    """:func:`~tdmpc_opt.planner.plan` (eval mode) with each iteration's sequences valued in
    two halves of ``N / 2`` rows, the second on ``helper``; one intra-op thread each."""
    b, h, p = z0.shape[0], cfg.horizon, cfg.num_pi_trajs
    first = cfg.num_samples // 2 - p  # sampled rows valued here, after the policy rows
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        prepare = fm.compiled("prepare", P._prepare) if fm.compile else P._prepare
        value = fm.compiled("value_rows", value_rows) if fm.compile else value_rows
        st = prepare(fm, cfg, z0, task, discount)
        P._policy_rollout(fm, st, noise.pi_traj)  # alone: each half's rows are its own
        shifted = F.pad(prev_mean[:, 1:].float(), (0, 0, 0, 1))
        mean = torch.where(t0.reshape(b, 1, 1), torch.zeros_like(shifted), shifted)
        std = torch.full((b, h, fm.cfg.action_dim), cfg.max_std)
        for it in range(cfg.iterations):
            sampled = (mean[:, :, None] + std[:, :, None] * noise.sample[:, it]).clamp_(-1, 1)
            if st.mask is not None:
                sampled.mul_(st.mask[:, None, None])
            st.actions[:, :, p:] = sampled
            pi_noise, q_pick = noise.pi_value[:, it], noise.q_pick[:, it]
            helper.submit(value, fm, st, sampled[:, :, first:], pi_noise[:, p + first:],
                          q_pick, None, None)
            mine = value(fm, st, sampled[:, :, :first], pi_noise[:, :p + first], q_pick,
                         st.z_h[:, :p], st.g_pi)
            values = torch.cat([mine, helper.result()], 1)
            mean, std, score, elites = P._refit(cfg, values, st.actions, st.mask)
    finally:
        torch.set_num_threads(threads)
    idx = tm.gumbel_argmax(score, noise.gumbel)
    return elites[torch.arange(b), 0, idx].clamp(-1, 1), mean


def ms_per_plan(fn, plans: int) -> float:
    start = time.perf_counter()
    for _ in range(plans):
        fn()
    return 1e3 * (time.perf_counter() - start) / plans


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CKPT))
    p.add_argument("--precision", default="fp32+compile")
    p.add_argument("--plans", type=int, default=10, help="plans per measurement (even)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    keep_freed_memory()  # as the command line does (tdmpc_opt.allocator)
    torch.set_num_threads(2)
    agent = load_agent(args.checkpoint)
    cfg = agent.planner
    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, 1)
    fm = FastWorldModel(agent.model, args.precision)
    fm_split = FastWorldModel(agent.model, args.precision)  # compiled with one thread
    helper = Helper()

    def one_plan():
        return P.plan(fm, cfg, z, task, prev, t0, True, noise, gamma)

    def one_split():
        return split_plan(fm_split, cfg, helper, z, task, prev, t0, noise, gamma)

    for threads in (2, 1):  # warm up (and compile) for both thread counts
        torch.set_num_threads(threads)
        one_plan()
        one_plan()
    torch.set_num_threads(2)
    one_split()
    (a, mean), (a_split, mean_split) = one_plan(), one_split()
    print(f"split vs plan: max |action diff| {(a - a_split).abs().max().item():.1e}, "
          f"max |mean diff| {(mean - mean_split).abs().max().item():.1e}")
    n = args.plans - args.plans % 2
    print("| round | one plan, 2 threads | two plans at once, 1 thread each | one plan split "
          "over 2 threads |")
    print("| ---: | ---: | ---: | ---: |")
    for r in range(1, args.rounds + 1):
        torch.set_num_threads(2)
        sequential = ms_per_plan(one_plan, n)
        split = ms_per_plan(one_split, n)
        torch.set_num_threads(1)
        workers = [threading.Thread(target=ms_per_plan, args=(one_plan, n // 2))
                   for _ in range(2)]
        start = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        concurrent = 1e3 * (time.perf_counter() - start) / n
        print(f"| {r} | {sequential:.1f} | {concurrent:.1f} | {split:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
