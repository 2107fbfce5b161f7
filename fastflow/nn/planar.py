"""Planar and radial flows (Rezende & Mohamed, 2015) and the batch-normalisation flow of MAF.

Planar and radial maps are defined in the generative direction (latent -> data), where they
are closed-form and cheap: that is what variational inference samples through. In fastflow's
convention (``forward`` = data -> latent) that map is therefore :meth:`inverse`, and
``forward`` solves it:

* :class:`PlanarFlow`: ``x = z + u_hat tanh(w^T z + b)``. ``forward`` reduces to the 1-D root
  ``alpha + (w^T u_hat) tanh(alpha + b) = w^T x`` for ``alpha = w^T z``, found by Newton's
  method inside a bracket (bisection where a Newton step leaves it).
* :class:`RadialFlow`: ``x = z + beta (z - z0) / (alpha + |z - z0|)``. ``forward`` solves for the
  radius in closed form (a quadratic with one non-negative root).

Both keep their constraint (planar ``w^T u_hat >= -1``, radial ``beta >= -alpha``) by
reparameterisation, so they are invertible for every parameter value; with
``constrained=False`` the raw parameters are used and ``forward`` raises a ``ValueError`` where
the map is not invertible.

Gradients of the solved direction use the implicit-function rule at the solution (exact first
derivatives; no differentiation through the iterations).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow._backend import acc_dtype
from fastflow.nn.base import Transform

__all__ = ["BatchNormFlow", "PlanarFlow", "RadialFlow"]


def _check_features(features: object) -> int:
    if isinstance(features, bool) or not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive int, got {features!r}")
    return features


def _check_x(x: object, name: str, features: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"{name} must have shape [N, {features}], got {tuple(x.shape)}")
    return x


def _no_context(context: Tensor | None, name: str) -> None:
    if context is not None:
        raise ValueError(f"{name} takes no context, but context was given")


class PlanarFlow(Transform):
    r"""Planar flow ``x = z + u_hat h(w^T z + b)``, ``h = tanh`` (Rezende & Mohamed, 2015).

    * ``inverse(z) -> (x, logdet)``: the closed-form map (the sampling direction),
      ``logdet = log|1 + u_hat^T w h'(w^T z + b)|``.
    * ``forward(x) -> (z, logdet)``: its inverse by a bracketed 1-D Newton iteration: with
      ``alpha = w^T z`` and ``a = w^T u_hat``, ``alpha + a tanh(alpha + b) = w^T x`` has exactly
      one root in ``[w^T x - |a|, w^T x + |a|]`` when ``a >= -1``; then
      ``z = x - u_hat tanh(alpha + b)``.

    ``u_hat = u + (m(w^T u) - w^T u) w / |w|^2`` with ``m(a) = -1 + softplus(a)`` keeps
    ``w^T u_hat > -1`` (invertible).

    Args:
        features: ``D``.
        constrained: reparameterise ``u`` as above (default). If False, ``u`` is used as is and
            ``forward`` raises ``ValueError`` where ``w^T u < -1`` (no inverse).
        max_iter: Newton iterations at most; ``tol``: stop when every step is below it.

    Example:
        >>> layer = PlanarFlow(3)
        >>> z = torch.randn(5, 3)
        >>> x, ld = layer.inverse(z)
        >>> z2, ld2 = layer(x)
        >>> torch.allclose(z2, z, atol=1e-5), torch.allclose(ld2, -ld, atol=1e-5)
        (True, True)

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def __init__(
        self, features: int, constrained: bool = True, max_iter: int = 100, tol: float = 1e-12
    ) -> None:
        super().__init__()
        self.features = _check_features(features)
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        self.constrained, self.max_iter, self.tol = bool(constrained), max_iter, float(tol)
        bound = 1.0 / math.sqrt(features)
        self.w = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.u = nn.Parameter(torch.empty(features).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(()))

    def u_hat(self) -> Tensor:
        """The constrained ``u`` (``w^T u_hat >= -1``), or ``u`` when not constrained."""
        if not self.constrained:
            return self.u
        wu = self.w @ self.u
        m = -1 + F.softplus(wu)
        return self.u + (m - wu) * self.w / (self.w @ self.w).clamp_min(1e-30)

    def _params(self, x: Tensor):
        return self.w.to(x.dtype), self.u_hat().to(x.dtype), self.b.to(x.dtype)

    def _logdet(self, pre: Tensor, wu: Tensor) -> Tensor:
        h1 = 1 - torch.tanh(pre) ** 2
        return torch.log(torch.abs(1 + wu * h1))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The closed-form planar map ``z [N, D] -> (x, logdet [N])`` (sampling direction)."""
        _check_x(z, "z", self.features)
        _no_context(context, "PlanarFlow")
        w, u, b = self._params(z)
        pre = z @ w + b
        x = z + u * torch.tanh(pre)[:, None]
        return x, self._logdet(pre, w @ u).to(acc_dtype(z.dtype))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Its inverse by the bracketed Newton root find: ``x [N, D] -> (z, logdet [N])``."""
        _check_x(x, "x", self.features)
        _no_context(context, "PlanarFlow")
        w, u, b = self._params(x)
        wu = w @ u
        if not self.constrained and float(wu.detach()) < -1:
            raise ValueError(
                f"PlanarFlow is not invertible: w^T u = {float(wu.detach()):.4g} < -1 "
                "(constrained=False); use constrained=True"
            )
        target = x @ w
        with torch.no_grad():
            alpha = self._solve(target.detach(), wu.detach(), b.detach())
        if torch.is_grad_enabled() and any(t.requires_grad for t in (x, w, u, b)):
            # implicit rule: g(alpha) = alpha + a tanh(alpha + b) - w^T x = 0
            g = alpha + wu * torch.tanh(alpha + b) - target
            gp = (1 + wu * (1 - torch.tanh(alpha + b) ** 2)).detach()
            alpha = alpha - (g - g.detach()) / gp
        pre = alpha + b
        z = x - u * torch.tanh(pre)[:, None]
        return z, -self._logdet(pre, wu).to(acc_dtype(x.dtype))

    def _solve(self, target: Tensor, a: Tensor, b: Tensor) -> Tensor:
        tol = max(self.tol, 4 * torch.finfo(target.dtype).eps)
        span = a.abs()
        lo, hi = target - span, target + span
        alpha = target.clone()
        for _ in range(self.max_iter):
            t = torch.tanh(alpha + b)
            g = alpha + a * t - target
            # g is increasing: shrink the bracket around the root
            lo = torch.where(g < 0, alpha, lo)
            hi = torch.where(g > 0, alpha, hi)
            gp = 1 + a * (1 - t * t)
            step = g / gp.clamp_min(1e-30)
            new = alpha - step
            outside = (new <= lo) | (new >= hi) | ~torch.isfinite(new)
            new = torch.where(outside, (lo + hi) / 2, new)
            done = bool(((new - alpha).abs() <= tol * (1 + alpha.abs())).all())
            alpha = new
            if done:
                break
        return alpha

    def extra_repr(self) -> str:
        return f"features={self.features}, constrained={self.constrained}"


class RadialFlow(Transform):
    r"""Radial flow ``x = z + beta h(alpha, r) (z - z0)``, ``h = 1 / (alpha + r)``,
    ``r = |z - z0|`` (Rezende & Mohamed, 2015).

    * ``inverse(z) -> (x, logdet)``: the closed-form map (sampling direction),
      ``logdet = (D - 1) log(1 + beta h) + log(1 + beta h + beta h'(r) r)``.
    * ``forward(x) -> (z, logdet)``: closed form: the radius ``r`` of ``z`` solves
      ``r^2 + (alpha + beta - r_x) r - alpha r_x = 0`` (``r_x = |x - z0|``), whose non-negative
      root is unique; then ``z = z0 + (x - z0) / (1 + beta h(alpha, r))``.

    ``alpha = softplus(alpha_raw) > 0`` and ``beta = -alpha + softplus(beta_raw) > -alpha`` keep it
    invertible; with ``constrained=False`` the raw values are used (``alpha`` must still be > 0)
    and ``forward`` raises ``ValueError`` where ``beta < -alpha``.

    Example:
        >>> layer = RadialFlow(2)
        >>> z = torch.randn(4, 2)
        >>> x, ld = layer.inverse(z)
        >>> torch.allclose(layer(x)[0], z, atol=1e-5)
        True

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", ICML 2015.
    """

    def __init__(self, features: int, constrained: bool = True) -> None:
        super().__init__()
        self.features = _check_features(features)
        self.constrained = bool(constrained)
        self.z0 = nn.Parameter(torch.randn(features) / math.sqrt(features))
        # constrained: alpha = log 2, beta = 0 (the identity); raw: alpha = 1, beta = 0
        self.alpha_raw = nn.Parameter(torch.full((), 0.0 if constrained else 1.0))
        self.beta_raw = nn.Parameter(torch.zeros(()))

    def alpha_beta(self) -> tuple[Tensor, Tensor]:
        """``(alpha, beta)`` after the constraint (or raw when not constrained)."""
        if not self.constrained:
            return self.alpha_raw, self.beta_raw
        alpha = F.softplus(self.alpha_raw)
        return alpha, -alpha + F.softplus(self.beta_raw)

    def _logdet(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1 / (alpha + r)
        bh = beta * h
        return (self.features - 1) * torch.log1p(bh) + torch.log1p(bh - beta * h * h * r)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The closed-form radial map ``z [N, D] -> (x, logdet [N])`` (sampling direction)."""
        _check_x(z, "z", self.features)
        _no_context(context, "RadialFlow")
        alpha, beta = (t.to(z.dtype) for t in self.alpha_beta())
        z0 = self.z0.to(z.dtype)
        diff = z - z0
        r = diff.norm(dim=1)
        x = z + (beta / (alpha + r))[:, None] * diff
        return x, self._logdet(r, alpha, beta).to(acc_dtype(z.dtype))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The closed-form inverse ``x [N, D] -> (z, logdet [N])``."""
        _check_x(x, "x", self.features)
        _no_context(context, "RadialFlow")
        alpha, beta = (t.to(x.dtype) for t in self.alpha_beta())
        if not self.constrained:
            a, b = float(alpha.detach()), float(beta.detach())
            if a <= 0 or b < -a:
                raise ValueError(
                    f"RadialFlow is not invertible: needs alpha > 0 and beta >= -alpha, got "
                    f"alpha = {a:.4g}, beta = {b:.4g} (constrained=False)"
                )
        z0 = self.z0.to(x.dtype)
        diff = x - z0
        rx = diff.norm(dim=1)
        # r^2 + p r - q = 0, p = alpha + beta - r_x, q = alpha r_x >= 0: the non-negative root,
        # in the form without cancellation for either sign of p
        p, q = alpha + beta - rx, alpha * rx
        sq = torch.sqrt(p * p + 4 * q)
        tiny = torch.finfo(x.dtype).tiny
        r = torch.where(p > 0, 2 * q / (p + sq).clamp_min(tiny), (sq - p) / 2)
        z = z0 + diff / (1 + beta / (alpha + r))[:, None]
        return z, -self._logdet(r, alpha, beta).to(acc_dtype(x.dtype))

    def extra_repr(self) -> str:
        return f"features={self.features}, constrained={self.constrained}"


class BatchNormFlow(Transform):
    r"""Batch normalisation as a flow layer (Papamakarios et al., 2017, MAF's "BatchNorm").

    ``forward``: ``z = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta``,
    ``logdet = sum(log_gamma - 0.5 log(var + eps))`` (times the positions per channel for
    ``[N, C, ...]`` inputs). In training mode ``mean``/``var`` are the batch statistics (biased
    variance, differentiable) and the running averages are updated with ``momentum``; in eval
    mode the running statistics are used, so the layer is a fixed affine map. ``inverse`` uses
    the running statistics in eval mode and, in training mode, those of the last training
    forward (so a training-mode round trip is exact).

    Args:
        features: channels ``C`` (dim 1 of the input).
        momentum: weight of a new batch in the running averages.
        eps: added to the variance.

    Example:
        >>> bn = BatchNormFlow(3)
        >>> _ = bn(torch.randn(64, 3) * 2 + 1)  # training mode: batch statistics
        >>> _ = bn.eval()
        >>> x = torch.randn(5, 3)
        >>> z, ld = bn(x)
        >>> torch.allclose(bn.inverse(z)[0], x, atol=1e-5), ld.shape
        (True, torch.Size([5]))

    Reference: Papamakarios, Pavlakou & Murray, "Masked Autoregressive Flow for Density
    Estimation", NeurIPS 2017 (after Ioffe & Szegedy, 2015; Dinh et al., 2017).
    """

    def __init__(self, features: int, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.features = _check_features(features)
        if not 0 < float(momentum) <= 1:
            raise ValueError(f"momentum must be in (0, 1], got {momentum!r}")
        if not float(eps) > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        self.momentum, self.eps = float(momentum), float(eps)
        self.log_gamma = nn.Parameter(torch.zeros(features))
        self.beta = nn.Parameter(torch.zeros(features))
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("running_var", torch.ones(features))
        self._batch: tuple[Tensor, Tensor] | None = None

    def _check(self, x: object, name: str, context: Tensor | None) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.dim() < 2 or x.shape[1] != self.features:
            raise ValueError(
                f"{name} must have shape [N, {self.features}, ...], got {tuple(x.shape)}"
            )
        _no_context(context, "BatchNormFlow")
        return x

    def _view(self, t: Tensor, x: Tensor) -> Tensor:
        return t.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))

    def _logdet(self, var: Tensor, x: Tensor) -> Tensor:
        per_pos = math.prod(x.shape[2:])
        ld = (self.log_gamma.to(var.dtype) - 0.5 * torch.log(var + self.eps)).sum() * per_pos
        return ld.to(acc_dtype(x.dtype)).expand(x.shape[0]).clone()

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``x [N, C, ...] -> (z, logdet [N])``."""
        self._check(x, "x", context)
        if self.training:
            if x.shape[0] < 2:
                raise ValueError(
                    f"BatchNormFlow in training mode needs a batch of at least 2, got "
                    f"{x.shape[0]} (use eval mode for single samples)"
                )
            dims = [0, *range(2, x.dim())]
            mean = x.mean(dims)
            var = x.var(dims, unbiased=False)
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach().to(self.running_mean))
                self.running_var.mul_(1 - m).add_(m * var.detach().to(self.running_var))
            self._batch = (mean.detach(), var.detach())
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        z = (x - self._view(mean, x)) / torch.sqrt(self._view(var, x) + self.eps)
        z = z * torch.exp(self._view(self.log_gamma, x)) + self._view(self.beta, x)
        return z, self._logdet(var, x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``z [N, C, ...] -> (x, logdet [N])`` (running statistics; see the class doc)."""
        self._check(z, "z", context)
        if self.training and self._batch is not None:
            mean, var = self._batch
        else:
            mean, var = self.running_mean, self.running_var
        mean, var = mean.to(z.dtype), var.to(z.dtype)
        x = (z - self._view(self.beta, z)) * torch.exp(-self._view(self.log_gamma, z))
        x = x * torch.sqrt(self._view(var, z) + self.eps) + self._view(mean, z)
        return x, -self._logdet(var, z)

    def extra_repr(self) -> str:
        return f"features={self.features}, momentum={self.momentum}, eps={self.eps}"
