"""The rational-quadratic spline autoregressive transform on a MADE, both directions.

With ``theta(.) = MADE(.)`` giving ``3K - 1`` unnormalised spline parameters per input
(:mod:`fastflow.ops.spline`; row ``p * D + i`` of the output layer is parameter ``p`` of input
``i``: ``K`` widths, ``K`` heights, ``K - 1`` derivatives):

* one network pass: ``u_i = spline(x_i; theta_i(x_<i))``, ``logdet = sum log|du/dx|``
  (:func:`made_spline_forward`);
* the inverse, sequential in the degrees: ``x_i = spline^-1(u_i; theta_i(x_<i))``
  (:func:`made_spline_inverse`), computed by the **degree walk** of
  :mod:`fastflow.ops.made`: per degree ``m``, only the rows of each hidden layer whose degree is
  ``m`` are computed (each from the finished prefix of the layer below), then the ``3K - 1``
  output rows of the input of degree ``m + 1``, then its spline inverse. Every hidden unit and
  output is computed once: one network pass of work, not the ``D`` passes of the naive loop
  (:func:`reference_made_spline_inverse`, the specification).

Without gradients on the CPU (sampling) the walk runs in the native kernel
(``made_spline_inverse_cpu`` in ``csrc/made_cpu.cpp``: the affine walk's blocked degree groups,
the ``3K - 1`` output rows of each input as one product, the spline inverse per sample inside the
walk: one call for the whole inverse). Otherwise (gradients needed, CUDA, 16-bit, more than 64
bins, ``FASTFLOW_BACKEND=reference``) it is written in PyTorch (slices and matmuls) and is
differentiable by plain autograd (the spline inverse's own gradient is the implicit-function
rule, see :mod:`fastflow.ops.spline`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_float_tensor
from fastflow.ops.made import (
    ACTIVATIONS,
    _act,
    _context_term,
    _sorted_mlp,
    degree_mask,
    pack_made,
)
from fastflow.ops.made_reference import fill_degree_rows, walk_bounds
from fastflow.ops.spline import (
    check_spline_options,
    rq_spline_elementwise,
    spline_params_per_element,
)

__all__ = [
    "PackedSplineMADE",
    "made_spline_forward",
    "made_spline_inverse",
    "pack_spline_made",
    "reference_made_spline_inverse",
]


class PackedSplineMADE(NamedTuple):
    """A spline MADE in sorted coordinates (see :func:`pack_spline_made`)."""

    order: Tensor  #: int64 [D]: order[k] is the input of degree k + 1
    weights: list[Tensor]  #: hidden layers, masked, rows/cols sorted by degree
    biases: list[Tensor]
    out_weight: Tensor  #: [D, P, H_L]: the output rows of the input of degree k + 1
    out_bias: Tensor  #: [D, P]
    context_weight: Tensor | None  #: [H_1, C], rows sorted
    bounds_list: list[int]  #: [L, D + 1] flat: #units of layer l with degree <= m


def pack_spline_made(
    weights: list[Tensor],
    biases: list[Tensor],
    input_degrees: Tensor,
    hidden_degrees: list[Tensor],
    params_per_dim: int,
    context_weight: Tensor | None = None,
) -> PackedSplineMADE:
    """Rewrite a MADE with ``params_per_dim`` outputs per input in sorted coordinates (the
    hidden layers exactly as :func:`fastflow.ops.made.pack_made`; the output layer as one
    ``[P, H_L]`` block per input, in autoregressive order). Differentiable.

    Example:
        >>> w = [torch.randn(4, 2), torch.randn(10, 4)]
        >>> p = pack_spline_made(w, [torch.zeros(4), torch.zeros(10)], torch.tensor([2, 1]),
        ...                      [torch.tensor([1, 0, 1, 0])], params_per_dim=5)
        >>> p.order.tolist(), tuple(p.out_weight.shape)
        ([1, 0], (2, 5, 4))
    """
    P = int(params_per_dim)
    d = int(input_degrees.numel()) if isinstance(input_degrees, Tensor) else 0
    if P < 2:
        raise ValueError(f"params_per_dim must be >= 2, got {params_per_dim!r}")
    if not isinstance(weights, (list, tuple)) or not weights:
        raise TypeError("weights must be a non-empty list of tensors")
    w_out, b_out = weights[-1], biases[-1]
    if not isinstance(w_out, Tensor) or w_out.dim() != 2 or w_out.shape[0] != P * d:
        shape = tuple(w_out.shape) if isinstance(w_out, Tensor) else type(w_out).__name__
        raise ValueError(f"the output weight must have P * D = {P * d} rows, got {shape}")
    base = pack_made(list(weights), list(biases), input_degrees, hidden_degrees, context_weight)
    dev = w_out.device
    in_deg = input_degrees.to(dev, torch.long)
    last = hidden_degrees[-1].to(dev, torch.long)
    perm = torch.argsort(last, stable=True)
    mask = degree_mask(in_deg.repeat(P), last, strict=True).to(w_out.dtype)
    w = (w_out * mask)[:, perm].view(P, d, -1)[:, base.order].transpose(0, 1).contiguous()
    b = b_out.view(P, d)[:, base.order].t().contiguous()
    return PackedSplineMADE(
        base.order, base.weights[:-1], base.biases[:-1], w, b, base.context_weight,
        base.bounds_list,
    )  # fmt: skip


def _split(theta: Tensor, bins: int) -> tuple[Tensor, Tensor, Tensor]:
    return theta[..., :bins], theta[..., bins : 2 * bins], theta[..., 2 * bins :]


def made_spline_forward(
    x: Tensor,
    params: Tensor,
    bins: int,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """The density direction from the MADE's output: ``u = spline(x; params)``.

    Args:
        x: ``[N, D]``.
        params: the MADE output ``[N, P, D]`` (``P = 3K - 1``).
        bins, bound, min_*: the spline (:func:`fastflow.ops.spline.rq_spline`).

    Returns:
        ``(u, logdet)``, ``logdet`` of shape ``[N]``.

    Example:
        >>> u, ld = made_spline_forward(torch.randn(3, 2), torch.zeros(3, 11, 2), bins=4)
        >>> ld.abs().max().item() < 1e-6
        True
    """
    from fastflow.ops.spline import rq_spline

    th = params.movedim(1, -1).to(x.dtype)
    w, h, d = _split(th, bins)
    return rq_spline(x, w, h, d, bound, min_bin_width, min_bin_height, min_derivative)


def _check_walk(u, packed, context, activation, bins, opts):
    check_float_tensor("u", u, min_dim=2)
    if u.dim() != 2:
        raise ValueError(f"u must have shape [N, D], got {tuple(u.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(packed, PackedSplineMADE):
        raise TypeError(
            f"packed must be a PackedSplineMADE (see pack_spline_made), got {type(packed).__name__}"
        )
    d = packed.order.numel()
    if u.shape[1] != d:
        raise ValueError(f"u must have {d} features (shape [N, {d}]), got {tuple(u.shape)}")
    P = spline_params_per_element(bins)
    if tuple(packed.out_weight.shape[:2]) != (d, P):
        raise ValueError(
            f"packed.out_weight must have shape [D, 3K - 1, H] = [{d}, {P}, H] for bins={bins}, "
            f"got {tuple(packed.out_weight.shape)}"
        )
    if (context is None) != (packed.context_weight is None):
        raise ValueError(
            "context is required by this MADE"
            if context is None
            else "this MADE takes no context, but context was given"
        )
    if context is not None:
        c = packed.context_weight.shape[1]
        if not isinstance(context, Tensor) or tuple(context.shape) != (u.shape[0], c):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape [N, {c}] = [{u.shape[0]}, {c}], got {shape}")


def made_spline_inverse(
    u: Tensor,
    packed: PackedSplineMADE,
    bins: int,
    context: Tensor | None = None,
    activation: str = "relu",
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """Inverse of the spline autoregressive transform in one pass of work (the degree walk).

    Args:
        u: ``[N, D]`` (fp32/fp64; bf16/fp16 are computed in fp32).
        packed: the MADE in sorted coordinates (:func:`pack_spline_made`).
        bins: ``K``.
        context: ``[N, C]`` when the MADE is conditional.
        activation: the MADE's activation.
        bound, min_*: the spline (:func:`fastflow.ops.spline.rq_spline`).

    Returns:
        ``(x, logdet)``, ``logdet = sum log|dx/du|`` of shape ``[N]``.

    Example:
        >>> D, H, K = 3, 8, 4
        >>> P = 3 * K - 1
        >>> w, b = [torch.randn(H, D), torch.randn(P * D, H)], [torch.zeros(H), torch.randn(P * D)]
        >>> p = pack_spline_made(w, b, torch.arange(1, D + 1), [torch.arange(H) % (D - 1) + 1], P)
        >>> u = torch.randn(5, D)
        >>> x, ld = made_spline_inverse(u, p, bins=K)
        >>> torch.allclose(x, reference_made_spline_inverse(u, p, bins=K)[0], atol=1e-5)
        True

    Reference: Durkan et al., "Neural Spline Flows", 2019; Germain et al., "MADE", 2015.
    """
    opts = check_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
    _check_walk(u, packed, context, activation, bins, opts)
    with torch.autocast(u.device.type, enabled=False):
        return _torch_spline_walk(u, packed, context, activation, opts)


def _prepare(u, packed, context):
    acc = B.acc_dtype(u.dtype)
    us = u.to(acc)[:, packed.order]
    init = _context_term(packed, None if context is None else context.to(acc))
    ws = [w.to(acc) for w in packed.weights]
    bs = [b.to(acc) for b in packed.biases]
    return us, init, ws, bs, packed.out_weight.to(acc), packed.out_bias.to(acc)


def _needs_grad(u, packed, context) -> bool:
    if not torch.is_grad_enabled():
        return False
    ts = [u, context, packed.out_weight, packed.out_bias, packed.context_weight]
    ts += list(packed.weights) + list(packed.biases)
    return any(isinstance(t, Tensor) and t.requires_grad for t in ts)


def _native_spline_walk(u, packed, context, activation, opts):
    """The walk in the native CPU kernel, or None where it does not apply."""
    bins = opts[0]
    if (
        u.device.type != "cpu"
        or u.dtype not in (torch.float32, torch.float64)
        or not 2 <= bins <= 64
        or not packed.weights
        or not hasattr(B._C, "made_spline_inverse_cpu")
        or not B.use_native(u)
        or torch.compiler.is_compiling()
    ):
        return None
    us, init, ws, bs, w_out, b_out = _prepare(u, packed, context)
    # every buffer the kernel reads is bound to a name that lives through the call
    us = us.contiguous()
    init = None if init is None else init.contiguous()
    ws = [w.contiguous() for w in ws]
    bs = [b.contiguous() for b in bs]
    w_out, b_out = w_out.contiguous(), b_out.contiguous()
    n, d = us.shape
    hidden = [int(w.shape[0]) for w in ws]
    dt = us.dtype
    code = B.DTYPE_CODES[dt]
    nt = B.num_threads()
    nbytes = int(
        B._C.made_workspace_bytes(dtype=code, d=d, hidden=[*hidden, 3 * bins - 1], nthreads=nt)
    )
    wsp = torch.empty(max(nbytes, 1), dtype=torch.uint8)
    xs = torch.empty_like(us)
    ld = torch.empty(n, dtype=dt)
    wshapes = zip(ws, hidden, [d, *hidden[:-1]])
    B._C.made_spline_inverse_cpu(
        dtype=code, act=ACTIVATIONS[activation], n=n, d=d, hidden=hidden, bins=bins,
        bound=opts[1], min_bin_width=opts[2], min_bin_height=opts[3], min_derivative=opts[4],
        u_ptr=B.ptr(us, dt, n * d, us.device, "u"),
        init_ptr=B.ptr(init, dt, None if init is None else n * hidden[0], us.device, "init"),
        weight_ptrs=[B.ptr(w, dt, h * c, us.device, "weights") for w, h, c in wshapes],
        bias_ptrs=[B.ptr(b, dt, h, us.device, "biases") for b, h in zip(bs, hidden)],
        out_weight_ptr=B.ptr(w_out, dt, d * (3 * bins - 1) * hidden[-1], us.device, "out_weight"),
        out_bias_ptr=B.ptr(b_out, dt, d * (3 * bins - 1), us.device, "out_bias"),
        bounds=packed.bounds_list, x_ptr=B.ptr(xs), logdet_ptr=B.ptr(ld),
        workspace_ptr=B.ptr(wsp), workspace_bytes=wsp.numel(), nthreads=nt,
    )  # fmt: skip
    x = torch.empty_like(xs)
    x[:, packed.order] = xs
    return x.to(u.dtype), ld


def _torch_spline_walk(u, packed, context, activation, opts):
    if not _needs_grad(u, packed, context):
        out = _native_spline_walk(u, packed, context, activation, opts)
        if out is not None:
            return out
        return _torch_spline_walk_buffers(u, packed, context, activation, opts)
    bins, spline = opts[0], opts[1:]
    us, init, ws, bs, w_out, b_out = _prepare(u, packed, context)
    n, d = us.shape
    L = len(ws)
    bounds = walk_bounds(packed, d, L)
    # per layer, the finished rows as a list of column blocks (degree order); lists and cat
    # rather than writes into one buffer, so autograd can differentiate the walk
    hs: list[list[Tensor]] = [[] for _ in range(L)]
    xs: list[Tensor] = []
    ld = us.new_zeros(n)
    cache: list[Tensor | None] = [None] * L

    def prefix(l: int) -> Tensor:
        if cache[l] is None:
            cache[l] = torch.cat(hs[l], 1) if hs[l] else us.new_zeros(n, 0)
        return cache[l]

    def groups(m: int) -> None:
        for l in range(L):
            r0, r1 = (0 if m == 0 else bounds[l][m - 1]), bounds[l][m]
            if r1 <= r0:
                continue
            k = m if l == 0 else bounds[l - 1][m]
            prev = (torch.stack(xs, 1) if xs else us.new_zeros(n, 0)) if l == 0 else prefix(l - 1)
            pre = torch.addmm(bs[l][r0:r1], prev[:, :k], ws[l][r0:r1, :k].t())
            if l == 0 and init is not None:
                pre = pre + init[:, r0:r1]
            hs[l].append(_act(pre, activation))
            cache[l] = None

    groups(0)
    for k in range(d):
        c = bounds[L - 1][k]
        theta = torch.addmm(b_out[k], prefix(L - 1)[:, :c], w_out[k, :, :c].t())  # [N, P]
        w, h, dv = _split(theta, bins)
        xk, lad = rq_spline_elementwise(us[:, k], w, h, dv, True, *spline)
        xs.append(xk)
        ld = ld + lad
        if k + 1 < d:
            groups(k + 1)
    xs_t = torch.stack(xs, 1)
    x = xs_t[:, torch.argsort(packed.order)]
    return x.to(u.dtype), ld


def _torch_spline_walk_buffers(u, packed, context, activation, opts):
    """The same walk without autograd: every layer's rows written in place into one buffer (the
    layout of :func:`fastflow.ops.made.torch_degree_walk`), so no concatenations."""
    bins, spline = opts[0], opts[1:]
    us, init, ws, bs, w_out, b_out = _prepare(u, packed, context)
    n, d = us.shape
    L = len(ws)
    bounds = walk_bounds(packed, d, L)
    hs = [us.new_empty(n, w.shape[0]) for w in ws]
    xs = us.new_empty(n, d)
    ld = us.new_zeros(n)

    def groups(m: int) -> None:
        fill_degree_rows(m, xs, hs, ws, bs, bounds, init, activation)

    groups(0)
    for k in range(d):
        c = bounds[L - 1][k]
        theta = torch.addmm(b_out[k], hs[-1][:, :c], w_out[k, :, :c].t())  # [N, P]
        w, h, dv = _split(theta, bins)
        xk, lad = rq_spline_elementwise(us[:, k], w, h, dv, True, *spline)
        xs[:, k] = xk
        ld += lad
        if k + 1 < d:
            groups(k + 1)
    x = torch.empty_like(xs)
    x[:, packed.order] = xs
    return x.to(u.dtype), ld


def reference_made_spline_inverse(
    u: Tensor,
    packed: PackedSplineMADE,
    bins: int,
    context: Tensor | None = None,
    activation: str = "relu",
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
) -> tuple[Tensor, Tensor]:
    """The naive inverse (the specification): ``D`` full network passes, one per input.

    Example:
        >>> w = [torch.randn(4, 2), torch.randn(10, 4)]
        >>> p = pack_spline_made(w, [torch.zeros(4), torch.zeros(10)], torch.tensor([1, 2]),
        ...                      [torch.ones(4, dtype=torch.long)], params_per_dim=5)
        >>> reference_made_spline_inverse(torch.randn(3, 2), p, bins=2)[0].shape
        torch.Size([3, 2])
    """
    opts = check_spline_options(bins, bound, min_bin_width, min_bin_height, min_derivative)
    _check_walk(u, packed, context, activation, bins, opts)
    with torch.autocast(u.device.type, enabled=False):
        us, init, ws, bs, w_out, b_out = _prepare(u, packed, context)
        d = us.shape[1]
        xs = torch.zeros_like(us)
        ld = us.new_zeros(us.shape[0])
        for k in range(d):
            h = _sorted_mlp(xs, ws, bs, init, activation) if ws else xs
            if ws:
                h = _act(h, activation)
            theta = torch.addmm(b_out[k], h, w_out[k].t())
            w, hh, dv = _split(theta, bins)
            xk, lad = rq_spline_elementwise(us[:, k], w, hh, dv, True, *opts[1:])
            xs = torch.cat([xs[:, :k], xk[:, None], xs[:, k + 1 :]], 1)
            ld = ld + lad
        x = xs[:, torch.argsort(packed.order)]
        return x.to(u.dtype), ld
