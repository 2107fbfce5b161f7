"""The contract every fastflow transform and flow keeps, as reusable assertions.

A transform ``t`` has ``forward(x, context=None) -> (z, logdet)`` (data -> latent) and
``inverse(z, context=None) -> (x, logdet)``, ``logdet`` of shape ``[N]`` (fp32; fp64 for fp64
input). Transforms that factor out part of their input (``Split``, a ``Compose`` or ``Flow``
holding one) also have ``forward_with_latents(x, context) -> (z, logdet, latents)`` and
``inverse(z, context, latents=...)``; for them the bijection checked is
``x -> (z, *latents)`` and the forward "log-det" includes the standard normal log-density of
the latents (``Split``'s prior term), which is subtracted before comparing with the Jacobian.

:func:`assert_transform_contract` checks, on a batch ``x``:

* shapes: ``logdet`` is ``[N]`` in the accumulation dtype, ``x`` and ``(z, *latents)`` have the
  same number of elements per sample, everything is finite;
* round trips: ``inverse(forward(x)) == x`` with ``inverse logdet == -forward logdet``, and
  ``forward(inverse(z0)) == z0`` for a fresh latent ``z0`` (and fresh latents);
* the log-det: on an fp64 copy of the module, the Jacobian of the whole batch (autograd,
  ``torch.autograd.functional.jacobian``, flattened per sample) is block diagonal (samples are
  independent) and the forward log-det equals ``log|det J|`` of each sample's block; the fp32
  outputs agree with the fp64 copy;
* with a context: changing the context changes the output of both directions;
* optionally (``compile=True``): ``torch.compile`` (``fullgraph=True`` by default) of both
  directions gives the eager results.

:func:`assert_flow_contract` adds the :class:`fastflow.Flow` checks: ``log_prob`` equals the
change of variables built from the Jacobian and the base density, every layer round-trips
(:func:`fastflow.check_invertibility`), sample shapes and ``sample_and_log_prob`` consistency.

Modules with a data-dependent initialisation (ActNorm, GlowStep) and zero-initialised last layers
(couplings are the identity when built) make the checks trivial: run :func:`prepare_transform`
first, which initialises them with one training-mode forward, adds noise to every parameter and
switches to eval mode.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "ContractResult",
    "assert_flow_contract",
    "assert_transform_contract",
    "prepare_transform",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class ContractResult:
    """What :func:`assert_transform_contract` computed (fp64 values from the fp64 copy)."""

    z: Tensor  #: forward output (input dtype)
    logdet: Tensor  #: forward log-det (input's accumulation dtype)
    latents: list[Tensor]  #: factored-out latents (empty for most transforms)
    jacobian_logdet: Tensor  #: log|det J| per sample of x -> (z, *latents), fp64


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _factors_out(t: nn.Module) -> bool:
    return hasattr(t, "forward_with_latents")


def _forward(t: nn.Module, x: Tensor, context: Tensor | None):
    if _factors_out(t):
        z, ld, latents = t.forward_with_latents(x, context)
        return z, ld, list(latents)
    z, ld = t(x, context)
    return z, ld, []


def _inverse(t: nn.Module, z: Tensor, context: Tensor | None, latents: list[Tensor]):
    if _factors_out(t):
        return t.inverse(z, context, latents=list(latents))
    return t.inverse(z, context)


def _flat(z: Tensor, latents: list[Tensor]) -> Tensor:
    """``(z, *latents)`` as one ``[N, D]`` matrix."""
    n = z.shape[0]
    return torch.cat([z.reshape(n, -1), *(lat.reshape(n, -1) for lat in latents)], dim=1)


def _log_normal(latents: list[Tensor], n: int) -> Tensor:
    """Standard normal log-density of the factored-out latents, summed per sample (fp64)."""
    out = torch.zeros(n, dtype=torch.float64)
    for lat in latents:
        e = lat.double().reshape(n, -1)
        out = out + (-0.5 * e * e - _HALF_LOG_2PI).sum(1)
    return out


def _close(actual, expected, what: str, atol: float, rtol: float) -> None:
    torch.testing.assert_close(
        actual, expected, atol=atol, rtol=rtol, check_dtype=False, msg=lambda m: f"{what}: {m}"
    )


def _check_logdet(ld: Tensor, x: Tensor, what: str) -> None:
    assert isinstance(ld, Tensor), f"{what} log-det is a {type(ld).__name__}, not a Tensor"
    assert tuple(ld.shape) == (x.shape[0],), (
        f"{what} log-det has shape {tuple(ld.shape)}, expected [N] = [{x.shape[0]}]"
    )
    assert ld.dtype == _acc(x.dtype), (
        f"{what} log-det has dtype {ld.dtype} for {x.dtype} input, expected {_acc(x.dtype)}"
    )
    assert bool(torch.isfinite(ld).all()), f"{what} log-det is not finite: {ld}"


def _outputs(t, x, context, latents_in=None, inverse=False) -> Tensor:
    """Everything a direction returns, flattened into one vector (for "did it change")."""
    with torch.no_grad():
        if inverse:
            y, ld = _inverse(t, x, context, latents_in or [])
            return torch.cat([y.reshape(-1).double(), ld.double()])
        z, ld, lat = _forward(t, x, context)
        return torch.cat([_flat(z, lat).reshape(-1).double(), ld.double()])


@torch.no_grad()
def prepare_transform(
    t: nn.Module, x: Tensor, context: Tensor | None = None, *, noise: float = 0.1, seed: int = 0
) -> nn.Module:
    """Make ``t`` a non-trivial, initialised transform for the contract; returns it (eval mode).

    One forward in training mode on ``(x, context)`` runs the data-dependent initialisation
    (ActNorm, GlowStep's ActNorm), then every floating-point parameter gets Gaussian noise of
    standard deviation ``noise`` (zero-initialised last layers would make couplings, split priors
    and MADE-free layers the identity), then ``t.eval()``.
    """
    t.train()
    _forward(t, x, context)
    g = torch.Generator().manual_seed(seed)
    for p in t.parameters():
        if p.is_floating_point():
            p.add_(noise * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return t.eval()


def _jacobian_logdets(t64: nn.Module, x64: Tensor, c64: Tensor | None, jac_atol: float):
    """``(z, logdet, latents, log|det J|)`` of the fp64 module; J per sample of the flattened
    ``x -> (z, *latents)``, checked block diagonal over the batch."""
    n = x64.shape[0]
    z, ld, latents = _forward(t64, x64, c64)
    d_in = x64[0].numel()
    d_out = _flat(z, latents).shape[1]
    assert d_out == d_in, (
        f"x has {d_in} elements per sample but (z, *latents) has {d_out}: not a bijection"
    )

    def f(v: Tensor) -> Tensor:
        zz, _, lat = _forward(t64, v, c64)
        return _flat(zz, lat).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, x64.detach(), vectorize=False)
    jac = jac.reshape(n, d_in, n, d_in)
    logdets = []
    for i in range(n):
        for j in range(n):
            if i != j:
                worst = jac[i, :, j, :].abs().max().item()
                assert worst <= jac_atol, (
                    f"output of sample {i} depends on input sample {j} (|dJ| up to {worst:.3e}): "
                    "samples must be transformed independently"
                )
        sign, logabsdet = torch.linalg.slogdet(jac[i, :, i, :])
        assert sign != 0, f"the Jacobian of sample {i} is singular"
        logdets.append(logabsdet)
    return z.detach(), ld.detach(), [lat.detach() for lat in latents], torch.stack(logdets)


def assert_transform_contract(
    t: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    jac_atol: float = 1e-8,
    compile: bool = False,
    fullgraph: bool = True,
) -> ContractResult:
    """Assert the transform contract (module docstring) for ``t`` on the batch ``x``.

    Args:
        t: the transform (initialised and non-trivial: see :func:`prepare_transform`).
        x: a batch ``[N, ...]`` of inputs (fp32 or fp64).
        context: optional context ``[N, F]``; when given, changing it must change the outputs.
        atol, rtol: tolerances at the dtype of ``x`` (round trips, fp32 vs fp64 copy).
        jac_atol: tolerance of the fp64 Jacobian checks (log-det and independence of samples).
        compile: also run both directions under ``torch.compile`` and compare with eager.
        fullgraph: passed to ``torch.compile``.

    Returns:
        A :class:`ContractResult` (reused by :func:`assert_flow_contract`).
    """
    n = x.shape[0]
    name = type(t).__name__

    # -- forward, shapes, inverse(forward(x)) ---------------------------------------------------
    with torch.no_grad():
        z, ld, latents = _forward(t, x, context)
        _check_logdet(ld, x, f"{name} forward")
        assert bool(torch.isfinite(_flat(z, latents)).all()), f"{name} forward is not finite"
        x_rec, ld_inv = _inverse(t, z, context, latents)
        _check_logdet(ld_inv, z, f"{name} inverse")
        assert tuple(x_rec.shape) == tuple(x.shape), (
            f"{name}: inverse(forward(x)) has shape {tuple(x_rec.shape)}, x {tuple(x.shape)}"
        )
        _close(x_rec, x, f"{name}: inverse(forward(x)) != x", atol, rtol)
        _close(ld_inv, -ld, f"{name}: inverse log-det != -forward log-det", atol, rtol)

        # -- forward(inverse(z0)) for a fresh latent ----------------------------------------------
        g = torch.Generator().manual_seed(1)
        z0 = torch.randn(z.shape, generator=g, dtype=z.dtype)
        lat0 = [torch.randn(lat.shape, generator=g, dtype=lat.dtype) for lat in latents]
        x0, ld0_inv = _inverse(t, z0, context, lat0)
        _check_logdet(ld0_inv, z0, f"{name} inverse")
        assert tuple(x0.shape) == tuple(x.shape), (
            f"{name}: inverse(z) has shape {tuple(x0.shape)}, data has {tuple(x.shape)}"
        )
        z1, ld1, lat1 = _forward(t, x0, context)
        _close(_flat(z1, lat1), _flat(z0, lat0), f"{name}: forward(inverse(z)) != z", atol, rtol)
        _close(ld1, -ld0_inv, f"{name}: forward log-det != -inverse log-det", atol, rtol)

    # -- log-det == log|det J| on an fp64 copy ---------------------------------------------------
    t64 = copy.deepcopy(t).double()
    c64 = None if context is None else context.double()
    z64, ld64, lat64, jac_ld = _jacobian_logdets(t64, x.double(), c64, jac_atol)
    _check_logdet(ld64, z64, f"{name} fp64 forward")
    expected = jac_ld + _log_normal(lat64, n)  # a factor-out's log-det includes log N(latents)
    _close(ld64, expected, f"{name}: fp64 forward log-det != log|det J| (autograd)", jac_atol, 1e-7)
    _close(_flat(z, latents), _flat(z64, lat64), f"{name}: fp32 forward != fp64 copy", atol, rtol)
    _close(ld, ld64, f"{name}: fp32 forward log-det != fp64 copy", atol, rtol)

    # -- the context matters -------------------------------------------------------------------
    if context is not None:
        other = context + 1.0 + torch.randn(context.shape, generator=g, dtype=context.dtype)
        for inverse, inp, what in ((False, x, "forward"), (True, z, "inverse")):
            a = _outputs(t, inp, context, latents, inverse)
            b = _outputs(t, inp, other, latents, inverse)
            change = (a - b).abs().max().item()
            assert change > atol, (
                f"{name}: changing the context does not change the {what} output "
                f"(max change {change:.3e})"
            )

    # -- torch.compile ---------------------------------------------------------------------------
    if compile:
        fwd = torch.compile(lambda v, c: _forward(t, v, c), fullgraph=fullgraph)
        inv = torch.compile(lambda v, c, lat: _inverse(t, v, c, lat), fullgraph=fullgraph)
        with torch.no_grad():
            zc, ldc, latc = fwd(x, context)
            _close(_flat(zc, latc), _flat(z, latents), f"{name}: compiled forward", atol, rtol)
            _close(ldc, ld, f"{name}: compiled forward log-det", atol, rtol)
            xc, ldc_inv = inv(z, context, latents)
            _close(xc, x, f"{name}: compiled inverse", atol, rtol)
            _close(ldc_inv, ld_inv, f"{name}: compiled inverse log-det", atol, rtol)

    return ContractResult(z, ld, latents, jac_ld)


def assert_flow_contract(
    flow: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    *,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    jac_atol: float = 1e-8,
    compile: bool = False,
    fullgraph: bool = True,
) -> ContractResult:
    """:func:`assert_transform_contract` on a :class:`fastflow.Flow` (its transforms' forward
    and inverse), plus: ``log_prob(x) = log p_base(z) + log N(latents) + log|det J|``, each
    layer round-trips, ``event_shape`` and sample shapes, and ``sample_and_log_prob`` gives the
    ``log_prob`` of its samples."""
    from fastflow import check_invertibility

    res = assert_transform_contract(
        flow, x, context, atol=atol, rtol=rtol, jac_atol=jac_atol, compile=compile,
        fullgraph=fullgraph,
    )  # fmt: skip
    n = x.shape[0]
    name = type(flow).__name__
    event_shape = tuple(x.shape[1:])
    with torch.no_grad():
        # change of variables, built independently of the flow's own sum of log-dets
        lp = flow.log_prob(x, context)
        _check_logdet(lp, x, f"{name}.log_prob")
        base = flow.base.log_prob(res.z, context).double()
        expected = base + _log_normal(res.latents, n) + res.jacobian_logdet
        _close(lp, expected, f"{name}: log_prob != change of variables", atol, rtol)

        for row in check_invertibility(flow, x, context):
            assert row.max_error <= atol * (1 + row.max_abs_input), (
                f"{name}: layer {row.index} ({row.name}) round trip error {row.max_error:.3e}"
            )
            assert row.max_logdet_sum <= atol * 10, (
                f"{name}: layer {row.index} ({row.name}) |ld_f + ld_inv| {row.max_logdet_sum:.3e}"
            )

        # a conditional flow infers its event shape from a sample, which needs a context
        got = flow.event_shape if context is None else flow.distribution(context).event_shape
        assert tuple(got) == event_shape, f"{name}.event_shape is {tuple(got)}, data {event_shape}"
        if context is None:
            assert tuple(flow.sample(4).shape) == (4, *event_shape)
            assert tuple(flow.sample((2, 3)).shape) == (2, 3, *event_shape)
            xs, lps = flow.sample_and_log_prob(4)
        else:
            assert tuple(flow.sample(context=context).shape) == (n, *event_shape)
            assert tuple(flow.sample(2, context[:1]).shape) == (2, *event_shape)
            xs, lps = flow.sample_and_log_prob(context=context)
        assert tuple(lps.shape) == (xs.shape[0],), f"{name}: sample_and_log_prob shape"
        assert bool(torch.isfinite(xs).all() and torch.isfinite(lps).all())
        _close(lps, flow.log_prob(xs, context), f"{name}: sample_and_log_prob", atol, rtol)
    return res
