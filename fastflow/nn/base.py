"""The transform interface shared by every fastflow layer, and composition of transforms.

Direction convention (one for the whole library): ``forward`` is the *normalizing* direction,
data ``x`` -> latent ``z``, and returns ``log|det dz/dx|``; ``inverse`` is the generative
direction, latent -> data, and returns ``log|det dx/dz|`` (the negative of the forward log-det at
the corresponding point). So ``log p(x) = log p_base(z) + forward logdet``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch  # noqa: F401  (the docstring examples use it)
from torch import Tensor, nn

from fastflow._backend import acc_dtype
from fastflow.ops import chain as _chain

__all__ = ["Transform", "Compose", "zero_logdet"]


def zero_logdet(x: Tensor) -> Tensor:
    """A zero log-det of shape ``[N]`` in the accumulation dtype (fp64 for fp64, else fp32)."""
    return x.new_zeros(x.shape[0], dtype=acc_dtype(x.dtype))


class Transform(nn.Module):
    """Base class of an invertible transform with a tractable log-det.

    Subclasses implement ``forward(x, context=None) -> (z, logdet)`` (data -> latent) and
    ``inverse(z, context=None) -> (x, logdet)`` (latent -> data); ``logdet`` has shape ``[N]``
    (fp32, fp64 for fp64 input) and is the log-abs-det of the Jacobian of the map just applied.

    Example:
        >>> class Shift(Transform):
        ...     def forward(self, x, context=None):
        ...         return x + 1, zero_logdet(x)
        ...     def inverse(self, z, context=None):
        ...         return z - 1, zero_logdet(z)
        >>> z, ld = Shift()(torch.zeros(2, 3))
        >>> z.sum().item(), ld.tolist()
        (6.0, [0.0, 0.0])

    Reference: Papamakarios et al., "Normalizing Flows for Probabilistic Modeling and
    Inference", 2021 (the composition and direction conventions).
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _is_split(t: nn.Module) -> bool:
    return getattr(t, "factors_out", False)


class Compose(Transform):
    """A sequence of transforms applied in order; the log-dets add up.

    ``forward`` runs the transforms first to last, ``inverse`` last to first. Transforms that
    factor out part of their input (:class:`fastflow.nn.Split`) store it as a latent; use
    :meth:`forward_with_latents` to get those latents and pass them back to :meth:`inverse`.

    Args:
        transforms: the transforms, in the normalizing (data -> latent) order.

    Example:
        >>> from fastflow.nn.permutation import Reverse
        >>> t = Compose([Reverse(), Reverse()])
        >>> x = torch.randn(4, 3)
        >>> z, ld = t(x)
        >>> torch.equal(z, x), ld.shape
        (True, torch.Size([4]))

    Reference: Rezende & Mohamed, "Variational Inference with Normalizing Flows", 2015.
    """

    def __init__(self, transforms: Iterable[nn.Module]):
        super().__init__()
        self.transforms = nn.ModuleList(transforms)
        for i, t in enumerate(self.transforms):
            if not (hasattr(t, "forward") and hasattr(t, "inverse")):
                raise TypeError(f"transforms[{i}] ({type(t).__name__}) has no inverse()")

    def __len__(self) -> int:
        return len(self.transforms)

    def __getitem__(self, i):
        return self.transforms[i]

    def __iter__(self):
        return iter(self.transforms)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        x, logdet, _ = self._forward(x, context, False)
        return x, logdet

    def _forward(self, x, context, with_latents: bool):
        # Runs of consecutive whole-layer kernel layers go as one autograd node each
        # (fastflow.ops.chain: same kernels, same numbers, less fixed cost per layer).
        logdet = zero_logdet(x)
        latents: list[Tensor] = []
        ts, i, n = self.transforms, 0, len(self.transforms)
        while i < n:
            t = ts[i]
            run = _chain.collect(ts, i, x, context) if hasattr(t, "_chain_step") else None
            if run is not None:
                steps, params, i = run
                x, ld = _chain.run(steps, params, x)
            else:
                i += 1
                if with_latents and hasattr(t, "forward_with_latents"):
                    x, ld, lat = t.forward_with_latents(x, context)
                    latents.extend(lat)
                else:
                    x, ld = t(x, context)
            logdet = logdet + ld
        return x, logdet, latents

    def forward_with_latents(
        self, x: Tensor, context: Tensor | None = None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Like ``forward`` but also returns the latents factored out on the way (forward order)."""
        return self._forward(x, context, True)

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        latents: list[Tensor] | None = None,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor]:
        """Run the transforms backwards.

        Args:
            z: the latent.
            context: optional context.
            latents: factored-out latents as returned by :meth:`forward_with_latents`; consumed
                from the end. Where missing, factored-out parts are sampled from their priors.
            temperature: scales the standard deviation of sampled factored-out parts.
        """
        pending = None if latents is None else list(latents)
        return self._inverse(z, context, pending, temperature)

    def _inverse(self, z, context, pending, temperature):
        # ``pending`` is shared with nested compositions: each Split pops its latent from the end
        logdet = zero_logdet(z)
        for t in reversed(self.transforms):
            if isinstance(t, Compose):
                z, ld = t._inverse(z, context, pending, temperature)
            elif _is_split(t):
                z, ld = t.inverse(z, context, latents=pending, temperature=temperature)
            else:
                z, ld = t.inverse(z, context)
            logdet = logdet + ld
        return z, logdet

    def flat(self) -> list[nn.Module]:
        """The transforms with nested :class:`Compose` expanded, in forward order."""
        out: list[nn.Module] = []
        for t in self.transforms:
            out.extend(t.flat() if isinstance(t, Compose) else [t])
        return out
