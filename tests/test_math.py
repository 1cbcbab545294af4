"""The TD-MPC2 math against hand-written formulas."""

import math

import torch
import torch.nn.functional as F

from tdmpc_opt import math as tm


def test_symlog_symexp_are_inverse_and_match_formula():
    x = torch.tensor([-100.0, -1.5, 0.0, 0.3, 42.0])
    expected = torch.tensor([math.copysign(math.log(1 + abs(v)), v) for v in x.tolist()])
    assert torch.allclose(tm.symlog(x), expected)
    assert torch.allclose(tm.symexp(tm.symlog(x)), x, rtol=1e-5)


def test_two_hot_puts_weight_on_neighbouring_bins():
    # 5 bins on [-2, 2] (bin size 1): symlog(x) = 0.25 lies between bins 2 and 3.
    x = torch.tensor([[math.expm1(0.25)]])
    out = tm.two_hot(x, 5, -2.0, 2.0)
    assert torch.allclose(out, torch.tensor([[0, 0, 0.75, 0.25, 0]]))
    # values beyond the range clamp to the end bins
    assert torch.allclose(tm.two_hot(torch.tensor([[1e6]]), 5, -2.0, 2.0)[0, -1], torch.tensor(1.))


def test_two_hot_inverse_recovers_scalars():
    x = torch.linspace(-500, 500, 41).unsqueeze(-1)
    logits = torch.log(tm.two_hot(x, 101, -10, 10) + 1e-12)
    assert torch.allclose(tm.two_hot_inv(logits, 101, -10, 10), x, rtol=1e-3, atol=1e-3)


def test_soft_ce_is_cross_entropy_with_two_hot_target():
    logits = torch.randn(4, 101)
    target = torch.randn(4, 1) * 5
    p = tm.two_hot(target, 101, -10, 10)
    expected = -(p * F.log_softmax(logits, -1)).sum(-1, keepdim=True)
    assert torch.allclose(tm.soft_ce(logits, target, 101, -10, 10), expected)


def test_policy_helpers():
    raw = torch.tensor([-100.0, 0.0, 100.0])
    assert torch.allclose(tm.scale_log_std(raw, -10, 2), torch.tensor([-10.0, -4.0, 2.0]))
    eps, log_std = torch.randn(3, 2), torch.randn(3, 2)
    manual = (-0.5 * eps**2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1, keepdim=True)
    assert torch.allclose(tm.gaussian_logprob(eps, log_std), manual, atol=1e-6)


def test_simnorm_groups_sum_to_one():
    x = torch.randn(5, 16)
    out = tm.simnorm(x, 8)
    assert torch.allclose(out.reshape(5, 2, 8).sum(-1), torch.ones(5, 2))
    assert torch.allclose(out[:, :8], torch.softmax(x[:, :8], -1))


def test_discount_heuristic():
    assert tm.discount_for_episode_length(500) == 0.99
    assert tm.discount_for_episode_length(100) == 0.95
    assert tm.discount_for_episode_length(10_000) == 0.995


def test_gumbel_argmax_follows_probabilities():
    probs = torch.tensor([0.7, 0.2, 0.1])
    picks = tm.gumbel_argmax(probs.expand(20000, 3), torch.rand(20000, 3))
    freq = torch.bincount(picks, minlength=3).float() / 20000
    assert torch.allclose(freq, probs, atol=0.02)
