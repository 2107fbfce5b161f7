"""Variational inference with flows: fit a flow to an unnormalised log-density by reverse KL.

:func:`fit_density` maximises the evidence lower bound

``ELBO = E_{x ~ q}[log p~(x) - log q(x)] = log Z - KL(q || p)``

of a flow ``q`` (a :class:`fastflow.Flow`) against an unnormalised target ``log p~`` with
reparameterised samples (``flow.rsample_and_log_prob``, i.e. the flow's ``inverse``
direction: use layers whose inverse is cheap, e.g. :class:`~fastflow.nn.PlanarFlow`,
:class:`~fastflow.nn.SplineCoupling`, :class:`~fastflow.nn.InverseAutoregressive`).

The test energies (``U``, with ``p~ = exp(-U)``) are 2-D:

* :func:`two_moons_energy`: ``U_1`` of Rezende & Mohamed (2015, Table 1), the bimodal ring
  usually called "two moons";
* :func:`banana_energy`: the "banana" (twisted Gaussian of Haario et al., 1999:
  ``z_1 ~ N(0, a^2)``, ``z_2 + b (z_1^2 - a^2) ~ N(0, 1)``), normalised, ``log Z = 0``, so
  the ELBO of a fit is its ``-KL``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["banana_energy", "elbo", "fit_density", "two_moons_energy"]


def _check_z(z: object) -> Tensor:
    if not isinstance(z, Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() != 2 or z.shape[1] != 2:
        raise ValueError(f"z must have shape [N, 2], got {tuple(z.shape)}")
    return z


def two_moons_energy(z: Tensor) -> Tensor:
    """Energy ``U_1`` of Rezende & Mohamed (2015): a ring of radius 2 with two modes at
    ``z_1 = +-2``; ``z [N, 2] -> [N]``.

    ``U(z) = 0.5 ((|z| - 2) / 0.4)^2 - log(exp(-0.5 ((z_1 - 2) / 0.6)^2) +
    exp(-0.5 ((z_1 + 2) / 0.6)^2))``.

    Example:
        >>> u = two_moons_energy(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))  # a mode, the centre
        >>> bool(u[0] < u[1])
        True

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """
    _check_z(z)
    r = z.norm(dim=1)
    ring = 0.5 * ((r - 2) / 0.4) ** 2
    a = -0.5 * ((z[:, 0] - 2) / 0.6) ** 2
    b = -0.5 * ((z[:, 0] + 2) / 0.6) ** 2
    return ring - torch.logsumexp(torch.stack([a, b]), dim=0)


def banana_energy(z: Tensor, a: float = 1.5, b: float = 0.5) -> Tensor:
    """Energy of the normalised "banana" (twisted Gaussian): ``z_1 ~ N(0, a^2)``,
    ``z_2 + b (z_1^2 - a^2) ~ N(0, 1)``; ``U = -log p``, so ``log Z = 0``. ``z [N, 2] -> [N]``.

    Example:
        >>> from math import log, pi
        >>> u = banana_energy(torch.tensor([[0.0, 0.5 * 1.5**2]]))  # the mode: U = log(2 pi a)
        >>> abs(u.item() - log(2 * pi * 1.5)) < 1e-6
        True

    Reference: Haario, Saksman & Tamminen, "Adaptive proposal distribution for random walk
    Metropolis algorithm", 1999 (used as a test density by Rezende & Mohamed-style VI papers).
    """
    _check_z(z)
    if not a > 0:
        raise ValueError(f"a must be > 0, got {a!r}")
    z1, z2 = z[:, 0], z[:, 1] + b * (z[:, 0] ** 2 - a * a)
    return 0.5 * (z1 / a) ** 2 + 0.5 * z2**2 + math.log(2 * math.pi * a)


def _check_flow(flow: object) -> None:
    if not hasattr(flow, "rsample_and_log_prob"):
        raise TypeError(
            f"flow must be a fastflow.Flow (with rsample_and_log_prob), got {type(flow).__name__}"
        )


def _int(name: str, v: object, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


@torch.no_grad()
def elbo(log_p: Callable[[Tensor], Tensor], flow: nn.Module, n: int = 4096) -> float:
    """Monte-Carlo ELBO ``mean(log p~(x) - log q(x))`` over ``n`` samples of ``flow``.

    Example:
        >>> from fastflow import Flow, StandardNormal
        >>> from fastflow.nn import Reverse
        >>> q = Flow([Reverse()], StandardNormal(2))
        >>> abs(elbo(lambda x: -banana_energy(x, a=1.0, b=0.0), q, n=10)) < 1e-5  # q == p
        True
    """
    _check_flow(flow)
    _int("n", n, 1)
    x, lq = flow.rsample_and_log_prob(n)
    return float((log_p(x).to(lq.dtype) - lq).mean())


def fit_density(
    log_p: Callable[[Tensor], Tensor],
    flow: nn.Module,
    steps: int = 1000,
    batch: int = 256,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    anneal_steps: int = 0,
    clip_grad: float | None = 10.0,
) -> Tensor:
    """Fit ``flow`` to the unnormalised log-density ``log_p`` by reverse KL (max ELBO).

    Each step draws ``batch`` reparameterised samples ``x, log q(x)`` from the flow and takes a
    gradient step on ``-mean(beta log p~(x) - log q(x))``; ``beta`` rises linearly from 0.01 to 1
    over ``anneal_steps`` (Rezende & Mohamed's annealing; 0: no annealing).

    Args:
        log_p: ``x [N, D] -> [N]``, the target's log-density up to a constant (e.g.
            ``lambda x: -two_moons_energy(x)``).
        flow: a :class:`fastflow.Flow` (trained in place).
        steps, batch: optimisation steps and samples per step.
        lr: Adam's learning rate (ignored when ``optimizer`` is given).
        optimizer: an optimizer over ``flow``'s parameters (default Adam).
        anneal_steps: length of the inverse-temperature warm-up.
        clip_grad: gradient-norm clip (None: off).

    Returns:
        The ELBO (untempered, ``beta = 1``) of each step's batch, ``[steps]`` fp64: it
        approaches ``log Z`` from below as ``q -> p``.

    Example:
        >>> from fastflow import Flow, StandardNormal
        >>> from fastflow.nn import PlanarFlow
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> q = Flow([PlanarFlow(2) for _ in range(2)], StandardNormal(2))
        >>> curve = fit_density(lambda x: -banana_energy(x), q, steps=40, batch=64, lr=2e-2)
        >>> bool(curve[-10:].mean() > curve[:10].mean())
        True

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """
    _check_flow(flow)
    if not callable(log_p):
        raise TypeError(f"log_p must be callable, got {type(log_p).__name__}")
    steps, batch = _int("steps", steps, 1), _int("batch", batch, 1)
    anneal_steps = _int("anneal_steps", anneal_steps, 0)
    if optimizer is None:
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        params = [p for p in flow.parameters() if p.requires_grad]
        if not params:
            raise ValueError("flow has no trainable parameters")
        optimizer = torch.optim.Adam(params, lr=lr)
    curve = torch.empty(steps, dtype=torch.float64)
    was_training = flow.training
    flow.train()
    for i in range(steps):
        beta = 1.0 if i >= anneal_steps else 0.01 + 0.99 * i / anneal_steps
        x, lq = flow.rsample_and_log_prob(batch)
        lp = log_p(x)
        if not isinstance(lp, Tensor) or lp.shape != lq.shape:
            raise ValueError(
                f"log_p must return a tensor of shape [{batch}], got "
                f"{tuple(lp.shape) if isinstance(lp, Tensor) else type(lp).__name__}"
            )
        lp = lp.to(lq.dtype)
        loss = -(beta * lp - lq).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(
                [p for g in optimizer.param_groups for p in g["params"]], clip_grad
            )
        optimizer.step()
        curve[i] = float((lp - lq).mean().detach())
    flow.train(was_training)
    return curve
