"""Continuous-time flows: a neural ODE ``dx/dt = v(t, x, context)`` as a :class:`Transform`.

Time runs from ``t = 0`` (the base, latent side) to ``t = 1`` (the data side), the convention of
flow matching: ``inverse`` (latent -> data, sampling) integrates from 0 to 1, ``forward`` (data
-> latent) from 1 back to 0. The log-det follows the instantaneous change of variables,
``d log|det dx_t/dx_0| / dt = div v(t, x_t)``, integrated alongside the state, so
``log p(x) = log p_base(z) + forward logdet`` with ``forward logdet = -int_0^1 div v dt``.

The divergence is the cost of a likelihood. :class:`ContinuousFlow` computes it

* exactly (``trace="exact"``, the default up to 16 features): every row of every sample's
  Jacobian from one batched pass -- the field runs once on the ``D`` copies of the batch stacked
  and one backward pass sends the basis vector ``e_i`` into copy ``i`` (not ``D`` separate
  backward passes; measured 4x faster on CPU than ``is_grads_batched``/vmap for small fields);
* or by Hutchinson's estimator (``trace="hutchinson"``): ``eps^T (dv/dx) eps`` with Gaussian or
  Rademacher noise drawn once per solve (FFJORD), one vector-Jacobian product per evaluation.

Integration uses ``torchdiffeq`` (the optional extra ``cnf``). Solver, tolerances, fixed step
counts and the adjoint method are settable; the function evaluations of the last solve are
counted (:attr:`ContinuousFlow.nfe`); the kinetic energy ``int ||v||^2 dt`` and the Jacobian
Frobenius norm ``int ||dv/dx||_F^2 dt`` (Finlay et al. 2020) are accumulated on request.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fastflow.nn.base import Transform

__all__ = ["ContinuousFlow", "VectorField", "divergence"]

ADAPTIVE_SOLVERS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
FIXED_SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "explicit_adams", "implicit_adams")
EXACT_MAX_FEATURES = 16
_ACTIVATIONS = {"softplus": nn.Softplus, "tanh": nn.Tanh, "elu": nn.ELU, "silu": nn.SiLU}


def _torchdiffeq():
    try:
        import torchdiffeq
    except ImportError:
        raise ImportError(
            'continuous flows need torchdiffeq: pip install "fastflow[cnf]"'
        ) from None
    return torchdiffeq


def torchdiffeq_missing() -> str | None:
    """``None`` when torchdiffeq imports, else why not (for the model registry)."""
    try:
        _torchdiffeq()
    except ImportError as e:
        return str(e)
    return None


class VectorField(nn.Module):
    """A time-conditioned MLP vector field ``v(t, x, context) -> dx/dt`` for vectors ``[N, D]``.

    ``t`` is a scalar or one time per sample (``[N]`` / ``[N, 1]``, as flow matching calls it).
    Every layer sees the time (FFJORD's ``ConcatLinear``); the first also sees the context. The
    activations are smooth (softplus by default) so the divergence is informative. The last
    layer starts at zero, so a new field is ``v = 0`` (the identity flow).

    Args:
        features: ``D``.
        hidden: width of the hidden layers.
        hidden_layers: number of hidden layers.
        context_features: context features (0: unconditional).
        activation: ``"softplus"``, ``"tanh"``, ``"elu"`` or ``"silu"``.

    Example:
        >>> v = VectorField(2, hidden=8)
        >>> v(torch.tensor(0.5), torch.randn(3, 2)).shape
        torch.Size([3, 2])

    Reference: Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
    Generative Models", ICLR 2019.
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        hidden_layers: int = 2,
        context_features: int = 0,
        activation: str = "softplus",
    ):
        super().__init__()
        for name, v, low in (
            ("features", features, 1),
            ("hidden", hidden, 1),
            ("hidden_layers", hidden_layers, 0),
            ("context_features", context_features, 0),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}"
            )
        self.features = features
        self.context_features = context_features
        widths = [features + context_features] + [hidden] * hidden_layers
        self.layers = nn.ModuleList(nn.Linear(w + 1, o) for w, o in zip(widths, widths[1:]))
        self.out = nn.Linear(widths[-1] + 1, features)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.context_features:
            if context is None or context.shape != (x.shape[0], self.context_features):
                raise ValueError(
                    f"this vector field needs a context of shape [{x.shape[0]}, "
                    f"{self.context_features}], got "
                    f"{None if context is None else tuple(context.shape)}"
                )
        elif context is not None:
            raise ValueError("context was given but this vector field has no context_features")
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        tt = tt.reshape(1, 1).expand(x.shape[0], 1) if tt.numel() == 1 else tt.reshape(-1, 1)
        h = x if context is None else torch.cat([x, context.to(x.dtype)], 1)
        for layer in self.layers:
            h = self.act(layer(torch.cat([h, tt], 1)))
        return self.out(torch.cat([h, tt], 1))


def divergence(
    fn, x: Tensor, noise: Tensor | None = None, create_graph: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """``(v, div, frobenius)`` of ``v = fn(x)`` per sample: the trace of ``dv/dx`` and
    ``||dv/dx||_F^2``, exact when ``noise`` is ``None``, else Hutchinson's estimates
    ``eps^T J eps`` and ``||eps^T J||^2`` from one vector-Jacobian product.

    The exact trace takes one batched pass: ``fn`` runs once on the ``D`` copies of the batch
    stacked (``[D * N, ...]`` rows) and one backward pass gives every row ``e_i^T J`` of every
    sample's Jacobian (the copy ``i`` gets the cotangent ``e_i``) -- not ``D`` backward passes.
    ``fn`` must treat samples independently.

    Example:
        >>> v, div, fro = divergence(lambda x: 2 * x, torch.randn(4, 3))
        >>> div.tolist(), fro.tolist()
        ([6.0, 6.0, 6.0, 6.0], [12.0, 12.0, 12.0, 12.0])

    Reference: Hutchinson, "A stochastic estimator of the trace of the influence matrix for
    Laplacian smoothing splines", 1989; Grathwohl et al., FFJORD, ICLR 2019.
    """
    n = x.shape[0]
    with torch.enable_grad():
        if noise is not None:
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            v = fn(xg)
            (vjp,) = torch.autograd.grad(v, xg, noise, create_graph=create_graph)
            div = (vjp * noise).reshape(n, -1).sum(1)
            return v, div, vjp.reshape(n, -1).pow(2).sum(1)
        d = x[0].numel()
        xr = x.repeat(d, *([1] * (x.dim() - 1)))
        if not xr.requires_grad:
            xr.requires_grad_(True)
        vr = fn(xr)
        eye = torch.eye(d, dtype=vr.dtype, device=vr.device)
        basis = eye.repeat_interleave(n, 0).reshape(vr.shape)  # copy i: cotangent e_i
        (rows,) = torch.autograd.grad(vr, xr, basis, create_graph=create_graph)
        rows = rows.reshape(d, n, d)  # rows[i, s] = e_i^T J_s
        div = torch.diagonal(rows, dim1=0, dim2=2).sum(-1)
        return vr[:n], div, rows.pow(2).sum((0, 2))


class _Dynamics(nn.Module):
    """The augmented ODE of one solve: state ``(x, log-det, kinetic, frobenius)``."""

    def __init__(self, field: nn.Module):
        super().__init__()
        self.field = field
        self.context: Tensor | None = None
        self.noise: Tensor | None = None
        self.sign = 1.0
        self.regularize = False
        self.nfe = 0

    def forward(self, t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        self.nfe += 1
        x, ctx, n = state[0], self.context, state[0].shape[0]
        create_graph = torch.is_grad_enabled()

        def fn(y: Tensor) -> Tensor:
            c = ctx
            if c is not None and y.shape[0] != n:  # the exact trace's stacked copies
                c = c.repeat(y.shape[0] // n, *([1] * (c.dim() - 1)))
            return self.field(t, y, c)

        v, div, fro = divergence(fn, x, self.noise, create_graph=create_graph)
        if not create_graph:
            v, div, fro = v.detach(), div.detach(), fro.detach()
        div = div.to(state[1].dtype)
        if not self.regularize:
            return v, div
        kin = v.reshape(v.shape[0], -1).pow(2).sum(1).to(state[1].dtype)
        # the regularisers accumulate positively whichever way time runs
        return v, div, self.sign * kin, self.sign * fro.to(state[1].dtype)


class ContinuousFlow(Transform):
    r"""A continuous normalizing flow: the ODE ``dx/dt = field(t, x, context)`` on ``t in [0, 1]``.

    ``forward`` (data -> latent) integrates from ``t = 1`` to ``0``, ``inverse`` from 0 to 1;
    each returns the log-det of its direction from the instantaneous change of variables.

    Args:
        field: the vector field, ``field(t, x, context) -> dx/dt`` (same shape as ``x``;
            samples must not interact), e.g. :class:`VectorField`.
        trace: ``"exact"`` (one batched vector-Jacobian product over the ``D`` basis vectors),
            ``"hutchinson"`` (one product with noise fixed per solve), or ``"auto"``: exact up
            to 16 features, Hutchinson above.
        noise: Hutchinson's noise, ``"rademacher"`` or ``"gaussian"``.
        solver: a ``torchdiffeq`` method: adaptive ``dopri5`` (default), ``dopri8``, ``bosh3``,
            ``fehlberg2``, ``adaptive_heun``, or fixed-step ``euler``, ``midpoint``, ``heun2``,
            ``heun3``, ``rk4``, ``explicit_adams``, ``implicit_adams``.
        rtol, atol: tolerances of the adaptive solvers.
        steps: number of steps of a fixed-step solver (default 20); not for adaptive solvers.
        adjoint: integrate the gradients backwards with the adjoint method
            (``torchdiffeq.odeint_adjoint``): memory independent of the number of steps.
        regularize: also integrate the kinetic energy ``int ||v||^2 dt`` and the Jacobian
            Frobenius norm ``int ||dv/dx||_F^2 dt`` (Hutchinson's estimate unless the trace is
            exact); after a solve they are :attr:`kinetic_energy` and :attr:`jacobian_frobenius`
            (``[N]``, differentiable), to be weighted into the loss.

    Attributes:
        nfe: function evaluations of the last solve (forward integration only).
        nfe_backward: evaluations by the adjoint's backward integration since the last solve.

    Example:
        >>> cf = ContinuousFlow(VectorField(2, hidden=8), solver="rk4", steps=4)
        >>> z, ld = cf(torch.randn(5, 2))
        >>> x, ld_inv = cf.inverse(z)
        >>> z.shape, ld.shape, cf.nfe
        (torch.Size([5, 2]), torch.Size([5]), 16)

    Reference: Chen et al., "Neural Ordinary Differential Equations", NeurIPS 2018; Grathwohl et
    al., "FFJORD", ICLR 2019; Finlay et al., "How to train your neural ODE: the world of
    Jacobian and kinetic regularization", ICML 2020.
    """

    def __init__(
        self,
        field: nn.Module,
        *,
        trace: str = "auto",
        noise: str = "rademacher",
        solver: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        steps: int | None = None,
        adjoint: bool = False,
        regularize: bool = False,
    ):
        super().__init__()
        _torchdiffeq()
        if not callable(field):
            raise TypeError(f"field must be a callable module, got {type(field).__name__}")
        if trace not in ("auto", "exact", "hutchinson"):
            raise ValueError(f"trace must be 'auto', 'exact' or 'hutchinson', got {trace!r}")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise must be 'rademacher' or 'gaussian', got {noise!r}")
        if solver not in ADAPTIVE_SOLVERS + FIXED_SOLVERS:
            raise ValueError(
                f"solver must be one of {', '.join(ADAPTIVE_SOLVERS + FIXED_SOLVERS)}, "
                f"got {solver!r}"
            )
        for name, tol in (("rtol", rtol), ("atol", atol)):
            if not (isinstance(tol, (int, float)) and tol > 0 and math.isfinite(tol)):
                raise ValueError(f"{name} must be a positive number, got {tol!r}")
        if steps is not None:
            if solver in ADAPTIVE_SOLVERS:
                raise ValueError(
                    f"steps is for fixed-step solvers ({', '.join(FIXED_SOLVERS)}); the "
                    f"adaptive {solver!r} is controlled by rtol/atol"
                )
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"steps must be a positive int, got {steps!r}")
        elif solver in FIXED_SOLVERS:
            steps = 20
        self.dynamics = _Dynamics(field)
        self.trace, self.noise_kind, self.solver = trace, noise, solver
        self.rtol, self.atol, self.steps = float(rtol), float(atol), steps
        self.adjoint, self.regularize = bool(adjoint), bool(regularize)
        self.nfe = 0
        self.kinetic_energy: Tensor | None = None
        self.jacobian_frobenius: Tensor | None = None

    @property
    def field(self) -> nn.Module:
        """The vector field."""
        return self.dynamics.field

    @property
    def nfe_backward(self) -> int:
        return self.dynamics.nfe - self.nfe

    def extra_repr(self) -> str:
        how = f"steps={self.steps}" if self.steps else f"rtol={self.rtol:g}, atol={self.atol:g}"
        return f"solver={self.solver}, {how}, trace={self.trace}, adjoint={self.adjoint}"

    def uses_exact_trace(self, x: Tensor) -> bool:
        """Whether a solve on ``x`` computes the exact divergence (``trace="auto"``: up to 16
        features)."""
        if self.trace == "auto":
            return x[0].numel() <= EXACT_MAX_FEATURES
        return self.trace == "exact"

    def _solve(self, x: Tensor, context: Tensor | None, t0: float, t1: float):
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 2:
            raise ValueError(f"x must have shape [N, ...], got {tuple(x.shape)}")
        tde = _torchdiffeq()
        dyn = self.dynamics
        n = x.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        if self.uses_exact_trace(x):
            dyn.noise = None
        elif self.noise_kind == "gaussian":
            dyn.noise = torch.randn_like(x)
        else:
            dyn.noise = torch.randint_like(x, 0, 2) * 2 - 1
        dyn.context, dyn.sign = context, (1.0 if t1 > t0 else -1.0)
        dyn.regularize = self.regularize
        dyn.nfe = 0
        zeros = x.new_zeros(n, dtype=acc)
        state = (x, zeros) + ((zeros, zeros) if self.regularize else ())
        if self.steps:
            ts = torch.linspace(t0, t1, self.steps + 1, dtype=acc, device=x.device)
        else:
            ts = torch.tensor([t0, t1], dtype=acc, device=x.device)
        kw = dict(method=self.solver, rtol=self.rtol, atol=self.atol)
        if self.adjoint:
            params = tuple(p for p in self.field.parameters() if p.requires_grad)
            if context is not None and context.requires_grad:
                params = params + (context,)
            out = tde.odeint_adjoint(dyn, state, ts, adjoint_params=params, **kw)
        else:
            out = tde.odeint(dyn, state, ts, **kw)
        self.nfe = dyn.nfe
        if self.regularize:
            self.kinetic_energy, self.jacobian_frobenius = out[2][-1], out[3][-1]
        return out[0][-1], out[1][-1]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(x, context, 1.0, 0.0)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._solve(z, context, 0.0, 1.0)
