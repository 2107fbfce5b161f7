"""The MADE density layer's whole-layer native kernel (made_density_*_cpu) against the reference,
and incoming gradients of any layout (a pointer into a freed temporary was once passed to C++)."""

import pytest
import torch

import fastflow
from fastflow import _backend as B
from fastflow.nn import MaskedAffineAutoregressive, MLPAffineCoupling
from fastflow.ops import made_density as MD
from fastflow.ops import mlp_coupling as MC

needs_native = pytest.mark.skipif(
    B._C is None or not hasattr(B._C, "made_density_forward_cpu"), reason="needs fastflow._C"
)


def _grads(layer, x, gu, gl, backend):
    fastflow.set_backend(backend)
    try:
        u, ld = layer(x)
        g = torch.autograd.grad((u * gu).sum() + (ld * gl).sum(), [x, *layer.parameters()])
    finally:
        fastflow.set_backend("auto")
    return (u.detach(), ld.detach(), *g)


@needs_native
@pytest.mark.parametrize("scale_fn", ["softclamp", "glow", "identity"])
@pytest.mark.parametrize(
    ("d", "hidden", "n"), [(2, (16, 16), 50), (7, (12,), 3), (5, (9, 9, 9), 49)]
)
def test_kernel_matches_reference_fp64(scale_fn, d, hidden, n):
    torch.manual_seed(d * 100 + n)
    layer = MaskedAffineAutoregressive(d, list(hidden), scale_fn=scale_fn).double()
    with torch.no_grad():
        layer.made.params.normal_(0, 0.2)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    assert MD._use_kernel(x, layer.made.layout, "relu", None)
    gu, gl = torch.randn(n, d, dtype=torch.float64), torch.randn(n, dtype=torch.float64)
    got = _grads(layer, x, gu, gl, "auto")
    ref = _grads(layer, x, gu, gl, "reference")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@needs_native
def test_kernel_fp32_and_threads_agree():
    torch.manual_seed(0)
    layer = MaskedAffineAutoregressive(6, [32, 32])
    with torch.no_grad():
        layer.made.params.normal_(0, 0.2)
    x = torch.randn(200, 6, requires_grad=True)
    gu, gl = torch.randn(200, 6), torch.randn(200)
    ref = _grads(layer, x, gu, gl, "reference")
    old = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append(_grads(layer, x, gu, gl, "auto"))
    finally:
        torch.set_num_threads(old)
    for a, b, r in zip(*outs, ref):
        assert torch.equal(a, b)  # thread-count independent bits
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@needs_native
def test_masked_weights_get_no_gradient():
    layer = MaskedAffineAutoregressive(4, [8])
    x = torch.randn(10, 4)
    u, ld = layer(x)
    (u.sum() + ld.sum()).backward()
    g = layer.made.params.grad
    fm = layer.made.flat_mask(torch.float32)
    assert torch.all(g[fm == 0] == 0)


@pytest.mark.parametrize("path", ["kernel", "matmul"])
@pytest.mark.parametrize(
    "make",
    [lambda: MLPAffineCoupling(6, hidden=16), lambda: MaskedAffineAutoregressive(6, [16, 16])],
)
def test_noncontiguous_incoming_gradients(make, path, monkeypatch):
    """grad_y / grad_logdet arrive transposed and strided: the result must equal the reference
    (these were once read through pointers into freed temporaries: 1e36 gradients)."""
    if path == "matmul":
        monkeypatch.setattr(MC, "_use_kernel", lambda *a: False)
        monkeypatch.setattr(MD, "_use_kernel", lambda *a: False)
    torch.manual_seed(1)
    layer = make()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(40, 6, requires_grad=True)
    gu = torch.randn(6, 40).t()
    gl = torch.randn(40, 2)[:, 0]
    assert not gu.is_contiguous() and not gl.is_contiguous()
    got = _grads(layer, x, gu, gl, "auto")
    ref = _grads(layer, x, gu, gl, "reference")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@needs_native
def test_large_noncontiguous_gradient_does_not_crash():
    """The size at which the freed temporary was unmapped (a segfault): 1024 x 256."""
    layer = MLPAffineCoupling(256, hidden=16)
    x = torch.randn(1024, 256, requires_grad=True)
    u, ld = layer(x)
    (u.sum() + ld.sum()).backward()  # expanded (stride-0) incoming gradients
    assert torch.isfinite(x.grad).all()


@needs_native
def test_made_entry_points_check_sizes():
    from fastflow.ops import _mlp_native as K

    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="sizes must run from d"):
        K.made_forward(x, torch.zeros(77), (3, 8, 5), 0, 2.0, False)
    with pytest.raises(ValueError, match="params"):
        K.made_forward(x, torch.zeros(10), (3, 8, 6), 0, 2.0, False)
