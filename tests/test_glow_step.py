"""ActNorm, InvConv1x1 and GlowStep: round trips, log-dets against autograd Jacobians, init."""

import copy
import os
import tempfile

import pytest
import torch
import torch.multiprocessing as mp

import fastflow
from fastflow.nn.actnorm import ActNorm
from fastflow.nn.glow_step import GlowConditioner, GlowStep
from fastflow.nn.invconv import InvConv1x1


def jacobian_logdet(module, x):
    """log|det dz/dx| of one sample by autograd (fp64)."""
    shape = x.shape

    def f(v):
        return module(v.view(1, *shape[1:]))[0].flatten()

    J = torch.autograd.functional.jacobian(f, x[:1].flatten())
    return torch.linalg.slogdet(J)[1]


def randomize_conditioner(step, std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in step.conditioner.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


# ----------------------------------------------------------------------------------------------
# ActNorm


@pytest.mark.parametrize("shape", [(64, 5), (16, 3, 4, 5)])
def test_actnorm_init_gives_zero_mean_unit_variance(shape):
    layer = ActNorm(shape[1]).double()
    x = (
        torch.randn(shape, dtype=torch.float64)
        * torch.linspace(0.5, 4, shape[1]).view(1, -1, *([1] * (len(shape) - 2)))
        + 3.0
    )
    z, logdet = layer(x)
    dims = [0] + list(range(2, len(shape)))
    torch.testing.assert_close(
        z.mean(dims), torch.zeros(shape[1], dtype=torch.float64), atol=1e-10, rtol=0
    )
    torch.testing.assert_close(
        z.var(dims, unbiased=False), torch.ones(shape[1], dtype=torch.float64), atol=1e-5, rtol=0
    )
    pixels = 1 if len(shape) == 2 else shape[2] * shape[3]
    assert logdet.shape == (shape[0],)
    torch.testing.assert_close(logdet, (layer.log_scale.sum() * pixels).expand(shape[0]))
    assert bool(layer.initialized)
    # the second batch does not re-initialise
    before = layer.log_scale.detach().clone()
    layer(x * 10)
    assert torch.equal(before, layer.log_scale.detach())


def test_actnorm_round_trip_and_jacobian():
    layer = ActNorm(3).double()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64) * 2 + 1
    z, ld = layer(x)
    x2, ld2 = layer.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    torch.testing.assert_close(jacobian_logdet(layer, x), ld[0])


def test_actnorm_eval_and_no_data_init_do_not_initialise():
    x = torch.randn(4, 3) * 5
    layer = ActNorm(3).eval()
    z, ld = layer(x)
    assert torch.equal(z, x) and not bool(layer.initialized)
    layer2 = ActNorm(3, data_init=False)
    z, ld = layer2(x)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(4))


def test_actnorm_state_dict_round_trip():
    layer = ActNorm(4)
    layer(torch.randn(32, 4) * 3 + 1)
    fresh = ActNorm(4)
    fresh.load_state_dict(layer.state_dict())
    assert bool(fresh.initialized)
    x = torch.randn(5, 4)
    torch.testing.assert_close(fresh(x)[0], layer(x)[0])  # fresh did not re-initialise on x


def test_actnorm_single_value_per_channel():
    layer = ActNorm(3)
    z, _ = layer(torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(z, torch.zeros(1, 3))
    assert torch.isfinite(layer.log_scale).all()


def test_actnorm_bad_inputs():
    layer = ActNorm(3)
    with pytest.raises(ValueError, match="x has 4 channels"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match="channels must be"):
        ActNorm(0)


def _dist_worker(rank, world, path, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    x = torch.randn(8 + 4 * rank, 3, 2, 2, dtype=torch.float64) * (rank + 1) + rank
    layer = ActNorm(3).double()
    layer(x)
    torch.save(
        {"x": x, "log_scale": layer.log_scale.detach(), "bias": layer.bias.detach()},
        f"{out}.{rank}",
    )
    dist.destroy_process_group()


def test_actnorm_distributed_init_uses_global_statistics():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "res")
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "store"), out), nprocs=2, join=True)
        res = [torch.load(f"{out}.{r}") for r in range(2)]
    torch.testing.assert_close(res[0]["log_scale"], res[1]["log_scale"], rtol=0, atol=0)
    torch.testing.assert_close(res[0]["bias"], res[1]["bias"], rtol=0, atol=0)
    ref = ActNorm(3).double()
    ref.initialize(torch.cat([r["x"] for r in res]))
    torch.testing.assert_close(res[0]["log_scale"], ref.log_scale.detach())
    torch.testing.assert_close(res[0]["bias"], ref.bias.detach())


# ----------------------------------------------------------------------------------------------
# InvConv1x1


@pytest.mark.parametrize("lu", [True, False])
@pytest.mark.parametrize("shape", [(5, 4), (3, 5, 3, 4)])
def test_invconv_round_trip_and_logdet(lu, shape):
    torch.manual_seed(0)
    conv = InvConv1x1(shape[1], lu=lu).double()
    with torch.no_grad():  # move away from the orthogonal init (log-det 0)
        for p in conv.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if lu:
            conv.log_s.copy_(torch.linspace(-0.3, 0.5, shape[1]))
        else:
            conv.weight.mul_(1.3)
    x = torch.randn(shape, dtype=torch.float64)
    z, ld = conv(x)
    x2, ld2 = conv.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    W = conv.weight_and_inverse()[0]
    pixels = 1 if len(shape) == 2 else shape[2] * shape[3]
    assert abs(float(ld[0].detach())) > 1e-2
    torch.testing.assert_close(ld, (torch.linalg.slogdet(W)[1] * pixels).expand(shape[0]))
    torch.testing.assert_close(jacobian_logdet(conv, x), ld[0])


def test_invconv_orthogonal_init_and_state_dict():
    conv = InvConv1x1(6)
    W, W_inv, ld = conv.weight_and_inverse()
    torch.testing.assert_close(W @ W.T, torch.eye(6), atol=1e-5, rtol=0)
    assert abs(float(ld.detach())) < 1e-5
    assert "P" in dict(conv.named_buffers()) and "sign_s" in dict(conv.named_buffers())
    assert {n for n, _ in conv.named_parameters()} == {"L", "U", "log_s"}
    other = InvConv1x1(6)
    other.load_state_dict(conv.state_dict())
    x = torch.randn(2, 6, 3, 3)
    torch.testing.assert_close(other(x)[0], conv(x)[0])


def test_invconv_bad_inputs():
    conv = InvConv1x1(3)
    with pytest.raises(ValueError, match="x has 4 channels"):
        conv(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match="non-finite"):
        with torch.no_grad():
            conv.log_s.fill_(float("inf"))
        conv(torch.randn(2, 3))
    plain = InvConv1x1(3, lu=False)
    with torch.no_grad():
        plain.weight.zero_()
    with pytest.raises(ValueError, match="singular"):
        plain(torch.randn(2, 3))


# ----------------------------------------------------------------------------------------------
# GlowStep


def make_step(c=3, coupling="affine", lu=True, fused=True, seed=0, **kw):
    torch.manual_seed(seed)
    step = GlowStep(c, hidden=6, coupling=coupling, lu=lu, fused=fused, **kw).double()
    randomize_conditioner(step, seed=seed)
    with torch.no_grad():
        for p in step.invconv.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return step


@pytest.mark.parametrize("coupling", ["affine", "additive"])
@pytest.mark.parametrize("lu", [True, False])
def test_glow_step_round_trip_and_jacobian(coupling, lu):
    step = make_step(3, coupling, lu)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64) * 2 + 0.5
    z, ld = step(x)  # initialises ActNorm
    assert step.actnorm._initialized
    x2, ld2 = step.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    assert ld.shape == (4,) and ld.dtype == torch.float64
    torch.testing.assert_close(jacobian_logdet(step, x), ld[0])


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_glow_step_fused_equals_unfused(backend):
    fastflow.set_backend(backend)
    a = make_step(4, fused=True, seed=1)
    b = make_step(4, fused=False, seed=1)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3 - 1
    za, lda = a(x)
    zb, ldb = b(x)
    torch.testing.assert_close(za, zb)
    torch.testing.assert_close(lda, ldb)
    (za.square().sum() + lda.sum()).backward()
    (zb.square().sum() + ldb.sum()).backward()
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
    torch.testing.assert_close(a.inverse(za)[0], b.inverse(zb)[0])


def test_glow_step_native_equals_reference():
    step = make_step(5, seed=2)
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64)
    step(x)  # initialise
    xr = x.clone().requires_grad_()
    z, ld = step(xr)
    (z.sin().sum() + ld.sum()).backward()
    grads = [xr.grad] + [p.grad.clone() for p in step.parameters()]
    step.zero_grad()
    fastflow.set_backend("reference")
    xr2 = x.clone().requires_grad_()
    z2, ld2 = step(xr2)
    (z2.sin().sum() + ld2.sum()).backward()
    torch.testing.assert_close(z, z2)
    torch.testing.assert_close(ld, ld2)
    for g, g2 in zip(grads, [xr2.grad] + [p.grad for p in step.parameters()]):
        torch.testing.assert_close(g, g2)


def test_glow_step_gradcheck():
    step = make_step(2, seed=3)
    x = torch.randn(2, 2, 2, 2, dtype=torch.float64)
    step(x)  # initialise ActNorm, then check the gradient with respect to the input
    xr = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: step(v), (xr,))


def test_glow_step_state_dict_round_trip():
    step = make_step(4, seed=4)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    step(x)
    other = GlowStep(4, hidden=6).double()
    other.load_state_dict(step.state_dict())
    assert other.actnorm._initialized
    x2 = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(other(x2), step(x2))


def test_glow_step_float32_and_bfloat16_close_to_float64():
    step = make_step(4, seed=5)
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    z64, ld64 = step(x)
    z32, ld32 = step.float()(x.float())
    assert ld32.dtype == torch.float32
    torch.testing.assert_close(z32.double(), z64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld32.double(), ld64, rtol=1e-4, atol=1e-4)
    zb, ldb = step.bfloat16()(x.bfloat16())
    assert zb.dtype == torch.bfloat16 and ldb.dtype == torch.float32
    torch.testing.assert_close(zb.double(), z64, rtol=0.05, atol=0.1)


def test_glow_step_compiles_fullgraph():
    step = make_step(4, seed=6).float()
    x = torch.randn(2, 4, 4, 4)
    step(x)  # initialise ActNorm eagerly (data-dependent)
    compiled = torch.compile(step, fullgraph=True)
    xr = x.clone().requires_grad_()
    z, ld = compiled(xr)
    (z.square().sum() + ld.sum()).backward()
    xe = x.clone().requires_grad_()
    ze, lde = step(xe)
    (ze.square().sum() + lde.sum()).backward()
    torch.testing.assert_close(z, ze, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld, lde, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-4, atol=1e-4)


def test_glow_conditioner_starts_at_zero_and_splits_in_halves():
    net = GlowConditioner(2, 3, hidden=5)
    raw, shift = net(torch.randn(3, 2, 4, 4))
    assert raw.shape == shift.shape == (3, 3, 4, 4)
    assert raw.abs().max() == 0 and shift.abs().max() == 0
    # halves of one convolution: every sample contiguous, read in place by the fused coupling
    assert raw[0].is_contiguous() and shift[0].is_contiguous()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_()
    x = torch.randn(3, 2, 4, 4)
    raw, shift = net(x)
    # one convolution: raw scales first, then shifts (fp64 network as the reference: the
    # channels-last convolutions round differently from the default layout's)
    h = copy.deepcopy(net.net).double()(x.double())
    torch.testing.assert_close(raw.double(), h[:, :3], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(shift.double(), h[:, 3:], rtol=1e-5, atol=1e-4)
    assert raw[0].is_contiguous() and shift[0].is_contiguous()
    # the same weights in the default layout: the same values
    plain = GlowConditioner(2, 3, hidden=5, channels_last=False)
    assert type(plain.net) is torch.nn.Sequential
    plain.load_state_dict(net.state_dict())
    raw2, shift2 = plain(x)
    torch.testing.assert_close(raw2.double(), h[:, :3], rtol=1e-5, atol=1e-4)
    assert GlowConditioner(2, 3, hidden=5, affine=False)(x).shape == (3, 3, 4, 4)


@pytest.mark.parametrize("form", ["tuple", "interleaved"])
def test_glow_step_custom_conditioner_outputs(form):
    class Cond(torch.nn.Module):
        def forward(self, xa):
            raw, shift = torch.sin(xa), 0.5 * xa
            if form == "tuple":
                return raw, shift
            return torch.stack([shift, raw], 2).flatten(1, 2)  # even: shift, odd: raw

    step = GlowStep(4, conditioner=Cond()).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    z, ld = step(x)
    y = step.invconv(step.actnorm(x)[0])[0]
    expected = y[:, 2:] * torch.sigmoid(torch.sin(y[:, :2]) + 2) + 0.5 * y[:, :2]
    torch.testing.assert_close(z[:, 2:], expected)
    torch.testing.assert_close(step.inverse(z)[0], x)


def test_glow_step_bad_inputs():
    step = GlowStep(4, hidden=4)
    with pytest.raises(ValueError, match="image"):
        step(torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="x has 3 channels"):
        step(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="context must be None"):
        step(torch.randn(2, 4, 2, 2), context=torch.randn(2, 1))
    with pytest.raises(ValueError, match="channels must be >= 2"):
        GlowStep(1)
    with pytest.raises(ValueError, match="coupling must be"):
        GlowStep(4, coupling="spline")
    with pytest.raises(ValueError, match="scale_fn"):
        GlowStep(4, scale_fn="exp")
