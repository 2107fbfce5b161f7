"""MAF and IAF models: densities, sampling, gradients."""

import math

import pytest
import torch

import fastflow
from fastflow.models.maf import IAF, MAF


@pytest.mark.parametrize("cls", [MAF, IAF])
@pytest.mark.parametrize("context", [0, 2])
def test_log_prob_matches_change_of_variables(cls, context):
    torch.manual_seed(0)
    flow = cls(3, layers=3, hidden=(12, 12), context=context, permutation="random", seed=1)
    flow = flow.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, context, dtype=torch.float64) if context else None
    lp = flow.log_prob(x, c)
    for n in range(4):
        cn = None if c is None else c[n : n + 1]
        jac = torch.autograd.functional.jacobian(lambda v, cn=cn: flow(v[None], cn)[0][0], x[n])
        z = flow(x[n : n + 1], cn)[0][0]
        expected = -0.5 * (z * z).sum() - 1.5 * math.log(2 * math.pi)
        expected = expected + torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(lp[n], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls", [MAF, IAF])
def test_sample_and_log_prob_consistent(cls):
    torch.manual_seed(1)
    flow = cls(5, layers=2, hidden=(16,), context=3).double()
    c = torch.randn(3, dtype=torch.float64)
    x, lp = flow.sample_and_log_prob(9, context=c)
    assert x.shape == (9, 5) and lp.shape == (9,)
    torch.testing.assert_close(flow.log_prob(x, c.expand(9, 3)), lp, rtol=1e-9, atol=1e-9)
    cs = torch.randn(9, 3, dtype=torch.float64)
    assert flow.sample(9, context=cs).shape == (9, 5)


def test_maf_sample_matches_reference_backend():
    torch.manual_seed(2)
    flow = MAF(7, layers=3, hidden=(20, 20)).double()
    torch.manual_seed(5)
    x_native = flow.sample(11)
    fastflow.set_backend("reference")
    torch.manual_seed(5)
    x_ref = flow.sample(11)
    torch.testing.assert_close(x_native, x_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [MAF, IAF])
def test_training_gradients(cls):
    torch.manual_seed(3)
    flow = cls(4, layers=2, hidden=(8, 8), context=1)
    x, c = torch.randn(16, 4), torch.randn(16, 1)
    loss = -flow.log_prob(x, c).mean()
    loss.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    flow.zero_grad()
    xs, lp = flow.rsample_and_log_prob(6, context=torch.randn(1))
    (xs.sum() + lp.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in flow.parameters())


def test_rsample_gradient_matches_reference():
    torch.manual_seed(4)
    flow = MAF(3, layers=2, hidden=(6,)).double()

    def grads():
        flow.zero_grad()
        torch.manual_seed(9)
        x, lp = flow.rsample_and_log_prob(5)
        (x.square().sum() + lp.sum()).backward()
        return [p.grad.clone() for p in flow.parameters()]

    g_native = grads()
    fastflow.set_backend("reference")
    g_ref = grads()
    for a, b in zip(g_native, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


def test_models_are_flows_with_a_distribution_view():
    torch.manual_seed(6)
    for cls in (MAF, IAF):
        flow = cls(3, layers=2, hidden=(8,), permutation="random", seed=1).double()
        x = torch.randn(5, 3, dtype=torch.float64)
        dist = flow.distribution()
        torch.testing.assert_close(dist.log_prob(x), flow.log_prob(x))
        assert dist.sample((4,)).shape == (4, 3)
        assert flow.sample(6, temperature=0.5).shape == (6, 3)


def test_bad_input():
    flow = MAF(4, layers=2, hidden=(8,), context=2)
    with pytest.raises(ValueError, match=r"shape \[N, 4\]"):
        flow.log_prob(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="context is required"):
        flow.sample(3)
    with pytest.raises(ValueError, match=r"context must have shape \[N, 2\]"):
        flow.sample(3, context=torch.randn(3))
    with pytest.raises(ValueError, match="layers"):
        MAF(3, layers=0)
    with pytest.raises(ValueError, match="permutation"):
        IAF(3, permutation="shuffle")


def test_compile_log_prob():
    torch.manual_seed(6)
    flow = MAF(5, layers=2, hidden=(16, 16))
    x = torch.randn(8, 5)
    expected = flow.log_prob(x)
    compiled = torch.compile(flow.log_prob, fullgraph=True)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-5, atol=1e-5)
