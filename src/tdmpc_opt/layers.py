"""Neural-network building blocks of TD-MPC2: LayerNorm+Mish MLPs, SimNorm, a vectorised ensemble.

Parameter names follow TD-MPC2's checkpoints (``<i>.weight``, ``<i>.bias``, ``<i>.ln.weight``,
``<i>.ln.bias``), so published state dicts load without renaming except for the Q ensemble.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tdmpc_opt import math as tm


class NormedLinear(nn.Linear):
    """Linear -> (dropout) -> LayerNorm -> activation (``mish`` or ``simnorm``)."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "mish", simnorm_dim: int = 8,
                 dropout: float = 0.0):
        super().__init__(in_dim, out_dim)
        self.ln = nn.LayerNorm(out_dim)
        self.act = act
        self.simnorm_dim = simnorm_dim
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.ln(x)
        return tm.simnorm(x, self.simnorm_dim) if self.act == "simnorm" else F.mish(x)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, act={self.act}"


def mlp(in_dim: int, hidden: list[int], out_dim: int, out_act: str | None = None,
        simnorm_dim: int = 8, dropout: float = 0.0) -> nn.Sequential:
    """TD-MPC2's MLP: NormedLinear hidden layers, then a plain Linear or an activated NormedLinear.

    ``dropout`` applies after the first layer only. ``out_act="simnorm"`` ends in LN + SimNorm.
    """
    dims = [in_dim, *hidden]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], simnorm_dim=simnorm_dim, dropout=dropout * (i == 0))
        for i in range(len(hidden))
    ]
    if out_act is None:
        layers.append(nn.Linear(dims[-1], out_dim))
    else:
        layers.append(NormedLinear(dims[-1], out_dim, act=out_act, simnorm_dim=simnorm_dim))
    return nn.Sequential(*layers)


class _StackedLayerNorm(nn.Module):
    """Per-member LayerNorm affine parameters, ``weight``/``bias`` of shape ``[E, D]``."""

    def __init__(self, members: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(members, dim))
        self.bias = nn.Parameter(torch.zeros(members, dim))


class EnsembleLayer(nn.Module):
    """One layer of ``E`` independent MLPs evaluated with a single batched matmul.

    ``weight [E, out, in]``, ``bias [E, out]``; hidden layers also carry ``ln`` (LayerNorm affine)
    and apply Mish (and dropout on the first layer).
    """

    def __init__(self, members: int, in_dim: int, out_dim: int, normed: bool,
                 dropout: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, out_dim, in_dim))
        self.bias = nn.Parameter(torch.zeros(members, out_dim))
        self.ln = _StackedLayerNorm(members, out_dim) if normed else None
        self.dropout = nn.Dropout(dropout) if dropout else None
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``x [E', N, in]`` (or ``[1, N, in]`` shared by all) -> ``[E', N, out]``.

        ``members`` (long ``[E']``) selects a subset of the ensemble; default all ``E``.
        """
        w, b = self.weight, self.bias
        if members is not None:
            w, b = w[members], b[members]
        x = torch.baddbmm(b.unsqueeze(1), x.expand(w.shape[0], -1, -1), w.transpose(1, 2))
        if self.ln is None:
            return x
        if self.dropout is not None:
            x = self.dropout(x)
        g, h = self.ln.weight, self.ln.bias
        if members is not None:
            g, h = g[members], h[members]
        x = F.layer_norm(x, x.shape[-1:]) * g.unsqueeze(1) + h.unsqueeze(1)
        return F.mish(x)


class QEnsemble(nn.Module):
    """``E`` Q-networks (in -> mlp -> mlp -> num_bins) stored stacked as ``params.<layer>.*``."""

    def __init__(self, members: int, in_dim: int, mlp_dim: int, out_dim: int,
                 dropout: float = 0.0):
        super().__init__()
        self.params = nn.ModuleList([
            EnsembleLayer(members, in_dim, mlp_dim, normed=True, dropout=dropout),
            EnsembleLayer(members, mlp_dim, mlp_dim, normed=True),
            EnsembleLayer(members, mlp_dim, out_dim, normed=False),
        ])
        self.members = members

    def forward(self, x: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
        """``x [..., in]`` -> logits ``[E', ..., out]`` for all or the selected members."""
        lead = x.shape[:-1]
        h = x.reshape(1, -1, x.shape[-1])
        for layer in self.params:
            h = layer(h, members)
        return h.reshape(h.shape[0], *lead, h.shape[-1])


def weight_init(module: nn.Module) -> None:
    """TD-MPC2 initialisation: truncated-normal(0.02) linear weights, zero biases,
    uniform(-0.02, 0.02) embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight, -0.02, 0.02)
