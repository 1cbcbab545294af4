"""Where int8 planning loses its score (docs/quantization.md, "Where the loss comes from").

Plans the int8 file written by ``tdmpc-opt report-quant`` with one source of int8 error
changed at a time and prints the episode returns (seed 1, 2 episodes per task):

* ``act8`` / ``act8asym`` / ``act10`` / ``act12``: float32 products on the file's weights with
  every LayerNorm + Mish output rounded per row to a symmetric 8/10/12-bit code (``act8``
  reproduces the int8 planner), an asymmetric 8-bit code over ``[-0.31, row max]`` or
  (``act8static``) one fixed step 6/127 for every row (values clamped to +-6), or
  (``act8ref``) per-row 8-bit codes of each row's difference to its environment's first row
  (which is kept exact);
  ``--nets`` limits the rounding to some networks (``dyn``, ``rew``, ``pi``, ``q``) or
  layers (``dyn1`` the first hidden layer of the dynamics, ``dyn2`` its second, ...);
* ``heads``: the int8 planner (PyTorch ops) with the reward and Q output layers in float32
  on float inputs;
* ``latent``: the int8 planner with every product of a latent input in float32;
* ``ref``: the int8 planner (PyTorch ops, 8-bit codes everywhere, int8 weights and latents)
  with every product's rows coded relative to their environment's first row
  (:func:`reference_row_products`), the real-int8 counterpart of ``act8ref``;
* ``ref-fused``: the same through the fused kernel (``FastWorldModel(ref_codes=True)``).

    python experiments/int8_error_sources.py act12 \
        --checkpoint runs/quant-scores-kernel/int8-dynamic.safetensors
"""

from __future__ import annotations

import argparse
import json

import torch

import tdmpc_opt.fast_model as fast_model
from tdmpc_opt.evaluation import episode_specs, run_episodes
from tdmpc_opt.fast_model import Dense, FastWorldModel, fast_view
from tdmpc_opt.quantization import load_fast_agent

MISH_LOW = -0.30885
PLAN_ROWS = (488, 512, 24)
"""Rows per environment of the planner's batches (sampled, all, policy sequences; TD-MPC2's
settings): ``act8ref`` groups a batch's rows by environment with the first that divides it."""
STATIC_MAX = 6.0
STATIC_STEP = STATIC_MAX / 127
VARIANTS = ("act8", "act8asym", "act8static", "act8ref", "act10", "act12", "heads", "latent",
            "ref", "ref-fused")


NETS = ("dyn", "rew", "pi", "q")


def network_norms(view) -> dict[int, str]:
    """``data_ptr`` of every LayerNorm weight of a view's hidden layers -> layer name
    (``dyn1``, ``dyn2``, ... : a network and its first or second hidden layer)."""
    layers = {"dyn": [view.dyn1["ln"], view.dyn2[1]], "rew": [view.rew1["ln"], view.rew2[1]],
              "pi": [view.pi1["ln"], view.pi2[1]]}
    q = [(view.q1[m]["ln"], view.q2[m][1]) for m in range(view.cfg.num_q)]
    names = {norm[0].data_ptr(): f"{net}{i + 1}" for net, norms in layers.items()
             for i, norm in enumerate(norms)}
    names.update({norm[0].data_ptr(): f"q{i + 1}" for member in q for i, norm in enumerate(member)})
    return names


def rounded_activations(variant: str, nets: set[str], names: dict[int, str]):
    """A replacement for ``fast_model.ln_mish`` whose outputs are rounded per row in the
    layers of ``nets`` (``names``: :func:`network_norms`)."""
    exact = fast_model.ln_mish

    def ln_mish(x, norm, int8_scale=False):
        h, _ = exact(x, norm, False)
        layer = names[norm[0].data_ptr()]
        if layer not in nets and layer[:-1] not in nets:
            return h, None
        if variant == "act8asym":
            step = (h.amax(-1, keepdim=True) - MISH_LOW).clamp_min(1e-12) / 255
            return torch.round((h - MISH_LOW) / step) * step + MISH_LOW, None
        if variant == "act8ref":  # per-row codes of the difference to the group's first row
            rows = next(r for r in PLAN_ROWS if h.shape[0] % r == 0)
            g = h.view(-1, rows, h.shape[1])
            d = g - g[:, :1]
            step = d.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
            return (g[:, :1] + torch.round(d / step) * step).view(h.shape), None
        if variant == "act8static":  # one fixed step for every row: errors correlated
            return torch.round(h.clamp(-STATIC_MAX, STATIC_MAX) / STATIC_STEP) * STATIC_STEP, None
        levels = 2 ** (int(variant[3:]) - 1) - 1
        step = h.abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
        return torch.round(h / step) * step, None
    return ln_mish


def reference_row_products() -> None:
    """Make every int8 product of float rows code each row's difference to its environment's
    first row (8-bit per row) and the first row itself with 15-bit codes; both in one
    ``_int_mm``. Environments are found as in ``act8ref``; other products are unchanged."""
    plain = Dense.product

    def product(self, x, row_scale=None):
        rows = next((r for r in PLAN_ROWS if x.shape[0] % r == 0), None)
        if self.precision != "int8" or x.dtype == torch.int8 or rows is None:
            return plain(self, x, row_scale)
        g = x.view(-1, rows, x.shape[1])
        ref = g[:, 0]
        d_codes, d_scale = fast_model.quantize_rows((g - g[:, :1]).reshape(x.shape))
        ref_scale = ref.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        ref_codes, _ = fast_model.quantize_rows_wide(ref, ref_scale)
        envs = ref.shape[0]
        acc = torch._int_mm(torch.cat([d_codes, ref_codes]), self.weight)[:, :self.out_dim]
        acc = acc.to(torch.float32)
        m = x.shape[0]
        ref_part = (acc[m:m + envs] + acc[m + envs:] / fast_model.WIDE_PLANE) * ref_scale
        y = (acc[:m] * d_scale).view(envs, rows, -1).add_(ref_part[:, None])
        return y.view(m, -1).mul_(self.scale[:self.out_dim]), torch.ones_like(d_scale)
    Dense.product = product


def float_layers(view, model, variant: str) -> None:
    """Put the ``heads`` or ``latent`` products of an int8 view in float32."""
    view.fused_kernel = False
    q = model._Qs.params
    if variant == "heads":
        view.q3 = [Dense(q[2].weight[m], q[2].bias[m], "fp32") for m in range(view.cfg.num_q)]
        view.rew3 = Dense(model._reward[2].weight, model._reward[2].bias, "fp32")
        return
    lat = view.cfg.latent_dim

    def latent_part(weight):
        return Dense(weight.detach().float()[:, :lat][:, view.perm], None, "fp32")
    view.dyn1["z"] = latent_part(model._dynamics[0].weight)
    view.rew1["z"] = latent_part(model._reward[0].weight)
    view.pi1["z"] = latent_part(model._pi[0].weight)
    for m in range(view.cfg.num_q):
        view.q1[m]["z"] = latent_part(q[0].weight[m])


def plan_with(agent, view: FastWorldModel) -> None:
    """Make ``agent``'s int8 planner use ``view`` (the view cache :func:`fast_view` reads)."""
    fast_model._VIEWS[agent.model] = {"int8": (fast_model._fingerprint(agent.model), view)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variant", choices=VARIANTS)
    p.add_argument("--checkpoint", required=True, help="an int8-dynamic file")
    p.add_argument("--tasks", default="cartpole-balance,pendulum-spin")
    p.add_argument("--episodes", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--nets", default=",".join(NETS),
                   help="act variants: the networks whose activations are rounded")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant.startswith("act"):
        agent = load_fast_agent(args.checkpoint, "fp32")
        nets = set(args.nets.split(","))
        if not nets <= set(NETS) | {f"{n}{i}" for n in NETS for i in (1, 2)}:
            p.error(f"--nets: choose from {NETS}, optionally with a layer number 1 or 2")
        names = network_norms(fast_view(agent.model, "fp32"))
        fast_model.ln_mish = rounded_activations(args.variant, nets, names)
    elif args.variant == "ref-fused":
        agent = load_fast_agent(args.checkpoint, "int8")
        plan_with(agent, FastWorldModel(agent.model, "int8", ref_codes=True))
    elif args.variant == "ref":
        agent = load_fast_agent(args.checkpoint, "int8")
        plan_with(agent, FastWorldModel(agent.model, "int8", False, wide=(), ref_codes=False))
        reference_row_products()
    else:  # the 15-bit-output int8 planner these variants were measured with (session 6)
        agent = load_fast_agent(args.checkpoint, "int8")
        view = FastWorldModel(agent.model, "int8", ref_codes=False)
        plan_with(agent, view)
        float_layers(view, agent.model, args.variant)
    specs = episode_specs(tuple(args.tasks.split(",")), args.episodes, args.seed)
    returns: dict[str, list[float]] = {}
    for r in run_episodes(agent, specs):
        returns.setdefault(r.task, []).append(round(r.episode_return, 1))
    print(json.dumps({"variant": args.variant, "nets": args.nets, "returns": returns}))


if __name__ == "__main__":
    main()
