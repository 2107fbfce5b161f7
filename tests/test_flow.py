"""Flow, base distributions, the torch.distributions view, diagnostics and image helpers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fastflow.diagnostics import check_invertibility
from fastflow.distributions import ConditionalDiagonalGaussian, DiagonalGaussian, StandardNormal
from fastflow.flow import Flow, FlowDistribution
from fastflow.images import bits_per_dim, dequantize
from fastflow.nn.coupling import AffineCoupling
from fastflow.nn.permutation import RandomPermutation
from fastflow.nn.shape import Flatten, Split, Squeeze


def _randomize(module: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _vector_flow(context_features=None, base=None):
    ts = []
    for i in range(3):
        ts += [
            AffineCoupling(3, hidden=8, parity=i % 2, context_features=context_features),
            RandomPermutation(3, seed=i),
        ]
    return _randomize(Flow(ts, base or StandardNormal(3))).double()


def _multiscale_flow():
    ts = [
        AffineCoupling((2, 4, 4), "checkerboard", hidden=4),
        Squeeze(),
        AffineCoupling((8, 2, 2), "channel", hidden=4),
        Split((8, 2, 2)),
        AffineCoupling((4, 2, 2), "channel", parity=1, hidden=4),
    ]
    return _randomize(Flow(ts, DiagonalGaussian((4, 2, 2)))).double()


def test_log_prob_is_base_plus_logdet_and_matches_change_of_variables():
    flow = _vector_flow()
    x = torch.randn(4, 3, dtype=torch.float64)
    z, ld = flow(x)
    torch.testing.assert_close(flow.log_prob(x), StandardNormal(3).log_prob(z) + ld)
    # independent check: full Jacobian of the composed map
    for i in range(4):
        jac = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[i])
        expected = (
            torch.distributions.Normal(0.0, 1.0).log_prob(z[i]).sum() + torch.linalg.slogdet(jac)[1]
        )
        torch.testing.assert_close(flow.log_prob(x[i : i + 1])[0], expected)


def test_standard_normal_matches_torch():
    base = StandardNormal((2, 3))
    z = torch.randn(5, 2, 3)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((1, 2))
    torch.testing.assert_close(base.log_prob(z), expected)
    assert base.sample(4, temperature=0.0).abs().max() == 0


def test_diagonal_gaussian_matches_torch_and_learns():
    base = _randomize(DiagonalGaussian(3))
    z = torch.randn(6, 3)
    expected = torch.distributions.Normal(base.loc, base.log_scale.exp()).log_prob(z).sum(1)
    torch.testing.assert_close(base.log_prob(z), expected)
    base.log_prob(z).sum().backward()
    assert base.loc.grad is not None and base.log_scale.grad is not None
    torch.manual_seed(0)
    s = base.sample(20000)
    torch.testing.assert_close(s.mean(0), base.loc.detach(), atol=0.05, rtol=0)


def test_conditional_base():
    base = _randomize(ConditionalDiagonalGaussian(2, context_features=3, hidden=8))
    c = torch.randn(4, 3)
    z = torch.randn(4, 2)
    h = base.net(c)
    loc, log_scale = h.chunk(2, 1)
    expected = torch.distributions.Normal(loc, log_scale.exp()).log_prob(z).sum(1)
    torch.testing.assert_close(base.log_prob(z, c), expected)
    assert not torch.allclose(base.log_prob(z, c), base.log_prob(z, c + 1))
    assert base.sample(None, c).shape == (4, 2)
    assert base.sample(5, c[:1]).shape == (5, 2)
    with pytest.raises(ValueError, match="context"):
        base.log_prob(z)
    with pytest.raises(ValueError, match="rows"):
        base.sample(3, c)


def test_sample_and_log_prob_consistent_multiscale():
    flow = _multiscale_flow()
    torch.manual_seed(0)
    for temperature in (1.0, 0.5):
        x, lp = flow.sample_and_log_prob(5, temperature=temperature)
        assert x.shape == (5, 2, 4, 4)
        torch.testing.assert_close(flow.log_prob(x), lp)


def test_multiscale_latents_round_trip():
    flow = _multiscale_flow()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    z, ld, latents = flow.forward_with_latents(x)
    assert z.shape == (3, 4, 2, 2) and [t.shape for t in latents] == [(3, 4, 2, 2)]
    x2, ld2 = flow.inverse(z, latents=latents)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    # reconstructing from given latents is deterministic; from sampled ones it is not
    assert not torch.allclose(flow.inverse(z)[0], x)


def test_distribution_view():
    flow = _vector_flow()
    d = flow.distribution()
    assert isinstance(d, FlowDistribution) and isinstance(d, torch.distributions.Distribution)
    assert d.event_shape == (3,) and d.batch_shape == ()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    lp = d.log_prob(x)
    assert lp.shape == (2, 5)
    torch.testing.assert_close(lp, flow.log_prob(x.reshape(10, 3)).reshape(2, 5))
    assert d.sample((4, 2)).shape == (4, 2, 3)
    r = d.rsample((3,))
    assert r.requires_grad
    # event shape inferred for a flow built without one
    plain = Flow([Flatten((2, 2))], StandardNormal(4))
    assert plain.event_shape == (2, 2)
    assert plain.distribution().event_shape == (2, 2)


def test_distribution_view_with_context():
    flow = _vector_flow(context_features=2)
    c = torch.randn(4, 2, dtype=torch.float64)
    d = flow.distribution(c)
    assert d.batch_shape == (4,) and d.event_shape == (3,)
    s = d.sample((5,))
    assert s.shape == (5, 4, 3)
    x = torch.randn(4, 3, dtype=torch.float64)
    torch.testing.assert_close(d.log_prob(x), flow.log_prob(x, c))
    torch.testing.assert_close(d.log_prob(s)[2], flow.log_prob(s[2], c))


def test_conditional_flow_context_matters_and_sampling():
    base = ConditionalDiagonalGaussian(3, context_features=2, hidden=8)
    flow = _vector_flow(context_features=2, base=base)
    c = torch.randn(6, 2, dtype=torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64)
    assert not torch.allclose(flow.log_prob(x, c), flow.log_prob(x, c + 1))
    xs, lp = flow.sample_and_log_prob(None, c)
    assert xs.shape == (6, 3)
    torch.testing.assert_close(flow.log_prob(xs, c), lp)
    assert flow.sample(7, c[:1]).shape == (7, 3)


def test_rsample_is_differentiable_wrt_parameters():
    flow = _vector_flow()
    x = flow.rsample(8)
    x.square().sum().backward()
    assert all(p.grad is not None for p in flow.parameters())


def test_flow_errors():
    flow = _vector_flow()
    with pytest.raises(ValueError, match="n must be"):
        flow.sample(-1)
    with pytest.raises(ValueError, match="n is required"):
        flow.sample()
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, temperature=float("nan"))
    with pytest.raises(TypeError, match="x must be"):
        flow.log_prob([[0.0, 0.0, 0.0]])
    with pytest.raises(TypeError, match="base"):
        Flow([], object())
    with pytest.raises(ValueError, match="event shape"):
        flow.distribution().log_prob(torch.zeros(2, 4))


def test_check_invertibility_reports_each_layer_and_finds_bad_one():
    flow = _multiscale_flow()
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    report = check_invertibility(flow, x)
    assert [r.name for r in report] == [
        "AffineCoupling",
        "Squeeze",
        "AffineCoupling",
        "Split",
        "AffineCoupling",
    ]
    assert all(r.max_error < 1e-12 and r.max_logdet_sum < 1e-12 for r in report)
    assert "Split" in str(report)

    class Leaky(nn.Module):  # an inverse that is off by 1e-3
        def forward(self, x, context=None):
            return 2 * x, torch.full((x.shape[0],), math.log(2.0) * x[0].numel(), dtype=x.dtype)

        def inverse(self, z, context=None):
            return z / 2 + 1e-3, torch.zeros(z.shape[0], dtype=z.dtype)

    bad = Flow([flow.transforms[0], Leaky()], StandardNormal((2, 4, 4))).double()
    report = check_invertibility(bad, x)
    assert report.worst().index == 1
    assert report[1].max_error == pytest.approx(1e-3, rel=1e-6)
    assert report[1].max_logdet_sum == pytest.approx(32 * math.log(2.0))


def test_dequantize():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=g)
    y = dequantize(x, generator=g)
    assert y.dtype == torch.float32 and y.min() >= 0 and y.max() < 1
    assert torch.equal((y * 256).floor().to(torch.uint8), x)
    top = dequantize(torch.full((1000,), 255, dtype=torch.uint8))
    assert top.max() < 1
    # floats in [0, 1]: same levels
    y2 = dequantize(x.double() / 255, generator=g)
    assert y2.dtype == torch.float64 and torch.equal((y2 * 256).floor(), x.double())
    y3 = dequantize(torch.randint(0, 32, (10,)), bits=5)
    assert y3.max() < 1
    with pytest.raises(ValueError, match="outside"):
        dequantize(torch.tensor([256]))
    with pytest.raises(ValueError, match="bits"):
        dequantize(x, bits=0)


def test_bits_per_dim():
    lp = torch.tensor([-100.0, 50.0])
    d = 3 * 4 * 4
    expected = -(lp - d * 8 * math.log(2)) / (d * math.log(2))
    torch.testing.assert_close(bits_per_dim(lp, (3, 4, 4)), expected)
    torch.testing.assert_close(bits_per_dim(lp, d, bits=5), expected - 3)
    with pytest.raises(ValueError):
        bits_per_dim(lp, 0)
