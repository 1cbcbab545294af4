"""The acting agent: public API, batching, reproducibility, input checks."""

import pytest
import torch

from tdmpc_opt import load_agent
from tdmpc_opt.agent import Agent, resolve_device
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.errors import ConfigError, InputError, TaskError
from tdmpc_opt.planner import draw_noise, plan
from tdmpc_opt.world_model import WorldModel


def test_act_single_and_batched(tiny_cfg, tiny_planner):
    agent = Agent(WorldModel(tiny_cfg), tiny_planner)
    a = agent.act(torch.randn(24), task="walker-walk", t0=True)
    assert a.shape == (6,) and a.abs().max() <= 1
    b = agent.act(torch.randn(3, 5), task=["cartpole-balance"] * 3, t0=True)
    assert b.shape == (3, 6) and torch.all(b[:, 1:] == 0)  # masked to cartpole's 1 action


def test_same_generator_seed_same_action(tiny_cfg, tiny_planner):
    agent = Agent(WorldModel(tiny_cfg), tiny_planner)
    obs = torch.randn(2, 24)
    acts = [agent.act(obs, task=[0, 1], t0=True, eval_mode=False,
                      generators=[torch.Generator().manual_seed(s) for s in (4, 5)])
            for _ in range(2)]
    assert torch.equal(acts[0], acts[1])


def test_warm_start_uses_the_previous_plan(tiny_cfg, tiny_planner):
    model = WorldModel(tiny_cfg).eval()
    noise = draw_noise(tiny_planner, 6, 2, 1, [torch.Generator().manual_seed(1)])
    z = model.encode(torch.randn(1, 24), torch.tensor([0]))
    prev = torch.full((1, 3, 6), 0.5)
    args = (model, tiny_planner, z, torch.tensor([0]))
    cold, _ = plan(*args, prev, torch.tensor([True]), True, noise, torch.tensor([0.99]))
    warm, _ = plan(*args, prev, torch.tensor([False]), True, noise, torch.tensor([0.99]))
    assert not torch.equal(cold, warm)


def test_policy_mode(tiny_cfg):
    agent = Agent(WorldModel(tiny_cfg), PlannerConfig(mpc=False))
    a = agent.act(torch.randn(24), task=0, eval_mode=True)
    b = agent.act(torch.randn(24), task=0, eval_mode=True)
    assert a.shape == (6,) and not torch.equal(a, b)


def test_layers_name_the_planners_view_and_the_policy_builds_none(tiny_cfg, tiny_planner):
    from tdmpc_opt import cpu_kernels
    from tdmpc_opt.fast_model import _VIEWS, FastWorldModel

    model = WorldModel(tiny_cfg)
    for precision in ("fp32", "bf16", "int8"):
        agent = Agent(model, tiny_planner, precision=precision)
        assert agent.layers == FastWorldModel(model, precision).layers
        assert agent.layers.startswith(f"{precision} on cpu: ")
    kernel = cpu_kernels.available()
    assert ("fused CPU kernel" in Agent(model, tiny_planner, precision="int8").layers) == kernel
    other = WorldModel(tiny_cfg)
    policy = Agent(other, PlannerConfig(mpc=False), precision="int8")
    assert policy.layers.endswith("no planning") and other not in _VIEWS


def test_bad_inputs(tiny_cfg, tiny_planner):
    agent = Agent(WorldModel(tiny_cfg), tiny_planner)
    with pytest.raises(TaskError, match="not in this model's task set"):
        agent.act(torch.randn(24), task="cheetah-run")
    with pytest.raises(TaskError, match="outside"):
        agent.act(torch.randn(24), task=7)
    with pytest.raises(InputError, match="at most 24"):
        agent.act(torch.randn(30), task=0)
    with pytest.raises(InputError, match="cartpole-balance observations have 5"):
        agent.act(torch.randn(7), task="cartpole-balance")
    with pytest.raises(InputError, match="NaN"):
        agent.act(torch.full((24,), float("nan")), task=0)
    with pytest.raises(TaskError, match="needs a task"):
        agent.act(torch.randn(24))


def test_devices_are_checked_against_this_machine(tiny_single_cfg):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad, message in [("gpu9", "unknown device 'gpu9'"), ("mps", "runs on cpu or cuda"),
                         ("cuda:99", "CUDA" if torch.cuda.is_available() else "use cpu")]:
        with pytest.raises(ConfigError, match=message):
            resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="use cpu"):
            Agent(WorldModel(tiny_single_cfg), PlannerConfig(), device="cuda")


def test_load_agent_on_published_checkpoint(fp16_ckpt):
    agent = load_agent(fp16_ckpt, device="cpu",
                       planner=PlannerConfig(num_samples=64, num_elites=8, iterations=2))
    a = agent.act(torch.zeros(5), task="cartpole-balance", t0=True)
    assert a.shape == (6,) and torch.all(a[1:] == 0)
