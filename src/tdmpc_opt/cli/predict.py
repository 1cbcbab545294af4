"""Run a model's networks on given inputs and write what it predicts.

The input is a JSON list of {"task": name, "obs": [...], "action": [...]} (obs and action
unpadded or padded). Each output item has z (encoder latent), z_next (dynamics), reward
(decoded), q_mean (mean decoded Q over the whole ensemble) and pi_mean (tanh of the policy
mean, masked).

Example:
  tdmpc-opt predict --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --input items.json --output predictions.json
"""

from __future__ import annotations

import json
from pathlib import Path

NAME = "predict"
HELP = "predict latents, reward, Q and policy mean for given observations and actions"


def add_arguments(p):
    from tdmpc_opt.cli._common import output_file

    p.add_argument("--checkpoint", required=True, help="model file")
    p.add_argument("--input", required=True, help="JSON list of {task, obs, action}")
    p.add_argument("--output", required=True, type=output_file,
                   help="where to write the predictions (JSON)")


def run(args) -> int:
    from tdmpc_opt.cli._common import write_json
    from tdmpc_opt.errors import InputError
    from tdmpc_opt.inference import predict_items

    path = Path(args.input)
    if not path.is_file():
        raise InputError(f"{path}: no such input file")
    try:
        items = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    from tdmpc_opt.checkpoints import load_world_model

    model, _ = load_world_model(args.checkpoint)
    write_json(args.output, predict_items(model, items))
    print(f"wrote {len(items)} predictions to {args.output}")
    return 0
