"""Export a world model to ONNX for a NumPy + onnxruntime planner (``tdmpc-opt export``).

Five graphs, float32, batch dimension ``N`` dynamic; multi-task graphs take the task as an
int64 index ``task [N]`` (the embedding table, its max-norm renormalisation and the action
masks are inside the graphs), single-task graphs have no task input:

=============  ===============================  ==========================================
graph          inputs                           outputs
=============  ===============================  ==========================================
encoder        obs [N, obs_dim], task           z [N, L]
dynamics       z [N, L], action [N, A], task    z_next [N, L]
reward         z, action, task                  logits [N, bins], reward [N, 1] (decoded)
q              z, action, task                  logits [Q, N, bins], q [Q, N, 1] (decoded)
policy         z, eps [N, A], task              action [N, A], mean [N, A], log_std [N, A]
=============  ===============================  ==========================================

``model.json`` beside them holds the sizes, task list, per-task discounts and planner
defaults; the standalone planner (``deploy/onnx_planner.py``), its example and requirements
are copied into the output folder, which then runs with numpy and onnxruntime alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from tdmpc_opt import math as tm
from tdmpc_opt.errors import CheckpointError, InputError

GRAPHS = ("encoder", "dynamics", "reward", "q", "policy")
OPSET = 17
DEPLOY_DIR = Path(__file__).resolve().parent / "deploy"
DEPLOY_FILES = ("onnx_planner.py", "example.py", "requirements.txt")
REQUIREMENTS = "numpy>=1.26\nonnxruntime>=1.18\n"
"""The standalone planner's dependencies (written if the packaged file is missing)."""


def check_state_encoder(state: dict[str, torch.Tensor]) -> None:
    """Raise a clear :class:`CheckpointError` for models with pixel (convolutional) encoders.

    ``state`` uses our keys; only the ``_encoder.state`` MLP encoder is supported.
    """
    pixel = [k for k, v in state.items()
             if (k.startswith("_encoder.") and not k.startswith("_encoder.state."))
             or v.ndim == 4]
    if pixel:
        raise CheckpointError(f"this checkpoint has a pixel (image) encoder ({pixel[0]}); "
                              "tdmpc-opt supports state-observation models only, so it cannot "
                              "be quantized or exported")


class _Graph(nn.Module):
    """One exportable function of a world model; ``task`` is the last input when multi-task."""

    def __init__(self, model, kind: str):
        super().__init__()
        if model.cfg.multitask:  # renormalise the constant table once, not per row
            with torch.no_grad():
                table = model.task_embedding(torch.arange(model.cfg.num_tasks))
            model = copy.copy(model)
            model.task_embedding = lambda task: F.embedding(task.long(), table)
        self.model, self.kind = model, kind

    def q_logits(self, za: torch.Tensor) -> torch.Tensor:
        """The Q ensemble ``[N, in] -> [Q, N, bins]`` with a static LayerNorm shape
        (``EnsembleLayer`` takes it from the input, which the tracer cannot export)."""
        h = za.unsqueeze(0).expand(self.model.cfg.num_q, -1, -1)
        for layer in self.model._Qs.params:
            h = torch.baddbmm(layer.bias.unsqueeze(1), h, layer.weight.transpose(1, 2))
            if layer.ln is not None:
                h = F.layer_norm(h, (int(layer.weight.shape[1]),))
                h = F.mish(h * layer.ln.weight.unsqueeze(1) + layer.ln.bias.unsqueeze(1))
        return h

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """``WorldModel.decode`` with ``exp(x) - 1`` for ``expm1`` (which ONNX lacks)."""
        c = self.model.cfg
        if c.num_bins <= 1:
            return self.model.decode(logits)
        centers = tm.bin_centers(c.num_bins, c.vmin, c.vmax, dtype=logits.dtype)
        x = (torch.softmax(logits, dim=-1) * centers).sum(-1, keepdim=True)
        return torch.sign(x) * (torch.exp(torch.abs(x)) - 1)

    def forward(self, *args):
        m = self.model
        task = args[-1] if m.cfg.multitask else None
        x = args[:-1] if m.cfg.multitask else args
        if self.kind == "encoder":
            return m.encode(x[0], task)
        if self.kind == "dynamics":
            return m.next(x[0], x[1], task)
        if self.kind == "reward":
            logits = m.reward(x[0], x[1], task)
            return logits, self.decode(logits)
        if self.kind == "q":
            logits = self.q_logits(torch.cat([m.with_task(x[0], task), x[1]], dim=-1))
            return logits, self.decode(logits)
        out = m.pi(x[0], task, x[1])
        return out.action, out.mean, out.log_std


def _io(kind: str, multitask: bool) -> tuple[list[str], list[str]]:
    inputs = {"encoder": ["obs"], "dynamics": ["z", "action"], "reward": ["z", "action"],
              "q": ["z", "action"], "policy": ["z", "eps"]}[kind]
    outputs = {"encoder": ["z"], "dynamics": ["z_next"], "reward": ["logits", "reward"],
               "q": ["logits", "q"], "policy": ["action", "mean", "log_std"]}[kind]
    return inputs + (["task"] if multitask else []), outputs


def example_inputs(model, kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random inputs of one graph: obs ~ N(0, 1), z an encoded obs, actions in [-1, 1]."""
    c = model.cfg
    task = torch.randint(0, max(c.num_tasks, 1), (n,), generator=gen)
    t = task if c.multitask else None
    with torch.no_grad():
        z = model.encode(torch.randn(n, c.obs_dim, generator=gen), t)
    a = torch.rand(n, c.action_dim, generator=gen) * 2 - 1
    x = {"encoder": (torch.randn(n, c.obs_dim, generator=gen),), "dynamics": (z, a),
         "reward": (z, a), "q": (z, a), "policy": (z, torch.randn(n, c.action_dim, generator=gen))
         }[kind]
    return (*x, task) if c.multitask else x


def export_graph(model, kind: str, path: Path, opset: int = OPSET) -> None:
    """Write one graph with the TorchScript exporter (no onnxscript needed)."""
    inputs, outputs = _io(kind, model.cfg.multitask)
    args = example_inputs(model, kind, 3, torch.Generator().manual_seed(0))
    axes = {name: {0: "n"} for name in inputs + outputs}
    if kind == "q":
        axes["logits"], axes["q"] = {1: "n"}, {1: "n"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.register_custom_op_symbolic("aten::mish", _mish_symbolic, opset)
        try:
            torch.onnx.export(_Graph(model, kind).eval(), args, str(path), dynamo=False,
                              input_names=inputs, output_names=outputs, dynamic_axes=axes,
                              opset_version=opset)
        finally:
            torch.onnx.unregister_custom_op_symbolic("aten::mish", opset)


def _mish_symbolic(g, x):
    """Mish as ``x * n / (n + 2)``, ``n = e (e + 2)``, ``e = exp(min(x, 20))``: the same
    function as ``x * tanh(softplus(x))`` (``(1+e)^2 - 1 = n``), without onnxruntime's slow
    Softplus kernel (it took 4 times as long as the matrix products)."""
    e = g.op("Exp", g.op("Min", x, g.op("Constant", value_t=torch.tensor(20.0))))
    n = g.op("Mul", e, g.op("Add", e, g.op("Constant", value_t=torch.tensor(2.0))))
    ratio = g.op("Div", n, g.op("Add", n, g.op("Constant", value_t=torch.tensor(2.0))))
    return g.op("Mul", x, ratio)


def describe_model(model, source_sha256: str = "") -> dict:
    """The ``model.json`` of an export: sizes, tasks, discounts, planner defaults."""
    from tdmpc_opt.config import PlannerConfig

    c = model.cfg
    lengths = c.episode_lengths or (500,)
    return {"format": "tdmpc-opt-onnx", "version": 1, "opset": OPSET,
            "graphs": {k: f"{k}.onnx" for k in GRAPHS}, "multitask": c.multitask,
            "obs_dim": c.obs_dim, "action_dim": c.action_dim, "latent_dim": c.latent_dim,
            "num_q": c.num_q, "num_bins": c.num_bins, "tasks": list(c.tasks),
            "action_dims": list(c.action_dims) if c.multitask else [c.action_dim],
            "discounts": [tm.discount_for_episode_length(n) for n in lengths],
            "planner": dataclasses.asdict(PlannerConfig()), "source_sha256": source_sha256}


EXPORT_FILES = (*(f"{k}.onnx" for k in GRAPHS), "model.json", *DEPLOY_FILES)
"""Every file an export writes into its folder."""
STAGING_PREFIX = ".export-partial"
"""Name prefix of the hidden folder an export is written into before it is moved in place."""


def is_export(folder: str | Path) -> bool:
    """Whether ``folder`` holds an earlier export (a ``model.json`` in this format)."""
    try:
        desc = json.loads((Path(folder) / "model.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(desc, dict) and desc.get("format") == "tdmpc-opt-onnx"


def check_export_folder(out_dir: str | Path) -> None:
    """Refuse, before any work, a folder whose own files an export would replace.

    ``out_dir`` may be missing, hold other files, or be an earlier export (replaced as a
    whole); a file there with the name of one an export writes (``example.py``,
    ``requirements.txt``, ...) that is not part of an earlier export is never overwritten.
    Raises:
        InputError: naming the files that would be replaced.
    """
    out = Path(out_dir)
    if not out.is_dir() or is_export(out):
        return
    taken = [name for name in EXPORT_FILES if (out / name).exists()]
    if taken:
        raise InputError(f"{out} already holds {', '.join(taken)}, not from an earlier export; "
                         f"export into a new or empty folder")


def export_onnx(model, out_dir: str | Path, source_sha256: str = "", verify: bool = False
                ) -> tuple[dict, dict[str, float]]:
    """Export the five graphs, ``model.json`` and the standalone planner into ``out_dir``.

    Everything is written (and with ``verify`` checked against PyTorch) in a hidden folder
    inside ``out_dir`` first and moved in place at the end, ``model.json`` last: an export
    that fails or is interrupted leaves ``out_dir`` as it was (an earlier export included).
    Returns (model.json contents, ``verify_export``'s differences or ``{}``).
    Raises:
        InputError: ``out_dir`` holds files of its own an export would replace.
    """
    check_export_folder(out_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(f"{STAGING_PREFIX}*"):  # left by an export that was killed
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out))
    try:
        desc, errors = _write_export(model, staging, source_sha256, verify)
        for name in sorted(EXPORT_FILES, key=lambda n: n == "model.json"):
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return desc, errors


def _write_export(model, out: Path, source_sha256: str, verify: bool
                  ) -> tuple[dict, dict[str, float]]:
    model = model.float().eval()
    for kind in GRAPHS:
        export_graph(model, kind, out / f"{kind}.onnx")
    desc = describe_model(model, source_sha256)
    (out / "model.json").write_text(json.dumps(desc, indent=1) + "\n")
    for name in DEPLOY_FILES:
        if (DEPLOY_DIR / name).exists():
            shutil.copyfile(DEPLOY_DIR / name, out / name)
    if not (out / "requirements.txt").exists():
        (out / "requirements.txt").write_text(REQUIREMENTS)
    return desc, (verify_export(model, out) if verify else {})


@torch.no_grad()
def verify_export(model, out_dir: str | Path, n: int = 64, seed: int = 1) -> dict[str, float]:
    """Largest difference between each exported graph's outputs and PyTorch's on random
    inputs: absolute, or relative where PyTorch's value exceeds 1 in magnitude."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    errors = {}
    for kind in GRAPHS:
        sess = ort.InferenceSession(str(Path(out_dir) / f"{kind}.onnx"),
                                    providers=["CPUExecutionProvider"])
        args = example_inputs(model, kind, n, gen)
        names, outs = _io(kind, model.cfg.multitask)
        got = sess.run(None, {k: v.numpy() for k, v in zip(names, args, strict=True)})
        want = _Graph(model, kind)(*args)
        want = want if isinstance(want, tuple) else (want,)
        for name, g, w in zip(outs, got, want, strict=True):
            diff = (torch.from_numpy(g) - w).abs() / w.abs().clamp_min(1.0)
            errors[f"{kind}.{name}"] = float(diff.max())
    return errors


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, fmt: str = "onnx",
                      verify: bool = True) -> dict:
    """Load any checkpoint and export it (``fmt`` must be ``onnx``).

    Returns ``{"model": model.json contents, "errors": verify_export(...)}``.
    Raises:
        InputError: unsupported format, or ``out_dir`` holds files of its own an export would
        replace. CheckpointError: unreadable or pixel-encoder model.
    """
    from tdmpc_opt.checkpoints import load_world_model, migrate_official_keys, read_state_dict

    if fmt != "onnx":
        raise InputError(f"unsupported export format {fmt!r}; the only one is 'onnx'")
    check_export_folder(out_dir)
    raw, _ = read_state_dict(checkpoint)
    check_state_encoder(migrate_official_keys(raw))
    model, info = load_world_model(checkpoint)
    desc, errors = export_onnx(model, out_dir, info["sha256"], verify)
    return {"model": desc, "errors": errors}
