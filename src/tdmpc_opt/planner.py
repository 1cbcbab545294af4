"""MPPI planning in the latent space of a TD-MPC2 world model.

Every random number one planning step uses is drawn up front into a :class:`PlanNoise`, per
batch element, from that element's own generator. This makes an episode reproducible on its own
whatever else is planned in the same batch, lets two implementations be compared on identical
noise, and lets an exported planner replay PyTorch's noise.

:func:`plan_literal` is TD-MPC2's algorithm written as plainly as possible for one environment;
:func:`plan` is the batched implementation used everywhere else. Tests hold them equal (float32,
1e-5). :func:`plan` computes the same thing with less work: it plans through a
:class:`~tdmpc_opt.fast_model.FastWorldModel` (task parts of first layers precomputed, only the
picked Q members, optional bf16/int8 products); the start latent's share of the first products
is computed once per step; the policy trajectories, whose start and actions do not change
between iterations, are rolled out once (in the first iteration's products with its sampled
sequences, except with int8 reference-row codes), and only their bootstrap value is recomputed
per iteration. With ``+compile`` a whole step is one compiled graph. :class:`GraphPlanner`
replays it from CUDA graphs on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.fast_model import FastWorldModel, fast_view
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
    h, n, p, dev = cfg.horizon, cfg.num_samples, cfg.num_pi_trajs, obs.device
    t = None if task is None else torch.tensor([task], device=dev)
    mask = model.action_mask(t)
    z0 = model.encode(obs.unsqueeze(0), t)
    # 1. trajectories from the policy prior
    pi_actions = torch.empty(h, p, model.cfg.action_dim, device=dev)
    z = z0.repeat(p, 1)
    for k in range(h):
        pi_actions[k] = model.pi(z, t, noise.pi_traj[k]).action
        if k < h - 1:
            z = model.next(z, pi_actions[k], t)
    # 2. MPPI iterations
    z = z0.repeat(n, 1)
    mean = torch.zeros(h, model.cfg.action_dim, device=dev)
    std = torch.full((h, model.cfg.action_dim), cfg.max_std, device=dev)
    if not t0:
        mean[:-1] = prev_mean[1:]
    actions = torch.empty(h, n, model.cfg.action_dim, device=dev)
    actions[:, :p] = pi_actions
    for it in range(cfg.iterations):
        sampled = (mean.unsqueeze(1) + std.unsqueeze(1) * noise.sample[it]).clamp(-1, 1)
        actions[:, p:] = sampled
        if mask is not None:
            actions = actions * mask
        # value of each sequence: discounted model rewards + bootstrap Q at the horizon
        g, disc, zz = torch.zeros(n, 1, device=dev), 1.0, z
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
CPU_ROWS = 1024
"""On a CPU, :func:`plan` takes elements in chunks of at most this many sampled sequences per
thread: larger activations fall out of a core's L2 cache and make every elementwise pass
memory-bound (measured: 1.4x slower per environment at 4096 rows on one core). Results are
the same either way: elements never interact."""


@dataclass
class _StepState:
    """What the MPPI iterations of one planning step share (``B`` elements).

    ``S = N - P`` sampled sequences per element; latents in the view's internal layout.
    """

    rows: torch.Tensor
    """``[B]`` task-table rows."""
    mask: torch.Tensor | None
    """``[B, A]`` action masks (None for single-task models)."""
    bias: torch.Tensor
    """``[2, H, B, D]`` dynamics/reward first-layer bias (task part included); step 0
    also holds the start latent's part."""
    weights: torch.Tensor
    """``[H, B, 1]`` discount^k."""
    disc_h: torch.Tensor
    """``[B, 1]`` discount^H, the weight of the bootstrap value."""
    z0: torch.Tensor
    """``[B, L]`` the start latent (internal layout)."""
    z_h: torch.Tensor
    """``[B, N, L]`` latents at the horizon; the policy rows ``[:, :P]`` are filled by the
    first iteration."""
    g_pi: torch.Tensor
    """``[B, P]`` discounted model return of the policy trajectories (first iteration on)."""
    actions: torch.Tensor
    """``[B, H, N, A]`` action sequences; the policy rows ``[:, :, :P]`` are filled by the
    first iteration."""


def _prepare(fm: FastWorldModel, cfg: PlannerConfig, z0: torch.Tensor, task: torch.Tensor | None,
             discount: torch.Tensor) -> _StepState:
    """Per-step constants: task rows, masks, first-layer biases, discount weights."""
    b, h, n, p = z0.shape[0], cfg.horizon, cfg.num_samples, cfg.num_pi_trajs
    rows = fm.task_rows(task, b)
    gamma = discount.reshape(b, 1).to(torch.float32)
    weights, d = [], torch.ones_like(gamma)
    for _ in range(h):
        weights.append(d)
        d = d * gamma
    z0 = fm.to_internal(z0)
    bias = torch.stack([fm.dyn1["task"][rows], fm.rew1["task"][rows]])[:, None].repeat(1, h, 1, 1)
    bias[0, 0] += fm.dyn1["z"](z0).float()                 # every sequence starts at z0
    bias[1, 0] += fm.rew1["z"](z0).float()
    return _StepState(rows, fm.mask(task), bias, torch.stack(weights), d, z0,
                      torch.empty(b, n, fm.cfg.latent_dim, dtype=fm.dtype, device=z0.device),
                      torch.zeros(b, p, device=z0.device),
                      torch.empty(b, h, n, fm.cfg.action_dim, device=z0.device))


def _rollout(fm: FastWorldModel, st: _StepState, actions: torch.Tensor,
             pi_traj: torch.Tensor | None = None):
    """Latent rollout of sequences ``actions [B, H, R, A]`` from the start latent.

    With ``pi_traj [B, H, P, A]`` (the first iteration) the first ``P`` rows are the policy
    trajectories: their actions are drawn from the policy prior at each step (and written into
    ``actions``) and rolled out with the others, in the same products.
    Returns ``(z_H [B*R, L], discounted model return [B, R])``.
    """
    b, h, r, _ = actions.shape
    p = 0 if pi_traj is None else pi_traj.shape[2]
    z, logits = None, []
    for k in range(h):
        if p > 0:
            z_pi = st.z0[:, None].expand(b, p, -1) if z is None else z.view(b, r, -1)[:, :p]
            actions[:, k, :p] = fm.policy(z_pi, st.rows, pi_traj[:, k], st.mask)
        z, rew = fm.dyn_rew(fm.first_layers(actions[:, k], st.bias[:, k], z), b)
        logits.append(rew)
    return z, (fm.decode_outputs(logits, [fm.rew3] * h).view(h, b, r) * st.weights).sum(0)


def _policy_rollout(fm: FastWorldModel, st: _StepState, eps: torch.Tensor) -> None:
    """Roll the ``P`` policy trajectories out alone (noise ``eps [B, H, P, A]``), filling
    their rows of ``st.actions`` and ``st.z_h`` and ``st.g_pi``."""
    b, _, p, _ = eps.shape
    if p == 0:
        return
    z_pi, st.g_pi = _rollout(fm, st, st.actions[:, :, :p], eps)
    st.z_h[:, :p] = z_pi.view(b, p, -1)


def _value(fm: FastWorldModel, st: _StepState, sampled: torch.Tensor, pi_noise: torch.Tensor,
           q_pick: torch.Tensor, pi_traj: torch.Tensor | None = None) -> torch.Tensor:
    """Values ``[B, N]`` (policy rows first) of this iteration's sequences.

    ``sampled [B, H, S, A]``, ``pi_noise [B, N, A]``, ``q_pick [B, Q]``; ``pi_traj [B, H, P,
    A]`` when this (first) iteration rolls the policy trajectories out with the sampled
    sequences and keeps their returns and final latents (they do not change: same start, same
    actions); otherwise ``st`` holds those and only the sampled rows are rolled out.
    """
    b, _, s, _ = sampled.shape
    p = st.g_pi.shape[1]
    if pi_traj is not None:
        z, g = _rollout(fm, st, st.actions, pi_traj)
        st.z_h = z.view(b, p + s, -1)
        st.g_pi = g[:, :p]
    else:
        z_s, g_s = _rollout(fm, st, sampled)
        st.z_h[:, p:] = z_s.view(b, s, -1)
        g = torch.cat([st.g_pi, g_s], 1)
    a_last = fm.policy(st.z_h, st.rows, pi_noise, st.mask)
    q = fm.q_average(st.z_h, a_last, st.rows, q_pick)
    return (g + st.disc_h * q).nan_to_num(0)


def _gather_elites(value: torch.Tensor, actions: torch.Tensor, k: int):
    """Top-``k`` values ``[B, k]`` and their action sequences ``[B, H, k, A]``."""
    elite_value, idx = torch.topk(value, k, dim=1)
    index = idx[:, None, :, None].expand(-1, actions.shape[1], -1, actions.shape[3])
    return elite_value, torch.gather(actions, 2, index)


def _refit(cfg: PlannerConfig, value: torch.Tensor, actions: torch.Tensor,
           mask: torch.Tensor | None):
    """New sampling mean/std ``[B, H, A]`` from the elites; also returns their scores
    ``[B, E]`` and sequences ``[B, H, E, A]``."""
    elite_value, elite_actions = _gather_elites(value, actions, cfg.num_elites)
    score = torch.exp(cfg.temperature * (elite_value - elite_value.max(1, True).values))
    score = score / score.sum(1, keepdim=True)
    w = score[:, None, :, None]
    denom = score.sum(1)[:, None, None] + 1e-9
    mean = (w * elite_actions).sum(2) / denom
    std = ((w * (elite_actions - mean[:, :, None]) ** 2).sum(2) / denom).sqrt()
    std = std.clamp(cfg.min_std, cfg.max_std)
    if mask is not None:
        mean, std = mean * mask[:, None], std * mask[:, None]
    return mean, std, score, elite_actions


def _iteration(fm: FastWorldModel, cfg: PlannerConfig, st: _StepState, mean: torch.Tensor,
               std: torch.Tensor, sample: torch.Tensor, pi_noise: torch.Tensor,
               q_pick: torch.Tensor, pi_traj: torch.Tensor | None = None):
    """One MPPI iteration: sample ``[B, H, S, A]`` sequences around ``mean``/``std``
    ``[B, H, A]``, value them with the policy rows, refit (see :func:`_refit`);
    ``pi_traj``: the first iteration's policy-trajectory noise (see :func:`_value`)."""
    sampled = (mean[:, :, None] + std[:, :, None] * sample).clamp_(-1, 1)
    if st.mask is not None:
        sampled.mul_(st.mask[:, None, None])
    st.actions[:, :, cfg.num_pi_trajs:] = sampled
    value = _value(fm, st, sampled, pi_noise, q_pick, pi_traj)
    return _refit(cfg, value, st.actions, st.mask)


def _search(fm: FastWorldModel, cfg: PlannerConfig, st: _StepState, mean: torch.Tensor,
            std: torch.Tensor, noise: PlanNoise, pi_traj: torch.Tensor | None):
    """All MPPI iterations (:func:`_iteration`) from ``mean``/``std`` ``[B, H, A]`` with the
    step's ``noise``; given ``pi_traj``, the first also rolls out the policy trajectories
    (otherwise ``st`` already holds them). Returns the last refit."""
    for it in range(cfg.iterations):
        mean, std, score, elite_actions = _iteration(
            fm, cfg, st, mean, std, noise.sample[:, it], noise.pi_value[:, it],
            noise.q_pick[:, it], pi_traj if it == 0 else None)
    return mean, std, score, elite_actions


@torch.no_grad()
def plan(model: WorldModel | FastWorldModel, cfg: PlannerConfig, z0: torch.Tensor,
         task: torch.Tensor | None, prev_mean: torch.Tensor, t0: torch.Tensor, eval_mode: bool,
         noise: PlanNoise, discount: torch.Tensor, precision: str = "fp32"):
    """MPPI for ``B`` environments at once; the same algorithm as :func:`plan_literal`.

    Args:
        model: a world model (its cached :func:`fast_view` for ``precision`` is used) or a
            :class:`FastWorldModel`; z0: ``[B, L]`` encoded observations; task: ``[B]`` long
            or None; prev_mean: ``[B, H, A]``; t0: ``[B]`` bool (episode start: no warm
            start); noise: batched :class:`PlanNoise`; discount: ``[B]`` per-element gamma;
        precision: ``fp32`` (exact, default), ``bf16`` or ``int8``, optionally with
            ``+compile`` (see :func:`~tdmpc_opt.fast_model.parse_precision`).
    Returns:
        ``(action [B, A], mean [B, H, A])``.
    """
    fm = model if isinstance(model, FastWorldModel) else fast_view(model, precision)
    # with +compile one graph for both modes: per-step constants, all iterations and the pick
    # (1M model, batch 1, two CPU threads: ~1.5 ms per plan less than two graphs with glue)
    run = fm.compiled("plan", _plan) if fm.compile else _plan
    b = z0.shape[0]
    chunk = max(1, CPU_ROWS * torch.get_num_threads() // cfg.num_samples)
    if z0.device.type == "cpu" and b > chunk:  # keep each chunk's activations in cache
        parts = [run(fm, cfg, z0[i:i + chunk], None if task is None else task[i:i + chunk],
                     prev_mean[i:i + chunk], t0[i:i + chunk], noise[i:i + chunk],
                     discount[i:i + chunk]) for i in range(0, b, chunk)]
        action, std0, mean = (torch.cat(x) for x in zip(*parts, strict=True))
    else:
        action, std0, mean = run(fm, cfg, z0, task, prev_mean, t0, noise, discount)
    if not eval_mode:
        action = action + std0 * noise.explore
    return action.clamp(-1, 1), mean


def _plan(fm: FastWorldModel, cfg: PlannerConfig, z0: torch.Tensor, task: torch.Tensor | None,
          prev_mean: torch.Tensor, t0: torch.Tensor, noise: PlanNoise, discount: torch.Tensor):
    """:func:`plan` for one chunk of elements, before exploration noise and clamping:
    ``(picked elite's first action [B, A], first-step std [B, A], mean [B, H, A])``."""
    b, a_dim, h = z0.shape[0], fm.cfg.action_dim, cfg.horizon
    st = _prepare(fm, cfg, z0, task, discount)
    # int8 reference-row codes take each environment's first row of a product as the
    # reference for the others: rolling the policy trajectories out alone keeps the references
    # (and the codes whose scores docs/quantization.md records) as they were measured
    pi_traj = None if fm.ref_codes else noise.pi_traj       # else: with the first iteration
    if pi_traj is None:
        _policy_rollout(fm, st, noise.pi_traj)
    shifted = F.pad(prev_mean[:, 1:].to(torch.float32), (0, 0, 0, 1))
    mean = torch.where(t0.bool().reshape(b, 1, 1), torch.zeros_like(shifted), shifted)
    std = torch.full((b, h, a_dim), cfg.max_std, device=z0.device)
    mean, std, score, elite_actions = _search(fm, cfg, st, mean, std, noise, pi_traj)
    idx = tm.gumbel_argmax(score, noise.gumbel)  # [B]
    return elite_actions[torch.arange(b, device=z0.device), 0, idx], std[:, 0], mean


# ------------------------------------------------------------------------ CUDA graphs
class GraphPlanner:
    """:func:`plan` replayed from CUDA graphs, one per (batch size, eval mode, task or not).

    On a GPU every step of a TD-MPC2 plan is a small kernel, so launching them dominates; a
    captured graph replays all of them at once. Inputs are copied into static buffers, the
    graph replays, outputs are cloned. The view it plans with never reads tensor values on the
    host (``sync_free``), as capture requires. On a CPU it calls :func:`plan` with that same
    view, so the graph's code path is testable anywhere.
    """

    def __init__(self, model: WorldModel, cfg: PlannerConfig, precision: str = "fp32",
                 warmup: int = 2):
        self.fm = FastWorldModel(model, precision)
        self.fm.sync_free = True
        self.cfg, self.warmup = cfg, warmup
        self.graphs: dict[tuple, tuple] = {}

    def __call__(self, z0: torch.Tensor, task: torch.Tensor | None, prev_mean: torch.Tensor,
                 t0: torch.Tensor, eval_mode: bool, noise: PlanNoise, discount: torch.Tensor):
        """Same arguments and results as :func:`plan` (less the model, config, precision)."""
        if z0.device.type != "cuda":
            return plan(self.fm, self.cfg, z0, task, prev_mean, t0, eval_mode, noise, discount)
        inputs = [z0, task, prev_mean, t0, discount,
                  *(getattr(noise, f.name) for f in fields(noise))]
        key = (z0.shape[0], eval_mode, task is None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs, eval_mode)
        graph, static, outputs = self.graphs[key]
        for dst, src in zip(static, inputs, strict=True):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    def _capture(self, inputs: list, eval_mode: bool) -> tuple:
        static = [None if x is None else x.clone() for x in inputs]
        z0, task, prev_mean, t0, discount, *rest = static
        noise = PlanNoise(*rest)

        def run():
            return plan(self.fm, self.cfg, z0, task, prev_mean, t0, eval_mode, noise, discount)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = run()
        return graph, static, outputs
