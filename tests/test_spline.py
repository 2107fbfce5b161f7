"""Rational-quadratic spline ops, spline layers and NeuralSplineFlow.

Independent checks: the inverse against bisection on the forward map, log|dy/dx| against the
fp64 autograd derivative, gradcheck in fp64, the degree walk against the naive D-pass inverse
in fp64, edge cases (values on knots, at +-B, all-tail batches, near-zero discriminants).
"""

from __future__ import annotations

import pytest
import torch

from fastflow.ops import spline as S
from fastflow.ops.made_spline import (
    made_spline_inverse,
    pack_spline_made,
    reference_made_spline_inverse,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(shape, bins, scale=1.0, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [
        scale * torch.randn(*shape, k, generator=g, dtype=dtype) for k in (bins, bins, bins - 1)
    ]


def _bisect(y, w, h, d, bound=3.0, iters=100):
    """Inverse by bisection on the (monotone) forward map, independent of the quadratic."""
    lo = torch.minimum(y, torch.full_like(y, -bound)) - 1
    hi = torch.maximum(y, torch.full_like(y, bound)) + 1
    for _ in range(iters):
        mid = (lo + hi) / 2
        f, _ = S.rq_spline_elementwise(mid, w, h, d, False, bound)
        below = f < y
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------------------------
# ops


@pytest.mark.parametrize("bins", [1, 2, 5, 8])
def test_inverse_matches_bisection_and_round_trips(bins):
    g = torch.Generator().manual_seed(bins)
    x = 2.5 * torch.randn(64, 3, generator=g, dtype=F64)  # inside and in both tails
    w, h, d = _params((64, 3), bins, scale=2.0, seed=bins)
    y, ld = S.rq_spline(x, w, h, d)
    x_inv, ld_inv = S.rq_spline_inverse(y, w, h, d)
    torch.testing.assert_close(x_inv, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld_inv, -ld, atol=1e-10, rtol=0)
    # 1e-9: the native kernel's knots equal torch's to rounding, amplified by dx/dy in flat bins
    torch.testing.assert_close(x_inv, _bisect(y, w, h, d), atol=1e-9, rtol=0)


def test_logdet_is_autograd_derivative():
    g = torch.Generator().manual_seed(1)
    x = 2.0 * torch.randn(50, 4, generator=g, dtype=F64)
    w, h, d = _params((50, 4), 6, scale=1.5, seed=2)
    xr = x.clone().requires_grad_(True)
    y, ld = S.rq_spline(xr, w, h, d)
    (dydx,) = torch.autograd.grad(y.sum(), xr)
    torch.testing.assert_close(ld, dydx.log().sum(1), atol=1e-12, rtol=0)
    # inverse: log|dx/dy| from autograd of the inverse
    yr = y.detach().clone().requires_grad_(True)
    xi, ldi = S.rq_spline_inverse(yr, w, h, d)
    (dxdy,) = torch.autograd.grad(xi.sum(), yr)
    torch.testing.assert_close(ldi, dxdy.log().sum(1), atol=1e-10, rtol=0)


def test_knots_bounds_and_tails():
    w, h, d = _params((1, 4), 5, scale=2.0, seed=3)
    xk = S._knots(w, 3.0, 1e-3)
    yk = S._knots(h, 3.0, 1e-3)
    # exactly on knots (incl. +-B): the forward hits the y knots, the inverse the x knots
    x = torch.stack([xk[0, 0, 0], xk[0, 1, 2], xk[0, 2, 5], xk[0, 3, 3]])[None]
    y, _ = S.rq_spline(x, w, h, d)
    y_exp = torch.stack([yk[0, 0, 0], yk[0, 1, 2], yk[0, 2, 5], yk[0, 3, 3]])[None]
    torch.testing.assert_close(y, y_exp, atol=1e-12, rtol=0)
    xi, _ = S.rq_spline_inverse(y_exp, w, h, d)
    torch.testing.assert_close(xi, x, atol=1e-12, rtol=0)
    # gradients on knots and at the bounds are finite for both directions
    for op, v in ((S.rq_spline, x), (S.rq_spline_inverse, y_exp)):
        ins = [t.clone().requires_grad_(True) for t in (v, w, h, d)]
        out, ld = op(*ins)
        (out.sum() + ld.sum()).backward()
        assert all(bool(t.grad.isfinite().all()) for t in ins)


def test_all_tail_batch_is_identity_with_finite_gradients():
    x = torch.tensor([[-7.0, 3.5], [4.0, -3.0001]], dtype=F64, requires_grad=True)
    w, h, d = _params((2, 2), 4, scale=3.0, seed=4)
    ps = [t.clone().requires_grad_(True) for t in (w, h, d)]
    for op in (S.rq_spline, S.rq_spline_inverse):
        y, ld = op(x, *ps)
        assert torch.equal(y, x) and torch.equal(ld, torch.zeros(2, dtype=F64))
        (y.sum() + ld.sum()).backward()
        assert torch.equal(x.grad, torch.ones_like(x))
        assert all(bool((p.grad == 0).all()) for p in ps)
        x.grad = None
        for p in ps:
            p.grad = None


def test_near_zero_discriminant():
    # extreme derivatives and tiny bins: b^2 - 4ac is tiny relative to b^2 and rounds to
    # (slightly negative) values in fp32; the clamp and the stable root keep x finite and in range
    torch.manual_seed(5)
    n, k = 4000, 8
    w = 6 * torch.randn(n, k)
    h = 6 * torch.randn(n, k)
    d = 12 * torch.randn(n, k - 1)
    x = 3 * (2 * torch.rand(n) - 1)
    y, _ = S.rq_spline(x[:, None], w[:, None], h[:, None], d[:, None])
    ins = [t.clone().requires_grad_(True) for t in (y, w[:, None], h[:, None], d[:, None])]
    xi, ld = S.rq_spline_inverse(*ins)
    assert bool(xi.isfinite().all() and ld.isfinite().all())
    assert bool((xi.abs() <= 3).all())
    (xi.sum() + ld.sum()).backward()
    assert all(bool(t.grad.isfinite().all()) for t in ins)
    # backward-stable: the forward of the fp32 inverse reproduces y
    y2, _ = S.rq_spline(xi.detach(), w[:, None], h[:, None], d[:, None])
    assert (y2 - y).abs().max().item() < 2e-4  # fp32, bins down to 6e-3 wide
    # the unclamped discriminant does go negative by rounding somewhere in these cases
    xk, yk, ww, hh, d0, d1 = S._bin_params(w, h, d, 3.0, 1e-3, 1e-3, 1e-3, y[:, 0], True)
    s, dy = hh / ww, y[:, 0] - yk
    e = d1 + d0 - 2 * s
    a, b, c = hh * (s - d0) + dy * e, hh * d0 - dy * e, -s * dy
    assert bool(((b * b - 4 * a * c) < b * b * 1e-6).any())


def test_zero_parameters_are_identity_and_mask():
    x = torch.randn(3, 4)
    z = torch.zeros(3, 4, 6)
    y, ld = S.rq_spline(x, z, z, z[..., :5])
    torch.testing.assert_close(y, x, atol=1e-6, rtol=0)
    torch.testing.assert_close(ld, torch.zeros(3), atol=1e-5, rtol=0)
    w, h, d = _params((3, 4), 6, dtype=torch.float32)
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ym, ldm = S.rq_spline(x, w, h, d, mask=mask)
    yf, _ = S.rq_spline(x, w, h, d)
    assert torch.equal(ym[:, 1::2], x[:, 1::2])
    torch.testing.assert_close(ym[:, ::2], yf[:, ::2])
    _, lad = S.rq_spline_elementwise(x, w, h, d)
    torch.testing.assert_close(ldm, lad[:, ::2].sum(1))


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    g = torch.Generator().manual_seed(6)
    x = 2.0 * torch.randn(4, 3, generator=g, dtype=F64)
    x[0, 0] = 5.0  # a tail
    w, h, d = _params((4, 3), 4, seed=7)
    ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    op = S.rq_spline_inverse if inverse else S.rq_spline
    assert torch.autograd.gradcheck(lambda *a: op(*a, bound=2.5), ins)


def test_dtypes_and_empty_batch():
    w, h, d = _params((5, 2), 3, dtype=torch.float32)
    x = torch.randn(5, 2)
    y, ld = S.rq_spline(x, w, h, d)
    assert ld.dtype == torch.float32
    y64, ld64 = S.rq_spline(x.double(), w.double(), h.double(), d.double())
    assert ld64.dtype == F64
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=0)
    yb, ldb = S.rq_spline(x.bfloat16(), w.bfloat16(), h.bfloat16(), d.bfloat16())
    assert yb.dtype == torch.bfloat16 and ldb.dtype == torch.float32
    e, lde = S.rq_spline(x[:0], w[:0], h[:0], d[:0])
    assert e.shape == (0, 2) and lde.shape == (0,)


def test_bad_arguments():
    x = torch.randn(2, 3)
    w, h, d = _params((2, 3), 4, dtype=torch.float32)
    with pytest.raises(ValueError, match="derivatives"):
        S.rq_spline(x, w, h, w)
    with pytest.raises(ValueError, match="heights"):
        S.rq_spline(x, w, h[:, :2], d)
    with pytest.raises(TypeError, match="heights"):
        S.rq_spline(x, w, h.double(), d)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        S.rq_spline([1.0], w, h, d)
    with pytest.raises(ValueError, match="bound"):
        S.rq_spline(x, w, h, d, bound=0)
    with pytest.raises(ValueError, match="min_bin_width"):
        S.rq_spline(x, w, h, d, min_bin_width=0.3)
    with pytest.raises(ValueError, match="min_derivative"):
        S.rq_spline_inverse(x, w, h, d, min_derivative=0.0)
    with pytest.raises(ValueError, match="mask"):
        S.rq_spline(x, w, h, d, mask=torch.ones(2))
    with pytest.raises(ValueError, match="bins"):
        S.check_spline_options(0, 3.0)


# ----------------------------------------------------------------------------------------------
# layers and the flow


def _noisy(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.mark.parametrize(
    "kw",
    [
        dict(features=5, hidden=(12, 9), bins=4),
        dict(
            features=4,
            hidden=(7,),
            bins=3,
            context=2,
            activation="elu",
            order="random",
            hidden_degrees="random",
            seed=2,
        ),  # fmt: skip
        dict(features=1, hidden=(5,), bins=5),
        dict(features=3, hidden=(6, 6, 6), bins=1, activation="tanh", order="reversed"),
    ],
)
def test_walk_equals_naive_d_pass_inverse_fp64(kw):
    from fastflow.nn.spline import SplineAutoregressive

    torch.manual_seed(0)
    layer = _noisy(SplineAutoregressive(**kw, init_scale=1.0).double())
    g = torch.Generator().manual_seed(1)
    n, d = 9, kw["features"]
    u = 2.5 * torch.randn(n, d, generator=g, dtype=F64)
    c = torch.randn(n, 2, generator=g, dtype=F64) if kw.get("context") else None
    x, ld = layer.inverse(u, c)
    x_ref, ld_ref = layer.naive_walk(u, c)
    torch.testing.assert_close(x, x_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-11, rtol=0)
    with torch.no_grad():  # the in-place (no autograd) walk
        x_ng, ld_ng = layer.inverse(u, c)
    torch.testing.assert_close(x_ng, x_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld_ng, ld_ref, atol=1e-11, rtol=0)
    # the packed naive reference agrees too, and the walk is the inverse of the density pass
    p = layer.packed()
    x_p, _ = reference_made_spline_inverse(u, p, layer.bins, c, layer.made.activation)
    torch.testing.assert_close(x, x_p, atol=1e-12, rtol=0)
    u2, ld2 = layer(x, c)
    torch.testing.assert_close(u2, u, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld2, -ld, atol=1e-10, rtol=0)
    # gradients through the walk equal gradients through the naive loop
    ps = list(layer.parameters())
    gw = torch.autograd.grad(layer.inverse(u, c)[0].square().sum(), ps, allow_unused=True)
    gn = torch.autograd.grad(layer.naive_walk(u, c)[0].square().sum(), ps, allow_unused=True)
    for a, b in zip(gw, gn):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def test_iaf_style_density_is_the_walk():
    from fastflow.nn.spline import SplineInverseAutoregressive

    torch.manual_seed(1)
    layer = _noisy(SplineInverseAutoregressive(4, hidden=(9,), bins=3, context=2)).double()
    x, c = torch.randn(6, 4, dtype=F64), torch.randn(6, 2, dtype=F64)
    z, ld = layer(x, c)
    z_ref, ld_ref = layer.naive_walk(x, c)
    torch.testing.assert_close(z, z_ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-11, rtol=0)
    x2, ld2 = layer.inverse(z, c)  # sampling: one network pass
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld2, -ld, atol=1e-10, rtol=0)


def test_walk_functional_and_errors():
    torch.manual_seed(0)
    d, h, k = 3, 8, 4
    P = 3 * k - 1
    w = [torch.randn(h, d), torch.randn(P * d, h)]
    b = [torch.zeros(h), torch.randn(P * d)]
    p = pack_spline_made(w, b, torch.arange(1, d + 1), [torch.arange(h) % (d - 1) + 1], P)
    u = torch.randn(5, d)
    x, ld = made_spline_inverse(u, p, bins=k)
    assert x.shape == (5, d) and ld.shape == (5,)
    with pytest.raises(ValueError, match="out_weight"):
        made_spline_inverse(u, p, bins=k + 1)
    with pytest.raises(ValueError, match="features"):
        made_spline_inverse(u[:, :2], p, bins=k)
    with pytest.raises(ValueError, match="context"):
        made_spline_inverse(u, p, bins=k, context=torch.randn(5, 2))
    with pytest.raises(TypeError, match="PackedSplineMADE"):
        made_spline_inverse(u, w, bins=k)
    with pytest.raises(ValueError, match="P \\* D"):
        pack_spline_made(w, b, torch.arange(1, d + 1), [torch.arange(h) % 2 + 1], P + 1)


def test_nsf_ar_sampling_equals_naive_d_pass_inverse_fp64():
    from fastflow.models.nsf import NeuralSplineFlow

    torch.manual_seed(0)
    flow = _noisy(NeuralSplineFlow(4, layers=3, bins=4, kind="autoregressive", hidden=8)).double()
    z = torch.randn(6, 4, dtype=F64)
    x, ld = flow.inverse(z)
    # the same map by the naive D-pass inverse of every layer, last to first
    v, ld_ref = z, torch.zeros(6, dtype=F64)
    for t in reversed(flow.transforms.flat()):
        v, l = t.naive_walk(v) if hasattr(t, "naive_walk") else t.inverse(v)
        ld_ref = ld_ref + l
    torch.testing.assert_close(x, v, atol=1e-12, rtol=0)
    torch.testing.assert_close(ld, ld_ref, atol=1e-11, rtol=0)
    torch.testing.assert_close(flow.log_prob(x), flow.base.log_prob(z) - ld, atol=1e-10, rtol=0)


def test_coupling_masks_and_identity_init():
    from fastflow.nn.spline import SplineCoupling

    x = torch.randn(3, 2, 4, 4)
    for mask in ("channel", "checkerboard"):
        layer = SplineCoupling((2, 4, 4), mask, hidden=4, bins=3)
        z, ld = layer(x)  # zero-initialised conditioner: the identity
        torch.testing.assert_close(z, x, atol=1e-5, rtol=0)
        torch.testing.assert_close(ld, torch.zeros(3), atol=1e-4, rtol=0)
        _noisy(layer)
        z, ld = layer(x)
        x2, ld2 = layer.inverse(z)
        torch.testing.assert_close(x2, x, atol=1e-4, rtol=0)
        torch.testing.assert_close(ld2, -ld, atol=1e-4, rtol=0)
    # the checkerboard mask leaves the conditioning pixels alone
    m = layer.mask.bool().expand_as(x[0])
    assert torch.equal(z[:, ~m], x[:, ~m]) and not torch.equal(z[:, m], x[:, m])


def test_nsf_registry_and_bad_arguments():
    from fastflow.models.nsf import NeuralSplineFlow
    from fastflow.nn.spline import SplineAutoregressive, SplineCoupling
    from fastflow.registry import build_model

    flow = build_model("nsf", (3,), {"hidden": 8, "depth": 2})
    assert isinstance(flow, NeuralSplineFlow) and flow.log_prob(torch.randn(4, 3)).shape == (4,)
    with pytest.raises(ValueError, match="kind"):
        NeuralSplineFlow(3, kind="spline")
    with pytest.raises(ValueError, match="features"):
        NeuralSplineFlow(1)
    with pytest.raises(ValueError, match="layers"):
        NeuralSplineFlow(3, layers=0)
    with pytest.raises(ValueError, match="permutation"):
        NeuralSplineFlow(3, permutation="shuffle")
    with pytest.raises(ValueError, match="bins"):
        SplineCoupling(4, bins=0)
    with pytest.raises(ValueError, match="bound"):
        SplineAutoregressive(4, bound=-1.0)
    with pytest.raises(ValueError, match="x must have shape"):
        SplineAutoregressive(4, hidden=(8,))(torch.randn(2, 3))
    with pytest.raises(ValueError, match="context"):
        SplineAutoregressive(4, hidden=(8,), context=2).inverse(torch.randn(2, 4))
