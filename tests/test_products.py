"""Reduced-precision products: the float32-BLAS path equals PyTorch's own kernels."""

from __future__ import annotations

import pytest
import torch

from conftest import random_model
from tdmpc_opt import products
from tdmpc_opt.config import PlannerConfig
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


def test_native_can_be_forced_and_rejects_bad_values(monkeypatch):
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "float")
    assert not products.native("int8") and not products.native("bf16")
    assert products.native("fp32")
    assert products.int_weight(torch.zeros(4, 4, dtype=torch.int8)) is not None
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "native")
    assert products.native("int8") and products.native("bf16")
    assert products.int_weight(torch.zeros(4, 4, dtype=torch.int8)) is None
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "fast")
    with pytest.raises(ValueError, match="TDMPC_OPT_PRODUCTS"):
        products.native("int8")


def _dense_pair(monkeypatch, precision: str):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 64, generator=g), torch.randn(40, generator=g)
    made = {}
    for mode in ("native", "float"):
        monkeypatch.setenv("TDMPC_OPT_PRODUCTS", mode)
        made[mode] = Dense(w, b, precision)
    assert not made["native"].emulated and made["float"].emulated
    return made["native"], made["float"], torch.randn(50, 64, generator=g)


def test_dense_int8_same_numbers_either_way(monkeypatch):
    native, emulated, x = _dense_pair(monkeypatch, "int8")
    assert torch.equal(native(x), emulated(x))
    acc_n, s_n = native.int32_products(x)
    acc_e, s_e = emulated.int32_products(x)
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
    native and float32-BLAS products: the int32 products are the same numbers."""
    from tdmpc_opt import cpu_kernels

    if fused and not cpu_kernels.available():
        pytest.skip(f"fused CPU kernel: {cpu_kernels.unavailable_reason()}")
    model = random_model(tiny_cfg)
    pcfg = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=2)
    b = 3
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        z0 = model.encode(torch.randn(b, tiny_cfg.obs_dim, generator=g), torch.arange(b))
    noise = draw_noise(pcfg, tiny_cfg.action_dim, tiny_cfg.num_q, b,
                       [torch.Generator().manual_seed(i) for i in range(b)])
    out = {}
    for mode in ("native", "float"):
        monkeypatch.setenv("TDMPC_OPT_PRODUCTS", mode)
        fm = FastWorldModel(model, "int8", fused_kernel=fused)
        prev = torch.zeros(b, pcfg.horizon, tiny_cfg.action_dim)
        out[mode] = plan(fm, pcfg, z0, torch.arange(b), prev,
                         torch.ones(b, dtype=torch.bool), True, noise, torch.full((b,), 0.99))
    assert torch.equal(out["native"][0], out["float"][0])
    assert torch.equal(out["native"][1], out["float"][1])


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


def test_bench_names_the_product_backend(monkeypatch):
    from tdmpc_opt.cli.bench import matmul_peak, product_backend

    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "float")
    assert product_backend("int8") == "float32 BLAS" and product_backend("fp32") == "native"
    assert matmul_peak("int8", 64, rows=64, seconds=0) > 0
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "native")
    assert product_backend("int8") == "native"
