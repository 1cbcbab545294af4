"""The TD-MPC2 implicit world model for state observations, single-task and multi-task.

Components (module names as in TD-MPC2 checkpoints):
    ``_encoder.state``  obs (+task emb) -> latent z (LN + SimNorm output)
    ``_dynamics``       z, a (+task emb) -> next z (LN + SimNorm output)
    ``_reward``         z, a (+task emb) -> reward logits [num_bins]
    ``_pi``             z (+task emb) -> mean and raw log-std of a squashed Gaussian
    ``_Qs``             z, a (+task emb) -> Q logits for each ensemble member
    ``_target_Qs``      Polyak-averaged copy of ``_Qs`` (not learnable)
    ``_termination``    z (+task emb) -> termination logit (episodic models only)
    ``_task_emb``       task id -> embedding (max norm 1)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt.config import ModelConfig
from tdmpc_opt.layers import QEnsemble, mlp, weight_init


@dataclass
class PolicyOutput:
    """A policy-prior sample. Shapes ``[..., A]`` for actions, ``[..., 1]`` for scalars."""

    action: torch.Tensor
    """tanh-squashed sample, masked to the task's action dimensions."""
    mean: torch.Tensor
    """tanh of the (masked) mean."""
    log_std: torch.Tensor
    """log standard deviation before squashing (masked)."""
    log_prob: torch.Tensor
    """log density of ``action`` (squash-corrected)."""
    scaled_entropy: torch.Tensor
    """-log_prob scaled by the number of active action dimensions (TD-MPC2's entropy term)."""

    def action_and_mean(self) -> torch.Tensor:
        """``[..., 2A]``: the sample and the mean side by side."""
        return torch.cat([self.action, self.mean], dim=-1)


class WorldModel(nn.Module):
    """TD-MPC2 world model. All methods accept arbitrary leading dims ``[...]``.

    ``task`` is a long tensor broadcastable to the leading dims (e.g. ``[B]`` for inputs
    ``[B, D]`` or ``[T, B, D]``), or None for single-task models.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg
        in_za = c.latent_dim + c.action_dim + c.task_dim
        in_z = c.latent_dim + c.task_dim
        bins = max(c.num_bins, 1)
        if c.multitask:
            self._task_emb = nn.Embedding(c.num_tasks, c.task_dim)
            masks = torch.zeros(c.num_tasks, c.action_dim)
            for i, d in enumerate(c.action_dims):
                masks[i, :d] = 1.0
            self.register_buffer("_action_masks", masks, persistent=False)
        enc_hidden = [c.enc_dim] * (c.enc_layers - 1)
        self._encoder = nn.ModuleDict({"state": mlp(c.obs_dim + c.task_dim, enc_hidden,
                                                    c.latent_dim, "simnorm", c.simnorm_dim)})
        self._dynamics = mlp(in_za, [c.mlp_dim] * 2, c.latent_dim, "simnorm", c.simnorm_dim)
        self._reward = mlp(in_za, [c.mlp_dim] * 2, bins)
        self._termination = mlp(in_z, [c.mlp_dim] * 2, 1) if c.episodic else None
        self._pi = mlp(in_z, [c.mlp_dim] * 2, 2 * c.action_dim)
        self._Qs = QEnsemble(c.num_q, in_za, c.mlp_dim, bins, dropout=c.dropout)
        self.apply(weight_init)
        with torch.no_grad():
            self._reward[-1].weight.zero_()
            self._Qs.params[-1].weight.zero_()
        self._target_Qs = copy.deepcopy(self._Qs).requires_grad_(False)

    # ----------------------------------------------------------------- task conditioning
    def task_embedding(self, task: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[..., task_dim]`` of task ids, renormalised to norm <= 1 like
        ``nn.Embedding(max_norm=1)`` but without modifying the stored weights."""
        emb = F.embedding(task.long(), self._task_emb.weight)
        norm = emb.detach().norm(dim=-1, keepdim=True)
        scale = torch.where(norm > 1, 1 / (norm + 1e-7), torch.ones_like(norm))
        return emb * scale

    def with_task(self, x: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Append the task embedding to ``x [..., D]`` (no-op for single-task models)."""
        if not self.cfg.multitask:
            return x
        if task is None:
            raise ValueError("a multi-task model needs a task id")
        emb = self.task_embedding(task)
        while emb.ndim < x.ndim:
            emb = emb.unsqueeze(0)
        return torch.cat([x, emb.expand(*x.shape[:-1], emb.shape[-1])], dim=-1)

    def action_mask(self, task: torch.Tensor | None) -> torch.Tensor | None:
        """Mask ``[..., A]`` of the task's real action dimensions (None for single task)."""
        return self._action_masks[task.long()] if self.cfg.multitask else None

    # ------------------------------------------------------------------------ networks
    def encode(self, obs: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """``obs [..., obs_dim]`` -> latent ``[..., latent_dim]``."""
        return self._encoder["state"](self.with_task(obs, task))

    def next(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Latent dynamics: ``z [..., L], a [..., A]`` -> next latent ``[..., L]``."""
        return self._dynamics(torch.cat([self.with_task(z, task), a], dim=-1))

    def reward(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Reward logits ``[..., num_bins]``."""
        return self._reward(torch.cat([self.with_task(z, task), a], dim=-1))

    def termination(self, z: torch.Tensor, task: torch.Tensor | None) -> torch.Tensor:
        """Termination logit ``[..., 1]`` (episodic models)."""
        if self._termination is None:
            raise ValueError("this model has no termination head (episodic=False)")
        return self._termination(self.with_task(z, task))

    def pi(self, z: torch.Tensor, task: torch.Tensor | None,
           eps: torch.Tensor | None = None) -> PolicyOutput:
        """Sample the policy prior at ``z [..., L]`` with standard-normal noise ``eps [..., A]``
        (drawn with ``torch.randn`` when None)."""
        return self.policy_from_output(self._pi(self.with_task(z, task)), task, eps)

    def policy_from_output(self, raw: torch.Tensor, task: torch.Tensor | None,
                           eps: torch.Tensor | None = None) -> PolicyOutput:
        """The squashed-Gaussian sample of the policy network's output ``raw [..., 2A]``
        (mean and raw log-std), with noise ``eps [..., A]`` (drawn when None)."""
        mean, raw_log_std = raw.chunk(2, dim=-1)
        log_std = tm.scale_log_std(raw_log_std, self.cfg.log_std_min, self.cfg.log_std_max)
        if eps is None:
            eps = torch.randn_like(mean)
        mask = self.action_mask(task)
        if mask is not None:
            mean, log_std, eps = mean * mask, log_std * mask, eps * mask
            active = mask.sum(-1, keepdim=True)
        else:
            active = torch.full_like(mean[..., :1], mean.shape[-1])
        log_prob = tm.gaussian_logprob(eps, log_std)
        scaled_log_prob = log_prob * active
        sample = mean + eps * log_std.exp()
        mean, sample, log_prob = tm.squash(mean, sample, log_prob)
        entropy_scale = scaled_log_prob / (log_prob + 1e-8)
        return PolicyOutput(sample, mean, log_std, log_prob, -log_prob * entropy_scale)

    def q_logits(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None,
                 target: bool = False, members: torch.Tensor | None = None) -> torch.Tensor:
        """Q logits ``[E, ..., num_bins]`` for all (or the selected) ensemble members."""
        net = self._target_Qs if target else self._Qs
        return net(torch.cat([self.with_task(z, task), a], dim=-1), members)

    def q_value(self, z: torch.Tensor, a: torch.Tensor, task: torch.Tensor | None,
                reduce: str = "avg", target: bool = False,
                members: torch.Tensor | None = None) -> torch.Tensor:
        """Decoded Q ``[..., 1]`` of two ensemble members combined by ``avg`` or ``min``.

        ``members`` (long ``[2]``) picks the pair; by default a random pair, as in TD-MPC2.
        """
        if members is None:
            members = torch.randperm(self.cfg.num_q, device=z.device)[:2]
        q = self.decode(self.q_logits(z, a, task, target=target, members=members))
        return q.mean(0) if reduce == "avg" else q.min(0).values

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits ``[..., num_bins]`` -> scalars ``[..., 1]``."""
        c = self.cfg
        return tm.two_hot_inv(logits, c.num_bins, c.vmin, c.vmax)

    # ---------------------------------------------------------------------- training aids
    def learnable_parameters(self) -> int:
        """Number of learnable parameters (target Q-networks excluded)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    @torch.no_grad()
    def soft_update_target_q(self, tau: float) -> None:
        """Polyak update: target <- target + tau * (online - target)."""
        for t, s in zip(self._target_Qs.parameters(), self._Qs.parameters(), strict=True):
            t.lerp_(s, tau)

    def train(self, mode: bool = True) -> WorldModel:
        """Switch train/eval mode; target Q-networks always stay in eval mode."""
        super().train(mode)
        self._target_Qs.train(False)
        return self
