"""Knowledge distillation from a frozen teacher world model into a student (TD-MPC-Opt).

The student trains with the full TD-MPC2 objective (:class:`~tdmpc_opt.training.TDMPC2Learner`)
plus distillation terms, each with its own coefficient (0 switches a term off):

``reward`` (the paper's loss, default 0.45)
    MSE between the student's and the teacher's *decoded* reward for the first transition
    ``(o_0, a_0)`` of each sampled subsequence, the student predicting from its encoding of
    ``o_0`` (exactly what the published TD-MPC-Opt code computes).
``reward_horizon``
    The same MSE at every step ``t`` of the student's latent rollout (its reward head at the
    predicted latent ``z_t`` and action ``a_t``) against the teacher's reward for the real
    ``(o_t, a_t)``, weighted by ``rho**t``. Extends the paper's signal to where planning uses it.
``value``
    Every student Q member at ``(z_t, a_t)`` regressed (two-hot cross-entropy, like TD-MPC2's
    value loss) onto the teacher's mean decoded Q of ``(o_t, a_t)``: value knowledge the
    student's TD targets only learn slowly.
``policy``
    KL(teacher || student) between the Gaussian policy priors (before tanh, task-masked
    dimensions) at the real observations ``o_t`` (each model's own encoding); the student's
    policy sees detached latents and task embeddings, so this term only shapes the policy
    network (its gradient joins the policy step).
``latent``
    MSE between a learned linear projection of the student latent ``z_t`` and the teacher's
    latent of ``o_t`` (the paper's "next-state" variant uses such a projection).
``plan``
    Imagined-rollout distillation (ours): from each sampled ``o_0``, ``plan_samples`` action
    sequences drawn the way MPPI draws them (the data's actions plus Gaussian noise of a
    per-sequence std between the planner's 0.05 and 2, clipped to [-1, 1]) are rolled through
    both models' latent dynamics; at every imagined step the student's decoded reward (MSE)
    and every Q member (two-hot cross-entropy onto the teacher's mean Q) match the teacher's.
    The terms above only see the data's actions, so a student can imitate the teacher on the
    data and still rank the planner's samples badly (then MPPI does worse than its own policy
    prior); this term teaches it the teacher's ranking where the planner searches.

Every teacher target except ``plan``'s is a function of one transition ``(o_t, a_t, task)``, so
they can be computed once per dataset row (:mod:`tdmpc_opt.teacher_cache`); the ``plan`` term
samples new actions each update and runs the frozen teacher live.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt.errors import ConfigError
from tdmpc_opt.train_forward import FusedNets
from tdmpc_opt.training import Batch, Rollout, rho_weights, value_loss
from tdmpc_opt.world_model import WorldModel


@dataclass(frozen=True)
class DistillConfig:
    """Coefficients of the distillation terms (0 disables a term)."""

    reward_coef: float = 0.45
    """The paper's first-step reward MSE (d_coef; 0.4-0.45 was best in the paper)."""
    reward_horizon_coef: float = 0.0
    """Reward MSE at every step of the student's latent rollout (rho-weighted)."""
    value_coef: float = 0.0
    """Two-hot regression of every student Q member onto the teacher's Q."""
    policy_coef: float = 0.0
    """KL(teacher || student) of the Gaussian policy priors."""
    latent_coef: float = 0.0
    """MSE of a learned linear projection of student latents onto teacher latents."""
    latent_lr: float = 3e-4
    """Learning rate of the latent projection."""
    plan_coef: float = 0.0
    """Imagined-rollout distillation of rewards and Q on planner-like action sequences."""
    plan_samples: int = 4
    """Action sequences per sampled start state for the ``plan`` term."""
    plan_min_std: float = 0.05
    """Smallest per-sequence noise std of the ``plan`` term (the planner's ``min_std``)."""
    plan_max_std: float = 2.0
    """Largest per-sequence noise std of the ``plan`` term (the planner's ``max_std``)."""

    def validate(self) -> DistillConfig:
        """Check invariants; returns ``self``."""
        for name in ("reward_coef", "reward_horizon_coef", "value_coef", "policy_coef",
                     "latent_coef", "latent_lr", "plan_coef"):
            value = getattr(self, name)
            if not value >= 0 or value != value or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.plan_samples < 1:
            raise ConfigError(f"plan_samples must be >= 1, got {self.plan_samples}")
        if not 0 < self.plan_min_std <= self.plan_max_std < float("inf"):
            raise ConfigError("plan stds need 0 < plan_min_std <= plan_max_std, got "
                              f"{self.plan_min_std} and {self.plan_max_std}")
        return self

    @property
    def uses_targets(self) -> bool:
        """Whether any term needs the per-transition teacher targets (all but ``plan``)."""
        return any(c > 0 for c in (self.reward_coef, self.reward_horizon_coef, self.value_coef,
                                   self.policy_coef, self.latent_coef))

    @property
    def any_term(self) -> bool:
        """Whether distillation is on at all."""
        return self.uses_targets or self.plan_coef > 0

    @property
    def needs_latent(self) -> bool:
        """Whether teacher latents are needed (only by the latent term)."""
        return self.latent_coef > 0


class TeacherTargets(NamedTuple):
    """The teacher's predictions for ``H`` transitions of ``B`` subsequences (no gradients)."""

    reward: torch.Tensor
    """``[H, B, 1]`` decoded reward of ``(o_t, a_t)``."""
    q: torch.Tensor
    """``[H, B, 1]`` mean decoded Q over the whole ensemble at ``(o_t, a_t)``."""
    pi_mean: torch.Tensor
    """``[H, B, A]`` policy mean before tanh (task-masked)."""
    pi_log_std: torch.Tensor
    """``[H, B, A]`` policy log standard deviation (task-masked)."""
    latent: torch.Tensor | None
    """``[H, B, L_teacher]`` latent of ``o_t`` (only when the latent term is on)."""


def check_compatible(teacher: WorldModel, student: WorldModel) -> None:
    """Teacher and student must share the task set and observation/action sizes.

    Raises:
        ConfigError: they differ (the message says how).
    """
    t, s = teacher.cfg, student.cfg
    if t.tasks != s.tasks:
        raise ConfigError(f"teacher and student have different task sets ({len(t.tasks)} vs "
                          f"{len(s.tasks)} tasks, or another order)")
    if (t.obs_dim, t.action_dim) != (s.obs_dim, s.action_dim):
        raise ConfigError(f"teacher takes obs {t.obs_dim} / action {t.action_dim} but the "
                          f"student obs {s.obs_dim} / action {s.action_dim}")
    if (t.num_bins, t.vmin, t.vmax) != (s.num_bins, s.vmin, s.vmax):
        raise ConfigError("teacher and student use different two-hot bins")


def policy_gaussian(model: WorldModel, z_in: torch.Tensor,
                    mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-tanh mean and log-std ``[..., A]`` of the policy prior on a task-conditioned
    input ``z_in [..., L + task_dim]`` (masked where ``mask`` is 0)."""
    mean, raw = model._pi(z_in).chunk(2, dim=-1)
    log_std = tm.scale_log_std(raw, model.cfg.log_std_min, model.cfg.log_std_max)
    if mask is not None:
        mean, log_std = mean * mask, log_std * mask
    return mean, log_std


@torch.no_grad()
def teacher_targets(teacher: WorldModel, obs: torch.Tensor, action: torch.Tensor,
                    task: torch.Tensor | None, latent: bool = False) -> TeacherTargets:
    """Teacher predictions for transitions ``obs [..., D]``, ``action [..., A]``.

    ``task`` broadcasts to the leading dims (``[B]`` for ``[H, B, D]`` inputs, or per row).
    """
    was_training = teacher.training
    teacher.eval()
    z = teacher.encode(obs, task)
    reward = teacher.decode(teacher.reward(z, action, task))
    q = teacher.decode(teacher.q_logits(z, action, task)).mean(0)
    mask = teacher.action_mask(task)
    if mask is not None:
        mask = mask.expand(*obs.shape[:-1], mask.shape[-1])
    mean, log_std = policy_gaussian(teacher, teacher.with_task(z, task), mask)
    teacher.train(was_training)
    return TeacherTargets(reward, q, mean, log_std, z if latent else None)


# ----------------------------------------------------------------------- loss terms
def paper_reward_loss(student_logits: torch.Tensor, teacher_reward: torch.Tensor,
                      student: WorldModel) -> torch.Tensor:
    """MSE of decoded rewards: student logits ``[B, bins]`` vs teacher ``[B, 1]``."""
    return F.mse_loss(student.decode(student_logits), teacher_reward)


def horizon_reward_loss(student_logits: torch.Tensor, teacher_reward: torch.Tensor,
                        student: WorldModel, rho: float) -> torch.Tensor:
    """rho-weighted mean over steps of the decoded-reward MSE; ``[H, B, bins]`` vs ``[H, B, 1]``."""
    per_step = (student.decode(student_logits) - teacher_reward).pow(2).mean(dim=(1, 2))
    w = rho_weights(rho, per_step.shape[0], per_step.device)
    return (per_step * w).sum() / per_step.shape[0]


def policy_kl_loss(s_mean: torch.Tensor, s_log_std: torch.Tensor, t_mean: torch.Tensor,
                   t_log_std: torch.Tensor, rho: float) -> torch.Tensor:
    """KL(teacher || student) of diagonal Gaussians ``[H, B, A]``, summed over dims,
    averaged over batch, rho-weighted over steps. Masked dims (both log-std 0, means 0)
    contribute 0."""
    var_s, var_t = (2 * s_log_std).exp(), (2 * t_log_std).exp()
    kl = s_log_std - t_log_std + (var_t + (t_mean - s_mean).pow(2)) / (2 * var_s) - 0.5
    per_step = kl.sum(-1).mean(-1)
    w = rho_weights(rho, per_step.shape[0], per_step.device)
    return (per_step * w).sum() / per_step.shape[0]


def latent_projection_loss(projected: torch.Tensor, teacher_latent: torch.Tensor,
                           rho: float) -> torch.Tensor:
    """rho-weighted MSE between projected student latents and teacher latents ``[H, B, L_t]``."""
    per_step = (projected - teacher_latent).pow(2).mean(dim=(1, 2))
    w = rho_weights(rho, per_step.shape[0], per_step.device)
    return (per_step * w).sum() / per_step.shape[0]


def planner_like_actions(action: torch.Tensor, samples: int, min_std: float, max_std: float,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """``[H, S*B, A]`` action sequences around the data's ``action [H, B, A]``.

    Sequence ``k`` of start ``b`` (row ``k * B + b``) is ``clip(a + std_k * eps, -1, 1)`` with a
    log-uniform ``std_k`` in ``[min_std, max_std]`` (MPPI's range) and standard-normal ``eps``;
    ``mask [S*B, A]`` zeroes padded dimensions.
    """
    h, b, a = action.shape
    base = action.repeat(1, samples, 1)
    log_std = torch.empty(samples * b, 1, device=action.device).uniform_(
        math.log(min_std), math.log(max_std))
    out = (base + log_std.exp() * torch.randn_like(base)).clamp(-1, 1)
    return out if mask is None else out * mask


@torch.no_grad()
def imagined_targets(teacher: WorldModel, obs0: torch.Tensor, actions: torch.Tensor,
                     task: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's decoded rewards and mean Q ``[H, N, 1]`` along its own latent rollout of
    ``actions [H, N, A]`` from ``obs0 [N, D]`` (through the fused forward passes)."""
    was_training = teacher.training
    teacher.eval()
    nets = FusedNets(teacher)
    z, rewards, qs = nets.encode(obs0, task), [], []
    for a in actions:
        reward_logits, q_logits = nets.heads(z, a, task)
        rewards.append(teacher.decode(reward_logits))
        qs.append(teacher.decode(q_logits).mean(0))
        z = nets.next(z, a, task)
    teacher.train(was_training)
    return torch.stack(rewards), torch.stack(qs)


def imagined_rollout_loss(student: WorldModel, z0: torch.Tensor, actions: torch.Tensor,
                          task: torch.Tensor | None, t_reward: torch.Tensor, t_q: torch.Tensor,
                          rho: float) -> torch.Tensor:
    """Student side of the ``plan`` term: roll ``z0 [N, L]`` through ``actions [H, N, A]``;
    rho-weighted mean over steps of reward MSE plus Q two-hot cross-entropy against the
    teacher's ``t_reward``, ``t_q [H, N, 1]``. Uses the fused forward passes
    (:class:`~tdmpc_opt.train_forward.FusedNets`: reward and every Q member's first layer in
    one product, the task part as a per-task table)."""
    nets = FusedNets(student)
    z, reward_logits, q_logits = z0, [], []
    for a in actions:
        r, q = nets.heads(z, a, task)
        reward_logits.append(r)
        q_logits.append(q)
        z = nets.next(z, a, task)
    reward_part = horizon_reward_loss(torch.stack(reward_logits), t_reward, student, rho)
    q_part = value_loss(torch.stack(q_logits, dim=1), t_q, rho, student.cfg)
    return reward_part + q_part


# ------------------------------------------------------------------------ distiller
class Distiller:
    """Computes the distillation terms of one update from teacher targets.

    Args:
        student: the student world model (trained by a TDMPC2Learner).
        cfg: coefficients.
        rho: TD-MPC2's temporal weighting (the learner's ``rho``).
        teacher_latent_dim: teacher latent size (needed when the latent term is on).
        teacher: the frozen teacher (needed by the ``plan`` term, which runs it live).
    """

    def __init__(self, student: WorldModel, cfg: DistillConfig, rho: float = 0.5,
                 teacher_latent_dim: int | None = None, teacher: WorldModel | None = None):
        self.student, self.cfg, self.rho = student, cfg.validate(), rho
        if cfg.plan_coef > 0 and teacher is None:
            raise ConfigError("the plan term needs the live teacher")
        self.teacher = teacher
        self.projection = None
        self.projection_optim = None
        if cfg.needs_latent:
            if not teacher_latent_dim:
                raise ConfigError("the latent term needs the teacher's latent size")
            device = next(student.parameters()).device
            self.projection = torch.nn.Linear(student.cfg.latent_dim, teacher_latent_dim,
                                              device=device)
            self.projection_optim = torch.optim.Adam(self.projection.parameters(),
                                                     lr=cfg.latent_lr)

    def losses(self, batch: Batch, ro: Rollout,
               targets: TeacherTargets | None) -> dict[str, tuple[float, torch.Tensor]]:
        """``{name: (coef, loss)}`` of the enabled terms, for ``TDMPC2Learner.update``.

        ``targets`` may be None when only the ``plan`` term is on."""
        c, s = self.cfg, self.student
        out: dict[str, tuple[float, torch.Tensor]] = {}
        if c.plan_coef > 0:
            out["distill_plan"] = (c.plan_coef, self._plan_term(batch, ro))
        if targets is None:
            return out
        if c.reward_coef > 0:
            out["distill_reward"] = (c.reward_coef, paper_reward_loss(
                ro.reward_logits[0], targets.reward[0], s))
        if c.reward_horizon_coef > 0:
            out["distill_reward_horizon"] = (c.reward_horizon_coef, horizon_reward_loss(
                ro.reward_logits, targets.reward, s, self.rho))
        if c.value_coef > 0:
            out["distill_value"] = (c.value_coef, value_loss(
                ro.q_logits, targets.q, self.rho, s.cfg))
        if c.policy_coef > 0:
            out["distill_policy"] = (c.policy_coef, self._policy_term(batch, ro, targets))
        if c.latent_coef > 0:
            if targets.latent is None:
                raise ConfigError("teacher targets lack latents (rebuild the cache with them)")
            out["distill_latent"] = (c.latent_coef, latent_projection_loss(
                self.projection(ro.zs[:-1]), targets.latent, self.rho))
        return out

    def _policy_term(self, batch: Batch, ro: Rollout, targets: TeacherTargets) -> torch.Tensor:
        s, h = self.student, ro.zs.shape[0] - 1
        # the student's own encodings of o_0..o_{H-1}: the policy is matched where the
        # teacher's is, at real observations
        z = torch.cat([ro.zs[:1], ro.next_z[:-1]]).detach()
        task_h = None if batch.task is None else batch.task.expand(h, -1)
        if s.cfg.multitask:
            emb = s.task_embedding(task_h).detach()
            z = torch.cat([z, emb], dim=-1)
        mask = s.action_mask(task_h)
        mean, log_std = policy_gaussian(s, z, mask)
        return policy_kl_loss(mean, log_std, targets.pi_mean, targets.pi_log_std, self.rho)

    def _plan_term(self, batch: Batch, ro: Rollout) -> torch.Tensor:
        c, k = self.cfg, self.cfg.plan_samples
        task = None if batch.task is None else batch.task.repeat(k)
        mask = self.student.action_mask(task)
        actions = planner_like_actions(batch.action, k, c.plan_min_std, c.plan_max_std, mask)
        t_reward, t_q = imagined_targets(self.teacher, batch.obs[0].repeat(k, 1), actions, task)
        z0 = ro.zs[0].repeat(k, 1)
        return imagined_rollout_loss(self.student, z0, actions, task, t_reward, t_q, self.rho)

    def hook(self, targets: TeacherTargets):
        """An ``extra_losses`` callable for :meth:`TDMPC2Learner.update`."""
        return lambda batch, ro: self.losses(batch, ro, targets)

    def after_update(self) -> None:
        """Step the latent projection's optimizer (call after each learner update)."""
        if self.projection_optim is not None:
            self.projection_optim.step()
            self.projection_optim.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        """Projection weights and optimizer (empty when the latent term is off)."""
        if self.projection is None:
            return {}
        return {"projection": self.projection.state_dict(),
                "projection_optim": self.projection_optim.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        if self.projection is not None and state:
            self.projection.load_state_dict(state["projection"])
            self.projection_optim.load_state_dict(state["projection_optim"])
