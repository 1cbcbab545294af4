"""A Gymnasium environment around one DeepMind Control Suite (or custom MT30) task.

It reproduces TD-MPC2's DMControl setup: the task is built with ``random=seed``, actions in
[-1, 1] are rescaled to the actuators' bounds, every agent step repeats the action for two
control steps and sums their rewards, the observation is the flattened concatenation of the
observation dict in its own order (float32), and an episode is truncated after 500 agent
steps (the suite's 1000-control-step time limit) -- never terminated.
"""

from __future__ import annotations

from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from dm_control import suite
from dm_control.rl import control
from dm_control.suite.wrappers import action_scale

from tdmpc_opt.envs.custom import CUSTOM_TASKS
from tdmpc_opt.envs.spec import EnvSpec
from tdmpc_opt.errors import InputError, TaskError

ACTION_REPEAT = 2
"""Control steps per agent step; the reward of an agent step is the sum over them."""
EPISODE_LENGTH = 500
"""Agent steps per episode (1000 control steps, the suite's time limit)."""
DEFAULT_RENDER_SIZE = 384
"""Side length (pixels) of frames from :meth:`DMControlEnv.render`, as in TD-MPC2."""

_DOMAIN_ALIASES = {"cup": "ball_in_cup", "pointmass": "point_mass"}


def load_dm_env(task: str, seed: int | None = None) -> control.Environment:
    """Build the raw dm_control environment of ``task`` (``domain-task`` name), seeded.

    Custom MT30 tasks come from :data:`~tdmpc_opt.envs.custom.CUSTOM_TASKS`; any other name is
    looked up in ``dm_control.suite`` (``cup`` is the ``ball_in_cup`` domain).

    Raises:
        TaskError: neither the custom tasks nor the suite know the name.
    """
    if task in CUSTOM_TASKS:
        return CUSTOM_TASKS[task](seed)
    domain, _, name = task.partition("-")
    domain = _DOMAIN_ALIASES.get(domain, domain)
    name = name.replace("-", "_")
    if (domain, name) not in suite.ALL_TASKS:
        raise TaskError(f"no DeepMind Control Suite environment for task {task!r}")
    return suite.load(domain, name, task_kwargs={"random": seed})


def flatten_observation(observation: dict[str, Any]) -> np.ndarray:
    """Concatenate the values of a dm_control observation dict, flattened, as float32."""
    return np.concatenate([np.asarray(v).ravel() for v in observation.values()],
                          dtype=np.float32)


class DMControlEnv(gym.Env[np.ndarray, np.ndarray]):
    """Gymnasium view of a dm_control task with TD-MPC2's action repeat and time limit.

    Args:
        task: task name, e.g. ``walker-walk`` or ``cheetah-run-backwards``.
        seed: seed of the task's random generator (initial states); ``None`` draws one from
            the OS. ``reset(seed=s)`` later reseeds it.
        render_size: side length in pixels of the frames :meth:`render` returns.
        camera_id: MuJoCo camera used by :meth:`render` (TD-MPC2: 2 for quadruped, else 0).
    """

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"]}

    def __init__(self, task: str, seed: int | None = None, *,
                 render_size: int = DEFAULT_RENDER_SIZE, camera_id: int | None = None) -> None:
        self.task = task
        self._dm = load_dm_env(task, seed)
        self._env = action_scale.Wrapper(self._dm, minimum=-1.0, maximum=1.0)
        spec = self._env.action_spec()
        self._action_dtype = spec.dtype
        obs_dim = sum(int(np.prod(v.shape)) for v in self._env.observation_spec().values())
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, spec.shape, np.float32)
        self.render_mode = "rgb_array"
        self.render_size = render_size
        self.camera_id = camera_id if camera_id is not None else (
            2 if task.startswith("quadruped") else 0)
        self.metadata = {**self.metadata,
                         "render_fps": round(1.0 / (self._dm.control_timestep() * ACTION_REPEAT))}
        self._t = 0
        self._needs_reset = True

    @property
    def task_spec(self) -> EnvSpec:
        """Observation/action sizes and episode length of this environment."""
        return EnvSpec(self.task, self.observation_space.shape[0], self.action_space.shape[0],
                       EPISODE_LENGTH)

    @property
    def physics(self) -> Any:
        """The dm_control ``Physics`` (MuJoCo model and data) of the task."""
        return self._dm.physics

    @property
    def dm_task(self) -> Any:
        """The dm_control ``Task`` object (reward, observation, initial state)."""
        return self._dm.task

    @property
    def elapsed_steps(self) -> int:
        """Agent steps taken in the current episode."""
        return self._t

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode; with ``seed``, reseed the task's generator first.

        Returns ``(obs, info)``: ``obs`` float32 of shape ``(obs_dim,)``, ``info`` empty.

        ``make_env(task, seed=s).reset()`` and ``env.reset(seed=s)`` give the same episode.
        """
        super().reset(seed=seed)
        if seed is not None:
            self._dm.task.random.seed(seed)
        step = self._env.reset()
        self._t = 0
        self._needs_reset = False
        return flatten_observation(step.observation), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply ``action`` (shape ``(action_dim,)``, in [-1, 1], clipped) for two control steps.

        Returns ``(obs, reward, terminated, truncated, info)``: ``obs`` float32 of shape
        ``(obs_dim,)``; ``reward`` the sum of the two control rewards (in [0, 2]);
        ``terminated`` always False; ``truncated`` True on the 500th step; ``info`` empty.

        Raises:
            InputError: the action has the wrong shape.
            RuntimeError: the episode has not been reset or has already ended.
        """
        if self._needs_reset:
            raise RuntimeError(f"{self.task}: call reset() before step() (episode over or "
                               "not started)")
        action = np.asarray(action, dtype=self._action_dtype)
        if action.shape != self.action_space.shape:
            raise InputError(f"{self.task}: action shape {action.shape}, "
                             f"expected {self.action_space.shape}")
        action = np.clip(action, -1.0, 1.0)
        reward = 0.0
        for _ in range(ACTION_REPEAT):
            step = self._env.step(action)
            reward += step.reward
            if step.last():  # the suite's time limit; coincides with EPISODE_LENGTH in MT30
                break
        self._t += 1
        truncated = self._t >= EPISODE_LENGTH or step.last()
        self._needs_reset = truncated
        return flatten_observation(step.observation), float(reward), False, truncated, {}

    def render(self) -> np.ndarray:
        """An RGB frame (``render_size`` square, uint8 HxWx3) of the current state.

        Needs an OpenGL backend (set ``MUJOCO_GL=egl`` or ``osmesa`` on a headless machine);
        nothing else in this class does.
        """
        try:
            return self._dm.physics.render(height=self.render_size, width=self.render_size,
                                           camera_id=self.camera_id)
        except Exception as err:  # MuJoCo raises FatalError/AttributeError without a GL context
            raise RuntimeError(f"cannot render {self.task}: no usable OpenGL context ({err}); "
                               "set MUJOCO_GL=egl (GPU) or osmesa (CPU) before starting "
                               "Python") from err

    def close(self) -> None:
        """Release the MuJoCo data and any rendering context; the env is unusable after."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self._needs_reset = True
            self._dm.physics.free()
        super().close()
