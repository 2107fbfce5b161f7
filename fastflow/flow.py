"""``Flow``: a sequence of transforms plus a base distribution, and its ``torch.distributions``
view.

Direction convention: the transforms' ``forward`` maps data ``x`` to the latent ``z``
(normalizing direction), so ``log p(x) = log p_base(z) + sum(forward log-dets)``; sampling runs
the transforms' ``inverse``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Distribution, constraints

from fastflow.nn.base import Compose, zero_logdet
from fastflow.nn.recompute import invertible_checkpoint

__all__ = ["Flow", "FlowDistribution"]

_EMPTY = torch.Size()


def _as_compose(transforms) -> Compose:
    if isinstance(transforms, Compose):
        return transforms
    if isinstance(transforms, nn.Module):
        return Compose([transforms])
    return Compose(list(transforms))


class Flow(nn.Module):
    """A normalizing flow: invertible transforms (data -> latent) and a base distribution.

    Args:
        transforms: a transform, a :class:`~fastflow.nn.Compose`, or an iterable of transforms in
            the normalizing (data -> latent) order.
        base: the base distribution of the final latent (``fastflow.distributions``); it must
            have ``log_prob(z, context)`` and ``sample(n, context, temperature)``.
        invertible_recompute: train with invertible recomputation: each chain of transforms
            between factor-outs (:class:`~fastflow.nn.Split`) keeps only its output and the
            backward pass rebuilds inputs with the exact inverses
            (:func:`~fastflow.nn.recompute.invertible_checkpoint`), so activation memory no
            longer grows with depth. Same gradients, about one extra forward+inverse of compute.
        event_shape: shape of one data point; inferred from a sample when omitted.

    Multi-scale flows: latents factored out by ``Split`` layers are returned by
    :meth:`forward_with_latents` and accepted by :meth:`inverse`; their prior log-densities are
    part of the forward log-det, so :meth:`log_prob` is exact.

    Example:
        >>> from fastflow.distributions import StandardNormal
        >>> from fastflow.nn.coupling import AffineCoupling
        >>> flow = Flow([AffineCoupling(2, hidden=16, parity=i % 2) for i in range(4)],
        ...             StandardNormal(2))
        >>> x = flow.sample(10)
        >>> flow.log_prob(x).shape
        torch.Size([10])

    Reference: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and
    Inference", 2021.
    """

    def __init__(
        self,
        transforms: nn.Module | Iterable[nn.Module],
        base: nn.Module,
        invertible_recompute: bool = False,
        event_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.transforms = _as_compose(transforms)
        if not (hasattr(base, "log_prob") and hasattr(base, "sample")):
            raise TypeError(f"base must have log_prob() and sample(), got {type(base).__name__}")
        self.base = base
        self.invertible_recompute = bool(invertible_recompute)
        self._event_shape = None if event_shape is None else tuple(int(s) for s in event_shape)

    # -- normalizing direction -------------------------------------------------------------------

    def _run_forward(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, list]:
        if (
            self._event_shape is not None
            and isinstance(x, torch.Tensor)
            and tuple(x.shape[1:]) != self._event_shape
        ):
            # Also what keeps torch.compile's graphs static in the event dimensions (the check
            # guards them), so only the batch size can become dynamic: inductor (torch 2.13)
            # fails on the symbolic strides a dynamic image size gives Squeeze's output.
            raise ValueError(
                f"x must have shape [N, {', '.join(map(str, self._event_shape))}] for this "
                f"flow, got {tuple(x.shape)}"
            )
        if not (self.invertible_recompute and torch.is_grad_enabled()):
            return self.transforms.forward_with_latents(x, context)
        logdet, latents, chain = zero_logdet(x), [], []

        def flush(x, logdet):
            if chain:
                x, ld = invertible_checkpoint(chain, x, context)
                logdet = logdet + ld
                chain.clear()
            return x, logdet

        for t in self.transforms.flat():
            if hasattr(t, "forward_with_latents"):
                x, logdet = flush(x, logdet)
                x, ld, lat = t.forward_with_latents(x, context)
                latents.extend(lat)
                logdet = logdet + ld
            else:
                chain.append(t)
        x, logdet = flush(x, logdet)
        return x, logdet, latents

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(z, logdet)``: the final latent and the summed forward log-dets (which include the
        log-priors of factored-out parts)."""
        z, logdet, _ = self._run_forward(x, context)
        return z, logdet

    def forward_with_latents(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """``(z, logdet, latents)`` with the factored-out (standardised) latents, forward order."""
        return self._run_forward(x, context)

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Exact log-density ``log p(x | context)``, shape ``[N]`` (fp32; fp64 for fp64)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        z, logdet, _ = self._run_forward(x, context)
        return self.base.log_prob(z, context) + logdet

    # -- generative direction --------------------------------------------------------------------

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        latents: list[Tensor] | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """``(x, logdet)``: map a latent to data; ``logdet = log|det dx/dz|`` summed, including
        ``-log prior`` of the factored-out parts (sampled at ``temperature`` where
        ``latents`` are not given)."""
        return self.transforms.inverse(z, context, latents=latents, temperature=temperature)

    def rsample(
        self,
        n: int | Sequence[int] | None = None,
        context: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Differentiable samples ``[n, *event_shape]`` (reparameterised through the base); ``n``
        may be a ``sample_shape`` tuple as in ``torch.distributions`` (``(2, 3)`` gives
        ``[2, 3, *event_shape]``)."""
        return self._shaped(n, context, temperature)[0]

    def _shaped(self, n, context, temperature) -> tuple[Tensor, Tensor]:
        """:meth:`rsample_and_log_prob` for an int or a ``sample_shape`` tuple."""
        if isinstance(n, (tuple, list, torch.Size)):
            shape = tuple(n)
            if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape):
                raise ValueError(f"sample_shape must hold non-negative ints, got {n!r}")
            x, lp = self.rsample_and_log_prob(math.prod(shape), context, temperature)
            return x.reshape(*shape, *x.shape[1:]), lp.reshape(shape)
        return self.rsample_and_log_prob(n, context, temperature)

    def rsample_and_log_prob(
        self, n: int | None = None, context: Tensor | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """Differentiable samples and their exact log-density under the (untempered) model."""
        n = self._n(n, context)
        z = self.base.sample(n, context, temperature=temperature)
        ctx = self._expand_context(context, n)
        x, logdet = self.inverse(z, ctx, temperature=temperature)
        return x, self.base.log_prob(z, ctx) - logdet

    def sample(
        self,
        n: int | Sequence[int] | None = None,
        context: Tensor | None = None,
        temperature: float = 1.0,
    ) -> Tensor:
        """Samples ``[n, *event_shape]`` without gradients. ``temperature`` scales the standard
        deviation of the base (and of factored-out latents). With a context of ``N`` rows,
        ``n`` defaults to ``N``; a one-row context is used for all ``n`` samples. ``n`` may be a
        ``sample_shape`` tuple (``sample((2, 3))`` is ``[2, 3, *event_shape]``)."""
        with torch.no_grad():
            return self.rsample(n, context, temperature)

    def sample_and_log_prob(
        self,
        n: int | Sequence[int] | None = None,
        context: Tensor | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Samples and their log-density, without gradients (see :meth:`sample`)."""
        with torch.no_grad():
            return self._shaped(n, context, temperature)

    @staticmethod
    def _n(n: int | None, context: Tensor | None) -> int:
        if n is None:
            if context is None:
                raise ValueError("n is required when no context is given")
            return context.shape[0]
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        return n

    @staticmethod
    def _expand_context(context: Tensor | None, n: int) -> Tensor | None:
        if context is None or context.shape[0] == n:
            return context
        if context.shape[0] == 1:
            return context.expand(n, *context.shape[1:])
        raise ValueError(f"context has {context.shape[0]} rows but n={n} samples were asked for")

    # -- torch.distributions view ----------------------------------------------------------------

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one data point (inferred from one sample on first use if not given; a
        conditional flow needs :meth:`distribution` with a context for that)."""
        return self._infer_event_shape(None)

    def _infer_event_shape(self, context: Tensor | None) -> tuple[int, ...]:
        if self._event_shape is None:
            ctx = None if context is None else context[:1]
            with torch.no_grad():
                self._event_shape = tuple(self.sample(1, ctx).shape[1:])
        return self._event_shape

    def distribution(self, context: Tensor | None = None) -> FlowDistribution:
        """This flow as a ``torch.distributions.Distribution`` (optionally conditioned).

        Example:
            >>> from fastflow.distributions import StandardNormal
            >>> from fastflow.nn.permutation import Reverse
            >>> d = Flow([Reverse()], StandardNormal(3)).distribution()
            >>> d.sample((2,)).shape, d.event_shape
            (torch.Size([2, 3]), torch.Size([3]))
        """
        return FlowDistribution(self, context)


class FlowDistribution(Distribution):
    """A :class:`Flow` wrapped as a ``torch.distributions.Distribution``.

    Without context the batch shape is ``()``; with a context ``[B, F]`` it is ``(B,)`` and
    ``sample(sample_shape)`` has shape ``[*sample_shape, B, *event_shape]``. ``log_prob`` takes
    values of shape ``[..., *event_shape]`` (with a context, the dim before the event is ``B``).

    Example:
        >>> from fastflow.distributions import StandardNormal
        >>> from fastflow.nn.permutation import Reverse
        >>> d = FlowDistribution(Flow([Reverse()], StandardNormal(2)))
        >>> d.log_prob(torch.zeros(4, 2)).shape
        torch.Size([4])

    Reference: the ``torch.distributions`` interface (Dillon et al., "TensorFlow
    Distributions", 2017).
    """

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, flow: Flow, context: Tensor | None = None, validate_args=None):
        self.flow = flow
        self.context = context
        event_shape = torch.Size(flow._infer_event_shape(context))
        batch_shape = torch.Size(() if context is None else (context.shape[0],))
        super().__init__(batch_shape, event_shape, validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def _flat_context(self, reps: int) -> Tensor | None:
        if self.context is None:
            return None
        return self.context.repeat(reps, *([1] * (self.context.dim() - 1)))

    def rsample(self, sample_shape=_EMPTY) -> Tensor:
        sample_shape = torch.Size(sample_shape)
        reps = math.prod(sample_shape)
        b = math.prod(self.batch_shape)
        x = self.flow.rsample(reps * b, self._flat_context(reps))
        return x.reshape(*sample_shape, *self.batch_shape, *self.event_shape)

    def sample(self, sample_shape=_EMPTY) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        k = len(self.event_shape)
        if tuple(value.shape[value.dim() - k :]) != tuple(self.event_shape):
            raise ValueError(
                f"value must end with the event shape {tuple(self.event_shape)}, got "
                f"{tuple(value.shape)}"
            )
        lead = value.shape[: value.dim() - k]
        flat = value.reshape(-1, *self.event_shape)
        ctx = None
        if self.context is not None:
            b = self.context.shape[0]
            if len(lead) == 0 or lead[-1] != b:
                raise ValueError(f"with a context of {b} rows, value needs a batch dim of {b}")
            ctx = self._flat_context(flat.shape[0] // b)
        return self.flow.log_prob(flat, ctx).reshape(lead)
