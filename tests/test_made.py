"""MADE and the single-pass (degree walk) inverse: native kernel vs the naive D-pass loop."""

import pytest
import torch

import fastflow
from fastflow import _backend as B
from fastflow.nn.autoregressive import InverseAutoregressive, MaskedAffineAutoregressive
from fastflow.nn.made import MADE
from fastflow.ops import made as M

native = pytest.mark.skipif(not fastflow.native_available("cpu"), reason="needs fastflow._C")


def naive_inverse(layer, u, context=None):
    """Independent spec in original coordinates: D passes of the MADE module itself."""
    made = layer.made
    x = torch.zeros_like(u)
    for i in made.order.tolist():
        out = made(x, context)
        s = layer.clamp * torch.tanh(out[:, 1, i] / layer.clamp)
        x = x.clone()
        x[:, i] = u[:, i] * torch.exp(s) + out[:, 0, i]
    out = made(x, context)
    return x, (layer.clamp * torch.tanh(out[:, 1] / layer.clamp)).sum(1)


def random_pack(d, hidden, c=0, gen=None, dtype=torch.float64):
    """Random weights, a random order and random hidden degrees in [0, D-1] (degree 0 included)."""
    sizes = [d, *hidden]
    ws = [
        torch.randn(sizes[i + 1], sizes[i], generator=gen, dtype=dtype) / sizes[i] ** 0.5
        for i in range(len(hidden))
    ]
    ws.append(torch.randn(2 * d, hidden[-1], generator=gen, dtype=dtype) / hidden[-1] ** 0.5)
    bs = [0.3 * torch.randn(w.shape[0], generator=gen, dtype=dtype) for w in ws]
    in_deg = torch.randperm(d, generator=gen) + 1
    hd = [torch.randint(0, d, (h,), generator=gen) for h in hidden]
    cw = torch.randn(hidden[0], c, generator=gen, dtype=dtype) if c else None
    return M.pack_made(ws, bs, in_deg, hd, cw)


@native
@pytest.mark.parametrize("d", [1, 2, 3, 17, 65])
@pytest.mark.parametrize("hidden", [(7,), (13, 9), (5, 6, 7)])
@pytest.mark.parametrize("c", [0, 3])
def test_walk_equals_naive_fp64(d, hidden, c):
    gen = torch.Generator().manual_seed(d * 100 + len(hidden) * 10 + c)
    p = random_pack(d, hidden, c, gen)
    n = 37
    u = torch.randn(n, d, generator=gen, dtype=torch.float64)
    ctx = torch.randn(n, c, generator=gen, dtype=torch.float64) if c else None
    x0, l0 = M.reference_made_affine_inverse(u, p, ctx)
    x1, l1 = M.made_affine_inverse(u, p, ctx)
    x2, l2 = M.torch_degree_walk(u, p, ctx)
    torch.testing.assert_close(x1, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x2, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l2, l0, rtol=1e-10, atol=1e-10)


@native
@pytest.mark.parametrize("d", [1, 4, 33])
@pytest.mark.parametrize("order", ["natural", "reversed", "random"])
def test_module_walk_equals_naive_module_loop(d, order):
    torch.manual_seed(d)
    layer = MaskedAffineAutoregressive(
        d, hidden=(19, 11), context=2, order=order, hidden_degrees="random", seed=d
    ).double()
    u, c = torch.randn(70, d, dtype=torch.float64), torch.randn(70, 2, dtype=torch.float64)
    x, ld = layer.inverse(u, c)
    x0, ld0 = naive_inverse(layer, u, c)
    torch.testing.assert_close(x, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld0, rtol=1e-10, atol=1e-10)


@native
@pytest.mark.parametrize("activation", ["relu", "tanh", "elu"])
@pytest.mark.parametrize("scale_fn", ["softclamp", "glow", "identity"])
def test_activations_and_scales(activation, scale_fn):
    gen = torch.Generator().manual_seed(3)
    p = random_pack(9, (21, 8), 2, gen)
    u = torch.randn(41, 9, generator=gen, dtype=torch.float64)
    c = torch.randn(41, 2, generator=gen, dtype=torch.float64)
    kw = dict(activation=activation, scale_fn=scale_fn, clamp=1.5)
    x0, l0 = M.reference_made_affine_inverse(u, p, c, **kw)
    x1, l1 = M.made_affine_inverse(u, p, c, **kw)
    torch.testing.assert_close(x1, x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)


@native
def test_fp32_and_16bit():
    gen = torch.Generator().manual_seed(5)
    p64 = random_pack(20, (64, 48), 0, gen)
    p32 = M.PackedMADE(
        p64.order,
        [w.float() for w in p64.weights],
        [b.float() for b in p64.biases],
        None,
        p64.bounds,
        p64.bounds_list,
    )
    u = torch.randn(100, 20, generator=gen, dtype=torch.float64)
    x0, l0 = M.reference_made_affine_inverse(u, p64)
    x1, l1 = M.made_affine_inverse(u.float(), p32)
    assert x1.dtype == torch.float32 and l1.dtype == torch.float32
    torch.testing.assert_close(x1.double(), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(l1.double(), l0, rtol=1e-4, atol=1e-4)
    for dt in (torch.bfloat16, torch.float16):
        pw = M.PackedMADE(
            p32.order,
            [w.to(dt) for w in p32.weights],
            [b.to(dt) for b in p32.biases],
            None,
            p32.bounds,
            p32.bounds_list,
        )
        x2, l2 = M.made_affine_inverse(u.to(dt), pw)
        assert x2.dtype == dt and l2.dtype == torch.float32
        assert torch.isfinite(x2.float()).all()


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("cls", [MaskedAffineAutoregressive, InverseAutoregressive])
def test_round_trip(backend, cls):
    fastflow.set_backend(backend)
    torch.manual_seed(0)
    layer = cls(6, hidden=(24, 24), context=3, order="random", seed=2).double()
    x, c = torch.randn(13, 6, dtype=torch.float64), torch.randn(13, 3, dtype=torch.float64)
    z, ld = layer(x, c)
    x2, ld2 = layer.inverse(z, c)
    torch.testing.assert_close(x2, x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld2, -ld, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [MaskedAffineAutoregressive, InverseAutoregressive])
def test_logdet_matches_autograd_jacobian(cls):
    torch.manual_seed(1)
    layer = cls(4, hidden=(16, 16), context=2, activation="tanh", order="random", seed=3).double()
    x, c = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    for fn in (layer.forward, layer.inverse):
        _, ld = fn(x, c)
        for n in range(3):
            jac = torch.autograd.functional.jacobian(
                lambda v, fn=fn, n=n: fn(v[None], c[n : n + 1])[0][0], x[n]
            )
            torch.testing.assert_close(ld[n], torch.linalg.slogdet(jac)[1], rtol=1e-9, atol=1e-9)


def test_autoregressive_property():
    torch.manual_seed(2)
    d = 7
    made = MADE(d, hidden=(30, 20), order="random", hidden_degrees="random", seed=4).double()
    layer = MaskedAffineAutoregressive(d, hidden=(30, 20), order="random", seed=4).double()
    rank = torch.empty(d, dtype=torch.long)
    rank[made.order] = torch.arange(d)
    x = torch.randn(d, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda v: made(v[None])[0], x)  # [P, D, D]
    after_or_self = rank[None, :] >= rank[:, None]  # [i, j]: j is i itself or after i
    assert (jac[:, after_or_self] == 0).all()
    assert (jac[:, ~after_or_self] != 0).any()
    rank2 = torch.empty(d, dtype=torch.long)
    rank2[layer.made.order] = torch.arange(d)
    jx = torch.autograd.functional.jacobian(lambda v: layer.inverse(v[None])[0][0], x)
    after = rank2[None, :] > rank2[:, None]
    assert (jx[after] == 0).all()
    assert (jx[~after] != 0).any()


def test_gradcheck_density_direction():
    torch.manual_seed(3)
    layer = MaskedAffineAutoregressive(3, hidden=(5, 4), context=2).double()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    c = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w = [p.detach().clone().requires_grad_(True) for p in layer.made.weights]
    made = layer.made

    def f(x, c, *w):
        mw = [wi * m for wi, m in zip(w, made.masks())]
        return M.made_affine_forward(x, mw, list(made.biases), "relu", c, made.context_weight)

    assert torch.autograd.gradcheck(f, (x, c, *w))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_gradcheck_inverse(backend):
    fastflow.set_backend(backend)
    gen = torch.Generator().manual_seed(4)
    d, hidden = 4, (6, 5)
    sizes = [d, *hidden]
    ws = [
        torch.randn(sizes[i + 1], sizes[i], generator=gen, dtype=torch.float64) * 0.5
        for i in range(2)
    ] + [torch.randn(2 * d, 5, generator=gen, dtype=torch.float64) * 0.5]
    bs = [0.2 * torch.randn(w.shape[0], generator=gen, dtype=torch.float64) for w in ws]
    cw = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    in_deg = torch.tensor([3, 1, 4, 2])
    hd = [torch.randint(0, d, (h,), generator=gen) for h in hidden]
    u = torch.randn(3, d, generator=gen, dtype=torch.float64)
    c = torch.randn(3, 2, generator=gen, dtype=torch.float64)
    leaves = [t.requires_grad_(True) for t in (u, c, cw, *ws, *bs)]

    def f(u, c, cw, *wb):
        p = M.pack_made(list(wb[:3]), list(wb[3:]), in_deg, hd, cw)
        return M.made_affine_inverse(u, p, c, activation="tanh")

    assert torch.autograd.gradcheck(f, tuple(leaves))


@native
def test_opcheck():
    gen = torch.Generator().manual_seed(6)
    p = random_pack(5, (8, 7), 2, gen)
    us = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    init = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    args = (us, init, p.weights, p.biases, p.bounds, p.bounds_list, 1, 0, 3.0)
    torch.library.opcheck(torch.ops.fastflow.made_affine_inverse.default, args)


def test_made_degrees_and_orders():
    made = MADE(5, hidden=(12,), order="reversed")
    assert made.order.tolist() == [4, 3, 2, 1, 0]
    assert sorted(made.hidden_degrees_0.unique().tolist()) == [1, 2, 3, 4]
    made1 = MADE(1, hidden=(4,), context=2)
    assert (made1.hidden_degrees_0 == 0).all()
    out = made1(torch.randn(3, 1), torch.randn(3, 2))
    assert out.shape == (3, 2, 1)
    a = MADE(6, order="random", hidden_degrees="random", seed=7)
    b = MADE(6, order="random", hidden_degrees="random", seed=7)
    assert torch.equal(a.input_degrees, b.input_degrees)
    assert torch.equal(a.hidden_degrees_1, b.hidden_degrees_1)
    assert MADE(4, params_per_dim=5)(torch.randn(2, 4)).shape == (2, 5, 4)


def test_bad_input():
    layer = MaskedAffineAutoregressive(4, hidden=(8,), context=3)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 4\]"):
        layer(torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"u must have shape \[N, 4\]"):
        layer.inverse(torch.randn(2, 3), torch.randn(2, 3))
    with pytest.raises(ValueError, match="context is required"):
        layer.inverse(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"context must have shape \[N, 3\]"):
        layer.inverse(torch.randn(2, 4), torch.randn(2, 2))
    with pytest.raises(ValueError, match=r"context must have shape \[N, 3\]"):
        layer(torch.randn(2, 4), torch.randn(3, 3))
    with pytest.raises(ValueError, match="takes no context"):
        MaskedAffineAutoregressive(4, hidden=(8,))(torch.randn(2, 4), torch.randn(2, 3))
    with pytest.raises(ValueError, match="activation"):
        MADE(3, activation="gelu")
    with pytest.raises(ValueError, match="permutation"):
        MADE(3, order=[0, 0, 1])
    with pytest.raises(ValueError, match="hidden"):
        MADE(3, hidden=())
    with pytest.raises(ValueError, match="scale_fn"):
        MaskedAffineAutoregressive(3, scale_fn="exp")
    p = random_pack(3, (4,), 0, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="u must have 3 features"):
        M.made_affine_inverse(torch.randn(2, 4, dtype=torch.float64), p)
    with pytest.raises(ValueError, match="input_degrees"):
        M.pack_made(
            [torch.randn(4, 2), torch.randn(4, 4)],
            [torch.zeros(4)] * 2,
            torch.tensor([1, 1]),
            [torch.zeros(4, dtype=torch.long)],
        )
    with pytest.raises(ValueError, match="hidden_degrees"):
        M.pack_made(
            [torch.randn(4, 2), torch.randn(4, 4)],
            [torch.zeros(4)] * 2,
            torch.tensor([1, 2]),
            [torch.full((4,), 2)],
        )


@native
def test_native_rejects_bad_tables():
    p = random_pack(3, (4,), 0, torch.Generator().manual_seed(0))
    us = torch.randn(2, 3, dtype=torch.float64)
    x, ld = torch.empty_like(us), us.new_empty(2)
    ws = torch.empty(4096, dtype=torch.uint8)
    wp = [w.data_ptr() for w in p.weights]
    bp = [b.data_ptr() for b in p.biases]

    def call(bounds, hidden=(4,), nbytes=4096, dtype=1):
        B._C.made_affine_inverse_cpu(
            dtype=dtype, act=0, mode=0, clamp=3.0, n=2, d=3, hidden=list(hidden),
            u_ptr=us.data_ptr(), init_ptr=0, weight_ptrs=wp, bias_ptrs=bp, bounds=bounds,
            x_ptr=x.data_ptr(), logdet_ptr=ld.data_ptr(), workspace_ptr=ws.data_ptr(),
            workspace_bytes=nbytes, nthreads=1,
        )  # fmt: skip

    call(p.bounds_list)  # valid
    with pytest.raises(ValueError, match="non-decreasing"):
        call([2, 1, 4, 4])
    with pytest.raises(ValueError, match="degree <= d - 1"):
        call([0, 1, 2, 4])
    with pytest.raises(ValueError, match="entries"):
        call([0, 4, 4])
    with pytest.raises(ValueError, match="workspace too small"):
        call(p.bounds_list, nbytes=16)
    with pytest.raises(ValueError, match="float32 or float64"):
        call(p.bounds_list, dtype=2)


@pytest.mark.cuda
def test_cuda_walk_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    for d, hidden, c in [(1, (5,), 0), (17, (40, 33), 3), (65, (129,), 0), (64, (512, 512), 2)]:
        p = random_pack(d, hidden, c, gen)
        u = torch.randn(300, d, generator=gen, dtype=torch.float64)
        ctx = torch.randn(300, c, generator=gen, dtype=torch.float64) if c else None
        x0, l0 = M.made_affine_inverse(u, p, ctx)
        pc = M.PackedMADE(
            p.order.cuda(),
            [w.cuda() for w in p.weights],
            [b.cuda() for b in p.biases],
            None if p.context_weight is None else p.context_weight.cuda(),
            p.bounds.cuda(),
            p.bounds_list,
        )
        side = torch.cuda.Stream()
        with torch.cuda.stream(side):
            x1, l1 = M.made_affine_inverse(u.cuda(), pc, None if ctx is None else ctx.cuda())
        side.synchronize()
        torch.testing.assert_close(x1.cpu(), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(l1.cpu(), l0, rtol=1e-9, atol=1e-9)
        pf = M.PackedMADE(
            pc.order,
            [w.float() for w in pc.weights],
            [b.float() for b in pc.biases],
            None if pc.context_weight is None else pc.context_weight.float(),
            pc.bounds,
            pc.bounds_list,
        )
        x2, _ = M.made_affine_inverse(
            u.cuda().float(), pf, None if ctx is None else ctx.cuda().float()
        )
        torch.testing.assert_close(x2.cpu().double(), x0, rtol=1e-3, atol=1e-3)


@native
def test_cpu_kernel_isa_variants(cpu_isa):
    """Every SIMD copy of the walk the CPU has (picked at run time; the cpu_isa fixture in
    conftest.py caps the choice) agrees with the reference."""
    from fastflow import _backend as B

    isa = cpu_isa
    assert B._C.cpu_isa() == isa
    gen = torch.Generator().manual_seed(9)
    for d, hidden, c in [(1, (3,), 0), (17, (13, 9), 3), (40, (70,), 0)]:
        p = random_pack(d, hidden, c, gen)
        u = torch.randn(45, d, generator=gen, dtype=torch.float64)
        ctx = torch.randn(45, c, generator=gen, dtype=torch.float64) if c else None
        x0, l0 = M.reference_made_affine_inverse(u, p, ctx)
        x1, l1 = M.made_affine_inverse(u, p, ctx)
        torch.testing.assert_close(x1, x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
        p32 = M.PackedMADE(
            p.order,
            [w.float() for w in p.weights],
            [b.float() for b in p.biases],
            None if c == 0 else p.context_weight.float(),
            p.bounds,
            p.bounds_list,
        )
        x2, _ = M.made_affine_inverse(u.float(), p32, None if ctx is None else ctx.float())
        torch.testing.assert_close(x2.double(), x0, rtol=1e-4, atol=1e-4)


@native
@pytest.mark.parametrize("lookahead", ["1", "5", "32"])
def test_lookahead_blocks(lookahead, monkeypatch):
    """The walk with and without lookahead blocks agrees with the reference."""
    monkeypatch.setenv("FASTFLOW_MADE_LOOKAHEAD", lookahead)
    gen = torch.Generator().manual_seed(10)
    for d, hidden, c in [(2, (9,), 1), (23, (40, 17, 30), 2), (65, (64,), 0)]:
        p = random_pack(d, hidden, c, gen)
        u = torch.randn(50, d, generator=gen, dtype=torch.float64)
        ctx = torch.randn(50, c, generator=gen, dtype=torch.float64) if c else None
        x0, l0 = M.reference_made_affine_inverse(u, p, ctx)
        x1, l1 = M.made_affine_inverse(u, p, ctx)
        torch.testing.assert_close(x1, x0, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(l1, l0, rtol=1e-10, atol=1e-10)
