"""MPPI planning in the latent space of a TD-MPC2 world model.

Every random number one planning step uses is drawn up front into a :class:`PlanNoise`, per
batch element, from that element's own generator. This makes an episode reproducible on its own
whatever else is planned in the same batch, lets two implementations be compared on identical
noise, and lets an exported planner replay PyTorch's noise.

:func:`plan_literal` is TD-MPC2's algorithm written as plainly as possible for one environment;
:func:`plan` is the batched implementation used everywhere else. Tests hold them equal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from tdmpc_opt import math as tm
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.world_model import WorldModel


@dataclass
class PlanNoise:
    """Random numbers for one planning step of ``B`` elements (leading dim ``B``).

    Shapes, with ``I`` iterations, ``H`` horizon, ``N`` samples, ``P`` policy trajectories,
    ``E`` elites, ``A`` action dims, ``Q`` ensemble size:
    """

    pi_traj: torch.Tensor
    """``[B, H, P, A]`` policy-prior noise for the policy trajectories."""
    sample: torch.Tensor
    """``[B, I, H, N-P, A]`` standard normal draws for the Gaussian action samples."""
    pi_value: torch.Tensor
    """``[B, I, N, A]`` policy-prior noise for the bootstrap action at the horizon."""
    q_pick: torch.Tensor
    """``[B, I, Q]`` uniforms whose two smallest entries pick the Q pair of each iteration."""
    gumbel: torch.Tensor
    """``[B, E]`` uniforms for choosing one elite trajectory."""
    explore: torch.Tensor
    """``[B, A]`` standard normal exploration noise (used when not in eval mode)."""

    def __getitem__(self, i) -> PlanNoise:
        return PlanNoise(**{f.name: getattr(self, f.name)[i] for f in fields(self)})

    def to(self, device) -> PlanNoise:
        return PlanNoise(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def draw_noise(cfg: PlannerConfig, action_dim: int, num_q: int, batch: int,
               generators: list[torch.Generator] | None = None) -> PlanNoise:
    """Draw the noise of one planning step for ``batch`` elements.

    With ``generators`` (one per element), element ``b`` draws only from ``generators[b]``,
    so its numbers do not depend on the batch it is planned in.
    """
    h, n, p, i, a = cfg.horizon, cfg.num_samples, cfg.num_pi_trajs, cfg.iterations, action_dim
    normal = h * p * a + i * h * (n - p) * a + i * n * a + a
    uniform = i * num_q + cfg.num_elites
    if generators is None:
        z = torch.randn(batch, normal)
        u = torch.rand(batch, uniform)
    else:
        if len(generators) != batch:
            raise ValueError(f"need one generator per element ({batch}), got {len(generators)}")
        z = torch.stack([torch.randn(normal, generator=g) for g in generators])
        u = torch.stack([torch.rand(uniform, generator=g) for g in generators])
    parts = torch.split(z, [h * p * a, i * h * (n - p) * a, i * n * a, a], dim=1)
    qp, gm = torch.split(u, [i * num_q, cfg.num_elites], dim=1)
    return PlanNoise(
        pi_traj=parts[0].reshape(batch, h, p, a),
        sample=parts[1].reshape(batch, i, h, n - p, a),
        pi_value=parts[2].reshape(batch, i, n, a),
        q_pick=qp.reshape(batch, i, num_q),
        gumbel=gm,
        explore=parts[3],
    )


# ------------------------------------------------------------------- literal reference
@torch.no_grad()
def plan_literal(model: WorldModel, cfg: PlannerConfig, obs: torch.Tensor,
                 task: int | None, prev_mean: torch.Tensor, t0: bool, eval_mode: bool,
                 noise: PlanNoise, discount: float):
    """TD-MPC2's MPPI for one environment, step by step as the original writes it.

    Args:
        obs: ``[obs_dim]``; task: task index or None; prev_mean: ``[H, A]`` last plan's mean;
        noise: one element of :class:`PlanNoise` (no batch dim); discount: the task's gamma.
    Returns:
        ``(action [A], mean [H, A])``.
    """
    h, n, p = cfg.horizon, cfg.num_samples, cfg.num_pi_trajs
    t = None if task is None else torch.tensor([task])
    mask = model.action_mask(t)
    z0 = model.encode(obs.unsqueeze(0), t)
    # 1. trajectories from the policy prior
    pi_actions = torch.empty(h, p, model.cfg.action_dim)
    z = z0.repeat(p, 1)
    for k in range(h):
        pi_actions[k] = model.pi(z, t, noise.pi_traj[k]).action
        if k < h - 1:
            z = model.next(z, pi_actions[k], t)
    # 2. MPPI iterations
    z = z0.repeat(n, 1)
    mean = torch.zeros(h, model.cfg.action_dim)
    std = torch.full((h, model.cfg.action_dim), cfg.max_std)
    if not t0:
        mean[:-1] = prev_mean[1:]
    actions = torch.empty(h, n, model.cfg.action_dim)
    actions[:, :p] = pi_actions
    for it in range(cfg.iterations):
        sampled = (mean.unsqueeze(1) + std.unsqueeze(1) * noise.sample[it]).clamp(-1, 1)
        actions[:, p:] = sampled
        if mask is not None:
            actions = actions * mask
        # value of each sequence: discounted model rewards + bootstrap Q at the horizon
        g, disc, zz = torch.zeros(n, 1), 1.0, z
        for k in range(h):
            reward = model.decode(model.reward(zz, actions[k], t))
            zz = model.next(zz, actions[k], t)
            g = g + disc * reward
            disc = disc * discount
        a_last = model.pi(zz, t, noise.pi_value[it]).action
        pair = torch.argsort(noise.q_pick[it])[:2]
        value = (g + disc * model.q_value(zz, a_last, t, "avg", members=pair)).nan_to_num(0)
        elite_idx = torch.topk(value.squeeze(1), cfg.num_elites, dim=0).indices
        elite_value, elite_actions = value[elite_idx], actions[:, elite_idx]
        score = torch.exp(cfg.temperature * (elite_value - elite_value.max(0).values))
        score = score / score.sum(0)
        mean = (score.unsqueeze(0) * elite_actions).sum(1) / (score.sum(0) + 1e-9)
        std = ((score.unsqueeze(0) * (elite_actions - mean.unsqueeze(1)) ** 2).sum(1)
               / (score.sum(0) + 1e-9)).sqrt().clamp(cfg.min_std, cfg.max_std)
        if mask is not None:
            mean, std = mean * mask, std * mask
    # 3. pick one elite sequence, act with its first action
    idx = tm.gumbel_argmax(score.squeeze(1), noise.gumbel)
    a = elite_actions[0, idx]
    if not eval_mode:
        a = a + std[0] * noise.explore
    return a.clamp(-1, 1), mean


# ------------------------------------------------------------------------ batched MPPI
def _gather_elites(value: torch.Tensor, actions: torch.Tensor, k: int):
    """Top-``k`` values ``[B, k]`` and their action sequences ``[B, H, k, A]``."""
    elite_value, idx = torch.topk(value, k, dim=1)
    index = idx[:, None, :, None].expand(-1, actions.shape[1], -1, actions.shape[3])
    return elite_value, torch.gather(actions, 2, index)


def _pair_average(q: torch.Tensor, q_pick: torch.Tensor) -> torch.Tensor:
    """Average decoded Q of the two members picked per element.

    ``q [Q, B, N, 1]`` values of all members, ``q_pick [B, Q]`` uniforms -> ``[B, N, 1]``.
    """
    if q.shape[0] == 2:
        return q.mean(0)
    pair = torch.argsort(q_pick, dim=1)[:, :2]  # [B, 2]
    index = pair.t()[:, :, None, None].expand(-1, -1, q.shape[2], 1)
    return torch.gather(q, 0, index).mean(0)


@torch.no_grad()
def estimate_value(model: WorldModel, z: torch.Tensor, actions: torch.Tensor,
                   task: torch.Tensor | None, discount: torch.Tensor, pi_noise: torch.Tensor,
                   q_pick: torch.Tensor) -> torch.Tensor:
    """Discounted model return of action sequences plus the bootstrapped Q at the horizon.

    Args:
        z: ``[B, N, L]`` start latents; actions: ``[B, H, N, A]``; task: ``[B, N]`` or None;
        discount: ``[B, 1, 1]``; pi_noise: ``[B, N, A]``; q_pick: ``[B, Q]``.
    Returns:
        ``[B, N, 1]`` values.
    """
    g = torch.zeros(*z.shape[:2], 1, dtype=z.dtype)
    disc = torch.ones_like(discount)
    for k in range(actions.shape[1]):
        g = g + disc * model.decode(model.reward(z, actions[:, k], task))
        z = model.next(z, actions[:, k], task)
        disc = disc * discount
    a_last = model.pi(z, task, pi_noise).action
    q = model.decode(model.q_logits(z, a_last, task))
    return g + disc * _pair_average(q, q_pick)


@torch.no_grad()
def plan(model: WorldModel, cfg: PlannerConfig, z0: torch.Tensor, task: torch.Tensor | None,
         prev_mean: torch.Tensor, t0: torch.Tensor, eval_mode: bool, noise: PlanNoise,
         discount: torch.Tensor):
    """MPPI for ``B`` environments at once; the same algorithm as :func:`plan_literal`.

    Args:
        z0: ``[B, L]`` encoded observations; task: ``[B]`` long or None;
        prev_mean: ``[B, H, A]``; t0: ``[B]`` bool (episode start: no warm start);
        noise: batched :class:`PlanNoise`; discount: ``[B]`` per-element gamma.
    Returns:
        ``(action [B, A], mean [B, H, A])``.
    """
    b, a_dim = z0.shape[0], model.cfg.action_dim
    h, n, p = cfg.horizon, cfg.num_samples, cfg.num_pi_trajs
    mask = None if task is None else model.action_mask(task)[:, None, :]  # [B, 1, A]
    task_p = None if task is None else task[:, None].expand(b, p)
    task_n = None if task is None else task[:, None].expand(b, n)
    actions = torch.empty(b, h, n, a_dim, dtype=z0.dtype)
    if p > 0:
        z = z0[:, None].expand(b, p, -1)
        for k in range(h):
            actions[:, k, :p] = model.pi(z, task_p, noise.pi_traj[:, k]).action
            if k < h - 1:
                z = model.next(z, actions[:, k, :p], task_p)
    z = z0[:, None].expand(b, n, -1)
    mean = torch.zeros(b, h, a_dim, dtype=z0.dtype)
    warm = ~t0.bool()
    mean[warm, :-1] = prev_mean[warm, 1:]
    std = torch.full((b, h, a_dim), cfg.max_std, dtype=z0.dtype)
    gamma = discount.reshape(b, 1, 1).to(z0.dtype)
    for it in range(cfg.iterations):
        sampled = mean[:, :, None] + std[:, :, None] * noise.sample[:, it]
        actions[:, :, p:] = sampled.clamp(-1, 1)
        if mask is not None:
            actions = actions * mask[:, None]
        value = estimate_value(model, z, actions, task_n, gamma, noise.pi_value[:, it],
                               noise.q_pick[:, it]).nan_to_num(0).squeeze(-1)
        elite_value, elite_actions = _gather_elites(value, actions, cfg.num_elites)
        score = torch.exp(cfg.temperature * (elite_value - elite_value.max(1, True).values))
        score = score / score.sum(1, keepdim=True)  # [B, E]
        w = score[:, None, :, None]
        denom = score.sum(1)[:, None, None] + 1e-9
        mean = (w * elite_actions).sum(2) / denom
        std = ((w * (elite_actions - mean[:, :, None]) ** 2).sum(2) / denom).sqrt()
        std = std.clamp(cfg.min_std, cfg.max_std)
        if mask is not None:
            mean, std = mean * mask, std * mask
    idx = tm.gumbel_argmax(score, noise.gumbel)  # [B]
    action = elite_actions[torch.arange(b), 0, idx]
    if not eval_mode:
        action = action + std[:, 0] * noise.explore
    return action.clamp(-1, 1), mean
