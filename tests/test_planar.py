"""PlanarFlow, RadialFlow and BatchNormFlow: constraints, solved directions against the closed-form
maps, log-dets against fp64 autograd Jacobians, gradients, batch-norm statistics and errors."""

from __future__ import annotations

import pytest
import torch

from fastflow.nn.planar import BatchNormFlow, PlanarFlow, RadialFlow

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(m, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _jac_logdet(f, z):
    """Per-sample log|det df/dz| by fp64 autograd."""
    out = []
    for i in range(z.shape[0]):
        j = torch.autograd.functional.jacobian(lambda v: f(v[None])[0][0], z[i])
        out.append(torch.linalg.slogdet(j)[1])
    return torch.stack(out)


@pytest.mark.parametrize("cls", [PlanarFlow, RadialFlow])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_map_and_solved_inverse(cls, seed):
    torch.manual_seed(seed)
    layer = _randomize(cls(4), scale=2.0, seed=seed).double()
    z = 2 * torch.randn(7, 4, dtype=F64)
    x, ld = layer.inverse(z)
    torch.testing.assert_close(ld, _jac_logdet(layer.inverse, z), atol=1e-10, rtol=0)
    z2, ld2 = layer(x)
    torch.testing.assert_close(z2, z, atol=1e-10, rtol=0)
    torch.testing.assert_close(ld2, -ld, atol=1e-10, rtol=0)
    # the solved direction's log-det is its own autograd Jacobian (implicit-rule gradients)
    torch.testing.assert_close(ld2, _jac_logdet(layer.forward, x), atol=1e-8, rtol=0)


def test_planar_constraint_holds_and_near_singular_still_inverts():
    layer = PlanarFlow(3).double()
    with torch.no_grad():
        layer.w.copy_(torch.tensor([1.0, 2.0, -1.0]))
        layer.u.copy_(-10 * layer.w)  # w^T u = -60: u_hat puts w^T u_hat just above -1
        layer.b.fill_(0.3)
    wu = layer.w @ layer.u_hat()
    assert -1 < wu.item() < -0.99
    z = torch.randn(50, 3, dtype=F64)
    x, _ = layer.inverse(z)
    z2, _ = layer(x)
    torch.testing.assert_close(z2, z, atol=1e-7, rtol=0)


def test_planar_gradients_by_implicit_rule_match_finite_differences():
    torch.manual_seed(3)
    layer = _randomize(PlanarFlow(3), seed=3).double()
    x = torch.randn(4, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))
    ps = list(layer.parameters())
    loss = layer(x)[0].square().sum() + layer(x)[1].sum()
    grads = torch.autograd.grad(loss, ps)
    eps = 1e-6
    for p, gr in zip(ps, grads):
        flat = p.detach().view(-1)
        for i in range(flat.numel()):
            with torch.no_grad():
                flat[i] += eps
                up = layer(x)[0].square().sum() + layer(x)[1].sum()
                flat[i] -= 2 * eps
                down = layer(x)[0].square().sum() + layer(x)[1].sum()
                flat[i] += eps
            assert abs((up - down).item() / (2 * eps) - gr.view(-1)[i].item()) < 1e-5


def test_unconstrained_without_inverse_raises():
    p = PlanarFlow(2, constrained=False)
    with torch.no_grad():
        p.w.copy_(torch.tensor([1.0, 0.0]))
        p.u.copy_(torch.tensor([-3.0, 0.0]))
    p.inverse(torch.randn(3, 2))  # the map itself is defined
    with pytest.raises(ValueError, match="not invertible"):
        p(torch.randn(3, 2))
    r = RadialFlow(2, constrained=False)
    with torch.no_grad():
        r.beta_raw.fill_(-2.0)  # alpha = 1, beta = -2 < -alpha
    with pytest.raises(ValueError, match="not invertible"):
        r(torch.randn(3, 2))
    # within the constraint the unconstrained layers invert
    with torch.no_grad():
        r.beta_raw.fill_(-0.5)
    z = torch.randn(3, 2, dtype=F64)
    r = r.double()
    torch.testing.assert_close(r(r.inverse(z)[0])[0], z, atol=1e-10, rtol=0)


def test_batchnorm_statistics_and_modes():
    torch.manual_seed(0)
    bn = BatchNormFlow(3, momentum=0.5).double()
    x = torch.randn(200, 3, dtype=F64) * torch.tensor([1.0, 2.0, 0.5], dtype=F64) + 3
    z, ld = bn(x)
    torch.testing.assert_close(z.mean(0), torch.zeros(3, dtype=F64), atol=1e-10, rtol=0)
    torch.testing.assert_close(
        z.var(0, unbiased=False), torch.ones(3, dtype=F64), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(bn.running_mean, 0.5 * x.mean(0), atol=1e-12, rtol=0)
    exp_var = 0.5 + 0.5 * x.var(0, unbiased=False)
    torch.testing.assert_close(bn.running_var, exp_var, atol=1e-12, rtol=0)
    exp_ld = (-0.5 * torch.log(x.var(0, unbiased=False) + bn.eps)).sum()
    torch.testing.assert_close(ld, exp_ld.expand(200), atol=1e-12, rtol=0)
    # training-mode round trip uses the batch's statistics
    torch.testing.assert_close(bn.inverse(z)[0], x, atol=1e-10, rtol=0)
    # eval: a fixed affine map from the running statistics, per sample
    bn.eval()
    _randomize(bn, 0.3)
    z1, ld1 = bn(x[:1])
    zs, lds = bn(x)
    torch.testing.assert_close(z1, zs[:1])
    torch.testing.assert_close(ld1, _jac_logdet(bn.forward, x[:1]), atol=1e-10, rtol=0)
    torch.testing.assert_close(bn.inverse(zs)[0], x, atol=1e-10, rtol=0)
    # images: per-channel statistics, log-det times the positions
    bi = BatchNormFlow(2)
    img = torch.randn(4, 2, 3, 3)
    _, ldi = bi(img)
    exp = -0.5 * torch.log(img.transpose(0, 1).reshape(2, -1).var(1, unbiased=False) + 1e-5)
    torch.testing.assert_close(ldi, (9 * exp.sum()).expand(4), atol=1e-4, rtol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="features"):
        PlanarFlow(0)
    with pytest.raises(ValueError, match="max_iter"):
        PlanarFlow(2, max_iter=0)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormFlow(2, momentum=0.0)
    with pytest.raises(ValueError, match="eps"):
        BatchNormFlow(2, eps=0)
    with pytest.raises(ValueError, match=r"x must have shape \[N, 3\]"):
        RadialFlow(3)(torch.randn(2, 4))
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        PlanarFlow(3).inverse([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="context"):
        PlanarFlow(3)(torch.randn(2, 3), torch.randn(2, 1))
    with pytest.raises(ValueError, match="at least 2"):
        BatchNormFlow(3)(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"\[N, 3, \.\.\.\]"):
        BatchNormFlow(3)(torch.randn(4, 2))
