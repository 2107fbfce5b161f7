"""Regression tests for the correctness and safety review (issue 11, items 1-9 and 14).

Each test failed on the code before the fix; the item number is in the test's name.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import fastflow
from fastflow import _backend as B
from fastflow.models import IAF, MAF
from fastflow.nn.autoregressive import MaskedAffineAutoregressive
from fastflow.ops import invconv as I
from fastflow.ops import made as M

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def native():
    fastflow.set_backend("native")
    yield


def _packed(d=4, hidden=(6, 5), context=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [d, *hidden]
    ws = [torch.randn(h, i, generator=g) * 0.5 for i, h in zip(sizes, [*hidden, 2 * d])]
    bs = [torch.randn(w.shape[0], generator=g) * 0.1 for w in ws]
    hd = [torch.arange(h) % max(d - 1, 1) + (1 if d > 1 else 0) for h in hidden]
    cw = torch.randn(hidden[0], context, generator=g) if context else None
    return M.pack_made(ws, bs, torch.arange(1, d + 1), hd, cw)


# -- 1. autocast + a conditional MADE ------------------------------------------------------------


def test_item1_conditional_made_inverse_under_autocast(native):
    torch.manual_seed(0)
    t = MaskedAffineAutoregressive(6, (32, 32), context=3)
    u, c = torch.randn(17, 6), torch.randn(17, 3)
    with torch.no_grad():
        x_ref, ld_ref = t.inverse(u, c)
        with torch.autocast("cpu", torch.bfloat16):
            x, ld = t.inverse(u, c)
    # the walk computes in fp32 whatever autocast says: same result as without it
    torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-5)


def test_item1_conditional_iaf_log_prob_under_autocast(native):
    torch.manual_seed(0)
    flow = IAF(5, context=3)
    x, c = torch.randn(9, 5), torch.randn(9, 3)
    with torch.no_grad():
        ref = flow.log_prob(x, c)
        with torch.autocast("cpu", torch.bfloat16):
            lp = flow.log_prob(x, c)
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, ref, rtol=1e-4, atol=1e-4)


def test_item1_fp64_with_context(native):
    torch.manual_seed(0)
    flow = MAF(4, layers=2, hidden=(16,), context=2).double()
    c = torch.randn(7, 2, dtype=torch.float64)
    x = flow.sample(7, c)
    assert x.dtype == torch.float64
    p = _packed(context=3)
    p64 = M.PackedMADE(
        p.order,
        [w.double() for w in p.weights],
        [b.double() for b in p.biases],
        p.context_weight,  # fp32 context weight with fp64 data: cast, not an error
        p.bounds,
        p.bounds_list,
    )
    u, ctx = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    x, ld = M.made_affine_inverse(u, p64, ctx)
    x0, ld0 = M.reference_made_affine_inverse(u, p64, ctx)
    torch.testing.assert_close(x, x0)
    torch.testing.assert_close(ld, ld0)


def test_item1_pointer_check_rejects_a_wrong_dtype_buffer(native):
    # the one place pointers are taken checks the dtype the kernel reads the buffer as
    p = _packed(context=3)
    us = torch.randn(4, 4)
    init = torch.randn(4, 6, dtype=torch.bfloat16)  # what autocast produced before the fix
    with pytest.raises(ValueError, match="init"):
        torch.ops.fastflow.made_affine_inverse(
            us, init, p.weights, p.biases, p.bounds, p.bounds_list, 0, 0, 3.0
        )


# -- 2. CUDA device guard -----------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_item2_kernels_run_on_the_tensors_device(native):
    torch.cuda.set_device(0)
    dev = torch.device("cuda:1")
    torch.manual_seed(0)
    flow = MAF(4, layers=2, hidden=(16,)).to(dev)
    x = flow.sample(33)
    assert x.device == dev and torch.isfinite(flow.log_prob(x)).all()
    from fastflow.ops.coupling import affine_coupling

    a, r, s = (torch.randn(5, 8, device=dev) for _ in range(3))
    y, ld = affine_coupling(a, r, s)
    ref = a * torch.exp(3 * torch.tanh(r / 3)) + s
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_item2_cuda_guard_is_a_no_op_on_cpu():
    with B.cuda_guard(torch.zeros(1)):
        pass


# -- 3. PackedMADE is validated -----------------------------------------------------------------


def _broken_packs():
    p = _packed(context=3)
    w, b = list(p.weights), list(p.biases)
    yield "short context_weight", p._replace(context_weight=p.context_weight[:3])
    yield "narrow first weight", p._replace(weights=[w[0][:, :2], *w[1:]])
    yield "short bias", p._replace(biases=[b[0][:2], *b[1:]])
    yield "output rows < 2D", p._replace(weights=[*w[:-1], w[-1][:5]], biases=[*b[:-1], b[-1][:5]])
    yield "bounds list", p._replace(bounds_list=[0] * len(p.bounds_list))
    yield "bounds list length", p._replace(bounds_list=p.bounds_list[:-1])
    yield "bounds tensor", p._replace(bounds=p.bounds[:1])
    yield "weights dtype", p._replace(weights=[w[0].double(), *w[1:]])
    yield "missing layer", p._replace(weights=w[:1], biases=b[:1])
    yield "order not a permutation", p._replace(order=torch.tensor([0, 0, 1, 2]))
    yield "order out of range", p._replace(order=torch.tensor([0, 1, 2, 9]))
    yield "order dtype", p._replace(order=p.order.float())


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_item3_hand_built_packed_made_is_checked(backend):
    fastflow.set_backend(backend)
    u, c = torch.randn(5, 4), torch.randn(5, 3)
    for what, bad in _broken_packs():
        with pytest.raises((ValueError, TypeError)):
            M.made_affine_inverse(u, bad, c)
            pytest.fail(what)
    with pytest.raises(TypeError, match="PackedMADE"):
        M.made_affine_inverse(u, tuple(_packed(context=3)), c)


def test_item3_device_bounds_come_from_the_validated_list():
    p = _packed()
    t = M._device_bounds(p.bounds_list, torch.device("cpu"))
    assert t.tolist() == p.bounds_list and t.dtype == torch.long


# -- 4. lu_weight backward in 16 bits -----------------------------------------------------------


def _lu_params(c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=torch.float64))[0]
    P, L, U = torch.linalg.lu(W)
    s = torch.diagonal(U)
    args = (P, L, U, s.abs().log(), s.sign())
    return [a.to(dtype) for a in args]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_item4_lu_weight_backward_16bit_finite_when_w_inv_unused(native, dtype):
    # an ill-conditioned W whose inverse overflows fp16 (max 65504)
    P, L, U, log_s, sign_s = _lu_params(8, torch.float32)
    log_s = log_s.clone()
    log_s[0] = -12.0
    args = [t.to(dtype) for t in (P, L, U, log_s, sign_s)]
    for t in args[1:4]:
        t.requires_grad_(True)
    W, W_inv, ld = I.lu_weight(*args)
    (W.float().sum() + ld).backward()
    for t in args[1:4]:
        assert torch.isfinite(t.grad).all()


def test_item4_lu_weight_16bit_gradients_as_accurate_as_the_reference(native):
    c = 48
    g = torch.Generator().manual_seed(3)
    P, L, U = torch.linalg.lu(torch.randn(c, c, generator=g, dtype=torch.float64))
    s = torch.diagonal(U)
    base = [P, L, U, s.abs().log(), s.sign()]
    gw = torch.randn(c, c, dtype=torch.float64)
    gwi = torch.randn(c, c, dtype=torch.float64)

    def grads(fn, dtype):
        args = [t.detach().to(dtype) for t in base]
        for t in args[1:4]:
            t.requires_grad_(True)
        W, W_inv, ld = fn(*args)
        ((W.double() * gw).sum() + (W_inv.double() * gwi).sum() + ld.double()).backward()
        return [t.grad.double() for t in args[1:4]]

    exact = grads(I.reference_lu_weight, torch.float64)
    native_bf = grads(I.lu_weight, torch.bfloat16)
    ref_bf = grads(I.reference_lu_weight, torch.bfloat16)
    for e, n, r in zip(exact, native_bf, ref_bf):
        m = e.abs() > 1e-3 * e.abs().max()
        err_n = ((n - e).abs() / e.abs())[m].median()
        err_r = ((r - e).abs() / e.abs())[m].median()
        # before the fix (backward from the saved bf16 W^-1): 3x the reference's error here
        assert err_n <= 1.25 * err_r, (float(err_n), float(err_r))


# -- 5. NaN propagates through the native walk --------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "elu", "tanh"])
def test_item5_native_walk_propagates_nan(native, activation):
    p = _packed(d=5, hidden=(12, 9))
    u = torch.randn(6, 5)
    u[2, 0] = float("nan")
    u[4, 3] = float("inf")
    x, ld = M.made_affine_inverse(u, p, activation=activation)
    x_t, ld_t = M.torch_degree_walk(u, p, activation=activation)
    assert torch.isnan(ld[2]) and torch.isnan(x[2, 0])
    torch.testing.assert_close(x, x_t, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, ld_t, equal_nan=True, rtol=1e-5, atol=1e-5)
    # finite rows stay finite
    assert torch.isfinite(x[[0, 1, 3, 5]]).all()


# -- 6. CUDA limits -----------------------------------------------------------------------------


@pytest.mark.cuda
def test_item6_deep_or_wide_made_on_cuda_falls_back(native):
    torch.manual_seed(0)
    t = MaskedAffineAutoregressive(4, (8,) * 10).cuda()  # more hidden layers than the kernel holds
    u = torch.randn(9, 4, device="cuda")
    x, ld = t.inverse(u)
    z, ld2 = t.forward(x)
    torch.testing.assert_close(z, u, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld, -ld2, rtol=1e-4, atol=1e-4)
    assert not fastflow._C.made_cuda_supported(dtype=0, d=4, hidden=[8] * 10)
    assert not fastflow._C.made_cuda_supported(dtype=0, d=4, hidden=[200_000])
    assert fastflow._C.made_cuda_supported(dtype=0, d=4, hidden=[64, 64])


def test_item6_cuda_limits_are_exported():
    if not fastflow._C.build_info()["cuda"]:
        pytest.skip("built without CUDA")
    assert fastflow._C.made_cuda_max_layers == 8
    assert callable(fastflow._C.made_cuda_supported)


# -- 7. direct op calls are checked inside the op -----------------------------------------------


def test_item7_direct_op_calls_are_checked():
    ops = torch.ops.fastflow
    x = torch.randn(4, 6)
    with pytest.raises(ValueError, match="raw"):
        ops.affine_coupling_fwd(x, torch.randn(4, 5), torch.randn(4, 6), None, 0, 3.0)
    with pytest.raises(ValueError, match="shift"):
        ops.affine_coupling_inv(x, torch.randn(4, 6), torch.randn(4, 6).double(), None, 0, 3.0)
    with pytest.raises(ValueError, match="mask"):
        ops.additive_coupling(x, torch.randn(4, 6), torch.ones(3, dtype=torch.uint8), False)
    with pytest.raises(ValueError, match="grad_logdet"):
        ops.affine_coupling_bwd(x, x, None, x, torch.zeros(3), 0, 3.0)
    with pytest.raises(ValueError, match="each sample"):
        ops.affine_coupling_fwd(x, torch.randn(6, 4).t(), x, None, 0, 3.0)
    with pytest.raises(ValueError, match="W"):
        ops.channel_affine(torch.randn(2, 3, 4), torch.randn(2, 2), None)
    with pytest.raises(ValueError, match="b"):
        ops.channel_affine(torch.randn(2, 3, 4), torch.randn(3, 3), torch.randn(2))
    with pytest.raises(ValueError, match="x"):
        ops.channel_affine(torch.randn(2, 3, 4).transpose(1, 2), torch.randn(4, 4), None)
    P, L, U, log_s, sign_s = _lu_params(4, torch.float32)
    with pytest.raises(ValueError, match="log_s"):
        ops.lu_weight(P, L, U, log_s[:3], sign_s)
    p = _packed()
    with pytest.raises(ValueError, match="weights"):
        ops.made_affine_inverse(
            torch.randn(3, 4), None, [p.weights[0][:, :3], *p.weights[1:]], p.biases, p.bounds,
            p.bounds_list, 0, 0, 3.0,
        )  # fmt: skip


# -- 8. clear errors ----------------------------------------------------------------------------


def test_item8_made_affine_forward_errors():
    p = _packed(d=3, hidden=(8,))
    w, b = list(p.weights), list(p.biases)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="weights\\[0\\]"):
        M.made_affine_forward(torch.randn(5, 4), w, b)
    with pytest.raises(ValueError, match="bias"):
        M.made_affine_forward(x, w, b[:1])
    with pytest.raises(ValueError, match="context_weight is None"):
        M.made_affine_forward(x, w, b, context=torch.randn(5, 2))
    with pytest.raises(ValueError, match="context is None"):
        M.made_affine_forward(x, w, b, context_weight=torch.randn(8, 2))
    with pytest.raises(ValueError, match="context must have shape"):
        M.made_affine_forward(x, w, b, context=torch.randn(4, 2), context_weight=torch.randn(8, 2))
    with pytest.raises(ValueError, match="at least 6 rows"):
        M.made_affine_forward(x, [w[0], w[1][:4]], [b[0], b[1][:4]])
    with pytest.raises(TypeError, match="weights\\[1\\]"):
        M.made_affine_forward(x, [w[0], w[1].numpy()], b)


def test_item8_out_of_range_order_is_a_value_error():
    p = _packed()
    with pytest.raises(ValueError, match="order"):
        M.made_affine_inverse(torch.randn(2, 4), p._replace(order=torch.tensor([0, 1, 2, 7])))


def test_item8_plain_weight_rejects_a_singular_fp32_matrix():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 5, generator=g) @ torch.randn(5, 6, generator=g)  # rank 5
    assert torch.isfinite(torch.linalg.slogdet(W)[1])  # what slipped through before
    with pytest.raises(ValueError, match="singular"):
        I.plain_weight(W)
    I.plain_weight(torch.linalg.qr(torch.randn(3, 3))[0])  # a regular one passes


# -- 9. benchmarks refuse the reference; info says where fastflow came from --------------------


def test_item9_bench_refuses_when_backend_is_not_native():
    env = dict(os.environ, FASTFLOW_BACKEND="reference")
    r = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, 'bench'); "
         "import _common; _common.require_native()"],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode != 0
    assert "refusing to time" in r.stderr and "reference" in r.stderr


def test_item9_info_names_the_imported_package():
    inf = fastflow.info()
    assert os.path.isdir(inf["imported_from"])
    assert os.path.exists(os.path.join(inf["imported_from"], "__init__.py"))


# -- 14. sample_shape tuples --------------------------------------------------------------------


def test_item14_sample_shape_tuple():
    torch.manual_seed(0)
    flow = MAF(3, layers=2, hidden=(8,))
    assert flow.sample((2, 3)).shape == (2, 3, 3)
    assert flow.rsample((4,)).shape == (4, 3)
    assert flow.sample(torch.Size([2, 1, 2])).shape == (2, 1, 2, 3)
    x, lp = flow.sample_and_log_prob((2, 2))
    assert x.shape == (2, 2, 3) and lp.shape == (2, 2)
    torch.testing.assert_close(
        lp.reshape(-1), flow.log_prob(x.reshape(-1, 3)), rtol=1e-4, atol=1e-4
    )
    assert flow.sample(5).shape == (5, 3)
    with pytest.raises(ValueError):
        flow.sample((2, -1))
