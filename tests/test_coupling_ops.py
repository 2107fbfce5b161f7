"""Fused coupling ops: native kernels against the pure-PyTorch reference."""

import pytest
import torch

import fastflow
from fastflow.ops import coupling as C

pytestmark = pytest.mark.skipif(not fastflow.native_available("cpu"), reason="no native build")


@pytest.fixture(autouse=True)
def _native_backend():
    # these tests are about the kernels: run them even when FASTFLOW_BACKEND=reference is set
    # (conftest restores the previous backend afterwards)
    fastflow.set_backend("native")


SHAPES = [(1, 1), (3, 17), (5, 3, 7, 5), (2, 4, 1, 9)]
SCALES = ["softclamp", "glow", "identity"]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _inputs(shape, dtype, seed=0, device="cpu", scale=1.5):
    g = torch.Generator().manual_seed(seed)
    x, raw, t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale for _ in range(3))
    return [v.to(device=device, dtype=dtype) for v in (x, raw, t)]


def _close(a, b, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * 10)


def _with_backend(name, fn):
    fastflow.set_backend(name)
    try:
        return fn()
    finally:
        fastflow.set_backend("auto")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("scale_fn", SCALES)
@pytest.mark.parametrize("masked", [False, True])
def test_native_matches_reference(shape, dtype, scale_fn, masked):
    x, raw, t = _inputs(shape, dtype, seed=hash((shape, scale_fn)) % 1000)
    mask = (torch.rand(shape[1:]) > 0.5) if masked else None
    kw = dict(scale_fn=scale_fn, clamp=1.7, mask=mask)
    for fwd, ref in [
        (C.affine_coupling, C.reference_affine_coupling),
        (C.affine_coupling_inverse, C.reference_affine_coupling_inverse),
    ]:
        y, ld = fwd(x, raw, t, **kw)
        y_ref, ld_ref = ref(x, raw, t, **kw)
        assert y.dtype == dtype and y.shape == x.shape
        assert ld.shape == (shape[0],)
        assert ld.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        _close(y, y_ref, dtype)
        # log-dets are accumulated in fp32 even for bf16: compare against the fp32 reference
        _close(ld, ld_ref, torch.float32 if dtype != torch.float64 else dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("clamp", [0.7, 3.0, 87.0, 150.0])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_clamp_tiles_match_reference(dtype, clamp, masked):
    # the CPU soft clamp runs tiles of 256 elements in two loops, with exp's range handling
    # skipped for clamp <= 87: several tiles and a partial one, both sides of that bound, wide raw
    x, raw, t = _inputs((3, 2 * 256 + 37), dtype, seed=7, scale=1.0)
    raw = raw * min(clamp, 20.0)  # |s| stays below fp32's exp overflow for clamp = 150
    mask = (
        (torch.rand(x.shape[1:], generator=torch.Generator().manual_seed(1)) > 0.3)
        if masked
        else None
    )
    kw = dict(scale_fn="softclamp", clamp=clamp, mask=mask)
    for fwd, ref in [
        (C.affine_coupling, C.reference_affine_coupling),
        (C.affine_coupling_inverse, C.reference_affine_coupling_inverse),
    ]:
        leaves = [v.clone().requires_grad_() for v in (x, raw, t)]
        y, ld = fwd(*leaves, **kw)
        gy = torch.randn_like(y)
        g = torch.autograd.grad((y * gy).sum() + ld.sum(), leaves)
        leaves_ref = [v.double().clone().requires_grad_() for v in (x, raw, t)]
        y_ref, ld_ref = ref(*leaves_ref, **kw)
        g_ref = torch.autograd.grad((y_ref * gy.double()).sum() + ld_ref.sum(), leaves_ref)
        rel = 1e-12 if dtype == torch.float64 else 3e-6
        scale = y_ref.abs().max().item()
        torch.testing.assert_close(y.double(), y_ref, rtol=rel, atol=rel * scale)
        torch.testing.assert_close(
            ld.double(), ld_ref, rtol=rel * 10, atol=rel * clamp * x.shape[1]
        )
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(
                a.double(), b, rtol=rel * 10, atol=rel * 10 * b.abs().max().item()
            )


@pytest.mark.parametrize("masked", [False, True])
def test_additive_matches_reference(masked):
    x, _, t = _inputs((4, 3, 5, 2), torch.float32)
    mask = torch.tensor([1.0, 0.0, 1.0]).view(3, 1, 1) if masked else None
    y, ld = C.additive_coupling(x, t, mask=mask)
    y_ref, _ = C.reference_additive_coupling(x, t, mask=mask)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(ld, torch.zeros(4))
    x2, _ = C.additive_coupling_inverse(y, t, mask=mask)
    torch.testing.assert_close(x2, x)


def test_float16_runs_and_matches():
    x, raw, t = _inputs((3, 40), torch.float16, scale=1.0)
    y, ld = C.affine_coupling(x, raw, t)
    y_ref, ld_ref = C.reference_affine_coupling(x, raw, t)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-4)


def test_fast_fp32_math_is_accurate_over_a_wide_range():
    # the kernels use their own vectorizable exp/tanh/log1p for fp32: check them far from 0 too
    raw = torch.linspace(-60, 60, 20001).view(1, -1)
    x, t = torch.ones_like(raw), torch.zeros_like(raw)
    for scale_fn in SCALES:
        if scale_fn == "identity":
            r = raw.clamp(-80, 80)
        else:
            r = raw
        y, ld = C.affine_coupling(x, r, t, scale_fn=scale_fn, clamp=3.0)
        y_ref, _ = C.reference_affine_coupling(
            x.double(), r.double(), t.double(), scale_fn=scale_fn, clamp=3.0
        )
        torch.testing.assert_close(y.double(), y_ref, rtol=5e-7, atol=1e-37)  # a few ulp


def test_nonfinite_inputs_propagate():
    x, raw, t = _inputs((2, 5), torch.float32)
    x[0, 1] = float("nan")
    raw[1, 2] = float("nan")
    y, ld = C.affine_coupling(x, raw, t)
    assert torch.isnan(y[0, 1]) and torch.isnan(y[1, 2]) and torch.isnan(ld[1])
    assert torch.isfinite(ld[0])


@pytest.mark.parametrize("scale_fn", SCALES)
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck_native_fp64(scale_fn, masked):
    x, raw, t = (v.requires_grad_() for v in _inputs((3, 2, 3), torch.float64, scale=0.8))
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]]) if masked else None
    kw = dict(scale_fn=scale_fn, clamp=1.3, mask=mask)
    assert torch.autograd.gradcheck(lambda a, b, c: C.affine_coupling(a, b, c, **kw), (x, raw, t))
    assert torch.autograd.gradcheck(
        lambda a, b, c: C.affine_coupling_inverse(a, b, c, **kw), (x, raw, t)
    )
    assert torch.autograd.gradcheck(lambda a, c: C.additive_coupling(a, c, mask=mask)[0], (x, t))
    assert torch.autograd.gradcheck(
        lambda a, c: C.additive_coupling_inverse(a, c, mask=mask)[0], (x, t)
    )


@pytest.mark.parametrize("scale_fn", SCALES)
def test_native_gradients_match_reference_fp32(scale_fn):
    x, raw, t = _inputs((4, 3, 6, 5), torch.float32)
    mask = torch.rand(3, 6, 5) > 0.3
    gy, gl = torch.randn(4, 3, 6, 5), torch.randn(4)
    grads = {}
    for backend in ("native", "reference"):
        for inverse in (False, True):
            fastflow.set_backend(backend)
            ins = [v.clone().requires_grad_() for v in (x, raw, t)]
            fn = C.affine_coupling_inverse if inverse else C.affine_coupling
            y, ld = fn(*ins, scale_fn=scale_fn, mask=mask)
            torch.autograd.backward((y, ld), (gy, gl))
            grads[backend, inverse] = [v.grad for v in ins]
    for inverse in (False, True):
        for a, b in zip(grads["native", inverse], grads["reference", inverse]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale_fn", SCALES)
def test_round_trip(scale_fn):
    x, raw, t = _inputs((7, 3, 4, 4), torch.float32)
    y, ld = C.affine_coupling(x, raw, t, scale_fn=scale_fn)
    x2, ld2 = C.affine_coupling_inverse(y, raw, t, scale_fn=scale_fn)
    torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld2, -ld)


def test_logdet_matches_autograd_jacobian():
    # the coupling as a map of the full vector (a, b) -> (a, b * exp(s(a)) + t(a))
    torch.manual_seed(3)
    d = 4
    Ws, Wt = torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)

    def f(v):
        a, b = v[:d], v[d:]
        y, _ = C.affine_coupling(b[None], (Ws @ a)[None], (Wt @ a)[None], scale_fn="glow")
        return torch.cat([a, y[0]])

    v = torch.randn(2 * d, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(f, v)
    _, ld = C.affine_coupling(v[d:][None], (Ws @ v[:d])[None], (Wt @ v[:d])[None], scale_fn="glow")
    torch.testing.assert_close(ld[0], torch.linalg.slogdet(jac)[1])


def test_opcheck_every_op():
    x, raw, t = _inputs((3, 5), torch.float32)
    mask = (torch.rand(5) > 0.5).to(torch.uint8)
    gl = torch.randn(3)
    for m in (None, mask):
        for args in [(x, raw, t, m, 0, 2.0), (x, raw, t, m, 1, 2.0), (x, raw, t, m, 2, 2.0)]:
            torch.library.opcheck(torch.ops.fastflow.affine_coupling_fwd.default, args)
            torch.library.opcheck(torch.ops.fastflow.affine_coupling_inv.default, args)
        torch.library.opcheck(
            torch.ops.fastflow.affine_coupling_bwd.default, (x, raw, m, t, gl, 0, 2.0)
        )
        torch.library.opcheck(
            torch.ops.fastflow.affine_coupling_inv_bwd.default, (x, raw, m, t, gl, 1, 2.0)
        )
        for inverse in (False, True):
            torch.library.opcheck(torch.ops.fastflow.additive_coupling.default, (x, t, m, inverse))


def test_torch_compile_fullgraph():
    x, raw, t = _inputs((3, 4, 5), torch.float32)

    def step(x, raw, t):
        y, ld = C.affine_coupling(x, raw, t, scale_fn="softclamp")
        z, ld2 = C.affine_coupling_inverse(y * 2.0, raw, t)
        return z, ld + ld2

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    ins = [v.clone().requires_grad_() for v in (x, raw, t)]
    out, ld = compiled(*ins)
    (out.sum() + ld.sum()).backward()
    ref_ins = [v.clone().requires_grad_() for v in (x, raw, t)]
    out_ref, ld_ref = step(*ref_ins)
    (out_ref.sum() + ld_ref.sum()).backward()
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(ld, ld_ref)
    for a, b in zip(ins, ref_ins):
        torch.testing.assert_close(a.grad, b.grad)


def test_non_contiguous_inputs_give_correct_answers():
    x, raw, t = _inputs((6, 8), torch.float32)
    xs, rs, ts = x.t(), raw.t(), t.t()  # [8, 6] views
    y, ld = C.affine_coupling(xs, rs, ts)
    y_ref, ld_ref = C.reference_affine_coupling(xs.contiguous(), rs.contiguous(), ts.contiguous())
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)


def test_empty_batch_gives_empty_result():
    x = torch.randn(0, 5)
    y, ld = C.affine_coupling(x, x.clone(), x.clone())
    assert y.shape == (0, 5) and ld.shape == (0,)


def test_backend_reference_is_used_when_forced():
    x, raw, t = _inputs((2, 3), torch.float64)
    y_native, _ = C.affine_coupling(x, raw, t)
    fastflow.set_backend("reference")
    y_ref, _ = C.affine_coupling(x, raw, t)
    torch.testing.assert_close(y_native, y_ref)
    with pytest.raises(ValueError, match="backend"):
        fastflow.set_backend("fast")


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda x: (x, x[:, :2], x), ValueError, "raw_scale must have the shape"),
        (lambda x: (x, x, x.double()), TypeError, "shift has dtype"),
        (lambda x: (x[0], x[0], x[0]), ValueError, "x must have at least 2 dims"),
        (lambda x: (x.int(), x.int(), x.int()), TypeError, "x must be float32"),
        (lambda x: (x, x[None], x), ValueError, "raw_scale must have the shape"),
        (lambda x: ([1.0], x, x), TypeError, "x must be a torch.Tensor"),
        (lambda x: (x, x.to("meta"), x), ValueError, "raw_scale is on meta"),
    ],
)
def test_bad_input_raises_clear_errors(make, err, match):
    x = torch.randn(3, 4)
    with pytest.raises(err, match=match):
        C.affine_coupling(*make(x))


def test_bad_options_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="scale_fn"):
        C.affine_coupling(x, x, x, scale_fn="exp")
    with pytest.raises(ValueError, match="clamp"):
        C.affine_coupling(x, x, x, clamp=0.0)
    with pytest.raises(ValueError, match="clamp"):
        C.affine_coupling(x, x, x, clamp=float("nan"))
    with pytest.raises(ValueError, match="mask"):
        C.affine_coupling(x, x, x, mask=torch.ones(5))


def test_kernel_rechecks_sizes():
    from fastflow import _backend as B

    x = torch.zeros(2, 3)
    p = x.data_ptr()

    def call(ptr=p, dtype=0, x_stride=3):
        B._C.coupling_forward_cpu(
            dtype=dtype, mode=0, clamp=2.0, n=2, m=3, x_ptr=ptr, x_stride=x_stride, raw_ptr=ptr,
            raw_stride=3, shift_ptr=ptr, shift_stride=3, mask_ptr=0, y_ptr=ptr, logdet_ptr=ptr,
            nthreads=1,
        )  # fmt: skip

    call()  # valid
    with pytest.raises(ValueError, match="null pointer"):
        call(ptr=0)
    with pytest.raises(ValueError, match="dtype"):
        call(dtype=9)
    with pytest.raises(ValueError, match="batch stride"):
        call(x_stride=2)
    with pytest.raises(TypeError):  # a name the kernel does not take
        B._C.coupling_forward_cpu(dtype=0, mode=0, clamp=2.0, n=2, m=3, s_x=3)


@pytest.mark.parametrize("shape", [(4, 10), (3, 8, 5, 2), (1, 6)])
def test_batch_strided_views_are_read_in_place(shape):
    # the halves of a conditioner output h = net(x_a) are views with a larger batch stride
    g = torch.Generator().manual_seed(1)
    h = torch.randn(shape[0], 2 * shape[1], *shape[2:], generator=g, requires_grad=True)
    x = torch.randn(shape, generator=g, requires_grad=True)
    raw, t = h.chunk(2, dim=1)
    assert shape[0] == 1 or not raw.is_contiguous()
    gy, gl = torch.randn(shape, generator=g), torch.randn(shape[0], generator=g)
    results = {}
    for backend in ("native", "reference"):
        fastflow.set_backend(backend)
        for inverse in (False, True):
            x.grad = h.grad = None
            fn = C.affine_coupling_inverse if inverse else C.affine_coupling
            y, ld = fn(x, raw, t, scale_fn="glow")
            torch.autograd.backward((y, ld), (gy, gl))
            results[backend, inverse] = (y.detach(), ld.detach(), x.grad, h.grad)
    for inverse in (False, True):
        for a, b in zip(results["native", inverse], results["reference", inverse]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    fastflow.set_backend("auto")
    y, _ = C.additive_coupling(x.detach(), t.detach())
    torch.testing.assert_close(y, x.detach() + t.detach())


@pytest.mark.parametrize("m", [1, 7, 16, 32, 33])
@pytest.mark.parametrize("scale_fn", SCALES)
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("threads", [1, 2])
def test_short_samples_in_blocks(m, scale_fn, strided, threads, set_threads):
    # samples of m <= 32 run in blocks of whole samples (csrc/coupling_cpu.cpp, kPackMax), the
    # batch-strided halves copied into the block: many blocks, a partial last one, both threads'
    # ranges (n m above the parallel grain at m >= 16); m = 33 is the per-sample path beside it.
    # All four kernels (forward, inverse and their backwards) against fp64 autograd of the
    # reference.
    set_threads(threads)
    n = 40_000 // m + 3
    g = torch.Generator().manual_seed(m)
    h = torch.randn(n, 2 * m, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, m, generator=g, dtype=torch.float64)
    gy, gl = torch.randn(n, m, generator=g, dtype=torch.float64), torch.randn(n, generator=g)
    out = {}
    for dtype in (torch.float32, torch.float64):
        hh = h.to(dtype).requires_grad_()
        x = x0.to(dtype).requires_grad_()
        raw, t = hh.chunk(2, dim=1) if strided else (hh[:, :m].contiguous(), hh[:, m:].contiguous())
        assert raw.is_contiguous() != strided
        for name, fn in (
            ("fwd", C.affine_coupling),
            ("inv", C.affine_coupling_inverse),
            ("ref_fwd", C.reference_affine_coupling),
            ("ref_inv", C.reference_affine_coupling_inverse),
        ):
            x.grad = hh.grad = None
            y, ld = fn(x, raw, t, scale_fn=scale_fn, clamp=1.7)
            torch.autograd.backward((y, ld), (gy.to(dtype), gl.to(ld.dtype)))
            out[dtype, name] = [v.detach().double() for v in (y, ld, x.grad, hh.grad)]
    for kind in ("fwd", "inv"):
        ref = out[torch.float64, "ref_" + kind]
        for got, want in zip(out[torch.float64, kind], ref):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        for got, want in zip(out[torch.float32, kind], ref):
            torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5 * m)


@pytest.mark.parametrize("op", ["affine", "inverse", "additive"])
def test_no_grad_call_skips_the_autograd_node(op):
    # nothing to differentiate: the kernel runs without the autograd node, same values; with a
    # leaf that needs a gradient (grad mode on) the node is there
    x, raw, t = _inputs((6, 5), torch.float32)
    call = {
        "affine": lambda x, r, t: C.affine_coupling(x, r, t),
        "inverse": lambda x, r, t: C.affine_coupling_inverse(x, r, t),
        "additive": lambda x, r, t: C.additive_coupling(x, t),
    }[op]
    y0, ld0 = call(x, raw, t)
    assert y0.grad_fn is None and not y0.requires_grad
    tg = t.clone().requires_grad_()
    with torch.no_grad():
        y1, ld1 = call(x, raw, tg)
    assert y1.grad_fn is None
    y2, ld2 = call(x, raw, tg)
    assert y2.grad_fn is not None
    for a, b in ((y0, y2), (ld0, ld2), (y1, y2), (ld1, ld2)):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 17), (64, 16, 32, 32)])
def test_cuda_matches_reference(dtype, shape):
    x, raw, t = _inputs(shape, dtype, device="cuda")
    mask = torch.rand(shape[1:], device="cuda") > 0.5
    for scale_fn in SCALES:
        for fwd, ref in [
            (C.affine_coupling, C.reference_affine_coupling),
            (C.affine_coupling_inverse, C.reference_affine_coupling_inverse),
        ]:
            for m in (None, mask):
                y, ld = fwd(x, raw, t, scale_fn=scale_fn, mask=m)
                y_ref, ld_ref = ref(x, raw, t, scale_fn=scale_fn, mask=m)
                _close(y, y_ref, dtype)
                torch.testing.assert_close(ld.double(), ld_ref.double(), rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_gradcheck_and_side_stream():
    x, raw, t = (v.requires_grad_() for v in _inputs((3, 2, 3), torch.float64, device="cuda"))
    assert torch.autograd.gradcheck(lambda a, b, c: C.affine_coupling(a, b, c), (x, raw, t))
    assert torch.autograd.gradcheck(lambda a, b, c: C.affine_coupling_inverse(a, b, c), (x, raw, t))
    xs, rs, ts = _inputs((256, 8, 32, 32), torch.float32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y, ld = C.affine_coupling(xs, rs, ts)
    torch.cuda.current_stream().wait_stream(side)
    y_ref, ld_ref = C.reference_affine_coupling(xs, rs, ts)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_compile_reduce_overhead():
    x, raw, t = _inputs((8, 4, 8, 8), torch.float32, device="cuda")
    f = torch.compile(
        lambda a, b, c: C.affine_coupling(a, b, c), mode="reduce-overhead", fullgraph=True
    )
    for _ in range(3):
        y, ld = f(x, raw, t)
    y_ref, ld_ref = C.reference_affine_coupling(x, raw, t)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
def test_cuda_mixed_devices_raise():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="raw_scale is on cuda"):
        C.affine_coupling(x, x.cuda(), x)


def test_isa_variants_match_reference(cpu_isa):
    # every SIMD variant the CPU has (the cpu_isa fixture, conftest.py: FASTFLOW_CPU_ISA caps the
    # kernels' choice), so the baseline and AVX2 copies are tested on this machine too
    from fastflow import _backend as B

    isa = cpu_isa
    assert B._C.cpu_isa() == isa
    torch.manual_seed(0)
    for dtype, tol in [(torch.float32, 2e-5), (torch.float64, 1e-10), (torch.bfloat16, 2e-2)]:
        x, raw, t = (torch.randn(3, 5, 7, 3).to(dtype) for _ in range(3))
        for scale_fn in SCALES:
            for mask in (None, torch.rand(5, 7, 3) > 0.5):
                for fwd, ref in [
                    (C.affine_coupling, C.reference_affine_coupling),
                    (C.affine_coupling_inverse, C.reference_affine_coupling_inverse),
                ]:
                    y, ld = fwd(x, raw, t, scale_fn=scale_fn, mask=mask)
                    y2, ld2 = ref(x, raw, t, scale_fn=scale_fn, mask=mask)
                    torch.testing.assert_close(y.double(), y2.double(), rtol=tol, atol=10 * tol)
                    torch.testing.assert_close(ld.double(), ld2.double(), rtol=1e-4, atol=1e-4)
    xs, rs, ts = (torch.randn(2, 9, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: C.affine_coupling(a, b, c), (xs, rs, ts))
    assert torch.autograd.gradcheck(
        lambda a, b, c: C.affine_coupling_inverse(a, b, c), (xs, rs, ts)
    )
