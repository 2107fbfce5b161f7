"""Variational dequantization (fastflow.dequantization): q(u|k)'s log-density against the autograd
Jacobian of its sampling map, the variational and importance-weighted bounds against the exact
discrete likelihood of a flow (2-D quadrature over each bin), and fastflow train
--dequantization variational end to end."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.data import DataError
from fastflow.dequantization import (
    VariationalDequantization,
    VariationalDequantizer,
    importance_weighted_bpd,
)
from fastflow.models import RealNVP


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noisy(module, scale=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


@pytest.mark.parametrize("shape", [(2,), (1, 2, 2)])
def test_dequantizer_log_density_is_its_change_of_variables(shape):
    torch.manual_seed(0)
    q = _noisy(VariationalDequantizer(shape, hidden=8, layers=2)).double()
    n, d = 3, math.prod(shape)
    x = torch.rand(n, *shape, dtype=torch.float64) - 0.5
    eps = torch.randn(n, *shape, dtype=torch.float64)
    u, log_q = q.sample(x, eps)
    assert bool(((u > 0) & (u < 1)).all())
    jac = torch.autograd.functional.jacobian(lambda e: q.sample(x, e)[0].reshape(n, d).sum(0), eps)
    jac = jac.reshape(d, n, d).permute(1, 0, 2)
    log_normal = (-0.5 * eps**2 - 0.5 * math.log(2 * math.pi)).reshape(n, -1).sum(1)
    expected = log_normal - torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(log_q, expected, atol=1e-10, rtol=0)


def test_bounds_are_below_the_exact_discrete_log_likelihood():
    # p(y): a perturbed RealNVP on 2-D; P(k) = integral of p over the bin, by quadrature
    levels = 4
    torch.manual_seed(1)
    flow = _noisy(RealNVP(2, layers=2, hidden=8), scale=0.5).double().eval()
    vd = VariationalDequantization(flow, (2,), levels, hidden=8, layers=2).double().eval()
    _noisy(vd.dequantizer, scale=0.3, seed=2)
    k = torch.tensor([[0, 0], [1, 3], [2, 1], [3, 2]])
    m = 120  # midpoint rule, m x m points per bin
    grid = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    gu, gv = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([gu.reshape(-1), gv.reshape(-1)], 1)
    centres = ((k + 0.5) / levels - 0.5).double()
    reps = 4000
    with torch.no_grad():
        for i in range(k.shape[0]):
            y = (k[i].double() + pts) / levels - 0.5
            log_p_bin = torch.logsumexp(flow.log_prob(y), 0) - 2 * math.log(m * levels)
            xs = centres[i : i + 1].expand(reps, 2)
            elbo = vd.log_prob(xs) - 2 * math.log(levels)  # log p(y) - log q(u|k) - D log L
            iw = vd.log_prob_iw(xs[:500], k=64) - 2 * math.log(levels)
            se = elbo.std() / math.sqrt(reps)
            assert elbo.mean() <= log_p_bin + 3 * se, (i, elbo.mean(), log_p_bin)
            assert elbo.mean() < log_p_bin - 1e-3  # a random q leaves a gap (the KL)
            assert elbo.mean() < iw.mean() <= log_p_bin + 3 * iw.std() / math.sqrt(500)
            assert log_p_bin - iw.mean() < 0.5 * (log_p_bin - elbo.mean())  # much tighter


def test_importance_weighted_bpd_is_reproducible_and_below_the_elbo():
    torch.manual_seed(2)
    vd = VariationalDequantization(RealNVP(2, layers=2, hidden=8), (2,), levels=4, hidden=8)
    x = (torch.randint(0, 4, (64, 2)) + 0.5) / 4 - 0.5
    off = -2 * math.log(4)
    a = importance_weighted_bpd(vd, x, off, k=8, seed=5)
    assert a == importance_weighted_bpd(vd, x, off, k=8, seed=5)
    with torch.no_grad():
        elbo_bpd = -(vd.log_prob(x.repeat(50, 1)).mean() + off) / (2 * math.log(2))
    assert a < float(elbo_bpd)


def test_fastflow_train_variational_dequantization(tmp_path):
    from fastflow.training import TrainConfig, load_model, train

    cfg = TrainConfig(model="realnvp", data="digits", n_data=200, hidden=4, scales=1, epochs=1,
                      max_steps=2, batch_size=32, dequantization="variational", out=str(tmp_path),
                      progress=False, plots=False)  # fmt: skip
    r = train(cfg)
    assert math.isfinite(r["test_bpd"]) and math.isfinite(r["test_bpd_iw"])
    assert r["test_iw_k"] == 16
    flow, pre, _ = load_model(str(tmp_path / "best.pt"))
    assert isinstance(flow, VariationalDequantization) and pre.dequantization == "variational"
    x = pre.to_model(torch.tensor([[0] * 64]).reshape(1, 1, 8, 8), None, torch.float32)
    assert torch.allclose(x, torch.full_like(x, 0.5 / pre.levels - 0.5))  # bin centres


def test_errors_are_clear(tmp_path):
    from fastflow.training import TrainConfig, train

    with pytest.raises(DataError, match="for images"):
        train(TrainConfig(model="realnvp", data="moons", n_data=100, epochs=1,
                          dequantization="variational", out=str(tmp_path), progress=False,
                          plots=False))  # fmt: skip
    with pytest.raises(ValueError, match="--dequantization"):
        train(TrainConfig(dequantization="learned"))
    with pytest.raises(ValueError, match="shape"):
        VariationalDequantizer((2, 3))
    with pytest.raises(ValueError, match="levels"):
        VariationalDequantization(RealNVP(2, layers=2, hidden=4), (2,), levels=1)
    with pytest.raises(ValueError, match="k must"):
        VariationalDequantization(RealNVP(2, layers=2, hidden=4), (2,), 4).log_prob_iw(
            torch.zeros(1, 2), k=0
        )
