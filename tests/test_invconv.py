"""Invertible 1x1 convolution ops: native kernels against the pure-PyTorch reference."""

import pytest
import torch
import torch.nn.functional as F

import fastflow
from fastflow.ops.invconv import (
    channel_affine,
    lu_weight,
    plain_weight,
    reference_channel_affine,
    reference_lu_weight,
)

needs_native = pytest.mark.skipif(
    not fastflow.native_available("cpu"), reason="fastflow._C was not built"
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (rtol, atol) of native against the reference, both accumulating in fp32/fp64
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1e-2, 1e-2)}


def lu_params(c, dtype=torch.float64, device="cpu", seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    P = torch.eye(c, dtype=torch.float64)[torch.randperm(c, generator=g)]
    L = torch.randn(c, c, generator=g, dtype=torch.float64) * scale
    U = torch.randn(c, c, generator=g, dtype=torch.float64) * scale
    log_s = torch.randn(c, generator=g, dtype=torch.float64) * 0.3
    sign_s = torch.where(torch.rand(c, generator=g) < 0.5, -1.0, 1.0).double()
    return [t.to(dtype=dtype, device=device) for t in (P, L, U, log_s, sign_s)]


def assert_close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------
# lu_weight


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [1, 3, 17])
def test_lu_weight_matches_reference(dtype, c):
    params = lu_params(c, dtype)
    W, W_inv, ld = lu_weight(*params)
    rW, rW_inv, rld = reference_lu_weight(*params)
    assert W.dtype == dtype and W_inv.dtype == dtype
    assert ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ld.shape == ()
    assert_close(W, rW, dtype)
    assert_close(W_inv, rW_inv, dtype)
    assert_close(ld, rld, dtype)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_lu_weight_is_the_lu_product_and_inverse(backend):
    fastflow.set_backend(backend)
    P, L, U, log_s, sign_s = lu_params(9)
    W, W_inv, ld = lu_weight(P, L, U, log_s, sign_s)
    eye = torch.eye(9, dtype=torch.float64)
    expected = P @ (torch.tril(L, -1) + eye) @ (torch.triu(U, 1) + torch.diag(sign_s * log_s.exp()))
    torch.testing.assert_close(W, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W @ W_inv, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(W_inv, torch.linalg.inv(W), rtol=1e-10, atol=1e-10)
    sign, logabsdet = torch.linalg.slogdet(W)
    torch.testing.assert_close(ld, logabsdet, rtol=1e-12, atol=1e-12)
    # entries outside the strict triangles are ignored
    W2, _, _ = lu_weight(
        P, L + torch.triu(torch.randn_like(L)), U + torch.tril(torch.randn_like(U)), log_s, sign_s
    )
    torch.testing.assert_close(W2, W, rtol=0, atol=0)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lu_weight_gradients_match_reference_autograd(dtype):
    c = 6
    P, L, U, log_s, sign_s = lu_params(c, dtype, seed=3)
    rw, rwi = torch.randn(c, c, dtype=dtype), torch.randn(c, c, dtype=dtype)

    def grads(fn):
        ps = [t.clone().requires_grad_() for t in (L, U, log_s)]
        W, W_inv, ld = fn(P, ps[0], ps[1], ps[2], sign_s)
        ((W * rw).sum() + (W_inv * rwi).sum() + 3.0 * ld).backward()
        return [p.grad for p in ps]

    got = grads(lu_weight)
    want = grads(reference_lu_weight)
    for g, w in zip(got, want):
        torch.testing.assert_close(
            g,
            w,
            rtol=1e-4 if dtype == torch.float32 else 1e-10,
            atol=1e-5 if dtype == torch.float32 else 1e-10,
        )
    # gradients outside the strict triangles are exactly zero
    assert torch.count_nonzero(torch.triu(got[0])) == 0
    assert torch.count_nonzero(torch.tril(got[1])) == 0
    assert torch.count_nonzero(torch.tril(got[0], -1)) > 0


@needs_native
def test_lu_weight_gradcheck():
    P, L, U, log_s, sign_s = lu_params(5, seed=1)
    ps = [t.clone().requires_grad_() for t in (L, U, log_s)]
    assert torch.autograd.gradcheck(lambda a, b, c: lu_weight(P, a, b, c, sign_s), ps)


@needs_native
def test_lu_weight_opcheck():
    P, L, U, log_s, sign_s = lu_params(4, torch.float32)
    L.requires_grad_()
    U.requires_grad_()
    log_s.requires_grad_()
    torch.library.opcheck(torch.ops.fastflow.lu_weight.default, (P, L, U, log_s, sign_s))


def test_lu_weight_bad_inputs():
    P, L, U, log_s, sign_s = lu_params(4)
    with pytest.raises(ValueError, match="L must be a square"):
        lu_weight(P, L[:3], U, log_s, sign_s)
    with pytest.raises(ValueError, match="U must have shape"):
        lu_weight(P, L, U[:, :3], log_s, sign_s)
    with pytest.raises(ValueError, match="log_s must have shape"):
        lu_weight(P, L, U, log_s[:3], sign_s)
    with pytest.raises(TypeError, match="sign_s has dtype"):
        lu_weight(P, L, U, log_s, sign_s.float())
    with pytest.raises(TypeError, match="P must be a torch.Tensor"):
        lu_weight(None, L, U, log_s, sign_s)
    with pytest.raises(ValueError, match="log_s has non-finite"):
        lu_weight(P, L, U, torch.tensor([0.0, float("nan"), 0.0, 0.0], dtype=torch.float64), sign_s)
    with pytest.raises(ValueError, match="singular or infinite"):
        lu_weight(P, L, U, torch.tensor([0.0, -800.0, 0.0, 0.0], dtype=torch.float64), sign_s)
    with pytest.raises(ValueError, match="U has non-finite"):
        lu_weight(P, L, torch.full_like(U, float("inf")), log_s, sign_s)
    with pytest.raises(ValueError, match="permutation matrix"):
        lu_weight(P * 2, L, U, log_s, sign_s)
    with pytest.raises(ValueError, match="sign_s must contain"):
        lu_weight(P, L, U, log_s, sign_s * 0)


# ----------------------------------------------------------------------------------------------
# channel_affine

SHAPES = [(7, 5), (3, 17, 4, 5), (1, 1, 1, 1), (2, 3, 7), (2, 19, 9, 9), (2, 40, 8, 8)]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_channel_affine_matches_reference(dtype, shape, bias):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x = torch.randn(shape, generator=g).to(dtype)
    W = torch.randn(c, c, generator=g).to(dtype)
    b = torch.randn(c, generator=g).to(dtype) if bias else None
    y = channel_affine(x, W, b)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, reference_channel_affine(x, W, b), dtype)
    if len(shape) == 4 and dtype == torch.float64:  # an independent formula: the 1x1 conv
        torch.testing.assert_close(y, F.conv2d(x, W[:, :, None, None], b), rtol=1e-12, atol=1e-12)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (3, 17, 4, 5), (2, 40, 8, 8)])
def test_channel_affine_backward_matches_reference(dtype, shape):
    g = torch.Generator().manual_seed(2)
    c = shape[1]
    x0 = torch.randn(shape, generator=g).to(dtype)
    W0 = torch.randn(c, c, generator=g).to(dtype)
    b0 = torch.randn(c, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)

    def grads(fn):
        x, W, b = (t.clone().requires_grad_() for t in (x0, W0, b0))
        fn(x, W, b).backward(gy)
        return x.grad, W.grad, b.grad

    for got, want in zip(grads(channel_affine), grads(reference_channel_affine)):
        assert got.dtype == dtype
        # parameter gradients sum over N * H * W terms: compare relative to their scale
        rtol, atol = TOL[dtype]
        scale = want.double().abs().max().item()
        torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol * scale)


@needs_native
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 5), (3, 2, 7)])
@pytest.mark.parametrize("bias", [True, False])
def test_channel_affine_gradcheck(shape, bias):
    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    W = torch.randn(c, c, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    args = (x, W, b) if bias else (x, W)
    assert torch.autograd.gradcheck(channel_affine, args)


@needs_native
def test_channel_affine_only_some_inputs_need_grad():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    W = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)
    channel_affine(x, W, b).square().sum().backward()
    W2 = W.detach().clone().requires_grad_()
    reference_channel_affine(x, W2, b).square().sum().backward()
    torch.testing.assert_close(W.grad, W2.grad)


@needs_native
@pytest.mark.parametrize("bias", [True, False])
def test_channel_affine_opcheck(bias):
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    W = torch.randn(3, 3, requires_grad=True)
    b = torch.randn(3, requires_grad=True) if bias else None
    torch.library.opcheck(torch.ops.fastflow.channel_affine.default, (x, W, b))
    torch.library.opcheck(
        torch.ops.fastflow.channel_affine.default, (x[:, :, 0, 0].contiguous(), W, b)
    )
    gy = torch.randn(2, 3, 4, 5)
    torch.library.opcheck(torch.ops.fastflow.channel_affine_grad_params.default, (x.detach(), gy))


@needs_native
def test_channel_affine_isa_variants(cpu_isa):
    # The kernels pick the widest instruction set at run time; the cpu_isa fixture (conftest.py)
    # caps it with FASTFLOW_CPU_ISA so every variant the CPU has is tested on this machine.
    from fastflow import _backend as B

    isa = cpu_isa
    assert B._C.invconv_cpu_isa() == isa
    g = torch.Generator().manual_seed(0)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}
    for shape in [(3, 5), (2, 19, 9, 9), (2, 40, 8, 8), (1, 8, 16, 16)]:
        for dt, t in tol.items():
            c = shape[1]
            x = torch.randn(shape, generator=g).to(dt).requires_grad_()
            W = torch.randn(c, c, generator=g).to(dt).requires_grad_()
            b = torch.randn(c, generator=g).to(dt).requires_grad_()
            gy = torch.randn(shape, generator=g).to(dt)
            out = []
            for fn in (channel_affine, reference_channel_affine):
                y = fn(x, W, b)
                gs = torch.autograd.grad(y, (x, W, b), gy)
                out.append([y.double(), *(v.double() for v in gs)])
            for a, r in zip(*out):
                torch.testing.assert_close(a, r, rtol=t, atol=t * max(1.0, r.abs().max().item()))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_channel_affine_weight_gradient_over_sample_blocks(cpu_isa, set_threads, threads):
    """The W and b gradients sum over samples in blocks (csrc/invconv_cpu.cpp, grad_params_vec;
    per thread a contiguous range of samples): several blocks per thread, pixel counts that are
    not a multiple of the vector width, channel counts off the register tile, and Glow's small
    deep levels (C=48 on 4x4), against an fp64 einsum."""
    from fastflow.ops.invconv import _channel_affine_grad_params_impl as grad_params

    set_threads(threads)
    g = torch.Generator().manual_seed(5)
    for shape in [(400, 5, 6, 7), (64, 48, 4, 4), (3, 13, 5, 5), (9, 16, 1, 3)]:
        for dt, tol in ((torch.float32, 1e-5), (torch.float64, 1e-12)):
            x = torch.randn(shape, generator=g).to(dt)
            gy = torch.randn(shape, generator=g).to(dt)
            gw, gb = grad_params(x, gy)
            xd, gd = x.double().flatten(2), gy.double().flatten(2)
            want_w = torch.einsum("ncp,ndp->cd", gd, xd)
            want_b = gd.sum((0, 2))
            assert gw.dtype == dt and gb.dtype == dt
            for got, want in ((gw, want_w), (gb, want_b)):
                scale = want.abs().max().item()
                torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * scale)


def test_channel_affine_empty_batch():
    x = torch.randn(0, 3, 4, 4)
    assert channel_affine(x, torch.randn(3, 3)).shape == (0, 3, 4, 4)


def test_channel_affine_reference_backend_agrees():
    x, W, b = torch.randn(3, 4, 5, 5), torch.randn(4, 4), torch.randn(4)
    y = channel_affine(x, W, b)
    fastflow.set_backend("reference")
    torch.testing.assert_close(channel_affine(x, W, b), y, rtol=1e-5, atol=1e-5)


def test_channel_affine_bad_inputs():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="x has 3 channels"):
        channel_affine(x, torch.randn(4, 4))
    with pytest.raises(ValueError, match="W must be a square"):
        channel_affine(x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="W must be a square"):
        channel_affine(x, torch.randn(3))
    with pytest.raises(ValueError, match="x must have at least 2 dims"):
        channel_affine(torch.randn(3), torch.randn(3, 3))
    with pytest.raises(TypeError, match="W has dtype"):
        channel_affine(x, torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="b must have shape"):
        channel_affine(x, torch.randn(3, 3), torch.randn(4))
    with pytest.raises(TypeError, match="x must be float32"):
        channel_affine(x.long(), torch.randn(3, 3))
    with pytest.raises(TypeError, match="W must be a torch.Tensor"):
        channel_affine(x, [[1.0]])


# ----------------------------------------------------------------------------------------------
# plain (non-LU) weight


def test_plain_weight_slogdet_and_inverse():
    W = torch.randn(6, 6, dtype=torch.float64)
    W_, W_inv, ld = plain_weight(W)
    assert W_ is W
    torch.testing.assert_close(W_inv, torch.linalg.inv(W))
    torch.testing.assert_close(ld, torch.linalg.slogdet(W)[1])
    assert plain_weight(W, inverse=False)[1] is None
    # differentiable: d log|det W| / dW = W^-T
    Wg = W.clone().requires_grad_()
    plain_weight(Wg)[2].backward()
    torch.testing.assert_close(Wg.grad, torch.linalg.inv(W).T)


def test_plain_weight_bad_inputs():
    with pytest.raises(ValueError, match="singular"):
        plain_weight(torch.ones(3, 3))
    with pytest.raises(ValueError, match="non-finite"):
        plain_weight(torch.full((3, 3), float("nan")))
    with pytest.raises(ValueError, match="square"):
        plain_weight(torch.randn(3, 2))


# ----------------------------------------------------------------------------------------------
# CUDA: native kernels on the GPU against the reference, on a side stream.


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_lu_weight(dtype):
    params = lu_params(17, dtype, device="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        W, W_inv, ld = lu_weight(*params)
    s.synchronize()
    rW, rW_inv, rld = reference_lu_weight(*[t.cpu() for t in params])
    assert_close(W.cpu(), rW, dtype)
    assert_close(W_inv.cpu(), rW_inv, dtype)
    assert_close(ld.cpu(), rld, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_channel_affine_forward_backward(dtype, shape):
    g = torch.Generator().manual_seed(5)
    c = shape[1]
    x0 = torch.randn(shape, generator=g).to(dtype)
    W0 = torch.randn(c, c, generator=g).to(dtype)
    b0 = torch.randn(c, generator=g).to(dtype)
    gy = torch.randn(shape, generator=g).to(dtype)

    def run(fn, device):
        x, W, b = (t.to(device).requires_grad_() for t in (x0, W0, b0))
        y = fn(x, W, b)
        y.backward(gy.to(device))
        return [t.detach().cpu().double() for t in (y, x.grad, W.grad, b.grad)]

    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = run(channel_affine, "cuda")
    want = run(reference_channel_affine, "cpu")
    rtol, atol = TOL[dtype]
    for a, w in zip(got, want):
        torch.testing.assert_close(a, w, rtol=rtol, atol=atol * max(1.0, w.abs().max().item()))


@needs_native
def test_lu_weight_op_with_a_general_p_matrix():
    # The public function insists on a permutation; the kernel itself applies any P as a matrix
    # (W = P L U~, W_inv = U~^-1 L^-1 P^T), with a gather fast path for permutation rows.
    P, L, U, log_s, sign_s = lu_params(7, seed=4)
    P = P.clone()
    P[2] = torch.randn(7, dtype=torch.float64)
    W, W_inv, ld = torch.ops.fastflow.lu_weight(P, L, U, log_s, sign_s)
    rW, rW_inv, rld = reference_lu_weight(P, L, U, log_s, sign_s)
    torch.testing.assert_close(W, rW, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(W_inv, rW_inv, rtol=1e-12, atol=1e-12)
