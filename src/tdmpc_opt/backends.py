"""Rollout backends: run many episodes in-process, in worker processes, or on Ray.

>>> from tdmpc_opt.backends import run_rollouts
>>> specs = episode_specs(("walker-walk", "cartpole-balance"), 10, seed=1)
>>> results = run_rollouts("model.pt", PlannerConfig(), specs, backend="ray", workers=8)

Every episode has its own seed and returns do not depend on the batch an episode runs in
(:mod:`tdmpc_opt.evaluation`), so any backend, worker count or chunking gives the same
per-episode results, returned in the order of ``specs``. The same machinery serves evaluation
(returns only) and data collection (``trajectories=True``: every result carries the episode's
observations, actions and rewards; ``tdmpc-opt collect`` writes them in spec order).

Backends:

``local``, ``workers=1``
    In this process, ``batch_size`` episodes planned together.
``local``, ``workers=N``
    N worker processes (multiprocessing *spawn*); each loads the checkpoint from its path and
    runs chunks of the specs. A worker that dies is replaced and its chunk rerun (up to
    ``max_retries`` times).
``ray``
    Each chunk is a Ray task (``max_retries``) on a cluster (``ray_address="auto"`` or
    ``HOST:PORT``) or on a local Ray instance with ``num_cpus=workers``. The checkpoint's
    *bytes* go into the object store once, so worker nodes need no shared filesystem; each
    worker process writes them to a temporary file keyed by sha256 and keeps one loaded agent
    for the chunks it runs. Worker nodes need the same Python environment (tdmpc-opt and
    torch installed). Ray is optional: ``pip install 'tdmpc-opt[ray]'``.

Chunks are consecutive runs of ``specs`` (task-major, then episode) of about equal agent
steps, at most ``batch_size`` episodes, enough that every worker gets one; the longest go
first. Results reach ``on_result`` as each chunk finishes; an episode seen twice (a retried
chunk whose first attempt also reported) is counted once.

Ctrl-C, SIGTERM (the CLI raises it as Ctrl-C) or any error in the driver stops local worker
processes at once: they ignore SIGINT themselves (no traceback of theirs), and the driver
terminates them, then kills any left. A driver killed outright (SIGKILL) takes its workers
with it on Linux (the kernel's parent-death signal).

Fault injection (tests): ``TDMPC_OPT_FAULT_INJECT=CHUNK:MARKER`` makes the first attempt of
chunk CHUNK create the file MARKER, run half its episodes and kill its worker process. The
file is how a retry, in another process, knows it is not the first attempt; any other value
is refused with a ConfigError.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.errors import ConfigError, TdmpcError
from tdmpc_opt.evaluation import EpisodeResult, EpisodeSpec

BACKENDS = ("local", "ray")
FAULT_ENV = "TDMPC_OPT_FAULT_INJECT"
RAY_MISSING = ("the ray backend needs Ray: install the ray extra: "
               "pip install 'tdmpc-opt[ray]'")
_AGENT_CACHE: dict[tuple, object] = {}


@dataclass(frozen=True)
class _Job:
    """What a worker needs to run chunks: everything but the specs."""

    planner: PlannerConfig
    batch_size: int
    max_steps: int | None
    device: str
    threads: int
    fault: str | None
    eval_mode: bool = True
    action_noise: float | tuple[float, ...] = 0.0
    trajectories: bool = False
    precision: str = "auto"
    layers: str | None = None

    def agent(self, path: str):
        """This process's agent for the file at ``path``, checked to compute its layers as
        :attr:`layers` says (when set)."""
        agent = cached_agent(path, self.planner, self.device, self.precision)
        if self.layers is not None and agent.layers != self.layers:
            import socket

            from tdmpc_opt import cpu_kernels

            why = cpu_kernels.unavailable_reason()
            raise TdmpcError(f"a worker on {socket.gethostname()} plans with {agent.layers!r}, "
                             f"the run with {self.layers!r}"
                             + (f" (here the fused CPU kernel is unavailable: {why})"
                                if why else "")
                             + "; their episodes would not be comparable")
        return agent

    def run(self, agent, specs: list[EpisodeSpec], on_result=None,
            on_step=None) -> list[EpisodeResult]:
        """Run ``specs`` with ``agent`` as this job asks."""
        from tdmpc_opt.evaluation import run_episodes

        return run_episodes(agent, specs, self.batch_size, self.max_steps, self.eval_mode,
                            on_result, on_step, action_noise=self.action_noise,
                            trajectories=self.trajectories)


def run_rollouts(checkpoint: str | Path, planner: PlannerConfig, specs: list[EpisodeSpec], *,
                 backend: str = "local", workers: int | None = None, batch_size: int = 16,
                 max_steps: int | None = None, ray_address: str | None = None,
                 on_result: Callable[[EpisodeResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None, device: str = "cpu",
                 threads: int = 1, max_retries: int = 3, eval_mode: bool = True,
                 action_noise: float | tuple[float, ...] = 0.0,
                 trajectories: bool = False, precision: str = "auto",
                 layers: str | None = None) -> list[EpisodeResult]:
    """Run ``specs`` with the agent of ``checkpoint`` on a backend; results in spec order.

    Args:
        backend: ``local`` or ``ray`` (see the module docstring).
        workers: local worker processes (default 1: in this process), or Ray CPUs to use
            (default: every CPU of the cluster, or of this machine for a local instance).
        batch_size: episodes planned together in one batched call (and most per chunk).
        ray_address: ``auto`` or ``HOST:PORT`` of a running cluster; None starts one here.
        on_result: called once per episode, as soon as the driver has its result.
        on_step: called with numbers of agent steps done (per step in-process, per
            episode otherwise), for progress bars.
        threads: torch threads per worker (in-process: left as it is).
        max_retries: reruns of a chunk whose worker died.
        eval_mode, action_noise, trajectories: as in
            :func:`~tdmpc_opt.evaluation.run_episodes` (acting noise, extra Gaussian action
            noise, whole episodes in the results). ``on_result`` may drop a result's
            trajectory (set it to None) once it has used it, to free the memory.
    Raises:
        ConfigError: unknown backend, bad worker count, Ray missing or unreachable, a bad
            ``TDMPC_OPT_FAULT_INJECT``.
        TdmpcError: a chunk failed ``max_retries + 1`` times.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise ConfigError(f"workers must be positive, got {workers}")
    if ray_address and backend != "ray":
        raise ConfigError("a Ray address needs the ray backend")
    stds = action_noise if isinstance(action_noise, (tuple, list)) else (action_noise,)
    if not stds or not all(math.isfinite(s) and s >= 0 for s in stds):
        raise ConfigError(f"action noise must be >= 0, got {action_noise}")
    job = _Job(planner, batch_size, max_steps, device, threads, _fault_setting(), eval_mode,
               action_noise, trajectories, precision, layers)
    collector = _Collector(on_result, on_step)
    if not specs:
        return []
    if backend == "ray":
        _run_ray(str(checkpoint), job, specs, workers, ray_address, max_retries, collector)
    elif (workers or 1) == 1:
        job.run(job.agent(str(checkpoint)), specs, collector.add, on_step)
    else:
        _run_processes(str(checkpoint), job, specs, workers, max_retries, collector)
    return collector.ordered(specs)


class _Collector:
    """Keeps the first result of every (task, episode) and forwards it to the callbacks."""

    def __init__(self, on_result, on_step):
        self.results: dict[tuple[str, int], EpisodeResult] = {}
        self.on_result, self.on_step = on_result, on_step

    def add(self, res: EpisodeResult) -> None:
        """Record one result unless it was seen already."""
        key = (res.task, res.episode)
        if key in self.results:
            return
        self.results[key] = res
        if self.on_result:
            self.on_result(res)

    def add_chunk(self, results: Iterable[EpisodeResult]) -> None:
        """Record a finished chunk; advances progress by its agent steps."""
        for res in results:
            if (res.task, res.episode) not in self.results and self.on_step:
                self.on_step(res.length)
            self.add(res)

    def ordered(self, specs: list[EpisodeSpec]) -> list[EpisodeResult]:
        """Results in the order of ``specs``; raises if one is missing."""
        missing = [s for s in specs if (s.task, s.episode) not in self.results]
        if missing:
            raise TdmpcError(f"{len(missing)} episodes have no result (first: {missing[0]})")
        return [self.results[(s.task, s.episode)] for s in specs]


def episode_cost(spec: EpisodeSpec, max_steps: int | None = None) -> int:
    """Agent steps an episode takes at most: its task's length, cut at ``max_steps``."""
    from tdmpc_opt.tasks import get_task

    return min(get_task(spec.task).episode_length, max_steps or 10**9)


def make_chunks(specs: list[EpisodeSpec], batch_size: int, workers: int,
                max_steps: int | None = None) -> list[list[EpisodeSpec]]:
    """Split ``specs`` into consecutive chunks of about equal agent steps.

    Chunks hold at most ``batch_size`` episodes; their number is about ``workers`` times the
    fewest rounds of ``batch_size``-episode chunks that cover the specs, so every worker is
    busy and no last round runs half empty. Deterministic: the same arguments, the same chunks.
    """
    costs = [episode_cost(s, max_steps) for s in specs]
    workers = max(workers, 1)
    rounds = math.ceil(len(specs) / (workers * batch_size))
    target = sum(costs) / (workers * max(rounds, 1))
    chunks: list[list[EpisodeSpec]] = []
    cur: list[EpisodeSpec] = []
    acc = 0
    for spec, cost in zip(specs, costs, strict=True):
        cur.append(spec)
        acc += cost
        if len(cur) == batch_size or acc >= target:
            chunks.append(cur)
            cur, acc = [], 0
    return chunks + [cur] if cur else chunks


def _longest_first(chunks: list[list[EpisodeSpec]], max_steps: int | None) -> list[int]:
    """Chunk indices, most agent steps first (the order chunks are handed to workers)."""
    cost = [sum(episode_cost(s, max_steps) for s in c) for c in chunks]
    return sorted(range(len(chunks)), key=lambda i: (-cost[i], i))


# ------------------------------------------------------------------------- worker side
def cached_agent(path: str, planner: PlannerConfig, device: str = "cpu",
                 precision: str = "auto"):
    """The file's agent, planning in ``precision`` (``auto``: the runtime the file asks for,
    see :func:`~tdmpc_opt.quantization.load_fast_agent`; else an
    :class:`~tdmpc_opt.agent.Agent` precision, ``+compile`` included), reusing the last one
    loaded here.

    One agent is kept per process, keyed by the file's path, size and modification time and
    the settings.
    """
    from tdmpc_opt.quantization import load_fast_agent, with_precision

    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, planner, device, precision)
    if key not in _AGENT_CACHE:
        _AGENT_CACHE.clear()
        agent = load_fast_agent(path, planner=planner, device=device)
        _AGENT_CACHE[key] = agent if precision == "auto" else with_precision(agent, precision)
    return _AGENT_CACHE[key]


def run_chunk(path: str, job: _Job, index: int, specs: list[EpisodeSpec]) -> list[EpisodeResult]:
    """Run one chunk in a worker process (torch threads set to ``job.threads``)."""
    import torch

    from tdmpc_opt.allocator import keep_freed_memory

    keep_freed_memory()
    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    agent = job.agent(path)
    _maybe_fail(job.fault, index, lambda part: job.run(agent, part), specs)
    return job.run(agent, specs)


def _fault_setting() -> str | None:
    """``TDMPC_OPT_FAULT_INJECT`` (None if unset or empty), checked in the driver: a bad value
    is a ConfigError here, not a traceback in a worker."""
    fault = os.environ.get(FAULT_ENV) or None
    if fault is not None:
        chunk, _, marker = fault.partition(":")
        if not chunk.isdecimal() or not marker:
            raise ConfigError(f"{FAULT_ENV} must be CHUNK:MARKER (a chunk number and a file "
                              f"to create), got {fault!r}")
    return fault


def _maybe_fail(fault: str | None, index: int, run, specs: list[EpisodeSpec]) -> None:
    """Fault injection: on the first attempt of the chosen chunk, run half of it and die."""
    if not fault:
        return
    chunk, _, marker = fault.partition(":")
    if int(chunk) != index:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # a retry: run normally
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    run(specs[: max(1, len(specs) // 2)])
    os._exit(1)


def _run_processes(path: str, job: _Job, specs: list[EpisodeSpec], workers: int,
                   max_retries: int, collector: _Collector) -> None:
    """Chunks on a pool of spawned processes; a broken pool is rebuilt for unfinished chunks.
    On Ctrl-C or any other error here the workers are stopped before it propagates."""
    import multiprocessing

    made = make_chunks(specs, job.batch_size, workers, job.max_steps)
    chunks = {i: made[i] for i in _longest_first(made, job.max_steps)}
    for attempt in range(max_retries + 1):
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(min(workers, len(chunks)), mp_context=ctx,
                                 initializer=_quiet_worker, initargs=(os.getpid(),)) as pool:
            try:
                futures = {pool.submit(run_chunk, path, job, i, c): i for i, c in chunks.items()}
                while futures:
                    done, _ = wait(futures, return_when=FIRST_COMPLETED)
                    for fut in done:
                        collector.add_chunk(fut.result())
                        del chunks[futures.pop(fut)]
            except BrokenProcessPool as e:
                if attempt == max_retries:
                    raise TdmpcError(f"a worker process died {max_retries + 1} times; "
                                     f"{len(chunks)} chunks unfinished") from e
            except BaseException:
                _stop_workers(pool)
                raise
        if not chunks:
            return


def _quiet_worker(driver_pid: int) -> None:
    """Worker initializer: Ctrl-C is the driver's to handle (it stops the workers), the worker
    dies with the driver, and GLFW's no-display warning is ignored, as the CLI does."""
    import warnings

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(driver_pid)
    warnings.filterwarnings("ignore", category=UserWarning, module="glfw")


def _die_with_parent(parent_pid: int) -> None:
    """On Linux, have the kernel kill this process (SIGKILL) when ``parent_pid``, its parent,
    dies: a driver killed with ``kill -9`` (no chance to stop its workers) leaves no orphan
    planning on for minutes. Exits at once if the parent is already gone. Elsewhere nothing.

    The signal follows the parent *thread* that started this process; pool workers are
    started by the thread that submits the chunks and waits for them, which outlives them.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1  # <linux/prctl.h>
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent_pid:  # died before the request was in place
        os._exit(1)


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 3.0) -> None:
    """Stop ``pool``'s workers now: terminate them, wait up to ``grace_s``, kill the rest, then
    wait (up to ``grace_s`` again) for the pool's manager thread.

    That thread reaps the dead workers too; a worker it reaps first still looks alive to the
    driver until the thread has recorded its exit status, so it is waited for before return.
    """
    procs = list((pool._processes or {}).values())  # no public handle before Python 3.14
    manager = pool._executor_manager_thread  # likewise private; None before the first submit
    for proc in procs:
        proc.terminate()
    pool.shutdown(wait=False, cancel_futures=True)
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
    if manager is not None:
        manager.join(grace_s)


# ------------------------------------------------------------------------------- Ray
def import_ray():
    """The ``ray`` module, or a ConfigError saying how to install it.

    Sets ``RAY_AUTH_MODE=token`` (unless set) when a Ray token is at hand, before Ray is
    imported: Ray 2.60 sends its token to a cluster given as HOST:PORT only in that mode.
    """
    if (os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH")
            or (Path.home() / ".ray" / "auth_token").exists()):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def _ray_chunk(blob: list, name: str, sha256: str, job: _Job, index: int,
               specs: list[EpisodeSpec]) -> list[EpisodeResult]:
    """Ray task: materialise the checkpoint on this node (once), then run the chunk."""
    path = Path(tempfile.gettempdir()) / "tdmpc-opt-checkpoints" / sha256[:16] / name
    if not path.exists():
        import ray

        from tdmpc_opt.checkpoints import atomic_write

        data = ray.get(blob[0])
        atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return run_chunk(str(path), job, index, specs)


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Connect to ``address`` or start a local instance; True if this call started Ray."""
    import logging

    if ray.is_initialized():
        return False
    # ray.init makes SIGTERM call sys.exit (and leaves it so after shutdown); the caller's
    # handling (the CLI's: as Ctrl-C, with its clean-up and note) is put back
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        if address:
            _check_reachable(address)
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(address="local", num_cpus=workers or os.cpu_count(),
                     include_dashboard=False, logging_level=logging.WARNING)
        if sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"cannot start or reach Ray at {address or 'a local instance'}: "
                          f"{first} (a token-authenticated cluster needs its token here: "
                          "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail fast on a HOST:PORT nothing listens at (Ray itself retries for minutes).

    """
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {address} ({e.strerror or e}); start the "
                              "head with `ray start --head`") from None


def _run_ray(path: str, job: _Job, specs: list[EpisodeSpec], workers: int | None,
             address: str | None, max_retries: int, collector: _Collector) -> None:
    """Chunks as Ray tasks; results streamed to ``collector`` as chunks finish."""
    import hashlib

    ray = import_ray()
    Path(path).stat()  # a missing file fails here, not in a worker
    _check_self_contained(path)
    started = _connect(ray, address, workers)
    try:
        cpus = workers or int(ray.cluster_resources().get("CPU", 1))
        chunks = make_chunks(specs, job.batch_size, max(1, cpus // job.threads), job.max_steps)
        data = Path(path).read_bytes()  # read once: shipped, and its hash names it
        blob = [ray.put(data)]
        task = ray.remote(_ray_chunk).options(
            num_cpus=job.threads, max_retries=max_retries, retry_exceptions=False,
            num_gpus=1 if job.device.startswith("cuda") else 0)
        name, sha = Path(path).name, hashlib.sha256(data).hexdigest()
        del data
        pending = {task.remote(blob, name, sha, job, i, chunks[i]): i
                   for i in _longest_first(chunks, job.max_steps)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            collector.add_chunk(_ray_result(ray, done[0], pending.pop(done[0]), max_retries))
    finally:
        if started:
            ray.shutdown()


def _check_self_contained(path: str) -> None:
    """Ray ships the checkpoint file alone: a training checkpoint, whose model settings are in
    its run directory's config.json, is refused here with what to do instead."""
    from tdmpc_opt.checkpoints import read_state_dict

    if read_state_dict(path)[1].get("training_checkpoint"):
        raise ConfigError(f"{path} is a training checkpoint, which needs its run directory; "
                          "for the ray backend make it a model file first: tdmpc-opt convert "
                          f"{path} model.safetensors")


def _ray_result(ray, ref, index: int, max_retries: int) -> list[EpisodeResult]:
    """A finished chunk's results; a worker's TdmpcError is re-raised as itself."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, TdmpcError):
            raise e.cause from None
        raise
    except ray.exceptions.RayError as e:
        raise TdmpcError(f"chunk {index} failed {max_retries + 1} times: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
