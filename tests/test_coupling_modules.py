"""Transforms in fastflow.nn (couplings, permutations, shape) and the Glow step: round trips,
log-dets against autograd Jacobians in fp64, gradients, context, state_dict, errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

import fastflow
from fastflow.models.glow import glow_step
from fastflow.models.nice import DiagonalScaling
from fastflow.nn.base import Compose
from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling, checkerboard_mask
from fastflow.nn.permutation import RandomPermutation, Reverse
from fastflow.nn.shape import Flatten, Split, Squeeze

D = 5
IMG = (2, 4, 4)


def _randomize(module: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    """Non-zero parameters everywhere (default conditioners start as the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _vec_mask():
    return torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])


# (name, factory, event shape, context features)
CASES = [
    ("affine-half", lambda: AffineCoupling(D, hidden=8), (D,), None),
    (
        "affine-half-p1-glow",
        lambda: AffineCoupling(D, parity=1, hidden=8, scale_fn="glow"),
        (D,),
        None,
    ),
    ("affine-half-identity", lambda: AffineCoupling(D, hidden=8, scale_fn="identity"), (D,), None),
    (
        "affine-checker-vec",
        lambda: AffineCoupling(D, "checkerboard", hidden=8, clamp=1.0),
        (D,),
        None,
    ),
    ("affine-custom-mask", lambda: AffineCoupling(D, _vec_mask(), parity=1, hidden=8), (D,), None),
    ("affine-ctx", lambda: AffineCoupling(D, hidden=8, context_features=3), (D,), 3),
    ("affine-channel", lambda: AffineCoupling(IMG, "channel", hidden=4), IMG, None),
    (
        "affine-checker-img",
        lambda: AffineCoupling((3, 4, 4), "checkerboard", hidden=4),
        (3, 4, 4),
        None,
    ),
    (
        "affine-img-ctx",
        lambda: AffineCoupling(IMG, "checkerboard", parity=1, hidden=4, context_features=2),
        IMG,
        2,
    ),
    ("additive-half", lambda: AdditiveCoupling(D, hidden=8), (D,), None),
    ("additive-img", lambda: AdditiveCoupling(IMG, "checkerboard", hidden=4), IMG, None),
    ("additive-ctx", lambda: AdditiveCoupling(D, parity=1, hidden=8, context_features=2), (D,), 2),
    ("reverse", Reverse, (D,), None),
    ("permutation", lambda: RandomPermutation(D, seed=3), (D,), None),
    ("permutation-img", lambda: RandomPermutation(2, seed=1), IMG, None),
    ("squeeze", Squeeze, IMG, None),
    ("flatten", lambda: Flatten(IMG), IMG, None),
    ("diag-scaling", lambda: DiagonalScaling(D), (D,), None),
    ("glow-step", lambda: glow_step(IMG, hidden=4), IMG, None),
    (
        "glow-step-additive-nolu",
        lambda: glow_step(IMG, hidden=4, coupling="additive", lu=False),
        IMG,
        None,
    ),
    ("glow-step-ctx", lambda: glow_step(IMG, hidden=4, context_features=2), IMG, 2),
]
IDS = [c[0] for c in CASES]


def _make(case, dtype=torch.float64):
    _, factory, shape, cf = case
    t = _randomize(factory()).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, *shape, generator=g, dtype=dtype)
    c = None if cf is None else torch.randn(3, cf, generator=g, dtype=dtype)
    return t, x, c


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_round_trip(case):
    t, x, c = _make(case)
    z, ld = t(x, c)
    x2, ld2 = t.inverse(z, c)
    assert ld.shape == (3,) and ld.dtype == torch.float64
    torch.testing.assert_close(x2, x, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(ld2, -ld, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_logdet_matches_autograd_jacobian(case):
    t, x, c = _make(case)
    _, ld = t(x, c)
    for i in range(x.shape[0]):
        ci = None if c is None else c[i : i + 1]

        def f(v, ci=ci):
            return t(v.reshape(1, *x.shape[1:]), ci)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        expected = torch.linalg.slogdet(jac)[1]
        torch.testing.assert_close(ld[i], expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_reach_every_parameter(case):
    t, x, c = _make(case)
    x.requires_grad_(True)
    z, ld = t(x, c)
    (z.square().sum() + ld.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, p in t.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name
    if not list(t.parameters()):
        return
    # and through the inverse
    t.zero_grad()
    xi, ldi = t.inverse(z.detach(), c)
    (xi.square().sum() + ldi.sum()).backward()
    for name, p in t.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("case", [c for c in CASES if c[3] is not None], ids=lambda c: c[0])
def test_context_changes_output(case):
    t, x, c = _make(case)
    z1, ld1 = t(x, c)
    z2, ld2 = t(x, c + 1.0)
    assert (z1 - z2).abs().max() > 1e-6
    with pytest.raises(ValueError, match="context"):
        t(x)
    with pytest.raises(ValueError, match="context"):
        t(x, c[:, :1])


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_dict_round_trip(case):
    t, x, c = _make(case)
    t(x, c)  # triggers any data-dependent initialisation
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    fresh = case[1]().to(torch.float64)
    fresh.load_state_dict(torch.load(buf))
    t.eval()
    fresh.eval()
    z1, ld1 = t(x, c)
    z2, ld2 = fresh(x, c)
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    torch.testing.assert_close(ld1, ld2, rtol=0, atol=0)


def test_default_couplings_start_as_identity():
    for t, x in [
        (AffineCoupling(D, hidden=8), torch.randn(4, D)),
        (AffineCoupling(IMG, "checkerboard", hidden=4), torch.randn(4, *IMG)),
        (AdditiveCoupling(IMG, "channel", hidden=4), torch.randn(4, *IMG)),
    ]:
        z, ld = t(x)
        assert torch.equal(z, x) and torch.equal(ld, torch.zeros(4))


def test_checkerboard_and_channel_leave_conditioning_part_unchanged():
    x = torch.randn(2, 3, 4, 4)
    t = _randomize(AffineCoupling((3, 4, 4), "checkerboard", hidden=4))
    z, _ = t(x)
    keep = checkerboard_mask((3, 4, 4)) == 0
    assert torch.equal(z[:, :, keep[0]], x[:, :, keep[0]])
    assert not torch.allclose(z[:, :, ~keep[0]], x[:, :, ~keep[0]])
    t = _randomize(AffineCoupling((3, 4, 4), "channel", parity=1, hidden=4))
    z, _ = t(x)
    assert torch.equal(z[:, 1:], x[:, 1:])  # parity 1: channels [cut:] condition, [:cut] change


def test_user_subnet_is_used():
    calls = []

    def subnet(cin, cout):
        calls.append((cin, cout))
        return nn.Sequential(nn.Linear(cin, 7), nn.Tanh(), nn.Linear(7, cout))

    t = AffineCoupling(6, subnet=subnet, context_features=2)
    assert calls == [(3 + 2, 2 * 3)]
    x, c = torch.randn(4, 6), torch.randn(4, 2)
    z, ld = t(x, c)
    torch.testing.assert_close(t.inverse(z, c)[0], x, atol=1e-5, rtol=1e-5)


def test_coupling_matches_reference_backend():
    t, x, c = _make(CASES[8], dtype=torch.float32)
    z1, ld1 = t(x, c)
    fastflow.set_backend("reference")
    z2, ld2 = t(x, c)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ld1, ld2, atol=1e-4, rtol=1e-5)


def test_squeeze_layout():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    z, _ = Squeeze()(x)
    assert z.shape == (1, 4, 2, 2)
    # channel 2i + j holds pixel offset (i, j) of each 2x2 block
    assert z[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert z[0, 1].tolist() == [[1.0, 3.0], [9.0, 11.0]]


def test_split_logdet_is_prior_log_density():
    s = _randomize(Split((4, 2, 2))).double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    kept, logp, (eps,) = s.forward_with_latents(x)
    assert torch.equal(kept, x[:, :2])
    mu, log_sigma = s.prior(kept).chunk(2, dim=1)
    expected = torch.distributions.Normal(mu, log_sigma.exp()).log_prob(x[:, 2:]).flatten(1).sum(1)
    torch.testing.assert_close(logp, expected)
    x2, ld_inv = s.inverse(kept, latents=[eps])
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld_inv, -logp)
    # sampled latents at temperature 0 give the prior mean
    x0, _ = s.inverse(kept, temperature=0.0)
    torch.testing.assert_close(x0[:, 2:], mu)


def test_split_vector_with_context():
    s = _randomize(Split(5, context_features=2))
    x, c = torch.randn(4, 5), torch.randn(4, 2)
    kept, logp, lat = s.forward_with_latents(x, c)
    assert kept.shape == (4, 3) and lat[0].shape == (4, 2)
    assert not torch.allclose(s(x, c + 1)[1], logp)
    torch.testing.assert_close(s.inverse(kept, c, latents=lat)[0], x)


def test_compose_latents_round_trip():
    t = Compose([Squeeze(), _randomize(Split((8, 2, 2))), Flatten((4, 2, 2))]).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    z, ld, lat = t.forward_with_latents(x)
    assert z.shape == (2, 16) and len(lat) == 1
    torch.testing.assert_close(t(x)[1], ld)
    x2, ld2 = t.inverse(z, latents=lat)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)


def test_random_permutation_is_seeded_and_a_permutation():
    a, b = RandomPermutation(9, seed=4), RandomPermutation(9, seed=4)
    assert torch.equal(a.perm, b.perm)
    assert sorted(a.perm.tolist()) == list(range(9))
    assert not torch.equal(a.perm, RandomPermutation(9, seed=5).perm)


def test_bad_inputs_raise_clear_errors():
    t = AffineCoupling(D, hidden=4)
    with pytest.raises(ValueError, match="shape"):
        t(torch.randn(3, D + 1))
    with pytest.raises(TypeError, match="x must be"):
        t([1.0] * D)
    with pytest.raises(ValueError, match="context"):
        t(torch.randn(3, D), torch.randn(3, 2))
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(D, mask="stripes")
    with pytest.raises(ValueError, match="mask"):
        AffineCoupling(D, mask=torch.ones(3))
    with pytest.raises(ValueError, match="binary"):
        AffineCoupling(D, mask=torch.full((D,), 0.5))
    with pytest.raises(ValueError, match="scale_fn"):
        AffineCoupling(D, scale_fn="exp")
    with pytest.raises(ValueError, match="clamp"):
        AffineCoupling(D, clamp=0.0)
    with pytest.raises(ValueError, match="parity"):
        AffineCoupling(D, parity=2)
    with pytest.raises(ValueError, match="even"):
        Squeeze()(torch.randn(1, 1, 3, 4))
    with pytest.raises(ValueError, match=r"shape\[1\] must be 4"):
        RandomPermutation(4)(torch.randn(2, 5))
    with pytest.raises(ValueError, match="latent"):
        Split((4, 2, 2)).inverse(torch.randn(1, 2, 2, 2), latents=[torch.randn(1, 3, 2, 2)])
    with pytest.raises(ValueError, match="coupling"):
        glow_step(IMG, coupling="spline")


def test_half_mask_odd_features():
    t = _randomize(AffineCoupling(7, hidden=4, parity=1)).double()
    x = torch.randn(2, 7, dtype=torch.float64)
    z, ld = t(x)
    assert torch.equal(z[:, 3:], x[:, 3:])
    torch.testing.assert_close(t.inverse(z)[0], x)
    assert math.isfinite(ld.sum().item())


def test_couplings_run_under_cpu_autocast():
    from fastflow.nn.coupling import AdditiveCoupling, AffineCoupling

    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for layer in (AffineCoupling(6, hidden=8), AdditiveCoupling(6, hidden=8)):
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, ld = layer(x)
        assert z.dtype == torch.float32 and ld.dtype == torch.float32
        z_ref, ld_ref = layer(x)
        torch.testing.assert_close(z, z_ref, rtol=0.05, atol=0.05)
        torch.testing.assert_close(ld, ld_ref, rtol=0.05, atol=0.05)
