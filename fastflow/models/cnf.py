"""A ready continuous normalizing flow: :class:`CNF`, a :class:`~fastflow.Flow` around one
:class:`~fastflow.nn.continuous.ContinuousFlow` with a standard normal base, trainable by
maximum likelihood (FFJORD) or by flow matching (:mod:`fastflow.flow_matching`)."""

from __future__ import annotations

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor

from fastflow.distributions import StandardNormal
from fastflow.flow import Flow
from fastflow.nn.continuous import ContinuousFlow, VectorField

__all__ = ["CNF"]


class CNF(Flow):
    r"""Continuous normalizing flow on vectors: an MLP vector field ``v(t, x, context)``
    integrated over ``t in [0, 1]`` from a standard normal (``t = 0``) to the data (``t = 1``).

    A :class:`~fastflow.Flow`: ``log_prob`` is the exact ODE likelihood (up to the solver's
    tolerance; with ``trace="hutchinson"`` an unbiased estimate), ``sample`` integrates from the
    base. Train it by maximum likelihood (``-log_prob(x).mean()`` plus, optionally,
    :meth:`regularization`) or by flow matching
    (:func:`fastflow.flow_matching.flow_matching_loss` on :meth:`velocity`).

    Args:
        features: ``D``.
        hidden: width of the vector field's hidden layers.
        hidden_layers: number of hidden layers.
        context: context features (0: unconditional).
        activation: ``"softplus"`` (default), ``"tanh"``, ``"elu"`` or ``"silu"``.
        trace, noise, solver, rtol, atol, steps, adjoint: see
            :class:`~fastflow.nn.continuous.ContinuousFlow`.
        kinetic, jacobian: weights of the kinetic-energy and Jacobian-Frobenius regularisers
            (Finlay et al. 2020) in :meth:`regularization`; either > 0 makes every solve
            integrate them.

    Example:
        >>> flow = CNF(2, hidden=16, solver="rk4", steps=8)
        >>> x = flow.sample(10)
        >>> flow.log_prob(x).shape, flow.nfe
        (torch.Size([10]), 32)

    Reference: Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019; Lipman et al., "Flow Matching for Generative Modeling", ICLR
    2023.
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        hidden_layers: int = 2,
        context: int = 0,
        activation: str = "softplus",
        trace: str = "auto",
        noise: str = "rademacher",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        steps: int | None = None,
        adjoint: bool = False,
        kinetic: float = 0.0,
        jacobian: float = 0.0,
    ) -> None:
        if not (kinetic >= 0 and jacobian >= 0):
            raise ValueError(f"kinetic and jacobian must be >= 0, got {kinetic}, {jacobian}")
        field = VectorField(features, hidden, hidden_layers, context, activation)
        ode = ContinuousFlow(
            field,
            trace=trace,
            noise=noise,
            solver=solver,
            rtol=rtol,
            atol=atol,
            steps=steps,
            adjoint=adjoint,
            regularize=kinetic > 0 or jacobian > 0,
        )
        super().__init__([ode], StandardNormal(features), event_shape=(features,))
        self.features = int(features)
        self.context_features = int(context)
        self.kinetic, self.jacobian = float(kinetic), float(jacobian)

    @property
    def ode(self) -> ContinuousFlow:
        """The :class:`~fastflow.nn.continuous.ContinuousFlow`."""
        return self.transforms[0]

    @property
    def nfe(self) -> int:
        """Function evaluations of the last solve."""
        return self.ode.nfe

    def velocity(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        """The vector field ``v(t, x, context)`` (what flow matching regresses)."""
        return self.ode.field(t, x, context)

    def regularization(self) -> Tensor:
        """``kinetic * mean kinetic energy + jacobian * mean Jacobian Frobenius norm`` of the last
        solve (a zero tensor when both weights are 0); add it to the training loss."""
        ode = self.ode
        if not ode.regularize or ode.kinetic_energy is None:
            return torch.zeros(())
        return (
            self.kinetic * ode.kinetic_energy.mean() + self.jacobian * ode.jacobian_frobenius.mean()
        )
