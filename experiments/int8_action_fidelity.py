"""How far each source of int8 rounding moves the planned action (docs/quantization.md).

Plans the same held-out states (``report-quant``'s rollout states, 16 per task by default)
with the same random numbers in float32 and in each variant, and prints the mean absolute
difference of the plan's first mean action (``|mean0|``) and of the chosen action
(``|action|``) from float32's, overall and per task. Variants:

* ``fp32@noise2``: float32 with other random numbers (the planner's own spread);
* ``bf16``; ``int8:NETS``: the int8 planner with 15-bit codes into the output products of
  ``NETS`` (comma-separated from dyn, rew, pi, q; empty: none);
* ``sim:BITS:LAYERS``: float32 products with the LayerNorm + Mish outputs of ``LAYERS``
  rounded per row to ``BITS`` (``act8``, ``act12``, ...; layers as in
  ``int8_error_sources.py --nets``: ``dyn``, ``q2``, ...).

    python experiments/int8_action_fidelity.py fp32@noise2 bf16 int8: int8:dyn,q \\
        sim:act8:dyn,rew,pi,q sim:act8:dyn2 sim:act8:q2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import tdmpc_opt.fast_model as fast_model
from tdmpc_opt.agent import load_agent
from tdmpc_opt.cli.report_quant import held_out_inputs
from tdmpc_opt.fast_model import FastWorldModel
from tdmpc_opt.planner import draw_noise, plan

sys.path.insert(0, str(Path(__file__).parent))
from int8_error_sources import network_norms, rounded_activations  # noqa: E402

EXACT_LN_MISH = fast_model.ln_mish
DEFAULT_TASKS = "cartpole-balance,pendulum-spin,finger-turn-easy,walker-walk,cheetah-run," \
                "reacher-easy"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+")
    p.add_argument("--checkpoint", default="../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--states", type=int, default=16, help="held-out states per task")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    agent = load_agent(args.checkpoint)
    model, cfg = agent.model, agent.planner
    names = model.cfg.tasks
    obs, _, task = held_out_inputs(model, args.states, 1000)
    keep = torch.tensor([names[int(t)] in args.tasks.split(",") for t in task])
    obs, task = obs[keep], task[keep]
    with torch.no_grad():
        z0 = model.encode(obs, task)
        b, shape = z0.shape[0], (z0.shape[0], cfg.horizon, model.cfg.action_dim)
        fixed = (z0, task, torch.zeros(shape), torch.ones(b, dtype=torch.bool), True)

        def noise(seed: int):
            gens = [torch.Generator().manual_seed(seed * 100_000 + i) for i in range(b)]
            return draw_noise(cfg, model.cfg.action_dim, model.cfg.num_q, b, gens)

        n1, gamma, exact = noise(1), torch.full((b,), 0.99), FastWorldModel(model, "fp32")
        a_ref, m_ref = plan(exact, cfg, *fixed, n1, gamma)
        for variant in args.variants:
            fm, nz = exact, n1
            if variant == "fp32@noise2":
                nz = noise(2)
            elif variant == "bf16":
                fm = FastWorldModel(model, "bf16")
            elif variant.startswith("int8:"):
                fm = FastWorldModel(model, "int8", wide=[n for n in variant[5:].split(",") if n],
                                    ref_codes=False)
            elif variant.startswith("sim:"):
                _, bits, layers = variant.split(":")
                fast_model.ln_mish = rounded_activations(bits, set(layers.split(",")),
                                                         network_norms(exact))
            else:
                p.error(f"unknown variant {variant!r}")
            try:
                a, m = plan(fm, cfg, *fixed, nz, gamma)
            finally:
                fast_model.ln_mish = EXACT_LN_MISH
            d_mean = (m[:, 0] - m_ref[:, 0]).abs().mean(-1)
            per_task: dict[str, list[float]] = {}
            for i in range(b):
                per_task.setdefault(names[int(task[i])], []).append(float(d_mean[i]))
            print(json.dumps({"variant": variant, "mean0": round(float(d_mean.mean()), 4),
                              "action": round(float((a - a_ref).abs().mean()), 4),
                              "mean0_per_task": {t: round(sum(v) / len(v), 4)
                                                 for t, v in per_task.items()}}), flush=True)

if __name__ == "__main__":
    main()
