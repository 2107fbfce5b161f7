"""The native spline degree walk (made_spline_inverse_cpu) against the naive D-pass inverse and
the PyTorch walk."""

import pytest
import torch

import fastflow
from fastflow import _backend as B
from fastflow.nn import SplineAutoregressive
from fastflow.ops import made_spline as MS

pytestmark = pytest.mark.skipif(
    B._C is None or not hasattr(B._C, "made_spline_inverse_cpu"), reason="needs fastflow._C"
)


def _layer(d, hidden, bins, context=0, activation="relu", dtype=torch.float64, seed=0, std=0.5):
    torch.manual_seed(seed)
    layer = SplineAutoregressive(
        d, hidden=hidden, bins=bins, context=context, activation=activation
    ).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, std)
    return layer


def _packed(layer):
    with torch.no_grad():
        return layer.packed()


@pytest.mark.parametrize(
    ("d", "hidden", "bins", "context", "activation"),
    [(5, [16, 16], 4, 0, "relu"), (3, [7], 2, 2, "tanh"), (9, [20, 12, 24], 8, 0, "elu"),
     (1, [4], 3, 0, "relu"), (40, [64, 64], 5, 3, "relu")],
)  # fmt: skip
def test_native_walk_matches_naive_inverse_fp64(d, hidden, bins, context, activation):
    layer = _layer(d, hidden, bins, context, activation)
    n = 37  # not a multiple of the block
    u = torch.randn(n, d, dtype=torch.float64) * 2.5  # some values in the identity tails
    ctx = torch.randn(n, context, dtype=torch.float64) if context else None
    packed = _packed(layer)
    opts = (bins, layer.bound, 1e-3, 1e-3, 1e-3)
    with torch.no_grad():
        got = MS._native_spline_walk(u, packed, ctx, activation, opts)
        ref = MS.reference_made_spline_inverse(u, packed, bins, ctx, activation, bound=layer.bound)
    assert got is not None
    torch.testing.assert_close(got[0], ref[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-9, atol=1e-9)


def test_layer_inverse_uses_native_and_round_trips_fp32():
    layer = _layer(6, [32, 32], 6, dtype=torch.float32, std=0.1)  # fp32: well-conditioned
    z = torch.randn(100, 6)
    calls = []
    orig = MS._native_spline_walk

    def spy(*a, **k):
        out = orig(*a, **k)
        calls.append(out is not None)
        return out

    MS._native_spline_walk = spy
    try:
        with torch.no_grad():
            x, ld = layer.inverse(z)
    finally:
        MS._native_spline_walk = orig
    assert calls == [True]
    with torch.no_grad():
        z2, ld_f = layer(x)
    torch.testing.assert_close(z2, z, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld, -ld_f, rtol=1e-4, atol=1e-4)
    fastflow.set_backend("reference")
    with torch.no_grad():
        x_ref, ld_ref = layer.inverse(z)
    torch.testing.assert_close(x, x_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-4, atol=1e-4)


def test_threads_do_not_change_the_result():
    layer = _layer(4, [16], 3)
    u = torch.randn(100, 4, dtype=torch.float64)
    packed = _packed(layer)
    opts = (3, layer.bound, 1e-3, 1e-3, 1e-3)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(MS._native_spline_walk(u, packed, None, "relu", opts))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_kernel_rejects_bad_structures():
    layer = _layer(3, [8], 2)
    packed = _packed(layer)
    u = torch.randn(4, 3, dtype=torch.float64)
    bad = packed._replace(bounds_list=[0] * len(packed.bounds_list))
    with pytest.raises(ValueError):
        MS._native_spline_walk(u, bad, None, "relu", (2, 3.0, 1e-3, 1e-3, 1e-3))
