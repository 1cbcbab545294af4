"""The TD-MPC2 update: world-model, value and policy learning from sampled subsequences.

One update (:meth:`TDMPC2Learner.update`) on a batch of ``B`` subsequences of ``H + 1`` steps:

1. TD targets (no gradients, eval mode): ``r_t + gamma * (1 - d_t) * min(Q'_i, Q'_j)(z'_{t+1},
   pi(z'_{t+1}))`` with ``z'_{t+1} = encode(obs_{t+1})`` and two random target-Q members.
2. Latent rollout from ``z_0 = encode(obs_0)`` through the dynamics with the batch's actions.
3. Losses, each weighted by ``rho^t`` over the horizon: joint-embedding consistency (MSE of
   predicted vs encoded next latents), reward and value soft cross-entropy over two-hot bins
   (value: every Q member), optional termination BCE, plus any ``extra_losses`` terms.
4. Gradient clipping, Adam step (encoder learning rate scaled by ``enc_lr_scale``).
5. Policy update on the detached rollout latents: maximise the running-scale-normalised
   average of two random Q members (Q parameters get no gradient) plus scaled entropy.
6. Polyak update of the target Q-networks.

Under ``torchrun`` (see :mod:`tdmpc_opt.distributed`) each rank updates on its own share of the
batch: gradients are averaged before clipping, the running scale sees the whole global batch,
task embeddings are renormalised for every rank's tasks and the metrics are means over ranks,
so all ranks keep identical parameters, optimizer states and scale.

Loss terms are small functions over tensors so that other objectives (distillation) can add
terms through the ``extra_losses`` hook without touching the update.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from tdmpc_opt import distributed, products
from tdmpc_opt import math as tm
from tdmpc_opt.config import MAX_THREADS, ModelConfig
from tdmpc_opt.errors import ConfigError
from tdmpc_opt.train_forward import FusedNets, ModelNets
from tdmpc_opt.world_model import PolicyOutput, WorldModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Training hyperparameters, with TD-MPC2's published defaults."""

    steps: int = 10_000_000
    """Gradient updates (offline) or environment steps (online) of the whole run."""
    batch_size: int = 256
    """Subsequences per update."""
    horizon: int = 3
    """Latent rollout length H; subsequences have H + 1 observations (also the plan horizon)."""
    lr: float = 3e-4
    """Adam learning rate of every part but the encoder."""
    enc_lr_scale: float = 0.3
    """Encoder learning rate as a fraction of ``lr``."""
    grad_clip_norm: float = 20.0
    """Global gradient-norm clip of the model and (separately) of the policy."""
    tau: float = 0.01
    """Polyak rate of the target Q-networks and of the running value scale."""
    rho: float = 0.5
    """Per-step weight decay over the horizon: step t is weighted rho**t."""
    consistency_coef: float = 20.0
    """Weight of the latent consistency loss."""
    reward_coef: float = 0.1
    """Weight of the reward soft cross-entropy."""
    value_coef: float = 0.1
    """Weight of the value (TD) soft cross-entropy."""
    termination_coef: float = 1.0
    """Weight of the termination BCE (episodic models only)."""
    entropy_coef: float = 1e-4
    """Weight of the policy's scaled entropy bonus."""
    discount_denom: float = 5.0
    """Discount heuristic: gamma = (L/denom - 1) / (L/denom) for episode length L ..."""
    discount_min: float = 0.95
    """... clipped below at this value ..."""
    discount_max: float = 0.995
    """... and above at this value."""
    seed: int = 1
    """Seed of the model initialisation, sampling, dropout and environments."""
    eval_freq: int = 50_000
    """Evaluate every this many steps (0: never)."""
    eval_episodes: int = 10
    """Evaluation episodes per task."""
    seed_steps: int | None = None
    """Online: random-action steps before learning; None = max(1000, 5 * episode length)."""
    buffer_size: int = 1_000_000
    """Online: replay capacity in transitions (oldest episodes are dropped beyond it)."""
    checkpoint_freq: int = 50_000
    """Save a resumable checkpoint every this many steps (and at the end)."""
    keep_checkpoints: int = 3
    """Number of newest checkpoints kept in the run directory."""
    log_freq: int = 100
    """Write a metrics row (and refresh the progress bar) every this many steps."""
    threads: int = 0
    """torch intra-op threads; 0 = one per available CPU core."""
    fused: bool = True
    """Compute the forward passes with :class:`~tdmpc_opt.train_forward.FusedNets` (same math,
    less work) instead of the world model's own methods."""
    bf16: bool = False
    """Run the forward passes under ``torch.autocast`` in bfloat16: hidden-layer products in
    bf16; output layers (reward/Q bins, policy), LayerNorm, softmax and losses in float32;
    CPU or CUDA; needs ``fused``. Off by default: it changes the rounding (losses agree with
    float32 to about 1%, tested) for roughly 1.4x the update rate on an AVX-512 CPU."""
    compile: bool = False
    """Compile the model-loss forward (rollout, heads, losses) and the policy objective with
    ``torch.compile`` (inductor): fused elementwise kernels in forward and backward, the same
    random draws as eager mode (``fallback_random``), so the same update to float32 rounding
    (tested). Costs 30-70 s of compilation when a run starts (less with inductor's cache)."""
    pi_grad_to_task_emb: bool = True
    """Multi-task: keep the policy loss's gradient w.r.t. the task embeddings and apply it
    with the next model step, as TD-MPC2 does (its policy optimizer does not own them)."""

    def validate(self) -> TrainConfig:
        """Check invariants; returns ``self``."""
        for name in ("steps", "batch_size", "horizon", "eval_episodes", "buffer_size",
                     "checkpoint_freq", "keep_checkpoints", "log_freq"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("lr", "grad_clip_norm", "discount_denom"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if not (0 < self.tau <= 1 and 0 < self.rho <= 1 and self.enc_lr_scale >= 0):
            raise ConfigError("need 0 < tau <= 1, 0 < rho <= 1 and enc_lr_scale >= 0")
        if not 0 < self.discount_min <= self.discount_max < 1:
            raise ConfigError("need 0 < discount_min <= discount_max < 1")
        if self.bf16 and not self.fused:
            raise ConfigError("bf16=true needs fused=true (the fused forward passes keep the "
                              "output layers in float32)")
        if self.eval_freq < 0 or self.threads < 0 or (self.seed_steps or 0) < 0:
            raise ConfigError("eval_freq, threads and seed_steps must be >= 0")
        if self.threads > MAX_THREADS:
            raise ConfigError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        return self

    def discount(self, episode_length: int) -> float:
        """TD-MPC2's discount for an episode length."""
        return tm.discount_for_episode_length(episode_length, self.discount_denom,
                                              self.discount_min, self.discount_max)


class Batch(NamedTuple):
    """``B`` subsequences of ``H + 1`` steps, time-major."""

    obs: torch.Tensor
    """``[H+1, B, obs_dim]`` observations o_0..o_H."""
    action: torch.Tensor
    """``[H, B, A]`` action a_t taken at o_t."""
    reward: torch.Tensor
    """``[H, B, 1]`` reward r_t received for a_t."""
    terminated: torch.Tensor
    """``[H, B, 1]`` 1.0 where o_{t+1} is terminal."""
    task: torch.Tensor | None
    """``[B]`` long task ids (multi-task models) or None."""


@dataclass
class Rollout:
    """What one update computed before its losses; handed to ``extra_losses`` hooks."""

    zs: torch.Tensor
    """``[H+1, B, L]`` z_0 = encode(o_0), then the dynamics' predictions (with gradients)."""
    next_z: torch.Tensor
    """``[H, B, L]`` encode(o_1..o_H), no gradients (the consistency targets)."""
    reward_logits: torch.Tensor
    """``[H, B, num_bins]`` reward predictions at zs[:-1] and the batch actions."""
    q_logits: torch.Tensor
    """``[Q, H, B, num_bins]`` every Q member at zs[:-1] and the batch actions."""
    td_target: torch.Tensor
    """``[H, B, 1]`` TD targets (no gradients)."""
    termination_logits: torch.Tensor | None = None
    """``[H, B, 1]`` termination logits at zs[1:] (episodic models)."""


ExtraLosses = Callable[[Batch, Rollout], dict[str, tuple[float, torch.Tensor]]]
"""Hook type: ``(batch, rollout) -> {name: (coef, scalar loss)}``; added to the model loss."""


# ------------------------------------------------------------------------- loss terms
def rho_weights(rho: float, steps: int, device=None) -> torch.Tensor:
    """``[steps]`` weights ``rho**t``."""
    return rho ** torch.arange(steps, dtype=torch.float32, device=device)


def consistency_loss(z_pred: torch.Tensor, z_target: torch.Tensor, rho: float) -> torch.Tensor:
    """sum_t rho^t * MSE(z_pred[t], z_target[t]) / H for ``[H, B, L]`` inputs."""
    h = z_pred.shape[0]
    mse = (z_pred - z_target).pow(2).mean(dim=(1, 2))
    return (mse * rho_weights(rho, h, mse.device)).sum() / h


def reward_loss(logits: torch.Tensor, reward: torch.Tensor, rho: float,
                cfg: ModelConfig) -> torch.Tensor:
    """sum_t rho^t * mean_B soft-CE(logits[t], reward[t]) / H; ``[H,B,K]``, ``[H,B,1]``."""
    h = logits.shape[0]
    ce = tm.soft_ce(logits, reward, cfg.num_bins, cfg.vmin, cfg.vmax).mean(dim=(1, 2))
    return (ce * rho_weights(rho, h, ce.device)).sum() / h


def value_loss(q_logits: torch.Tensor, td_target: torch.Tensor, rho: float,
               cfg: ModelConfig) -> torch.Tensor:
    """sum_{q,t} rho^t * mean_B soft-CE(q_logits[q, t], td_target[t]) / (H * Q).

    ``q_logits [Q, H, B, K]``, ``td_target [H, B, 1]``; the two-hot target is built once.
    """
    num_q, h = q_logits.shape[:2]
    target = tm.two_hot(td_target, cfg.num_bins, cfg.vmin, cfg.vmax)  # [H, B, K]
    ce = -(target * F.log_softmax(q_logits, dim=-1)).sum(-1).mean(-1)  # [Q, H]
    return (ce * rho_weights(rho, h, ce.device)).sum() / (h * num_q)


def termination_loss(logits: torch.Tensor, terminated: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy of termination logits ``[H, B, 1]``."""
    return F.binary_cross_entropy_with_logits(logits, terminated)


def policy_loss(q: torch.Tensor, scaled_entropy: torch.Tensor, rho: float,
                entropy_coef: float) -> torch.Tensor:
    """mean_t rho^t * -mean_B(entropy_coef * scaled_entropy + q); inputs ``[H+1, B, 1]``.

    ``q`` is already divided by the running scale.
    """
    per_step = -(entropy_coef * scaled_entropy + q).mean(dim=(1, 2))
    return (per_step * rho_weights(rho, q.shape[0], q.device)).mean()


class RunningScale:
    """TD-MPC2's running trimmed scale: an EMA of the 5-95 percentile range (at least 1)."""

    def __init__(self, tau: float, device=None):
        self.tau = tau
        self.value = torch.ones(1, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Move towards ``max(p95 - p5, 1)`` of ``x [N, ...]`` (percentiles over dim 0)."""
        q = torch.tensor([0.05, 0.95], dtype=x.dtype, device=x.device)
        p = torch.quantile(x.detach().flatten(1), q, dim=0, interpolation="linear")
        self.value.lerp_(torch.clamp(p[1] - p[0], min=1.0).reshape(-1)[:1], self.tau)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.value

    def state_dict(self) -> dict:
        return {"value": self.value.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.value.copy_(state["value"])


# --------------------------------------------------------------------------- learner
class TDMPC2Learner:
    """Owns the optimizers and running scale of a :class:`WorldModel` and updates it.

    Args:
        model: the world model (trained in place; its device is used).
        cfg: hyperparameters.
    """

    def __init__(self, model: WorldModel, cfg: TrainConfig):
        self.model, self.cfg = model, cfg.validate()
        self.device = next(model.parameters()).device
        m, lr = model, cfg.lr
        groups = [{"params": list(m._encoder.parameters()), "lr": lr * cfg.enc_lr_scale},
                  {"params": list(m._dynamics.parameters())},
                  {"params": list(m._reward.parameters())},
                  {"params": list(m._termination.parameters()) if m._termination else []},
                  {"params": list(m._Qs.parameters())},
                  {"params": list(m._task_emb.parameters()) if m.cfg.multitask else []}]
        # fused Adam: the same update in one kernel per group (5x faster than foreach on a CPU)
        self.optim = torch.optim.Adam(groups, lr=lr, fused=True)
        self.pi_optim = torch.optim.Adam(m._pi.parameters(), lr=lr, eps=1e-5, fused=True)
        self._model_params = [p for g in groups for p in g["params"]]
        # what the policy loss reaches: the policy, and the task embeddings (their gradient
        # waits for the next model step, so it must be the same on every rank)
        self._pi_params = list(m._pi.parameters()) + (
            list(m._task_emb.parameters()) if m.cfg.multitask else [])
        self.scale = RunningScale(cfg.tau, self.device)
        self.nets = FusedNets(model) if cfg.fused else ModelNets(model)
        lengths = m.cfg.episode_lengths or (500,)
        self.discounts = torch.tensor([cfg.discount(n) for n in lengths], device=self.device)
        self.step = 0
        if cfg.bf16 and not products.native("bf16", self.device):
            log.warning("bf16=true: this CPU has no native bfloat16 matrix products (they need "
                        "AVX512-BF16 or AMX), so updates run several times slower than in "
                        "float32 (measured 10x on an AVX2 CPU); leave bf16 off here")
        self._losses_fn = self._rollout_and_losses
        self._pi_fn = self._pi_objective
        if cfg.compile:
            # inductor's pattern matcher fails on this graph in torch 2.13 ("Not all inputs to
            # pattern found"); the fusions that matter here do not need it
            opts = {"pattern_matcher": False, "fallback_random": True}
            self._losses_fn = torch.compile(self._losses_fn, dynamic=False, options=opts)
            self._pi_fn = torch.compile(self._pi_fn, dynamic=False, options=opts)

    def autocast(self):
        """The mixed-precision context of the forward passes (disabled unless ``cfg.bf16``)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def discount(self, task: torch.Tensor | None) -> torch.Tensor:
        """Per-sequence discount ``[B, 1]`` (multi-task) or a scalar tensor."""
        if task is None:
            return self.discounts[0]
        return self.discounts[task].unsqueeze(-1)

    # ------------------------------------------------------------------ pieces
    @torch.no_grad()
    def renorm_task_embeddings(self, task: torch.Tensor | None) -> None:
        """Rescale the used embedding rows to norm <= 1 in place, as ``nn.Embedding(max_norm=1)``
        does on every lookup in TD-MPC2 (keeps gradients and stored weights identical)."""
        if task is None or not self.model.cfg.multitask:
            return
        w = self.model._task_emb.weight
        rows = torch.unique(task)
        norm = w[rows].norm(dim=-1, keepdim=True)
        w[rows] = torch.where(norm > 1, w[rows] / (norm + 1e-7), w[rows])

    @torch.no_grad()
    def td_target(self, next_z: torch.Tensor, reward: torch.Tensor, terminated: torch.Tensor,
                  task: torch.Tensor | None) -> torch.Tensor:
        """``r + gamma * (1 - d) * min of two target Q members at (z', pi(z'))``, ``[H, B, 1]``."""
        h, m = next_z.shape[0], self.model
        task_h = None if task is None else task.expand(h, -1)
        action = self.nets.pi(next_z, task_h).action
        members = torch.randperm(m.cfg.num_q, device=next_z.device)[:2]
        q = m.decode(self.nets.q_members(next_z, action, task_h, members, target=True))
        return reward + self.discount(task) * (1 - terminated) * q.min(0).values

    def rollout(self, batch: Batch) -> Rollout:
        """TD targets (eval mode, no grad), then the latent rollout and heads (train mode)."""
        m, nets, h = self.model, self.nets, batch.action.shape[0]
        task_h = None if batch.task is None else batch.task.expand(h, -1)
        m.eval()
        with torch.no_grad():
            next_z = nets.encode(batch.obs[1:], task_h)
            target = self.td_target(next_z, batch.reward, batch.terminated, batch.task)
        m.train()
        z = nets.encode(batch.obs[0], batch.task)
        zs = [z]
        for t in range(h):
            z = nets.next(z, batch.action[t], batch.task)
            zs.append(z)
        zs_t = torch.stack(zs)
        reward_logits, q_logits = nets.heads(zs_t[:-1], batch.action, task_h)
        term = None
        if m.cfg.episodic:  # a small head: all float32, like the other output layers
            with torch.autocast(self.device.type, enabled=False):
                term = m.termination(zs_t[1:], task_h)
        return Rollout(zs_t, next_z, reward_logits, q_logits, target, term)

    def _rollout_and_losses(self, batch: Batch) -> tuple[Rollout, dict[str, torch.Tensor]]:
        """The rollout and the model loss terms: the part of an update that ``compile`` fuses."""
        ro = self.rollout(batch)
        return ro, self.model_losses(batch, ro)

    def model_losses(self, batch: Batch, ro: Rollout) -> dict[str, torch.Tensor]:
        """The four TD-MPC2 model loss terms (unweighted scalars)."""
        c, mc = self.cfg, self.model.cfg
        losses = {
            "consistency": consistency_loss(ro.zs[1:], ro.next_z, c.rho),
            "reward": reward_loss(ro.reward_logits, batch.reward, c.rho, mc),
            "value": value_loss(ro.q_logits, ro.td_target, c.rho, mc),
        }
        if ro.termination_logits is not None:
            losses["termination"] = termination_loss(ro.termination_logits, batch.terminated)
        return losses

    def loss_coefs(self) -> dict[str, float]:
        """Coefficients of the built-in loss terms."""
        c = self.cfg
        return {"consistency": c.consistency_coef, "reward": c.reward_coef,
                "value": c.value_coef, "termination": c.termination_coef}

    def detached_q(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None,
                   members: torch.Tensor) -> torch.Tensor:
        """Average decoded Q ``[..., 1]`` of ``members`` with the Q parameters detached:
        gradients reach ``z`` and ``a`` (the policy) but never the Q-networks."""
        logits = self.nets.q_members(z, a, task, members, detach=True)
        return self.model.decode(logits).mean(0)

    def _pi_objective(self, zs: torch.Tensor, task_h: torch.Tensor | None
                      ) -> tuple[torch.Tensor, PolicyOutput]:
        """Average Q ``[H+1, B, 1]`` of two random members at ``(zs, pi(zs))`` (Q parameters
        detached) and the policy's output: the differentiable part of the policy step."""
        out = self.nets.pi(zs, task_h)
        members = torch.randperm(self.model.cfg.num_q, device=zs.device)[:2]
        return self.detached_q(zs, out.action, task_h, members), out

    def update_pi(self, zs: torch.Tensor, task: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One policy step on detached latents ``zs [H+1, B, L]``."""
        task_h = None if task is None else task.expand(zs.shape[0], -1)
        with self.autocast():
            q, out = self._pi_fn(zs, task_h)
        self.scale.update(distributed.gather_rows(q[0]))
        loss = policy_loss(self.scale(q), out.scaled_entropy, self.cfg.rho,
                           self.cfg.entropy_coef)
        loss.backward()
        distributed.all_reduce_grads(self._pi_params)
        norm = torch.nn.utils.clip_grad_norm_(self.model._pi.parameters(),
                                              self.cfg.grad_clip_norm)
        self.pi_optim.step()
        self.pi_optim.zero_grad(set_to_none=True)
        if not self.cfg.pi_grad_to_task_emb and self.model.cfg.multitask:
            self.model._task_emb.weight.grad = None
        return {"pi_loss": loss.detach(), "pi_grad_norm": norm,
                "pi_entropy": (-out.log_prob).detach().mean(),
                "pi_scaled_entropy": out.scaled_entropy.detach().mean(),
                "pi_scale": self.scale.value[0].clone()}

    # ------------------------------------------------------------------ update
    def update(self, batch: Batch, extra_losses: ExtraLosses | None = None) -> dict[str, float]:
        """One full TD-MPC2 update; returns float metrics (losses, grad norms, scale).

        ``extra_losses(batch, rollout)`` may return ``{name: (coef, loss)}`` terms that are
        added to the model loss as ``coef * loss`` and logged as ``<name>_loss``.
        """
        tasks = batch.task
        if tasks is not None and self.model.cfg.multitask:
            tasks = distributed.union_ids(tasks, self.model.cfg.num_tasks)
        self.renorm_task_embeddings(tasks)
        with self.autocast():
            ro, losses = self._losses_fn(batch)
        coefs = self.loss_coefs()
        total = sum(coefs[k] * v for k, v in losses.items())
        if extra_losses is not None:
            for name, (coef, value) in extra_losses(batch, ro).items():
                losses[name] = value
                total = total + coef * value
        total.backward()
        distributed.all_reduce_grads(self._model_params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self._model_params, self.cfg.grad_clip_norm)
        self.optim.step()
        self.optim.zero_grad(set_to_none=True)
        self.renorm_task_embeddings(tasks)
        info = self.update_pi(ro.zs.detach(), batch.task)
        self.model.soft_update_target_q(self.cfg.tau)
        self.model.eval()
        self.step += 1
        info.update({f"{k}_loss": v.detach() for k, v in losses.items()})
        info.update(total_loss=total.detach(), grad_norm=grad_norm)
        if distributed.is_active():  # means over ranks: the global batch's losses
            mean = distributed.average(torch.stack([v.float() for v in info.values()]))
            info = dict(zip(info, mean, strict=True))
        return {k: float(v) for k, v in info.items()}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: model, optimizers, scale, step and any
        gradient carried into the next step."""
        pending = {n: p.grad.clone() for n, p in self.model.named_parameters()
                   if p.grad is not None}
        return {"model": self.model.state_dict(), "optim": self.optim.state_dict(),
                "pi_optim": self.pi_optim.state_dict(), "scale": self.scale.state_dict(),
                "step": self.step, "pending_grads": pending}

    def load_state_dict(self, state: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optim.load_state_dict(state["optim"])
        self.pi_optim.load_state_dict(state["pi_optim"])
        self.scale.load_state_dict(state["scale"])
        self.step = int(state["step"])
        params = dict(self.model.named_parameters())
        for p in params.values():
            p.grad = None
        for name, grad in state.get("pending_grads", {}).items():
            params[name].grad = grad.clone().to(self.device)
