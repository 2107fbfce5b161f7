"""Invertible recomputation: train a chain of invertible transforms keeping only its output.

Autograd normally stores every intermediate activation of every layer, so activation memory
grows with depth. Here a chain of transforms runs forward under ``no_grad`` and saves only its
final output; the backward pass walks the chain from the end, rebuilding each transform's input
with its exact inverse, re-running that one transform with grad enabled and back-propagating
through it. Peak activation memory is one transform's worth, whatever the depth; the price is
one extra inverse and one extra forward per transform. A transform with a
``recompute_backward(y, grad_y, grad_logdet, index)`` method (:class:`~fastflow.nn.GlowStep`)
does both at once and runs its conditioner network once: the conditioner's input is the same
in both directions (the untouched half), so the inverse's conditioner pass, kept with its graph,
serves the backward too. Parameters are passed to the
``autograd.Function`` explicitly so their gradients flow.

Reference: Gomez et al., "The Reversible Residual Network: Backpropagation Without Storing
Activations", 2017; the Glow and i-RevNet codebases use the same idea.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastflow.nn.base import zero_logdet

__all__ = ["invertible_checkpoint"]


class _InvertibleChain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, transforms, x, context, *params):
        y, logdet = x, zero_logdet(x)
        for t in transforms:
            y, ld = t(y, context)
            logdet = logdet + ld
        if y is x:  # an identity chain; the output must be a new tensor
            y = y.clone()
        ctx.transforms = transforms
        ctx.params = params
        ctx.save_for_backward(y, context)
        return y, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        y, context = ctx.saved_tensors
        params = ctx.params
        index = {id(p): i for i, p in enumerate(params)}
        grad_params: list[Tensor | None] = [None] * len(params)
        need_ctx = context is not None and ctx.needs_input_grad[2]
        grad_ctx = None
        for t in reversed(ctx.transforms):
            hook = getattr(t, "recompute_backward", None)
            done = None
            if hook is not None and context is None:
                # the transform rebuilds its input and back-propagates in one go, running its
                # conditioner once (the generic path below runs it twice: inverse + forward)
                done = hook(y, grad_y, grad_logdet, index)
            if done is not None:
                x, grad_y, pgrads = done
                for i, g in pgrads.items():
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
                y = x
                continue
            with torch.no_grad():
                x, _ = t.inverse(y, context)
            with torch.enable_grad():
                xr = x.detach().requires_grad_(True)
                c = context
                if need_ctx:
                    c = context.detach().requires_grad_(True)
                yr, ldr = t(xr, c)
                tparams = [p for p in t.parameters() if id(p) in index]
                inputs = [xr, *tparams] + ([c] if need_ctx else [])
                outs, grads_out = [], []
                for o, g in ((yr, grad_y), (ldr, grad_logdet)):
                    if o.requires_grad:
                        outs.append(o)
                        grads_out.append(g.to(o.dtype))
                if outs:
                    grads = torch.autograd.grad(outs, inputs, grads_out, allow_unused=True)
                else:
                    grads = (None,) * len(inputs)
            gx = grads[0]
            grad_y = torch.zeros_like(xr) if gx is None else gx
            for p, g in zip(tparams, grads[1 : 1 + len(tparams)]):
                if g is not None:
                    i = index[id(p)]
                    grad_params[i] = g if grad_params[i] is None else grad_params[i] + g
            if need_ctx and grads[-1] is not None:
                grad_ctx = grads[-1] if grad_ctx is None else grad_ctx + grads[-1]
            y = x
        return (None, grad_y, grad_ctx, *grad_params)


def invertible_checkpoint(
    transforms: Sequence[nn.Module], x: Tensor, context: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Run ``transforms`` forward on ``x`` storing only the output for backward.

    Gradients (for ``x``, ``context`` and every parameter of the transforms) equal those of the
    plain forward up to the round-off of the inverses. Every transform must have an exact
    ``inverse(z, context) -> (x, logdet)`` and a deterministic forward.

    Args:
        transforms: the chain, in forward order.
        x: input ``[N, ...]``.
        context: optional context passed to every transform.

    Returns:
        ``(z, logdet)`` like ``Compose(transforms)(x, context)``.

    Example:
        >>> from fastflow.nn.coupling import AffineCoupling
        >>> layers = [AffineCoupling(4, hidden=8, parity=i % 2) for i in range(3)]
        >>> x = torch.randn(5, 4, requires_grad=True)
        >>> z, ld = invertible_checkpoint(layers, x)
        >>> (z.sum() + ld.sum()).backward()
        >>> x.grad.shape
        torch.Size([5, 4])

    Reference: Gomez et al., "The Reversible Residual Network", 2017.
    """
    transforms = list(transforms)
    if not torch.is_grad_enabled():
        logdet = zero_logdet(x)
        for t in transforms:
            x, ld = t(x, context)
            logdet = logdet + ld
        return x, logdet
    params, seen = [], set()
    for t in transforms:
        for p in t.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
    return _InvertibleChain.apply(transforms, x, context, *params)
