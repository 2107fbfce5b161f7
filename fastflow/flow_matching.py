"""Flow matching: simulation-free training of a continuous flow's vector field.

On the straight conditional path from a base sample ``x0`` (``t = 0``) to a data point ``x1``
(``t = 1``), ``x_t = (1 - (1 - sigma_min) t) x0 + t x1``, the velocity is
``u = x1 - (1 - sigma_min) x0``; regressing ``v(t, x_t)`` on ``u`` with ``t ~ U(0, 1)`` learns a
field whose ODE carries the base to the data (Lipman et al. 2023). How ``x0`` is paired with
``x1`` is the *coupling*: ``"independent"`` (a fresh base sample per data point) or ``"ot"``
(minibatch optimal transport, Tong et al. 2024: the exact assignment minimising the summed
squared distances within the batch, ``scipy.optimize.linear_sum_assignment``), which
straightens the learnt paths so fewer solver steps are needed.

After training, a :class:`~fastflow.models.CNF`'s ``log_prob`` is the exact ODE likelihood and
``sample`` integrates from the base, as after maximum likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["couple", "fit", "flow_matching_loss", "ot_assignment"]

COUPLINGS = ("independent", "ot")


def _field_of(model) -> Callable:
    """The velocity ``v(t, x, context)`` of a CNF, a ContinuousFlow or a bare field."""
    if hasattr(model, "velocity"):
        return model.velocity
    if hasattr(model, "field") and hasattr(model, "inverse"):
        return model.field
    if callable(model):
        return model
    raise TypeError(
        "model must be a CNF, a ContinuousFlow or a vector field v(t, x, context), got "
        f"{type(model).__name__}"
    )


def ot_assignment(x0: Tensor, x1: Tensor) -> Tensor:
    """The permutation ``p`` minimising ``sum_i ||x0[p[i]] - x1[i]||^2`` (exact, Hungarian
    algorithm via ``scipy.optimize.linear_sum_assignment``; ``O(n^3)``, meant for minibatches).

    Example:
        >>> x1 = torch.tensor([[0.0], [10.0], [5.0]])
        >>> ot_assignment(x1[[2, 0, 1]] + 0.1, x1).tolist()
        [1, 2, 0]

    Reference: Tong et al., "Improving and generalizing flow-based generative models with
    minibatch optimal transport", TMLR 2024.
    """
    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)}, "
                         f"{tuple(x1.shape)}")  # fmt: skip
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError('the "ot" coupling needs scipy: pip install "fastflow[cnf]"') from None
    n = x0.shape[0]
    cost = torch.cdist(x1.detach().reshape(n, -1).double(), x0.detach().reshape(n, -1).double())
    _, cols = linear_sum_assignment(cost.pow(2).cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def couple(x0: Tensor, x1: Tensor, coupling: str = "independent") -> Tensor:
    """``x0`` reordered to pair with ``x1`` under ``coupling`` (``"independent"``: as given;
    ``"ot"``: :func:`ot_assignment`).

    Example:
        >>> x1 = torch.randn(6, 2)
        >>> torch.equal(couple(x1[[3, 1, 0, 5, 2, 4]], x1, "ot"), x1)
        True
    """
    if coupling not in COUPLINGS:
        raise ValueError(f"coupling must be one of {', '.join(COUPLINGS)}, got {coupling!r}")
    if coupling == "independent":
        return x0
    return x0[ot_assignment(x0, x1)]


def flow_matching_loss(
    model,
    x1: Tensor,
    context: Tensor | None = None,
    *,
    x0: Tensor | None = None,
    t: Tensor | None = None,
    coupling: str = "independent",
    sigma_min: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """Conditional flow-matching loss ``|| v(t, x_t, context) - u ||^2`` (summed over features)
    on straight paths from ``x0`` to the data ``x1``.

    Args:
        model: a :class:`~fastflow.models.CNF` (its :meth:`~fastflow.models.CNF.velocity` and
            base), a :class:`~fastflow.nn.ContinuousFlow`, or a field ``v(t, x, context)``
            (called once with the times as a ``[N, 1]`` tensor).
        x1: data ``[N, ...]``.
        context: optional context ``[N, F]`` (passed to the field; with ``coupling="ot"`` the
            pairing ignores it).
        x0: base samples ``[N, ...]`` (default: the model's base, else a standard normal).
        t: times ``[N]`` in ``[0, 1]`` (default ``U(0, 1)``).
        coupling: ``"independent"`` or ``"ot"`` (minibatch optimal transport).
        sigma_min: width of the path's end at the data (0: exactly straight paths).
        reduction: ``"mean"`` over the batch, or ``"none"`` for ``[N]``.

    Example:
        >>> from fastflow.models import CNF
        >>> flow = CNF(2, hidden=8)
        >>> loss = flow_matching_loss(flow, torch.randn(16, 2), coupling="ot")
        >>> loss.shape, loss.item() > 0
        (torch.Size([]), True)

    Reference: Lipman et al., "Flow Matching for Generative Modeling", ICLR 2023; Tong et al.,
    "Improving and generalizing flow-based generative models with minibatch optimal transport",
    TMLR 2024.
    """
    field = _field_of(model)
    if not isinstance(x1, Tensor) or x1.dim() < 2:
        raise ValueError("x1 must be a tensor of shape [N, ...]")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not (0.0 <= sigma_min < 1.0):
        raise ValueError(f"sigma_min must be in [0, 1), got {sigma_min}")
    n = x1.shape[0]
    if x0 is None:
        base = getattr(model, "base", None)
        x0 = base.sample(n).to(x1) if base is not None else torch.randn_like(x1)
    elif x0.shape != x1.shape:
        raise ValueError(f"x0 must have the shape of x1 {tuple(x1.shape)}, got {tuple(x0.shape)}")
    x0 = couple(x0, x1, coupling)
    if t is None:
        t = torch.rand(n, dtype=x1.dtype, device=x1.device)
    elif t.shape != (n,):
        raise ValueError(f"t must have shape [{n}], got {tuple(t.shape)}")
    tb = t.to(x1.dtype).reshape(n, *([1] * (x1.dim() - 1)))
    xt = (1 - (1 - sigma_min) * tb) * x0 + tb * x1
    u = x1 - (1 - sigma_min) * x0
    # one field evaluation for the whole batch, with a time per sample ([N, 1])
    v = field(t.to(x1.dtype).reshape(n, 1), xt, context)
    if v.shape != x1.shape:
        raise ValueError(f"the field returned shape {tuple(v.shape)} for x {tuple(x1.shape)}")
    per = (v - u).reshape(n, -1).pow(2).sum(1)
    return per.mean() if reduction == "mean" else per


def fit(
    model: nn.Module,
    x: Tensor,
    context: Tensor | None = None,
    *,
    objective: str = "fm",
    steps: int = 1000,
    batch_size: int = 256,
    lr: float = 1e-3,
    coupling: str = "ot",
    sigma_min: float = 0.0,
    seed: int = 0,
    callback: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train a :class:`~fastflow.models.CNF` on ``x`` with Adam, by flow matching
    (``objective="fm"``) or maximum likelihood (``"mle"``: ``-log_prob`` plus the model's
    :meth:`~fastflow.models.CNF.regularization`); returns the loss of every step.

    Batches are drawn with replacement from ``x`` (and ``context``), seeded by ``seed``.

    Example:
        >>> from fastflow.models import CNF
        >>> flow = CNF(2, hidden=16, solver="rk4", steps=8)
        >>> losses = fit(flow, torch.randn(512, 2) * 0.5 + 1.0, steps=20, batch_size=64)
        >>> len(losses)
        20
    """
    if objective not in ("fm", "mle"):
        raise ValueError(f"objective must be 'fm' or 'mle', got {objective!r}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if context is not None and context.shape[0] != x.shape[0]:
        raise ValueError(f"context has {context.shape[0]} rows, x has {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=g)
        xb = x[idx]
        cb = None if context is None else context[idx]
        if objective == "fm":
            loss = flow_matching_loss(model, xb, cb, coupling=coupling, sigma_min=sigma_min)
        else:
            loss = -model.log_prob(xb, cb).mean()
            if hasattr(model, "regularization"):
                loss = loss + model.regularization()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if callback is not None:
            callback(step, losses[-1])
    return losses
