"""The TD-MPC2 math, once, as plain functions.

Discrete regression: scalars (rewards, values) are predicted as logits over ``num_bins`` bins
spaced evenly in symlog space on ``[vmin, vmax]``; targets are soft two-hot vectors. The Gaussian
policy helpers follow the squashed-Gaussian (tanh) parameterisation of TD-MPC2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOG_SQRT_2PI = 0.9189385175704956
"""log(sqrt(2*pi)), the constant of the standard normal log density."""


def symlog(x: torch.Tensor) -> torch.Tensor:
    """sign(x) * log(1 + |x|), elementwise."""
    return torch.sign(x) * torch.log1p(torch.abs(x))


def symexp(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`symlog`: sign(x) * (exp(|x|) - 1), elementwise."""
    return torch.sign(x) * torch.expm1(torch.abs(x))


def bin_centers(num_bins: int, vmin: float, vmax: float, device=None, dtype=None) -> torch.Tensor:
    """The ``num_bins`` bin centres in symlog space, shape ``[num_bins]``."""
    return torch.linspace(vmin, vmax, num_bins, device=device, dtype=dtype)


def two_hot(x: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """Soft two-hot encoding of scalars in symlog space.

    Args:
        x: scalars, shape ``[..., 1]``.
    Returns:
        ``[..., num_bins]``: weight ``1 - f`` on the lower neighbouring bin and ``f`` on the upper
        one, where ``f`` is the fractional position of ``clamp(symlog(x), vmin, vmax)``. With
        ``num_bins == 0`` the input is returned; with 1, its symlog.
    """
    if num_bins == 0:
        return x
    if num_bins == 1:
        return symlog(x)
    bin_size = (vmax - vmin) / (num_bins - 1)
    pos = (torch.clamp(symlog(x), vmin, vmax) - vmin) / bin_size  # [..., 1]
    low = torch.floor(pos)
    frac = pos - low
    low = low.long()
    out = torch.zeros(*x.shape[:-1], num_bins, device=x.device, dtype=x.dtype)
    out.scatter_(-1, low, 1 - frac)
    # At x == vmax the upper neighbour wraps to bin 0 with weight 0, as in TD-MPC2.
    out.scatter_add_(-1, (low + 1) % num_bins, frac)
    return out


def two_hot_inv(logits: torch.Tensor, num_bins: int, vmin: float, vmax: float) -> torch.Tensor:
    """Decode discrete-regression logits ``[..., num_bins]`` to scalars ``[..., 1]``.

    The softmax-weighted mean of the bin centres, mapped back with :func:`symexp`.
    """
    if num_bins == 0:
        return logits
    if num_bins == 1:
        return symexp(logits)
    centers = bin_centers(num_bins, vmin, vmax, logits.device, logits.dtype)
    probs = F.softmax(logits, dim=-1)
    return symexp((probs * centers).sum(-1, keepdim=True))


def soft_ce(logits: torch.Tensor, target: torch.Tensor, num_bins: int, vmin: float,
            vmax: float) -> torch.Tensor:
    """Cross-entropy between logits ``[..., num_bins]`` and two-hot(target ``[..., 1]``).

    Returns ``[..., 1]``.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    return -(two_hot(target, num_bins, vmin, vmax) * log_probs).sum(-1, keepdim=True)


def scale_log_std(raw: torch.Tensor, log_std_min: float, log_std_max: float) -> torch.Tensor:
    """Map unbounded policy outputs into ``[log_std_min, log_std_max]`` through tanh."""
    return log_std_min + 0.5 * (log_std_max - log_std_min) * (torch.tanh(raw) + 1)


def gaussian_logprob(eps: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Log density of a diagonal Gaussian at standardised noise ``eps``.

    ``[..., A] -> [..., 1]``.
    """
    return (-0.5 * eps.pow(2) - log_std - LOG_SQRT_2PI).sum(-1, keepdim=True)


def squash(mean: torch.Tensor, sample: torch.Tensor, log_prob: torch.Tensor):
    """Apply tanh to mean and sample and correct the log-probability for the change of variables.

    Returns ``(tanh(mean), tanh(sample), log_prob - sum(log(relu(1 - tanh(sample)^2) + 1e-6)))``.
    """
    mean = torch.tanh(mean)
    sample = torch.tanh(sample)
    log_prob = log_prob - torch.log(F.relu(1 - sample.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return mean, sample, log_prob


def mish(x: torch.Tensor) -> torch.Tensor:
    """Mish activation, x * tanh(softplus(x)) (``F.mish``)."""
    return F.mish(x)


def simnorm(x: torch.Tensor, group: int) -> torch.Tensor:
    """Simplicial normalisation: softmax over consecutive groups of ``group`` features.

    ``[..., D] -> [..., D]`` with ``D`` divisible by ``group``.
    """
    shape = x.shape
    return F.softmax(x.reshape(*shape[:-1], -1, group), dim=-1).reshape(shape)


def discount_for_episode_length(episode_length: int, denom: float = 5, low: float = 0.95,
                                high: float = 0.995) -> float:
    """TD-MPC2's discount heuristic: ``(L/denom - 1) / (L/denom)`` clipped to ``[low, high]``."""
    frac = episode_length / denom
    return min(max((frac - 1) / frac, low), high)


def gumbel_argmax(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Sample an index from categorical ``probs [..., K]`` with the Gumbel-max trick.

    ``uniform`` holds ``U(0,1)`` draws of the same shape; returns indices ``[...]``.
    Equivalent to TD-MPC2's ``gumbel_softmax_sample`` (argmax of a tempered softmax of
    ``log p + Gumbel`` is the argmax of ``log p + Gumbel``).
    """
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)))
    return torch.argmax(torch.log(probs) + gumbel, dim=-1)
