"""Show a checkpoint's architecture, task set, parameter counts, dtypes and size.

Examples:
  tdmpc-opt info ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt
  tdmpc-opt info model.safetensors --json
"""

from __future__ import annotations

import json

NAME = "info"
HELP = "describe a checkpoint (architecture, tasks, parameters, dtype, size)"


def add_arguments(p):
    p.add_argument("checkpoint", help="a TD-MPC2 .pt or tdmpc-opt .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    from tdmpc_opt.checkpoints import describe

    d = describe(args.checkpoint)
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    c = d["model_config"]
    tasks = d["task_set"] or (", ".join(d["tasks"]) if d["tasks"] else "single task")
    rows = [
        ("file", f"{d['path']} ({d['file_bytes']:,} bytes, {d['format']})"),
        ("sha256", d["sha256"]),
        ("stored dtypes", ", ".join(d["stored_dtypes"])),
        ("stored numbers", f"{d['stored_numbers']:,} (target Q-networks included)"),
        ("learnable params", f"{d['learnable_params']:,}"),
        ("total params", f"{d['total_params']:,}"),
        ("tasks", f"{tasks} ({d['num_tasks']} embeddings)" if d["multitask"] else tasks),
        ("architecture", f"obs {c['obs_dim']}, action {c['action_dim']}, enc {c['enc_dim']}x"
                         f"{c['num_enc_layers']}, mlp {c['mlp_dim']}, latent {c['latent_dim']}, "
                         f"task_dim {c['task_dim']}, num_q {c['num_q']}, bins {c['num_bins']}"),
    ]
    if d.get("quantization"):
        rows.append(("quantization", json.dumps(d["quantization"])))
    for k, v in rows:
        print(f"{k:>17}: {v}")
    return 0
