"""A standalone TD-MPC2 MPPI planner over exported ONNX graphs: numpy and onnxruntime only.

The folder written by ``tdmpc-opt export --format onnx`` holds the five graphs, ``model.json``
and a copy of this file. Planning follows ``tdmpc_opt.planner.plan`` step for step; given the
same random numbers (the six arrays of PyTorch's ``PlanNoise``, as numpy arrays in a dict) it
returns the same actions. :func:`draw_noise` draws fresh ones from a numpy generator.

    >>> agent = OnnxAgent("exported/")
    >>> action = agent.act(obs, task="walker-walk", t0=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

NOISE_FIELDS = ("pi_traj", "sample", "pi_value", "q_pick", "gumbel", "explore")
F32 = np.float32


@dataclass(frozen=True)
class PlannerSettings:
    """MPPI settings (TD-MPC2 defaults, as ``tdmpc_opt.config.PlannerConfig``)."""

    iterations: int = 6
    num_samples: int = 512
    num_elites: int = 64
    num_pi_trajs: int = 24
    horizon: int = 3
    min_std: float = 0.05
    max_std: float = 2.0
    temperature: float = 0.5


class OnnxWorldModel:
    """The exported networks. Inputs ``[..., D]`` with any leading dims; ``task`` holds
    task indices broadcastable to the leading dims (None for single-task models)."""

    def __init__(self, directory: str | Path, threads: int = 1):
        self.dir = Path(directory)
        if not (self.dir / "model.json").is_file():
            raise FileNotFoundError(f"{self.dir}: no model.json here; give the folder written by "
                                    "`tdmpc-opt export --format onnx`")
        self.meta = json.loads((self.dir / "model.json").read_text())
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.sessions = {k: ort.InferenceSession(str(self.dir / f), opts,
                                                 providers=["CPUExecutionProvider"])
                         for k, f in self.meta["graphs"].items()}
        m = self.meta
        self.multitask, self.action_dim = m["multitask"], m["action_dim"]
        self.obs_dim, self.num_q = m["obs_dim"], m["num_q"]
        self.masks = (np.arange(self.action_dim)[None] < np.array(m["action_dims"])[:, None]
                      ).astype(F32)

    def _run(self, graph: str, task, **inputs: np.ndarray) -> list[np.ndarray]:
        lead = next(iter(inputs.values())).shape[:-1]
        feed = {k: np.ascontiguousarray(v, F32).reshape(-1, v.shape[-1])
                for k, v in inputs.items()}
        if self.multitask:
            if task is None:
                raise ValueError("a multi-task model needs task indices")
            feed["task"] = np.broadcast_to(np.asarray(task, np.int64), lead).reshape(-1)
        return [o.reshape(*o.shape[:-2], *lead, o.shape[-1])
                for o in self.sessions[graph].run(None, feed)]

    def encode(self, obs: np.ndarray, task=None) -> np.ndarray:
        """``obs [..., obs_dim]`` -> latent ``[..., L]``."""
        return self._run("encoder", task, obs=obs)[0]

    def next(self, z: np.ndarray, a: np.ndarray, task=None) -> np.ndarray:
        """Latent dynamics ``[..., L], [..., A] -> [..., L]``."""
        return self._run("dynamics", task, z=z, action=a)[0]

    def reward(self, z: np.ndarray, a: np.ndarray, task=None) -> np.ndarray:
        """Decoded reward ``[..., 1]``."""
        return self._run("reward", task, z=z, action=a)[1]

    def q(self, z: np.ndarray, a: np.ndarray, task=None) -> np.ndarray:
        """Decoded Q of every ensemble member ``[Q, ..., 1]``."""
        return self._run("q", task, z=z, action=a)[1]

    def pi(self, z: np.ndarray, eps: np.ndarray, task=None) -> np.ndarray:
        """Policy-prior action ``[..., A]`` for standard-normal noise ``eps``."""
        return self._run("policy", task, z=z, eps=eps)[0]


def draw_noise(s: PlannerSettings, action_dim: int, num_q: int, batch: int,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random numbers of one planning step (shapes as PyTorch's ``PlanNoise``)."""
    h, n, p, i, a = s.horizon, s.num_samples, s.num_pi_trajs, s.iterations, action_dim
    return {"pi_traj": rng.standard_normal((batch, h, p, a), F32),
            "sample": rng.standard_normal((batch, i, h, n - p, a), F32),
            "pi_value": rng.standard_normal((batch, i, n, a), F32),
            "q_pick": rng.random((batch, i, num_q), F32),
            "gumbel": rng.random((batch, s.num_elites), F32),
            "explore": rng.standard_normal((batch, a), F32)}


def gumbel_argmax(probs: np.ndarray, uniform: np.ndarray) -> np.ndarray:
    """Index sampled from ``probs [..., K]`` with Gumbel noise made from ``uniform``."""
    with np.errstate(divide="ignore"):
        gumbel = -np.log(-np.log(np.maximum(uniform, F32(1e-20))))
        return np.argmax(np.log(probs) + gumbel, axis=-1)


def pair_average(q: np.ndarray, q_pick: np.ndarray) -> np.ndarray:
    """Mean of the two members with the smallest ``q_pick [B, Q]``; ``q [Q, B, N, 1]``."""
    if q.shape[0] == 2:
        return q.mean(0)
    pair = np.argsort(q_pick, axis=1, kind="stable")[:, :2]  # [B, 2]
    per_b = np.moveaxis(q, 0, 1)  # [B, Q, N, 1]
    return np.take_along_axis(per_b, pair[:, :, None, None], 1).mean(1)


def estimate_value(model: OnnxWorldModel, z, actions, task, gamma, pi_noise, q_pick):
    """Discounted model return of ``actions [B, H, N, A]`` from ``z [B, N, L]`` plus the
    bootstrapped Q at the horizon; ``[B, N, 1]``."""
    g = np.zeros((*z.shape[:2], 1), F32)
    disc = np.ones_like(gamma)
    for k in range(actions.shape[1]):
        g = g + disc * model.reward(z, actions[:, k], task)
        z = model.next(z, actions[:, k], task)
        disc = disc * gamma
    a_last = model.pi(z, pi_noise, task)
    return g + disc * pair_average(model.q(z, a_last, task), q_pick)


def plan(model: OnnxWorldModel, s: PlannerSettings, z0: np.ndarray, task, prev_mean,
         t0: np.ndarray, eval_mode: bool, noise: dict, discount: np.ndarray):
    """MPPI for ``B`` environments (as ``tdmpc_opt.planner.plan``).

    ``z0 [B, L]``, ``task [B]`` ints or None, ``prev_mean [B, H, A]``, ``t0 [B]`` bool,
    ``noise`` dict of :data:`NOISE_FIELDS` arrays, ``discount [B]``.
    Returns ``(action [B, A], mean [B, H, A])``.
    """
    b, a_dim = z0.shape[0], model.action_dim
    h, n, p = s.horizon, s.num_samples, s.num_pi_trajs
    mask = None if task is None else model.masks[task][:, None, :]  # [B, 1, A]
    task_p = None if task is None else np.asarray(task)[:, None]
    actions = np.empty((b, h, n, a_dim), F32)
    z = np.repeat(z0[:, None], p, 1)
    for k in range(h if p > 0 else 0):
        actions[:, k, :p] = model.pi(z, noise["pi_traj"][:, k], task_p)
        if k < h - 1:
            z = model.next(z, actions[:, k, :p], task_p)
    z = np.repeat(z0[:, None], n, 1)
    mean = np.zeros((b, h, a_dim), F32)
    warm = ~np.asarray(t0, bool)
    mean[warm, :-1] = prev_mean[warm, 1:]
    std = np.full((b, h, a_dim), s.max_std, F32)
    gamma = np.asarray(discount, F32).reshape(b, 1, 1)
    for it in range(s.iterations):
        actions[:, :, p:] = np.clip(mean[:, :, None] + std[:, :, None] * noise["sample"][:, it],
                                    -1, 1)
        if mask is not None:
            actions = actions * mask[:, None]
        value = estimate_value(model, z, actions, task_p, gamma, noise["pi_value"][:, it],
                               noise["q_pick"][:, it])
        value = np.nan_to_num(value, nan=0.0).squeeze(-1)
        idx = np.argsort(-value, axis=1, kind="stable")[:, :s.num_elites]
        elite_value = np.take_along_axis(value, idx, 1)
        elite_actions = np.take_along_axis(actions, idx[:, None, :, None], 2)
        score = np.exp(s.temperature * (elite_value - elite_value.max(1, keepdims=True)))
        score = score / score.sum(1, keepdims=True)
        w = score[:, None, :, None]
        denom = score.sum(1)[:, None, None] + F32(1e-9)
        mean = (w * elite_actions).sum(2) / denom
        std = np.sqrt((w * (elite_actions - mean[:, :, None]) ** 2).sum(2) / denom)
        std = np.clip(std, s.min_std, s.max_std).astype(F32)
        if mask is not None:
            mean, std = mean * mask, std * mask
    idx = gumbel_argmax(score, noise["gumbel"])
    action = elite_actions[np.arange(b), 0, idx]
    if not eval_mode:
        action = action + std[:, 0] * noise["explore"]
    return np.clip(action, -1, 1), mean


class OnnxAgent:
    """Acts with an exported model: pads observations, plans, keeps warm-start plans."""

    def __init__(self, directory: str | Path, settings: PlannerSettings | None = None,
                 threads: int = 1, seed: int = 0):
        self.model = OnnxWorldModel(directory, threads)
        self.settings = settings or PlannerSettings(**{
            k: v for k, v in self.model.meta["planner"].items() if k != "mpc"})
        self.rng = np.random.default_rng(seed)
        self.discounts = np.asarray(self.model.meta["discounts"], F32)
        self.prev_mean: np.ndarray | None = None

    def task_index(self, task) -> int:
        """Index of a task name (or a checked index)."""
        tasks = self.model.meta["tasks"]
        if isinstance(task, str):
            if task not in tasks:
                raise ValueError(f"task {task!r} is not in this model's task set")
            return tasks.index(task)
        if not 0 <= int(task) < max(len(tasks), 1):
            raise ValueError(f"task index {task} out of range")
        return int(task)

    def act(self, obs, task=None, t0=False, eval_mode: bool = True,
            noise: dict | None = None) -> np.ndarray:
        """Actions ``[A]`` / ``[B, A]`` for observations ``[D]`` / ``[B, D]`` (unpadded or
        padded); ``task`` a name/index or one per observation; ``noise`` optional arrays."""
        x = np.asarray(obs, F32)
        single = x.ndim == 1
        x = x[None] if single else x
        # the checks of tdmpc_opt.agent.Agent.prepare_obs, restated: no tdmpc_opt here
        if x.ndim != 2 or len(x) == 0:
            raise ValueError(f"observations must be [obs] or [batch >= 1, obs], got shape "
                             f"{np.shape(obs)}")
        if x.shape[1] > self.model.obs_dim:
            raise ValueError(f"observation has {x.shape[1]} values; this model takes at most "
                             f"{self.model.obs_dim}")
        if not np.isfinite(x).all():
            raise ValueError("observation contains NaN or Inf")
        x = np.pad(x, ((0, 0), (0, self.model.obs_dim - x.shape[1])))
        b = len(x)
        tasks = [task] * b if task is None or isinstance(task, str | int | np.integer) \
            else list(task)
        if len(tasks) != b:
            raise ValueError(f"got {len(tasks)} tasks for {b} observations")
        tid = np.array([self.task_index(t) for t in tasks]) if self.model.multitask else None
        starts = np.broadcast_to(np.asarray(t0, bool), (b,)).copy()
        if self.prev_mean is None or len(self.prev_mean) != b:
            self.prev_mean = np.zeros((b, self.settings.horizon, self.model.action_dim), F32)
            starts[:] = True
        if noise is None:
            noise = draw_noise(self.settings, self.model.action_dim, self.model.num_q, b,
                               self.rng)
        gamma = self.discounts[tid] if tid is not None else np.repeat(self.discounts[:1], b)
        z = self.model.encode(x, tid)
        action, self.prev_mean = plan(self.model, self.settings, z, tid, self.prev_mean, starts,
                                      eval_mode, noise, gamma)
        return action[0] if single else action
