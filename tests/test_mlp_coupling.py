"""The fused MLP + affine coupling op and MLPAffineCoupling, against the pure-PyTorch reference."""

from __future__ import annotations

import pytest
import torch

import fastflow
from fastflow.models import RealNVP
from fastflow.nn import AffineCoupling, MLPAffineCoupling
from fastflow.ops.mlp_coupling import (
    init_mlp_params,
    mlp_affine_coupling,
    mlp_layout,
    reference_mlp_affine_coupling,
)

CASES = [
    # (D, context, parity, hidden sizes, scale_fn)
    (2, 0, 0, (9, 11), "softclamp"),
    (5, 0, 1, (7,), "glow"),
    (17, 3, 0, (13, 5, 6), "identity"),
    (3, 2, 1, (), "softclamp"),
]


@pytest.fixture(autouse=True)
def _native():
    fastflow.set_backend("native")


def _setup(d, c, parity, hidden, dtype, n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    cut = d // 2
    da = cut if parity == 0 else d - cut
    lay = mlp_layout((da + c, *hidden, 2 * (d - da)))
    torch.manual_seed(seed)
    p = init_mlp_params(lay, zero_last=False).to(dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    ctx = torch.randn(n, c, generator=g, dtype=dtype) if c else None
    return lay, cut, p, x, ctx


@pytest.mark.parametrize("d,c,parity,hidden,scale_fn", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_matches_reference_both_directions_and_grads(d, c, parity, hidden, scale_fn, dtype):
    lay, cut, p, x, ctx = _setup(d, c, parity, hidden, dtype)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for inverse in (False, True):
        args = (lay, cut, parity, ctx, scale_fn, 2.0, inverse)
        xs = [x.clone().requires_grad_(), p.clone().requires_grad_()]
        rs = [x.clone().requires_grad_(), p.clone().requires_grad_()]
        with torch.no_grad() if inverse else torch.enable_grad():
            y, ld = mlp_affine_coupling(xs[0], xs[1], *args)
        y0, ld0 = reference_mlp_affine_coupling(rs[0], rs[1], *args)
        torch.testing.assert_close(y, y0.detach(), **tol)
        torch.testing.assert_close(ld, ld0.detach(), **tol)
        if not inverse:
            gy, gl = torch.randn_like(y), torch.randn_like(ld)
            torch.autograd.backward((y, ld), (gy, gl))
            torch.autograd.backward((y0, ld0), (gy, gl))
            torch.testing.assert_close(xs[0].grad, rs[0].grad, **tol)
            torch.testing.assert_close(xs[1].grad, rs[1].grad, **tol)


@pytest.mark.parametrize("d,c,parity,hidden,scale_fn", [*CASES[:2], (4, 2, 0, (5, 3), "identity")])
def test_gradcheck_fp64(d, c, parity, hidden, scale_fn):
    lay, cut, p, x, ctx = _setup(d, c, parity, hidden, torch.float64, n=4)
    inputs = [x.requires_grad_(), p.requires_grad_()] + ([ctx.requires_grad_()] if c else [])

    def f(x, p, *cc):
        return mlp_affine_coupling(x, p, lay, cut, parity, cc[0] if cc else None, scale_fn)

    assert torch.autograd.gradcheck(f, inputs)


def test_module_round_trip_and_logdet_is_the_jacobian(fp64_default):
    torch.manual_seed(0)
    layer = MLPAffineCoupling(5, hidden=8, parity=1, context_features=2)
    with torch.no_grad():
        layer.params.normal_(0, 0.5)
    x, c = torch.randn(3, 5), torch.randn(3, 2)
    z, ld = layer(x, c)
    x2, ld2 = layer.inverse(z, c)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    for i in range(3):
        ci = c[i : i + 1]
        jac = torch.autograd.functional.jacobian(lambda v, ci=ci: layer(v[None], ci)[0][0], x[i])
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac)[1])
    # context changes the output
    assert not torch.allclose(layer(x, c + 1)[0], z)


def test_fused_realnvp_equals_the_unfused_model():
    torch.manual_seed(0)
    fused = RealNVP(6, layers=3, hidden=16, context_features=2)
    plain = RealNVP(6, layers=3, hidden=16, context_features=2, fused=False)
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in plain.parameters())
    for f, a in zip(fused.transforms.flat(), plain.transforms.flat()):
        assert isinstance(f, MLPAffineCoupling) and isinstance(a, AffineCoupling)
        lins = [m for m in a.subnet if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            f.params.normal_(0, 0.3)
            for lin, (wo, o, i), (bo, _) in zip(lins, f.layout.weights, f.layout.biases):
                lin.weight.copy_(f.params[wo : wo + o * i].view(o, i))
                lin.bias.copy_(f.params[bo : bo + o])
    x, c = torch.randn(9, 6), torch.randn(9, 2)
    torch.testing.assert_close(fused.log_prob(x, c), plain.log_prob(x, c), rtol=1e-5, atol=1e-5)


def test_under_autocast_and_reference_backend():
    torch.manual_seed(0)
    layer = MLPAffineCoupling(4, hidden=8)
    x = torch.randn(5, 4)
    ref = layer(x)[0]
    with torch.autocast("cpu", torch.bfloat16):
        z, ld = layer(x)
    assert z.dtype == torch.float32 and torch.isfinite(ld).all()
    fastflow.set_backend("reference")
    torch.testing.assert_close(layer(x)[0], ref)


def test_compile_fullgraph():
    torch.manual_seed(0)
    layer = MLPAffineCoupling(4, hidden=8)
    x = torch.randn(5, 4)
    f = torch.compile(lambda v: layer(v), fullgraph=True)
    z, ld = f(x)
    torch.testing.assert_close(z, layer(x)[0])


def test_errors():
    with pytest.raises(ValueError, match="features"):
        MLPAffineCoupling(1)
    layer = MLPAffineCoupling(4, hidden=8)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(3, 4), torch.randn(3, 2))
    lay = mlp_layout((2, 4, 4))
    with pytest.raises(ValueError, match="params"):
        mlp_affine_coupling(torch.randn(3, 4), torch.zeros(5), lay, 2)
    with pytest.raises(ValueError, match="layout"):
        mlp_affine_coupling(torch.randn(3, 5), torch.zeros(lay.numel), lay, 2)
    with pytest.raises(ValueError, match="cut"):
        mlp_affine_coupling(torch.randn(3, 4), torch.zeros(lay.numel), lay, 0)
