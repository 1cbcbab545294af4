"""Configuration: frozen dataclasses with TD-MPC2's published defaults, and the model-size table.

Nothing mutates a config at run time: derived values are properties, and changes are made with
:func:`apply_overrides`, which returns a new object.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass

from tdmpc_opt.errors import ConfigError
from tdmpc_opt.tasks import TASK_SETS, get_task

# Published TD-MPC2 model sizes (millions of parameters) -> architecture. ``num_q`` defaults to 5.
MODEL_SIZES: dict[int, dict[str, int]] = {
    1: {"enc_dim": 256, "mlp_dim": 384, "latent_dim": 128, "num_enc_layers": 2, "num_q": 2},
    5: {"enc_dim": 256, "mlp_dim": 512, "latent_dim": 512, "num_enc_layers": 2, "num_q": 5},
    19: {"enc_dim": 1024, "mlp_dim": 1024, "latent_dim": 768, "num_enc_layers": 3, "num_q": 5},
    48: {"enc_dim": 1792, "mlp_dim": 1792, "latent_dim": 768, "num_enc_layers": 4, "num_q": 5},
    317: {"enc_dim": 4096, "mlp_dim": 4096, "latent_dim": 1376, "num_enc_layers": 5, "num_q": 8},
}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a TD-MPC2 world model for state observations."""

    obs_dim: int
    """Observation length fed to the encoder (the task set's largest, zero-padded)."""
    action_dim: int
    """Action length (the task set's largest, zero-padded and masked per task)."""
    tasks: tuple[str, ...] = ()
    """Task names in embedding order; empty or one name for a single-task model."""
    action_dims: tuple[int, ...] = ()
    """Per-task action sizes, parallel to ``tasks`` (defines the action masks)."""
    episode_lengths: tuple[int, ...] = ()
    """Per-task episode lengths, parallel to ``tasks`` (defines the per-task discount)."""
    task_dim: int = 96
    """Task-embedding size; 0 for single-task models."""
    enc_dim: int = 256
    """Hidden width of the state encoder."""
    num_enc_layers: int = 2
    """Encoder depth as TD-MPC2 counts it (max(n-1, 1) hidden layers plus the output layer)."""
    mlp_dim: int = 512
    """Hidden width of dynamics, reward, policy and Q networks (two hidden layers each)."""
    latent_dim: int = 512
    """Latent state size; a multiple of ``simnorm_dim``."""
    num_q: int = 5
    """Size of the Q-function ensemble."""
    num_bins: int = 101
    """Bins of the discrete (two-hot) regression of rewards and values."""
    vmin: float = -10.0
    """Lowest bin centre, in symlog space."""
    vmax: float = 10.0
    """Highest bin centre, in symlog space."""
    simnorm_dim: int = 8
    """Group size of the simplicial normalisation of latents."""
    log_std_min: float = -10.0
    """Lower bound of the policy's log standard deviation."""
    log_std_max: float = 2.0
    """Upper bound of the policy's log standard deviation."""
    dropout: float = 0.01
    """Dropout after the first layer of each Q-function (training only)."""
    episodic: bool = False
    """Whether the model has a termination head."""

    @property
    def multitask(self) -> bool:
        """True when the model has task embeddings."""
        return self.task_dim > 0

    @property
    def num_tasks(self) -> int:
        """Number of task embeddings (0 for single-task models)."""
        return len(self.tasks) if self.multitask else 0

    @property
    def enc_layers(self) -> int:
        """Number of linear layers in the encoder."""
        return max(self.num_enc_layers - 1, 1) + 1

    def validate(self) -> ModelConfig:
        """Check invariants; returns ``self`` so it can be chained."""
        positive = ("obs_dim", "action_dim", "enc_dim", "mlp_dim", "latent_dim", "num_q",
                    "num_enc_layers", "simnorm_dim")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.latent_dim % self.simnorm_dim:
            raise ConfigError(f"latent_dim {self.latent_dim} is not a multiple of simnorm_dim "
                              f"{self.simnorm_dim}")
        if self.num_q < 2:
            raise ConfigError("num_q must be at least 2 (two members are sampled for values)")
        if self.multitask and len(self.action_dims) != len(self.tasks):
            raise ConfigError("action_dims must list one size per task")
        if self.task_dim < 0:
            raise ConfigError(f"task_dim must be >= 0 (0: single task), got {self.task_dim}")
        if not all(0 < d <= self.action_dim for d in self.action_dims):
            raise ConfigError(f"action_dims must lie in [1, action_dim={self.action_dim}], got "
                              f"{self.action_dims}")
        if not all(n > 0 for n in self.episode_lengths):
            raise ConfigError(f"episode_lengths must be positive, got {self.episode_lengths}")
        if self.num_bins < 0 or self.vmax <= self.vmin:
            raise ConfigError("need num_bins >= 0 and vmax > vmin")
        if self.log_std_min >= self.log_std_max:
            raise ConfigError("need log_std_min < log_std_max")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        return self


@dataclass(frozen=True)
class PlannerConfig:
    """MPPI planning in latent space (TD-MPC2 defaults)."""

    mpc: bool = True
    """Plan with MPPI; False acts from the policy prior alone."""
    iterations: int = 6
    """MPPI iterations per step."""
    num_samples: int = 512
    """Action sequences evaluated per iteration (policy trajectories included)."""
    num_elites: int = 64
    """Top sequences that update the sampling distribution."""
    num_pi_trajs: int = 24
    """Sequences drawn from the policy prior instead of the Gaussian."""
    horizon: int = 3
    """Planning horizon in agent steps."""
    min_std: float = 0.05
    """Lower clamp of the sampling standard deviation."""
    max_std: float = 2.0
    """Initial (and upper clamp of the) sampling standard deviation."""
    temperature: float = 0.5
    """Inverse temperature of the elite weighting exp(temperature * (value - max))."""

    def validate(self) -> PlannerConfig:
        """Check invariants; returns ``self``."""
        for name in ("iterations", "num_samples", "num_elites", "horizon"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"planner {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.num_pi_trajs < self.num_samples:
            raise ConfigError(f"num_pi_trajs must be in [0, num_samples), got {self.num_pi_trajs}"
                              f" with num_samples={self.num_samples}")
        if self.num_elites > self.num_samples:
            raise ConfigError(f"num_elites must not exceed num_samples, got {self.num_elites} "
                              f"with num_samples={self.num_samples}")
        if not 0 < self.min_std <= self.max_std < math.inf:
            raise ConfigError("need 0 < min_std <= max_std, both finite")
        if not 0 <= self.temperature < math.inf:
            raise ConfigError(f"planner temperature must be finite and >= 0, got "
                              f"{self.temperature}")
        return self


TASK_FIELDS = ("tasks", "obs_dim", "action_dim", "action_dims", "episode_lengths")
"""ModelConfig fields that follow from the task list (:func:`model_config_for`); commands that
build a model from tasks refuse them as overrides."""

MAX_THREADS = 256
"""Most torch intra-op threads a command or setting accepts: more than any machine it runs on
has cores, and far below what crashes PyTorch's thread pool (100000 threads segfault)."""

SEED_LIMIT = 2**32
"""Seeds lie in ``[0, SEED_LIMIT)``, the range numpy, torch and MuJoCo's environments all take."""


def check_seed(seed: int, name: str = "seed") -> int:
    """Refuse a seed outside ``[0, 2**32)``; returns ``seed``."""
    if not 0 <= seed < SEED_LIMIT:
        raise ConfigError(f"{name} must be in [0, 2**32), got {seed}")
    return seed


def check_not_derived(overrides: typing.Iterable[str], source: str) -> None:
    """Refuse ``key=value`` items that set a :data:`TASK_FIELDS` field; ``source`` names where
    the command takes its tasks from (e.g. ``--tasks``)."""
    keys = sorted({item.partition("=")[0].strip() for item in overrides} & set(TASK_FIELDS))
    if keys:
        raise ConfigError(f"cannot set {', '.join(keys)} with key=value: the task list and "
                          f"the sizes derived from it come from {source}")


def task_dim_for(size: int | None, task_set: str | None) -> int:
    """TD-MPC2's task-embedding size: 96, except 64 for MT30 sizes 5, 19 and 48."""
    if task_set == "mt30" and size in (5, 19, 48):
        return 64
    return 96


def model_config_for(tasks: tuple[str, ...], size: int | None = None, **dims) -> ModelConfig:
    """Build a :class:`ModelConfig` for a task list and a published size or explicit dims.

    Args:
        tasks: task names; more than one makes a multi-task model.
        size: a key of :data:`MODEL_SIZES`, or None to use ``dims`` and the defaults.
        dims: explicit field values, applied last (e.g. ``latent_dim=64``).
    Raises:
        ConfigError: unknown size or invalid dims.
    """
    if size is not None and size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size}; published sizes: {sorted(MODEL_SIZES)}")
    infos = [get_task(t) for t in tasks]
    if not infos:
        raise ConfigError("a model needs at least one task")
    task_set = next((n for n, names in TASK_SETS.items() if names == tuple(tasks)), None)
    values: dict = dict(MODEL_SIZES.get(size, {}))
    if task_set == "mt30" and size == 19:
        values["latent_dim"] = 512  # the published MT30 19M checkpoint is slightly smaller
    multitask = len(infos) > 1
    values.update(
        obs_dim=max(i.obs_dim for i in infos),
        action_dim=max(i.action_dim for i in infos),
        tasks=tuple(tasks),
        action_dims=tuple(i.action_dim for i in infos),
        episode_lengths=tuple(i.episode_length for i in infos),
        task_dim=task_dim_for(size, task_set) if multitask else 0,
    )
    values.update(dims)
    try:
        return ModelConfig(**values).validate()
    except TypeError as e:
        raise ConfigError(str(e)) from None


def _coerce(value: str, annotation: str, key: str):
    """Parse a command-line string into the type named by a dataclass annotation."""
    ann = annotation.replace(" ", "")
    try:
        if ann == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if ann == "int":
            number = int(value.replace("_", ""))
            if not -2**63 <= number < 2**63:
                raise ConfigError(f"{key}={value!r}: out of range (more than 64 bits)")
            return number
        if ann == "float":
            number = float(value)
            if not math.isfinite(number):
                raise ConfigError(f"{key}={value!r}: expected a finite number")
            return number
        if ann.startswith("tuple[str"):
            return tuple(v for v in value.split(",") if v)
        if ann.startswith("tuple[int"):
            return tuple(int(v) for v in value.split(",") if v)
        if ann == "str|None" or ann == "str":
            return None if ann == "str|None" and value.lower() == "none" else value
        if ann == "int|None":
            return None if value.lower() == "none" else int(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected {annotation}") from None
    raise ConfigError(f"{key}: cannot set a field of type {annotation} from the command line")


def apply_overrides(cfg, overrides: typing.Iterable[str]):
    """Return a copy of dataclass ``cfg`` with ``key=value`` strings applied (validated).

    Raises:
        ConfigError: malformed item, unknown key (with the closest suggestion) or bad value.
    """
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown setting {key!r}{hint}")
        changes[key] = _coerce(value.strip(), str(fields[key].type), key)
    new = dataclasses.replace(cfg, **changes)
    return new.validate() if hasattr(new, "validate") else new


def config_to_dict(cfg) -> dict:
    """Plain-JSON dictionary of a config dataclass (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}


def config_from_dict(cls, data: dict):
    """Inverse of :func:`config_to_dict`; unknown keys raise :class:`ConfigError`."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"bad {cls.__name__}: {e}") from None

