"""Consecutive whole-layer kernel layers as **one** autograd node (issue 13).

A small vector flow's training step pays torch's fixed cost per autograd node: a Python
``autograd.Function`` costs about 40-50 us forward + backward on this CPU even when its work is
trivial, as much as the native kernel of a 256 x 2 MAF layer itself. ``Compose`` (and so every
``Flow``) therefore runs a run of consecutive layers that each take one native call each way —
``MLPAffineCoupling`` and ``MaskedAffineAutoregressive`` on their whole-layer CPU kernel, with
``Reverse`` between them — as one node: the forward calls the layers' kernels in order and keeps
what each backward needs, the backward calls their backward kernels in reverse order. The same
kernels and the same arithmetic as layer by layer, so the same numbers (tests compare both paths).

Only where every layer of the run would take its kernel path anyway (CPU, fp32/fp64, native
backend, no autocast, not under ``torch.compile``, no context, within the kernels' size bounds),
gradients are being recorded, and no module hook (forward, forward-pre, backward,
backward-pre) is registered on the layers or globally (a run skips the layers' ``__call__``;
with a hook every layer runs on its own, so the hook sees every call). ``ENABLED = False``
turns it off.

Example:
    >>> from fastflow.models import MAF
    >>> from fastflow.ops import chain
    >>> flow = MAF(4, layers=3, hidden=(16, 16))
    >>> x = torch.randn(8, 4)
    >>> lp = flow.log_prob(x)  # one node for the three MADE layers and the two Reverses
    >>> chain.ENABLED = False
    >>> torch.allclose(lp, flow.log_prob(x))  # layer by layer: the same numbers
    True
    >>> chain.ENABLED = True
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.modules import module as _module

from fastflow import _backend as B

#: Run eligible consecutive kernel layers of a ``Compose`` as one autograd node.
ENABLED = True


def _no_hooks(m: torch.nn.Module) -> bool:
    return not (
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def _globally_eligible(x: Tensor, context) -> bool:
    return (
        ENABLED
        and context is None
        and isinstance(x, Tensor)
        and x.dim() == 2
        and x.dtype in (torch.float32, torch.float64)
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
        and not _module._global_forward_hooks
        and not _module._global_forward_pre_hooks
        and not _module._global_backward_hooks
        and not _module._global_backward_pre_hooks
        and B.use_native(x)
    )


def collect(transforms, i: int, x: Tensor, context) -> tuple[list, list[Tensor], int] | None:
    """The run of chainable layers starting at ``transforms[i]`` for input ``x``: ``(steps,
    params, end)`` with at least two kernel layers, or None. Each layer's ``_chain_step(x)``
    returns its step (or None where it would not take its kernel path for ``x``)."""
    first = getattr(transforms[i], "_chain_step", None)
    if first is None or not _globally_eligible(x, context):
        return None
    steps, params, kernels, end, n = [], [], 0, i, len(transforms)
    while end < n:
        t = transforms[end]
        make = getattr(t, "_chain_step", None)
        st = make(x) if make is not None and _no_hooks(t) else None
        if st is None:
            break
        steps.append(st)
        if st.param is not None:
            params.append(st.param)
            kernels += 1
        end += 1
    while steps and steps[-1].param is None:  # a trailing Reverse runs on its own
        steps.pop()
        end -= 1
    if kernels < 2:
        return None
    return steps, params, end


def run(steps: list, params: list[Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, logdet)`` of the run (logdet in the accumulation dtype, as the layers')."""
    return _Chain.apply(x, steps, *params)


class _Chain(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, steps, *params):
        saved, logdet, pi = [], None, 0
        for st in steps:
            p = None
            if st.param is not None:
                p, pi = params[pi], pi + 1
            x, ld, keep = st.forward(x, p)
            saved.append(keep)
            if ld is not None:
                logdet = ld if logdet is None else logdet.add_(ld)
        ctx.steps, ctx.saved = steps, saved
        return x, logdet

    @staticmethod
    def backward(ctx, grad_y, grad_logdet):
        steps, saved = ctx.steps, ctx.saved
        grads = []
        g = grad_y
        for st, keep in zip(reversed(steps), reversed(saved)):
            g, gp = st.backward(keep, g, grad_logdet)
            if st.param is not None:
                grads.append(gp)
        return (g, None, *reversed(grads))


# -- steps ---------------------------------------------------------------------------------------


class FlipStep:
    """``Reverse`` on ``[N, D]``: ``x.flip(1)``, log-det 0. (The kernel layers' steps live
    beside their ops: ``mlp_coupling.CouplingStep``, ``made_density.MadeStep``.)"""

    __slots__ = ()
    param = None

    def forward(self, x, p):
        return x.flip(1), None, None

    def backward(self, keep, g, grad_logdet):
        return g.flip(1), None
