"""Distillation: the paper's loss and our extra terms, live teacher vs cache, bad input."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from tdmpc_opt.config import model_config_for
from tdmpc_opt.data import DatasetWriter
from tdmpc_opt.distillation import (
    DistillConfig,
    Distiller,
    check_compatible,
    imagined_targets,
    planner_like_actions,
    teacher_targets,
)
from tdmpc_opt.errors import ConfigError, DataError
from tdmpc_opt.teacher_cache import TeacherCache, build_cache
from tdmpc_opt.training import Batch, TDMPC2Learner, TrainConfig
from tdmpc_opt.world_model import WorldModel

ALL_TERMS = DistillConfig(reward_coef=0.45, reward_horizon_coef=1.0, value_coef=1.0,
                          policy_coef=1.0, latent_coef=1.0)


def _batch(cfg, b=8, h=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    task = torch.randint(0, cfg.num_tasks, (b,), generator=g)
    mask = torch.zeros(cfg.num_tasks, cfg.action_dim)
    for i, d in enumerate(cfg.action_dims):
        mask[i, :d] = 1
    action = (torch.rand(h, b, cfg.action_dim, generator=g) * 2 - 1) * mask[task]
    return Batch(torch.randn(h + 1, b, cfg.obs_dim, generator=g), action,
                 torch.rand(h, b, 1, generator=g), torch.zeros(h, b, 1), task)


def _nontrivial(model):
    with torch.no_grad():
        torch.nn.init.normal_(model._reward[-1].weight, std=0.3)
        torch.nn.init.normal_(model._Qs.params[-1].weight, std=0.3)
    return model


def test_loss_is_zero_when_student_is_the_teacher(tiny_cfg):
    student = _nontrivial(WorldModel(tiny_cfg)).eval()
    teacher = copy.deepcopy(student)
    dist = Distiller(student, DistillConfig(reward_coef=0.45, reward_horizon_coef=0.0,
                                            value_coef=0.0, policy_coef=1.0))
    learner = TDMPC2Learner(student, TrainConfig())
    batch = _batch(tiny_cfg)
    ro = learner.rollout(batch)
    student.eval()
    targets = teacher_targets(teacher, batch.obs[:-1], batch.action, batch.task)
    losses = dist.losses(batch, ro, targets)
    assert set(losses) == {"distill_reward", "distill_policy"}
    for name, (_, value) in losses.items():
        assert value.item() == pytest.approx(0.0, abs=1e-6), name  # float32 rounding


def test_gradient_reaches_only_the_student(tiny_cfg):
    student = _nontrivial(WorldModel(tiny_cfg))
    teacher = _nontrivial(WorldModel(tiny_cfg))
    dist = Distiller(student, ALL_TERMS, teacher_latent_dim=teacher.cfg.latent_dim)
    learner = TDMPC2Learner(student, TrainConfig())
    batch = _batch(tiny_cfg)
    ro = learner.rollout(batch)
    targets = teacher_targets(teacher, batch.obs[:-1], batch.action, batch.task, latent=True)
    total = sum(c * v for c, v in dist.losses(batch, ro, targets).values())
    total.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student._encoder["state"][0].weight.grad is not None
    assert student._pi[0].weight.grad is not None
    assert dist.projection.weight.grad is not None


def _dataset(tmp_path, cfg, episodes=6, steps=12, seed=0):
    rng = np.random.default_rng(seed)
    with DatasetWriter(tmp_path / "data", cfg.tasks, cfg.obs_dim, cfg.action_dim) as w:
        w.add_episodes(rng.normal(size=(episodes, steps, cfg.obs_dim)).astype(np.float32),
                       rng.uniform(-1, 1, (episodes, steps, cfg.action_dim)).astype(np.float32),
                       rng.uniform(0, 1, (episodes, steps)).astype(np.float32),
                       np.arange(episodes) % cfg.num_tasks)
        return w.close()


def test_cached_and_live_teacher_give_the_same_loss(tiny_cfg, tmp_path):
    from tdmpc_opt.replay import SequenceSampler

    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    student = _nontrivial(WorldModel(tiny_cfg))
    ds = _dataset(tmp_path, tiny_cfg)
    cache = build_cache(teacher, "sha-teacher", ds, tmp_path / "cache",
                        np.arange(tiny_cfg.num_tasks), latent=True, chunk=7)
    sampler = SequenceSampler(ds, 16, 3, seed=1, task_map=np.arange(tiny_cfg.num_tasks))
    rows, tasks = sampler.sample_rows()
    batch = sampler.batch_at(rows, tasks)
    live = teacher_targets(teacher, batch.obs[:-1], batch.action, batch.task, latent=True)
    cached = cache.targets(rows)
    for a, b in zip(live, cached, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)
    dist = Distiller(student, ALL_TERMS, teacher_latent_dim=tiny_cfg.latent_dim)
    ro = TDMPC2Learner(student, TrainConfig()).rollout(batch)
    l_live = dist.losses(batch, ro, live)
    l_cached = dist.losses(batch, ro, cached)
    for k in l_live:
        assert l_live[k][1].item() == pytest.approx(l_cached[k][1].item(), rel=1e-5, abs=1e-7)


def test_cache_refuses_another_teacher_or_dataset(tiny_cfg, tmp_path):
    teacher = WorldModel(tiny_cfg).eval()
    ds = _dataset(tmp_path, tiny_cfg)
    cache = build_cache(teacher, "sha-a", ds, tmp_path / "cache", np.arange(3))
    cache.check("sha-a", ds)
    with pytest.raises(DataError, match="another teacher"):
        TeacherCache(tmp_path / "cache").check("sha-b", ds)
    (tmp_path / "other").mkdir()
    other = _dataset(tmp_path / "other", tiny_cfg, seed=1)
    with pytest.raises(DataError, match="another dataset"):
        cache.check("sha-a", other)


def test_interrupted_cache_build_continues_where_it_stopped(tiny_cfg, tmp_path, monkeypatch):
    """Ctrl-C after 3 chunks of 7 rows: the build started again computes only the rest and
    writes the same bytes as an uninterrupted build; with another teacher it starts over."""
    import tdmpc_opt.teacher_cache as tc

    monkeypatch.setattr(tc, "PROGRESS_EVERY_S", 0.0)  # record after every chunk
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    ds = _dataset(tmp_path, tiny_cfg)
    n, tasks = ds.obs.shape[0], np.arange(tiny_cfg.num_tasks)
    straight = build_cache(teacher, "sha-a", ds, tmp_path / "straight", tasks, chunk=7)
    rows = []

    def interrupt_after_3_chunks(k):
        rows.append(k)
        if len(rows) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(teacher, "sha-a", ds, tmp_path / "cache", tasks, chunk=7,
                    progress=interrupt_after_3_chunks)
    assert not (tmp_path / "cache").exists() and (tmp_path / "cache.partial").is_dir()
    rows.clear()
    cache = build_cache(teacher, "sha-a", ds, tmp_path / "cache", tasks, chunk=7,
                        progress=rows.append)
    assert rows[0] == 21 and sum(rows) == n  # the 3 recorded chunks skipped, the rest computed
    assert not (tmp_path / "cache.partial").exists()
    for name in straight.meta["fields"]:
        assert (cache.path / f"{name}.npy").read_bytes() == \
            (straight.path / f"{name}.npy").read_bytes(), name
    assert cache.meta == straight.meta
    with pytest.raises(KeyboardInterrupt):  # interrupted again, then another teacher
        rows.clear()
        build_cache(teacher, "sha-a", ds, tmp_path / "other", tasks, chunk=7,
                    progress=interrupt_after_3_chunks)
    rows.clear()
    build_cache(teacher, "sha-b", ds, tmp_path / "other", tasks, chunk=7, progress=rows.append)
    assert rows[0] == 7 and sum(rows) == n


def test_incompatible_teacher_is_refused(tiny_cfg):
    other = model_config_for(("walker-walk", "cartpole-balance"), None, enc_dim=16, mlp_dim=16,
                             latent_dim=16, task_dim=8)
    with pytest.raises(ConfigError, match="different task sets"):
        check_compatible(WorldModel(other), WorldModel(tiny_cfg))
    single = model_config_for(("cheetah-run",), None, enc_dim=16, mlp_dim=16, latent_dim=16)
    single2 = model_config_for(("cartpole-balance",), None, enc_dim=16, mlp_dim=16,
                               latent_dim=16)
    with pytest.raises(ConfigError):
        check_compatible(WorldModel(single), WorldModel(single2))
    with pytest.raises(ConfigError, match=">= 0"):
        DistillConfig(reward_coef=-0.1).validate()


def test_tiny_distillation_run_lowers_the_distillation_loss(tiny_cfg):
    torch.manual_seed(0)
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    student = WorldModel(tiny_cfg)
    dist = Distiller(student, DistillConfig(reward_coef=1.0, reward_horizon_coef=1.0,
                                            value_coef=0.5, policy_coef=0.5))
    learner = TDMPC2Learner(student, TrainConfig(lr=3e-3))
    batch = _batch(tiny_cfg, b=32)
    targets = teacher_targets(teacher, batch.obs[:-1], batch.action, batch.task)
    first = last = None
    for _ in range(150):
        m = learner.update(batch, dist.hook(targets))
        dist.after_update()
        first = first or m["distill_reward_loss"]
        last = m["distill_reward_loss"]
    assert last < 0.2 * first


def _distill_run(tiny_cfg, ds, teacher, cache_dir, dcfg, steps=6):
    from tdmpc_opt.distill_trainer import distill_offline
    from tdmpc_opt.trainer import build_learner

    cfg = TrainConfig(steps=steps, batch_size=8, eval_freq=0, seed=3)
    learner = build_learner(tiny_cfg, cfg)
    distill_offline(learner, teacher, "sha-t", ds, np.arange(3), dcfg, None,
                    cache_dir=cache_dir)
    return learner.model.state_dict()


def test_training_with_cache_equals_training_with_live_teacher(tiny_cfg, tmp_path):
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    ds = _dataset(tmp_path, tiny_cfg)
    dcfg = DistillConfig(reward_coef=0.45, reward_horizon_coef=0.5, value_coef=0.1,
                         policy_coef=0.1)
    live = _distill_run(tiny_cfg, ds, teacher, None, dcfg)
    cached = _distill_run(tiny_cfg, ds, teacher, tmp_path / "cache", dcfg)
    for k in live:
        assert torch.allclose(live[k], cached[k], atol=1e-6), k


def test_distill_cli_runs_and_refuses_foreign_data(tiny_cfg, tmp_path, capsys):
    from tdmpc_opt.checkpoints import save_checkpoint
    from tdmpc_opt.cli import main

    teacher_path = tmp_path / "teacher.safetensors"
    save_checkpoint(teacher_path, _nontrivial(WorldModel(tiny_cfg)))
    ds = _dataset(tmp_path, tiny_cfg)
    args = ["distill", "--teacher", str(teacher_path), "--data", str(ds.path), "--quiet",
            "--cache-teacher", "--run-dir", str(tmp_path / "run"), "enc_dim=16", "mlp_dim=16",
            "latent_dim=16", "task_dim=8", "steps=4", "batch_size=8", "eval_freq=0"]
    assert main(args) == 0
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "teacher-cache" / "meta.json").is_file()
    other = model_config_for(("walker-walk", "cartpole-balance", "cup-catch"), None,
                             enc_dim=16, mlp_dim=16, latent_dim=16, task_dim=8)
    save_checkpoint(tmp_path / "other.safetensors", WorldModel(other))
    args[2] = str(tmp_path / "other.safetensors")
    args[args.index("--run-dir") + 1] = str(tmp_path / "run2")
    assert main(args) == 2
    assert "outside the teacher's task set" in capsys.readouterr().err
    narrow = tmp_path / "narrow"  # rows of 7 observations for a teacher that takes more
    narrow.mkdir()
    small = dataclasses.replace(tiny_cfg, obs_dim=7)
    nds = _dataset(narrow, small)
    args[2] = str(teacher_path)
    args[args.index("--data") + 1] = str(nds.path)
    args[args.index("--run-dir") + 1] = str(tmp_path / "run3")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"dataset rows are 7 obs / {tiny_cfg.action_dim} actions; the model takes " \
        f"{tiny_cfg.obs_dim} / {tiny_cfg.action_dim}" in err and "Traceback" not in err


# ------------------------------------------------------------------ the plan term
def test_planner_like_actions_stay_in_range_keep_padding_and_vary(tiny_cfg):
    torch.manual_seed(0)
    batch = _batch(tiny_cfg, b=16)
    task = batch.task.repeat(4)
    mask = WorldModel(tiny_cfg).action_mask(task)
    acts = planner_like_actions(batch.action, 4, 0.05, 2.0, mask)
    assert acts.shape == (3, 64, tiny_cfg.action_dim)
    assert acts.abs().max() <= 1
    assert torch.equal(acts * (1 - mask), torch.zeros_like(acts))
    # rows k*B+b perturb start b: small-std rows stay near the data's action, all differ
    dist = (acts - batch.action.repeat(1, 4, 1)).abs().amax(dim=(0, 2))
    assert dist.min() < 0.3 and dist.max() > 0.9


def test_plan_term_is_lower_for_the_teacher_itself_and_needs_the_teacher(tiny_cfg):
    torch.manual_seed(0)
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    twin, other = copy.deepcopy(teacher), _nontrivial(WorldModel(tiny_cfg))
    cfg = DistillConfig(reward_coef=0.0, plan_coef=1.0)
    batch = _batch(tiny_cfg)
    values = {}
    for name, student in (("twin", twin), ("other", other)):
        torch.manual_seed(1)  # the same sampled action sequences for both
        learner = TDMPC2Learner(student, TrainConfig())
        ro = learner.rollout(batch)
        student.eval()  # no dropout: the twin reproduces the teacher exactly
        out = Distiller(student, cfg, teacher=teacher).losses(batch, ro, None)
        assert set(out) == {"distill_plan"}
        values[name] = out["distill_plan"][1].item()
    assert values["twin"] < values["other"]
    with pytest.raises(ConfigError, match="live teacher"):
        Distiller(twin, cfg)
    with pytest.raises(ConfigError, match="plan_samples"):
        DistillConfig(plan_samples=0).validate()


def test_plan_term_matches_the_models_own_methods(tiny_cfg):
    """The fused plan term computes what a rollout through WorldModel's methods does."""
    from tdmpc_opt.distillation import horizon_reward_loss, imagined_rollout_loss
    from tdmpc_opt.training import value_loss

    torch.manual_seed(0)
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    student = _nontrivial(WorldModel(tiny_cfg)).eval()
    batch = _batch(tiny_cfg)
    task = batch.task.repeat(4)
    acts = planner_like_actions(batch.action, 4, 0.05, 2.0, teacher.action_mask(task))
    obs0 = batch.obs[0].repeat(4, 1)
    with torch.no_grad():  # the literal rollouts
        z, t_r, t_q = teacher.encode(obs0, task), [], []
        for a in acts:
            t_r.append(teacher.decode(teacher.reward(z, a, task)))
            t_q.append(teacher.decode(teacher.q_logits(z, a, task)).mean(0))
            z = teacher.next(z, a, task)
    want_r, want_q = torch.stack(t_r), torch.stack(t_q)
    got_r, got_q = imagined_targets(teacher, obs0, acts, task)
    assert torch.allclose(got_r, want_r, atol=1e-5) and torch.allclose(got_q, want_q, atol=1e-5)
    z0 = student.encode(obs0, task)
    z, rl, ql = z0, [], []
    for a in acts:
        rl.append(student.reward(z, a, task))
        ql.append(student.q_logits(z, a, task))
        z = student.next(z, a, task)
    want = horizon_reward_loss(torch.stack(rl), want_r, student, 0.5) + \
        value_loss(torch.stack(ql, dim=1), want_q, 0.5, student.cfg)
    got = imagined_rollout_loss(student, z0, acts, task, want_r, want_q, 0.5)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    (g_got,) = torch.autograd.grad(got, student._dynamics[0].weight, retain_graph=True)
    (g_want,) = torch.autograd.grad(want, student._dynamics[0].weight)
    assert torch.allclose(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_plan_term_training_teaches_the_teachers_ranking(tiny_cfg):
    """A plan-only student learns to rank random action sequences like its teacher."""
    torch.manual_seed(0)
    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    student = WorldModel(tiny_cfg)
    dist = Distiller(student, DistillConfig(reward_coef=0.0, plan_coef=1.0, plan_samples=8),
                     teacher=teacher)
    learner = TDMPC2Learner(student, TrainConfig(lr=3e-3))
    batch = _batch(tiny_cfg, b=32)
    first = last = None
    for _ in range(200):
        m = learner.update(batch, dist.hook(None))
        first = first or m["distill_plan_loss"]
        last = m["distill_plan_loss"]
    assert last < 0.5 * first
    # held-out action sequences from the same starts: rewards now correlate with the teacher's
    torch.manual_seed(7)
    task = batch.task.repeat(8)
    acts = planner_like_actions(batch.action, 8, 0.05, 2.0, teacher.action_mask(task))
    t_reward, _ = imagined_targets(teacher, batch.obs[0].repeat(8, 1), acts, task)
    s_reward, _ = imagined_targets(student, batch.obs[0].repeat(8, 1), acts, task)
    corr = torch.corrcoef(torch.stack([t_reward.flatten(), s_reward.flatten()]))[0, 1]
    assert corr > 0.8


def test_distill_cli_init_starts_from_the_given_weights(tiny_cfg, tmp_path, capsys):
    from tdmpc_opt.checkpoints import load_world_model, save_checkpoint
    from tdmpc_opt.cli import main

    teacher_path, init_path = tmp_path / "teacher.safetensors", tmp_path / "init.safetensors"
    save_checkpoint(teacher_path, _nontrivial(WorldModel(tiny_cfg)))
    init = _nontrivial(WorldModel(tiny_cfg))
    save_checkpoint(init_path, init)
    ds = _dataset(tmp_path, tiny_cfg)
    base = ["distill", "--teacher", str(teacher_path), "--data", str(ds.path), "--quiet",
            "--init", str(init_path), "--plan-coef", "1.0", "--plan-samples", "2",
            "steps=2", "batch_size=8", "eval_freq=0", "lr=1e-9", "enc_lr_scale=1"]
    assert main(base + ["--run-dir", str(tmp_path / "run")]) == 0
    out, _ = load_world_model(tmp_path / "run" / "model.safetensors")
    # two updates at a negligible learning rate: still the init's weights, not a fresh model
    for k, v in init.state_dict().items():
        if not k.startswith("_target"):
            assert torch.allclose(out.state_dict()[k], v, atol=1e-4), k
    assert main(base[:1] + ["--run-dir", str(tmp_path / "run2")] + base[1:] + ["latent_dim=8"]) == 2
    assert "--init takes the student's architecture" in capsys.readouterr().err


def test_resumed_distillation_equals_an_uninterrupted_one(tiny_cfg, tmp_path):
    """Student, latent projection and its optimizer come back from the checkpoint."""
    from tdmpc_opt.distill_trainer import distill_offline
    from tdmpc_opt.runs import RunDir
    from tdmpc_opt.trainer import build_learner

    teacher = _nontrivial(WorldModel(tiny_cfg)).eval()
    ds = _dataset(tmp_path, tiny_cfg)
    dcfg = DistillConfig(reward_coef=0.45, latent_coef=1.0, plan_coef=0.5, plan_samples=2)

    def run(name, steps, resume=False):
        cfg = TrainConfig(steps=steps, batch_size=8, eval_freq=0, seed=3, checkpoint_freq=4)
        learner = build_learner(tiny_cfg, cfg)
        run_dir = RunDir(tmp_path / name)
        distill_offline(learner, teacher, "sha-t", ds, np.arange(3), dcfg, run_dir,
                        resume=resume)
        state = torch.load(run_dir.latest_checkpoint()[0], weights_only=True)
        return learner.model.state_dict(), state["extra"]

    straight, straight_extra = run("a", 10)
    run("b", 6)
    (tmp_path / "b" / "checkpoints" / "step-00000006.pt").unlink()  # killed before step 6
    resumed, resumed_extra = run("b", 10, resume=True)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    for k, v in straight_extra["projection"].items():
        assert torch.equal(v, resumed_extra["projection"][k]), k
