"""World-model architecture: parameter counts of every published size, shapes, targets."""

import csv

import pytest
import torch

from conftest import shared_path
from tdmpc_opt.config import MODEL_SIZES, model_config_for
from tdmpc_opt.tasks import TASK_SETS
from tdmpc_opt.world_model import WorldModel


def _size_rows():
    path = shared_path("reference", "model-sizes.tsv")
    with open(path) as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_every_published_size_has_the_published_parameter_count():
    rows = _size_rows()
    assert len(rows) == 2 * len(MODEL_SIZES)
    for row in rows:
        cfg = model_config_for(TASK_SETS[row["task_set"]], int(row["model_size"]))
        with torch.device("meta"):  # 317M parameters without allocating them
            model = WorldModel(cfg)
        assert model.learnable_parameters() == int(row["learnable_params"]), row
        for key in ("enc_dim", "mlp_dim", "latent_dim", "num_enc_layers", "num_q", "task_dim"):
            assert getattr(cfg, key) == int(row[key]), (row, key)


def test_single_task_model_has_no_task_embedding():
    cfg = model_config_for(("cartpole-balance",), 1)
    model = WorldModel(cfg)
    assert cfg.task_dim == 0 and not hasattr(model, "_task_emb")
    z = model.encode(torch.randn(4, 5), None)
    assert z.shape == (4, 128)


def test_shapes_and_masks(tiny_cfg):
    model = WorldModel(tiny_cfg)
    task = torch.tensor([0, 1, 2])
    z = model.encode(torch.randn(3, tiny_cfg.obs_dim), task)
    a = torch.rand(3, tiny_cfg.action_dim) * 2 - 1
    assert z.shape == (3, 16)
    # SimNorm latents: groups of 8 sum to one
    assert torch.allclose(z.reshape(3, 2, 8).sum(-1), torch.ones(3, 2), atol=1e-5)
    assert model.next(z, a, task).shape == z.shape
    assert model.q_logits(z, a, task).shape == (2, 3, 101)
    pi = model.pi(z, task)
    # cartpole (task 1) has one action dimension: the other five are masked to zero
    assert torch.all(pi.action[1, 1:] == 0) and torch.all(pi.mean[1, 1:] == 0)
    # [T, B, D] inputs with [B] tasks broadcast
    zs = model.encode(torch.randn(4, 3, tiny_cfg.obs_dim), task)
    assert zs.shape == (4, 3, 16)


def test_targets_are_frozen_copies_and_polyak_update(tiny_cfg):
    model = WorldModel(tiny_cfg)
    for p, t in zip(model._Qs.parameters(), model._target_Qs.parameters(), strict=True):
        assert not t.requires_grad and torch.equal(p, t)
    with torch.no_grad():
        for p in model._Qs.parameters():
            p.add_(1.0)
    model.soft_update_target_q(0.25)
    p0 = next(model._Qs.parameters())
    t0 = next(model._target_Qs.parameters())
    assert torch.allclose(t0, p0 - 0.75)


def test_task_embedding_is_renormalised_without_changing_weights(tiny_cfg):
    model = WorldModel(tiny_cfg)
    with torch.no_grad():
        model._task_emb.weight[0] = 3.0
    before = model._task_emb.weight.clone()
    emb = model.task_embedding(torch.tensor([0, 1]))
    assert emb[0].norm().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(emb[1], before[1])
    assert torch.equal(model._task_emb.weight, before)
