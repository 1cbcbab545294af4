"""Post-training quantization of world models: storage formats and faster CPU inference.

Formats (``tdmpc-opt quantize --format``):

* ``fp16`` / ``bf16``: every float tensor cast to half precision (storage only).
* ``int8``: weight-only, symmetric, per output channel: each row ``w`` of a linear weight
  (each ``[member, row]`` of a Q-ensemble weight, each task row of the embedding) is stored as
  ``round(w / s)`` in int8 with one float32 scale ``s = clip * max|w| / 127``. Tensors of the
  groups in :data:`DEFAULT_KEEP` stay float16 (see ``docs/quantization.md`` for the
  measurement behind that choice).
* ``int8-dynamic``: the same file as ``int8``, marked to plan with int8 activations
  quantized per row at run time (the ``int8`` precision of :mod:`tdmpc_opt.fast_model`).

Quantized files are our safetensors format with a ``quantization`` metadata entry; int8
tensors carry their scales under ``"<key>:scale"``. They load with ``load_agent`` /
``load_world_model`` like any checkpoint (dequantized to float32 by
:func:`dequantize_stored`). :func:`load_fast_agent` also selects the planner's precision
(``fp32``, ``bf16``, ``int8``) at load time, by default the one the file asks for.
Target Q-networks are dropped from quantized files (inference never uses them; loading
copies the online Qs into the targets); ``keep_target_q=True`` keeps them.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn

from tdmpc_opt.agent import Agent
from tdmpc_opt.errors import CheckpointError, TdmpcError
from tdmpc_opt.fast_model import COMPILE_SUFFIX

FORMATS = ("fp16", "bf16", "int8", "int8-dynamic")
RUNTIMES = ("auto", "fp32", "bf16", "int8")
"""Planner precisions :func:`load_fast_agent` can select (``auto``: what the file asks for)."""
GROUPS = ("norm", "bias", "task_emb", "twohot_heads", "pi_head", "encoder")
"""Tensor groups that may stay in higher precision in ``int8`` files (other weights are
always int8): LayerNorm affine params, biases, the task embedding, the final layers of the
reward and Q networks (two-hot logits), the final layer of the policy (and termination),
the encoder's weights (it runs once per step, on raw observations)."""
DEFAULT_KEEP = GROUPS
"""Measured choice (docs/quantization.md): only the weight matrices of the dynamics and the
hidden layers of reward, policy and Q become int8; keeping the encoder float16 removes the
latent error (4% more bytes), keeping the two-hot heads halves the reward error."""
SCALE_SUFFIX = ":scale"
SCHEME = "symmetric-per-output-channel"
_HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizationError(TdmpcError):
    """A quantization request cannot be carried out (format, already quantized input...)."""


def check_format(fmt: str) -> str:
    """Return ``fmt`` if it is a supported format name, else raise :class:`QuantizationError`."""
    if fmt not in FORMATS:
        raise QuantizationError(f"unsupported quantization format {fmt!r}; choose one of "
                                f"{', '.join(FORMATS)}")
    return fmt


# ------------------------------------------------------------------------- tensor level
def tensor_group(key: str, state: dict[str, torch.Tensor]) -> str:
    """Group of a state-dict key: one of :data:`GROUPS`, or ``weight`` (always int8)."""
    if ".ln." in key:
        return "norm"
    if key.endswith(".bias"):
        return "bias"
    if key.startswith("_task_emb."):
        return "task_emb"
    if key.startswith("_encoder."):
        return "encoder"
    m = re.fullmatch(r"(_reward|_pi|_termination|_Qs\.params|_target_Qs\.params)\.(\d+)\.weight",
                     key)
    if m and not any(re.fullmatch(rf"{re.escape(m.group(1))}\.{int(m.group(2)) + 1}\.weight", k)
                     for k in state):
        return "twohot_heads" if m.group(1) in ("_reward", "_Qs.params",
                                                "_target_Qs.params") else "pi_head"
    return "weight"


def quantize_int8(w: torch.Tensor, clip: float | torch.Tensor = 1.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of ``w``: per output row for ``[..., out, in]``, per tensor for 1-D.

    Returns ``(q int8 like w, scale float32 [...out] or [1])`` with ``w ~= q * scale``;
    ``clip`` (<= 1, scalar or per row) shrinks the range to trade clipping for resolution.
    """
    w = w.detach().float()
    amax = w.abs().max().reshape(1) if w.ndim == 1 else w.abs().amax(-1)
    scale = torch.where(amax > 0, amax * clip / 127.0, torch.ones_like(amax)).float()
    s = scale if w.ndim == 1 else scale.unsqueeze(-1)
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 values of an int8 tensor and its scales (inverse of :func:`quantize_int8`)."""
    return q.float() * (scale if q.ndim == 1 else scale.unsqueeze(-1))


def quantize_state(state: dict[str, torch.Tensor], fmt: str,
                   keep: tuple[str, ...] = DEFAULT_KEEP, keep_dtype: torch.dtype = torch.float16,
                   clips: dict[str, torch.Tensor] | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """Quantize a float state dict (our keys) to ``fmt``.

    Args:
        keep: groups (:data:`GROUPS`) stored as ``keep_dtype`` instead of int8 (int8 formats).
        clips: optional per-key clip ratios from :func:`calibrate_clips`.
    Returns:
        ``(stored tensors, quantization metadata)``.
    """
    check_format(fmt)
    unknown = set(keep) - set(GROUPS)
    if unknown:
        raise QuantizationError(f"unknown tensor groups {sorted(unknown)}; groups: {GROUPS}")
    if fmt in _HALF:
        out = {k: v.to(_HALF[fmt]) if v.is_floating_point() else v for k, v in state.items()}
        return out, {"format": fmt, "version": 1}
    out, quantized = {}, []
    for k, v in state.items():
        group = tensor_group(k, state)
        if not v.is_floating_point() or group in keep:
            out[k] = v.to(keep_dtype) if v.is_floating_point() else v
            continue
        out[k], out[k + SCALE_SUFFIX] = quantize_int8(v, (clips or {}).get(k, 1.0))
        quantized.append(k)
    meta = {"format": fmt, "version": 1, "scheme": SCHEME, "keep": list(keep),
            "keep_dtype": str(keep_dtype).replace("torch.", ""), "quantized": sorted(quantized),
            "activations": "dynamic-int8" if fmt == "int8-dynamic" else "float"}
    return out, meta


def dequantize_stored(state: dict[str, torch.Tensor], meta: dict) -> dict[str, torch.Tensor]:
    """Float32 tensors with the world model's keys from a quantized file's tensors.

    Raises:
        CheckpointError: unknown format or int8 tensors and scales that do not pair up.
    """
    if not isinstance(meta, dict) or meta.get("format") not in FORMATS:
        raise CheckpointError(f"unknown quantization format in checkpoint metadata: "
                              f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
    out = {}
    for k, v in state.items():
        if k.endswith(SCALE_SUFFIX):
            if k[:-len(SCALE_SUFFIX)] not in state:
                raise CheckpointError(f"quantized checkpoint: scale {k} without its tensor")
            continue
        if v.dtype == torch.int8:
            scale = state.get(k + SCALE_SUFFIX)
            if scale is None:
                raise CheckpointError(f"quantized checkpoint: int8 tensor {k} has no scale")
            out[k] = dequantize_int8(v, scale)
        else:
            out[k] = v.float()
    return out


# ---------------------------------------------------------------------------- calibration
@torch.no_grad()
def collect_layer_inputs(model, obs: torch.Tensor, task: torch.Tensor | None,
                         max_rows: int = 4096) -> dict[str, torch.Tensor]:
    """Inputs ``[rows, in]`` (``[E or 1, rows, in]`` for Q-ensemble layers) seen by every
    linear weight when the model encodes ``obs``, steps the dynamics and runs reward,
    policy and Q on the policy's actions."""
    from tdmpc_opt.layers import EnsembleLayer

    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear | EnsembleLayer) and not name.startswith("_target_Qs"):
            def hook(m, args, name=name):
                x = args[0]  # ensemble layers: [E or 1, N, in], each member its own rows
                x = x[:, :max_rows] if isinstance(m, EnsembleLayer) else \
                    x.reshape(-1, x.shape[-1])[:max_rows]
                seen[name + ".weight"] = x.clone()
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        z = model.encode(obs, task)
        a = model.pi(z, task, torch.zeros(*z.shape[:-1], model.cfg.action_dim)).action
        model.next(z, a, task)
        model.reward(z, a, task)
        model.q_logits(z, a, task)
    finally:
        for h in hooks:
            h.remove()
    return seen


def calibrate_clips(model, obs: torch.Tensor, task: torch.Tensor | None,
                    grid: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7)
                    ) -> dict[str, torch.Tensor]:
    """Per-row clip ratios that minimise each layer's output error on calibration inputs.

    For every int8 weight ``W [.., out, in]`` and its recorded inputs ``X``, picks per output
    row the ratio in ``grid`` minimising ``||X (W - deq(quant(W, ratio)))^T||^2``.
    """
    inputs = collect_layer_inputs(model, obs, task)
    state = model.state_dict()
    clips = {}
    for key, x in inputs.items():
        w = state[key].float()
        errs = []
        for r in grid:
            delta = w - dequantize_int8(*quantize_int8(w, r))  # [.., out, in]
            errs.append((x @ delta.transpose(-1, -2)).pow(2).sum(-2))  # [.., out]
        best = torch.stack(errs).argmin(0)
        clips[key] = torch.tensor(grid)[best]
    return clips


# ------------------------------------------------------------------------------ runtime
def runtime_for(qformat: str | None) -> str:
    """The planner precision a file asks for: ``int8`` for ``int8-dynamic`` files, ``bf16``
    for ``bf16`` files, ``fp32`` otherwise (fp16 and weight-only int8 are storage formats)."""
    return {"int8-dynamic": "int8", "bf16": "bf16"}.get(qformat or "", "fp32")


def load_fast_agent(path: str | Path, runtime: str = "auto", planner=None, **kwargs):
    """Load a checkpoint into an agent whose planner runs in ``runtime`` precision.

    ``auto`` follows :func:`runtime_for` of the file; ``fp32``, ``bf16`` and ``int8`` are the
    precisions of :mod:`tdmpc_opt.fast_model` (int8: per-channel int8 weights, per-row int8
    activations computed at run time). Weights load dequantized to float32; re-quantizing
    them per output channel gives back the stored int8 values (the largest entry of each row
    maps to 127 again), so an int8 file plans with exactly its stored weights.
    """
    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.checkpoints import quantization_metadata, read_state_dict

    if runtime not in RUNTIMES:
        raise QuantizationError(f"unknown runtime {runtime!r}; choose one of {RUNTIMES}")
    _, meta = read_state_dict(path)
    qfmt = (quantization_metadata(meta) or {}).get("format")
    runtime = runtime_for(qfmt) if runtime == "auto" else runtime
    return with_precision(load_agent(path, planner=planner, **kwargs), runtime)


def with_precision(agent: Agent, precision: str) -> Agent:
    """An :class:`~tdmpc_opt.agent.Agent` sharing ``agent``'s model, planner settings and info,
    planning in ``precision`` (the encoder stays float32), optionally ``+compile``d."""
    if precision.removesuffix(COMPILE_SUFFIX) not in RUNTIMES[1:]:
        raise QuantizationError(f"unknown precision {precision!r}; choose one of "
                                f"{RUNTIMES[1:]}, optionally with {COMPILE_SUFFIX!r}")
    return Agent(agent.model, agent.planner, agent.device, dict(agent.info, runtime=precision),
                 precision)


# ---------------------------------------------------------------------------- file level
def stored_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in a state dict (scales included)."""
    return sum(v.numel() * v.element_size() for v in state.values())


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str,
                        calibration: tuple[torch.Tensor, torch.Tensor | None] | None = None,
                        keep: tuple[str, ...] = DEFAULT_KEEP,
                        keep_target_q: bool = False) -> dict:
    """Read a float checkpoint, quantize it to ``fmt`` and write our safetensors format.

    Args:
        calibration: optional ``(obs [M, obs_dim], task [M] or None)``; int8 formats then
            choose clip ratios per row with :func:`calibrate_clips`.
    Returns:
        summary dict (``format``, ``file_bytes``, ``weight_bytes``, ``quantized`` count).
    Raises:
        QuantizationError: unsupported format, input already quantized, output = input.
        CheckpointError: unreadable input, or a pixel-encoder model.
    """
    from tdmpc_opt.checkpoints import (
        encode_metadata,
        load_world_model,
        migrate_official_keys,
        quantization_metadata,
        read_state_dict,
        save_tensors,
    )
    from tdmpc_opt.export import check_state_encoder

    check_format(fmt)
    if Path(dst).resolve() == Path(src).resolve():
        raise QuantizationError("output would overwrite the input; choose another file name")
    raw, meta = read_state_dict(src)
    if meta.get("quantization"):
        done = (quantization_metadata(meta) or {}).get("format")
        raise QuantizationError(f"{src} is already quantized ({done}); quantize the float "
                                "checkpoint it was made from instead")
    torch_q = [k for k, v in raw.items() if v.is_quantized]
    if torch_q:
        raise QuantizationError(f"{src} is already quantized: {len(torch_q)} torch qint8 "
                                f"tensors (e.g. {torch_q[0]}), like the paper's int8/mixed "
                                "files; quantize a float16/float32 checkpoint instead")
    check_state_encoder(migrate_official_keys(raw))
    model, info = load_world_model(src)
    clips = None
    if calibration is not None and fmt.startswith("int8"):
        clips = calibrate_clips(model, *calibration)
    state = {k: v for k, v in model.state_dict().items()
             if keep_target_q or not k.startswith("_target_Qs.")}
    qstate, qmeta = quantize_state(state, fmt, keep, clips=clips)
    qmeta.update(source_sha256=info["sha256"], calibrated=clips is not None,
                 target_q="kept" if keep_target_q else "dropped")
    extra = {"quantized_from": info["sha256"]}
    save_tensors(dst, qstate, encode_metadata(model.cfg, qstate, extra, qmeta))
    return {"format": fmt, "file_bytes": Path(dst).stat().st_size,
            "weight_bytes": stored_bytes(qstate), "quantized": len(qmeta.get("quantized", [])),
            "calibrated": clips is not None}
