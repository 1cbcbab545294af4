"""Reduced-precision matrix products, and how this machine computes them.

PyTorch multiplies int8 (``torch._int_mm``) and bfloat16 matrices on a CPU with oneDNN only
where the processor has instructions for them (VNNI or AMX for int8, AVX512-BF16 or AMX for
bfloat16). Elsewhere -- every AVX2-only x86 CPU, e.g. AMD Zen 3 and most laptops -- it falls
back to a reference loop: measured on a 2-core Zen 3 at 2-4 GFLOP/s against 112-148 for
float32 (benchmarks/README.md), which would make the "fast" int8 and bf16 planners some 40
times slower than float32. On such a machine this module computes the same products another
way:

* int8, ``kernel``: this package's own AVX2 product (:func:`tdmpc_opt.cpu_kernels.int8_mm`),
  exact like ``torch._int_mm`` and about 1.4x faster than float32 BLAS on the planner's
  shapes; used wherever the CPU extension builds for AVX2.
* int8, ``float``: the int8 operands as float32 through BLAS. Every partial sum of ``K``
  products of values in ``[-128, 127]`` is an integer of magnitude at most ``K * 2^14``,
  exact in float32 while it stays below ``2^24``, so the int32 results are *identical* to
  ``torch._int_mm``'s whatever the summation order; longer sums are split into chunks of
  :data:`EXACT_K` and added in int32.
* bfloat16: float32 products of the bfloat16-rounded operands, accumulated in float32 and
  rounded to bfloat16 once, as oneDNN computes them (the summation order may differ, so a
  result can differ in its last bfloat16 bit).

:func:`native` decides once per process and precision by timing the native product against
float32 on a small shape, with one thread, calls interleaved (the two cases differ by a
factor of 30-100; with two threads on a busy machine a float32 product waits for its
descheduled second thread, which made the check pick the reference loop in 14-19 of 20 tries
on a loaded 2-core machine, benchmarks/README.md); ``TDMPC_OPT_PRODUCTS=native``, ``=kernel``
(int8) or ``=float`` forces a path.
"""

from __future__ import annotations

import functools
import os
import time

import torch

from tdmpc_opt import cpu_kernels
from tdmpc_opt.errors import ConfigError

EXACT_K = 1024
"""Longest int8 sum computed in one float32 product: ``1024 * 128^2 = 2^24``."""
_ENV = "TDMPC_OPT_PRODUCTS"
_CHOICES = ("native", "kernel", "float")


def native(precision: str, device: torch.device | str = "cpu") -> bool:
    """Whether ``int8`` / ``bf16`` products run on PyTorch's own kernels here (always for
    ``fp32`` and on a GPU); False: :func:`int_mm` and :class:`~tdmpc_opt.fast_model.Dense`
    compute them another way (int8: :func:`int8_backend`; bf16: through float32 BLAS)."""
    forced = check_environment()
    if precision == "fp32" or torch.device(device).type != "cpu" or forced == "native":
        return True
    if forced in ("float", "kernel"):
        return False
    return _native_is_fast(precision)


def check_environment() -> str:
    """The forced path, ``TDMPC_OPT_PRODUCTS`` (``""``: decide per machine); a
    :class:`~tdmpc_opt.errors.ConfigError` for any other value."""
    forced = os.environ.get(_ENV, "")
    if forced and forced not in _CHOICES:
        raise ConfigError(f"{_ENV} must be one of {', '.join(_CHOICES)} (or unset), "
                          f"got {forced!r}")
    return forced


def int8_backend(device: torch.device | str = "cpu") -> str:
    """How int8 products are computed on ``device``: ``native`` (``torch._int_mm``),
    ``kernel`` (:func:`tdmpc_opt.cpu_kernels.int8_mm`) or ``float`` (float32 BLAS)."""
    if native("int8", device):
        return "native"
    forced = check_environment()
    if forced == "float":
        return "float"
    if cpu_kernels.int8_mm_available():
        return "kernel"
    if forced == "kernel":
        raise ConfigError(f"{_ENV}=kernel, but the int8 CPU kernel is unavailable here: "
                          f"{cpu_kernels.unavailable_reason() or 'the CPU has no AVX2'}")
    return "float"


@functools.cache
def _native_is_fast(precision: str) -> bool:
    """Time the native ``precision`` product against float32 on ``[128, 256] @ [256, 256]``.

    Native kernels run 2-4x faster than float32, reference loops 30-100x slower; the native
    path is kept unless it is more than 3x slower than float32 (:func:`_best_times`).
    """
    g = torch.Generator().manual_seed(0)
    xf, wf = torch.randn(128, 256, generator=g), torch.randn(256, 256, generator=g)
    if precision == "int8":
        xi = torch.randint(-127, 128, (128, 256), dtype=torch.int8, generator=g)
        wi = torch.randint(-127, 128, (256, 256), dtype=torch.int8, generator=g)

        def low():
            return torch._int_mm(xi, wi)
    elif precision == "bf16":
        xb, wb = xf.bfloat16(), wf.bfloat16()

        def low():
            return xb @ wb
    else:
        raise ValueError(f"no native-product check for precision {precision!r}")
    t_low, t_float = _best_times(low, lambda: xf @ wf)
    return t_low < 3 * t_float


def _best_times(first, second, calls: int = 5) -> tuple[float, float]:
    """Shortest of ``calls`` timings of each of two functions, called alternately with one
    thread (the caller's thread count restored afterwards): a multi-threaded call on a busy
    machine can wait milliseconds for a descheduled thread, and alternating calls keep a
    slow phase of the machine from falling on one function only."""
    threads = torch.get_num_threads()
    best = [float("inf"), float("inf")]
    try:
        torch.set_num_threads(1)
        first(), second()
        for _ in range(calls):
            for i, fn in enumerate((first, second)):
                t = time.perf_counter()
                fn()
                best[i] = min(best[i], time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return best[0], best[1]


def int_weight(w: torch.Tensor) -> torch.Tensor | None:
    """The form of an int8 weight ``[K, N]`` (values in ``[-127, 127]``) that :func:`int_mm`
    multiplies with on this machine (:func:`int8_backend`): None for ``torch._int_mm`` (no copy
    kept), the packed int8 weight for the CPU kernel, or a float32 copy for BLAS."""
    backend = int8_backend(w.device)
    if backend == "native":
        return None
    if backend == "kernel":
        return cpu_kernels.int8_pack(w)
    return w.to(torch.float32).contiguous()


def int_mm(x: torch.Tensor, w: torch.Tensor, prepared: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``x [M, K] int8 @ w [K, N] int8`` -> ``[M, N]`` int32, exactly ``torch._int_mm``'s
    result. ``prepared``: :func:`int_weight` of ``w`` (None: ``torch._int_mm``; int8: the CPU
    kernel's packed weight; float32: through BLAS)."""
    if prepared is None:
        return torch._int_mm(x, w)
    if prepared.dtype == torch.int8:
        return cpu_kernels.int8_mm(x, prepared, w.shape[1])
    k = x.shape[1]
    xf = x.to(torch.float32)
    if k <= EXACT_K:
        return torch.mm(xf, prepared).to(torch.int32)
    out = None
    for s in range(0, k, EXACT_K):
        part = torch.mm(xf[:, s:s + EXACT_K], prepared[s:s + EXACT_K]).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out
