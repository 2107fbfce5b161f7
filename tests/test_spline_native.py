"""The native rational-quadratic spline kernels (csrc/spline*.{h,cpp,cu}) against the
pure-PyTorch reference of fastflow/ops/spline.py: values, log-dets and gradients (the reference's
autograd in fp64), every CPU ISA variant, edge cases (all-tail, on knots, +-B, near-zero
discriminant), masks, 16-bit inputs and bad arguments."""

import pytest
import torch

import fastflow
from fastflow import _backend as B
from fastflow.ops import spline as S

F64 = torch.float64

pytestmark = pytest.mark.skipif(
    B._C is None or not hasattr(B._C, "rq_spline_cpu"), reason="needs fastflow._C with splines"
)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _params(shape, bins, scale=1.0, seed=0, dtype=F64, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [
        (scale * torch.randn(*shape, k, generator=g, dtype=dtype)).to(device)
        for k in (bins, bins, bins - 1)
    ]


def _ref(op, *args, **kw):
    ref = S.reference_rq_spline_inverse if op is S.rq_spline_inverse else S.reference_rq_spline
    return ref(*args, **kw)


def _native(op, *args, **kw):
    fastflow.set_backend("native")
    try:
        return op(*args, **kw)
    finally:
        fastflow.set_backend("auto")


def _edge_inputs(bins, n=40, d=3, seed=0, dtype=F64):
    """Random inputs inside and in both tails, values exactly on x knots and y knots, +-B."""
    g = torch.Generator().manual_seed(seed)
    w, h, dv = _params((n, d), bins, scale=2.0, seed=seed, dtype=dtype)
    x = (2.5 * torch.randn(n, d, generator=g, dtype=F64)).to(dtype)
    xk = S._knots(w, 3.0, S.DEFAULT_MIN_BIN_WIDTH)
    yk = S._knots(h, 3.0, S.DEFAULT_MIN_BIN_HEIGHT)
    j = torch.randint(0, bins + 1, (n, d), generator=g)
    on_x = xk.gather(-1, j[..., None])[..., 0]
    on_y = yk.gather(-1, j[..., None])[..., 0]
    x[:8] = on_x[:8]
    x[8, 0], x[8, 1], x[8, 2] = 3.0, -3.0, 7.0
    return x, on_y, w, h, dv


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("bins", [1, 2, 5, 8])
def test_native_matches_reference_fp64(cpu_isa, bins, inverse):
    x, on_y, w, h, d = _edge_inputs(bins, seed=bins)
    op = S.rq_spline_inverse if inverse else S.rq_spline
    v = x.clone()
    if inverse:
        v[:8] = on_y[:8]  # on the y knots
    out, ld = _native(op, v, w, h, d)
    out_r, ld_r = _ref(op, v, w, h, d)
    torch.testing.assert_close(out, out_r, atol=1e-12, rtol=0)
    # a value on a reference knot may land on the other side of the kernel's knot (the
    # knots differ by rounding): y is continuous there, the log-det to rounding times lad'
    torch.testing.assert_close(ld, ld_r, atol=1e-11, rtol=1e-8)


@pytest.mark.parametrize("inverse", [False, True])
def test_native_gradients_match_reference_autograd_fp64(cpu_isa, inverse):
    x, on_y, w, h, d = _edge_inputs(6, n=24, seed=3)
    op = S.rq_spline_inverse if inverse else S.rq_spline
    v = x.clone()
    if inverse:
        v[:8] = on_y[:8]
    g = torch.Generator().manual_seed(9)
    gy = torch.randn(v.shape, generator=g, dtype=F64)
    gl = torch.randn(v.shape[0], generator=g, dtype=F64)
    grads = []
    for run in (_native, lambda o, *a: _ref(o, *a)):
        ins = [t.clone().requires_grad_(True) for t in (v, w, h, d)]
        out, ld = run(op, *ins)
        grads.append(torch.autograd.grad((out * gy).sum() + (ld * gl).sum(), ins))
    # rows 8: are off the knots: tight. On a knot (rows :8) the RQ spline's second derivative
    # jumps, so the log-det's gradients depend on the side of the knot, which rounding of the
    # knots (kernel vs torch) can flip: there they only have to be finite.
    for a, b in zip(*grads):
        torch.testing.assert_close(a[8:], b[8:], atol=1e-9, rtol=1e-9)
        assert bool(a[:8].isfinite().all())
    # without the log-det term the gradients are continuous across knots: all rows tight
    grads = []
    for run in (_native, lambda o, *a: _ref(o, *a)):
        ins = [t.clone().requires_grad_(True) for t in (v, w, h, d)]
        out, ld = run(op, *ins)
        grads.append(torch.autograd.grad((out * gy).sum(), ins))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("inverse", [False, True])
def test_native_gradcheck(inverse):
    g = torch.Generator().manual_seed(6)
    x = 2.0 * torch.randn(4, 3, generator=g, dtype=F64)
    x[0, 0] = 5.0  # a tail
    w, h, d = _params((4, 3), 4, seed=7)
    ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    op = S.rq_spline_inverse if inverse else S.rq_spline
    fastflow.set_backend("native")
    assert torch.autograd.gradcheck(lambda *a: op(*a, bound=2.5), ins)


def test_native_fp32_and_16bit_match_reference(cpu_isa):
    x, _, w, h, d = _edge_inputs(8, n=64, seed=1, dtype=torch.float32)
    for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2), (torch.float16, 5e-3)):
        args = [t.to(dt) for t in (x, w, h, d)]
        for op in (S.rq_spline, S.rq_spline_inverse):
            out, ld = _native(op, *args)
            out_r, ld_r = _ref(op, *args)
            assert out.dtype == dt and ld.dtype == torch.float32
            torch.testing.assert_close(out.float(), out_r.float(), atol=tol, rtol=0)
            torch.testing.assert_close(ld, ld_r, atol=tol * 20, rtol=0)
    # fp32 gradients
    ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, ld = _native(S.rq_spline, *ins)
    gn = torch.autograd.grad(y.sum() + ld.sum(), ins)
    ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    y, ld = _ref(S.rq_spline, *ins)
    gr = torch.autograd.grad(y.sum() + ld.sum(), ins)
    for a, b in zip(gn, gr):  # off the knots (rows 8:), see the fp64 gradient test
        torch.testing.assert_close(a[8:], b[8:], atol=2e-3, rtol=2e-3)
        assert bool(a.isfinite().all())


def test_native_all_tail_and_mask(cpu_isa):
    x = torch.tensor([[-7.0, 3.5], [4.0, -3.0001]], dtype=F64)
    w, h, d = _params((2, 2), 4, scale=3.0, seed=4)
    for op in (S.rq_spline, S.rq_spline_inverse):
        ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
        y, ld = _native(op, *ins)
        assert torch.equal(y, x) and torch.equal(ld, torch.zeros(2, dtype=F64))
        (y.sum() + ld.sum()).backward()
        assert torch.equal(ins[0].grad, torch.ones_like(x))
        assert all(bool((p.grad == 0).all()) for p in ins[1:])
    # masked calls: masked-out elements pass through, gradients as the reference's
    xm = torch.randn(5, 4, 3, dtype=F64)
    w, h, d = _params((5, 4, 3), 5, seed=5)
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # broadcasts to x.shape[1:]
    for op in (S.rq_spline, S.rq_spline_inverse):
        res = []
        for run in (_native, lambda o, *a, **k: _ref(o, *a, **k)):
            ins = [t.clone().requires_grad_(True) for t in (xm, w, h, d)]
            y, ld = run(op, *ins, mask=mask)
            res.append((y, ld, *torch.autograd.grad(y.pow(2).sum() + ld.sum(), ins)))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_native_near_zero_discriminant(cpu_isa):
    torch.manual_seed(5)
    n, k = 2000, 8
    w, h = 6 * torch.randn(n, 1, k), 6 * torch.randn(n, 1, k)
    d = 12 * torch.randn(n, 1, k - 1)
    x = 3 * (2 * torch.rand(n, 1) - 1)
    y, _ = _native(S.rq_spline, x, w, h, d)
    ins = [t.clone().requires_grad_(True) for t in (y, w, h, d)]
    xi, ld = _native(S.rq_spline_inverse, *ins)
    assert bool(xi.isfinite().all() and ld.isfinite().all()) and bool((xi.abs() <= 3).all())
    (xi.sum() + ld.sum()).backward()
    assert all(bool(t.grad.isfinite().all()) for t in ins)
    y2, _ = _native(S.rq_spline, xi.detach(), w, h, d)
    assert (y2 - y).abs().max().item() < 1e-4
    # (no comparison of x with the reference's: in fp32 the inverse of a near-flat bin is
    # ill-conditioned, so two correct roots may differ by a lot while both reproduce y)


def test_native_dispatch_and_fallbacks(monkeypatch):
    x = torch.randn(3, 2)
    w, h, d = _params((3, 2), 4, dtype=torch.float32)
    calls = []
    real = S._native_fwd
    monkeypatch.setattr(S, "_native_fwd", lambda *a: calls.append(1) or real(*a))
    S.rq_spline(x, w, h, d)
    assert calls == [1]  # auto backend on CPU: the kernel
    fastflow.set_backend("reference")
    S.rq_spline(x, w, h, d)
    assert calls == [1]
    fastflow.set_backend("auto")
    big = _params((3, 2), B._C.SPLINE_MAX_BINS + 1, dtype=torch.float32)
    y, _ = S.rq_spline(x, *big)  # more bins than the kernel holds: the reference
    assert calls == [1] and y.shape == x.shape
    # empty batch and non-contiguous parameters
    e, lde = S.rq_spline(x[:0], w[:0], h[:0], d[:0])
    assert e.shape == (0, 2) and lde.shape == (0,)
    p = torch.randn(3, 11, 2).movedim(1, -1)  # the conditioner layout: views
    y, ld = S.rq_spline(x, p[..., :4], p[..., 4:8], p[..., 8:])
    y_r, ld_r = S.reference_rq_spline(x, p[..., :4], p[..., 4:8], p[..., 8:])
    torch.testing.assert_close(y, y_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(ld, ld_r, atol=1e-4, rtol=0)


def test_native_entry_point_checks():
    x = torch.randn(2, 3)
    w, h, d = _params((2, 3), 4, dtype=torch.float32)
    opts = S.check_spline_options(4, 3.0)
    kw = S._kernel_args(x, w, h, d, None, opts, False)
    out = torch.empty_like(x)
    ld = torch.empty(2)
    with pytest.raises(ValueError, match="bins"):
        B._C.rq_spline_cpu(**{**kw, "bins": 0}, out_ptr=out.data_ptr(), logdet_ptr=ld.data_ptr(),
                           nthreads=1)  # fmt: skip
    with pytest.raises(ValueError, match="bound"):
        B._C.rq_spline_cpu(**{**kw, "bound": -1.0}, out_ptr=out.data_ptr(),
                           logdet_ptr=ld.data_ptr(), nthreads=1)  # fmt: skip
    with pytest.raises(ValueError, match="logdet"):
        B._C.rq_spline_cpu(**kw, out_ptr=out.data_ptr(), logdet_ptr=0, nthreads=1)
    with pytest.raises(ValueError, match="nthreads"):
        B._C.rq_spline_cpu(**kw, out_ptr=out.data_ptr(), logdet_ptr=ld.data_ptr(), nthreads=0)
    with pytest.raises(ValueError, match="widths"):  # the pointer check in Python
        S._kernel_args(x, w[:, :2], h, d, None, opts, False)
    with pytest.raises(ValueError, match="heights"):  # the op's own checks still come first
        S.rq_spline(x, w, h[:, :2], d)


@pytest.mark.cuda
def test_native_cuda_matches_cpu():
    x, _, w, h, d = _edge_inputs(8, n=64, seed=2)
    for op in (S.rq_spline, S.rq_spline_inverse):
        res = []
        for dev in ("cpu", "cuda"):
            ins = [t.to(dev).requires_grad_(True) for t in (x, w, h, d)]
            y, ld = _native(op, *ins)
            res.append([t.cpu() for t in (y, ld, *torch.autograd.grad(y.sum() + ld.sum(), ins))])
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_native_custom_ops_compile_and_opcheck(monkeypatch):
    # the custom-op path (torch.compile) against the eager autograd.Function path, which the
    # tests above check against the reference
    x, _, w, h, d = _edge_inputs(4, n=10, d=3, seed=11, dtype=torch.float32)
    opts = S.check_spline_options(4, 3.0)
    for inverse in (False, True):
        torch.library.opcheck(
            S._spline_fwd_op, (x, w, h, d, None, *opts, inverse),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )  # fmt: skip

    def f(x, w, h, d):
        y, ld = S.rq_spline(x, w, h, d)
        z, ld2 = S.rq_spline_inverse(y * 0.9, w, h, d)
        return z.sum() + ld.sum() + ld2.sum()

    fastflow.set_backend("native")
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    calls = []
    real = S._native_bwd
    monkeypatch.setattr(S, "_native_bwd", lambda *a: calls.append(1) or real(*a))
    ins = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    out = compiled(*ins)
    g = torch.autograd.grad(out, ins)
    assert len(calls) == 2  # the compiled graph's backward ran the kernel (both ops)
    ins_r = [t.clone().requires_grad_(True) for t in (x, w, h, d)]
    out_r = f(*ins_r)
    g_r = torch.autograd.grad(out_r, ins_r)
    torch.testing.assert_close(out, out_r)
    for a, b in zip(g, g_r):
        torch.testing.assert_close(a, b)
