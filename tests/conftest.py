"""Shared fixtures: a tiny model config and paths to the published checkpoints in ../shared."""

from __future__ import annotations

import os
import signal
from pathlib import Path

# MuJoCo picks its OpenGL backend when dm_control is first imported: choose the headless EGL one
# before any test imports it, so rendering tests work in any order
os.environ.setdefault("MUJOCO_GL", "egl")

import pytest  # noqa: E402
import torch  # noqa: E402

from tdmpc_opt.config import ModelConfig, PlannerConfig, model_config_for
from tdmpc_opt.world_model import WorldModel

# Tests use small tensors: one intra-op thread avoids thread hand-off costs that dominate them
# (and makes timing-independent results the same on every machine).
torch.set_num_threads(1)

SHARED = Path(os.environ.get("TDMPC_OPT_SHARED", Path(__file__).resolve().parents[1].parent
                             / "shared"))
TINY_TASKS = ("walker-walk", "cartpole-balance", "pendulum-swingup")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (selected with ``-m gpu``) skip, with the reason, without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible to this PyTorch)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def shared_path(*parts: str) -> Path:
    """A file under ../shared, or skip the test with the reason (a user's fresh clone)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the project's shared/ folder beside the repository)")
    return path


class DropsAnInterrupt:
    """Raises a Ctrl-C from its ``__del__``, where Python prints and drops the exception (as
    when a Ctrl-C arrives while MuJoCo's objects of a finished episode are freed); a test that
    makes one ignores ``pytest.PytestUnraisableExceptionWarning``."""

    def __del__(self):
        signal.raise_signal(signal.SIGINT)


def random_model(cfg: ModelConfig) -> WorldModel:
    """A model with random weights everywhere (std 0.3): zero-initialised heads would make all
    values tie, which hides planner and quantization errors."""
    model = WorldModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model


@pytest.fixture
def fp16_ckpt() -> Path:
    """The published TD-MPC-Opt 1M MT30 student, fp16."""
    return shared_path("checkpoints", "tdmpc-opt-mt30-1M-fp16.pt")


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """A three-task model small enough to train in tests."""
    return model_config_for(TINY_TASKS, None, enc_dim=32, mlp_dim=32, latent_dim=16,
                            task_dim=8, num_q=2, simnorm_dim=8)


@pytest.fixture
def tiny_single_cfg() -> ModelConfig:
    """A single-task (cartpole-balance) model with 5 Q-functions."""
    return model_config_for(("cartpole-balance",), None, enc_dim=32, mlp_dim=32, latent_dim=16,
                            num_q=5)


@pytest.fixture
def tiny_planner() -> PlannerConfig:
    """Few samples and iterations: fast planning in tests."""
    return PlannerConfig(iterations=2, num_samples=32, num_elites=8, num_pi_trajs=4, horizon=3)


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts seeded and on one intra-op thread; commands under test that set their
    own thread count (``--threads``, training's default of all cores) do not leak it into the
    next test, whose float32 rounding would otherwise depend on the test order. SIGTERM and
    SIGHUP start with their default action, as in a new process (``ray.init`` leaves a handler
    of its own)."""
    torch.manual_seed(0)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    yield
    torch.set_num_threads(1)
