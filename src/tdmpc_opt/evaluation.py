"""Batched evaluation: many episodes, of one task or many, advance together.

At every agent step the observations of all running episodes go to the planner in one batched
call. Each episode has its own seed (derived from the run seed, the task name and the episode
number), which seeds both its environment and its planner's random numbers, so an episode's
return does not depend on which other episodes share its batch.

With ``trajectories=True`` each result also carries the episode's observations, actions and
rewards (what ``tdmpc-opt collect`` writes as a dataset); optional action noise is drawn from
a generator of the episode's own, so trajectories are batch-invariant too.

Normalized score (TD-MPC2 / TD-MPC-Opt): the mean over tasks of mean return / 10 for DMControl
tasks (returns lie in [0, 1000]) and success rate x 100 for Meta-World tasks.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from tdmpc_opt.agent import Agent
from tdmpc_opt.allocator import release_freed_memory
from tdmpc_opt.tasks import get_task


@dataclass(frozen=True)
class EpisodeSpec:
    """One episode to run."""

    task: str
    """Task name."""
    episode: int
    """Episode number within the task (0-based)."""
    seed: int
    """Seed of the environment and of the planner's noise."""


@dataclass
class Trajectory:
    """One episode's steps in the dataset layout (``T`` agent steps, ``T + 1`` rows)."""

    obs: np.ndarray
    """``[T + 1, obs_dim]`` float32, zero-padded to the model's size."""
    action: np.ndarray
    """``[T + 1, action_dim]`` float32 as taken (padded, masked, noise added); row 0 NaN."""
    reward: np.ndarray
    """``[T + 1]`` float32; row 0 NaN."""


@dataclass
class EpisodeResult:
    """Outcome of one episode."""

    task: str
    episode: int
    seed: int
    episode_return: float
    length: int
    success: float | None = None
    trajectory: Trajectory | None = field(default=None, repr=False, compare=False)
    """The episode's steps, when asked for (``run_episodes(..., trajectories=True)``)."""


@dataclass
class _Slot:
    spec: EpisodeSpec
    env: object
    obs: np.ndarray
    generator: torch.Generator
    plan: torch.Tensor
    t: int = 0
    ret: float = 0.0
    success: float | None = None
    frames: list = field(default_factory=list)
    noise_rng: np.random.Generator | None = None
    noise_std: float = 0.0
    steps: tuple[list, list, list] | None = None


def episode_seed(seed: int, task: str, episode: int) -> int:
    """Seed of episode ``episode`` of ``task`` in a run seeded ``seed`` (31-bit)."""
    digest = hashlib.sha256(f"{seed}:{task}:{episode}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def episode_specs(tasks: Iterable[str], episodes: int, seed: int) -> list[EpisodeSpec]:
    """All episodes of a run, task-major."""
    return list(iter_episode_specs(tasks, episodes, seed))


def iter_episode_specs(tasks: Iterable[str], episodes: int, seed: int) -> Iterator[EpisodeSpec]:
    """The episodes of :func:`episode_specs`, made one at a time (any number in bounded
    memory)."""
    return (EpisodeSpec(t, i, episode_seed(seed, t, i)) for t in tasks for i in range(episodes))


def noise_for_episode(action_noise: float | tuple[float, ...], episode: int) -> float:
    """The action-noise std of episode number ``episode``: one std for all, or a tuple that
    episodes cycle through (episode ``i`` takes ``action_noise[i % len]``)."""
    if isinstance(action_noise, (tuple, list)):
        return float(action_noise[episode % len(action_noise)])
    return float(action_noise)


def _open_slot(agent: Agent, spec: EpisodeSpec, make_env, record: bool,
               action_noise: float | tuple[float, ...], trajectory: bool) -> _Slot:
    env = make_env(spec.task, spec.seed)
    obs, _ = env.reset(seed=spec.seed)
    slot = _Slot(spec, env, obs, torch.Generator().manual_seed(spec.seed), agent.initial_plan(1))
    if record:
        slot.frames.append(env.render())
    slot.noise_std = noise_for_episode(action_noise, spec.episode)
    if slot.noise_std:
        slot.noise_rng = np.random.default_rng(spec.seed)
    if trajectory:
        from tdmpc_opt.envs import pad_obs

        slot.steps = ([pad_obs(obs, agent.cfg.obs_dim)],
                      [np.full(agent.cfg.action_dim, np.nan, np.float32)], [np.nan])
    return slot


def _take_action(slot: _Slot, action: np.ndarray) -> np.ndarray:
    """The action the environment gets: the agent's, plus the episode's Gaussian noise on the
    task's own dimensions (clipped to [-1, 1]); padded dimensions stay as the agent left them."""
    n = slot.env.action_space.shape[0]
    if slot.noise_rng is not None:
        action = action.copy()
        action[:n] = np.clip(action[:n] + slot.noise_std * slot.noise_rng.standard_normal(n),
                             -1, 1)
    if slot.steps is not None:
        slot.steps[1].append(action)
    return action[:n]


def _trajectory(slot: _Slot) -> Trajectory | None:
    if slot.steps is None:
        return None
    obs, action, reward = slot.steps
    return Trajectory(np.stack(obs), np.stack(action), np.array(reward, np.float32))


def run_episodes(agent: Agent, specs: list[EpisodeSpec], batch_size: int = 16,
                 max_steps: int | None = None, eval_mode: bool = True,
                 on_result: Callable[[EpisodeResult], None] | None = None,
                 on_step: Callable[[int], None] | None = None,
                 record: Callable[[EpisodeSpec], bool] | None = None,
                 on_video: Callable[[EpisodeSpec, list], None] | None = None,
                 make_env=None, action_noise: float | tuple[float, ...] = 0.0,
                 trajectories: bool = False) -> list[EpisodeResult]:
    """Run ``specs`` with up to ``batch_size`` episodes planned together per agent step.

    Args:
        max_steps: cut episodes after this many agent steps (default: the task's length).
        on_result: called as each episode finishes (e.g. to append it to a results file).
        on_step: called with the number of agent steps just taken (progress bars).
        record / on_video: which episodes to render, and what to do with their frames.
        make_env: ``(task, seed) -> env`` (default :func:`tdmpc_opt.envs.make_env`).
        action_noise: std of Gaussian noise added to every action the environment gets
            (clipped to [-1, 1]), drawn from a generator seeded by the episode's seed; a
            tuple gives episode ``i`` the std ``action_noise[i % len]``.
        trajectories: keep each episode's steps in its result's ``trajectory``.
    Returns:
        Results in the order of ``specs``.
    """
    if make_env is None:
        from tdmpc_opt.envs import make_env
    pending = deque(specs)
    slots: list[_Slot] = []
    results: dict[EpisodeSpec, EpisodeResult] = {}
    while pending or slots:
        while pending and len(slots) < batch_size:
            spec = pending.popleft()
            slots.append(_open_slot(agent, spec, make_env, bool(record and record(spec)),
                                    action_noise, trajectories))
        x, tid = agent.prepare_inputs([s.obs for s in slots], [s.spec.task for s in slots])
        t0 = torch.tensor([s.t == 0 for s in slots])
        actions, plans = agent.step(x, tid, torch.cat([s.plan for s in slots]), t0, eval_mode,
                                    [s.generator for s in slots])
        ended = [_advance(s, actions[i].numpy(), plans[i:i + 1], max_steps, agent.cfg.obs_dim)
                 for i, s in enumerate(slots)]
        if on_step:
            on_step(len(slots))
        if any(ended):
            finished = [s for s, e in zip(slots, ended, strict=True) if e]
            slots = [s for s, e in zip(slots, ended, strict=True) if not e]
            _finish(finished, results, on_result, on_video)
            release_freed_memory()  # their environments' ~25 MB each, now unreferenced
    return [results[s] for s in specs]


def _advance(slot: _Slot, action: np.ndarray, plan: torch.Tensor, max_steps: int | None,
             obs_dim: int) -> bool:
    """Step ``slot``'s environment with the agent's ``action``; whether its episode ended."""
    slot.plan = plan
    slot.obs, reward, terminated, truncated, info = slot.env.step(_take_action(slot, action))
    if slot.steps is not None:
        from tdmpc_opt.envs import pad_obs

        slot.steps[0].append(pad_obs(slot.obs, obs_dim))
        slot.steps[2].append(float(reward))
    slot.ret += float(reward)
    slot.t += 1
    if "success" in info:
        slot.success = max(slot.success or 0.0, float(info["success"]))
    if slot.frames:
        slot.frames.append(slot.env.render())
    return terminated or truncated or (max_steps is not None and slot.t >= max_steps)


def _finish(finished: list[_Slot], results: dict, on_result, on_video) -> None:
    """Close the environments of ``finished`` (then emptied) and report their episodes."""
    for slot in finished:
        slot.env.close()
        res = EpisodeResult(slot.spec.task, slot.spec.episode, slot.spec.seed, slot.ret, slot.t,
                            slot.success, _trajectory(slot))
        results[slot.spec] = res
        if on_result:
            on_result(res)
        if slot.frames and on_video:
            on_video(slot.spec, slot.frames)
    finished.clear()


def task_score(task: str, returns: list[float], successes: list[float | None]) -> float:
    """Normalized score of one task: mean return / 10, or success rate x 100 (Meta-World)."""
    if get_task(task).suite == "metaworld":
        return 100.0 * float(np.mean([s or 0.0 for s in successes]))
    return float(np.mean(returns)) / 10.0


def summarize(results: list[EpisodeResult], tasks: Iterable[str]) -> dict:
    """Per-task returns, mean, std and success; the normalized score over ``tasks``."""
    per_task = {}
    for task in tasks:
        rs = sorted((r for r in results if r.task == task), key=lambda r: r.episode)
        returns = [r.episode_return for r in rs]
        successes = [r.success for r in rs]
        per_task[task] = {
            "returns": returns,
            "seeds": [r.seed for r in rs],
            "mean_return": float(np.mean(returns)) if returns else float("nan"),
            "std_return": float(statistics.pstdev(returns)) if len(returns) > 1 else 0.0,
            "success": (float(np.mean([s or 0.0 for s in successes]))
                        if any(s is not None for s in successes) else None),
            "score": task_score(task, returns, successes) if returns else float("nan"),
        }
    scores = [v["score"] for v in per_task.values()]
    return {"tasks": per_task, "normalized_score": float(np.mean(scores)) if scores else None}


def result_to_dict(res: EpisodeResult) -> dict:
    """JSON-ready dict of an episode result (without its trajectory)."""
    return {f.name: getattr(res, f.name) for f in fields(res) if f.name != "trajectory"}


def write_video(path: Path, frames: list, fps: int = 30) -> None:
    """Write RGB frames as an MP4 (needs the ``video`` extra: imageio + imageio-ffmpeg)."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimsave(path, [np.asarray(f) for f in frames], fps=fps, macro_block_size=1)
