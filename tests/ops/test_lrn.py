"""Tests for ops.lrn: AlexNet local response normalisation with a hand-written backward."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import ops
from ops import LRN, LRNFunction, lrn, lrn_cpu, select_backend

REPO = Path(__file__).resolve().parents[2]

CPU_EXT = lrn_cpu.available()
CPU_BACKENDS = ["torch"] + (["cpu_ext"] if CPU_EXT else [])
needs_ext = pytest.mark.skipif(not CPU_EXT, reason=f"C++ LRN kernel unavailable: {lrn_cpu.last_error()}")
_no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
_no_fused = pytest.mark.skipif(not ops.FUSED_LRN_AVAILABLE, reason="Triton + CUDA not available")


def needs_cuda(fn):
    return pytest.mark.cuda(_no_cuda(fn))


def needs_fused(fn):
    return pytest.mark.cuda(_no_fused(fn))


def torch_ref(size, alpha=1e-4, beta=0.75, k=2.0):
    """torch's module divides alpha by size; ours does not."""
    return torch.nn.LocalResponseNorm(size, alpha * size, beta, k)


def fwd_bwd(fn, x, g):
    """(output, input gradient) of ``fn`` at ``x`` (strides kept) for upstream gradient ``g``."""
    x = leaf(x)
    y = fn(x)
    (gx,) = torch.autograd.grad(y, x, g)
    return y.detach(), gx


def leaf(t):
    """Make ``t`` a leaf requiring grad while keeping its strides."""
    return t.detach().requires_grad_(True)


def random_shape(gen, max_c=64):
    n = int(torch.randint(1, 4, (1,), generator=gen))
    c = int(torch.randint(1, max_c + 1, (1,), generator=gen))
    h = int(torch.randint(1, 10, (1,), generator=gen))
    w = int(torch.randint(1, 10, (1,), generator=gen))
    return (n, c, h, w)


# ----------------------------------------------------------------------------- literal formula
def naive_lrn_numpy(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """b[i] = a[i] / (k + alpha * sum_{j=max(0,i-n//2)}^{min(N-1,i+n//2)} a[j]^2)^beta (odd n)."""
    a = np.asarray(a, dtype=np.float64)
    out = np.empty_like(a)
    N, C, H, W = a.shape
    for b in range(N):
        for y in range(H):
            for x in range(W):
                for i in range(C):
                    acc = 0.0
                    for j in range(max(0, i - n // 2), min(C - 1, i + n // 2) + 1):
                        acc += a[b, j, y, x] ** 2
                    out[b, i, y, x] = a[b, i, y, x] / (k + alpha * acc) ** beta
    return out


def naive_lrn_grad_numpy(a, g, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """grad_i = g_i s_i^-b - 2 alpha beta a_i sum_{j: i in W(j)} g_j a_j s_j^(-b-1) (odd n)."""
    a = np.asarray(a, dtype=np.float64)
    g = np.asarray(g, dtype=np.float64)
    N, C, H, W = a.shape
    s = np.empty_like(a)
    for i in range(C):
        lo, hi = max(0, i - n // 2), min(C - 1, i + n // 2)
        s[:, i] = k + alpha * (a[:, lo : hi + 1] ** 2).sum(axis=1)
    out = np.empty_like(a)
    for i in range(C):
        acc = np.zeros_like(a[:, 0])
        for j in range(C):
            if max(0, j - n // 2) <= i <= min(C - 1, j + n // 2):  # i in W(j)
                acc += g[:, j] * a[:, j] * s[:, j] ** (-beta - 1)
        out[:, i] = g[:, i] * s[:, i] ** (-beta) - 2 * alpha * beta * a[:, i] * acc
    return out


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("n,alpha,beta,k", [(5, 1e-4, 0.75, 2.0), (3, 2e-3, 0.6, 1.0), (1, 1e-2, 1.0, 0.5)])
def test_paper_formula_literal(backend, n, alpha, beta, k):
    gen = torch.Generator().manual_seed(1234)
    # large activations so that alpha * sum(a^2) is comparable to k
    a = torch.randn(2, 7, 2, 3, generator=gen, dtype=torch.float64) * 40
    g = torch.randn(a.shape, generator=gen, dtype=torch.float64)
    expected = naive_lrn_numpy(a.numpy(), n, alpha, beta, k)
    expected_grad = naive_lrn_grad_numpy(a.numpy(), g.numpy(), n, alpha, beta, k)
    y, gx = fwd_bwd(lambda t: lrn(t, n, alpha, beta, k, backend=backend), a, g)
    np.testing.assert_allclose(y.numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx.numpy(), expected_grad, rtol=1e-10, atol=1e-12)
    if n > 1:
        # the test discriminates: dividing alpha by n (torch's convention) gives other values
        wrong = naive_lrn_numpy(a.numpy(), n, alpha / n, beta, k)
        assert np.abs(wrong - expected).max() > 1e-2


def test_paper_defaults_and_module_repr():
    m = LRN()
    assert (m.size, m.alpha, m.beta, m.k) == (5, 1e-4, 0.75, 2.0)
    assert repr(m) == "LRN(size=5, alpha=0.0001, beta=0.75, k=2.0)"
    assert "size=3" in repr(LRN(3, 1e-3, 0.5, 1.0))
    assert list(m.parameters()) == [] and m.state_dict() == {}
    x = torch.randn(2, 8, 3, 3, dtype=torch.float64) * 20
    torch.testing.assert_close(m(x), torch_ref(5)(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(LRN(3, 1e-3, 0.5, 1.0)(x), torch_ref(3, 1e-3, 0.5, 1.0)(x), rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        LRN(0)


# ----------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("channels", [1, 2, 3, 5, 7, 48])
def test_gradcheck_channels(backend, channels):
    gen = torch.Generator().manual_seed(channels)
    x = torch.randn(2, channels, 3, 2, generator=gen, dtype=torch.float64) * 30
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lrn(t, backend=backend), (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size,alpha,beta,k", [(1, 1e-3, 0.75, 2.0), (2, 1e-3, 0.75, 2.0), (3, 5e-3, 0.5, 1.0),
                                               (4, 1e-3, 1.0, 2.0), (7, 2e-3, 0.6, 0.7), (9, 1e-3, 0.75, 2.0)])
def test_gradcheck_hparams(backend, size, alpha, beta, k):
    gen = torch.Generator().manual_seed(size)
    x = (torch.randn(2, 6, 2, 3, generator=gen, dtype=torch.float64) * 20).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lrn(t, size, alpha, beta, k, backend=backend), (x,),
                                    eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_channels_last_and_strided(backend):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(2, 5, 3, 4, generator=gen, dtype=torch.float64) * 20
    cl = leaf(base.to(memory_format=torch.channels_last))
    assert torch.autograd.gradcheck(lambda t: lrn(t, backend=backend), (cl,), eps=1e-6, atol=1e-7)
    tr = leaf(base.transpose(2, 3))
    assert torch.autograd.gradcheck(lambda t: lrn(t, 3, backend=backend), (tr,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- vs torch
SEEDS = [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_torch_float64(backend, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = random_shape(gen)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 30
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, gx = fwd_bwd(lambda t: lrn(t, backend=backend), x, g)
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-6)
    # and the match is not trivial: the output differs from the input noticeably
    assert (y - x).abs().max() > 1e-3


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("seed", SEEDS[:4])
def test_matches_torch_float32(backend, seed):
    gen = torch.Generator().manual_seed(100 + seed)
    shape = random_shape(gen, max_c=128)
    x = torch.randn(shape, generator=gen) * 10
    g = torch.randn(shape, generator=gen)
    y, gx = fwd_bwd(lambda t: lrn(t, backend=backend), x, g)
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x.double(), g.double())
    assert y.dtype == gx.dtype == torch.float32
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("size,alpha,beta,k", [(3, 1e-4, 0.75, 2.0), (4, 1e-4, 0.75, 2.0), (7, 1e-4, 0.75, 2.0),
                                               (5, 1e-3, 0.5, 1.0), (5, 3e-4, 1.0, 2.0), (2, 1e-3, 0.6, 0.5),
                                               (6, 2e-4, 0.0, 1.0), (11, 1e-4, 0.9, 3.0)])
def test_hyperparameters_match_torch(backend, size, alpha, beta, k):
    gen = torch.Generator().manual_seed(size * 31 + int(beta * 10))
    shape = (3, 13, 4, 5)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 30
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, gx = fwd_bwd(lambda t: lrn(t, size, alpha, beta, k, backend=backend), x, g)
    y_ref, gx_ref = fwd_bwd(torch_ref(size, alpha, beta, k), x, g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_even_size_window_is_torch_window(backend):
    # size 4: 2 channels below, 1 above -- a one-hot input shows exactly which outputs it touches
    x = torch.zeros(1, 8, 1, 1, dtype=torch.float64)
    x[0, 4] = 100.0
    y = lrn(x + 1.0, 4, 1e-2, 1.0, 1.0, backend=backend)
    base = 1.0 / (1.0 + 1e-2 * 4)  # response of a channel whose window holds four ones
    touched = (y[0, :, 0, 0] - base).abs() > 1e-9
    # channel 4 is in the window of channels i with i-2 <= 4 <= i+1, i.e. i = 3, 4, 5, 6
    # (channels 0, 1, 7 have clipped windows and are also different from `base`)
    assert touched[3:7].all() and not touched[2]
    torch.testing.assert_close(y, torch_ref(4, 1e-2, 1.0, 1.0)(x + 1.0), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- memory formats
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channels_last(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 17, 5, 6)
    x = (torch.randn(shape, generator=gen, dtype=dtype) * 20).to(memory_format=torch.channels_last)
    g = torch.randn(shape, generator=gen, dtype=dtype).to(memory_format=torch.channels_last)
    xl = leaf(x)
    y = lrn(xl, backend=backend)
    (gx,) = torch.autograd.grad(y, xl, g)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert gx.is_contiguous(memory_format=torch.channels_last)
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x.double().contiguous(), g.double().contiguous())
    tol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=tol)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=1e-5, atol=tol)
    # upstream gradient in the other layout gives the same input gradient
    (gx2,) = torch.autograd.grad(lrn(xl, backend=backend), xl, g.contiguous())
    torch.testing.assert_close(gx2, gx, rtol=0, atol=0)
    # contiguous input with channels-last upstream gradient
    xc = leaf(x.contiguous())
    (gx3,) = torch.autograd.grad(lrn(xc, backend=backend), xc, g)
    assert gx3.is_contiguous()
    torch.testing.assert_close(gx3, gx.contiguous(), rtol=1e-12, atol=1e-12 if dtype == torch.float64 else 1e-6)


def _strided_views(base):
    return {
        "transpose_hw": base.transpose(2, 3),
        "channel_slice": base[:, ::2],
        "spatial_slice": base[:, :, 1:, :-1],
        "permuted_nhcw": base.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3),
        "expanded_batch": base[:1].expand(3, -1, -1, -1),
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("view", list(_strided_views(torch.zeros(2, 2, 2, 2))))
def test_non_contiguous_inputs(backend, view):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(3, 12, 6, 7, generator=gen, dtype=torch.float64) * 25
    x = _strided_views(base)[view]
    assert not x.is_contiguous()
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    g_strided = torch.randn(x.shape[0], x.shape[1], x.shape[3], x.shape[2], generator=gen,
                            dtype=torch.float64).transpose(2, 3)
    xl = leaf(x)
    y = lrn(xl, backend=backend)
    (gx,) = torch.autograd.grad(y, xl, g)
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x.contiguous(), g)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=0, atol=1e-6)
    assert gx.shape == x.shape
    (gx2,) = torch.autograd.grad(lrn(xl, backend=backend), xl, g_strided)
    _, gx2_ref = fwd_bwd(torch_ref(5), x.contiguous(), g_strided.contiguous())
    torch.testing.assert_close(gx2, gx2_ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 9, 11), (2, 6, 3, 2, 4), (4, 10)])
def test_other_ranks(backend, shape):
    gen = torch.Generator().manual_seed(len(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 25
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    y, gx = fwd_bwd(lambda t: lrn(t, backend=backend), x, g)
    # reference: the same data as an N x C x S x 1 tensor
    x4 = x.reshape(shape[0], shape[1], -1, 1)
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x4, g.reshape(x4.shape))
    torch.testing.assert_close(y, y_ref.reshape(shape), rtol=0, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref.reshape(shape), rtol=0, atol=1e-6)
    if len(shape) == 3:  # channels-last 3-D (N, L, C) storage viewed as N x C x L
        xt = x.transpose(1, 2).contiguous().transpose(1, 2)
        yt, gxt = fwd_bwd(lambda t: lrn(t, backend=backend), xt, g)
        assert yt.stride() == xt.stride()
        torch.testing.assert_close(yt, y, rtol=0, atol=1e-12)
        torch.testing.assert_close(gxt, gx, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- misc behaviour
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_is_fresh_and_inplace_ok(backend):
    x = leaf(torch.randn(2, 6, 3, 3, dtype=torch.float64).to(memory_format=torch.channels_last))
    y = lrn(x, backend=backend)
    assert y._base is None
    z = y.relu_()  # in-place op after the custom Function must be allowed
    z.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_no_grad_and_empty(backend):
    x = torch.randn(2, 7, 4, 4, dtype=torch.float64) * 20
    with torch.no_grad():
        y = lrn(x, backend=backend)
    torch.testing.assert_close(y, torch_ref(5)(x), rtol=0, atol=1e-12)
    e = leaf(torch.zeros(0, 5, 3, 3))
    ye = lrn(e, backend=backend)
    assert ye.shape == e.shape
    ye.sum().backward()
    assert e.grad.shape == e.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 10, 4, 4, generator=gen) * 10).to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    y, gx = fwd_bwd(lambda t: lrn(t, backend=backend), x, g)
    assert y.dtype == gx.dtype == dtype
    y_ref, gx_ref = fwd_bwd(torch_ref(5), x.double(), g.double())
    torch.testing.assert_close(y.double(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.double(), gx_ref, rtol=2e-2, atol=2e-2)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        lrn(torch.randn(5))
    with pytest.raises(ValueError):
        lrn(torch.randn(2, 3, 4), size=0)
    with pytest.raises(TypeError):
        lrn(torch.ones(2, 3, 4, dtype=torch.int64))
    with pytest.raises(ValueError):
        lrn(torch.randn(2, 3, 4), backend="nope")


def test_function_apply_and_backend_selection():
    x = leaf(torch.randn(2, 6, 3, 3, dtype=torch.float64) * 20)
    y = LRNFunction.apply(x, 5, 1e-4, 0.75, 2.0)
    torch.testing.assert_close(y, torch_ref(5)(x), rtol=0, atol=1e-12)
    assert select_backend(x) == ("cpu_ext" if CPU_EXT else "torch")
    assert select_backend(x, "torch") == "torch"
    assert isinstance(ops.FUSED_LRN_AVAILABLE, bool)
    if not torch.cuda.is_available():
        assert ops.FUSED_LRN_AVAILABLE is False
        with pytest.raises(RuntimeError):
            select_backend(x, "triton")


def test_not_twice_differentiable():
    x = leaf(torch.randn(1, 4, 2, 2, dtype=torch.float64))
    (gx,) = torch.autograd.grad(lrn(x).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


# ----------------------------------------------------------------------------- C++ kernel
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("size", [1, 2, 5, 6])
def test_cpu_ext_matches_torch_fallback(dtype, layout, size):
    gen = torch.Generator().manual_seed(size)
    # S = 600 spans several 1 KiB blocks of the NCHW kernel, with a ragged tail
    shape = (3, 37, 20, 30)
    x = torch.randn(shape, generator=gen, dtype=dtype) * 15
    g = torch.randn(shape, generator=gen, dtype=dtype)
    if layout == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    y1, gx1 = fwd_bwd(lambda t: lrn(t, size, 2e-4, 0.75, 2.0, backend="cpu_ext"), x, g)
    y2, gx2 = fwd_bwd(lambda t: lrn(t, size, 2e-4, 0.75, 2.0, backend="torch"), x, g)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y1, y2, **tol)
    torch.testing.assert_close(gx1, gx2, **tol)


@needs_ext
def test_cpu_ext_thread_count_invariant():
    x = torch.randn(4, 96, 23, 23) * 10
    g = torch.randn(x.shape)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, gx1 = fwd_bwd(lambda t: lrn(t, backend="cpu_ext"), x, g)
        torch.set_num_threads(max(2, old))
        y2, gx2 = fwd_bwd(lambda t: lrn(t, backend="cpu_ext"), x, g)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2) and torch.equal(gx1, gx2)


def _run_py(code, env_extra, timeout=240):
    env = dict(os.environ)
    env.update(env_extra)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cpu_ext_disabled_or_unbuildable_falls_back(tmp_path):
    code = """
        import warnings, torch, ops
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as w:
            x = torch.randn(2, 6, 3, 3, dtype=torch.float64) * 20
            y = ops.lrn(x)
        ref = torch.nn.LocalResponseNorm(5, 5e-4, 0.75, 2.0)(x)
        assert (y - ref).abs().max() < 1e-12
        print("BACKEND", ops.select_backend(x), "WARNINGS", len([m for m in w if "fallback" in str(m.message)]))
    """
    disabled = _run_py(code, {"ALEXNET_LRN_CPU_EXT": "0"})
    assert disabled.returncode == 0, disabled.stderr
    assert "BACKEND torch WARNINGS 0" in disabled.stdout
    broken = _run_py(code, {"CXX": "false", "ALEXNET_PP_CACHE_DIR": str(tmp_path),
                            "TMPDIR": str(tmp_path)})
    assert broken.returncode == 0, broken.stderr
    assert "BACKEND torch WARNINGS 1" in broken.stdout


# ----------------------------------------------------------------------------- Triton interpreter
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_interpreter():
    """Runs the fused GPU kernels' logic on CPU through TRITON_INTERPRET=1."""
    code = """
        import torch, ops
        from ops import lrn_triton
        assert lrn_triton.available(), lrn_triton.last_error()
        gen = torch.Generator().manual_seed(0)
        cases = [((2, 7, 3, 5), 5, 0.75), ((1, 1, 2, 3), 5, 0.75), ((2, 40, 3, 3), 4, 0.6),
                 ((2, 3, 9), 3, 0.5), ((1, 20, 17, 17), 5, 0.75)]
        for shape, size, beta in cases:
            for cl in (False, True):
                x = torch.randn(shape, generator=gen) * 10
                g = torch.randn(shape, generator=gen)
                if cl and x.dim() == 4:
                    x = x.to(memory_format=torch.channels_last)
                xl = x.detach().requires_grad_(True)
                y = ops.lrn(xl, size, 1e-4, beta, 2.0, backend="triton")
                (gx,) = torch.autograd.grad(y, xl, g)
                xr = x.double().requires_grad_(True)
                yr = torch.nn.LocalResponseNorm(size, 1e-4 * size, beta, 2.0)(xr)
                (gr,) = torch.autograd.grad(yr, xr, g.double())
                assert y.stride() == x.stride() or x.is_contiguous(), (y.stride(), x.stride())
                torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(gx.double(), gr, rtol=1e-5, atol=1e-5)
            xb = (torch.randn(shape, generator=gen) * 10).to(torch.bfloat16)
            yb = ops.lrn(xb, size, 1e-4, beta, 2.0, backend="triton")
            assert yb.dtype == torch.bfloat16
            torch.testing.assert_close(yb.double(), torch.nn.LocalResponseNorm(size, 1e-4 * size, beta, 2.0)(xb.double()),
                                       rtol=2e-2, atol=2e-2)
        print("OK")
    """
    res = _run_py(code, {"TRITON_INTERPRET": "1"}, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "OK" in res.stdout


# ----------------------------------------------------------------------------- CUDA
CUDA_CASES = [((2, 7, 3, 5), 5, 1e-4, 0.75, 2.0), ((1, 1, 4, 4), 5, 1e-4, 0.75, 2.0),
              ((2, 2, 5, 5), 3, 1e-3, 0.5, 1.0), ((4, 48, 13, 13), 4, 1e-4, 0.75, 2.0),
              ((3, 96, 27, 27), 5, 1e-4, 0.75, 2.0), ((2, 256, 13, 13), 7, 2e-4, 0.6, 1.5),
              ((2, 300, 5, 3), 5, 1e-4, 1.0, 2.0), ((2, 9, 33), 5, 1e-4, 0.75, 2.0)]


@needs_cuda
@pytest.mark.parametrize("case", CUDA_CASES, ids=lambda c: "x".join(map(str, c[0])) + f"-n{c[1]}")
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cuda_matches_cpu(case, layout):
    shape, size, alpha, beta, k = case
    gen = torch.Generator().manual_seed(hash(shape) % 1000)
    x = torch.randn(shape, generator=gen) * 10
    g = torch.randn(shape, generator=gen)
    y_cpu, gx_cpu = fwd_bwd(lambda t: lrn(t.double(), size, alpha, beta, k), x, g.double())
    xc, gc = x.cuda(), g.cuda()
    if layout == "channels_last" and x.dim() == 4:
        xc, gc = xc.to(memory_format=torch.channels_last), gc.to(memory_format=torch.channels_last)
    elif layout == "strided":
        xc = torch.stack([xc, xc], dim=-1)[..., 0]  # same values, every element 2 apart
        assert not xc.is_contiguous() and torch.equal(xc.cpu(), x)
    xl = leaf(xc)
    y = lrn(xl, size, alpha, beta, k)
    (gx,) = torch.autograd.grad(y, xl, gc)
    assert y.is_cuda and gx.is_cuda and y.dtype == torch.float32
    if layout == "channels_last" and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double().cpu(), y_cpu.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx.double().cpu(), gx_cpu.double(), rtol=1e-5, atol=1e-5)


@needs_fused
def test_cuda_uses_fused_kernel():
    x = torch.randn(2, 8, 4, 4, device="cuda")
    assert select_backend(x) == "triton"
    assert select_backend(x.double()) == "torch"


@needs_fused
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_low_precision(dtype):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 96, 15, 15, generator=gen) * 10
    g = torch.randn(x.shape, generator=gen)
    y_ref, gx_ref = fwd_bwd(lambda t: lrn(t.double()), x, g.double())
    y, gx = fwd_bwd(lambda t: lrn(t), x.cuda().to(dtype), g.cuda().to(dtype))
    assert y.dtype == gx.dtype == dtype
    torch.testing.assert_close(y.double().cpu(), y_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx.double().cpu(), gx_ref.double(), rtol=2e-2, atol=2e-2)


@needs_cuda
def test_cuda_float64_gradcheck():
    x = (torch.randn(2, 7, 3, 3, dtype=torch.float64, device="cuda") * 20).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: lrn(t), (x,), eps=1e-6, atol=1e-7)


@needs_cuda
def test_cuda_no_grad_and_inplace():
    x = torch.randn(2, 16, 5, 5, device="cuda") * 10
    with torch.no_grad():
        y = lrn(x)
    torch.testing.assert_close(y.cpu().double(), lrn(x.cpu().double()), rtol=1e-5, atol=1e-5)
    xl = leaf(x.to(memory_format=torch.channels_last))
    out = lrn(xl)
    assert out._base is None
    out.relu_().sum().backward()
    assert xl.grad is not None and torch.isfinite(xl.grad).all()


# ----------------------------------------------------------------------------- benchmark smoke
def test_benchmark_runs_and_writes_the_common_output(tmp_path, capsys):
    import csv
    import json

    from cluster.bench.cli import main_bench

    assert main_bench(["lrn", "--shape", "2x8x5x5", "--shape", "1x3x4x4", "--reps", "2", "--warmup", "1",
                       "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "speedup" in text and "2x8x5x5" in text
    data = json.loads((tmp_path / "lrn.json").read_text())
    assert data["command"].startswith("alexnet-pp bench lrn --shape 2x8x5x5")
    assert data["environment"]["versions"]["torch"] and data["environment"]["cores"] >= 1
    assert [r["shape"] for r in data["rows"]] == [[2, 8, 5, 5], [1, 3, 4, 4]]
    for r in data["rows"]:
        assert len(r["times_ms"]["torch"]) == len(r["times_ms"]["ours"]) == 2
        assert r["median_ms"]["ours"] > 0 and r["speedup"]["ours"] > 0
    rows = list(csv.DictReader(open(tmp_path / "lrn.csv")))
    assert len(rows) == 2 and float(rows[0]["speedup.ours"]) > 0
    assert "| 2x8x5x5 |" in (tmp_path / "lrn.md").read_text()
