"""Export a world model to ONNX with a standalone numpy + onnxruntime planner.

Writes encoder, dynamics, reward, q and policy graphs (float32, task as an int64 index
input), model.json, and onnx_planner.py / example.py / requirements.txt, so the folder runs
without PyTorch: `pip install -r requirements.txt && python example.py`. Each graph is
checked against PyTorch on random inputs; the largest difference is printed. The folder may
be new, hold other files, or hold an earlier export (replaced); a file of its own with the
name of one the export writes is refused, never overwritten. An interrupted or failed export
leaves the folder as it was.

Examples:
  tdmpc-opt export --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --format onnx --out exported/
"""

from __future__ import annotations

NAME = "export"
HELP = "export a model to ONNX with a numpy + onnxruntime planner"


def add_arguments(p):
    from tdmpc_opt.cli._common import output_dir

    p.add_argument("--checkpoint", required=True, help="any supported checkpoint")
    p.add_argument("--format", default="onnx", dest="fmt", help="export format (onnx)")
    p.add_argument("--out", required=True, type=output_dir,
                   help="output folder: new, an earlier export (replaced), or one holding no "
                        "files of the export's names")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")


def run(args) -> int:
    from tdmpc_opt.export import export_checkpoint

    result = export_checkpoint(args.checkpoint, args.out, args.fmt, not args.no_verify)
    print(f"wrote {len(result['model']['graphs'])} ONNX graphs, model.json and the planner "
          f"to {args.out}")
    if result["errors"]:
        worst = max(result["errors"], key=result["errors"].get)
        print(f"largest difference from PyTorch: {result['errors'][worst]:.2e} ({worst})")
    return 0
