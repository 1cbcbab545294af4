"""Fast planning: the batched planner against the literal one, exact Mish, precisions, graphs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tdmpc_opt.checkpoints import load_world_model
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.fast_model import (
    WIDE_DEFAULT,
    WIDE_PLANE,
    Dense,
    FastWorldModel,
    fast_view,
    mish,
    parse_precision,
    quantize_rows_wide,
)
from tdmpc_opt.planner import GraphPlanner, draw_noise, plan, plan_literal
from tdmpc_opt.world_model import WorldModel

SMALL = PlannerConfig(iterations=3, num_samples=48, num_elites=8, num_pi_trajs=6, horizon=3)


def _model(cfg) -> WorldModel:
    """A tiny model with every weight perturbed, so values and Q members differ."""
    model = WorldModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


@torch.no_grad()
def _inputs(model: WorldModel, pcfg: PlannerConfig, tasks: list, t0: list[bool], seed: int = 0):
    """Planner inputs on the model's device (drawn on the CPU, so the same on any device)."""
    cfg, b, dev = model.cfg, len(tasks), next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(b, cfg.obs_dim, generator=g).to(dev)
    task = None if tasks[0] is None else torch.tensor(tasks, device=dev)
    z = torch.cat([model.encode(obs[i:i + 1], None if task is None else task[i:i + 1])
                   for i in range(b)])
    gens = [torch.Generator().manual_seed(seed * 100 + i) for i in range(b)]
    noise = draw_noise(pcfg, cfg.action_dim, cfg.num_q, b, gens).to(dev)
    prev = (torch.rand(b, pcfg.horizon, cfg.action_dim, generator=g) * 2 - 1).to(dev)
    return (obs, z, task, prev, torch.tensor(t0, device=dev), noise,
            torch.full((b,), 0.97, device=dev))


def _assert_equals_literal(model, pcfg, tasks, t0, eval_mode, mean_atol=1e-5, seed=0):
    """Actions within 1e-5; the plan's mean within ``mean_atol``."""
    obs, z, task, prev, t0t, noise, gamma = _inputs(model, pcfg, tasks, t0, seed)
    act, mean = plan(model, pcfg, z, task, prev, t0t, eval_mode, noise, gamma)
    for i, t in enumerate(tasks):
        a_ref, m_ref = plan_literal(model, pcfg, obs[i], t, prev[i], t0[i], eval_mode,
                                    noise[i], 0.97)
        torch.testing.assert_close(act[i], a_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(mean[i], m_ref, atol=mean_atol, rtol=0)


# ------------------------------------------------------------------------------ Mish
def test_mish_is_exact_to_float32_rounding():
    x = torch.cat([torch.linspace(-30, 30, 200_001), torch.randn(100_000) * 3,
                   torch.tensor([0.0, -0.0, 1e-30, -1e-30, 20.0, 88.0, -88.0, 1e4, -1e4])])
    truth = F.mish(x.double())
    ulp = torch.finfo(torch.float32).eps * truth.abs().clamp_min(1e-30)
    ours, ref = mish(x), F.mish(x)
    ours_err = ((ours.double() - truth).abs() / ulp).max().item()
    ref_err = ((ref.double() - truth).abs() / ulp).max().item()
    assert ours_err <= max(ref_err, 4.0), (ours_err, ref_err)
    torch.testing.assert_close(ours, ref, rtol=4e-7, atol=1e-30)
    assert torch.isnan(mish(torch.tensor([float("nan")]))).all()
    assert mish(torch.tensor([float("inf")])).item() == float("inf")


# ---------------------------------------------------------------- fast == literal (fp32)
@pytest.mark.parametrize("eval_mode", [True, False])
def test_single_task_five_q_equals_literal(tiny_single_cfg, eval_mode):
    model = _model(tiny_single_cfg)
    assert model.cfg.num_q == 5
    # three elements whose picked Q pairs differ, with and without warm start
    _assert_equals_literal(model, SMALL, [None] * 3, [True, False, False], eval_mode)
    _assert_equals_literal(model, SMALL, [None], [False], eval_mode, seed=3)  # one pair


@pytest.mark.parametrize("eval_mode", [True, False])
def test_multitask_equals_literal(tiny_cfg, eval_mode):
    _assert_equals_literal(_model(tiny_cfg), SMALL, [0, 1, 2], [False, True, False], eval_mode)


@pytest.mark.parametrize("num_bins", [0, 1])
def test_regression_heads_equal_literal(tiny_single_cfg, num_bins):
    """Models whose reward and Q heads regress one value (``num_bins`` 0: the value itself,
    1: its symlog) plan as the literal planner does, whole networks and layer by layer."""
    model = _model(dataclasses.replace(tiny_single_cfg, num_bins=num_bins))
    logits = torch.randn(5, 1)
    torch.testing.assert_close(FastWorldModel(model).decode(logits),
                               model.decode(logits).squeeze(-1))
    _assert_equals_literal(model, SMALL, [None] * 3, [True, False, False], True)
    layered = FastWorldModel(model, whole_networks=False)
    _, z, task, prev, t0, noise, gamma = _inputs(model, SMALL, [None] * 3, [True, False, False])
    torch.testing.assert_close(plan(layered, SMALL, z, task, prev, t0, True, noise, gamma),
                               plan(model, SMALL, z, task, prev, t0, True, noise, gamma),
                               atol=1e-6, rtol=0)


def test_one_policy_trajectory_one_iteration_short_horizon(tiny_cfg):
    pcfg = PlannerConfig(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=1, horizon=2)
    _assert_equals_literal(_model(tiny_cfg), pcfg, [2, 0], [True, False], True)


def test_no_policy_trajectories(tiny_cfg):
    pcfg = PlannerConfig(iterations=2, num_samples=16, num_elites=4, num_pi_trajs=0)
    model = _model(tiny_cfg)
    _, z, task, prev, t0, noise, gamma = _inputs(model, pcfg, [0, 1], [True, True])
    act, mean = plan(model, pcfg, z, task, prev, t0, True, noise, gamma)
    assert act.shape == (2, 6) and mean.shape == (2, 3, 6) and act.abs().max() <= 1
    assert torch.all(act[1, 1:] == 0)  # cartpole: one action dimension


@pytest.mark.parametrize("eval_mode", [True, False])
def test_published_checkpoint_equals_literal(fp16_ckpt, eval_mode):
    model, _ = load_world_model(fp16_ckpt)
    pcfg = PlannerConfig(iterations=2, num_samples=96, num_elites=16, num_pi_trajs=8)
    # This model's values reach ~170, where one float32 ulp is 1.5e-5; the elite weights
    # exp(0.5 * value) carry that rounding into the mean at the 1e-5 level.
    _assert_equals_literal(model, pcfg, [1, 8, 21], [True, False, True], eval_mode,
                           mean_atol=5e-5)


# ------------------------------------------------------------------- batch invariance
@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_an_element_plans_the_same_alone_or_in_a_batch(tiny_single_cfg, precision):
    model = _model(tiny_single_cfg)
    _, z, task, prev, t0, noise, gamma = _inputs(model, SMALL, [None] * 4, [True, False] * 2)
    act, mean = plan(model, SMALL, z, task, prev, t0, False, noise, gamma, precision)
    for i in range(4):
        a1, m1 = plan(model, SMALL, z[i:i + 1], None, prev[i:i + 1], t0[i:i + 1], False,
                      noise[i:i + 1], gamma[i:i + 1], precision)
        assert torch.equal(a1[0], act[i]) and torch.equal(m1[0], mean[i])


def test_chunked_batches_plan_the_same(tiny_cfg, monkeypatch):
    from tdmpc_opt import planner

    model = _model(tiny_cfg)
    _, z, task, prev, t0, noise, gamma = _inputs(model, SMALL, [0, 1, 2, 0, 1], [True] * 5)
    whole = plan(model, SMALL, z, task, prev, t0, False, noise, gamma)
    monkeypatch.setattr(planner, "CPU_ROWS", SMALL.num_samples)  # one element per chunk
    parts = plan(model, SMALL, z, task, prev, t0, False, noise, gamma)
    assert all(torch.equal(a, b) for a, b in zip(whole, parts, strict=True))


# ---------------------------------------------------------------------- Q selection
@torch.no_grad()
def test_q_pair_paths_agree(tiny_single_cfg):
    model = _model(tiny_single_cfg)
    fm = FastWorldModel(model)
    z = torch.softmax(torch.randn(3, 10, 16), -1)
    a = torch.rand(3, 10, 1) * 2 - 1
    rows = fm.task_rows(None, 3)
    pick = torch.rand(3, 5)
    mixed = fm.q_average(z, a, rows, pick)
    each = torch.stack([fm.q_average(z[i:i + 1], a[i:i + 1], rows[:1], pick[i:i + 1])[0]
                        for i in range(3)])
    fm.sync_free = True
    free = fm.q_average(z, a, rows, pick)
    torch.testing.assert_close(mixed, each)
    torch.testing.assert_close(free, each)
    # against the world model's own ensemble, pair by pair
    zm = z[..., torch.argsort(fm.perm)]
    for i in range(3):
        pair = torch.argsort(pick[i])[:2]
        want = model.q_value(zm[i], a[i], None, "avg", members=pair).squeeze(-1)
        torch.testing.assert_close(each[i], want, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- CUDA-graph fallback
def test_graph_planner_cpu_fallback_equals_plan(tiny_single_cfg):
    model = _model(tiny_single_cfg)
    _, z, task, prev, t0, noise, gamma = _inputs(model, SMALL, [None] * 3, [True, False, True])
    graphs = GraphPlanner(model, SMALL)
    act, mean = graphs(z, task, prev, t0, True, noise, gamma)
    want, want_mean = plan(model, SMALL, z, task, prev, t0, True, noise, gamma)
    torch.testing.assert_close(act, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(mean, want_mean, atol=1e-6, rtol=0)
    assert graphs.graphs == {}  # nothing captured without a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("eval_mode", [True, False])
def test_fast_equals_literal_on_gpu(tiny_cfg, tiny_single_cfg, eval_mode):
    _assert_equals_literal(_model(tiny_cfg).cuda(), SMALL, [0, 1, 2], [False, True, False],
                           eval_mode)
    _assert_equals_literal(_model(tiny_single_cfg).cuda(), SMALL, [None] * 3,
                           [True, False, False], eval_mode)


@pytest.mark.gpu
def test_graph_planner_on_gpu_equals_plan(tiny_cfg):
    model = _model(tiny_cfg).cuda()
    _, z, task, prev, t0, noise, gamma = _inputs(model.cpu(), SMALL, [0, 1], [True, False])
    model.cuda()
    args = [x.cuda() for x in (z, task, prev, t0)]
    graphs = GraphPlanner(model, SMALL)
    for _ in range(2):  # capture, then replay
        act, _ = graphs(*args, True, noise.to("cuda"), gamma.cuda())
    want, _ = plan(model, SMALL, *args, True, noise.to("cuda"), gamma.cuda())
    torch.testing.assert_close(act, want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------ precisions
@pytest.mark.parametrize("precision", ["bf16", "int8"])
@torch.no_grad()
def test_reduced_precision_predictions_stay_close(tiny_cfg, precision):
    model = _model(tiny_cfg)
    exact, fast = FastWorldModel(model), FastWorldModel(model, precision)
    z = exact.to_internal(model.encode(torch.randn(3, 24), torch.tensor([0, 1, 2])))
    z = z[:, None].expand(3, 40, -1).contiguous()
    eps = torch.randn(3, 40, 6)
    rows, mask = exact.task_rows(torch.tensor([0, 1, 2]), 3), exact.mask(torch.tensor([0, 1, 2]))
    a = exact.policy(z, rows, eps, mask)
    a_fast = fast.policy(z.to(fast.dtype), rows, eps, mask)
    assert (a - a_fast).abs().mean() < 0.05
    q = exact.q_members(z, a, rows, [0, 1])
    q_fast = fast.q_members(z.to(fast.dtype), a, rows, [0, 1])
    assert ((q - q_fast).abs() / q.abs().clamp_min(1)).mean() < 0.05


def test_views_are_cached_and_rebuilt_after_weight_changes(tiny_cfg):
    model = _model(tiny_cfg)
    view = fast_view(model, "int8")
    assert fast_view(model, "int8") is view and fast_view(model, "fp32") is not view
    with torch.no_grad():
        model._pi[0].weight.add_(1.0)
    assert fast_view(model, "int8") is not view


def test_precision_specs():
    assert parse_precision("int8") == ("int8", False)
    assert parse_precision("bf16+compile") == ("bf16", True)
    with pytest.raises(ValueError, match="precision must be one of"):
        parse_precision("fp8")


@pytest.mark.slow
@pytest.mark.parametrize("num_bins", [None, 1])  # None: the default two-hot heads
def test_compiled_planner_matches_eager(tiny_cfg, num_bins):
    model = _model(tiny_cfg if num_bins is None else
                   dataclasses.replace(tiny_cfg, num_bins=num_bins))
    _, z, task, prev, t0, noise, gamma = _inputs(model, SMALL, [0, 1], [True, False])
    for eval_mode in (True, False):  # one compiled graph; exploration noise added after it
        want, want_mean = plan(model, SMALL, z, task, prev, t0, eval_mode, noise, gamma)
        got, got_mean = plan(model, SMALL, z, task, prev, t0, eval_mode, noise, gamma,
                             "fp32+compile")
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_mean, want_mean, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- agent and CLI
def test_agent_plans_in_the_chosen_precision(tiny_cfg, tiny_planner):
    from tdmpc_opt.agent import Agent
    from tdmpc_opt.errors import ConfigError

    model = _model(tiny_cfg)
    exact = Agent(model, tiny_planner)
    fast = Agent(model, tiny_planner, precision="int8")
    assert exact.precision == "fp32" and fast.with_planner(iterations=1).precision == "int8"
    gens = [torch.Generator().manual_seed(3)]
    a = fast.act(torch.randn(24), task="walker-walk", t0=True, generators=gens)
    assert a.shape == (6,) and a.abs().max() <= 1
    with pytest.raises(ConfigError, match="precision must be one of"):
        Agent(model, tiny_planner, precision="fp16")


def test_bench_cli_smoke(tiny_cfg, tmp_path, capsys):
    import json

    from tdmpc_opt.checkpoints import save_checkpoint
    from tdmpc_opt.cli import main

    ckpt, out = tmp_path / "tiny.safetensors", tmp_path / "bench.json"
    save_checkpoint(ckpt, _model(tiny_cfg))
    assert main(["bench", "planner", "--checkpoint", str(ckpt), "--batch", "1,2",
                 "--precision", "fp32,int8", "--seconds", "0", "--literal-calls", "1",
                 "--agreement", "2", "--json", str(out), "num_samples=32", "num_elites=4",
                 "num_pi_trajs=4", "iterations=2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["batch"], r["precision"]) for r in rows] == \
        [(1, "fp32"), (2, "fp32"), (1, "int8"), (2, "int8")]
    assert all(r["env_steps_per_s"] > 0 and r["peak_gflops"] > 0 for r in rows)
    # a precision's rows are read against one peak, the highest it measured
    assert rows[0]["peak_gflops"] == rows[1]["peak_gflops"]
    assert all(r["x_floor"] == pytest.approx(r["ms_per_call"] / r["floor_ms"]) for r in rows)
    assert rows[0]["products"] == "native"
    assert rows[2]["products"] in ("native", "int8 kernel", "float32 BLAS")
    printed = capsys.readouterr()
    assert rows[2]["agreement"]["action_max"] >= 0 and "vs literal" in printed.out
    # each row is reported on stderr as soon as it is measured; the table at the end
    progress = [line for line in printed.err.splitlines() if line.startswith("bench: ")]
    assert [line.split(" ms per call")[0].rsplit(": ", 1)[0] for line in progress] == \
        ["bench: fp32, batch 1", "bench: fp32, batch 2", "bench: int8, batch 1",
         "bench: int8, batch 2"]
    assert main(["bench", "planner", "--checkpoint", str(ckpt), "--precision", "fp8"]) == 2


def test_bench_says_before_a_compiling_precision(tiny_cfg, monkeypatch, capsys):
    """+compile rows start with minutes of compilation: the bench says so before them."""
    from tdmpc_opt.agent import Agent
    from tdmpc_opt.cli import bench

    monkeypatch.setattr(bench, "time_planner", lambda *a: {"median_s": 0.02, "best_s": 0.02,
                                                            "cpu_s": 0.02, "calls": 3})
    monkeypatch.setattr(bench, "matmul_peak", lambda *a, **k: 100.0)
    agent = Agent(_model(tiny_cfg), SMALL)
    rows = bench.bench_rows(agent, [1], ["fp32", "fp32+compile"], 0.0, None, 0)
    assert [r["precision"] for r in rows] == ["fp32", "fp32+compile"]
    err = capsys.readouterr().err.splitlines()
    assert err == ["bench: fp32, batch 1: 20.0 ms per call",
                   "bench: fp32+compile: the first plan of each batch size compiles first "
                   "(minutes; inductor caches it on disk for later runs)",
                   "bench: fp32+compile, batch 1: 20.0 ms per call"]


def test_planning_flops_of_the_1m_model():
    from tdmpc_opt.cli.bench import planning_flops
    from tdmpc_opt.config import model_config_for
    from tdmpc_opt.tasks import TASK_SETS

    flops = planning_flops(model_config_for(TASK_SETS["mt30"], 1), PlannerConfig())
    assert flops["tdmpc2"] == pytest.approx(15.2e9, rel=0.01)  # the 7.6 GMAC
    assert flops["executed"] < 0.81 * flops["tdmpc2"]


def test_wide_codes_decode_and_multiply_exactly():
    """Two int8 planes decode to within 1/256 of an int8 step, and ``Dense.wide`` is the
    float product of the decoded codes with the int8 weights (one _int_mm of 2M rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 48, generator=g)
    scale = x.abs().amax(-1, keepdim=True) / 127
    codes, _ = quantize_rows_wide(x, scale)
    assert codes.dtype == torch.int8 and codes.shape == (20, 48)
    decoded = (codes[:10].float() + codes[10:].float() / WIDE_PLANE) * scale
    assert ((decoded - x).abs() <= scale * (0.5 / WIDE_PLANE + 1e-5)).all()
    dense = Dense(torch.randn(30, 48, generator=g), torch.randn(30, generator=g), "int8")
    weight = dense.weight[:, :30].float() * dense.scale[:30]
    torch.testing.assert_close(dense.wide(codes, scale), decoded @ weight + dense.bias[:30],
                               rtol=1e-5, atol=1e-5)
    err_wide = (dense.wide(codes, scale) - dense.bias[:30] - x @ weight).abs().mean()
    err_int8 = (dense(x) - dense.bias[:30] - x @ weight).abs().mean()
    assert err_wide < err_int8 / 50


@torch.no_grad()
def test_wide_networks_predict_closer_to_float32(tiny_cfg):
    """int8 with 15-bit codes into the dynamics and Q output products: the next latent and Q
    move closer to float32; other networks are untouched; bad names are refused."""
    model = _model(tiny_cfg)
    exact = FastWorldModel(model)
    narrow = FastWorldModel(model, "int8", False, wide=())
    wide = FastWorldModel(model, "int8", False)  # PyTorch ops: no reference-row codes
    assert wide.wide == WIDE_DEFAULT == {"dyn", "q"} and not wide.ref_codes
    assert FastWorldModel(model, "bf16").wide == set()
    task = torch.tensor([0, 1, 2])
    z = exact.to_internal(model.encode(torch.randn(3, tiny_cfg.obs_dim), task))
    z = z[:, None].expand(3, 40, -1).contiguous()
    rows, a = exact.task_rows(task, 3), torch.rand(3, 40, tiny_cfg.action_dim) * 2 - 1
    bias = torch.stack([exact.dyn1["task"][rows], exact.rew1["task"][rows]])

    def predictions(fm):
        nxt, rew = fm.dyn_rew(fm.first_layers(a, bias, z.reshape(120, -1)))
        return nxt, rew, fm.q_members(z, a, rows, [0, 1])

    ref, got_narrow, got_wide = predictions(exact), predictions(narrow), predictions(wide)
    err = [[(x - r).abs().mean() for x, r in zip(p, ref, strict=True)]
           for p in (got_narrow, got_wide)]
    assert err[1][0] < err[0][0] and err[1][2] < err[0][2]   # latent, Q: closer
    assert torch.equal(got_narrow[1], got_wide[1])          # reward: the same numbers
    with pytest.raises(ValueError, match="wide"):
        FastWorldModel(model, "int8", wide=["dynamics"])
