"""Hand-fused CPU kernels for the int8 and float32 planners, built on first use.

The int8 planner's time goes to two things: ``torch._int_mm`` (near the machine's int8 rate)
and the elementwise work of every hidden layer: dequantise, LayerNorm, Mish, quantise for the
next product. ``torch.compile`` fuses that work, but into several passes per layer with a
thread barrier after each, and its ``exp`` is the slower exact one. ``ln_mish_int8`` does the
whole layer in one pass per row (``csrc/int8_layer.cpp``), built with PyTorch's own vector
types (``at::vec``) for the CPU's instruction set and ``torch.utils.cpp_extension`` (needs a
C++ compiler and ``ninja``; the build takes ~30 s once and is cached in
``TORCH_EXTENSIONS_DIR``). Where it cannot be built, :func:`available` is False with a reason
and the planner falls back to the PyTorch ops (``tdmpc_opt.fast_model.ln_mish``).

``ln_mish_f32`` is the float32 planner's counterpart: a float32 layer's bias (a first layer's
task bias and action inputs), LayerNorm and Mish in one pass per row after a bias-free BLAS
product, 2.5x faster than inductor's fused loops for a ``[488, 384]`` layer on an AVX2 CPU
(benchmarks/README.md).

``mlps_f32`` runs whole float32 networks (first layer, hidden layer, output layer) in one
parallel region, each thread a block of rows through one-thread BLAS products and the same row
kernel, with no thread barrier between layers: eager float32 plans 2-7% faster (two cores).

``two_hot_decode`` and ``ln_simnorm_f32`` finish the output layers of compiled float32 plans
(``fp32+compile``) in one pass per row each, the layer's bias included so that its product is a
plain ``mm``: reward and Q logits to values (softmax-weighted mean of the bin centres, then
``symexp``), and the dynamics' output to the next latent (LayerNorm, then SimNorm): ~1-2 ms less
per plan than inductor's kernels and ``addmm`` (1M model, batch 1, two cores).

``int8_mm`` (``csrc/int8_gemm.cpp``) is an exact int8 matrix product for AVX2 CPUs without
VNNI, where ``torch._int_mm`` runs a reference loop: ``vpmaddubsw`` on the inputs' magnitudes
and the sign-adjusted weights (no pair sum can saturate for weights in ``[-127, 127]``), about
1.4x float32 BLAS on a 2-core Zen 3. :mod:`tdmpc_opt.products` uses it wherever PyTorch's
own int8 product is not native and this extension builds for AVX2 or wider.

Numerics: the same formulas as the PyTorch path, with a faster ``exp`` (relative error ~1e-7:
``at::vec``'s ``exp_u20`` polynomial with ``scalef``, 11 vector ops on AVX-512); the int8
outputs equal the PyTorch path's except where a value lies within ~1e-4 of a rounding boundary
(tested: fewer than 1 in 1,000 differ, by one step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("int8_layer.cpp", "int8_gemm.cpp")]
_DISABLE_ENV = "TDMPC_OPT_NO_CPU_KERNELS"
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}
"""Compiler flags per ``torch.backends.cpu.get_cpu_capability()``: the same vector width
PyTorch's own kernels use on this CPU (anything else builds ``at::vec``'s portable code)."""

_lock = threading.Lock()
_state: dict[str, object] = {}


def build_flags() -> list[str]:
    """The compiler flags the extension is built with on this CPU (also for a benchmark's
    build of another version of a kernel's source)."""
    isa = torch.backends.cpu.get_cpu_capability()
    return ["-O3", "-fopenmp", *_ISA_FLAGS.get(isa, [])]  # at::parallel_for is OpenMP


def _build() -> str | None:
    """Build and load the extension; None on success, else why not."""
    if os.environ.get(_DISABLE_ENV):
        return f"disabled by {_DISABLE_ENV}"
    try:
        from torch.utils.cpp_extension import load
    except ImportError as err:  # pragma: no cover - part of torch
        return str(err)
    isa = torch.backends.cpu.get_cpu_capability()
    name = f"tdmpc_opt_cpu_{isa.lower()}"
    build_dir = _build_directory(name)
    log.info("building the fused int8 CPU kernel for %s (once; ~30 s)", isa)
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive_build(build_dir):
            load(name, [str(p) for p in _SOURCES], extra_cflags=build_flags(),
                 build_directory=str(build_dir), is_python_module=False, verbose=False)
    except Exception as err:  # no compiler / ninja, or a failed build: fall back
        first = str(err).splitlines()[0] if str(err) else ""
        return f"{type(err).__name__}: {first[:160]}"
    _register_fake()
    return None


def _build_directory(name: str) -> Path:
    """Where the extension ``name`` is built: under ``TORCH_EXTENSIONS_DIR`` or PyTorch's
    default root, one folder per Python and PyTorch version (a build links against one
    PyTorch; PyTorch's own layout keys on the Python version only)."""
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    torch_version = torch.__version__.replace("+", "_")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(root) / f"{python}_torch{torch_version}" / name


@contextlib.contextmanager
def _exclusive_build(build_dir: Path) -> Iterator[None]:
    """Hold an OS file lock on ``build_dir`` for the whole build, and clear a stale baton.

    Every process that loads the extension briefly creates ``build_dir/lock`` (PyTorch's
    ``FileBaton``) and waits, without end, while that file exists; a process killed in that
    window leaves it behind and every later load hangs. Here each load first takes an
    ``flock`` that the OS releases when its holder dies, so a ``lock`` file found while
    holding it belongs to no live builder and is removed.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Windows; PyTorch's baton alone
        yield
        return
    with open(build_dir / "tdmpc_opt.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing a stale build lock left by a killed process: %s", stale)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _register_fake() -> None:
    """Shapes for ``torch.compile`` tracing (the op is an opaque call in compiled graphs)."""
    @torch.library.register_fake("tdmpc_opt_cpu::ln_mish_int8_v3")
    def _(base, acc, col_scale, row_scale, a, wa, w, b, eps, wide=False, ref_groups=0):
        n = w.shape[0]
        m = acc.shape[0] - 2 * ref_groups if acc is not None else a.shape[0]
        if ref_groups:
            return (w.new_empty((m + 2 * ref_groups, n), dtype=torch.int8),
                    w.new_empty((m + ref_groups, 1)))
        return w.new_empty((2 * m if wide else m, n), dtype=torch.int8), w.new_empty((m, 1))

    @torch.library.register_fake("tdmpc_opt_cpu::int8_mm_packed")
    def _(x, packed, n):
        return x.new_empty((x.shape[0], n), dtype=torch.int32)

    @torch.library.register_fake("tdmpc_opt_cpu::ln_mish_f32_v2")
    def _(x, base, a, wa, w, b, eps):
        return w.new_empty(((x if x is not None else a).shape[0], w.shape[0]))

    @torch.library.register_fake("tdmpc_opt_cpu::two_hot_f32_v1")
    def _(x, bias, centers):
        return x.new_empty((x.shape[0],))

    @torch.library.register_fake("tdmpc_opt_cpu::ln_simnorm_f32_v1")
    def _(x, bias, w, b, groups_of, eps):
        return x.new_empty((x.shape[0], w.shape[0]))

    @torch.library.register_fake("tdmpc_opt_cpu::int8_ref_outputs_v1")
    def _(acc, scales, groups, col_scale, bias, n, epilogue, centers, norm_w, norm_b,
          groups_of, eps):
        m = acc.shape[0] - 2 * groups
        return bias.new_empty((m,) if epilogue == EPILOGUES["two_hot"] else (m, n))

    @torch.library.register_fake("tdmpc_opt_cpu::ref_codes_v1")
    def _(x, groups):
        m, k = x.shape
        return (x.new_empty((m + 2 * groups, k), dtype=torch.int8),
                x.new_empty((m + groups, 1)))

    @torch.library.register_fake("tdmpc_opt_cpu::mlp_pair_f32_v2")
    def _(x, a, base0, params0, n3_0, epilogue0, base1, params1, n3_1, epilogue1, d, eps,
          centers, norm_w, norm_b, groups_of):
        m = (x if x is not None else a).shape[0]

        def out(n3, epilogue):  # raw: a view of [M, round16(N3)]
            if epilogue == EPILOGUES["two_hot"]:
                return params0.new_empty((m,))
            if epilogue == EPILOGUES["simnorm"]:
                return params0.new_empty((m, n3))
            return params0.new_empty_strided((m, n3), (_round16(n3), 1))
        return (out(n3_0, epilogue0),
                out(n3_1, epilogue1) if params1 is not None else params0.new_empty((0,)))


def available() -> bool:
    """Whether :func:`ln_mish_int8` can run here (builds the extension on the first call)."""
    with _lock:
        if "error" not in _state:
            _state["error"] = _build()
            if _state["error"] is not None:
                log.warning("fused int8 CPU kernel unavailable (%s); using PyTorch ops",
                            _state["error"])
    return _state["error"] is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    available()
    return _state["error"]  # type: ignore[return-value]


def ln_mish_f32(x: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                eps: float = 1e-5, base: torch.Tensor | None = None, a: torch.Tensor | None = None,
                wa: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``mish(layer_norm(pre) * weight + bias)`` -> new ``[M, N]``, one pass per row
    (the float32 planner's layers; ``exp`` to ~1e-7). ``weight``, ``bias``: LayerNorm affine
    ``[N]``.

    Pre-activation of row ``i``: ``x[i] + base[i // (M / G)] + a[i] @ wa``, where ``x [M, N]``
    (rows contiguous, any row stride, e.g. columns of a wider product) is a product without its
    bias, ``base [G, >=N]`` a bias per group of consecutive rows (the layer's bias, ``G = 1``,
    or a first layer's task bias per environment) and ``a [M, A]``, ``wa [A, >=N]`` a first
    layer's action inputs and weights; the parts other than ``x`` or ``a`` may be None. So a
    layer's bias and action inputs are added in the same pass instead of three.
    """
    return torch.ops.tdmpc_opt_cpu.ln_mish_f32_v2(x, base, a, wa, weight, bias, eps)


def int8_ref_outputs(acc: torch.Tensor, scales: torch.Tensor, groups: int,
                     col_scale: torch.Tensor, bias: torch.Tensor, n: int,
                     epilogue: str = "raw", centers: torch.Tensor | None = None,
                     norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                     groups_of: int = 0, eps: float = 1e-5) -> torch.Tensor:
    """An int8 output layer in reference mode and what the planner makes of it, one pass per
    row: ``acc [M + 2E, >=n]`` int32, the product of reference-mode codes (rows ``< M`` each
    row's difference to its group's first row, then the ``E`` first rows' two 15-bit planes;
    :func:`tdmpc_opt.fast_model.quantize_rows_ref`) with their ``scales [M + E, 1]``, weight
    scales ``col_scale [>=n]`` and ``bias [>=n]``, rows in ``E = groups`` groups of
    consecutive rows. The outputs ``y [M, n]`` (as :meth:`tdmpc_opt.fast_model.Dense.
    ref_product` computes them) become, by :data:`EPILOGUES` name: ``raw`` ``y [M, n]``;
    ``two_hot`` their decoding with the bin ``centers [n]`` (:func:`two_hot_decode`) ``[M]``;
    ``simnorm`` ``SimNorm(LayerNorm(y))`` with the affine ``norm`` and groups of
    ``groups_of`` (:func:`ln_simnorm_f32`) ``[M, n]``. The same values as those functions on
    ``ref_product``'s output up to float32 rounding."""
    if epilogue not in EPILOGUES:
        raise ValueError(f"int8_ref_outputs: epilogue {epilogue!r}: choose from "
                         f"{sorted(EPILOGUES)}")
    w, b = norm if norm is not None else (None, None)
    return torch.ops.tdmpc_opt_cpu.int8_ref_outputs_v1(acc, scales, groups, col_scale, bias, n,
                                                       EPILOGUES[epilogue], centers, w, b,
                                                       groups_of, eps)


def ref_codes(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`tdmpc_opt.fast_model.quantize_rows_ref` in one call, bitwise: ``x [M, K]``
    float32 (rows contiguous) in ``groups`` groups of consecutive rows -> ``(codes [M + 2E, K]
    int8, scales [M + E, 1])`` (the int8 planner's latents, coded for the first layers)."""
    return torch.ops.tdmpc_opt_cpu.ref_codes_v1(x, groups)


def two_hot_decode(outputs: torch.Tensor, centers: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """TD-MPC2's two-hot decoding of a float32 output layer's rows ``[M, K]`` (rows
    contiguous, any row stride), its bias ``[K]`` (if not already added) and the bin centres
    ``[K]`` -> ``[M]``: ``symexp`` of the softmax-weighted mean of the centres, one pass per
    row with ``exp`` to ~1e-7 (PyTorch's softmax and sum to float32 rounding; a row whose
    maximum is NaN or infinite gives NaN, as there). A row's value does not depend on the
    batch it is in or the thread count."""
    return torch.ops.tdmpc_opt_cpu.two_hot_f32_v1(outputs, bias, centers)


def ln_simnorm_f32(x: torch.Tensor, bias: torch.Tensor, norm: tuple[torch.Tensor, torch.Tensor],
                   groups_of: int, eps: float = 1e-5) -> torch.Tensor:
    """The dynamics' output layer after its bias-free product ``x [M, L]`` (rows contiguous,
    any row stride): ``SimNorm(LayerNorm(x + bias))`` with the LayerNorm affine ``norm`` and
    SimNorm groups of ``groups_of`` entries in the planner's internal latent layout (group
    ``g`` is entries ``g, g + L/s, ...``), one pass per row -> ``[M, L]``; PyTorch's values
    to float32 rounding."""
    return torch.ops.tdmpc_opt_cpu.ln_simnorm_f32_v1(x, bias, *norm, groups_of, eps)


class Network(NamedTuple):
    """One float32 network of TD-MPC2's shape for :func:`mlps_f32`::

        h1 = mish(LN1(x @ w1 + base + a @ wa)); h2 = mish(LN2(h1 @ w2 + b2)); y = h2 @ w3 + b3

    ``x [M, K]`` (rows contiguous) with ``w1 [K, D]``, or both None when the latent part is
    already in ``base``; ``base``, ``a``, ``wa`` as for :func:`ln_mish_f32`; ``ln1``, ``ln2``:
    LayerNorm affines ``[D]``; ``w2 [D, D]``, ``b2 [D]``, ``w3 [D, N3]``, ``b3 [N3]``;
    weights ``[in, out]``, rows contiguous."""
    x: torch.Tensor | None
    w1: torch.Tensor | None
    base: torch.Tensor | None
    a: torch.Tensor | None
    wa: torch.Tensor | None
    ln1: tuple[torch.Tensor, torch.Tensor]
    w2: torch.Tensor
    b2: torch.Tensor
    ln2: tuple[torch.Tensor, torch.Tensor]
    w3: torch.Tensor
    b3: torch.Tensor


def mlps_f32(networks: Sequence[Network], eps: float = 1e-5) -> list[torch.Tensor]:
    """Whole float32 networks (:class:`Network`) in one parallel region -> a new ``[M, N3]``
    per network: every thread takes one block of rows (at least 16) of every network through
    all three layers (one-thread BLAS products and :func:`ln_mish_f32`'s row kernel), so no
    thread waits for another between layers. Bitwise the values of the layers computed one by
    one (tested). For eager plans: a compiled graph calls an op with list arguments through
    Python, and is faster with the layers as separate operations anyway (benchmarks/README.md).
    """
    if not networks:
        raise ValueError("mlps_f32 needs at least one network")
    cols = [list(c) for c in zip(*networks, strict=True)]
    x, w1, base, a, wa, ln1, w2, b2, ln2, w3, b3 = cols
    return torch.ops.tdmpc_opt_cpu.mlps_f32_v1(
        x, w1, base, a, wa, [n[0] for n in ln1], [n[1] for n in ln1], w2, b2,
        [n[0] for n in ln2], [n[1] for n in ln2], w3, b3, eps)


def mlp_pair_available() -> bool:
    """Whether :func:`mlp_pair_f32` runs here: the extension built for AVX-512 or AVX2."""
    return _built("mlp_pair_built")


def _built(query: str) -> bool:
    """The extension's answer to its op ``query`` (whether a part of it was compiled for this
    CPU); False where the extension is unavailable or loaded without that op."""
    if not available():
        return False
    try:
        return bool(getattr(torch.ops.tdmpc_opt_cpu, query)())
    except (AttributeError, RuntimeError):
        return False


def _round16(n: int) -> int:
    return -(-n // 16) * 16


def panel_width() -> int:
    """How many columns wide :func:`pack_panels` cuts weights for this CPU's
    :func:`mlp_pair_f32`: 64 on AVX-512, 16 on AVX2; 0 where it does not run."""
    if not mlp_pair_available():
        return 0
    return int(torch.ops.tdmpc_opt_cpu.mlp_pair_panel())


def pack_panels(w: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """A float32 weight ``w [K, N]`` (``y = x @ w``) in the column panels
    :func:`mlp_pair_f32` multiplies with: ``N`` zero-padded to a multiple of 16, cut into
    panels of ``width`` columns (default :func:`panel_width`; the last one 16 to ``width``
    wide), each stored ``[K, its width]``, one after another -> ``[K * round16(N)]``."""
    if width is None:
        width = panel_width()
        if not width:
            raise ValueError("pack_panels: mlp_pair_f32 does not run here; give the width")
    if width <= 0 or width % 16:
        raise ValueError(f"pack_panels: width must be a positive multiple of 16, got {width}")
    k, n = w.shape
    w = torch.nn.functional.pad(w.detach().float(), (0, _round16(n) - n))
    return torch.cat([w[:, j:j + width].reshape(-1) for j in range(0, w.shape[1], width)])


def network_params(w1: torch.Tensor | None, wa: torch.Tensor | None,
                   ln1: tuple[torch.Tensor, torch.Tensor], w2: torch.Tensor, b2: torch.Tensor,
                   ln2: tuple[torch.Tensor, torch.Tensor], w3: torch.Tensor, b3: torch.Tensor
                   ) -> torch.Tensor:
    """One network's parameters as :func:`mlp_pair_f32` reads them, in one float32 vector:
    the first layer's latent weights ``w1 [K1, D]`` (panels; None: the network has no latent
    input), its action weights ``wa [A, D]`` (None: no action input), LayerNorm 1's affine
    ``[D]``, ``w2 [D, D]`` (panels) and ``b2 [D]``, LayerNorm 2's affine, ``w3 [D, N3]``
    (panels) and ``b3 [N3]`` (zero-padded to a multiple of 16). Weights ``[in, out]``."""
    n3 = w3.shape[1]
    parts = [pack_panels(w1) if w1 is not None else None, wa,
             *ln1, pack_panels(w2), b2, *ln2, pack_panels(w3),
             torch.nn.functional.pad(b3.detach().float(), (0, _round16(n3) - n3))]
    return torch.cat([p.detach().float().reshape(-1) for p in parts if p is not None])


EPILOGUES = {"raw": 0, "two_hot": 1, "simnorm": 2}
"""What :func:`mlp_pair_f32` makes of a network's output rows ``y = h2 @ w3 + b3``: ``raw``
the rows themselves ``[M, N3]``; ``two_hot`` their two-hot decoding (:func:`two_hot_decode`
with the bin centres) ``[M]``; ``simnorm`` ``SimNorm(LayerNorm(y))`` (:func:`ln_simnorm_f32`
with the LayerNorm affine and group size) ``[M, N3]``, the next latent."""


def mlp_pair_f32(x: torch.Tensor | None, a: torch.Tensor | None,
                 nets: Sequence[tuple], hidden: int, eps: float = 1e-5,
                 centers: torch.Tensor | None = None,
                 norm: tuple[torch.Tensor, torch.Tensor] | None = None,
                 groups_of: int = 0) -> list[torch.Tensor]:
    """One or two whole float32 networks on the same inputs, as :class:`Network` describes
    them, on this package's AVX-512 or AVX2 products (:func:`mlp_pair_available`): ``x [M, K1]``
    latents or None (their part already in the bases), ``a [M, A]`` action inputs or None,
    ``nets``: per network ``(base [G, >=D], params, N3)`` or ``(base, params, N3,
    epilogue)`` with ``params`` from :func:`network_params`, ``hidden = D`` and an
    :data:`EPILOGUES` name (default ``raw``; ``two_hot`` needs ``centers [N3]``, ``simnorm``
    ``norm`` and ``groups_of``). Weights stay packed in each core's cache and every thread
    takes a block of rows through all layers, 24 rows at a time (two networks on two or more
    threads: each network on its own half of the threads); each output is summed over
    its inputs in order, so a row's values do not depend on the batch or thread count (as
    MKL's AVX-512 products sum: the same values as :func:`mlps_f32` on the 1M model). Returns
    per network its epilogue's result (``raw``: ``[M, N3]``, rows contiguous with row stride
    ``round16(N3)``)."""
    if not 1 <= len(nets) <= 2:
        raise ValueError("mlp_pair_f32 takes one or two networks")
    specs = []
    for net in nets:
        base, params, n3, *rest = net
        epilogue = rest[0] if rest else "raw"
        if epilogue not in EPILOGUES:
            raise ValueError(f"mlp_pair_f32: epilogue {epilogue!r}: choose from "
                             f"{sorted(EPILOGUES)}")
        specs.append((base, params, n3, EPILOGUES[epilogue]))
    if len(specs) == 1:
        specs.append((None, None, 0, 0))
    w, b = norm if norm is not None else (None, None)
    outs = torch.ops.tdmpc_opt_cpu.mlp_pair_f32_v2(x, a, *specs[0], *specs[1], hidden, eps,
                                                    centers, w, b, groups_of)
    return list(outs[:len(nets)])


def ln_mish_int8(base: torch.Tensor, acc: torch.Tensor | None, col_scale: torch.Tensor | None,
                 row_scale: torch.Tensor | None, a: torch.Tensor | None,
                 wa: torch.Tensor | None, weight: torch.Tensor, norm_bias: torch.Tensor,
                 eps: float = 1e-5, wide: bool = False, ref_groups: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's pre-activation, LayerNorm and Mish, quantised for the next product.

    Pre-activation of row ``i``: ``base[i // (M / G)] + acc[i] * col_scale * row_scale[i] +
    a[i] @ wa``, where ``base [G, >=N]`` is a bias per group of consecutive rows (the layer's
    bias, ``G = 1``, or a first layer's task bias per environment), ``acc [M, >=N]`` int32
    products with weight scales ``col_scale [>=N]`` and input scales ``row_scale [M, 1]``, and
    ``a [M, A]``, ``wa [A, >=N]`` a first layer's action inputs and weights (float32); either
    part may be None, not both. ``weight``, ``norm_bias``: LayerNorm affine ``[N]``.
    Returns ``(q [M, N] int8, scale [M, 1])`` with ``q * scale ~= mish(layer_norm(x))``;
    ``wide``: ``q [2M, N]`` holds the two planes of :func:`tdmpc_opt.fast_model.
    quantize_rows_wide` instead (``(q[:M] + q[M:] / 128) * scale ~= mish(layer_norm(x))``).
    ``ref_groups = E > 0`` (reference mode, :func:`tdmpc_opt.fast_model.quantize_rows_ref`):
    the ``M`` rows are ``E`` groups of consecutive rows; the output is ``[M + 2E, N]`` codes
    (each row's difference to its group's first row, then the first rows' 15-bit planes) and
    ``[M + E, 1]`` scales, and an ``acc`` input in that layout (``M + 2E`` rows, ``row_scale``
    ``M + E``) is read the same way.
    """
    return torch.ops.tdmpc_opt_cpu.ln_mish_int8_v3(base, acc, col_scale, row_scale, a, wa,
                                                    weight, norm_bias, eps, wide, ref_groups)


def int8_mm_available() -> bool:
    """Whether :func:`int8_mm` runs here: the extension built for AVX2 or wider."""
    return _built("int8_mm_built")


def int8_pack(w: torch.Tensor) -> torch.Tensor:
    """An int8 weight ``[K, N]`` (values in ``[-127, 127]``) packed for :func:`int8_mm`."""
    return torch.ops.tdmpc_opt_cpu.int8_pack(w)


def int8_mm(x: torch.Tensor, packed: torch.Tensor, n: int) -> torch.Tensor:
    """``x [M, K] int8 @ w [K, n]`` -> ``[M, n]`` int32, exactly ``torch._int_mm``'s result;
    ``packed``: :func:`int8_pack` of ``w``."""
    return torch.ops.tdmpc_opt_cpu.int8_mm_packed(x, packed, n)
