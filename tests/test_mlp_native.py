"""The native one-call MLP coupling kernel (fastflow/ops/_mlp_native.py, csrc/mlp_cpu.cpp) against
the pure-PyTorch reference: values, log-dets and autograd gradients, every CPU ISA variant, and
results that do not depend on the thread count."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastflow import _backend as B
from fastflow.ops import _mlp_native as M
from fastflow.ops.mlp_coupling import init_mlp_params, mlp_layout, reference_mlp_affine_coupling

pytestmark = pytest.mark.skipif(B._C is None, reason="needs fastflow._C")

SCALES = ["softclamp", "glow", "identity"]
MODES = {"softclamp": 0, "glow": 1, "identity": 2}
ISAS = ["default", "base", "avx2"]
# (n, D, hidden) crossed; the scale function cycles through the three. Hidden (33, 2): a layer with
# fewer outputs than a vector has lanes (the kernel's dot-product path, with relu)
SIZES = list(itertools.product([1, 3, 17, 300], [2, 3, 17], [(), (9,), (13, 5, 6), (33, 2)]))


def _isa(isa, monkeypatch):
    order = B.CPU_ISA_NAMES
    if isa == "default":
        return
    if order.index(B._C.cpu_isa()) < order.index(isa):
        pytest.skip(f"this CPU has no {isa}")
    monkeypatch.setenv("FASTFLOW_CPU_ISA", isa)
    assert B._C.cpu_isa() == isa


def _setup(n, d, nc, parity, hidden, dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cut = max(1, d // 2)
    da = cut if parity == 0 else d - cut
    lay = mlp_layout((da + nc, *hidden, 2 * (d - da)))
    torch.manual_seed(seed)
    p = (init_mlp_params(lay, zero_last=False) * scale).to(dtype)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    ctx = torch.randn(n, nc, generator=g, dtype=dtype) if nc else None
    return lay, cut, p, x, ctx


def _reference(x, ctx, p, lay, cut, parity, scale_fn, gy, gl):
    """Reference values and gradients, computed in fp64 from the same inputs."""
    xs = x.double().requires_grad_()
    ps = p.double().requires_grad_()
    cs = None if ctx is None else ctx.double().requires_grad_()
    y, ld = reference_mlp_affine_coupling(xs, ps, lay, cut, parity, cs, scale_fn, 2.0)
    torch.autograd.backward((y, ld), (gy.double(), gl.double()))
    xi, ldi = reference_mlp_affine_coupling(
        y.detach(), ps.detach(), lay, cut, parity, None if cs is None else cs.detach(), scale_fn,
        2.0, inverse=True,
    )  # fmt: skip
    return y.detach(), ld.detach(), xs.grad, None if cs is None else cs.grad, ps.grad, xi, ldi


def _close(a, b, dtype):
    tol = dict(rtol=2e-4, atol=2e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("nc", [0, 3])
@pytest.mark.parametrize("parity", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_reference(dtype, parity, nc, isa, monkeypatch):
    _isa(isa, monkeypatch)
    for i, (n, d, hidden) in enumerate(SIZES):
        scale_fn = SCALES[i % 3]
        mode = MODES[scale_fn]
        lay, cut, p, x, ctx = _setup(n, d, nc, parity, hidden, dtype, seed=i)
        g = torch.Generator().manual_seed(100 + i)
        gy = torch.randn(n, d, generator=g, dtype=dtype)
        gl = torch.randn(n, generator=g, dtype=dtype)
        ref = _reference(x, ctx, p, lay, cut, parity, scale_fn, gy, gl)
        y, ld, acts = M.forward(x, ctx, p, lay, cut, parity, mode, 2.0, need_acts=True)
        _close(y, ref[0], dtype)
        _close(ld, ref[1], dtype)
        gx, gctx, gp = M.backward(x, ctx, p, lay, cut, parity, mode, 2.0, acts, gy, gl)
        _close(gx, ref[2], dtype)
        _close(gp, ref[4], dtype)
        if nc:
            _close(gctx, ref[3], dtype)
        else:
            assert gctx is None
        # the inverse of the reference's y
        xi, ldi = M.inverse(ref[0].to(dtype), ctx, p, lay, cut, parity, mode, 2.0)
        _close(xi, ref[5], dtype)
        _close(ldi, ref[6], dtype)
        # without activations: the same values
        y2, ld2, none = M.forward(x, ctx, p, lay, cut, parity, mode, 2.0, need_acts=False)
        assert none is None and torch.equal(y2, y) and torch.equal(ld2, ld)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hidden", [(7, 20), (40, 9)])
def test_acts_hold_the_hidden_activations_and_the_mlp_output(dtype, hidden):
    lay, cut, p, x, ctx = _setup(17, 5, 2, 0, hidden, dtype)
    _, _, acts = M.forward(x, ctx, p, lay, cut, 0, 0, 2.0, need_acts=True)
    shape, cols = M.acts_layout(dtype, 17, lay.sizes)
    pad = 16 if dtype == torch.float32 else 8
    # (4, 7, 20, 6): every layer kept; (4, 40, 9, 6): the first hidden layer (4 * 4 <= 40) is
    # recomputed by the backward, not kept
    kept = [-(-o // pad) * pad for o in lay.sizes[1:]]
    if hidden == (40, 9):
        assert cols[0] is None
        kept = kept[1:]
    else:
        assert all(c is not None for c in cols)
    assert acts.shape == shape == (24, sum(kept))
    h = torch.cat((x[:, :cut], ctx), 1)
    stored = [c for c in cols if c is not None]
    for l, ((wo, o, i), (bo, _)) in enumerate(zip(lay.weights, lay.biases)):
        h = h @ p[wo : wo + o * i].view(o, i).t() + p[bo : bo + o]
        if l < len(lay.weights) - 1:
            h = h.relu()
        if cols[l] is None:
            continue
        off, width = cols[l]
        assert width == o
        want = h.double()
        if l == len(lay.weights) - 1:
            # soft clamp (mode 0, clamp 2): the forward leaves t = tanh(raw / c) in the raw-scale
            # columns (the backward needs only t), the shift columns as they are
            db = o // 2
            want = torch.cat((torch.tanh(want[:, :db] / 2.0), want[:, db:]), 1)
        _close(acts[:17, off : off + o], want, dtype)
        # the padding up to the next kept layer is zero
        k = stored.index(cols[l])
        end = stored[k + 1][0] if k + 1 < len(stored) else shape[1]
        assert torch.equal(acts[:17, off + o : end], torch.zeros(17, end - off - o, dtype=dtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_results_do_not_depend_on_the_thread_count(dtype, isa, monkeypatch):
    _isa(isa, monkeypatch)
    # 300 samples: 7 blocks of 48 (one per gradient group); 2000: 42 blocks in 16 groups
    for n, d, nc, hidden in [(300, 3, 2, (33, 17)), (2000, 6, 0, (20,))]:
        lay, cut, p, x, ctx = _setup(n, d, nc, 1, hidden, dtype)
        gy, gl = torch.randn(n, d, dtype=dtype), torch.randn(n, dtype=dtype)
        outs = []
        for nt in (1, 2, 3):
            y, ld, acts = M.forward(x, ctx, p, lay, cut, 1, 0, 2.0, True, nthreads=nt)
            grads = M.backward(x, ctx, p, lay, cut, 1, 0, 2.0, acts, gy, gl, nthreads=nt)
            xi, ldi = M.inverse(y, ctx, p, lay, cut, 1, 0, 2.0, nthreads=nt)
            # acts rows from n on are scratch
            outs.append([y, ld, acts[:n], *(g for g in grads if g is not None), xi, ldi])
        for other in outs[1:]:
            for a, b in zip(outs[0], other):
                assert torch.equal(a, b)


def test_torch_thread_count_is_the_default():
    lay, cut, p, x, ctx = _setup(500, 4, 0, 0, (16,), torch.float32)
    gy, gl = torch.randn(500, 4), torch.randn(500)
    before = torch.get_num_threads()
    try:
        res = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            y, ld, acts = M.forward(x, ctx, p, lay, cut, 0, 1, 2.0, True)
            res.append((y, ld, *M.backward(x, ctx, p, lay, cut, 0, 1, 2.0, acts, gy, gl)[::2]))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_large_layers_and_round_trip():
    # wider than the register blocks in every direction, several gradient groups
    lay, cut, p, x, ctx = _setup(130, 70, 5, 0, (97, 64), torch.float32, scale=0.5)
    gy, gl = torch.randn(130, 70), torch.randn(130)
    ref = _reference(x, ctx, p, lay, cut, 0, "softclamp", gy, gl)
    y, ld, acts = M.forward(x, ctx, p, lay, cut, 0, 0, 2.0, True)
    gx, gctx, gp = M.backward(x, ctx, p, lay, cut, 0, 0, 2.0, acts, gy, gl)
    for a, b in [(y, ref[0]), (ld, ref[1]), (gx, ref[2]), (gctx, ref[3]), (gp, ref[4])]:
        _close(a, b, torch.float32)
    x2, ld2 = M.inverse(y, ctx, p, lay, cut, 0, 0, 2.0)
    torch.testing.assert_close(x2, x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld2, -ld, rtol=1e-5, atol=1e-5)


def test_empty_batch():
    lay, cut, p, x, ctx = _setup(0, 4, 2, 0, (8,), torch.float64)
    y, ld, acts = M.forward(x, ctx, p, lay, cut, 0, 0, 2.0, True)
    assert y.shape == (0, 4) and ld.shape == (0,) and acts.shape == (0, 8 + 8)
    gx, gctx, gp = M.backward(x, ctx, p, lay, cut, 0, 0, 2.0, acts, y, ld)
    assert gx.shape == (0, 4) and gctx.shape == (0, 2) and torch.equal(gp, torch.zeros_like(p))


def _raw_forward_args(**over):
    lay, cut, p, x, _ = _setup(5, 4, 0, 0, (8,), torch.float32)
    sizes = list(lay.sizes)
    y, ld = torch.empty(5, 4), torch.empty(5)
    acts = torch.empty(B._C.mlp_coupling_acts_shape(dtype=0, n=5, sizes=sizes))
    nbytes = B._C.mlp_coupling_workspace_bytes(dtype=0, n=5, sizes=sizes, nthreads=1)
    ws = torch.empty(nbytes, dtype=torch.uint8)
    args = dict(
        dtype=0, mode=0, clamp=2.0, n=5, d=4, cut=cut, parity=0, n_ctx=0, sizes=sizes,
        x_ptr=x.data_ptr(), ctx_ptr=0, params_ptr=p.data_ptr(), y_ptr=y.data_ptr(),
        logdet_ptr=ld.data_ptr(), acts_ptr=acts.data_ptr(), acts_numel=acts.numel(),
        workspace_ptr=ws.data_ptr(), workspace_bytes=nbytes, nthreads=1,
    )  # fmt: skip
    args.update(over)
    keep = (x, p, y, ld, acts, ws)
    return args, keep


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(dtype=2), "float32 or float64"),
        (dict(mode=3), "mode"),
        (dict(clamp=0.0), "clamp"),
        (dict(clamp=float("inf")), "clamp"),
        (dict(parity=2), "parity"),
        (dict(cut=0), "cut"),
        (dict(cut=4), "cut"),
        (dict(sizes=[2, 8, 6]), "sizes"),
        (dict(sizes=[3, 8, 4]), "sizes"),
        (dict(sizes=[2]), "sizes"),
        (dict(sizes=[2, 0, 4]), "sizes"),
        (dict(n_ctx=1), "sizes"),
        (dict(n=-1), "negative"),
        (dict(nthreads=0), "nthreads"),
        (dict(acts_numel="one short"), "acts"),
        (dict(workspace_bytes=64), "workspace"),
        (dict(workspace_ptr=0), "workspace"),
        (dict(x_ptr=0), "x"),
        (dict(params_ptr=0), "params"),
        (dict(y_ptr=0), "y"),
        (dict(logdet_ptr=0), "logdet"),
    ],
)
def test_cpp_rechecks_sizes(over, match):
    args, keep = _raw_forward_args(**over)
    if args["acts_numel"] == "one short":
        args["acts_numel"] = keep[4].numel() - 1
    with pytest.raises(ValueError, match=match):
        B._C.mlp_coupling_forward_cpu(**args)


def test_cpp_rechecks_backward_and_inverse():
    args, keep = _raw_forward_args()
    B._C.mlp_coupling_forward_cpu(**args)
    gx, gp = torch.empty(5, 4), torch.empty(keep[1].numel())
    gy, gl = torch.randn(5, 4), torch.randn(5)
    common = {k: args[k] for k in ("dtype", "mode", "clamp", "n", "d", "cut", "parity", "n_ctx")}
    bwd = dict(
        common, sizes=args["sizes"], x_ptr=args["x_ptr"], ctx_ptr=0, params_ptr=args["params_ptr"],
        acts_ptr=args["acts_ptr"], acts_numel=args["acts_numel"], grad_y_ptr=gy.data_ptr(),
        grad_logdet_ptr=gl.data_ptr(), grad_x_ptr=gx.data_ptr(), grad_ctx_ptr=0,
        grad_params_ptr=gp.data_ptr(), workspace_ptr=args["workspace_ptr"],
        workspace_bytes=args["workspace_bytes"], nthreads=1,
    )  # fmt: skip
    B._C.mlp_coupling_backward_cpu(**bwd)
    for key, val, match in [
        ("acts_ptr", 0, "acts"),
        ("acts_numel", args["acts_numel"] - 1, "acts"),
        ("grad_params_ptr", 0, "grad_params"),
        ("grad_y_ptr", 0, "grad_y"),
        ("grad_logdet_ptr", 0, "grad_logdet"),
        ("workspace_bytes", 1, "workspace"),
    ]:
        with pytest.raises(ValueError, match=match):
            B._C.mlp_coupling_backward_cpu(**dict(bwd, **{key: val}))
    inv = dict(
        common, sizes=args["sizes"], y_ptr=args["y_ptr"], ctx_ptr=0, params_ptr=args["params_ptr"],
        x_ptr=gx.data_ptr(), logdet_ptr=gl.data_ptr(), workspace_ptr=args["workspace_ptr"],
        workspace_bytes=args["workspace_bytes"], nthreads=1,
    )  # fmt: skip
    B._C.mlp_coupling_inverse_cpu(**inv)
    with pytest.raises(ValueError, match="workspace"):
        B._C.mlp_coupling_inverse_cpu(**dict(inv, workspace_bytes=10))


def test_wrappers_check_what_they_pass():
    lay, cut, p, x, ctx = _setup(5, 4, 2, 0, (8,), torch.float32)
    with pytest.raises(ValueError, match="params"):
        M.forward(x, ctx, p.double(), lay, cut, 0, 0, 2.0, True)
    with pytest.raises(ValueError, match="context"):
        M.forward(x, ctx[:4], p, lay, cut, 0, 0, 2.0, True)
    _, _, acts = M.forward(x, ctx, p, lay, cut, 0, 0, 2.0, True)
    with pytest.raises(ValueError, match="acts"):
        M.backward(x, ctx, p, lay, cut, 0, 0, 2.0, acts[:4], x, x[:, 0])


@pytest.mark.skipif(not hasattr(B._C, "mlp_coupling_forward_cpu"), reason="no native kernels")
def test_opcheck_the_whole_layer_ops():
    """The whole-layer kernels as torch.library ops (what torch.compile calls): schema, fake
    implementations (also at a symbolic batch size), autograd registration."""
    import fastflow.ops.made_density  # noqa: F401  (registers the MADE ops)

    torch.manual_seed(0)
    sizes = [2, 16, 16, 4]
    p = (torch.randn(mlp_layout(sizes).numel) * 0.3).requires_grad_()
    x = torch.randn(7, 4, requires_grad=True)
    for mode in (0, 1, 2):
        torch.library.opcheck(
            torch.ops.fastflow.mlp_coupling_fwd.default, (x, p, sizes, 2, 0, mode, 2.0)
        )
    y, ld, acts = torch.ops.fastflow.mlp_coupling_fwd(x, p, sizes, 2, 1, 0, 2.0)
    g, gl = torch.randn_like(y), torch.randn_like(ld)
    torch.library.opcheck(
        torch.ops.fastflow.mlp_coupling_bwd.default,
        (x.detach(), p.detach(), acts, g, gl, sizes, 2, 1, 0, 2.0),
    )
    msizes = [4, 16, 16, 8]
    mp = (torch.randn(mlp_layout(msizes).numel) * 0.3).requires_grad_()
    torch.library.opcheck(torch.ops.fastflow.made_density_fwd.default, (x, mp, msizes, 0, 2.0))
    u, mld, macts = torch.ops.fastflow.made_density_fwd(x, mp, msizes, 0, 2.0)
    torch.library.opcheck(
        torch.ops.fastflow.made_density_bwd.default,
        (
            x.detach(),
            mp.detach(),
            macts,
            torch.randn_like(u),
            torch.randn_like(mld),
            msizes,
            0,
            2.0,
        ),
    )
    for n in (1, 12, 13, 4097):  # the fake's symbolic formula is the kernel's own
        want = M._acts_shape(0, n, tuple(sizes))
        assert M.acts_shape_symbolic(torch.float32, n, tuple(sizes)) == want


@pytest.mark.skipif(not hasattr(B._C, "mlp_coupling_forward_cpu"), reason="no native kernels")
def test_compiled_models_call_the_kernels_and_match_eager():
    """Under torch.compile the RealNVP and MAF layers call the kernel ops (one graph, no break),
    with eager's values and gradients, also when the batch size changes (dynamic shapes)."""
    import torch._dynamo

    from fastflow.models import MAF, RealNVP

    for model in (RealNVP(4, layers=2, hidden=16), MAF(4, layers=2, hidden=(16, 16))):
        torch.manual_seed(1)
        for q in model.parameters():
            torch.nn.init.normal_(q, std=0.2)
        torch._dynamo.reset()
        seen = []

        def backend(gm, example_inputs, _seen=seen):
            _seen.append(str(gm.graph))
            return gm.forward

        compiled = torch.compile(model.log_prob, backend=backend)
        for n in (5, 9, 13):
            x = torch.randn(n, 4)
            lp0 = model.log_prob(x)
            g0 = torch.autograd.grad(lp0.sum(), list(model.parameters()))
            lp1 = compiled(x)
            g1 = torch.autograd.grad(lp1.sum(), list(model.parameters()))
            torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
            for a, b in zip(g1, g0):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert seen and all(("mlp_coupling_fwd" in s) or ("made_density_fwd" in s) for s in seen)
