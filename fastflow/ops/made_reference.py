"""Pure-PyTorch pieces of the MADE / MAF ops (:mod:`fastflow.ops.made`): the specification the
native kernels are tested against and the fallback where none is built.

* :class:`PackedMADE` and :func:`degree_mask`: a MADE in sorted coordinates and its masks;
* the masked MLP (``_mlp``, ``_sorted_mlp``) and the density direction in sorted coordinates
  (``_sorted_density``, which the native inverse's backward differentiates);
* :func:`reference_made_affine_inverse`, the naive ``D``-pass inverse (the specification), and
  :func:`torch_degree_walk`, the kernels' degree walk written with torch ops (a second reference
  and the benchmark's baseline).

Nothing here validates its inputs (the public ops in :mod:`fastflow.ops.made` do) or calls
``_C``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops.coupling import _ref_scale

__all__ = [
    "PackedMADE",
    "degree_mask",
    "reference_made_affine_inverse",
    "torch_degree_walk",
]


class PackedMADE(NamedTuple):
    """A MADE in sorted coordinates (see :func:`pack_made`)."""

    order: Tensor  #: int64 [D]: order[k] is the input of degree k + 1
    weights: list[Tensor]  #: masked, rows/cols sorted; the last is [2 D, H_L] (shifts, raw scales)
    biases: list[Tensor]
    context_weight: Tensor | None  #: [H_1, C], rows sorted
    bounds: Tensor  #: int64 [L, D + 1]: bounds[l, m] = #units of layer l with degree <= m
    bounds_list: list[int]  #: the same table as a flat Python list (host-side checks)


def degree_mask(out_deg: Tensor, in_deg: Tensor, strict: bool) -> Tensor:
    """MADE connectivity: unit ``i`` of degree ``out_deg[i]`` reads input ``j`` iff
    ``out_deg[i] >= in_deg[j]`` (hidden layers) or ``>`` (``strict``: the output layer).

    Example:
        >>> degree_mask(torch.tensor([1, 2]), torch.tensor([1, 2]), strict=True).int().tolist()
        [[0, 0], [1, 0]]
    """
    return (out_deg[:, None] > in_deg[None, :]) if strict else (out_deg[:, None] >= in_deg[None, :])


def _act(h: Tensor, activation: str) -> Tensor:
    if not (torch.is_grad_enabled() and h.requires_grad):
        # no autograd graph: in place, saving an allocation (and its page faults) per layer
        if activation == "relu":
            return h.relu_()
        if activation == "tanh":
            return h.tanh_()
        return F.elu_(h)
    if activation == "relu":
        return F.relu(h)
    if activation == "tanh":
        return torch.tanh(h)
    return F.elu(h)


def _mlp(x, weights, biases, activation, context, context_weight) -> Tensor:
    init = None if context is None else context @ context_weight.t()
    return _sorted_mlp(x, weights, biases, init, activation)


def _context_term(packed: PackedMADE, context: Tensor | None) -> Tensor | None:
    """``context @ context_weight^T`` in ``context``'s dtype (the walk's accumulation dtype).

    Autocast is switched off here: under it the product would come back in bf16/fp16 while the
    walk reads the buffer as fp32/fp64 (twice its size)."""
    if context is None:
        return None
    with torch.autocast(context.device.type, enabled=False):
        return (context @ packed.context_weight.to(context.dtype).t()).contiguous()


def _sorted_mlp(xs: Tensor, weights, biases, init, activation: str) -> Tensor:
    h = xs
    last = len(weights) - 1
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = torch.addmm(b, h, w.t())
        if l == 0 and init is not None:
            h = h + init
        if l < last:
            h = _act(h, activation)
    return h


def _sorted_density(xs, weights, biases, init, activation, scale_fn, clamp):
    """u, logdet of the density direction in sorted coordinates (differentiable)."""
    d = xs.shape[1]
    out = _sorted_mlp(xs, weights, biases, init, activation)
    s = _ref_scale(out[:, d : 2 * d], scale_fn, clamp)
    return (xs - out[:, :d]) * torch.exp(-s), -s.sum(1), s


# ----------------------------------------------------------------------------------------------
# The inverse, twice: the naive D-pass loop (the specification) and the degree walk in torch.


def reference_made_affine_inverse(
    u: Tensor,
    packed: PackedMADE,
    context: Tensor | None = None,
    activation: str = "relu",
    scale_fn: str = "softclamp",
    clamp: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """The naive inverse (the specification): ``D`` full network passes, one per input.

    Example:
        >>> from fastflow.ops.made import pack_made
        >>> p = pack_made([torch.randn(4, 2), torch.randn(4, 4)], [torch.zeros(4)] * 2,
        ...               torch.tensor([1, 2]), [torch.ones(4, dtype=torch.long)])
        >>> x, ld = reference_made_affine_inverse(torch.randn(3, 2), p)
        >>> x.shape
        torch.Size([3, 2])
    """
    with torch.autocast(u.device.type, enabled=False):  # the specification: accumulation dtype
        return _reference_inverse(u, packed, context, activation, scale_fn, clamp)


def _reference_inverse(u, packed, context, activation, scale_fn, clamp):
    acc = B.acc_dtype(u.dtype)
    us = u.to(acc)[:, packed.order]
    init = _context_term(packed, None if context is None else context.to(acc))
    ws = [w.to(acc) for w in packed.weights]
    bs = [b.to(acc) for b in packed.biases]
    d = u.shape[1]
    xs = torch.zeros_like(us)
    for k in range(d):
        out = _sorted_mlp(xs, ws, bs, init, activation)
        s = _ref_scale(out[:, d + k], scale_fn, clamp)
        xk = us[:, k] * torch.exp(s) + out[:, k]
        xs = torch.cat([xs[:, :k], xk[:, None], xs[:, k + 1 :]], 1)
    out = _sorted_mlp(xs, ws, bs, init, activation)
    logdet = _ref_scale(out[:, d : 2 * d], scale_fn, clamp).sum(1)
    x = torch.empty_like(xs)
    x[:, packed.order] = xs
    return x.to(u.dtype), logdet


@torch.no_grad()
def torch_degree_walk(
    u: Tensor,
    packed: PackedMADE,
    context: Tensor | None = None,
    activation: str = "relu",
    scale_fn: str = "softclamp",
    clamp: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """The degree walk written with torch slicing and matmuls (no gradients).

    The same algorithm as the native kernels: hidden units of degree 0, then for each input in
    order its output pair from the last layer's finished prefix, then every hidden unit of the next
    degree from its mask's prefix. A second reference and the benchmark's pure-PyTorch baseline.

    Example:
        >>> from fastflow.ops.made import pack_made
        >>> p = pack_made([torch.randn(4, 2), torch.randn(4, 4)], [torch.zeros(4)] * 2,
        ...               torch.tensor([1, 2]), [torch.tensor([1, 1, 0, 1])])
        >>> u = torch.randn(3, 2)
        >>> torch.allclose(torch_degree_walk(u, p)[0], reference_made_affine_inverse(u, p)[0])
        True
    """
    with torch.autocast(u.device.type, enabled=False):
        return _torch_walk(u, packed, context, activation, scale_fn, clamp)


def walk_bounds(packed: PackedMADE, d: int, layers: int) -> list[list[int]]:
    """Per hidden layer, the ``d + 1`` row bounds of its degree groups (rows of degree <= m end
    at ``bounds[l][m]``)."""
    bl = packed.bounds_list
    return [bl[l * (d + 1) : (l + 1) * (d + 1)] for l in range(layers)]


def fill_degree_rows(m, xs, hs, ws, bs, bounds, init, activation) -> None:
    """One step of the degree walk, in place: the hidden rows of degree ``m`` of every layer,
    from the first ``m`` sorted inputs ``xs`` and the finished rows of the layer below."""
    for l in range(len(hs)):
        r0, r1 = (0 if m == 0 else bounds[l][m - 1]), bounds[l][m]
        if r1 <= r0:
            continue
        k = m if l == 0 else bounds[l - 1][m]
        prev = xs if l == 0 else hs[l - 1]
        pre = torch.addmm(bs[l][r0:r1], prev[:, :k], ws[l][r0:r1, :k].t())
        if l == 0 and init is not None:
            pre += init[:, r0:r1]
        hs[l][:, r0:r1] = _act(pre, activation)


def _torch_walk(u, packed, context, activation, scale_fn, clamp):
    acc = B.acc_dtype(u.dtype)
    n, d = u.shape
    us = u.to(acc)[:, packed.order]
    init = _context_term(packed, None if context is None else context.to(acc))
    ws = [w.to(acc) for w in packed.weights]
    bs = [b.to(acc) for b in packed.biases]
    L = len(ws) - 1
    bounds = walk_bounds(packed, d, L)
    hs = [us.new_empty(n, w.shape[0]) for w in ws[:-1]]
    xs = us.new_empty(n, d)
    w_pair = ws[-1].view(2, d, -1).transpose(0, 1)  # [d, 2, H_L]
    b_pair = bs[-1].view(2, d).t()  # [d, 2]
    ld = us.new_zeros(n)

    def groups(m: int) -> None:
        fill_degree_rows(m, xs, hs, ws, bs[:L], bounds, init, activation)

    groups(0)
    for k in range(d):
        c = bounds[L - 1][k]
        out = torch.addmm(b_pair[k], hs[-1][:, :c], w_pair[k, :, :c].t())
        s = _ref_scale(out[:, 1], scale_fn, clamp)
        xs[:, k] = us[:, k] * torch.exp(s) + out[:, 0]
        ld += s
        if k + 1 < d:
            groups(k + 1)
    x = torch.empty_like(xs)
    x[:, packed.order] = xs
    return x.to(u.dtype), ld
