"""Benchmark the MPPI planner of a checkpoint on this machine.

For every batch size and precision: milliseconds per planning call, environment steps per
second, the matrix-product FLOPs of one step counted from the architecture (TD-MPC2's
computation, and what this planner executes), the achieved GFLOP/s, the matrix-product peak
of that precision measured in the same process (a bias-free product, as the planner's hidden
layers run), the highest of a measurement before and after each row (so the floor time =
FLOPs / peak), and the speed-up over the literal one-environment planner, also timed in this
process. Reduced precisions are compared with float32 on the same random numbers (action and
prediction agreement); the score check of a precision needs an evaluation (``tdmpc-opt eval``).

With ``--device cuda`` every plan replays from CUDA graphs (:class:`~tdmpc_opt.planner.
GraphPlanner`), every timing waits for the device, and the peak is the GPU's for the same
product; ``+compile`` is for CPUs and refused there.

The table is printed at the end (every row read against its precision's highest peak); while
it runs, each row's time goes to stderr as it is measured, and a ``+compile`` precision is
announced before its first plans compile (minutes each on a 2-core CPU).

Examples:
  tdmpc-opt bench planner --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt
  tdmpc-opt bench planner --checkpoint CKPT --batch 1,16,64 --precision fp32,bf16,int8 \\
      --threads 2 --json planner.json
  tdmpc-opt bench planner --checkpoint CKPT --precision int8+compile --seconds 10
  tdmpc-opt bench planner --checkpoint CKPT --device cuda --batch 1,300
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import TYPE_CHECKING

from tdmpc_opt.cli._common import (
    int_list,
    nonnegative_float,
    nonnegative_int,
    output_file,
    thread_count,
)

if TYPE_CHECKING:
    import torch

NAME = "bench"
HELP = "benchmark the planner (speed, FLOPs vs measured peak, speed-up, agreement)"


def add_arguments(p):
    sub = p.add_subparsers(dest="what", metavar="WHAT", required=True,
                           parser_class=type(p))
    q = sub.add_parser("planner", help="MPPI planning speed", description=__doc__,
                       formatter_class=p.formatter_class)
    q.add_argument("--checkpoint", required=True, help="model file (.pt or .safetensors)")
    q.add_argument("--batch", type=int_list, default=[1], help="batch sizes, e.g. 1,16,64")
    q.add_argument("--precision", default="fp32,bf16,int8",
                   help="comma-separated: fp32, bf16, int8, each optionally +compile")
    q.add_argument("--threads", type=thread_count, default=None, help="torch threads")
    q.add_argument("--device", default="cpu",
                   help="cpu (default) or cuda (plans replayed from CUDA graphs)")
    q.add_argument("--seconds", type=nonnegative_float, default=3.0,
                   help="timing budget per row (at least 3 timed calls)")
    q.add_argument("--literal-calls", type=nonnegative_int, default=2,
                   help="timed calls of the literal planner (0: skip the speed-up)")
    q.add_argument("--agreement", type=nonnegative_int, default=8,
                   help="states for the agreement check of reduced precisions (0: skip)")
    q.add_argument("--json", default=None, type=output_file, help="also write the results here")
    q.add_argument("overrides", nargs="*", metavar="key=value",
                   help="planner settings, e.g. num_samples=256 iterations=4")


# ------------------------------------------------------------------------------ FLOPs
def planning_flops(cfg, pcfg) -> dict[str, float]:
    """Matrix-product FLOPs (2 per multiply-add) of one planning step, one environment.

    ``tdmpc2``: the original computation (task embedding concatenated to every first-layer
    input, every sequence valued every iteration). ``executed``: this planner's (task part
    precomputed, start latent's part once, policy sequences rolled out once).
    """
    lat, a, t, d, k = cfg.latent_dim, cfg.action_dim, cfg.task_dim, cfg.mlp_dim, \
        max(cfg.num_bins, 1)
    h, n, p, its = pcfg.horizon, pcfg.num_samples, pcfg.num_pi_trajs, pcfg.iterations
    hidden = d * d
    dyn, rew = (lat + a) * d + hidden + d * lat, (lat + a) * d + hidden + d * k
    pi, q = lat * d + hidden + d * 2 * a, (lat + a) * d + hidden + d * k
    orig = p * (h * (pi + t * d) + (h - 1) * (dyn + t * d)) \
        + its * n * (h * (dyn + rew + 2 * t * d) + pi + t * d + 2 * (q + t * d))
    step0 = 2 * lat * d                                       # latent parts known at step 0
    done = 2 * lat * d + p * (h * (pi + dyn + rew) - step0) \
        + its * ((n - p) * (h * (dyn + rew) - step0) + n * (pi + 2 * q))
    return {"tdmpc2": 2.0 * orig, "executed": 2.0 * done}


# ----------------------------------------------------------------------------- timing
def matmul_peak(precision: str, dim: int, rows: int = 3072, seconds: float = 0.5,
                device: str | torch.device = "cpu") -> float:
    """Measured GFLOP/s (GOP/s for int8) of a ``[rows, dim] @ [dim, dim]`` product on
    ``device``, computed as the planner computes it (natively, or where this CPU has no native
    int8 / bf16 products on this package's int8 kernel or through float32 BLAS:
    :mod:`tdmpc_opt.products`). The product alone, without a bias, as the planner's hidden
    layers multiply (their bias goes in with the LayerNorm): MKL's ``addmm`` copies the bias
    into the output and accumulates onto it, 3-9% below ``mm``'s rate on a 2-core Xeon, which
    would make every floor look closer than it is."""
    import torch

    from tdmpc_opt.fast_model import Dense

    g = torch.Generator().manual_seed(0)
    dense = Dense(torch.randn(dim, dim, generator=g).to(device), torch.zeros(dim, device=device),
                  precision)
    sync = synchronizer(device)
    if precision == "int8":
        x = torch.randint(-127, 128, (rows, dim), dtype=torch.int8, generator=g).to(device)
        ones = torch.ones(rows, 1, device=device)

        def f():
            dense.int32_products(x, ones)
            sync()
    else:
        x = torch.randn(rows, dim, generator=g).to(device, dense.bias.dtype)

        def f():
            dense.product(x)
            sync()
    return 2 * rows * dim * dim / _best_time(f, seconds) / 1e9


def synchronizer(device: str | torch.device):
    """A function that waits for ``device``'s queued work (a no-op on a CPU), for timing."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


def product_backend(precision: str, device: str | torch.device = "cpu") -> str:
    """How ``device`` computes ``precision`` products: ``native``, ``int8 kernel`` (this
    package's AVX2 product) or ``float32 BLAS``."""
    from tdmpc_opt import products

    if precision.startswith("int8"):
        return {"native": "native", "kernel": "int8 kernel",
                "float": "float32 BLAS"}[products.int8_backend(device)]
    return "native" if products.native(precision, device) else "float32 BLAS"


def _best_time(fn, seconds: float, min_calls: int = 3) -> float:
    """Fastest of repeated calls of ``fn`` (after one warm-up call), in seconds."""
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _timed(fn, seconds: float, min_calls: int = 3) -> dict[str, float]:
    """Median and best wall seconds per call of ``fn`` (after one warm-up call), and the
    median process CPU seconds per call (a busy machine inflates it less than wall time)."""
    fn()
    times, cpu, start = [], [], time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t, c = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {"median_s": statistics.median(times), "best_s": min(times), "calls": len(times),
            "cpu_s": statistics.median(cpu)}


def _plan_inputs(agent, batch: int, seed: int = 0):
    """Encoded random observations of the model's first tasks and matching planner inputs."""
    import torch

    from tdmpc_opt.planner import draw_noise

    cfg, pcfg, dev = agent.cfg, agent.planner, agent.device
    g = torch.Generator().manual_seed(seed)
    task = torch.arange(batch, device=dev) % cfg.num_tasks if cfg.multitask else None
    obs = torch.randn(batch, cfg.obs_dim, generator=g).to(dev)
    with torch.no_grad():
        z = agent.model.encode(obs, task)
    gens = [torch.Generator().manual_seed(seed * 1000 + i) for i in range(batch)]
    noise = draw_noise(pcfg, cfg.action_dim, cfg.num_q, batch, gens).to(dev)
    prev = torch.zeros(batch, pcfg.horizon, cfg.action_dim, device=dev)
    gamma = torch.full((batch,), 0.99, device=dev)
    return obs, z, task, prev, torch.ones(batch, dtype=torch.bool, device=dev), noise, gamma


def time_planner(agent, batch: int, precision: str, seconds: float) -> dict[str, float]:
    """Seconds per :func:`~tdmpc_opt.planner.plan` call for ``batch`` environments (on a GPU
    through :class:`~tdmpc_opt.planner.GraphPlanner`, waiting for each call to finish)."""
    from tdmpc_opt.planner import GraphPlanner, plan

    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, batch)
    sync = synchronizer(agent.device)
    if agent.device.type == "cuda":
        graphs = GraphPlanner(agent.model, agent.planner, precision)

        def call():
            graphs(z, task, prev, t0, True, noise, gamma)
            sync()
        call()  # captures the graph
    else:
        def call():
            plan(agent.model, agent.planner, z, task, prev, t0, True, noise, gamma, precision)
    if precision.endswith("+compile"):
        start = time.perf_counter()
        call()  # compiles
        compile_s = time.perf_counter() - start
        return dict(_timed(call, seconds), compile_s=compile_s)
    return _timed(call, seconds)


def time_literal(agent, calls: int) -> float:
    """Seconds per :func:`~tdmpc_opt.planner.plan_literal` call (one environment)."""
    from tdmpc_opt.planner import plan_literal

    obs, _, task, prev, _, noise, _ = _plan_inputs(agent, 1)
    t = None if task is None else int(task[0])
    sync = synchronizer(agent.device)

    def call():
        plan_literal(agent.model, agent.planner, obs[0], t, prev[0], True, True, noise[0], 0.99)
        sync()
    return _timed(call, 0.0, min_calls=calls)["median_s"]


def agreement(agent, precision: str, states: int) -> dict[str, float]:
    """Reduced precision against float32 on the same random numbers, ``states`` states.

    ``action_*``: |a_precision - a_fp32| of the planned first actions; ``fp32_noise_mean``:
    |a - a'| of float32 plans with different random numbers (the planner's own spread, for
    scale); ``value_rel``: median relative difference of the Q averages the planner uses.
    """
    import torch

    from tdmpc_opt.fast_model import fast_view
    from tdmpc_opt.planner import plan

    _, z, task, prev, t0, noise, gamma = _plan_inputs(agent, states, seed=1)
    _, _, _, _, _, other, _ = _plan_inputs(agent, states, seed=2)
    m, pc = agent.model, agent.planner
    ref, _ = plan(m, pc, z, task, prev, t0, True, noise, gamma)
    got, _ = plan(m, pc, z, task, prev, t0, True, noise, gamma, precision)
    alt, _ = plan(m, pc, z, task, prev, t0, True, other, gamma)
    exact, fast = fast_view(m), fast_view(m, precision)
    zi = exact.to_internal(z)[:, None].expand(-1, 64, -1).contiguous()
    a = torch.rand(states, 64, agent.cfg.action_dim,
                   generator=torch.Generator().manual_seed(3)).to(agent.device)
    rows = exact.task_rows(task, states)
    with torch.no_grad():
        q = exact.q_members(zi, a * 2 - 1, rows, [0, 1])
        q_fast = fast.q_members(zi.to(fast.dtype), a * 2 - 1, rows, [0, 1])
    active = torch.ones_like(ref, dtype=torch.bool) if task is None else \
        m.action_mask(task).bool()
    d = (got - ref).abs()[active]
    return {"action_mean": d.mean().item(), "action_max": d.max().item(),
            "fp32_noise_mean": (alt - ref).abs()[active].mean().item(),
            "value_rel": ((q_fast - q).abs() / q.abs().clamp_min(1e-6)).median().item()}


# -------------------------------------------------------------------------------- run
def machine(device: str | torch.device = "cpu") -> dict:
    """Where the figures come from (``gpu``: the CUDA device's name when ``device`` is one)."""
    import torch

    from tdmpc_opt import allocator

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg": _loadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "keep_freed_memory": allocator.in_effect(),
            "gpu": torch.cuda.get_device_name(device)
            if torch.device(device).type == "cuda" else None}


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def bench_rows(agent, batches: list[int], precisions: list[str], seconds: float,
               literal_s: float | None, states: int) -> list[dict]:
    """One result row per (batch, precision); see the module doc for the fields.

    The peak of a precision is measured before its first row and again after each of its rows,
    and every row of it is read against the highest of these: on a shared machine one short
    measurement can land in a slow moment and make the floor look closer than it is.
    """
    import torch

    flops = planning_flops(agent.cfg, agent.planner)
    peaks: dict[str, float] = {}
    rows = []
    for prec in precisions:
        base = prec.split("+")[0]
        if base not in peaks:
            peaks[base] = matmul_peak(base, agent.cfg.mlp_dim, device=agent.device)
        if prec.endswith("+compile"):
            _progress(f"{prec}: the first plan of each batch size compiles first (minutes; "
                      "inductor caches it on disk for later runs)")
        agree = agreement(agent, prec, states) if states and base != "fp32" else None
        for b in batches:
            t = time_planner(agent, b, prec, seconds)
            per_call = t["median_s"]
            _progress(f"{prec}, batch {b}: {1e3 * per_call:.1f} ms per call")
            peaks[base] = max(peaks[base], matmul_peak(base, agent.cfg.mlp_dim,
                                                       device=agent.device))
            rows.append({
                "batch": b, "precision": prec, "ms_per_call": 1e3 * per_call,
                "best_ms_per_call": 1e3 * t["best_s"], "env_steps_per_s": b / per_call,
                "cpu_ms_per_call": 1e3 * t["cpu_s"] if torch.get_num_threads() == 1 else None,
                "gflop_per_step": flops["executed"] / 1e9,
                "tdmpc2_gflop_per_step": flops["tdmpc2"] / 1e9,
                "achieved_gflops": b * flops["executed"] / per_call / 1e9,
                "products": product_backend(base, agent.device),
                "speedup_vs_literal": None if literal_s is None else literal_s * b / per_call,
                "compile_s": t.get("compile_s"), "agreement": agree, "loadavg": _loadavg()})
    for r in rows:  # against the highest peak each precision reached
        peak = peaks[r["precision"].split("+")[0]]
        floor = r["batch"] * flops["executed"] / (peak * 1e9)
        r.update(peak_gflops=peak, floor_ms=1e3 * floor, x_floor=r["ms_per_call"] / 1e3 / floor)
    return rows


def _progress(line: str) -> None:
    """A line on stderr while the bench runs (the table comes at the end, read against each
    precision's highest peak), so a long run shows where it is."""
    print(f"bench: {line}", file=sys.stderr, flush=True)


def print_rows(rows: list[dict], literal_s: float | None) -> None:
    """A fixed-width table of :func:`bench_rows` results."""
    if literal_s is not None:
        print(f"literal planner: {1e3 * literal_s:.0f} ms per step (one environment)")
    head = (f"{'batch':>5} {'precision':>13} {'ms/call':>9} {'steps/s':>8} {'GFLOP':>6} "
            f"{'GFLOP/s':>8} {'peak':>6} {'x floor':>7} {'vs literal':>10}")
    print(head)
    for r in rows:
        lit = "-" if r["speedup_vs_literal"] is None else f"{r['speedup_vs_literal']:.1f}x"
        print(f"{r['batch']:>5} {r['precision']:>13} {r['ms_per_call']:>9.1f} "
              f"{r['env_steps_per_s']:>8.1f} {r['gflop_per_step']:>6.2f} "
              f"{r['achieved_gflops']:>8.1f} {r['peak_gflops']:>6.0f} {r['x_floor']:>7.2f} "
              f"{lit:>10}")
    backends = {r["precision"].split("+")[0]: r["products"] for r in rows}
    for prec, backend in backends.items():
        if backend != "native":
            same = "the same int32 results" if prec == "int8" else "products of the bf16 values"
            print(f"{prec} products: {backend} (this CPU has no native {prec} matrix "
                  f"products; {same})")
    for r in rows:
        if r["agreement"] and r["batch"] == rows[0]["batch"]:
            a = r["agreement"]
            print(f"{r['precision']} vs fp32 (same noise): action |diff| mean "
                  f"{a['action_mean']:.4f} max {a['action_max']:.3f} (fp32, other noise: "
                  f"{a['fp32_noise_mean']:.4f}); Q relative diff median {a['value_rel']:.2e}")


def run(args) -> int:
    import torch

    from tdmpc_opt.agent import load_agent, resolve_device
    from tdmpc_opt.cli._common import write_json
    from tdmpc_opt.config import PlannerConfig, apply_overrides
    from tdmpc_opt.errors import ConfigError
    from tdmpc_opt.fast_model import parse_precision

    precisions = [p.strip() for p in args.precision.split(",") if p.strip()]
    if not precisions:
        raise ConfigError(f"--precision names no precision: {args.precision!r}")
    for p in precisions:
        try:
            parse_precision(p)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    planner = apply_overrides(PlannerConfig(), args.overrides)
    device = resolve_device(args.device)
    if device.type == "cuda" and any(p.endswith("+compile") for p in precisions):
        raise ConfigError("+compile is for CPUs; on cuda every plan replays from CUDA graphs")
    agent = load_agent(args.checkpoint, device=device, planner=planner)
    literal_s = time_literal(agent, args.literal_calls) if args.literal_calls > 0 else None
    rows = bench_rows(agent, args.batch, precisions, args.seconds, literal_s, args.agreement)
    info = machine(device)
    where = f"{info['gpu']} (with {info['cpu']})" if info["gpu"] else \
        f"{info['cpu']}, {info['threads']} threads"
    print(f"{where}, torch {info['torch']}, load average {info['loadavg']}")
    print_rows(rows, literal_s)
    if args.json:
        write_json(args.json, {"machine": info, "checkpoint": str(args.checkpoint),
                               "planner": vars(planner), "literal_ms": None if literal_s is None
                               else 1e3 * literal_s, "rows": rows})
    return 0
