"""The fused int8 CPU kernel against the PyTorch ops it replaces."""

import dataclasses
import subprocess
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F

from tdmpc_opt import cpu_kernels
from tdmpc_opt import math as tm
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.fast_model import (
    WIDE_PLANE,
    Dense,
    FastWorldModel,
    ln_mish,
    quantize_rows,
    quantize_rows_ref,
    quantize_rows_wide,
)
from tdmpc_opt.planner import draw_noise, plan
from tdmpc_opt.world_model import WorldModel

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason=f"fused CPU kernel: {cpu_kernels.unavailable_reason()}")


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor):
    """The PyTorch path: LayerNorm + Mish with int8 row scales, then the next product's
    quantisation."""
    h, top = ln_mish(x, (w, b), int8_scale=True)
    return quantize_rows(h, top)


def _assert_int8_close(got, want):
    (q, s), (q_ref, s_ref) = got, want
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=0)
    diff = (q.int() - q_ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3


@needs_kernel
@pytest.mark.parametrize("m,n", [(488, 384), (5, 20), (33, 101)])
def test_hidden_layer_equals_pytorch_ops(m, n):
    """int32 products + weight and row scales + bias: one row at a time, any width."""
    g = torch.Generator().manual_seed(m)
    dense = Dense(torch.randn(n, 64, generator=g), torch.randn(n, generator=g), "int8")
    x = torch.randn(m, 64, generator=g)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    acc, row_scale = dense.int32_products(x)
    got = cpu_kernels.ln_mish_int8(dense.bias[None], acc, dense.scale, row_scale, None, None,
                                   w, b)
    _assert_int8_close(got, _reference(dense(x), w, b))


@needs_kernel
def test_wide_codes_equal_pytorch_ops():
    """wide: the first plane is the 8-bit code, both planes decode to the layer's output within
    1/256 of an int8 step (plus float rounding), like the PyTorch path's wide codes."""
    g = torch.Generator().manual_seed(3)
    m, n = 77, 136
    dense = Dense(torch.randn(n, 64, generator=g), torch.randn(n, generator=g), "int8")
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    acc, row_scale = dense.int32_products(torch.randn(m, 64, generator=g))
    args = (dense.bias[None], acc, dense.scale, row_scale, None, None, w, b)
    q8, s8 = cpu_kernels.ln_mish_int8(*args)
    codes, s = cpu_kernels.ln_mish_int8(*args, wide=True)
    assert codes.shape == (2 * m, n) and torch.equal(codes[:m], q8) and torch.equal(s, s8)
    assert codes[m:].abs().max() <= WIDE_PLANE / 2
    pre = dense.bias + acc[:, :n].float() * dense.scale[:n] * row_scale
    h, top = ln_mish(pre, (w, b), int8_scale=True)
    decoded = (codes[:m].float() + codes[m:].float() / WIDE_PLANE) * s
    torch.testing.assert_close(decoded, h, atol=float(s.max()) * (0.5 / WIDE_PLANE + 1e-4),
                               rtol=0)
    ref_codes, ref_s = quantize_rows_wide(h, top)
    ref = (ref_codes[:m].float() + ref_codes[m:].float() / WIDE_PLANE) * ref_s
    torch.testing.assert_close(decoded, ref, atol=float(s.max()) * 1.01 / WIDE_PLANE, rtol=0)


@needs_kernel
@pytest.mark.parametrize("a_dim", [1, 5, 6, 9])  # 0-6 unrolled when compiled, 9 at run time
def test_first_layer_parts_equal_pytorch_ops(a_dim):
    """Per-environment base rows, latent products and action inputs summed in the kernel."""
    g = torch.Generator().manual_seed(0)
    envs, rows, n = 3, 40, 96
    z_dense = Dense(torch.randn(n, 32, generator=g), None, "int8")
    a_dense = Dense(torch.randn(n, a_dim, generator=g), None, "fp32")
    base = torch.randn(envs, n, generator=g)
    z = torch.softmax(torch.randn(envs * rows, 32, generator=g), -1)
    a = torch.rand(envs * rows, a_dim, generator=g) * 2 - 1
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    pre = (a_dense(a).view(envs, rows, n) + base[:, None]).view(envs * rows, n)
    for zq in (quantize_rows(z), None):
        acc, row_scale = z_dense.int32_products(*zq) if zq else (None, None)
        got = cpu_kernels.ln_mish_int8(base, acc, z_dense.scale if zq else None, row_scale,
                                       a, a_dense.weight, w, b)
        want_pre = pre if zq is None else z_dense.accumulate_(pre.clone(), z)
        _assert_int8_close(got, _reference(want_pre, w, b))


@needs_kernel
def test_bad_shapes_are_refused():
    w = torch.ones(8)
    with pytest.raises(RuntimeError, match="base must be"):
        cpu_kernels.ln_mish_int8(torch.zeros(3, 8), None, None, None, torch.zeros(4, 2),
                                 torch.zeros(2, 8), w, w)
    with pytest.raises(RuntimeError, match="needs products"):
        cpu_kernels.ln_mish_int8(torch.zeros(1, 8), None, None, None, None, None, w, w)


# ------------------------------------------------------------------ in the planner
def _model(cfg):
    torch.manual_seed(0)
    return WorldModel(cfg).eval()


def _assert_views_predict_alike(model, plain, fused, tol: float):
    """Policy samples and Q values of two views of ``model`` for three tasks' latents agree
    within ``tol``; returns the latents ``[3, 40, L]`` and actions ``[3, 40, 6]`` used."""
    task = torch.tensor([0, 1, 2])
    z = plain.to_internal(model.encode(torch.randn(3, model.cfg.obs_dim), task))
    z = z[:, None].expand(3, 40, -1).contiguous()
    rows, mask, eps = plain.task_rows(task, 3), plain.mask(task), torch.randn(3, 40, 6)
    a, a_fused = plain.policy(z, rows, eps, mask), fused.policy(z, rows, eps, mask)
    torch.testing.assert_close(a_fused, a, atol=tol, rtol=0)
    q, q_fused = plain.q_members(z, a, rows, [0, 1]), fused.q_members(z, a, rows, [0, 1])
    torch.testing.assert_close(q_fused, q, atol=tol, rtol=tol)
    return z, a


@torch.no_grad()
def test_planner_predictions_with_and_without_kernel(tiny_cfg):
    """The kernel computes what the PyTorch ops do, for the codes both run (15-bit outputs)."""
    model = _model(tiny_cfg)
    fused = FastWorldModel(model, "int8", True, ref_codes=False)
    plain = FastWorldModel(model, "int8", False)
    assert fused.fused_kernel and not plain.fused_kernel
    z, a = _assert_views_predict_alike(model, plain, fused, 1e-3)
    pre = fused.first_layers(a[:, :5].contiguous(), torch.randn(2, 3, fused.dyn1["task"].shape[1]),
                             z[:, :5].reshape(15, -1))
    nxt, rew = fused.dyn_rew(pre)
    assert nxt.shape == (15, tiny_cfg.latent_dim) and rew.shape == (15, tiny_cfg.num_bins)


@needs_kernel
@pytest.mark.parametrize("ref_codes", [False, True])
def test_fused_plan_is_batch_invariant_and_refuses_other_precisions(tiny_cfg, ref_codes):
    model = _model(tiny_cfg)
    pcfg = PlannerConfig(iterations=2, num_samples=32, num_elites=8, num_pi_trajs=4)
    fm = FastWorldModel(model, "int8", True, ref_codes=ref_codes)
    task = torch.tensor([0, 2, 1])
    z = model.encode(torch.randn(3, tiny_cfg.obs_dim), task)
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    noise = draw_noise(pcfg, tiny_cfg.action_dim, tiny_cfg.num_q, 3, gens)
    prev, t0, gamma = torch.zeros(3, pcfg.horizon, tiny_cfg.action_dim), \
        torch.tensor([True, False, True]), torch.full((3,), 0.99)
    act, mean = plan(fm, pcfg, z, task, prev, t0, True, noise, gamma)
    for i in range(3):
        a1, m1 = plan(fm, pcfg, z[i:i + 1], task[i:i + 1], prev[i:i + 1], t0[i:i + 1], True,
                      noise[i:i + 1], gamma[i:i + 1])
        assert torch.equal(a1[0], act[i]) and torch.equal(m1[0], mean[i])
    with pytest.raises(ValueError, match="int8 or fp32 on a CPU"):
        FastWorldModel(model, "bf16", True)


@needs_kernel
def test_reference_helper_matches_layer_norm_mish():
    """The reference used above is the PyTorch path itself (not a re-derivation)."""
    x = torch.randn(7, 16)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    q, s = _reference(x, w, b)
    torch.testing.assert_close(q.float() * s, F.mish(F.layer_norm(x, (16,), w, b)),
                               atol=float(s.max()) / 2 + 1e-6, rtol=0)


def test_exclusive_build_removes_a_stale_baton(tmp_path):
    """A ``lock`` file left by a killed loader would make every later load wait forever."""
    (tmp_path / "lock").touch()
    with cpu_kernels._exclusive_build(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_exclusive_build_waits_for_a_live_builder(tmp_path):
    """A live builder's baton is never removed: a second loader waits for its OS lock."""
    order = []
    inside = threading.Event()

    def second():
        inside.wait()
        with cpu_kernels._exclusive_build(tmp_path):
            order.append(("second", (tmp_path / "lock").exists()))

    thread = threading.Thread(target=second)
    thread.start()
    with cpu_kernels._exclusive_build(tmp_path):
        (tmp_path / "lock").touch()  # what PyTorch's FileBaton does while it builds
        inside.set()
        time.sleep(0.3)
        order.append(("first", True))
        (tmp_path / "lock").unlink()
    thread.join(timeout=30)
    assert order == [("first", True), ("second", False)]


@needs_kernel
def test_load_after_a_killed_loader_does_not_hang():
    """The real build folder with a stale baton in it: a new process still loads the kernel."""
    name = f"tdmpc_opt_cpu_{torch.backends.cpu.get_cpu_capability().lower()}"
    (cpu_kernels._build_directory(name) / "lock").touch()
    code = "from tdmpc_opt import cpu_kernels; print(cpu_kernels.available())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr


def _decode_ref(codes, scales, groups):
    """Float rows ``[M, N]`` from reference-mode codes and scales."""
    m = codes.shape[0] - 2 * groups
    ref = (codes[m:m + groups].float() + codes[m + groups:].float() / WIDE_PLANE) * scales[m:]
    d = codes[:m].float() * scales[:m]
    return (d.view(groups, m // groups, -1) + ref[:, None]).view(m, -1)


@needs_kernel
def test_reference_mode_codes_and_products():
    """Reference mode: rows coded as differences to their group's first row decode to the
    layer's output within half a step of the (fine) difference codes; the kernel reads such
    codes' products back; ``Dense.ref_product`` is the float product of the decoded codes."""
    g = torch.Generator().manual_seed(5)
    groups, rows, k, n = 3, 40, 64, 136
    center = torch.randn(groups, 1, k, generator=g)
    x = (center + 0.02 * torch.randn(groups, rows, k, generator=g)).view(-1, k)
    dense = Dense(torch.randn(n, k, generator=g), torch.randn(n, generator=g), "int8")
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g) * 0.1
    codes, scales = quantize_rows_ref(x, groups)
    m = groups * rows
    assert codes.shape == (m + 2 * groups, k) and scales.shape == (m + groups, 1)
    decoded_x = _decode_ref(codes, scales, groups)
    assert (decoded_x - x).abs().max() < 0.02 * 4 / 127          # steps of the differences
    weight = dense.weight[:, :n].float() * dense.scale[:n]
    torch.testing.assert_close(dense.ref_product(codes, scales, groups),
                               decoded_x @ weight + dense.bias[:n], rtol=1e-5, atol=1e-4)
    acc = dense.ref_int32_products(codes, scales)
    out, out_scales = cpu_kernels.ln_mish_int8(dense.bias[None], acc, dense.scale, scales, None,
                                               None, w, b, ref_groups=groups)
    h = F.mish(F.layer_norm(decoded_x @ weight + dense.bias[:n], (n,), w, b))
    got = _decode_ref(out, out_scales, groups)
    step = out_scales[:m].max()
    assert (got - h).abs().max() < step + 1e-4
    assert step < 0.1 * (h.abs().amax() / 127)                   # far finer than 8-bit codes
    want_codes, want_scales = quantize_rows_ref(h, groups)
    torch.testing.assert_close(got, _decode_ref(want_codes, want_scales, groups),
                               atol=float(step) + 1e-4, rtol=0)


@needs_kernel
@torch.no_grad()
def test_reference_codes_predict_closer_to_float32(tiny_cfg):
    """On rows that lie close together within each environment (as in a planning iteration),
    reference-mode codes give next latents, rewards and Q values closer to float32 than 8-bit
    per-row codes; they need the fused kernel."""
    model = _model(tiny_cfg)
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():  # the reward and Q output layers start at zero
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    exact = FastWorldModel(model)
    plain = FastWorldModel(model, "int8", True, wide=(), ref_codes=False)
    ref = FastWorldModel(model, "int8")  # the default with the kernel
    assert ref.fused_kernel and ref.ref_codes and ref.wide == set()
    task = torch.tensor([0, 1, 2])
    z = exact.to_internal(model.encode(torch.randn(3, tiny_cfg.obs_dim, generator=g), task))
    z = z[:, None].expand(3, 40, -1).contiguous()
    a = (torch.rand(3, 1, tiny_cfg.action_dim, generator=g) * 2 - 1
         + 0.05 * torch.randn(3, 40, tiny_cfg.action_dim, generator=g)).clamp(-1, 1)
    rows = exact.task_rows(task, 3)
    bias = torch.stack([exact.dyn1["task"][rows], exact.rew1["task"][rows]])

    def predictions(fm):
        nxt, rew = fm.dyn_rew(fm.first_layers(a, bias, z.reshape(120, -1)), 3)
        return nxt, fm.decode_outputs([rew], [fm.rew3]), fm.q_members(z, a, rows, [0, 1])

    want = predictions(exact)
    for got_plain, got_ref, w in zip(predictions(plain), predictions(ref), want, strict=True):
        assert (got_ref - w).abs().mean() < (got_plain - w).abs().mean()
    with pytest.raises(ValueError, match="fused"):
        FastWorldModel(model, "int8", False, ref_codes=True)


# ----------------------------------------------------------- int8 reference-mode outputs
def _ref_output_case(groups: int, rows: int, n: int, seed: int = 0):
    """Reference-mode codes of rows close together per group, an int8 output layer, its int32
    products of those codes, and ``Dense.ref_product``'s float outputs ``[M, n]``."""
    g = torch.Generator().manual_seed(seed)
    k = 48
    x = (torch.randn(groups, 1, k, generator=g)
         + 0.05 * torch.randn(groups, rows, k, generator=g)).view(-1, k)
    dense = Dense(torch.randn(n, k, generator=g), torch.randn(n, generator=g), "int8")
    codes, scales = quantize_rows_ref(x, groups)
    return dense, dense.ref_int32_products(codes, scales), scales, \
        dense.ref_product(codes, scales, groups)


def _ref_epilogue(epilogue: str, n: int) -> tuple[dict, object]:
    """The op's epilogue arguments for ``n`` outputs and the row kernel it must agree with,
    applied to ``Dense.ref_product``'s outputs."""
    kwargs = dict(centers=torch.linspace(-10, 10, n),
                  norm=(torch.rand(n) + 0.5, torch.randn(n)), groups_of=8)
    then = {"raw": lambda y: y,
            "two_hot": lambda y: cpu_kernels.two_hot_decode(y, kwargs["centers"]),
            "simnorm": lambda y: cpu_kernels.ln_simnorm_f32(y, torch.zeros(n), kwargs["norm"],
                                                            8)}[epilogue]
    return kwargs, then


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("groups,rows", [(1, 1), (1, 37), (3, 41), (16, 33)])
@pytest.mark.parametrize("epilogue,n", [("raw", 12), ("two_hot", 101), ("simnorm", 64)])
def test_int8_ref_outputs_equal_ref_product_then_the_row_kernels(threads, groups, rows,
                                                                  epilogue, n):
    """raw: ``Dense.ref_product``'s outputs; two_hot and simnorm: what
    :func:`cpu_kernels.two_hot_decode` and :func:`cpu_kernels.ln_simnorm_f32` make of them, to
    float32 rounding; every group's rows bitwise as when that group is given alone."""
    torch.set_num_threads(threads)
    dense, acc, scales, y = _ref_output_case(groups, rows, n, seed=groups * rows + n)
    kwargs, then = _ref_epilogue(epilogue, n)

    def outputs(acc, scales, groups):
        return cpu_kernels.int8_ref_outputs(acc, scales, groups, dense.scale, dense.bias, n,
                                            epilogue, **kwargs)

    got, want = outputs(acc, scales, groups), then(y)
    assert got.shape == want.shape
    if epilogue == "two_hot":  # symexp stretches float32 rounding of the mean
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-5)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    m, last = groups * rows, groups - 1                     # the last group alone
    alone = outputs(torch.cat([acc[last * rows:m], acc[m + last:m + last + 1],
                               acc[m + groups + last:m + groups + last + 1]]),
                    torch.cat([scales[last * rows:m], scales[m + last:m + last + 1]]), 1)
    assert torch.equal(alone, got[last * rows:m])


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("groups,rows", [(1, 1), (1, 512), (3, 41), (16, 33)])
@pytest.mark.parametrize("k", [128, 37, 7])
def test_ref_codes_are_quantize_rows_ref_bitwise(threads, groups, rows, k):
    """The op's codes and scales equal PyTorch's ops' bit for bit (rows of a wider tensor too,
    latents close together as in a plan, spread ones, and all-equal groups)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(groups * rows + k)
    m = groups * rows
    base = torch.rand(groups, 1, k + 5, generator=g)
    near = base + 0.01 * torch.randn(groups, rows, k + 5, generator=g)
    spread = 3 * torch.randn(groups, rows, k + 5, generator=g)
    same = base.expand(groups, rows, k + 5)
    for x in (near, spread, same):
        x = x.reshape(m, k + 5)[:, :k]                 # row stride k + 5
        codes, scales = cpu_kernels.ref_codes(x, groups)
        want_codes, want_scales = quantize_rows_ref(x.contiguous(), groups)
        assert torch.equal(codes, want_codes) and torch.equal(scales, want_scales)


@needs_kernel
@torch.no_grad()
def test_eager_int8_plans_code_latents_with_the_op_to_the_same_actions(tiny_cfg):
    """Eager int8 views code their latents with :func:`cpu_kernels.ref_codes`; their plans
    equal those with PyTorch's ops bit for bit (compiled views keep inductor's kernel)."""
    model = _model(tiny_cfg)
    for p in model.parameters():
        p.add_(0.1 * torch.randn_like(p))
    op, plain = FastWorldModel(model, "int8"), FastWorldModel(model, "int8")
    plain.latent_op = False
    assert op.latent_op and not FastWorldModel(model, "int8+compile").latent_op
    assert not FastWorldModel(model, "int8", ref_codes=False).latent_op
    args = _three_task_plan_args(model, tiny_cfg)
    for got, want in zip(plan(op, *args), plan(plain, *args), strict=True):
        assert torch.equal(got, want)


@needs_kernel
def test_ref_codes_refuse_bad_input():
    x = torch.randn(6, 8)
    for bad, groups in ((x.double(), 1), (x.t(), 1), (x, 4), (x, 0), (x[:0], 1), (x[0], 1)):
        with pytest.raises(RuntimeError, match="ref_codes"):
            cpu_kernels.ref_codes(bad, groups)


@needs_kernel
def test_int8_ref_outputs_refuse_bad_input():
    dense, acc, scales, _ = _ref_output_case(2, 5, 16)
    centers, norm = torch.linspace(-1, 1, 16), (torch.ones(16), torch.zeros(16))

    def call(acc=acc, scales=scales, groups=2, n=16, epilogue=1, centers=centers,
             norm_w=norm[0], groups_of=8):
        return torch.ops.tdmpc_opt_cpu.int8_ref_outputs_v1(
            acc, scales, groups, dense.scale, dense.bias, n, epilogue, centers, norm_w,
            norm[1], groups_of, 1e-5)

    assert call().shape == (10,)
    bad = [dict(acc=acc.float()), dict(acc=acc.t()), dict(groups=3), dict(groups=0),
           dict(n=17), dict(scales=scales[:5]), dict(epilogue=7), dict(centers=None),
           dict(epilogue=2, norm_w=None), dict(epilogue=2, groups_of=5)]
    for kwargs in bad:
        with pytest.raises(RuntimeError, match="int8_ref_outputs"):
            call(**kwargs)
    with pytest.raises(ValueError, match="epilogue"):
        cpu_kernels.int8_ref_outputs(acc, scales, 2, dense.scale, dense.bias, 16, "softmax")


@needs_kernel
@pytest.mark.parametrize("epilogue,n", [("raw", 12), ("two_hot", 101), ("simnorm", 64)])
def test_int8_ref_outputs_in_a_compiled_function(epilogue, n):
    """Compiled plans trace through the op (its registered shapes), with the eager values."""
    dense, acc, scales, _ = _ref_output_case(2, 9, n)
    kwargs, _ = _ref_epilogue(epilogue, n)

    def f(acc):
        return cpu_kernels.int8_ref_outputs(acc, scales, 2, dense.scale, dense.bias, n,
                                            epilogue, **kwargs)

    assert torch.equal(torch.compile(f, backend="aot_eager", fullgraph=True)(acc), f(acc))


@needs_kernel
@torch.no_grad()
def test_int8_views_read_their_outputs_with_the_kernel(tiny_cfg):
    """int8 views with reference-row codes, eager and compiled, read every output layer back
    with :func:`cpu_kernels.int8_ref_outputs`: next latents, rewards, policy samples and Q
    values as with PyTorch's ops (``ref_outputs=False``) to float32 rounding."""
    model = _model(tiny_cfg)
    g = torch.Generator().manual_seed(3)
    for p in model.parameters():  # the reward and Q output layers start at zero
        p.add_(0.1 * torch.randn(p.shape, generator=g))
    plain = FastWorldModel(model, "int8", ref_outputs=False)
    views = [FastWorldModel(model, "int8"), FastWorldModel(model, "int8+compile")]
    assert all(v.ref_outputs and v.ref_decode for v in views) and not plain.ref_outputs
    assert not FastWorldModel(model, "int8+compile", ref_codes=False).ref_outputs
    with pytest.raises(ValueError, match="needs ref_codes"):
        FastWorldModel(model, "int8", ref_codes=False, ref_outputs=True)
    regression = FastWorldModel(_model(dataclasses.replace(tiny_cfg, num_bins=1)), "int8")
    assert regression.ref_outputs and not regression.ref_decode  # one-value heads
    task = torch.tensor([0, 1, 2])
    z = plain.to_internal(model.encode(torch.randn(3, tiny_cfg.obs_dim, generator=g), task))
    z = z[:, None].expand(3, 40, -1).contiguous()
    a = (torch.rand(3, 1, tiny_cfg.action_dim, generator=g) * 2 - 1
         + 0.05 * torch.randn(3, 40, tiny_cfg.action_dim, generator=g)).clamp(-1, 1)
    rows, mask = plain.task_rows(task, 3), plain.mask(task)
    bias = torch.stack([plain.dyn1["task"][rows], plain.rew1["task"][rows]])
    eps = torch.randn(3, 40, tiny_cfg.action_dim, generator=g)

    def predictions(fm):
        nxt, rew = fm.dyn_rew(fm.first_layers(a, bias, z.reshape(120, -1)), 3)
        return (nxt, fm.decode_outputs([rew], [fm.rew3]), fm.policy(z, rows, eps, mask),
                fm.q_members(z, a, rows, [0, 1]))

    want = predictions(plain)
    for view in views:
        for got, expected in zip(predictions(view), want, strict=True):
            assert got.shape == expected.shape
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- float32 LayerNorm+Mish
@needs_kernel
@pytest.mark.parametrize("m,n", [(488, 384), (5, 20), (33, 101)])
def test_f32_layer_equals_pytorch_ops_and_is_row_wise(m, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(m, n + 3, generator=g)[:, :n] * 4  # rows contiguous, row stride n + 3
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    got = cpu_kernels.ln_mish_f32(x, w, b)
    want, _ = ln_mish(x.contiguous(), (w, b))
    torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    truth = F.mish(F.layer_norm(x.double(), (n,), w.double(), b.double()))
    torch.testing.assert_close(got.double(), truth, rtol=1e-5, atol=1e-5)
    for i in (0, m - 1):  # a row's result never depends on the other rows
        assert torch.equal(cpu_kernels.ln_mish_f32(x[i:i + 1], w, b)[0], got[i])
    with pytest.raises(RuntimeError, match="ln_mish_f32"):
        cpu_kernels.ln_mish_f32(x.double(), w, b)
    with pytest.raises(RuntimeError, match="ln_mish_f32"):
        cpu_kernels.ln_mish_f32(x[:, 1:], w, b)


@needs_kernel
@pytest.mark.parametrize("na", [5, 6, 21])  # 0-6 unrolled when compiled, 21 at run time
@pytest.mark.parametrize("parts", ["x+base", "x+base+a", "base+a", "a"])
def test_f32_layer_sums_its_parts(parts, na):
    """Bias per group of rows and action inputs added in the kernel's pass, as the PyTorch
    ops would add them first."""
    m, n, envs = 48, 40, 3
    g = torch.Generator().manual_seed(len(parts))
    x = torch.randn(m, 2 * n, generator=g)[:, n:] * 3  # columns of a wider product
    base = torch.randn(envs, n + 8, generator=g)  # [G, >=N], as padded biases are
    a, wa = torch.randn(m, na, generator=g), torch.randn(na, n + 8, generator=g)
    w, b = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    use = set(parts.split("+"))
    pre = torch.zeros(m, n)
    if "x" in use:
        pre += x
    if "base" in use:
        pre += base[:, :n].repeat_interleave(m // envs, 0)
    if "a" in use:
        pre += a @ wa[:, :n]
    got = cpu_kernels.ln_mish_f32(x if "x" in use else None, w, b,
                                  base=base if "base" in use else None,
                                  a=a if "a" in use else None, wa=wa if "a" in use else None)
    want, _ = ln_mish(pre, (w, b))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_f32_layer_refuses_bad_parts():
    x, w, b = torch.randn(6, 8), torch.ones(8), torch.zeros(8)
    bad = [dict(x=None), dict(base=torch.zeros(4, 8)),            # no x or a; 4 does not divide 6
           dict(base=torch.zeros(2, 7)), dict(a=torch.zeros(6, 2)),  # base too narrow; no wa
           dict(a=torch.zeros(5, 2), wa=torch.zeros(2, 8)),          # a's rows differ from x's
           dict(a=torch.zeros(6, 2), wa=torch.zeros(3, 8)),          # wa's rows differ from A
           dict(a=torch.zeros(6), wa=torch.zeros(1, 8))]             # a not 2-D
    for kw in bad:
        args = {"x": x, **kw}
        with pytest.raises(RuntimeError, match="ln_mish_f32"):
            cpu_kernels.ln_mish_f32(args.pop("x"), w, b, **args)


def _three_task_plan_args(model: WorldModel, cfg) -> tuple:
    """Arguments after the view for :func:`plan`: a small planner, three environments (one per
    task) at their first step, seeded noise."""
    task = torch.tensor([0, 1, 2])
    pcfg = PlannerConfig(num_samples=64, num_elites=8, num_pi_trajs=4, iterations=2)
    noise = draw_noise(pcfg, cfg.action_dim, cfg.num_q, 3,
                       [torch.Generator().manual_seed(i) for i in range(3)])
    z0 = model.encode(torch.randn(3, cfg.obs_dim), task)
    return (pcfg, z0, task, torch.zeros(3, pcfg.horizon, cfg.action_dim),
            torch.ones(3, dtype=torch.bool), True, noise, torch.full((3,), 0.99))


@needs_kernel
@torch.no_grad()
def test_fp32_view_with_and_without_the_kernel(tiny_cfg):
    """The float32 planner through the kernel predicts and plans what the PyTorch ops do."""
    model = _model(tiny_cfg)
    fused, plain = FastWorldModel(model, "fp32"), FastWorldModel(model, "fp32", False)
    assert fused.fused_ln and not plain.fused_ln and not fused.fused_kernel
    _assert_views_predict_alike(model, plain, fused, 1e-5)
    args = _three_task_plan_args(model, tiny_cfg)
    act, mean = plan(fused, *args)
    act_ref, mean_ref = plan(plain, *args)
    torch.testing.assert_close(act, act_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(mean, mean_ref, atol=1e-5, rtol=0)


# ------------------------------------------------------------- float32 whole networks
def _layer_by_layer(net: cpu_kernels.Network) -> torch.Tensor:
    """A :class:`cpu_kernels.Network` through separate products (at least 16 rows, as
    :class:`Dense` pads them) and :func:`cpu_kernels.ln_mish_f32` calls."""
    def mm(x, w, bias=None):
        m = x.shape[0]
        xp = F.pad(x, (0, 0, 0, max(0, 16 - m)))
        return (xp @ w if bias is None else torch.addmm(bias, xp, w))[:m]

    x = None if net.x is None else mm(net.x, net.w1)
    h1 = cpu_kernels.ln_mish_f32(x, *net.ln1, base=net.base, a=net.a, wa=net.wa)
    h2 = cpu_kernels.ln_mish_f32(mm(h1, net.w2), *net.ln2, base=net.b2[None])
    return mm(h2, net.w3, net.b3)


def _network(m: int, k: int, d: int, n3: int, seed: int, latent: bool = True,
             envs: int = 1) -> cpu_kernels.Network:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.3):
        return torch.randn(*shape, generator=g) * s

    return cpu_kernels.Network(r(m, k) if latent else None, r(k, d) if latent else None,
                               r(envs, d), r(m, 3), r(3, d), (1 + r(d), r(d)), r(d, d, s=0.1),
                               r(d), (1 + r(d), r(d)), r(d, n3, s=0.1), r(n3))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [7, 24, 488])
def test_whole_networks_equal_layer_by_layer(threads, m):
    """One or two networks in one call: bitwise the layer-by-layer values, whatever the
    threads, and a row's result the same when computed alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        envs = 1 if m == 7 else 4  # 7 rows: one environment; else a task bias per 1/4 of rows
        nets = [_network(m, 20, 48, 20, seed=m, envs=envs),
                _network(m, 20, 48, 13, seed=m + 1, latent=False, envs=envs)]
        both = cpu_kernels.mlps_f32(nets)
        for net, got in zip(nets, both, strict=True):
            assert got.shape == (m, net.w3.shape[1])
            assert torch.equal(got, _layer_by_layer(net))
            assert torch.equal(cpu_kernels.mlps_f32([net])[0], got)
        first = nets[0]._replace(x=nets[0].x[-1:], base=nets[0].base[-1:], a=nets[0].a[-1:])
        assert torch.equal(cpu_kernels.mlps_f32([first])[0][0], both[0][-1])
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_whole_networks_refuse_bad_input():
    net = _network(32, 20, 48, 10, seed=0)
    with pytest.raises(ValueError, match="at least one network"):
        cpu_kernels.mlps_f32([])
    bad = [net._replace(w1=None), net._replace(x=net.x.double()),
           net._replace(w2=net.w2[:, :40]), net._replace(b3=net.b3[:5]),
           net._replace(ln1=(net.ln1[0][:5], net.ln1[1])), net._replace(base=net.base[:, :8]),
           net._replace(x=None, w1=None, a=None)]
    for b in bad:
        with pytest.raises(RuntimeError, match="mlps_f32"):
            cpu_kernels.mlps_f32([net, b])


needs_packed = pytest.mark.skipif(not cpu_kernels.mlp_pair_available(),
                                  reason="packed float32 networks: built for AVX-512 and AVX2 "
                                         "CPUs only")


def _packed(net: cpu_kernels.Network) -> torch.Tensor:
    return cpu_kernels.network_params(net.w1, net.wa, net.ln1, net.w2, net.b2, net.ln2, net.w3,
                                      net.b3)


@needs_packed
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [1, 7, 25, 488])
@pytest.mark.parametrize("d", [48, 80])  # panels 48 wide; 64 + 16
def test_packed_networks_equal_blas_networks(threads, m, d):
    """Two networks on shared inputs (and one alone, and without latents) through the packed
    products: BLAS's whole-network values to float32 rounding (output widths 1-101, so every
    panel width), whatever the threads; a row's numbers the same computed alone."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        envs = 1 if m < 25 else (5 if m == 25 else 4)
        dyn = _network(m, 20, d, 101, seed=m + d, envs=envs)
        rew = _network(m, 20, d, 33, seed=m + d + 1, envs=envs)._replace(x=dyn.x, a=dyn.a)
        pi = _network(m, 20, d, 1, seed=m + d + 2, envs=envs)._replace(a=None, wa=None)
        for nets in ([dyn, rew], [pi], [dyn._replace(x=None), rew._replace(x=None)]):
            # the parameters hold the latent weights also where a call has no latents
            params = [_packed(n._replace(w1=n.w1 if n.w1 is not None else dyn.w1))
                      for n in nets]
            got = cpu_kernels.mlp_pair_f32(nets[0].x, nets[0].a,
                                           [(n.base, p, n.w3.shape[1])
                                            for n, p in zip(nets, params, strict=True)], d)
            want = cpu_kernels.mlps_f32([n if n.x is not None else n._replace(w1=None)
                                         for n in nets])
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and g.stride(1) == 1
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
            last = [(n.base[-1:], p, n.w3.shape[1]) for n, p in zip(nets, params, strict=True)]
            alone = cpu_kernels.mlp_pair_f32(
                None if nets[0].x is None else nets[0].x[-1:],
                None if nets[0].a is None else nets[0].a[-1:], last, d)
            for a_row, g in zip(alone, got, strict=True):
                assert torch.equal(a_row[0], g[-1])
    finally:
        torch.set_num_threads(before)


@needs_packed
@pytest.mark.parametrize("m", [1, 3, 61, 488])
def test_packed_networks_same_values_on_any_thread_count(m):
    """Two networks split the threads between them (each its own half; with three threads
    one and two), one network splits its rows: the values are bitwise those of one thread."""
    d = 80
    dyn = _network(m, 20, d, 101, seed=m)
    rew = _network(m, 20, d, 33, seed=m + 1)._replace(x=dyn.x, a=dyn.a)
    calls = {"pair": [(n.base, _packed(n), n.w3.shape[1]) for n in (dyn, rew)],
             "one": [(rew.base, _packed(rew), 33)]}
    before = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2, 3, 4):
            torch.set_num_threads(threads)
            results[threads] = {k: cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, nets, d)
                                for k, nets in calls.items()}
    finally:
        torch.set_num_threads(before)
    for threads in (2, 3, 4):
        for k in calls:
            for got, want in zip(results[threads][k], results[1][k], strict=True):
                assert torch.equal(got, want), (threads, k)


@needs_packed
@pytest.mark.parametrize("m", [1, 30, 488])
def test_packed_network_epilogues_equal_the_row_kernels(m):
    """The LayerNorm + SimNorm epilogue gives bitwise what :func:`cpu_kernels.ln_simnorm_f32`
    makes of the raw outputs, the two-hot one what :func:`cpu_kernels.two_hot_decode` does
    up to its final ``expm1`` (one value at a time here, so a row's value does not depend on
    its place in a block; vectorised there); a row computed alone gives the same values."""
    d, k, latent = 48, 101, 32
    dyn = _network(m, 20, d, latent, seed=m)
    rew = _network(m, 20, d, k, seed=m + 1)._replace(x=dyn.x, a=dyn.a)
    g = torch.Generator().manual_seed(m)
    centers = torch.linspace(-10, 10, k)
    norm = (1 + 0.1 * torch.randn(latent, generator=g), 0.1 * torch.randn(latent, generator=g))
    nets = [(n.base, _packed(n), n.w3.shape[1]) for n in (dyn, rew)]
    raw = cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, nets, d)
    z, r = cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, [(*nets[0], "simnorm"), (*nets[1], "two_hot")],
                                    d, centers=centers, norm=norm, groups_of=8)
    assert z.shape == (m, latent) and r.shape == (m,)
    assert torch.equal(z, cpu_kernels.ln_simnorm_f32(raw[0], torch.zeros(latent), norm, 8))
    torch.testing.assert_close(r, cpu_kernels.two_hot_decode(raw[1], centers), rtol=1e-6,
                               atol=1e-7)
    z1, r1 = cpu_kernels.mlp_pair_f32(dyn.x[-1:], dyn.a[-1:],
                                      [(dyn.base, nets[0][1], latent, "simnorm"),
                                       (rew.base, nets[1][1], k, "two_hot")],
                                      d, centers=centers, norm=norm, groups_of=8)
    assert torch.equal(z1[0], z[-1]) and torch.equal(r1[0], r[-1])
    with pytest.raises(RuntimeError, match="centers"):
        cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, [(*nets[1], "two_hot")], d)
    with pytest.raises(RuntimeError, match="group size"):
        cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, [(*nets[0], "simnorm")], d, norm=norm,
                                 groups_of=5)
    with pytest.raises(ValueError, match="epilogue"):
        cpu_kernels.mlp_pair_f32(dyn.x, dyn.a, [(*nets[0], "softmax")], d)


@needs_packed
def test_packed_networks_refuse_bad_input():
    net = _network(32, 20, 48, 10, seed=0)
    params = _packed(net)
    good = (net.base, params, 10)
    with pytest.raises(ValueError, match="one or two networks"):
        cpu_kernels.mlp_pair_f32(net.x, net.a, [good] * 3, 48)
    bad_calls = [
        (net.x, net.a, [(net.base, params[:-1], 10)], 48),          # params of another size
        (net.x, net.a, [(net.base, params, 17)], 48),               # another output width
        (net.x.double(), net.a, [good], 48),                        # float64 latents
        (net.x, net.a, [(net.base[:, :8], params, 10)], 48),        # base narrower than D
        (net.x, net.a[:5], [good], 48),                             # rows disagree
        (None, None, [good], 48),                                   # no input at all
    ]
    for x, a, nets, d in bad_calls:
        with pytest.raises(RuntimeError, match="mlp_pair_f32"):
            cpu_kernels.mlp_pair_f32(x, a, nets, d)


@needs_packed
def test_pack_panels_cuts_this_cpus_panel_width():
    """Weights are packed in the panels this CPU's products read (64 columns on AVX-512, 16 on
    AVX2): each panel [K, width] in turn, the output padded with zero columns to 16."""
    isa = torch.backends.cpu.get_cpu_capability()
    width = cpu_kernels.panel_width()
    assert width == {"AVX512": 64, "AVX2": 16}.get(isa, width) and width % 16 == 0
    k, n = 5, 70
    w = torch.arange(1, k * n + 1, dtype=torch.float32).view(k, n)
    for wide in (16, 64):
        packed = cpu_kernels.pack_panels(w, wide)
        assert packed.numel() == k * 80  # 70 columns padded to 80
        for col in range(80):
            start = col // wide * wide  # the panel's first column and its width
            pw = min(wide, 80 - start)
            for row in range(k):
                value = packed[k * start + row * pw + col - start].item()
                assert value == (w[row, col].item() if col < n else 0.0), (wide, row, col)
    assert torch.equal(cpu_kernels.pack_panels(w), cpu_kernels.pack_panels(w, width))
    for bad in (8, 24, -16):
        with pytest.raises(ValueError, match="multiple of 16"):
            cpu_kernels.pack_panels(w, bad)


@needs_kernel
@torch.no_grad()
def test_fp32_whole_networks_plan_as_layer_by_layer(tiny_cfg):
    """Eager float32 plans through whole networks (the default there; BLAS's or the packed
    products) give exactly the layer-by-layer plans; compiled plans take whole networks only
    packed, other precisions refuse them."""
    model = _model(tiny_cfg)
    whole, layers = FastWorldModel(model, "fp32"), FastWorldModel(model, "fp32",
                                                                  whole_networks=False)
    blas = FastWorldModel(model, "fp32", packed_networks=False)
    assert whole.whole_networks and not layers.whole_networks and layers.fused_ln
    assert whole.packed_networks == cpu_kernels.mlp_pair_available()
    assert blas.whole_networks and not blas.packed_networks
    compiled = FastWorldModel(model, "fp32+compile")
    assert compiled.whole_networks == compiled.packed_networks == cpu_kernels.mlp_pair_available()
    assert not FastWorldModel(model, "fp32+compile", packed_networks=False).whole_networks
    args = _three_task_plan_args(model, tiny_cfg)
    want = plan(layers, *args)
    for view in (whole, blas):
        for got, w in zip(plan(view, *args), want, strict=True):
            assert torch.equal(got, w)
    for spec in ("int8", "bf16"):
        with pytest.raises(ValueError, match="whole_networks"):
            FastWorldModel(model, spec, whole_networks=True)
        with pytest.raises(ValueError, match="packed_networks"):
            FastWorldModel(model, spec, packed_networks=True)
    with pytest.raises(ValueError, match="whole_networks"):
        FastWorldModel(model, "fp32+compile", whole_networks=True, packed_networks=False)
    with pytest.raises(ValueError, match="whole_networks"):
        FastWorldModel(model, "fp32", False, whole_networks=True)


# ------------------------------------------------------------------- two-hot decoding
def _two_hot_exact(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """TD-MPC2's decoding in float64: symexp of the softmax-weighted mean of the centres."""
    return tm.symexp((torch.softmax(x.double(), -1) * centers.double()).sum(-1))


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,k", [(1, 1), (3, 5), (9, 16), (40, 17), (488, 101)])
def test_two_hot_decode_equals_softmax_mean_and_is_row_wise(threads, m, k):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(k)
    padded = torch.randn(m, k + 3, generator=g) * 4          # a padded product's columns
    x, centers = padded[:, :k], torch.linspace(-10, 10, k)
    bias = torch.randn(k, generator=g)
    for b, logits in ((None, x), (bias, x + bias)):
        got = cpu_kernels.two_hot_decode(x, centers, b)
        exact = _two_hot_exact(logits, centers)
        # symlog space is where the mean is rounded; PyTorch's float32 path is off by ~2e-6
        err = (torch.sign(got) * torch.log1p(got.abs())).double() - \
            exact.sign() * exact.abs().log1p()
        assert err.abs().max() < 5e-6
        for i in (0, m // 2, m - 1):                            # a row alone, bitwise
            assert torch.equal(cpu_kernels.two_hot_decode(x[i:i + 1], centers, b), got[i:i + 1])


@needs_kernel
def test_two_hot_decode_row_values_do_not_depend_on_batch_or_threads():
    """Every row of a batch decodes bitwise as it does alone, on one thread or two (the
    threads' chunks end at different rows, where the last values once took a scalar path)."""
    g = torch.Generator().manual_seed(7)
    x, centers = torch.randn(301, 101, generator=g) * 6, torch.linspace(-10, 10, 101)
    alone = torch.cat([cpu_kernels.two_hot_decode(x[i:i + 1], centers) for i in range(301)])
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for m in (1, 17, 64, 130, 301):
                assert torch.equal(cpu_kernels.two_hot_decode(x[:m], centers), alone[:m])
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_two_hot_decode_nan_where_softmax_is_and_refuses_bad_input():
    x, centers = torch.randn(5, 101), torch.linspace(-10, 10, 101)
    x[1, 3], x[2, 100], x[3], x[4, 50] = float("nan"), float("inf"), float("-inf"), -float("inf")
    got = cpu_kernels.two_hot_decode(x, centers)
    want = _two_hot_exact(x, centers).float()
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[1:4].all()
    torch.testing.assert_close(got[[0, 4]], want[[0, 4]], rtol=5e-5, atol=0)
    bad = [(x[0], centers, None), (x.double(), centers, None), (x.t(), torch.zeros(5), None),
           (x, centers[:100], None), (x, centers.double(), None), (x[:, :0], centers[:0], None),
           (x, centers, torch.zeros(100)), (x, centers, torch.zeros(101).double())]
    for logits, c, b in bad:
        with pytest.raises(RuntimeError, match="two_hot_f32"):
            cpu_kernels.two_hot_decode(logits, c, b)


@needs_kernel
@torch.no_grad()
def test_compiled_fp32_view_decodes_with_the_kernel(tiny_cfg):
    """fp32+compile views decode through the kernel (their reward and Q products without the
    bias, which the kernel adds); eager fp32 and int8 keep PyTorch's decoding. The values
    agree to float32 rounding."""
    model = _model(tiny_cfg)
    fused = FastWorldModel(model, "fp32+compile", packed_networks=False)  # layer by layer
    eager = FastWorldModel(model, "fp32")
    assert fused.fused_outputs and not eager.fused_outputs
    assert not fused.fused_epilogues and not eager.fused_epilogues
    packed = cpu_kernels.mlp_pair_available()
    assert FastWorldModel(model, "fp32+compile").fused_epilogues == packed
    assert not FastWorldModel(model, "int8").fused_outputs
    assert not FastWorldModel(model, "fp32+compile", False).fused_outputs
    regression = FastWorldModel(_model(dataclasses.replace(tiny_cfg, num_bins=1)), "fp32+compile")
    assert regression.fused_outputs and not regression.fused_decode  # one-value heads
    h = (torch.randn(64, tiny_cfg.mlp_dim), None)

    def values(fm):
        heads, nets = [fm.rew3, fm.q3[1]], ("rew", "q")
        return fm.decode_outputs([fm._out(d, h, net) for d, net in zip(heads, nets, strict=True)],
                                 heads)

    got, want = values(fused), values(eager)
    assert got.shape == want.shape == (2, 64)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------- dynamics output layer
@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m,groups_of,width", [(1, 8, 128), (37, 8, 128), (5, 4, 20), (3, 2, 8)])
def test_ln_simnorm_equals_layer_norm_then_simnorm(threads, m, groups_of, width):
    """SimNorm groups in the internal layout: entries ``c, c + L/s, ...`` (a view ``[M, s,
    L/s]`` normalised over its middle dimension)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(m + width)
    padded = torch.randn(m, width + 8, generator=g) * 3
    x = padded[:, :width]                                     # a padded product's columns
    bias, w, b = (torch.randn(width, generator=g) for _ in range(3))
    got = cpu_kernels.ln_simnorm_f32(x, bias, (w, b), groups_of)
    y = F.layer_norm((x + bias).double(), (width,), w.double(), b.double())
    want = torch.softmax(y.view(m, groups_of, -1), 1).view(m, width)
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-7)
    for i in (0, m - 1):                                      # a row alone, bitwise
        assert torch.equal(cpu_kernels.ln_simnorm_f32(x[i:i + 1], bias, (w, b), groups_of),
                           got[i:i + 1])


@needs_kernel
def test_ln_simnorm_refuses_bad_input():
    x, v = torch.randn(4, 16), torch.randn(16)
    bad = [(x.t(), v, 8), (x.double(), v, 8), (x, v[:8], 8), (x, v, 5), (x, v, 0),
           (x[:, :8], v, 8)]
    for xx, vv, s in bad:
        with pytest.raises(RuntimeError, match="ln_simnorm_f32"):
            cpu_kernels.ln_simnorm_f32(xx, vv, (v, v), s)
