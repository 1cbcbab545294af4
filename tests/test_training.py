"""The TD-MPC2 update: loss terms against hand-written formulas, the whole update against a
literal transcription of TD-MPC2's loops, gradient isolation, overfitting, resuming."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt.config import ConfigError, PlannerConfig, apply_overrides
from tdmpc_opt.data import DatasetWriter
from tdmpc_opt.replay import SequenceSampler
from tdmpc_opt.runs import RunDir
from tdmpc_opt.trainer import build_learner, train_offline
from tdmpc_opt.training import (
    Batch,
    RunningScale,
    TDMPC2Learner,
    TrainConfig,
    consistency_loss,
    policy_loss,
    reward_loss,
    value_loss,
)
from tdmpc_opt.world_model import WorldModel

H, B = 3, 16


def random_batch(cfg, b=B, h=H, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, cfg.num_tasks, (b,), generator=g) if cfg.multitask else None
    return Batch(torch.randn(h + 1, b, cfg.obs_dim, generator=g),
                 torch.rand(h, b, cfg.action_dim, generator=g) * 2 - 1,
                 torch.rand(h, b, 1, generator=g) * 3,
                 torch.zeros(h, b, 1), task)


# ------------------------------------------------------------------- loss formulas
def test_loss_terms_match_loops(tiny_cfg):
    g = torch.Generator().manual_seed(1)
    rho, bins = 0.5, tiny_cfg.num_bins
    z_pred, z_tgt = torch.randn(H, B, 16, generator=g), torch.randn(H, B, 16, generator=g)
    want = sum(F.mse_loss(z_pred[t], z_tgt[t]) * rho**t for t in range(H)) / H
    assert torch.allclose(consistency_loss(z_pred, z_tgt, rho), want)
    logits, r = torch.randn(H, B, bins, generator=g), torch.randn(H, B, 1, generator=g)
    want = sum(tm.soft_ce(logits[t], r[t], bins, -10, 10).mean() * rho**t for t in range(H)) / H
    assert torch.allclose(reward_loss(logits, r, rho, tiny_cfg), want)
    q = torch.randn(4, H, B, bins, generator=g)
    want = sum(tm.soft_ce(q[k, t], r[t], bins, -10, 10).mean() * rho**t
               for t in range(H) for k in range(4)) / (H * 4)
    assert torch.allclose(value_loss(q, r, rho, tiny_cfg), want)
    qv, ent = torch.randn(H + 1, B, 1, generator=g), torch.randn(H + 1, B, 1, generator=g)
    w = rho ** torch.arange(H + 1)
    want = (-(1e-4 * ent + qv).mean(dim=(1, 2)) * w).mean()
    assert torch.allclose(policy_loss(qv, ent, rho, 1e-4), want)


def test_running_scale_percentiles():
    x = torch.randn(256, 1) * 7
    s = RunningScale(tau=0.01)
    s.update(x)
    p5, p95 = np.percentile(x.numpy(), [5, 95])  # numpy's linear interpolation = TD-MPC2's
    want = 1 + 0.01 * (max(p95 - p5, 1) - 1)
    assert s.value.item() == pytest.approx(want, rel=1e-5)
    assert torch.allclose(s(x), x / s.value)
    s2 = RunningScale(0.01)
    s2.update(torch.zeros(8, 1))
    assert s2.value.item() == 1.0  # a range below 1 is clamped to 1


def test_config_defaults_and_overrides():
    c = TrainConfig()
    assert (c.lr, c.enc_lr_scale, c.grad_clip_norm, c.tau, c.rho, c.batch_size, c.horizon) == \
        (3e-4, 0.3, 20.0, 0.01, 0.5, 256, 3)
    assert (c.consistency_coef, c.reward_coef, c.value_coef, c.termination_coef,
            c.entropy_coef) == (20.0, 0.1, 0.1, 1.0, 1e-4)
    assert c.discount(500) == pytest.approx(0.99) and c.discount(10) == 0.95
    c2 = apply_overrides(c, ["steps=1_000", "lr=1e-3", "seed_steps=none"])
    assert (c2.steps, c2.lr, c2.seed_steps) == (1000, 1e-3, None)
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        apply_overrides(c, ["batchsize=3"])
    with pytest.raises(ConfigError, match="rho"):
        apply_overrides(c, ["rho=0"])
    for bad in ("lr=nan", "tau=inf", "rho=-inf"):
        with pytest.raises(ConfigError, match="expected a finite number"):
            apply_overrides(c, [bad])
    with pytest.raises(ConfigError, match="temperature must be finite"):
        PlannerConfig(temperature=float("nan")).validate()


# --------------------------------------------------------- literal reference update
def _renorm(model, task):
    with torch.no_grad():
        for i in torch.unique(task).tolist():
            n = model._task_emb.weight[i].norm()
            if n > 1:
                model._task_emb.weight[i] *= 1 / (n + 1e-7)


def reference_update(model, optim, pi_optim, scale, cfg: TrainConfig, batch: Batch):
    """TD-MPC2's ``_update`` written out with its loops (dropout must be 0)."""
    obs, action, reward, terminated, task = batch
    c, mc = cfg, model.cfg
    th = task.expand(H, -1)
    _renorm(model, task)
    with torch.no_grad():
        next_z = model.encode(obs[1:], th)
        a = model.pi(next_z, th).action
        pair = torch.randperm(mc.num_q)[:2]
        q = model.decode(model.q_logits(next_z, a, th, target=True))[pair].min(0).values
        disc = torch.tensor([c.discount(n) for n in mc.episode_lengths])[task].unsqueeze(-1)
        td = reward + disc * (1 - terminated) * q
    model.train()
    z = model.encode(obs[0], task)
    zs, cons = [z], 0
    for t in range(H):
        z = model.next(z, action[t], task)
        cons = cons + F.mse_loss(z, next_z[t]) * c.rho**t
        zs.append(z)
    zs = torch.stack(zs)
    qs = model.q_logits(zs[:-1], action, th)
    rp = model.reward(zs[:-1], action, th)
    rl, vl = 0, 0
    for t in range(H):
        rl = rl + tm.soft_ce(rp[t], reward[t], mc.num_bins, mc.vmin, mc.vmax).mean() * c.rho**t
        for k in range(mc.num_q):
            vl = vl + tm.soft_ce(qs[k, t], td[t], mc.num_bins, mc.vmin, mc.vmax).mean() \
                * c.rho**t
    total = c.consistency_coef * cons / H + c.reward_coef * rl / H + \
        c.value_coef * vl / (H * mc.num_q)
    total.backward()
    params = [p for n, p in model.named_parameters() if not n.startswith("_pi.")]
    torch.nn.utils.clip_grad_norm_(params, c.grad_clip_norm)
    optim.step()
    optim.zero_grad(set_to_none=True)
    # policy: Q parameters frozen (TD-MPC2's detached Q copy)
    _renorm(model, task)
    zs = zs.detach()
    out = model.pi(zs, task.expand(H + 1, -1))
    model._Qs.requires_grad_(False)
    pair = torch.randperm(mc.num_q)[:2]
    qv = model.decode(model.q_logits(zs, out.action, task.expand(H + 1, -1))[pair]).mean(0)
    model._Qs.requires_grad_(True)
    x = qv[0].detach().flatten()
    srt, n = torch.sort(x).values, x.shape[0]
    rng = []
    for p in (5.0, 95.0):  # TD-MPC2's percentile positions
        pos = p * (n - 1) / 100
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        rng.append(srt[lo] * (1 - (pos - lo)) + srt[hi] * (pos - lo))
    scale.lerp_(torch.clamp(rng[1] - rng[0], min=1.0).reshape(1), c.tau)
    qv = qv / scale
    w = c.rho ** torch.arange(H + 1)
    pi_loss = (-(c.entropy_coef * out.scaled_entropy + qv).mean(dim=(1, 2)) * w).mean()
    pi_loss.backward()
    torch.nn.utils.clip_grad_norm_(model._pi.parameters(), c.grad_clip_norm)
    pi_optim.step()
    pi_optim.zero_grad(set_to_none=True)
    model.soft_update_target_q(c.tau)
    model.eval()
    return {"consistency_loss": cons / H, "reward_loss": rl / H,
            "value_loss": vl / (H * mc.num_q), "pi_loss": pi_loss}


def test_two_thread_updates_are_bit_reproducible(tiny_cfg):
    """Two learners from one seed on the same batches with two threads end bit-identical
    (the fused forward's task-table gather used to accumulate its gradient in a
    thread-timing order, so repeated runs drifted apart in the last bits)."""
    torch.set_num_threads(2)  # the autouse fixture restores one thread
    cfg = dataclasses.replace(tiny_cfg, enc_dim=64, mlp_dim=64, latent_dim=32, task_dim=16)
    batch = random_batch(cfg, b=64)  # big enough for the gather's backward to use 2 threads

    def learn() -> dict[str, torch.Tensor]:
        learner = build_learner(cfg, TrainConfig(batch_size=64, seed=1))
        torch.manual_seed(7)
        for _ in range(8):
            learner.update(batch)
        return learner.model.state_dict()

    first, second = learn(), learn()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("fused", [True, False])
def test_update_matches_literal_reference(tiny_cfg, fused):
    mc = dataclasses.replace(tiny_cfg, dropout=0.0)
    cfg = TrainConfig(batch_size=B, fused=fused)
    torch.manual_seed(0)
    ours = TDMPC2Learner(WorldModel(mc), cfg)
    ref = WorldModel(mc)
    ref.load_state_dict(ours.model.state_dict())
    with torch.no_grad():  # embeddings longer than 1 exercise the max-norm renormalisation
        ours.model._task_emb.weight.mul_(40)
        ref._task_emb.weight.mul_(40)
    ref_opt = torch.optim.Adam(TDMPC2Learner(ref, cfg).optim.param_groups, lr=cfg.lr)
    ref_pi = torch.optim.Adam(ref._pi.parameters(), lr=cfg.lr, eps=1e-5)
    scale = torch.ones(1)
    for i in range(4):
        batch = random_batch(mc, seed=i)
        torch.manual_seed(100 + i)
        got = ours.update(batch)
        torch.manual_seed(100 + i)
        want = reference_update(ref, ref_opt, ref_pi, scale, cfg, batch)
        for k, v in want.items():
            assert got[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-8), k
        # the policy loss's task-embedding gradient waits for the next model step
        assert torch.allclose(ours.model._task_emb.weight.grad, ref._task_emb.weight.grad)
    for (name, p), q in zip(ours.model.state_dict().items(), ref.state_dict().values(),
                            strict=True):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert torch.allclose(ours.scale.value, scale)


def test_policy_loss_leaves_q_untouched(tiny_single_cfg):
    learner = TDMPC2Learner(WorldModel(tiny_single_cfg), TrainConfig(batch_size=B))
    zs = torch.randn(H + 1, B, 16)
    learner.model.train()
    out = learner.model.pi(zs, None)
    q = learner.detached_q(zs, out.action, None, torch.tensor([0, 3]))
    q.sum().backward()
    assert all(p.grad is None for p in learner.model._Qs.parameters())
    assert all(p.grad is not None for p in learner.model._pi.parameters())
    before = [p.clone() for p in learner.model._Qs.parameters()]
    for p in learner.model.parameters():
        p.grad = None
    learner.update_pi(zs, None)
    assert all(torch.equal(a, b) for a, b in zip(before, learner.model._Qs.parameters(),
                                                 strict=True))


def test_extra_losses_hook(tiny_cfg):
    learner = TDMPC2Learner(WorldModel(tiny_cfg), TrainConfig(batch_size=B))
    seen = {}

    def extra(batch, ro):
        seen["zs"] = ro.zs.shape
        seen["q"] = ro.q_logits.shape
        return {"distill": (0.5, ro.reward_logits.pow(2).mean())}

    m = learner.update(random_batch(tiny_cfg), extra_losses=extra)
    assert seen == {"zs": (H + 1, B, 16), "q": (2, H, B, 101)}
    base = 20 * m["consistency_loss"] + 0.1 * (m["reward_loss"] + m["value_loss"])
    assert m["total_loss"] == pytest.approx(base + 0.5 * m["distill_loss"], rel=1e-5)


# ---------------------------------------------------------- overfitting and resuming
def tiny_dataset(path, cfg, episodes=6, steps=40, seed=0):
    """Episodes whose reward is a smooth function of observation and action."""
    rng = np.random.default_rng(seed)
    w = DatasetWriter(path, cfg.tasks, cfg.obs_dim, cfg.action_dim)
    for e in range(episodes):
        obs = rng.standard_normal((1, steps, cfg.obs_dim)).astype(np.float32)
        act = rng.uniform(-1, 1, (1, steps, cfg.action_dim)).astype(np.float32)
        rew = np.zeros((1, steps), np.float32)
        rew[:, 1:] = 1 + np.tanh(obs[:, :-1, 0] + act[:, 1:, 0])
        w.add_episodes(obs, act, rew, np.array([e % max(cfg.num_tasks, 1)]))
    return w.close()


def test_overfits_tiny_dataset(tiny_cfg, tmp_path):
    ds = tiny_dataset(tmp_path / "ds", tiny_cfg)
    cfg = TrainConfig(batch_size=64, steps=300, lr=1e-3)
    learner = build_learner(tiny_cfg, cfg)
    sampler = SequenceSampler(ds, 64, 3, seed=0, task_map=np.arange(3))
    first = learner.update(sampler.sample())
    for _ in range(cfg.steps):
        last = learner.update(sampler.sample())
    assert last["reward_loss"] < 0.4 * first["reward_loss"], (first, last)
    assert last["value_loss"] < 0.5 * first["value_loss"], (first, last)
    assert last["consistency_loss"] < first["consistency_loss"]


def _run(tmp_path, name, cfg, mc, ds, resume=False):
    learner = build_learner(mc, cfg)
    sampler = SequenceSampler(ds, cfg.batch_size, cfg.horizon, seed=cfg.seed,
                              task_map=np.arange(mc.num_tasks))
    run = RunDir(tmp_path / name)
    train_offline(learner, sampler, run, resume=resume)
    return learner, run


@pytest.mark.parametrize("speed", [{}, pytest.param({"compile": True, "bf16": True},
                                                   marks=pytest.mark.slow, id="compile-bf16")])
def test_resume_gives_identical_parameters(tiny_cfg, tmp_path, speed):
    ds = tiny_dataset(tmp_path / "ds", tiny_cfg)
    cfg = TrainConfig(batch_size=16, steps=12, checkpoint_freq=5, log_freq=2, **speed)
    straight, _ = _run(tmp_path, "a", cfg, tiny_cfg, ds)
    # "killed" after 7 updates: its newest checkpoint is step 5 (and the end-of-run one at 7)
    _, run_b = _run(tmp_path, "b", dataclasses.replace(cfg, steps=7), tiny_cfg, ds)
    run_b.checkpoint_path(7).unlink()  # as if killed before step 7 was saved
    resumed, _ = _run(tmp_path, "b", cfg, tiny_cfg, ds, resume=True)
    assert resumed.step == 12
    for (k, a), b in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert torch.equal(straight.scale.value, resumed.scale.value)
    steps = [int(r.split(",")[0]) for r in (run_b.path / "train.csv").read_text().split()[1:]]
    assert steps == [2, 4, 6, 8, 10, 12]


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_interrupt_checkpoints_the_update_under_way(tiny_cfg, tmp_path, sig):
    """Ctrl-C, SIGTERM or SIGHUP (raised as the CLI raises them) arriving in update 7, with
    no checkpoint due before step 12: update 7 finishes, is checkpointed, and the run resumed
    from it equals an uninterrupted one (without the checkpoint 7 updates would be lost)."""
    import os
    import signal

    from tdmpc_opt.cli import Terminated, _stops_as_interrupt

    ds = tiny_dataset(tmp_path / "ds", tiny_cfg)
    cfg = TrainConfig(batch_size=16, steps=12, checkpoint_freq=12, log_freq=2)
    straight, _ = _run(tmp_path, "a", cfg, tiny_cfg, ds)

    learner = build_learner(tiny_cfg, cfg)
    sampler = SequenceSampler(ds, cfg.batch_size, cfg.horizon, seed=cfg.seed,
                              task_map=np.arange(tiny_cfg.num_tasks))
    real_sample, calls = sampler.sample, []

    def sample():
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), getattr(signal, sig))  # lands before update 7 has run
        return real_sample()

    sampler.sample = sample
    run = RunDir(tmp_path / "b")
    stopped = KeyboardInterrupt if sig == "SIGINT" else Terminated
    with pytest.raises(stopped), _stops_as_interrupt():
        train_offline(learner, sampler, run)
    assert learner.step == 7 and sorted(p.name for p in run.ckpt_dir.glob("step-*.pt")) == [
        run.checkpoint_path(7).name]
    resumed, _ = _run(tmp_path, "b", cfg, tiny_cfg, ds, resume=True)
    assert resumed.step == 12
    for (k, a), b in zip(straight.model.state_dict().items(),
                         resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("size", [1])
def test_published_size_update_runs(size):
    from tdmpc_opt.config import model_config_for
    from tdmpc_opt.tasks import TASK_SETS

    mc = model_config_for(TASK_SETS["mt30"], size)
    learner = TDMPC2Learner(WorldModel(mc), TrainConfig(batch_size=8))
    m = learner.update(random_batch(mc, b=8))
    assert all(np.isfinite(v) for v in m.values())
    assert learner.optim.param_groups[0]["lr"] == pytest.approx(3e-4 * 0.3)


# ---------------------------------------------------------------- fused forward passes
def test_fast_mish_matches_f_mish():
    from tdmpc_opt.train_forward import mish

    x = torch.cat([torch.linspace(-30, 30, 2001), torch.tensor([-100.0, 0.0, 100.0])])
    x.requires_grad_(True)
    y = mish(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = F.mish(x2)
    (gx2,) = torch.autograd.grad(y2.sum(), x2)
    assert torch.allclose(y, y2, rtol=1e-6, atol=1e-7)
    assert torch.allclose(gx, gx2, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fixture", ["tiny_cfg", "tiny_single_cfg"])
def test_fused_nets_match_model(fixture, request):
    from tdmpc_opt.train_forward import FusedNets, ModelNets

    mc = request.getfixturevalue(fixture)
    model = WorldModel(mc)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialised heads would hide bugs
        if mc.multitask:
            model._task_emb.weight.mul_(30)  # norms > 1: the renormalisation path
    model.train()
    batch = random_batch(mc)
    task = batch.task
    task_h = None if task is None else task.expand(H, -1)
    members = torch.tensor([1, 0])
    outs = []
    for nets in (ModelNets(model), FusedNets(model)):
        torch.manual_seed(5)
        z = nets.encode(batch.obs[0], task)
        z1 = nets.next(z.expand(H, -1, -1), batch.action, task_h)
        r, q = nets.heads(z1, batch.action, task_h)
        pi = nets.pi(z1, task_h)
        qd = nets.q_members(z1, pi.action, task_h, members, detach=True)
        qt = nets.q_members(z1, batch.action, task_h, members, target=True)
        loss = z1.sum() + r.sum() + q.sum() + qd.sum() + qt.sum() + pi.scaled_entropy.sum()
        grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                    allow_unused=True)
        outs.append(([z1, r, q, pi.action, pi.scaled_entropy, qd, qt], grads))
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for n, a, b in zip(names, *[o[1] for o in outs], strict=True):
        assert (a is None) == (b is None), n
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-5), n


# --------------------------------------------------------- mixed precision, compilation
def _losses_over_updates(mc, cfg: TrainConfig, n: int) -> list[dict]:
    torch.manual_seed(0)
    learner = TDMPC2Learner(WorldModel(mc), cfg)
    out = []
    for i in range(n):
        torch.manual_seed(100 + i)
        out.append(learner.update(random_batch(mc, b=64, seed=i)))
    return out


def test_bf16_losses_follow_float32(tiny_cfg):
    """bfloat16 products (autocast) move every loss by about 1% over several updates."""
    mc = dataclasses.replace(tiny_cfg, dropout=0.0)
    ref = _losses_over_updates(mc, TrainConfig(batch_size=64), 6)
    got = _losses_over_updates(mc, TrainConfig(batch_size=64, bf16=True), 6)
    for r, g in zip(ref, got, strict=True):
        for k in ("consistency_loss", "reward_loss", "value_loss"):
            assert g[k] == pytest.approx(r[k], rel=0.02), k
        assert abs(g["pi_loss"] - r["pi_loss"]) < 0.02 * max(1.0, abs(r["pi_loss"]))
        assert all(np.isfinite(v) for v in g.values())


def test_bf16_output_layers_stay_float32(tiny_cfg):
    """Under bf16 autocast the bins and the policy head are computed in float32."""
    from tdmpc_opt.train_forward import FusedNets

    torch.manual_seed(0)
    model = WorldModel(tiny_cfg)
    with torch.no_grad():  # TD-MPC2 starts the bin heads at zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    nets, b = FusedNets(model), random_batch(tiny_cfg)
    z = nets.encode(b.obs[0], b.task)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r, q = nets.heads(z, b.action[0], b.task)
        raw = nets._mlp(model._pi, z, b.task)
    r32, q32 = nets.heads(z, b.action[0], b.task)
    assert r.dtype == q.dtype == raw.dtype == torch.float32
    assert not torch.equal(q, q32)  # the hidden layers did run in bf16
    for got, want in ((q, q32), (r, r32)):  # the same function, rounded (measured: ~6% of
        assert (got - want).abs().mean() < 0.1 * want.abs().mean()  # these random logits)
    with pytest.raises(ConfigError, match="bf16=true needs fused=true"):
        TrainConfig(bf16=True, fused=False).validate()


def test_compiled_update_equals_eager(tiny_single_cfg):
    """``compile=true`` computes the same update (without dropout the random draws agree)."""
    mc = dataclasses.replace(tiny_single_cfg, dropout=0.0)
    ref = _losses_over_updates(mc, TrainConfig(batch_size=64), 3)
    got = _losses_over_updates(mc, TrainConfig(batch_size=64, compile=True), 3)
    for r, g in zip(ref, got, strict=True):
        for k in ("consistency_loss", "reward_loss", "value_loss", "pi_loss", "grad_norm"):
            assert g[k] == pytest.approx(r[k], rel=1e-4, abs=1e-6), k


def test_bf16_rollout_is_float32(tiny_cfg):
    """Every Rollout field and the policy's output are float32 under ``bf16=true``."""
    mc = dataclasses.replace(tiny_cfg, episodic=True)
    learner = TDMPC2Learner(WorldModel(mc), TrainConfig(batch_size=16, bf16=True))
    batch = random_batch(mc)
    with learner.autocast():
        ro, losses = learner._rollout_and_losses(batch)
        q, out = learner._pi_objective(ro.zs.detach(), batch.task.expand(H + 1, -1))
    for name in ("zs", "next_z", "reward_logits", "q_logits", "td_target",
                 "termination_logits"):
        assert getattr(ro, name).dtype == torch.float32, name
    assert q.dtype == out.action.dtype == out.scaled_entropy.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses.values())
