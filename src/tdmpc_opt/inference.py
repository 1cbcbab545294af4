"""One-shot predictions of a world model on user inputs (``tdmpc-opt predict``)."""

from __future__ import annotations

import torch

from tdmpc_opt.errors import InputError, TaskError
from tdmpc_opt.tasks import TASKS
from tdmpc_opt.world_model import WorldModel


def _vector(item: dict, key: str, want: int, padded: int, where: str) -> torch.Tensor:
    values = item.get(key)
    if not isinstance(values, list) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        raise InputError(f"{where}: '{key}' must be a list of numbers")
    if len(values) not in (want, padded):
        raise InputError(f"{where}: '{key}' has {len(values)} values; expected {want}"
                         + (f" (or {padded} padded)" if padded != want else ""))
    try:
        x = torch.tensor([float(v) for v in values], dtype=torch.float32)
    except OverflowError:  # an integer beyond any float
        raise InputError(f"{where}: '{key}' contains a number too large") from None
    if not torch.isfinite(x).all():
        raise InputError(f"{where}: '{key}' contains NaN or Inf, or a number too large")
    return torch.nn.functional.pad(x, (0, padded - len(values)))


def _task_of(model: WorldModel, item: dict, where: str) -> tuple[int | None, int, int]:
    """(task index or None, raw obs size, raw action size) of one input item."""
    cfg = model.cfg
    name = item.get("task")
    if not cfg.multitask:
        info = TASKS.get(name) if isinstance(name, str) else None
        return None, info.obs_dim if info else cfg.obs_dim, info.action_dim if info else \
            cfg.action_dim
    if not isinstance(name, str):
        raise InputError(f"{where}: 'task' must be a task name")
    if name not in cfg.tasks:
        raise TaskError(f"{where}: task {name!r} is not in this model's task set")
    i = cfg.tasks.index(name)
    info = TASKS.get(name)
    return i, info.obs_dim if info else cfg.obs_dim, cfg.action_dims[i]


@torch.no_grad()
def predict_items(model: WorldModel, items: list) -> list[dict]:
    """Predictions for a list of ``{"task", "obs", "action"}`` dicts (see ``predict``)."""
    if not isinstance(items, list) or not items:
        raise InputError("input must be a non-empty JSON list of {task, obs, action} objects")
    cfg = model.cfg
    out = []
    for n, item in enumerate(items):
        where = f"item {n}"
        if not isinstance(item, dict):
            raise InputError(f"{where}: expected an object with task, obs and action")
        task, obs_dim, act_dim = _task_of(model, item, where)
        obs = _vector(item, "obs", obs_dim, cfg.obs_dim, where).unsqueeze(0)
        action = _vector(item, "action", act_dim, cfg.action_dim, where).unsqueeze(0)
        t = None if task is None else torch.tensor([task])
        z = model.encode(obs, t)
        pi = model.pi(z, t, torch.zeros_like(action))
        out.append({
            "task": item.get("task"),
            "z": z[0].tolist(),
            "z_next": model.next(z, action, t)[0].tolist(),
            "reward": model.decode(model.reward(z, action, t)).item(),
            "q_mean": model.decode(model.q_logits(z, action, t)).mean(0).item(),
            "pi_mean": pi.mean[0].tolist(),
        })
    return out
