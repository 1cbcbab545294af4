"""The acting agent: a world model, an MPPI planner (or the policy prior) and per-episode state.

>>> from tdmpc_opt import load_agent
>>> agent = load_agent("tdmpc-opt-mt30-1M-fp16.pt", device="cpu")
>>> action = agent.act(obs, task="walker-walk", t0=True)            # one observation
>>> actions = agent.act(obs_batch, task=task_ids, t0=starts)        # [B, obs] at once
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from tdmpc_opt import math as tm
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.errors import ConfigError, InputError, TaskError
from tdmpc_opt.fast_model import fast_view, parse_precision
from tdmpc_opt.planner import draw_noise, plan
from tdmpc_opt.world_model import WorldModel


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cpu``, ``cuda`` and ``cuda:N`` are
    checked against this machine (:class:`ConfigError` for anything else or unavailable)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch is built without CUDA" if torch.version.cuda is None \
                else "no CUDA device is visible"
            raise ConfigError(f"device {str(device)!r}: {why}; use cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {str(device)!r}: this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ConfigError(f"device {str(device)!r}: tdmpc-opt runs on cpu or cuda")
    return dev


class Agent:
    """Acts with a TD-MPC2 world model.

    Keeps one warm-start plan per batch slot; ``t0`` marks slots whose episode just began.
    """

    def __init__(self, model: WorldModel, planner: PlannerConfig | None = None,
                 device: str | torch.device = "cpu", info: dict | None = None,
                 precision: str = "fp32"):
        try:
            parse_precision(precision)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.precision = precision
        """Planner precision: fp32 (default, exact), bf16 or int8, optionally +compile."""
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.planner = (planner or PlannerConfig()).validate()
        self.info = info or {}
        lengths = model.cfg.episode_lengths or (500,)
        self.discounts = torch.tensor([tm.discount_for_episode_length(n) for n in lengths],
                                      device=self.device)
        self._prev_mean: torch.Tensor | None = None

    @property
    def cfg(self):
        """The world model's :class:`~tdmpc_opt.config.ModelConfig`."""
        return self.model.cfg

    @property
    def layers(self) -> str:
        """How the planner computes the model's hidden layers here (the
        :attr:`~tdmpc_opt.fast_model.FastWorldModel.layers` of its view); without MPPI the
        policy prior acts through the float32 model and no view is built."""
        if not self.planner.mpc:
            return f"fp32 on {self.device.type}: the policy prior's float32 model, no planning"
        return fast_view(self.model, self.precision).layers

    def with_planner(self, **changes) -> Agent:
        """A new agent sharing this model with planner settings changed."""
        return Agent(self.model, dataclasses.replace(self.planner, **changes), self.device,
                     self.info, self.precision)

    # ----------------------------------------------------------------- input handling
    def task_ids(self, task, batch: int) -> torch.Tensor | None:
        """Task names/indices -> long tensor ``[batch]`` (None for single-task models)."""
        if not self.cfg.multitask:
            if isinstance(task, str) and self.cfg.tasks and task not in self.cfg.tasks:
                raise TaskError(f"this single-task model is for {self.cfg.tasks[0]!r}, "
                                f"not {task!r}")
            return None
        if task is None:
            raise TaskError(f"this multi-task model needs a task (one of {self.cfg.num_tasks})")
        items = [task] * batch if isinstance(task, str | int | np.integer) else list(task)
        if isinstance(task, torch.Tensor):
            items = task.reshape(-1).tolist()
        if len(items) != batch:
            raise InputError(f"got {len(items)} tasks for {batch} observations")
        return torch.tensor([self.task_index(t) for t in items], device=self.device)

    def task_index(self, task: str | int) -> int:
        """Index of a task name (or a checked index) in this model's task set."""
        if isinstance(task, str):
            if task not in self.cfg.tasks:
                raise TaskError(f"task {task!r} is not in this model's task set "
                                f"({len(self.cfg.tasks)} tasks: {', '.join(self.cfg.tasks[:5])}"
                                f"{', ...' if len(self.cfg.tasks) > 5 else ''})")
            return self.cfg.tasks.index(task)
        if not 0 <= int(task) < self.cfg.num_tasks:
            raise TaskError(f"task index {task} is outside 0..{self.cfg.num_tasks - 1}")
        return int(task)

    def prepare_obs(self, obs) -> torch.Tensor:
        """Observations ``[D]`` or ``[B, D]`` (unpadded or padded) -> float ``[B, obs_dim]``."""
        x = torch.as_tensor(np.asarray(obs, dtype=np.float32) if not isinstance(
            obs, torch.Tensor) else obs, dtype=torch.float32, device=self.device)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2:
            raise InputError(f"observation must be [obs] or [batch, obs], got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] > self.cfg.obs_dim:
            raise InputError(f"observation has {x.shape[1]} values; this model takes at most "
                             f"{self.cfg.obs_dim}")
        if not torch.isfinite(x).all():
            raise InputError("observation contains NaN or Inf")
        return torch.nn.functional.pad(x, (0, self.cfg.obs_dim - x.shape[1]))

    def check_obs_size(self, obs: torch.Tensor, task_ids: torch.Tensor | None,
                       raw_dims: Sequence[int]) -> None:
        """Raise if an unpadded observation's length differs from its task's size."""
        from tdmpc_opt.tasks import TASKS

        if task_ids is None:
            return
        for dim, t in zip(raw_dims, task_ids.tolist(), strict=True):
            name = self.cfg.tasks[t]
            want = TASKS[name].obs_dim if name in TASKS else self.cfg.obs_dim
            if dim not in (want, self.cfg.obs_dim):
                raise InputError(f"{name} observations have {want} values (or {self.cfg.obs_dim}"
                                 f" padded), got {dim}")

    # ------------------------------------------------------------------------- acting
    def reset(self) -> None:
        """Forget warm-start plans (every slot starts a new episode)."""
        self._prev_mean = None

    @torch.no_grad()
    def act(self, obs, task=None, t0=False, eval_mode: bool = True,
            generators: list[torch.Generator] | None = None) -> torch.Tensor:
        """Choose actions, keeping one warm-start plan per batch slot.

        Args:
            obs: ``[D]`` or ``[B, D]`` observation(s), unpadded or padded to ``obs_dim``.
            task: task name or index (multi-task models), or one per observation.
            t0: True where an episode starts (bool or ``[B]``).
            eval_mode: no exploration noise on the chosen action.
            generators: one ``torch.Generator`` per observation for reproducible planning.
        Returns:
            ``[A]`` or ``[B, A]`` actions in [-1, 1] (padded to ``action_dim``, masked), on CPU.
        """
        single = np.ndim(obs) == 1 if not isinstance(obs, torch.Tensor) else obs.ndim == 1
        x, tid = self.prepare_inputs(obs, task)
        b = x.shape[0]
        starts = torch.as_tensor(t0, dtype=torch.bool, device=self.device).reshape(-1)
        starts = starts.expand(b) if starts.numel() == 1 else starts
        if self._prev_mean is None or self._prev_mean.shape[0] != b:
            self._prev_mean = self.initial_plan(b)
            starts = torch.ones_like(starts)
        action, self._prev_mean = self.step(x, tid, self._prev_mean, starts, eval_mode,
                                            generators)
        return action[0] if single else action

    def prepare_inputs(self, obs, task) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Validated, padded observations ``[B, obs_dim]`` and task ids ``[B]`` (or None).

        ``obs`` is ``[D]``, ``[B, D]`` or a list of 1-D observations of different lengths.
        """
        if isinstance(obs, list) and obs and np.ndim(obs[0]) == 1:
            dims = [len(o) for o in obs]
            x = torch.cat([self.prepare_obs(o) for o in obs])
        else:
            raw_dim = obs.shape[-1] if isinstance(obs, torch.Tensor) else np.shape(obs)[-1]
            x = self.prepare_obs(obs)
            dims = [raw_dim] * x.shape[0]
        tid = self.task_ids(task, x.shape[0])
        self.check_obs_size(x, tid, dims)
        return x, tid

    @staticmethod
    def _rowwise(fn, x: torch.Tensor, tid: torch.Tensor | None, *rest: torch.Tensor):
        """Apply ``fn`` one row at a time and concatenate.

        Matrix products of one row take another kernel path than those of many, with other
        rounding; evaluating single rows alone keeps an episode's numbers independent of the
        batch it is planned in (the planner's own products have many rows either way).
        """
        return torch.cat([fn(x[i:i + 1], None if tid is None else tid[i:i + 1],
                             *(r[i:i + 1] for r in rest)) for i in range(x.shape[0])])

    def initial_plan(self, batch: int) -> torch.Tensor:
        """An empty warm-start plan ``[batch, H, A]``."""
        return torch.zeros(batch, self.planner.horizon, self.cfg.action_dim, device=self.device)

    @torch.no_grad()
    def step(self, x: torch.Tensor, tid: torch.Tensor | None, prev_mean: torch.Tensor,
             t0: torch.Tensor, eval_mode: bool = True,
             generators: list[torch.Generator] | None = None):
        """Stateless acting on prepared inputs: ``(actions [B, A] on CPU, new plan [B, H, A])``.

        The caller keeps ``prev_mean`` per episode (see :mod:`tdmpc_opt.evaluation`).
        """
        b = x.shape[0]
        z = self._rowwise(self.model.encode, x, tid)
        if not self.planner.mpc:
            noise = torch.randn(b, self.cfg.action_dim) if generators is None else torch.stack(
                [torch.randn(self.cfg.action_dim, generator=g) for g in generators])
            out = self._rowwise(lambda zz, tt, ee: self.model.pi(zz, tt, ee).action_and_mean(),
                                z, tid, noise.to(self.device))
            action, mean = out.chunk(2, dim=-1)
            return (mean if eval_mode else action).cpu(), prev_mean
        noise = draw_noise(self.planner, self.cfg.action_dim, self.cfg.num_q, b,
                           generators).to(self.device)
        gamma = self.discounts[tid] if tid is not None else self.discounts[:1].expand(b)
        action, mean = plan(self.model, self.planner, z, tid, prev_mean, t0.to(self.device),
                            eval_mode, noise, gamma, self.precision)
        return action.cpu(), mean


def load_agent(path, device: str | torch.device = "cpu", planner: PlannerConfig | None = None,
               tasks: tuple[str, ...] | None = None, precision: str = "fp32",
               **overrides) -> Agent:
    """Load any supported checkpoint (TD-MPC2 ``.pt``, TD-MPC-Opt, tdmpc-opt safetensors);
    ``precision`` is the planner's (see :class:`Agent`)."""
    from tdmpc_opt.checkpoints import load_world_model

    model, info = load_world_model(path, resolve_device(device), tasks, **overrides)
    return Agent(model, planner, device, info, precision)
