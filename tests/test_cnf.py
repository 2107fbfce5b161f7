"""Continuous flows (fastflow.nn.continuous, fastflow.models.CNF) and flow matching
(fastflow.flow_matching): ODE round trips, the exact-trace log-det against the autograd Jacobian
of the integrated map, Hutchinson against exact, regularisers and NFE on closed forms, the
flow-matching loss on a known field, and a tiny CNF trained both ways."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("torchdiffeq")

from fastflow.flow_matching import couple, fit, flow_matching_loss, ot_assignment  # noqa: E402
from fastflow.models import CNF  # noqa: E402
from fastflow.nn.continuous import ContinuousFlow, VectorField, divergence  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _noisy(module: nn.Module, scale: float = 0.3, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


class _Linear(nn.Module):
    """``v(t, x) = x A^T + b`` (time-independent)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor):
        super().__init__()
        self.a, self.b = nn.Parameter(a), nn.Parameter(b)

    def forward(self, t, x, context=None):
        return x @ self.a.T + self.b


def test_divergence_exact_matches_autograd_jacobian():
    torch.manual_seed(0)
    field = _noisy(VectorField(4, hidden=8)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    v, div, fro = divergence(lambda y: field(torch.tensor(0.3), y), x)
    torch.testing.assert_close(v, field(torch.tensor(0.3), x), atol=1e-14, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda y: field(torch.tensor(0.3), y).sum(0), x)
    jac = jac.permute(1, 0, 2)  # [N, D, D]
    torch.testing.assert_close(div, jac.diagonal(dim1=1, dim2=2).sum(1), atol=1e-12, rtol=0)
    torch.testing.assert_close(fro, jac.pow(2).sum((1, 2)), atol=1e-12, rtol=0)
    eps = torch.randn(6, 4, dtype=torch.float64)
    _, div_h, fro_h = divergence(lambda y: field(torch.tensor(0.3), y), x, eps)
    expected = torch.einsum("ni,nij,nj->n", eps, jac, eps)
    torch.testing.assert_close(div_h, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(fro_h, torch.einsum("ni,nij->nj", eps, jac).pow(2).sum(1))


def test_round_trip_within_solver_tolerance():
    torch.manual_seed(0)
    flow = _noisy(CNF(3, hidden=16, rtol=1e-6, atol=1e-6))
    x = torch.randn(8, 3)
    z, ld = flow.ode(x)
    x2, ld_inv = flow.ode.inverse(z)
    assert (x2 - x).abs().max() < 1e-4
    assert (ld + ld_inv).abs().max() < 1e-4
    assert (z - x).abs().max() > 0.1  # not the identity
    assert flow.nfe > 0


@pytest.mark.parametrize("context", [False, True])
def test_exact_trace_logdet_equals_jacobian_logdet_fp64(context):
    torch.manual_seed(1)
    flow = _noisy(CNF(3, hidden=12, context=2 if context else 0, rtol=1e-10, atol=1e-10))
    flow = flow.double()
    x = torch.randn(4, 3, dtype=torch.float64)
    c = torch.randn(4, 2, dtype=torch.float64) if context else None
    z, ld = flow.ode(x, c)
    jac = torch.autograd.functional.jacobian(lambda y: flow.ode(y, c)[0].sum(0), x)
    _, logabsdet = torch.linalg.slogdet(jac.permute(1, 0, 2))
    torch.testing.assert_close(ld, logabsdet, atol=1e-7, rtol=0)
    assert ld.abs().min() > 1e-2  # a non-trivial log-det
    lp = flow.log_prob(x, c)
    base = -0.5 * (z**2).sum(1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lp, base + logabsdet, atol=1e-7, rtol=0)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_agrees_with_exact_within_monte_carlo_error(noise):
    # fixed steps: the trajectory does not depend on the noise and the log-det is linear in the
    # divergence estimates, so the Hutchinson log-det is unbiased for the exact one
    torch.manual_seed(2)
    flow = _noisy(CNF(3, hidden=12, solver="rk4", steps=4)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with torch.no_grad():
        exact = flow.ode(x)[1]
        flow.ode.trace, flow.ode.noise_kind = "hutchinson", noise
        reps = 500
        est = flow.ode(x.repeat(reps, 1))[1].reshape(reps, 4)
    se = est.std(0) / math.sqrt(reps)
    assert bool((est.std(0) > 1e-3).all())  # it is an estimate
    assert bool(((est.mean(0) - exact).abs() < 4 * se + 1e-9).all()), (est.mean(0), exact, se)


def test_trace_auto_picks_exact_up_to_16_features():
    ode = ContinuousFlow(VectorField(2, hidden=4), solver="euler", steps=1)
    assert ode.uses_exact_trace(torch.zeros(1, 16))
    assert not ode.uses_exact_trace(torch.zeros(1, 17))


def test_nfe_and_regularisers_on_closed_forms():
    # v(x) = A x + b: the Frobenius norm is ||A||_F^2 at every t; with A = 0 the kinetic energy
    # of the constant velocity b over unit time is ||b||^2
    a = torch.tensor([[0.5, -1.0], [2.0, 0.25]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0], dtype=torch.float64)
    ode = ContinuousFlow(_Linear(a, b), solver="rk4", steps=10, regularize=True)
    x = torch.randn(3, 2, dtype=torch.float64)
    z, ld = ode(x)
    assert ode.nfe == 40  # 4 evaluations per rk4 step
    torch.testing.assert_close(ld, torch.full((3,), -0.75, dtype=torch.float64))  # -tr(A) * 1
    torch.testing.assert_close(ode.jacobian_frobenius, torch.full((3,), 5.3125).double())
    # the exact map is z = expm(-A) (x + A^-1 b) - A^-1 b
    ainv_b = torch.linalg.solve(a, b)
    z_true = (x + ainv_b) @ torch.linalg.matrix_exp(-a).T - ainv_b
    torch.testing.assert_close(z, z_true, atol=2e-5, rtol=0)
    ode0 = ContinuousFlow(_Linear(torch.zeros(2, 2).double(), b), solver="euler", steps=3,
                          regularize=True)  # fmt: skip
    ode0.inverse(x)
    torch.testing.assert_close(ode0.kinetic_energy, torch.full((3,), 5.0).double())
    torch.testing.assert_close(ode0.jacobian_frobenius, torch.zeros(3).double())


def test_adjoint_gradients_match_direct_backprop():
    torch.manual_seed(3)
    x = torch.randn(5, 2, dtype=torch.float64)
    grads = []
    for adjoint in (False, True):
        torch.manual_seed(3)
        flow = _noisy(CNF(2, hidden=8, adjoint=adjoint, rtol=1e-9, atol=1e-9)).double()
        flow.log_prob(x).sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in flow.parameters()]))
        if adjoint:
            assert flow.ode.nfe_backward > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-5)


def test_regularization_enters_the_gradient():
    torch.manual_seed(4)
    flow = _noisy(CNF(2, hidden=8, solver="rk4", steps=2, kinetic=1.0, jacobian=0.5))
    x = torch.randn(4, 2)
    flow.log_prob(x)
    reg = flow.regularization()
    ode = flow.ode
    expected = ode.kinetic_energy.mean() + 0.5 * ode.jacobian_frobenius.mean()
    torch.testing.assert_close(reg, expected)
    reg.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
    assert float(CNF(2, hidden=4).regularization()) == 0.0


# -- flow matching ---------------------------------------------------------------------------------


class _ScaleField(nn.Module):
    """The exact velocity of the straight paths from ``x0`` to ``x1 = a x0``:
    ``x_t = (1 - t + t a) x0`` moves at ``(a - 1) x0 = (a - 1) / (1 - t + t a) x_t``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a

    def forward(self, t, x, context=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1)
        return (self.a - 1) / (1 - t + t * self.a) * x


def test_flow_matching_loss_of_the_known_linear_field_is_zero():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 3, generator=g, dtype=torch.float64)
    x1 = 2.5 * x0
    loss = flow_matching_loss(_ScaleField(2.5), x1, x0=x0)
    assert loss.item() < 1e-20
    assert flow_matching_loss(_ScaleField(2.0), x1, x0=x0).item() > 1e-2  # a wrong field is not


def test_ot_coupling_recovers_a_translation():
    # for x1 = x0 + mu the identity pairing is the optimal one: the constant field mu then has
    # zero loss, while an independent pairing does not
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(32, 2, generator=g, dtype=torch.float64)
    mu = torch.tensor([0.3, -0.2], dtype=torch.float64)
    perm = torch.randperm(32, generator=g)
    x1 = (x0 + mu)[perm]
    const = _Linear(torch.zeros(2, 2, dtype=torch.float64), mu)
    assert flow_matching_loss(const, x1, x0=x0, coupling="ot").item() < 1e-20
    assert flow_matching_loss(const, x1, x0=x0, coupling="independent").item() > 0.1
    torch.testing.assert_close(couple(x0, x1, "ot"), x0[perm])
    assert sorted(ot_assignment(x0, x1).tolist()) == list(range(32))


def _toy(n: int, seed: int = 0) -> torch.Tensor:
    # a correlated, shifted Gaussian: true NLL 1.2 nats below the standard normal base's
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(n, 2, generator=g)
    return torch.stack([1.5 + 0.4 * e[:, 0], -1.0 + 0.3 * e[:, 0] + 0.3 * e[:, 1]], 1)


@pytest.mark.parametrize("objective", ["mle", "fm"])
def test_tiny_cnf_trained_both_ways_beats_the_base(objective):
    torch.manual_seed(0)
    x, x_test = _toy(2048), _toy(512, seed=1)
    flow = CNF(2, hidden=32, solver="midpoint", steps=4)
    with torch.no_grad():
        nll0 = -flow.log_prob(x_test).mean().item()  # the untrained flow is the base
    steps = 80 if objective == "mle" else 300
    losses = fit(flow, x, objective=objective, steps=steps, batch_size=64, lr=1e-2)
    assert len(losses) == steps and all(math.isfinite(v) for v in losses)
    flow.eval()
    with torch.no_grad():
        nll = -flow.log_prob(x_test).mean().item()
        xs = flow.sample(512)
    true_nll = math.log(2 * math.pi) + 1 + math.log(0.4 * 0.3)
    assert nll < nll0 - 2.0 and nll < true_nll + 0.5, (nll0, nll, true_nll)
    assert abs(xs.mean(0) - torch.tensor([1.5, -1.0])).max() < 0.2


def test_errors_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="solver"):
        CNF(2, solver="rk5")
    with pytest.raises(ValueError, match="steps is for fixed-step"):
        CNF(2, solver="dopri5", steps=10)
    with pytest.raises(ValueError, match="steps"):
        CNF(2, solver="rk4", steps=0)
    with pytest.raises(ValueError, match="trace"):
        CNF(2, trace="diag")
    with pytest.raises(ValueError, match="noise"):
        CNF(2, noise="uniform")
    with pytest.raises(ValueError, match="rtol"):
        CNF(2, rtol=0)
    with pytest.raises(ValueError, match="kinetic"):
        CNF(2, kinetic=-1)
    with pytest.raises(ValueError, match="hidden"):
        VectorField(2, hidden=0)
    with pytest.raises(ValueError, match="context"):
        CNF(2, context=2, solver="euler", steps=1).log_prob(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="coupling"):
        flow_matching_loss(CNF(2), torch.zeros(4, 2), coupling="sinkhorn")
    with pytest.raises(ValueError, match="x0"):
        flow_matching_loss(CNF(2), torch.zeros(4, 2), x0=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="objective"):
        fit(CNF(2), torch.zeros(4, 2), objective="vae")
    with pytest.raises(TypeError, match="model must be"):
        flow_matching_loss(object(), torch.zeros(4, 2))
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)
    with pytest.raises(ImportError, match=r'pip install "fastflow\[cnf\]"'):
        CNF(2)


# -- fastflow train --model cnf --objective mle|fm|fm-ot -------------------------------------------


@pytest.mark.parametrize("objective", ["mle", "fm-ot"])
def test_fastflow_train_cnf_both_objectives(tmp_path, objective):
    from fastflow.training import TrainConfig, load_model, train

    cfg = TrainConfig(model="cnf", data="moons", n_data=300, hidden=8, depth=1, epochs=1,
                      batch_size=64, max_steps=3, objective=objective, out=str(tmp_path),
                      progress=False, plots=False)  # fmt: skip
    r = train(cfg)
    assert math.isfinite(r["test_nll"]) and r["steps"] == 3
    flow, _, ck = load_model(str(tmp_path / "best.pt"))
    assert isinstance(flow, CNF) and ck["config"]["objective"] == objective


def test_fastflow_train_flow_matching_needs_a_continuous_model(tmp_path):
    from fastflow.training import TrainConfig, train

    cfg = TrainConfig(model="realnvp", data="moons", n_data=100, epochs=1, objective="fm",
                      out=str(tmp_path), progress=False, plots=False)  # fmt: skip
    with pytest.raises(ValueError, match="--model cnf"):
        train(cfg)
    with pytest.raises(ValueError, match="--objective"):
        train(TrainConfig(model="cnf", objective="score"))


def test_bench_module_runs_end_to_end():
    from fastflow.bench import BenchConfig, benchmark_names
    from fastflow.bench import cnf as bench_cnf

    assert "cnf" in benchmark_names()
    rows = bench_cnf.run(BenchConfig(smoke=True, seeds=(0,), log=lambda s: None))
    impls = {(r["case"], r["impl"]) for r in rows}
    for name in ("CNF-MLE", "CNF-FM", "CNF-FM-OT", "RealNVP", "MAF", "NSF", "true density"):
        assert ("moons NLL", name) in impls  # (smoke: moons only)
    assert {r["impl"] for r in rows if r["metric"] == "nfe dopri5"} == {"exact", "hutchinson"}
    assert all(math.isfinite(r["value"]) for r in rows if r["metric"] == "test_nll")


def test_resume_from_a_checkpoint_written_before_objective_existed():
    from fastflow.training import TrainConfig, TrainError
    from fastflow.training.config import check_resume

    cfg = TrainConfig(model="cnf", data="moons")
    old = {k: v for k, v in vars(cfg).items() if k not in ("objective", "dequantization")}
    ck = {"config": old, "state_dict": {}, "optimizer": {}}
    check_resume(cfg, ck, "old.pt")  # the old run was maximum likelihood, uniform: compatible
    with pytest.raises(TrainError, match="--objective"):
        check_resume(TrainConfig(model="cnf", data="moons", objective="fm"), ck, "old.pt")
