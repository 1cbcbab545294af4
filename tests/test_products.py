"""Reduced-precision products: the float32-BLAS path equals PyTorch's own kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from tdmpc_opt import cpu_kernels, products
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.errors import ConfigError
from tdmpc_opt.fast_model import Dense, FastWorldModel
from tdmpc_opt.planner import draw_noise, plan


@pytest.mark.parametrize("k", [16, 384, products.EXACT_K, products.EXACT_K + 1, 2500])
def test_int_mm_through_float_is_exact(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-128, 128, (37, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (k, 24), dtype=torch.int8, generator=g)
    got = products.int_mm(x, w, w.float())
    assert got.dtype == torch.int32
    assert torch.equal(got, torch._int_mm(x, w))


def test_int_mm_exact_at_the_largest_sums():
    """All entries -128: every sum is K * 2^14, the bound the chunking is built on."""
    for k in (products.EXACT_K, 3 * products.EXACT_K):
        x = torch.full((16, k), -128, dtype=torch.int8)
        w = torch.full((k, 8), -128, dtype=torch.int8)
        got = products.int_mm(x, w, w.float())
        assert torch.equal(got, torch.full((16, 8), k * 2 ** 14, dtype=torch.int32))


def _need_kernel():
    if not cpu_kernels.int8_mm_available():
        pytest.skip(f"int8 CPU kernel: {cpu_kernels.unavailable_reason() or 'no AVX2'}")


def _int_mm_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm`` (which wants more than 16 rows on some builds) or int64 products."""
    if x.shape[0] > 16 and x.shape[1] % 8 == 0 and w.shape[1] % 8 == 0:
        return torch._int_mm(x, w)
    return (x.long() @ w.long()).int()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (3, 7, 9), (4, 16, 16), (37, 384, 24),
                                   (488, 384, 104), (130, 130, 200), (67, 1027, 33)])
def test_int8_kernel_equals_int_mm(m, k, n, threads):
    """Every block shape and tail: rows not a multiple of 4, K not of 4, N not of 16; panels
    taken in pairs (the second one partial, an odd last one alone, a pair split between two
    threads' ranges)."""
    _need_kernel()
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(m * k + n)
    x = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (k, n), dtype=torch.int8, generator=g)
    got = cpu_kernels.int8_mm(x, cpu_kernels.int8_pack(w), n)
    assert got.dtype == torch.int32 and got.shape == (m, n)
    assert torch.equal(got, _int_mm_reference(x, w))


def test_int8_kernel_exact_where_pairs_are_largest():
    """The sums the saturation argument rests on: x = -128 or 127 against w = +-127 in every
    sign combination (a pair of products reaches 2 * 128 * 127 = 32512)."""
    _need_kernel()
    k = 512
    x = torch.tensor([[-128] * k, [127] * k, [-128, 127] * (k // 2), [127, -128] * (k // 2),
                      [-128] * k], dtype=torch.int8)
    # column j: the 16 sign patterns of four consecutive k, from the bits of j
    signs = torch.tensor([[1 - 2 * ((j >> i) & 1) for j in range(16)] for i in range(4)])
    w = (127 * signs.repeat(k // 4, 1)).to(torch.int8)
    got = cpu_kernels.int8_mm(x, cpu_kernels.int8_pack(w), 16)
    assert torch.equal(got, _int_mm_reference(x, w))
    full = cpu_kernels.int8_mm(x[:1], cpu_kernels.int8_pack(torch.full((k, 8), -127,
                                                                       dtype=torch.int8)), 8)
    assert torch.equal(full, torch.full((1, 8), k * 128 * 127, dtype=torch.int32))


def test_int8_kernel_reads_strided_rows_and_any_thread_count():
    _need_kernel()
    g = torch.Generator().manual_seed(5)
    wide = torch.randint(-128, 128, (300, 200), dtype=torch.int8, generator=g)
    x = wide[:, 8:136]  # rows 200 bytes apart
    w = torch.randint(-127, 128, (128, 48), dtype=torch.int8, generator=g)
    packed = cpu_kernels.int8_pack(w)
    ref = _int_mm_reference(x.contiguous(), w)
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        assert torch.equal(cpu_kernels.int8_mm(x, packed, 48), ref)
    assert torch.equal(cpu_kernels.int8_mm(x[:, 1:], cpu_kernels.int8_pack(w[1:]), 48),
                       _int_mm_reference(x[:, 1:].contiguous(), w[1:]))


def test_int8_kernel_refuses_what_it_cannot_compute():
    _need_kernel()
    w = torch.zeros(8, 8, dtype=torch.int8)
    w[3, 2] = -128
    with pytest.raises(RuntimeError, match=r"\[-127, 127\]"):
        cpu_kernels.int8_pack(w)
    packed = cpu_kernels.int8_pack(torch.zeros(8, 8, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="do not match"):
        cpu_kernels.int8_mm(torch.zeros(4, 12, dtype=torch.int8), packed, 8)


def test_int8_kernel_in_a_compiled_function():
    """The planner's +compile precisions trace through the kernel (an opaque call)."""
    _need_kernel()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(-128, 128, (40, 64), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (64, 24), dtype=torch.int8, generator=g)
    packed = cpu_kernels.int8_pack(w)

    def f(x):
        return cpu_kernels.int8_mm(x, packed, 24).float() * 0.5

    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, _int_mm_reference(x, w).float() * 0.5)


def test_native_can_be_forced_and_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "float")
    assert not products.native("int8") and not products.native("bf16")
    assert products.native("fp32") and products.int8_backend() == "float"
    assert products.int_weight(torch.zeros(4, 4, dtype=torch.int8)).dtype == torch.float32
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "native")
    assert products.native("int8") and products.native("bf16")
    assert products.int_weight(torch.zeros(4, 4, dtype=torch.int8)) is None
    assert products.int8_backend() == "native"
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "fast")
    with pytest.raises(ConfigError, match="TDMPC_OPT_PRODUCTS"):
        products.native("int8")


def test_native_check_times_with_one_thread_and_restores_threads(monkeypatch):
    """The check's products run single-threaded (on a busy machine a two-thread float32
    product waits for its descheduled thread, which made the check pick the 40x slower
    reference loop), alternately, and the caller's thread count comes back even on error."""
    seen = []

    def fake_int_mm(x, w):
        seen.append(("int8", torch.get_num_threads()))
        return torch.zeros(x.shape[0], w.shape[1], dtype=torch.int32)

    monkeypatch.setattr(torch, "_int_mm", fake_int_mm)
    products._native_is_fast.cache_clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert products._native_is_fast("int8")  # a no-op "product" is fast
        assert torch.get_num_threads() == 2
        assert seen and all(n == 1 for _, n in seen)

        def broken(x, w):
            raise RuntimeError("no kernel")

        monkeypatch.setattr(torch, "_int_mm", broken)
        products._native_is_fast.cache_clear()
        with pytest.raises(RuntimeError, match="no kernel"):
            products._native_is_fast("int8")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
        products._native_is_fast.cache_clear()


def test_best_times_alternates_and_keeps_the_shortest():
    order = []
    first, second = (lambda: order.append(1)), (lambda: order.append(2))
    t1, t2 = products._best_times(first, second, calls=3)
    assert order == [1, 2] * 4  # one warm-up each, then alternating
    assert 0 <= t1 < 1 and 0 <= t2 < 1


def test_kernel_forced_where_it_cannot_run_is_refused(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "int8_mm_available", lambda: False)
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "kernel")
    with pytest.raises(ConfigError, match="int8 CPU kernel is unavailable"):
        products.int_weight(torch.zeros(4, 4, dtype=torch.int8))
    monkeypatch.delenv("TDMPC_OPT_PRODUCTS")
    if not products.native("int8"):  # automatic choice: float32 BLAS, no error
        assert products.int8_backend() == "float"


def _dense_pair(monkeypatch, precision: str, other: str = "float"):
    """The same layer made with native products and with the ``other`` path, and an input."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    made = {}
    for mode in ("native", other):
        monkeypatch.setenv("TDMPC_OPT_PRODUCTS", mode)
        made[mode] = Dense(w, b, precision)
    assert not made["native"].emulated and made[other].emulated
    return made["native"], made[other], torch.randn(50, 64, generator=g)


@pytest.mark.parametrize("mode", ["float", "kernel"])
def test_dense_int8_same_numbers_either_way(monkeypatch, mode):
    if mode == "kernel":
        _need_kernel()
    native, other, x = _dense_pair(monkeypatch, "int8", mode)
    assert other.weight_prepared.dtype == (torch.int8 if mode == "kernel" else torch.float32)
    assert torch.equal(native(x), other(x))
    acc_n, s_n = native.int32_products(x)
    acc_e, s_e = other.int32_products(x)
    assert torch.equal(acc_n, acc_e) and torch.equal(s_n, s_e)


def test_dense_bf16_through_float_rounds_like_native(monkeypatch):
    native, emulated, x = _dense_pair(monkeypatch, "bf16")
    xb = x.bfloat16()
    yn, ye = native(xb), emulated(xb)
    assert ye.dtype == torch.bfloat16 and ye.shape == yn.shape == (50, 40)
    diff = (yn.float() - ye.float()).abs()
    ulp = yn.float().abs() * 2.0 ** -7  # one bfloat16 step at most (summation order)
    assert bool((diff <= ulp + 1e-6).all())
    acc_n = torch.zeros(50, 40, dtype=torch.bfloat16)
    acc_e = acc_n.clone()
    native.accumulate_(acc_n, xb)
    emulated.accumulate_(acc_e, xb)
    assert bool(((acc_n.float() - acc_e.float()).abs() <= acc_n.float().abs() * 2.0 ** -7
                 + 1e-6).all())


@pytest.mark.parametrize("fused", [False, True])
def test_int8_plans_identical_through_float(monkeypatch, tiny_cfg, fused):
    """The whole int8 planner (PyTorch ops or the fused kernel) plans the same actions with
    native products, this package's int8 kernel and float32-BLAS products: the int32
    products are the same numbers."""
    if fused and not cpu_kernels.available():
        pytest.skip(f"fused CPU kernel: {cpu_kernels.unavailable_reason()}")
    _need_kernel()
    model = random_model(tiny_cfg)
    pcfg = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=2)
    b = 3
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z0 = model.encode(torch.randn(b, tiny_cfg.obs_dim, generator=g), torch.arange(b))
    noise = draw_noise(pcfg, tiny_cfg.action_dim, tiny_cfg.num_q, b,
                       [torch.Generator().manual_seed(i) for i in range(b)])
    out = {}
    for mode in ("native", "kernel", "float"):
        monkeypatch.setenv("TDMPC_OPT_PRODUCTS", mode)
        fm = FastWorldModel(model, "int8", fused_kernel=fused)
        prev = torch.zeros(b, pcfg.horizon, tiny_cfg.action_dim)
        out[mode] = plan(fm, pcfg, z0, torch.arange(b), prev,
                         torch.ones(b, dtype=torch.bool), True, noise, torch.full((b,), 0.99))
    for mode in ("kernel", "float"):
        assert torch.equal(out["native"][0], out[mode][0])
        assert torch.equal(out["native"][1], out[mode][1])


def test_bf16_training_warns_without_native_products(monkeypatch, caplog, tiny_cfg):
    from tdmpc_opt.training import TDMPC2Learner, TrainConfig

    model = random_model(tiny_cfg)
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "float")
    with caplog.at_level("WARNING", logger="tdmpc_opt.training"):
        TDMPC2Learner(model, TrainConfig(bf16=True))
    assert "no native bfloat16 matrix products" in caplog.text
    caplog.clear()
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "native")
    with caplog.at_level("WARNING", logger="tdmpc_opt.training"):
        TDMPC2Learner(model, TrainConfig(bf16=True))
    assert caplog.text == ""


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_peak_times_the_product_alone(monkeypatch, precision):
    """The floor's peak is the rate of a bias-free product (the planner's hidden layers), not
    of ``addmm``, whose bias copy makes it slower and the floor look closer than it is."""
    from tdmpc_opt.cli import bench
    from tdmpc_opt.fast_model import Dense

    def with_bias(*_args, **_kw):
        raise AssertionError("the peak must not time the product with its bias")

    monkeypatch.setattr(Dense, "__call__", with_bias)
    assert bench.matmul_peak(precision, 64, rows=64, seconds=0) > 0


def test_bench_names_the_product_backend(monkeypatch):
    from tdmpc_opt.cli.bench import matmul_peak, product_backend

    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "float")
    assert product_backend("int8") == "float32 BLAS" and product_backend("fp32") == "native"
    assert matmul_peak("int8", 64, rows=64, seconds=0) > 0
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "native")
    assert product_backend("int8") == "native"
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "kernel")
    _need_kernel()
    assert product_backend("int8") == "int8 kernel" and product_backend("bf16") == "float32 BLAS"
    assert matmul_peak("int8", 64, rows=64, seconds=0) > 0
