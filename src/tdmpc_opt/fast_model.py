"""An inference-only view of a :class:`~tdmpc_opt.world_model.WorldModel`, built for planning.

The planner evaluates the same few networks on hundreds of rows per step, so this view
re-arranges the weights once instead of re-doing work per call:

* every first layer is split into latent, task and action parts; the task part (plus the
  bias) becomes a per-task bias table computed once, so no task embedding is concatenated or
  multiplied per sample, and the action part is a small ``[A, D]`` product the planner computes
  for a whole horizon at once;
* only the Q members a planning iteration picked are evaluated;
* weights are pre-transposed ``[in, out]`` and contiguous, in the chosen precision:
  ``fp32`` (exact), ``bf16`` (weights and activations bfloat16, products accumulate in
  float32) or ``int8`` (per-output-channel int8 weights, per-row int8 activations,
  ``torch._int_mm``; with the fused CPU kernel each row coded as its difference to its
  environment's first row, :func:`quantize_rows_ref`; otherwise the activations into the
  dynamics' and Q-functions' output products as 15-bit codes, :data:`WIDE_DEFAULT`);
* Mish is computed exactly through one exponential (:func:`mish_`), in place;
* int8 on a CPU: each layer's pre-activation sum, LayerNorm, Mish and quantisation for the
  next product run as one hand-fused kernel (:mod:`tdmpc_opt.cpu_kernels`, one pass per row)
  wherever it builds, and the output layers' products are read back with their epilogue
  (SimNorm, two-hot decoding) by another (:attr:`FastWorldModel.ref_outputs`); eager, the
  latents are coded by a third (:attr:`FastWorldModel.latent_op`);
  otherwise (or with ``fused_kernel=False``) as PyTorch ops; fp32 on a
  CPU likewise runs each layer's bias (a first layer's task bias and action inputs) and
  LayerNorm + Mish as one kernel after a bias-free product (:func:`cpu_kernels.ln_mish_f32`,
  its ``exp`` within ~1e-7 of the exact one, so values move by float32 rounding only), and
  eager plans run each network whole in one call with the same values
  (:attr:`FastWorldModel.whole_networks`);
* latents are kept with their SimNorm groups interleaved (feature ``j*G + g`` is element ``j``
  of group ``g``), so SimNorm is a softmax over a middle dimension, which PyTorch vectorises,
  instead of over a last dimension of 8, which it does not. The weights that read or write
  latents are permuted to match; :meth:`FastWorldModel.to_internal` converts encoder latents.

Everything is row-wise: a row's result never depends on the other rows of the batch (matrix
products get at least :data:`MIN_ROWS` rows, below which float32 BLAS takes another kernel
path), so an episode planned in a batch gets the same numbers as alone.

The view is a snapshot of the weights: :func:`fast_view` rebuilds it when they change.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F

from tdmpc_opt import cpu_kernels, products
from tdmpc_opt import math as tm
from tdmpc_opt.world_model import WorldModel

NETWORKS = ("dyn", "rew", "pi", "q")
"""The planner's networks: dynamics, reward, policy prior, Q-functions."""
WIDE_DEFAULT = frozenset({"dyn", "q"})
"""int8 without reference-row codes (PyTorch ops, e.g. on a GPU): networks whose output
product reads 15-bit activation codes by default. 8-bit codes
there move the planned actions as much as all other int8 rounding together (the next latent's
and the Q value's inputs; docs/quantization.md), for ~7% + ~4% of a plan's products."""
PRECISIONS = ("fp32", "bf16", "int8")
"""Precisions a :class:`FastWorldModel` can compute in; ``fp32`` is exact and the default."""
COMPILE_SUFFIX = "+compile"
MIN_ROWS = 16
"""Matrix products get at least this many rows: MKL's float32 products of 1-3 rows (and of
5-11 rows with 2 threads) round differently from those of more rows."""
_INT8_MAX = 127.0
WIDE_PLANE = 128.0
"""Weight of the second plane of a wide code (:func:`quantize_rows_wide`): ``hi + lo / 128``."""
_MISH_CLAMP = 20.0
_MISH_MIN = 0.30885
"""Just above ``-min(mish)`` (0.308840): ``|mish(y)| <= max(mish(max y), _MISH_MIN)``."""


def parse_precision(spec: str) -> tuple[str, bool]:
    """``"int8"`` -> ``("int8", False)``; ``"int8+compile"`` -> ``("int8", True)``.

    ``+compile`` runs a plan's MPPI iterations through ``torch.compile`` (inductor) as one
    graph, which fuses the elementwise work; the first plan of each batch size compiles (about
    2.5 minutes on a 2-core CPU; inductor caches it on disk for later processes).
    """
    precision, compile_ = spec, spec.endswith(COMPILE_SUFFIX)
    if compile_:
        precision = spec[:-len(COMPILE_SUFFIX)]
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, optionally with "
                         f"{COMPILE_SUFFIX!r}; got {spec!r}")
    return precision, compile_


# ------------------------------------------------------------------------------ Mish
def mish_(x: torch.Tensor) -> torch.Tensor:
    """Mish in place, exactly, through one exponential; any shape.

    ``tanh(softplus(x)) = ((1+e)^2 - 1) / ((1+e)^2 + 1) = n / (n + 2)`` with ``e = exp(x)``,
    ``n = e (e + 2)``. Written this way nothing cancels for negative ``x``; ``e`` is clamped
    at ``exp(20)``, where the ratio is 1 in float32 (``F.mish`` switches to ``x`` there too).
    ``exp`` is computed by MKL's vector library on CPU, which rounds an element the same
    whatever the tensor's length; ``torch.sigmoid`` (faster) does not, and would make an
    episode's numbers depend on the batch it is planned in.
    """
    e = torch.clamp(x, max=_MISH_CLAMP).exp_()
    n = torch.add(e, 2).mul_(e)
    return x.mul_(n).div_(n.add_(2))  # x * n first, then n becomes n + 2


def mish(x: torch.Tensor) -> torch.Tensor:
    """Out-of-place :func:`mish_`; equals ``F.mish`` to float32 rounding."""
    return mish_(x.clone())


def ln_mish(x: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor],
            int8_scale: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm with affine ``norm = (weight, bias)``, then Mish: ``[M, D]`` -> new ``[M, D]``.

    With ``int8_scale`` also returns the rows' int8 scales ``[M, 1]`` for the next product,
    from the LayerNorm output's row maximum (Mish rises above -1.19 and never falls below
    -0.30884, so ``max(mish(max y), 0.30885) / 127`` bounds every ``|mish(y)| / 127``) --
    no second pass over the activations. Otherwise the scales are None.
    """
    y = F.layer_norm(x, x.shape[-1:], norm[0], norm[1])
    if not int8_scale:
        return mish_(y), None
    top = mish_(y.amax(-1, keepdim=True)).clamp_min_(_MISH_MIN).div_(_INT8_MAX)
    return mish_(y), top


# ---------------------------------------------------------------------- matrix products
def quantize_rows(x: torch.Tensor, row_scale: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: ``x [M, K]`` -> ``(q [M, K] int8, scale [M, 1])``, ``q * scale
    ~= x``; the scales are the rows' absolute maxima / 127 unless given."""
    if row_scale is None:
        row_scale = _row_scales(x)
    return torch.div(x, row_scale).round_().to(torch.int8), row_scale


def _row_scales(x: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 scales of the rows of ``x [M, K]``: absolute maxima / 127, ``[M, 1]``."""
    return x.abs().amax(-1, keepdim=True).clamp_min_(1e-12).div_(_INT8_MAX)


def _wide_planes(x: torch.Tensor, row_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two planes of :func:`quantize_rows_wide`, still float: ``(hi, lo)``, each ``[M, K]``."""
    u = torch.div(x, row_scale)
    hi = torch.round(u)
    return hi, u.sub_(hi).mul_(WIDE_PLANE).round_()


def quantize_rows_wide(x: torch.Tensor, row_scale: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row 15-bit codes in two int8 planes: ``x [M, K]`` -> ``(codes [2M, K], row_scale)``
    with ``u = x / row_scale`` (``|u| <= 127``), ``hi = round(u)`` in rows ``0..M-1`` and
    ``lo = round((u - hi) * WIDE_PLANE)`` in rows ``M..2M-1``; ``hi + lo / WIDE_PLANE`` is ``u``
    to 1/256 of an int8 step. One int8 product of all ``2M`` rows then has 15-bit inputs
    (:meth:`Dense.wide`)."""
    return torch.cat(_wide_planes(x, row_scale)).to(torch.int8), row_scale


def quantize_rows_ref(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference-mode codes: ``x [M, K]`` as ``groups`` groups of consecutive rows ->
    ``(codes [M + 2E, K] int8, scales [M + E, 1])``: rows ``< M`` the 8-bit per-row codes of each
    row's difference to its group's first row; then the ``E`` first rows' 15-bit codes
    (:func:`quantize_rows_wide`: ``E`` hi rows, ``E`` lo rows) with their scales at ``M..``.
    Within a planning iteration an environment's rows lie close together, so the differences
    get a far finer step than the rows themselves (docs/quantization.md)."""
    m = x.shape[0]
    g = x.view(groups, m // groups, -1)
    ref = g[:, 0]
    d = (g - ref[:, None]).reshape(m, -1)
    d_scale, ref_scale = _row_scales(d), _row_scales(ref)
    # :func:`quantize_rows` and :func:`quantize_rows_wide`'s numbers, joined while float:
    # compiled, one fused kernel instead of an int8 ``cat`` after them
    codes = torch.cat([torch.div(d, d_scale).round_(), *_wide_planes(ref, ref_scale)])
    return codes.to(torch.int8), torch.cat([d_scale, ref_scale])


class Dense:
    """``y = x @ W + b`` for one linear layer, prepared for a precision.

    ``weight`` is ``[out, in]`` as in ``nn.Linear``; inputs ``[M, in]`` (any row stride),
    outputs ``[M, out]`` (computed ``out`` rounded up to a multiple of 8 wide, which BLAS
    runs faster, then sliced). int8: weights per output channel and activations per row, both
    symmetric; the int32 products are rescaled in float32. Where this CPU has no native int8
    or bfloat16 products, int8 ones run on this package's AVX2 kernel or through float32 BLAS
    and bf16 ones through float32 BLAS (:mod:`tdmpc_opt.products`: identical int32 results;
    bf16 rounded the same way up to summation order).
    """

    emulated: bool
    """Products not on PyTorch's own kernels: through float32 BLAS, or for int8 this
    package's CPU kernel (:mod:`tdmpc_opt.products`)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, precision: str):
        self.precision = precision
        w = weight.detach().float()
        self.out_dim = w.shape[0]
        self.min_rows = MIN_ROWS
        w = F.pad(w, (0, 0, 0, -w.shape[0] % 8))  # 8 | out: faster (and CUDA int8 needs it)
        if bias is not None:
            bias = F.pad(bias.detach().float(), (0, w.shape[0] - bias.shape[0]))
        if precision == "int8":
            if w.is_cuda:  # CUDA _int_mm also wants more than 16 rows
                self.min_rows = 17
            self.scale = w.abs().amax(1).clamp_min(1e-12) / _INT8_MAX
            self.weight = torch.round(w / self.scale[:, None]).clamp(-127, 127) \
                .to(torch.int8).t()
            self.weight_prepared = products.int_weight(self.weight)
            """The weight as :func:`products.int_mm` takes it here (None: ``torch._int_mm``)."""
            self.emulated = self.weight_prepared is not None
            dtype = torch.float32
        else:
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            self.scale, self.weight = None, w.t().contiguous().to(dtype)
            self.emulated = not products.native(precision, w.device)
            if self.emulated:  # bf16 values, float32 products
                self.weight = self.weight.float()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()

    def product(self, x: torch.Tensor, row_scale: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x @ W`` without bias: ``(y [M, out], None)``; int8: ``(y, row scales [M, 1])``
        where ``y`` carries the weight scales and the caller applies the row scales (given,
        or from the rows' absolute maxima)."""
        if self.precision != "int8":
            m = x.shape[0]
            if m < self.min_rows:  # the same kernel as for many rows, on zero-padded rows
                return self.product(F.pad(x, (0, 0, 0, self.min_rows - m)))[0][:m], None
            return self._mm(x)[:, :self.out_dim], None
        y, row_scale = self.int32_products(x, row_scale)
        return y[:, :self.out_dim].to(torch.float32).mul_(self.scale[:self.out_dim]), row_scale

    def int32_products(self, x: torch.Tensor, row_scale: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 only: the raw ``_int_mm`` result ``[M, out padded]`` int32 and the row scales
        ``[M, 1]``. ``x``: float rows (quantised here, with ``row_scale`` if given, else the
        rows' absolute maxima) or int8 rows already quantised with ``row_scale``."""
        m = x.shape[0]
        if m < self.min_rows:
            pad = self.min_rows - m
            s = None if row_scale is None else F.pad(row_scale, (0, 0, 0, pad), value=1.0)
            y, s = self.int32_products(F.pad(x, (0, 0, 0, pad)), s)
            return y[:m], s[:m]
        if x.dtype != torch.int8:
            x, row_scale = quantize_rows(x, row_scale)
        return products.int_mm(x, self.weight, self.weight_prepared), row_scale

    def __call__(self, x: torch.Tensor, row_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``x [M, in]`` -> ``[M, out]``; ``row_scale [M, 1]``: int8 input scales, if known."""
        m = x.shape[0]
        if m < self.min_rows:  # the same kernel as for many rows, on zero-padded rows
            pad = self.min_rows - m
            s = None if row_scale is None else F.pad(row_scale, (0, 0, 0, pad), value=1.0)
            return self(F.pad(x, (0, 0, 0, pad)), s)[:m]
        if self.precision != "int8":
            return self._mm(x, self.bias)[:, :self.out_dim]
        y, s = self.product(x, row_scale)
        if self.bias is None:
            return y.mul_(s)
        return torch.addcmul(self.bias[:self.out_dim], y, s)

    def _mm(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """float32 / bf16: ``x @ W (+ bias)`` ``[M, out padded]`` in the activations' dtype;
        bf16 without native products: float32 products of the bf16 values, rounded once."""
        if self.emulated:
            y = torch.mm(x.float(), self.weight) if bias is None else \
                torch.addmm(bias.float(), x.float(), self.weight)
            return y.to(x.dtype)
        return torch.mm(x, self.weight) if bias is None else torch.addmm(bias, x, self.weight)

    def wide(self, codes: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """int8 only: ``x @ W + b`` of wide codes ``[2M, in]`` (:func:`quantize_rows_wide`)
        with row scales ``[M, 1]``, as one ``_int_mm`` of the ``2M`` rows -> ``[M, out]``."""
        rows, m = codes.shape[0], codes.shape[0] // 2
        if rows < self.min_rows:
            codes = F.pad(codes, (0, 0, 0, self.min_rows - rows))
        acc = products.int_mm(codes, self.weight, self.weight_prepared)[:rows, :self.out_dim]
        y = acc[m:].to(torch.float32).div_(WIDE_PLANE).add_(acc[:m]).mul_(self.scale[:self.out_dim])
        return torch.addcmul(self.bias[:self.out_dim], y, row_scale)

    def ref_product(self, codes: torch.Tensor, scales: torch.Tensor, groups: int
                    ) -> torch.Tensor:
        """int8 only: ``x @ W + b`` of :func:`quantize_rows_ref` codes ``[M + 2E, in]`` and
        scales ``[M + E, 1]`` (``E = groups``), one ``_int_mm`` of all rows -> ``[M, out]``."""
        m, n = codes.shape[0] - 2 * groups, self.out_dim
        acc = self.ref_int32_products(codes, scales)[:, :n].to(torch.float32)
        # Out of place: in-place ops on views of one buffer make inductor emit masked,
        # branchy loads for every element (3x slower kernels); the numbers are the same.
        ref = (acc[m + groups:] / WIDE_PLANE + acc[m:m + groups]) * scales[m:]
        y = (acc[:m] * scales[:m]).view(groups, m // groups, -1) + ref[:, None]
        return torch.addcmul(self.bias[:n], y.view(m, -1), self.scale[:n])

    def ref_int32_products(self, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """int8 only: the int32 products ``[M + 2E, out padded]`` of :func:`quantize_rows_ref`
        codes ``[M + 2E, in]`` (scales ``[M + E, 1]``, applied by the caller)."""
        return self.int32_products(codes, scales[:1].expand(codes.shape[0], 1))[0]

    def accumulate_(self, acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``acc += x @ W`` in place (no bias); ``acc [M, out]``."""
        m = x.shape[0]
        if m < self.min_rows:
            pad = (0, 0, 0, self.min_rows - m)
            return acc.copy_(self.accumulate_(F.pad(acc, pad), F.pad(x, pad))[:m])
        if self.precision != "int8":
            if self.emulated:
                return acc.copy_(self._mm(x, acc))
            return acc.addmm_(x, self.weight)
        y, s = self.product(x)
        return acc.addcmul_(y, s)


# --------------------------------------------------------------------------- the view
class FastWorldModel:
    """Planning-time view of a :class:`WorldModel` in one precision (see the module doc).

    Shapes: ``L`` latent, ``A`` action, ``D`` hidden width, ``K`` bins; ``T`` task-table rows
    (the tasks, or 1 for a single-task model). Activations are in :attr:`dtype`; values,
    actions and task biases in float32.
    """

    def __init__(self, model: WorldModel, precision: str = "fp32",
                 fused_kernel: bool | None = None, wide: Iterable[str] = WIDE_DEFAULT,
                 ref_codes: bool | None = None, whole_networks: bool | None = None,
                 packed_networks: bool | None = None, ref_outputs: bool | None = None):
        precision, self.compile = parse_precision(precision)
        wide = frozenset(wide)
        if not wide <= set(NETWORKS):
            raise ValueError(f"wide: choose networks from {NETWORKS}; got {sorted(wide)}")
        self.wide = wide if precision == "int8" else frozenset()
        """int8: the networks whose last hidden activations feed the output product as 15-bit
        codes in two int8 planes (:func:`quantize_rows_wide`); see :data:`WIDE_DEFAULT`."""
        self.cfg, self.precision = model.cfg, precision
        self._compiled: dict[str, object] = {}
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.device = next(model.parameters()).device
        fusable = precision in ("int8", "fp32") and self.device.type == "cpu"
        if fused_kernel is None:  # int8 or fp32 on a CPU: the fused kernels wherever they build
            fused_kernel = fusable and cpu_kernels.available()
        if fused_kernel and not (fusable and cpu_kernels.available()):
            raise ValueError("the fused kernels are for int8 or fp32 on a CPU where they build "
                             f"({cpu_kernels.unavailable_reason() or 'they do'})")
        self.fused_kernel = fused_kernel and precision == "int8"
        """Every LayerNorm + Mish layer through :func:`cpu_kernels.ln_mish_int8` (int8, CPU)."""
        self.fused_ln = fused_kernel and precision == "fp32"
        """Every LayerNorm + Mish layer through :func:`cpu_kernels.ln_mish_f32` (fp32, CPU):
        one pass per row instead of PyTorch's or inductor's several."""
        packable = self.fused_ln and cpu_kernels.mlp_pair_available()
        if packed_networks is None:  # float32 on an AVX-512 or AVX2 CPU where kernels build
            packed_networks = packable
        if packed_networks and not packable:
            raise ValueError("packed_networks is for fp32 plans on an AVX-512 or AVX2 CPU with "
                             "the fused kernels")
        self.packed_networks = packed_networks
        """fp32 on an AVX-512 or AVX2 CPU (its default there): whole networks through
        :func:`cpu_kernels.mlp_pair_f32`, this package's products on weights packed once into
        column panels that stay in each core's cache, 24 rows at a time through all layers,
        instead of BLAS (:attr:`whole_networks`); also in compiled graphs (an op of fixed
        arguments). Each output is one multiply-add chain over its inputs in order, as MKL's
        AVX-512 kernels sum these products (the values came out bitwise equal on the 1M
        model; MKL's AVX2 kernels sum in another order, eager actions 7e-6 apart); faster
        plans (benchmarks/README.md, session 24; AVX2: session 26)."""
        if whole_networks is None:  # eager float32 where the fused kernels run, or packed
            whole_networks = self.fused_ln and (not self.compile or self.packed_networks)
        if whole_networks and not (self.fused_ln and (not self.compile or self.packed_networks)):
            raise ValueError("whole_networks is for fp32 plans with the fused CPU kernels "
                             "(with +compile: packed networks)")
        self.whole_networks = whole_networks
        """fp32 (its default there; with ``+compile`` only with :attr:`packed_networks`): each
        network's three layers, and the networks that read the same inputs (dynamics and
        reward, the picked Q members), in one call (:func:`cpu_kernels.mlp_pair_f32`, else
        :func:`cpu_kernels.mlps_f32`), every thread a block of rows through all of them; the
        same values as layer by layer, faster plans (benchmarks/README.md). Without packed
        networks compiled graphs keep the layers as separate operations: a list-argument op is
        called through Python there."""
        self.fused_outputs = self.fused_ln and self.compile
        """fp32+compile on a CPU with the fused kernels: reward and Q outputs decoded by
        :func:`cpu_kernels.two_hot_decode` and the dynamics' output normalised by
        :func:`cpu_kernels.ln_simnorm_f32`, one pass per row each, the output layer's bias
        added there (so its product is a plain ``mm``) instead of inductor's kernels and
        ``addmm``: the same values to float32 rounding, faster plans (benchmarks/README.md,
        session 23). Compiled graphs already round differently from eager ones; eager float32
        keeps PyTorch's ops, whose rounding the published-checkpoint test against the literal
        planner was set up with."""
        self.fused_decode = self.fused_outputs and model.cfg.num_bins > 1
        """:attr:`fused_outputs` for the two-hot heads (not for regression heads: ``num_bins``
        0 or 1)."""
        self.fused_epilogues = self.fused_outputs and self.whole_networks
        """:attr:`fused_outputs` inside the whole networks (fp32+compile, packed): the
        dynamics' output normalised and the two-hot heads decoded by
        :func:`cpu_kernels.mlp_pair_f32` on each block of rows it has just computed
        (:data:`cpu_kernels.EPILOGUES`), the same row kernels, no separate pass."""
        if ref_codes is None:  # the default wherever the fused kernel runs
            ref_codes = self.fused_kernel
        if ref_codes and not self.fused_kernel:
            raise ValueError("ref_codes needs the fused int8 CPU kernel")
        self.ref_codes = ref_codes
        """int8 with the fused kernel (its default there): every product's rows coded as
        differences to their environment's first row (:func:`quantize_rows_ref`), in place of
        the :attr:`wide` output codes; within 1.5% of float32's score where 8-bit per-row codes
        lose 3-9% (docs/quantization.md)."""
        if ref_codes:
            self.wide = frozenset()
        if ref_outputs is None:
            ref_outputs = ref_codes
        if ref_outputs and not ref_codes:
            raise ValueError("ref_outputs reads reference-row codes' products: needs ref_codes")
        self.ref_outputs = ref_outputs
        """int8 with reference-row codes (its default on a CPU), eager or compiled: every
        output layer's products read back by :func:`cpu_kernels.int8_ref_outputs` together
        with what the planner makes of them (the dynamics' LayerNorm + SimNorm, the two-hot
        heads' decoding), one pass per row, instead of PyTorch's or inductor's several: the
        same values to float32 rounding, faster plans (benchmarks/README.md, sessions 28-29);
        the scores of docs/quantization.md were checked again with it. ``ref_outputs=False``:
        PyTorch's ops (for comparisons)."""
        self.latent_op = ref_codes and not self.compile
        """Eager int8 with reference-row codes: the latents coded by :func:`cpu_kernels.
        ref_codes` (bitwise :func:`quantize_rows_ref`, one call instead of PyTorch's dozen
        ops; eager plans 0.94x the time, the same actions). Compiled, inductor's fused kernel
        is as fast (1.004x paired), so compiled plans keep it."""
        self.ref_decode = self.ref_outputs and model.cfg.num_bins > 1
        """:attr:`ref_outputs` for the two-hot heads (regression heads: ``num_bins`` 0 or 1,
        decoded by :meth:`decode`)."""
        self.sync_free = False
        """Never read tensor values on the host (set for CUDA-graph capture)."""
        c = model.cfg
        g = c.latent_dim // c.simnorm_dim
        self.perm = torch.arange(c.latent_dim, device=self.device).view(g, -1).t().reshape(-1)
        """Internal latent feature ``i`` is feature ``perm[i]`` of the model's latent."""
        with torch.no_grad():
            emb = model.task_embedding(torch.arange(c.num_tasks, device=self.device)) \
                if c.multitask else None
            self.action_masks = model._action_masks if c.multitask else None
            self.dyn1, self.dyn2, self.dyn3 = self._first(model._dynamics[0], emb), \
                self._hidden(model._dynamics[1]), model._dynamics[2]
            self.dyn3 = (Dense(self.dyn3.weight[self.perm], self.dyn3.bias[self.perm],
                               precision), self._norm(self.dyn3.ln, self.perm))
            w, b = self.dyn3[1]
            bound = (w.float().abs() * (c.latent_dim - 1) ** 0.5 + b.float().abs()).max()
            self._simnorm_bounded = bool(bound < 80)
            self.rew1, self.rew2 = self._first(model._reward[0], emb), \
                self._hidden(model._reward[1])
            self.rew3 = Dense(model._reward[2].weight, model._reward[2].bias, precision)
            pi = model._pi
            self.pi1, self.pi2 = self._first(pi[0], emb, with_action=False), self._hidden(pi[1])
            self.pi3 = Dense(pi[2].weight, pi[2].bias, precision)
            self._build_q(model, emb)
            self.centers = tm.bin_centers(c.num_bins, c.vmin, c.vmax, self.device)
            self._packed = {}
            """Per network (keyed by its output layer's ``id``): its parameters for
            :func:`cpu_kernels.mlp_pair_f32` (:attr:`packed_networks`)."""
            if self.whole_networks and self.packed_networks:
                nets = [(self.dyn1, self.dyn2, self.dyn3[0]), (self.rew1, self.rew2, self.rew3),
                        (self.pi1, self.pi2, self.pi3),
                        *zip(self.q1, self.q2, self.q3, strict=True)]
                self._packed = {id(net[2]): self._network_params(*net) for net in nets}

    @property
    def layers(self) -> str:
        """How this view computes its hidden layers, in words, e.g. ``int8 on cpu: fused CPU
        kernel, reference-row codes``. Two views of one model in the same precision and with the
        same description plan the same numbers; where the descriptions differ (the fused kernel
        built in one process and not in another), int8 plans with another code scheme, so an
        evaluation records this and never mixes episodes of both."""
        if self.fused_kernel:
            how = "fused CPU kernel, " + ("reference-row codes" if self.ref_codes else
                                         "15-bit codes into " + ",".join(sorted(self.wide)))
        elif self.fused_ln:
            how = "fused CPU kernel"
        else:
            how = "PyTorch ops" + (", 15-bit codes into " + ",".join(sorted(self.wide))
                                   if self.wide else "")
        compiled = COMPILE_SUFFIX if self.compile else ""
        return f"{self.precision}{compiled} on {self.device.type}: {how}"

    # ------------------------------------------------------------------- construction
    def _norm(self, ln, index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = ln.weight.detach().float(), ln.bias.detach().float()
        if index is not None:
            w, b = w[index], b[index]
        return w.to(self.dtype).contiguous(), b.to(self.dtype).contiguous()

    def _hidden(self, layer) -> tuple[Dense, tuple[torch.Tensor, torch.Tensor]]:
        """A hidden NormedLinear: (product, LayerNorm affine)."""
        return Dense(layer.weight, layer.bias, self.precision), self._norm(layer.ln)

    def _first(self, layer, emb: torch.Tensor | None, with_action: bool = True,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               ln: tuple | None = None) -> dict:
        """A first layer reading ``[z, task_emb, (a)]``, split into its parts.

        Returns ``{"z": Dense (latent part, internal latent order), "a": float32 Dense or
        None, "task": [T, D] float32 (bias + task part), "ln": affine}``.
        """
        lat, td = self.cfg.latent_dim, self.cfg.task_dim
        w = (layer.weight if weight is None else weight).detach().float()
        b = (layer.bias if bias is None else bias).detach().float()
        task = b[None].clone() if emb is None else b + emb.float() @ w[:, lat:lat + td].t()
        return {"z": Dense(w[:, :lat][:, self.perm], None, self.precision),
                "a": Dense(w[:, lat + td:], None, "fp32") if with_action else None,
                "task": task, "ln": ln if ln is not None else self._norm(layer.ln)}

    def _build_q(self, model: WorldModel, emb: torch.Tensor | None) -> None:
        """Per-member Q layers (online ensemble, as TD-MPC2 plans with)."""
        p, dt = model._Qs.params, self.dtype
        self.q1, self.q2, self.q3 = [], [], []
        for m in range(self.cfg.num_q):
            ln1 = (p[0].ln.weight[m].detach().to(dt), p[0].ln.bias[m].detach().to(dt))
            self.q1.append(self._first(None, emb, weight=p[0].weight[m], bias=p[0].bias[m],
                                       ln=ln1))
            self.q2.append((Dense(p[1].weight[m], p[1].bias[m], self.precision),
                            (p[1].ln.weight[m].detach().to(dt), p[1].ln.bias[m].detach().to(dt))))
            self.q3.append(Dense(p[2].weight[m], p[2].bias[m], self.precision))

    # ----------------------------------------------------------------------- helpers
    def compiled(self, name: str, fn):
        """``torch.compile(fn)`` (static shapes), made once per view and ``name``. On a CPU
        with inductor's C++ wrapper: the graph's ~80 kernel calls per MPPI iteration then cost
        ~1.5 ms less per plan (1M model, batch 1) than through its Python wrapper."""
        if name not in self._compiled:
            options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
            self._compiled[name] = torch.compile(fn, dynamic=False, options=options)
        return self._compiled[name]

    def task_rows(self, task: torch.Tensor | None, batch: int) -> torch.Tensor:
        """Task-table rows ``[B]`` (zeros for a single-task model)."""
        if task is None:
            return torch.zeros(batch, dtype=torch.long, device=self.device)
        return task.long()

    def mask(self, task: torch.Tensor | None) -> torch.Tensor | None:
        """Action masks ``[B, A]`` (None for single-task models)."""
        return None if self.action_masks is None else self.action_masks[task.long()]

    def to_internal(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latents ``[..., L]`` -> this view's latent layout and dtype."""
        return z[..., self.perm].to(self.dtype)

    def decode(self, logits: torch.Tensor) -> torch.Tensor:
        """Two-hot logits ``[..., K]`` -> float32 scalars ``[...]`` (as
        :func:`tdmpc_opt.math.two_hot_inv`: with ``num_bins`` 0 the head's one output itself,
        with 1 its ``symexp``)."""
        c = self.cfg
        if c.num_bins <= 1:  # one-value heads: no bins to weigh
            return tm.two_hot_inv(logits.float(), c.num_bins, c.vmin, c.vmax)[..., 0]
        probs = torch.softmax(logits.float(), dim=-1)
        return tm.symexp((probs * self.centers).sum(-1))

    def decode_outputs(self, outputs: list[torch.Tensor], heads: list[Dense], dim: int = 0
                       ) -> torch.Tensor:
        """Decoded values of ``n`` two-hot heads' outputs ``[M, K]`` as :meth:`_out` (with
        :attr:`fused_decode` still without the bias of the output layer in ``heads``) or
        :meth:`_whole` (bias added; with :attr:`fused_epilogues` already decoded, ``[M]``;
        likewise :meth:`_out` with :attr:`ref_decode`) gives them, stacked along ``dim``:
        ``[n, M]`` or ``[M, n]``."""
        if (self.fused_decode and self.fused_epilogues) or self.ref_decode:  # decoded by an op
            return torch.stack(outputs, dim)
        if self.fused_decode:  # whole networks' outputs carry their bias already
            return torch.stack([cpu_kernels.two_hot_decode(
                y, self.centers, None if self.whole_networks else d.bias[:d.out_dim])
                for y, d in zip(outputs, heads, strict=True)], dim)
        return self.decode(torch.stack(outputs, dim))

    # ------------------------------------------------------------------------ networks
    def first_layers(self, a: torch.Tensor, bias: torch.Tensor,
                     z: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """First-layer pre-activations of dynamics and reward, ``([M, D], [M, D])``.

        ``a [B, R, A]`` actions, ``bias [2, B, D]`` float32 (task part, plus the start
        latent's part at step 0), ``z [B*R, L]`` latents (None when already in ``bias``).
        """
        b, r, _ = a.shape
        a = a.reshape(b * r, -1)
        if self.fused_kernel:  # the parts, summed by the kernel
            zq = None if z is None else self._codes(z, b)
            return tuple(self._parts(first, bias_j, zq, a)
                         for first, bias_j in zip((self.dyn1, self.rew1), bias, strict=True))
        if self.whole_networks:  # the parts, multiplied and summed by the networks' kernel
            return (z, bias[0], a), (z, bias[1], a)
        if self.fused_ln:
            return tuple(self._parts_f32(first, bias_j, z, a)
                         for first, bias_j in zip((self.dyn1, self.rew1), bias, strict=True))
        out = []
        for first, bias_j in zip((self.dyn1, self.rew1), bias, strict=True):
            pre = first["a"](a)
            pre = pre.view(b, r, -1).add_(bias_j[:, None]).view(b * r, -1).to(self.dtype)
            out.append(pre if z is None else first["z"].accumulate_(pre, z))
        return out[0], out[1]

    def dyn_rew(self, pre: tuple[torch.Tensor, torch.Tensor], envs: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Dynamics and reward after their first products.

        ``pre``: first-layer pre-activations ``[M, D]`` of dynamics and reward. Returns the
        next latent ``[M, L]`` and the reward head's output ``[M, K]``
        (logits; see :meth:`_out`, :meth:`decode_outputs`).
        """
        dense, norm = self.dyn3
        if self.whole_networks:  # both networks in one kernel call
            z, r = self._whole((self.dyn1, self.dyn2, dense, *pre[0]),
                               (self.rew1, self.rew2, self.rew3, *pre[1]))
            if self.fused_epilogues:  # z normalised, r decoded (two-hot heads) already
                return z, r
            return self._simnorm(F.layer_norm(z, (self.cfg.latent_dim,), *norm)), r
        g = self._groups(envs)
        h = self._layer(self.dyn2, self._act(pre[0], self.dyn1["ln"], g), "dyn", g)
        if self.fused_outputs:
            z = cpu_kernels.ln_simnorm_f32(dense.product(h[0])[0], dense.bias[:dense.out_dim],
                                           norm, self.cfg.simnorm_dim)
        else:
            z = self._out(dense, h, "dyn", g)
            if not self.ref_outputs:  # else normalised by the output op already
                z = self._simnorm(F.layer_norm(z, (self.cfg.latent_dim,), *norm))
        r = self._layer(self.rew2, self._act(pre[1], self.rew1["ln"], g), "rew", g)
        return z, self._out(self.rew3, r, "rew", g)

    @staticmethod
    def _parts(first: dict, base: torch.Tensor, zq: tuple | None, a: torch.Tensor | None
               ) -> tuple:
        """A first layer's pre-activation as :func:`cpu_kernels.ln_mish_int8` sums it:
        ``base [B, D]`` task bias per environment, latents ``zq = (int8 [M, L], scales)`` or
        None (their part already in ``base``), actions ``a [M, A]`` or None."""
        acc, row_scale = (None, None) if zq is None else first["z"].int32_products(*zq)
        wa = None if a is None else first["a"].weight
        return (base, acc, None if zq is None else first["z"].scale, row_scale, a, wa)

    @staticmethod
    def _parts_f32(first: dict, base: torch.Tensor, z: torch.Tensor | None,
                   a: torch.Tensor | None) -> tuple:
        """A first layer's pre-activation as :func:`cpu_kernels.ln_mish_f32` sums it:
        ``(z @ W_z [M, D] or None, base [B, D] task bias per environment, a [M, A] or None,
        W_a)``; :meth:`_ln_mish` takes it."""
        x = None if z is None else first["z"].product(z)[0]
        return x, base, a, None if a is None else first["a"].weight

    @staticmethod
    def _network_params(first: dict, layer2: tuple, dense3: Dense) -> torch.Tensor:
        """A network's parameters for :func:`cpu_kernels.mlp_pair_f32`."""
        dense2, ln2 = layer2
        d = dense2.out_dim
        return cpu_kernels.network_params(
            first["z"].weight[:, :d], None if first["a"] is None else first["a"].weight[:, :d],
            first["ln"], dense2.weight[:d, :d], dense2.bias[:d], ln2,
            dense3.weight[:, :dense3.out_dim], dense3.bias[:dense3.out_dim])

    def _epilogue(self, dense3: Dense) -> str:
        """What :func:`cpu_kernels.mlp_pair_f32` makes of the outputs of the network whose
        output layer is ``dense3`` (:attr:`fused_epilogues`)."""
        if not self.fused_epilogues or dense3 is self.pi3:
            return "raw"
        if dense3 is self.dyn3[0]:
            return "simnorm"
        return "two_hot" if self.fused_decode else "raw"

    def _whole(self, *nets: tuple) -> list[torch.Tensor]:
        """Whole networks (:attr:`whole_networks`), each given as ``(first, layer2, dense3,
        z, base, a)``: first layer ``first`` on latents ``z [M, L]`` (None: their part
        already in ``base``), ``base [B, D]`` task bias per environment and actions ``a [M,
        A]`` or None; then ``layer2`` (product, LayerNorm affine) and output product
        ``dense3``. With :attr:`packed_networks` the networks (one or two) share ``z`` and
        ``a``. Returns each network's ``[M, out]`` (its bias added), or with
        :attr:`fused_epilogues` what :meth:`_epilogue` names."""
        if self.packed_networks:
            _, _, _, z, _, a = nets[0]
            return cpu_kernels.mlp_pair_f32(
                z, a, [(base, self._packed[id(dense3)], dense3.out_dim, self._epilogue(dense3))
                       for _, _, dense3, _, base, _ in nets], self.cfg.mlp_dim,
                centers=self.centers, norm=self.dyn3[1], groups_of=self.cfg.simnorm_dim)
        specs = []
        for first, (dense2, ln2), dense3, z, base, a in nets:
            d = dense2.out_dim  # the hidden width (weights are padded to 8 | columns)
            specs.append(cpu_kernels.Network(
                z, None if z is None else first["z"].weight[:, :d], base, a,
                None if a is None else first["a"].weight, first["ln"], dense2.weight[:d, :d],
                dense2.bias[:d], ln2, dense3.weight, dense3.bias))
        outs = cpu_kernels.mlps_f32(specs)
        return [y[:, :net[2].out_dim] for y, net in zip(outs, nets, strict=True)]

    def _groups(self, envs: int) -> int:
        """Reference groups of a call on ``envs`` environments (0: plain per-row codes)."""
        return envs if self.ref_codes else 0

    def _codes(self, z: torch.Tensor, envs: int) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 codes of latents ``z [M, L]`` (``envs`` environments) for first layers
        (:attr:`latent_op`: by the fused kernel's op, the same codes)."""
        if self.ref_codes:
            return cpu_kernels.ref_codes(z, envs) if self.latent_op else \
                quantize_rows_ref(z, envs)
        return quantize_rows(z)

    def _act(self, x, norm: tuple[torch.Tensor, torch.Tensor], groups: int = 0) -> tuple:
        """LayerNorm + Mish of a first layer's pre-activations as the next product's input:
        ``(h [M, D], None)``, int8 ``(h, row scales)``. ``x``: ``[M, D]``, or with the fused
        kernel :meth:`_parts` (then ``h`` is int8; reference-mode codes if ``groups``), or with
        :attr:`fused_ln` :meth:`_parts_f32`."""
        if self.fused_kernel:
            return cpu_kernels.ln_mish_int8(*x, *norm, ref_groups=groups)
        return self._ln_mish(x, norm)

    def _ln_mish(self, x: torch.Tensor | tuple, norm: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple:
        """:func:`ln_mish` of ``x [M, D]``; with :attr:`fused_ln` through
        :func:`cpu_kernels.ln_mish_f32`, where ``x`` may also be a pre-activation's parts
        (:meth:`_parts_f32`) that the kernel sums."""
        if self.fused_ln:
            x, base, a, wa = x if isinstance(x, tuple) else (x, None, None, None)
            return cpu_kernels.ln_mish_f32(x, *norm, base=base, a=a, wa=wa), None
        return ln_mish(x, norm, self.precision == "int8")

    def _layer(self, layer: tuple[Dense, tuple[torch.Tensor, torch.Tensor]], h: tuple,
               net: str, groups: int = 0) -> tuple:
        """The last hidden layer (product, LayerNorm, Mish) of network ``net`` on
        :meth:`_act`-style input ``h``; for a :attr:`wide` network its output is
        :func:`quantize_rows_wide` codes and row scales."""
        dense, norm = layer
        wide = net in self.wide
        if self.fused_kernel:
            acc, row_scale = dense.int32_products(*h)
            return cpu_kernels.ln_mish_int8(dense.bias[None], acc, dense.scale, row_scale, None,
                                            None, *norm, wide=wide, ref_groups=groups)
        if self.fused_ln:  # the bias added by the kernel
            return self._ln_mish((dense.product(h[0])[0], dense.bias[None], None, None), norm)
        out = self._ln_mish(dense(*h), norm)
        return quantize_rows_wide(*out) if wide else out

    def _out(self, dense: Dense, h: tuple, net: str, groups: int = 0) -> torch.Tensor:
        """The output product of network ``net`` on its :meth:`_layer` output ``h``; with
        :attr:`fused_decode` a two-hot head's without its bias (:meth:`decode_outputs`); with
        :attr:`ref_outputs` the dynamics' normalised and (:attr:`ref_decode`) a two-hot
        head's decoded ``[M]``."""
        if self.fused_decode and net in ("rew", "q"):
            return dense.product(h[0])[0]
        if groups and self.ref_outputs:
            epilogue = "simnorm" if net == "dyn" else \
                "two_hot" if self.ref_decode and net in ("rew", "q") else "raw"
            return cpu_kernels.int8_ref_outputs(
                dense.ref_int32_products(*h), h[1], groups, dense.scale, dense.bias,
                dense.out_dim, epilogue, centers=self.centers, norm=self.dyn3[1],
                groups_of=self.cfg.simnorm_dim)
        if groups:
            return dense.ref_product(*h, groups)
        return dense.wide(*h) if net in self.wide else dense(*h)

    def _simnorm(self, z: torch.Tensor) -> torch.Tensor:
        """SimNorm of LayerNorm outputs ``[M, L]`` (internal layout), row by row invariant.

        ``torch.softmax`` over a middle dimension rounds differently when two threads split
        an odd number of rows, so it is written out; when the LayerNorm bounds the inputs
        below 80 (``exp`` cannot overflow or vanish) the max-subtraction is skipped.
        """
        x = z.view(z.shape[0], self.cfg.simnorm_dim, -1)
        e = x.exp() if self._simnorm_bounded else (x - x.amax(1, keepdim=True)).exp_()
        return e.div_(e.sum(1, keepdim=True)).view(z.shape)

    def policy(self, z: torch.Tensor, task_rows: torch.Tensor, eps: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        """Policy-prior sample (as ``WorldModel.pi(...).action``), float32.

        ``z [B, R, L]``, ``task_rows [B]``, ``eps [B, R, A]``, ``mask [B, A]`` -> ``[B, R, A]``.
        """
        b, r, _ = z.shape
        first = self.pi1
        if self.whole_networks:
            out, = self._whole((first, self.pi2, self.pi3, z.reshape(b * r, -1),
                                first["task"][task_rows], None))
            return self._policy_sample(out, eps, mask)
        g = self._groups(b)
        if self.fused_kernel:
            h = self._parts(first, first["task"][task_rows], self._codes(z.reshape(b * r, -1), b),
                            None)
        elif self.fused_ln:
            h = self._parts_f32(first, first["task"][task_rows], z.reshape(b * r, -1), None)
        else:
            h = first["z"](z.reshape(b * r, -1))
            h.view(b, r, -1).add_(first["task"][task_rows].to(self.dtype)[:, None])
        h = self._layer(self.pi2, self._act(h, first["ln"], g), "pi", g)
        return self._policy_sample(self._out(self.pi3, h, "pi", g), eps, mask)

    def _policy_sample(self, out: torch.Tensor, eps: torch.Tensor, mask: torch.Tensor | None
                       ) -> torch.Tensor:
        """Policy output layer ``[B*R, 2A]`` -> action sample ``[B, R, A]`` (see
        :meth:`policy`)."""
        b, r = eps.shape[:2]
        mean, raw = out.float().reshape(b, r, -1).chunk(2, dim=-1)
        c = self.cfg
        log_std = torch.tanh(raw).add_(1).mul_(0.5 * (c.log_std_max - c.log_std_min)) \
            .add_(c.log_std_min)
        if mask is not None:
            m = mask[:, None]
            return torch.tanh((mean * m).addcmul_(eps * m, log_std.mul_(m).exp_()))
        return torch.tanh(mean.addcmul_(eps, log_std.exp_()))

    def q_members(self, z: torch.Tensor, a: torch.Tensor, task_rows: torch.Tensor,
                  members: list[int]) -> torch.Tensor:
        """Sum of the decoded Q of ``members``: ``z [B, R, L], a [B, R, A]`` -> ``[B, R]``."""
        b, r, _ = z.shape
        zf, af = z.reshape(b * r, -1), a.reshape(b * r, -1)
        g = self._groups(b)
        if self.fused_kernel:  # shared by the members
            zq, af = self._codes(zf, b), af.contiguous()
        if self.whole_networks:  # the members in one kernel call
            logits = self._whole(*((self.q1[m], self.q2[m], self.q3[m], zf,
                                    self.q1[m]["task"][task_rows], af) for m in members))
        else:
            logits = [self._q_member(m, zf, zq if self.fused_kernel else None, af, task_rows, g)
                      for m in members]
        return self.decode_outputs(logits, [self.q3[m] for m in members], 1).sum(-1).view(b, r)

    def _q_member(self, m: int, zf: torch.Tensor, zq: tuple | None, af: torch.Tensor,
                  task_rows: torch.Tensor, g: int) -> torch.Tensor:
        """Q logits ``[B*R, K]`` of member ``m`` layer by layer (``zq``: the latents' int8
        codes with the fused kernel, shared by the members)."""
        b = task_rows.shape[0]
        r = zf.shape[0] // b
        first = self.q1[m]
        if self.fused_kernel:
            pre = self._parts(first, first["task"][task_rows], zq, af)
        elif self.fused_ln:
            pre = self._parts_f32(first, first["task"][task_rows], zf, af)
        else:
            acc = first["a"](af).view(b, r, -1)
            acc = acc.add_(first["task"][task_rows][:, None]).view(b * r, -1).to(self.dtype)
            pre = first["z"].accumulate_(acc, zf)
        h = self._layer(self.q2[m], self._act(pre, first["ln"], g), "q", g)
        return self._out(self.q3[m], h, "q", g)

    def q_average(self, z: torch.Tensor, a: torch.Tensor, task_rows: torch.Tensor,
                  q_pick: torch.Tensor) -> torch.Tensor:
        """Average decoded Q of the two members each element picked, ``[B, R]``.

        ``q_pick [B, Q]`` uniforms whose two smallest entries pick the pair. Elements sharing
        a pair are evaluated together; otherwise each member runs on the elements that
        picked it (with :attr:`sync_free`: on all elements, unpicked results dropped).
        """
        nq = self.cfg.num_q
        if nq == 2:
            return self.q_members(z, a, task_rows, [0, 1]) / 2
        pair = torch.argsort(q_pick, dim=1)[:, :2].sort(1).values        # [B, 2]
        if self.sync_free:
            picked = F.one_hot(pair, nq).sum(1).bool()                    # [B, Q]
            return sum(torch.where(picked[:, m:m + 1], self.q_members(z, a, task_rows, [m]),
                                   0.0) for m in range(nq)) / 2
        if bool((pair == pair[:1]).all()):
            return self.q_members(z, a, task_rows, pair[0].tolist()) / 2
        total = torch.zeros(z.shape[:2], device=self.device)
        for m in range(nq):
            sel = (pair == m).any(1).nonzero().squeeze(1)
            if sel.numel():
                total[sel] += self.q_members(z[sel], a[sel], task_rows[sel], [m])
        return total / 2


# ------------------------------------------------------------------------------ cache
_VIEWS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(model: WorldModel) -> tuple:
    return tuple((p.data_ptr(), p._version, p.device) for p in model.parameters())


def fast_view(model: WorldModel, precision: str = "fp32") -> FastWorldModel:
    """The cached :class:`FastWorldModel` of ``model`` for ``precision`` (a
    :func:`parse_precision` spec), rebuilt when the model's parameters change."""
    views = _VIEWS.setdefault(model, {})
    key = _fingerprint(model)
    hit = views.get(precision)
    if hit is None or hit[0] != key:
        hit = views[precision] = (key, FastWorldModel(model, precision))
    return hit[1]
