"""fastflow.vi (reverse-KL fits, test energies) and the IAF-posterior VAE example."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import fastflow
from fastflow.nn import PlanarFlow
from fastflow.vi import banana_energy, elbo, fit_density, two_moons_energy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_two_moons_energy_closed_form():
    z = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    expected = []
    for z1, z2 in z.tolist():
        r = math.hypot(z1, z2)
        mix = math.exp(-0.5 * ((z1 - 2) / 0.6) ** 2) + math.exp(-0.5 * ((z1 + 2) / 0.6) ** 2)
        expected.append(0.5 * ((r - 2) / 0.4) ** 2 - math.log(mix))
    torch.testing.assert_close(two_moons_energy(z), torch.tensor(expected, dtype=torch.float64))


def test_banana_is_normalised():
    g = torch.linspace(-12, 12, 1201, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(g, g, indexing="xy"), -1).reshape(-1, 2)
    h = (g[1] - g[0]).item()
    mass = torch.exp(-banana_energy(grid, a=1.5, b=0.3)).sum().item() * h * h
    assert abs(mass - 1) < 1e-3


def test_fit_density_improves_and_respects_the_bound():
    torch.manual_seed(0)
    q = fastflow.Flow([PlanarFlow(2) for _ in range(3)], fastflow.StandardNormal(2))
    target = lambda x: -banana_energy(x)  # noqa: E731  log Z = 0
    before = elbo(target, q, n=4000)
    curve = fit_density(target, q, steps=80, batch=128, lr=2e-2, anneal_steps=10)
    after = elbo(target, q, n=4000)
    assert curve.shape == (80,) and curve.dtype == torch.float64
    assert bool(torch.isfinite(curve).all())
    assert after > before + 0.2
    assert after < 0.05  # ELBO <= log Z = 0 (up to Monte-Carlo error)


def test_elbo_is_zero_when_q_equals_p():
    q = fastflow.Flow([fastflow.nn.Reverse()], fastflow.StandardNormal(2))
    assert abs(elbo(lambda x: -banana_energy(x, a=1.0, b=0.0), q, n=100)) < 1e-5


def test_bad_arguments():
    q = fastflow.Flow([PlanarFlow(2)], fastflow.StandardNormal(2))
    target = lambda x: -two_moons_energy(x)  # noqa: E731
    with pytest.raises(TypeError, match="flow"):
        fit_density(target, PlanarFlow(2))
    with pytest.raises(ValueError, match="steps"):
        fit_density(target, q, steps=0)
    with pytest.raises(ValueError, match="lr"):
        fit_density(target, q, steps=1, lr=-1.0)
    with pytest.raises(TypeError, match="log_p"):
        fit_density(3.0, q, steps=1)
    with pytest.raises(ValueError, match="log_p must return"):
        fit_density(lambda x: x, q, steps=1, batch=4)
    with pytest.raises(ValueError, match=r"\[N, 2\]"):
        two_moons_energy(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="a must be"):
        banana_energy(torch.zeros(3, 2), a=0.0)


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_vae_iaf_posterior_beats_diagonal_gaussian():
    pytest.importorskip("sklearn")
    vae = _load_example("vae_iaf_digits")
    budget = dict(steps=250, batch=128, lr=5e-3, seed=0, eval_samples=10)
    gaussian = vae.train("gaussian", **budget)
    iaf = vae.train("iaf", **budget)
    assert math.isfinite(gaussian) and math.isfinite(iaf)
    assert iaf > gaussian + 0.3, (iaf, gaussian)
