"""Every public transform and model of fastflow against the one transform contract
(tests/contract.py): round trips, log-det shape and sign, log-det == log|det J| of the fp64
autograd Jacobian, the context matters, and for flows log_prob / sampling.

Cover a new transform by adding one line to ``CASES``: ``(name, factory, input_shape,
context_features)``. The factory builds the module; the test initialises it (one training-mode
forward for data-dependent inits), perturbs every parameter away from the identity init and
checks it in eval mode on a batch of 3 with the native backend. Names in ``COMPILED`` also run
under ``torch.compile`` (each costs seconds: keep it to a few).
"""

from __future__ import annotations

import pytest
import torch
from contract import assert_flow_contract, assert_transform_contract, prepare_transform

import fastflow
import fastflow.models as fm
import fastflow.nn as ff
from fastflow.distributions import ConditionalDiagonalGaussian

pytestmark = pytest.mark.skipif(not fastflow.native_available(), reason="needs fastflow._C")

D = 5  # vector features (odd: the halves differ in size)
IMG = (2, 4, 4)
IMG4 = (4, 4, 4)
VMASK = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
IMASK = torch.tensor([[[1.0, 0, 0, 1], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]]])


def _small_compose_vec():
    return ff.Compose(
        [
            ff.AffineCoupling(D, hidden=8, context_features=2),
            ff.Reverse(),
            ff.ActNorm(D),
            ff.LULinear(D),
            ff.MaskedAffineAutoregressive(D, hidden=(8,), context=2),
            ff.RandomPermutation(D, seed=3),
            ff.MLPAffineCoupling(D, hidden=8, parity=1, context_features=2),
        ]
    )


def _small_compose_img():
    # nested compositions with a factor-out in the middle: latents thread through inverse
    return ff.Compose(
        [
            ff.Compose([ff.AffineCoupling(IMG, "checkerboard", hidden=4), ff.Squeeze()]),
            ff.Compose([ff.InvConv1x1(8), ff.Split((8, 2, 2))]),
            ff.GlowStep(4, hidden=4),
            ff.Flatten((4, 2, 2)),
            ff.LULinear(16),
        ]
    )


# (name, factory, input shape (no batch), context features or None). A case that breaks the
# contract is kept as pytest.param((name, ...), marks=pytest.mark.xfail(strict=True, reason=...)).
# fmt: off
CASES = [
    # couplings: every mask kind, both parities, every scale function, with and without context
    ("affine/half", lambda: ff.AffineCoupling(D, hidden=8), (D,), None),
    ("affine/half/p1/ctx", lambda: ff.AffineCoupling(D, parity=1, hidden=8, context_features=2), (D,), 2),  # noqa: E501
    ("affine/half/glow", lambda: ff.AffineCoupling(D, hidden=8, scale_fn="glow"), (D,), None),
    ("affine/half/identity", lambda: ff.AffineCoupling(D, hidden=8, scale_fn="identity"), (D,), None),  # noqa: E501
    ("affine/checker/vec", lambda: ff.AffineCoupling(D, "checkerboard", hidden=8), (D,), None),
    ("affine/custom/vec/p1", lambda: ff.AffineCoupling(D, VMASK, parity=1, hidden=8), (D,), None),
    ("affine/channel/img", lambda: ff.AffineCoupling(IMG, "channel", hidden=4), IMG, None),
    ("affine/checker/img/ctx", lambda: ff.AffineCoupling(IMG, "checkerboard", hidden=4, context_features=2), IMG, 2),  # noqa: E501
    ("affine/custom/img", lambda: ff.AffineCoupling(IMG, IMASK, hidden=4), IMG, None),
    ("additive/half/ctx", lambda: ff.AdditiveCoupling(D, hidden=8, context_features=2), (D,), 2),
    ("additive/checker/vec/p1", lambda: ff.AdditiveCoupling(D, "checkerboard", parity=1, hidden=8), (D,), None),  # noqa: E501
    ("additive/custom/vec", lambda: ff.AdditiveCoupling(D, VMASK, hidden=8), (D,), None),
    ("additive/channel/img/p1", lambda: ff.AdditiveCoupling(IMG, "channel", parity=1, hidden=4), IMG, None),  # noqa: E501
    ("additive/checker/img", lambda: ff.AdditiveCoupling(IMG, "checkerboard", hidden=4), IMG, None),  # noqa: E501
    ("additive/custom/img/ctx", lambda: ff.AdditiveCoupling(IMG, IMASK, hidden=4, context_features=2), IMG, 2),  # noqa: E501
    ("mlp-affine", lambda: ff.MLPAffineCoupling(D, hidden=8), (D,), None),
    ("mlp-affine/p1/ctx/glow", lambda: ff.MLPAffineCoupling(D, hidden=8, hidden_layers=1, parity=1, context_features=2, scale_fn="glow"), (D,), 2),  # noqa: E501
    ("mlp-affine/no-hidden/identity", lambda: ff.MLPAffineCoupling(4, hidden_layers=0, scale_fn="identity"), (4,), None),  # noqa: E501
    # per-channel and linear maps
    ("actnorm/vec", lambda: ff.ActNorm(D), (D,), None),
    ("actnorm/img", lambda: ff.ActNorm(2), IMG, None),
    ("invconv/lu", lambda: ff.InvConv1x1(4), IMG4, None),
    ("invconv/plain", lambda: ff.InvConv1x1(4, lu=False), IMG4, None),
    ("invconv/vec", lambda: ff.InvConv1x1(D), (D,), None),
    ("lulinear", lambda: ff.LULinear(D), (D,), None),
    ("lulinear/no-bias", lambda: ff.LULinear(D, bias=False), (D,), None),
    ("marginal/img", lambda: ff.PiecewiseLinearMarginal(IMG, bins=7, low=-5.0, high=5.0), IMG, None),  # noqa: E501
    # Glow steps
    ("glowstep/affine", lambda: ff.GlowStep(4, hidden=4), IMG4, None),
    ("glowstep/additive", lambda: ff.GlowStep(4, hidden=4, coupling="additive"), IMG4, None),
    ("glowstep/unfused/plain", lambda: ff.GlowStep(4, hidden=4, lu=False, fused=False), IMG4, None),  # noqa: E501
    ("glowstep/custom-conditioner", lambda: ff.GlowStep(4, conditioner=torch.nn.Conv2d(2, 4, 3, padding=1)), IMG4, None),  # noqa: E501
    ("glowstep/softclamp/odd", lambda: ff.GlowStep(3, hidden=4, scale_fn="softclamp"), (3, 4, 4), None),  # noqa: E501
    # autoregressive layers
    ("maf-layer", lambda: ff.MaskedAffineAutoregressive(D, hidden=(8, 8)), (D,), None),
    ("maf-layer/ctx/tanh/random", lambda: ff.MaskedAffineAutoregressive(D, hidden=(8,), context=2, activation="tanh", order="random", hidden_degrees="random", seed=1), (D,), 2),  # noqa: E501
    ("iaf-layer", lambda: ff.InverseAutoregressive(D, hidden=(8,)), (D,), None),
    ("iaf-layer/ctx/elu/glow", lambda: ff.InverseAutoregressive(D, hidden=(8, 8), context=2, activation="elu", scale_fn="glow"), (D,), 2),  # noqa: E501
    # transformer autoregressive (TarFlow) blocks and the patch layer
    ("transformer-ar", lambda: ff.TransformerAutoregressive(4, 3, width=8, depth=1, heads=2), (4, 3), None),  # noqa: E501
    ("transformer-ar/ctx/flip", lambda: ff.TransformerAutoregressive(4, 2, width=8, depth=2, heads=2, context_features=2, flip=True), (4, 2), 2),  # noqa: E501
    ("patchify", lambda: ff.Patchify((2, 4, 4), 2), (2, 4, 4), None),
    # neural spline layers
    ("spline-coupling/half", lambda: ff.SplineCoupling(D, hidden=8, bins=4), (D,), None),
    ("spline-coupling/p1/ctx", lambda: ff.SplineCoupling(D, parity=1, hidden=8, bins=3, context_features=2), (D,), 2),  # noqa: E501
    ("spline-coupling/checker/img", lambda: ff.SplineCoupling(IMG, "checkerboard", hidden=4, bins=3, bound=2.0), IMG, None),  # noqa: E501
    ("spline-ar", lambda: ff.SplineAutoregressive(D, hidden=(8, 8), bins=4), (D,), None),
    ("spline-ar/ctx/tanh/random", lambda: ff.SplineAutoregressive(D, hidden=(8,), context=2, bins=3, activation="tanh", order="random", hidden_degrees="random", seed=1), (D,), 2),  # noqa: E501
    ("spline-iaf/ctx", lambda: ff.SplineInverseAutoregressive(D, hidden=(8,), context=2, bins=3), (D,), 2),  # noqa: E501
    # planar, radial and batch-norm flows
    ("planar", lambda: ff.PlanarFlow(D), (D,), None),
    ("radial", lambda: ff.RadialFlow(D), (D,), None),
    ("batchnorm/vec", lambda: ff.BatchNormFlow(D), (D,), None),
    ("batchnorm/img", lambda: ff.BatchNormFlow(2), IMG, None),
    # permutations and shapes
    ("reverse/vec", lambda: ff.Reverse(), (D,), None),
    ("reverse/img", lambda: ff.Reverse(), IMG, None),
    ("random-permutation", lambda: ff.RandomPermutation(D, seed=1), (D,), None),
    ("random-permutation/img", lambda: ff.RandomPermutation(2, seed=1), IMG, None),
    ("squeeze", lambda: ff.Squeeze(), IMG, None),
    ("flatten", lambda: ff.Flatten(IMG), IMG, None),
    ("split/vec", lambda: ff.Split(D), (D,), None),
    ("split/img/ctx", lambda: ff.Split(IMG4, context_features=2, keep=1), IMG4, 2),
    # compositions
    ("compose/vec/ctx", _small_compose_vec, (D,), 2),
    ("compose/img/split", _small_compose_img, IMG, None),
    # models (fastflow.Flow): the transform contract on the flow plus log_prob and sampling
    ("NICE", lambda: fm.NICE(D, layers=2, hidden=8, hidden_layers=1), (D,), None),
    ("NICE/ctx", lambda: fm.NICE(D, layers=2, hidden=8, hidden_layers=1, context_features=2), (D,), 2),  # noqa: E501
    ("RealNVP/vec", lambda: fm.RealNVP(D, layers=2, hidden=8), (D,), None),
    ("RealNVP/vec/unfused/ctx", lambda: fm.RealNVP(D, layers=2, hidden=8, fused=False, context_features=2), (D,), 2),  # noqa: E501
    ("RealNVP/vec/recompute", lambda: fm.RealNVP(D, layers=2, hidden=8, invertible_recompute=True), (D,), None),  # noqa: E501
    ("RealNVP/img", lambda: fm.RealNVP((1, 4, 4), levels=2, hidden=4), (1, 4, 4), None),
    ("RealNVP/img/ctx", lambda: fm.RealNVP((1, 4, 4), levels=2, hidden=4, context_features=2), (1, 4, 4), 2),  # noqa: E501
    ("Glow", lambda: fm.Glow((1, 4, 4), levels=2, steps=2, hidden=4), (1, 4, 4), None),
    ("Glow/additive/plain/learn-top", lambda: fm.Glow((1, 4, 4), levels=2, steps=1, hidden=4, coupling="additive", lu=False, learn_top=True), (1, 4, 4), None),  # noqa: E501
    ("Glow/ctx", lambda: fm.Glow((1, 4, 4), levels=2, steps=1, hidden=4, context_features=2), (1, 4, 4), 2),  # noqa: E501
    ("MAF", lambda: fm.MAF(D, layers=2, hidden=(8,)), (D,), None),
    ("MAF/ctx/random", lambda: fm.MAF(D, layers=3, hidden=(8,), context=2, permutation="random", seed=2), (D,), 2),  # noqa: E501
    ("IAF", lambda: fm.IAF(D, layers=2, hidden=(8,)), (D,), None),
    ("IAF/ctx", lambda: fm.IAF(D, layers=2, hidden=(8, 8), context=2), (D,), 2),
    ("NSF/coupling", lambda: fm.NeuralSplineFlow(D, layers=2, bins=3, hidden=8), (D,), None),
    ("NSF/ar/ctx", lambda: fm.NeuralSplineFlow(D, layers=2, bins=3, kind="autoregressive", hidden=8, context=2), (D,), 2),  # noqa: E501
    ("TarFlow", lambda: fm.TarFlow((1, 4, 4), patch_size=2, width=8, depth=1, blocks=2, heads=2), (1, 4, 4), None),  # noqa: E501
    ("TarFlow/classes", lambda: fm.TarFlow((2, 4, 4), patch_size=2, width=8, depth=1, blocks=3, heads=2, num_classes=3), (2, 4, 4), 3),  # noqa: E501
    ("continuous/rk4/ctx", lambda: ff.ContinuousFlow(ff.VectorField(D, hidden=8, context_features=2), solver="rk4", steps=4), (D,), 2),  # noqa: E501
    ("CNF/rk4", lambda: fm.CNF(D, hidden=8, hidden_layers=1, solver="rk4", steps=4), (D,), None),
    ("CNF/ctx/dopri5", lambda: fm.CNF(D, hidden=8, hidden_layers=1, context=2, rtol=1e-7, atol=1e-7), (D,), 2),  # noqa: E501
    ("Flow/conditional-base", lambda: fastflow.Flow([ff.AffineCoupling(D, hidden=8, context_features=2), ff.LULinear(D)], ConditionalDiagonalGaussian(D, 2, hidden=8)), (D,), 2),  # noqa: E501
]
# fmt: on

# names also checked under torch.compile -> fullgraph (keep it to 2-3 cases: each costs seconds)
COMPILED = {"affine/half/p1/ctx": True, "glowstep/affine": True}

# per-case tolerances of the contract's checks, where a case cannot meet the defaults: an adaptive
# ODE solver's log-det is exact only up to its tolerance (fixed-step CNF cases meet the defaults)
TOLERANCES = {"CNF/ctx/dopri5": {"jac_atol": 1e-6}}

BATCH = 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the tensors are tiny: with two threads on a loaded 2-core machine the thread handoffs of
    # every op cost far more than the work (tens of times slower); results do not depend on it
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case[0])
def test_contract(case):
    name, factory, shape, context_features = case
    fastflow.set_backend("native")
    torch.manual_seed(0)
    t = factory()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *shape, generator=g)
    ctx = None if context_features is None else torch.randn(BATCH, context_features, generator=g)
    prepare_transform(t, x, ctx)
    check = assert_flow_contract if isinstance(t, fastflow.Flow) else assert_transform_contract
    check(
        t, x, ctx, compile=name in COMPILED, fullgraph=COMPILED.get(name, True),
        **TOLERANCES.get(name, {}),
    )  # fmt: skip


def test_cases_cover_every_public_transform_and_model():
    """A new public transform or model must get a line in CASES."""
    built = [factory() for _, factory, _, _ in CASES]
    types = set()
    for m in built:
        types.update(type(s) for s in m.modules())
    public = [getattr(ff, n) for n in ff.__all__] + [getattr(fm, n) for n in fm.__all__]
    public = [c for c in public if isinstance(c, type) and c is not ff.Transform]
    # MADE and GlowConditioner are networks inside transforms (covered through them)
    missing = [c.__name__ for c in public if c not in types]
    assert not missing, f"no contract case for {missing}"
