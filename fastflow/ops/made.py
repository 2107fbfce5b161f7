"""MADE / MAF ops: the affine autoregressive transform in both directions.

Convention (Papamakarios et al., 2017), with ``(t, raw) = MADE(x)`` autoregressive in ``x``:

* density direction (one network pass): ``u = (x - t(x)) * exp(-s(x))``,
  ``logdet = -sum(s)``, with ``s = scale_fn(raw)`` (soft clamp ``clamp * tanh(raw / clamp)`` by
  default, as in :mod:`fastflow.ops.coupling`);
* inverse (sequential in ``x``): ``x_i = u_i * exp(s_i(x_<i)) + t_i(x_<i)``, ``logdet = +sum(s)``.

The inverse is computed by the **degree walk** (DESIGN.md, kernel family 3): in a MADE a hidden
unit of degree ``m`` depends only on inputs of degree ``<= m``, so walking the degrees in order
computes every hidden unit and every output exactly once: one pass of work instead of the ``D``
network passes of the naive loop (:func:`reference_made_affine_inverse`). The walk runs on
:func:`pack_made`'s *sorted coordinates* (inputs in autoregressive order, hidden units sorted by
degree), where every mask is a prefix. Three implementations:

* the native kernels (``csrc/made_cpu.cpp``, ``csrc/made_cuda.cu``), used by
  :func:`made_affine_inverse`;
* :func:`torch_degree_walk`, the same walk with torch slicing and matmuls (a second reference and
  the benchmark's baseline);
* :func:`reference_made_affine_inverse`, the naive ``D``-pass loop (the specification).

Gradients: the density direction is plain autograd (masked matmuls + the fused coupling op). The
inverse's backward uses the implicit-function rule at the solution ``x`` (see
:mod:`fastflow.ops.made_native`), so training through the inverse costs up to ``D`` backward
passes (sampling without gradients costs one pass).

This module holds the public ops and their argument checks; the pure-PyTorch references live in
:mod:`fastflow.ops.made_reference` and the native op in :mod:`fastflow.ops.made_native` (both
re-exported here).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops._checks import check_float_tensor
from fastflow.ops.coupling import affine_coupling_inverse, check_scale
from fastflow.ops.made_native import (
    ACTIVATIONS,
    _device_bounds,  # noqa: F401 (re-exported: tests)
    native_made_affine_inverse,
)
from fastflow.ops.made_reference import (
    PackedMADE,
    _act,  # noqa: F401 (re-exported: made_spline)
    _context_term,  # noqa: F401 (re-exported: made_spline)
    _mlp,
    _sorted_mlp,  # noqa: F401 (re-exported: made_spline)
    degree_mask,
    reference_made_affine_inverse,
    torch_degree_walk,
)

__all__ = [
    "ACTIVATIONS",
    "PackedMADE",
    "made_affine_forward",
    "made_affine_inverse",
    "made_mlp",
    "check_packed",
    "degree_mask",
    "pack_made",
    "reference_made_affine_inverse",
    "torch_degree_walk",
]


def _check_options(activation: str, scale_fn: str, clamp: float) -> float:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return check_scale(scale_fn, clamp)


# ----------------------------------------------------------------------------------------------
# The network in original coordinates (density direction).


def made_mlp(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str = "relu",
    context: Tensor | None = None,
    context_weight: Tensor | None = None,
) -> Tensor:
    """The masked MLP: ``h_1 = act(x W_1^T + c W_c^T + b_1)``, ..., ``out = h_L W_out^T + b_out``.

    ``weights`` are the *masked* weights (``nn.Linear`` layout ``[out, in]``); the result has
    shape ``[N, rows of W_out]``.

    Example:
        >>> w = [torch.randn(8, 3).tril(-1)[:, :3], torch.randn(6, 8)]
        >>> made_mlp(torch.randn(2, 3), w, [torch.zeros(8), torch.zeros(6)]).shape
        torch.Size([2, 6])

    Reference: Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", 2015.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    _check_mlp(x, weights, biases, context, context_weight)
    return _mlp(x, weights, biases, activation, context, context_weight)


def _check_mlp(x, weights, biases, context, context_weight, min_out: int = 1) -> None:
    """Clear errors for everything :func:`made_mlp` would otherwise hand to ``matmul``."""
    check_float_tensor("x", x, min_dim=2)
    if x.dim() != 2:
        raise ValueError(f"x must have shape [N, D], got {tuple(x.shape)}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of tensors")
    if len(weights) == 0 or len(biases) != len(weights):
        raise ValueError(
            f"need one bias per weight, got {len(weights)} weights and {len(biases)} biases"
        )
    cols = x.shape[1]
    for l, (w, b) in enumerate(zip(weights, biases)):
        for name, t in ((f"weights[{l}]", w), (f"biases[{l}]", b)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
            if t.dtype not in B.FLOAT_DTYPES:
                raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
            if t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")
        if w.dim() != 2 or w.shape[1] != cols:
            raise ValueError(f"weights[{l}] must have shape [out, {cols}], got {tuple(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            raise ValueError(f"biases[{l}] must have shape [{w.shape[0]}], got {tuple(b.shape)}")
        cols = w.shape[0]
    if cols < min_out:
        raise ValueError(f"the output layer needs at least {min_out} rows, got {cols}")
    if (context is None) != (context_weight is None):
        raise ValueError(
            "context was given but context_weight is None"
            if context is not None
            else "context_weight was given but context is None"
        )
    if context is not None:
        check_float_tensor("context", context, min_dim=2)
        if not isinstance(context_weight, Tensor) or context_weight.dim() != 2:
            raise ValueError("context_weight must be a [H_1, C] tensor")
        h1, c = weights[0].shape[0], context_weight.shape[1]
        if context_weight.shape[0] != h1:
            raise ValueError(
                f"context_weight must have shape [{h1}, C], got {tuple(context_weight.shape)}"
            )
        if context.dim() != 2 or tuple(context.shape) != (x.shape[0], c):
            raise ValueError(
                f"context must have shape [N, {c}] = [{x.shape[0]}, {c}], "
                f"got {tuple(context.shape)}"
            )
        for name, t in (("context", context), ("context_weight", context_weight)):
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
            if t.dtype != x.dtype:
                raise TypeError(f"{name} has dtype {t.dtype} but x has dtype {x.dtype}")


def made_affine_forward(
    x: Tensor,
    weights: list[Tensor],
    biases: list[Tensor],
    activation: str = "relu",
    context: Tensor | None = None,
    context_weight: Tensor | None = None,
    scale_fn: str = "softclamp",
    clamp: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Density direction of the affine autoregressive transform, in one network pass.

    ``(t, raw) = MADE(x)``; ``u = (x - t) * exp(-s)``, ``logdet = -sum(s)``, ``s = scale_fn(raw)``.
    The last layer's first ``D`` rows are the shifts, the next ``D`` the raw scales (more rows,
    e.g. spline parameters, are ignored). The elementwise step and log-det run in the fused
    coupling op (:func:`fastflow.ops.coupling.affine_coupling_inverse`).

    Args:
        x: ``[N, D]``.
        weights, biases: masked MADE weights/biases (:func:`made_mlp`).
        activation: ``"relu"``, ``"tanh"`` or ``"elu"``.
        context, context_weight: optional ``[N, C]`` context and its ``[H_1, C]`` weight.
        scale_fn, clamp: as in :func:`fastflow.ops.coupling.affine_coupling`.

    Returns:
        ``(u, logdet)``, ``logdet`` of shape ``[N]``.

    Example:
        >>> D, H = 3, 8
        >>> w = [torch.randn(H, D), torch.randn(2 * D, H)]  # (masks omitted in this example)
        >>> u, ld = made_affine_forward(torch.randn(4, D), w, [torch.zeros(H), torch.zeros(2 * D)])
        >>> u.shape, ld.shape
        (torch.Size([4, 3]), torch.Size([4]))

    Reference: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", 2017.
    """
    _check_options(activation, scale_fn, clamp)
    check_float_tensor("x", x, min_dim=2)
    d = x.shape[1]
    _check_mlp(x, weights, biases, context, context_weight, min_out=2 * d)
    # .to(x.dtype): under autocast the MLP returns bf16/fp16 for fp32 data
    out = _mlp(x, weights, biases, activation, context, context_weight).to(x.dtype)
    return affine_coupling_inverse(x, out[:, d : 2 * d], out[:, :d], scale_fn=scale_fn, clamp=clamp)


# ----------------------------------------------------------------------------------------------
# Sorted coordinates.


def pack_made(
    weights: list[Tensor],
    biases: list[Tensor],
    input_degrees: Tensor,
    hidden_degrees: list[Tensor],
    context_weight: Tensor | None = None,
) -> PackedMADE:
    """Rewrite a MADE in sorted coordinates for the degree walk.

    Inputs are put in autoregressive order and each hidden layer's units are sorted by degree
    (stable); the masks implied by the degrees are (re)applied, so ``weights`` may be masked or
    not. Differentiable (gathers and a mask multiply).

    Args:
        weights: ``[H_1, D]``, ``[H_2, H_1]``, ..., ``[P * D, H_L]`` (``P >= 2``; rows
            ``p * D + i`` are parameter ``p`` of input ``i``; ``p = 0`` shift, ``1`` raw scale).
        biases: matching biases.
        input_degrees: int ``[D]``, a permutation of ``1..D``.
        hidden_degrees: per hidden layer, int ``[H_l]`` with values in ``[0, D - 1]``.
        context_weight: optional ``[H_1, C]``.

    Example:
        >>> p = pack_made([torch.randn(4, 2), torch.randn(4, 4)], [torch.zeros(4)] * 2,
        ...               torch.tensor([2, 1]), [torch.tensor([1, 0, 1, 0])])
        >>> p.order.tolist(), p.bounds.tolist()
        ([1, 0], [[2, 4, 4]])

    Reference: Germain et al., "MADE: Masked Autoencoder for Distribution Estimation", 2015.
    """
    if not isinstance(input_degrees, Tensor):
        raise TypeError(f"input_degrees must be a tensor, got {type(input_degrees).__name__}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("weights and biases must be lists of tensors")
    if not isinstance(hidden_degrees, (list, tuple)):
        raise TypeError("hidden_degrees must be a list of tensors")
    if len(weights) == 0:
        raise ValueError("weights must hold at least the output layer")
    d = int(input_degrees.numel())
    # shapes, dtypes and devices as made_mlp would need them (a stand-in input of D features)
    probe = weights[0].new_empty(0, d) if isinstance(weights[0], Tensor) else None
    if probe is None:
        raise TypeError(f"weights[0] must be a tensor, got {type(weights[0]).__name__}")
    cw = context_weight
    if cw is not None and not isinstance(cw, Tensor):
        raise TypeError(f"context_weight must be a tensor or None, got {type(cw).__name__}")
    ctx = None if cw is None else probe.new_empty(0, cw.shape[1] if cw.dim() == 2 else 0)
    _check_mlp(probe, weights, biases, ctx, cw)
    dev = weights[0].device
    in_deg = input_degrees.to(dev, torch.long)
    if d == 0 or not torch.equal(torch.sort(in_deg).values, torch.arange(1, d + 1, device=dev)):
        raise ValueError("input_degrees must be a permutation of 1..D")
    if len(weights) != len(hidden_degrees) + 1 or len(biases) != len(weights):
        raise ValueError("need one weight and one bias per hidden layer plus the output layer")
    order = torch.argsort(in_deg)
    prev_deg, prev_perm = in_deg, order
    ws, bs, bounds = [], [], []
    grid = torch.arange(d + 1, device=dev)
    for l, hd in enumerate(hidden_degrees):
        hd = hd.to(dev, torch.long)
        if hd.numel() != weights[l].shape[0]:
            raise ValueError(
                f"hidden_degrees[{l}] has {hd.numel()} entries, layer has "
                f"{weights[l].shape[0]} units"
            )
        if hd.numel() and (int(hd.min()) < 0 or int(hd.max()) > d - 1):
            raise ValueError(f"hidden_degrees[{l}] must lie in [0, D - 1] = [0, {d - 1}]")
        perm = torch.argsort(hd, stable=True)
        mask = degree_mask(hd, prev_deg, strict=False).to(weights[l].dtype)
        ws.append((weights[l] * mask)[perm][:, prev_perm].contiguous())
        bs.append(biases[l][perm].contiguous())
        bounds.append(torch.searchsorted(hd[perm], grid, right=True))
        prev_deg, prev_perm = hd, perm
    w_out, b_out = weights[-1], biases[-1]
    if w_out.shape[0] < 2 * d:
        raise ValueError(
            f"the output layer needs at least 2 * D = {2 * d} rows, got {w_out.shape[0]}"
        )
    w_out, b_out = w_out[: 2 * d], b_out[: 2 * d]
    mask = degree_mask(in_deg.repeat(2), prev_deg, strict=True).to(w_out.dtype)
    rows = torch.cat([order, order + d])
    ws.append((w_out * mask)[rows][:, prev_perm].contiguous())
    bs.append(b_out[rows].contiguous())
    cw = None
    if context_weight is not None:
        cw = context_weight[torch.argsort(hidden_degrees[0].to(dev, torch.long), stable=True)]
        cw = cw.contiguous()
    bt = torch.stack(bounds).to(torch.long)
    return PackedMADE(order, ws, bs, cw, bt, bt.flatten().tolist())


# ----------------------------------------------------------------------------------------------
# Validation of a PackedMADE (public: a user can build one by hand).


def _is_eager() -> bool:
    return not torch.compiler.is_compiling()


def check_packed(packed: object, u: Tensor, context: Tensor | None = None) -> list[int]:
    """Check that ``packed`` is a well-formed :class:`PackedMADE` for inputs like ``u``.

    Every shape, dtype and device the walk assumes (``order`` a permutation of ``0..D-1``;
    weights ``[H_1, D]``, ``[H_2, H_1]``, ..., ``[2 D, H_L]`` and matching biases, all floating
    with one dtype on ``u``'s device; ``context_weight`` ``[H_1, C]``; ``bounds_list`` a valid
    ``[L, D + 1]`` degree table equal to ``bounds``) and the context against it. Raises
    ``TypeError``/``ValueError`` naming the field; returns the hidden sizes.

    Example:
        >>> p = pack_made([torch.randn(4, 2), torch.randn(4, 4)], [torch.zeros(4)] * 2,
        ...               torch.tensor([1, 2]), [torch.ones(4, dtype=torch.long)])
        >>> check_packed(p, torch.randn(3, 2))
        [4]
    """
    if not isinstance(packed, PackedMADE):
        raise TypeError(f"packed must be a PackedMADE (see pack_made), got {type(packed).__name__}")
    order, weights, biases, cw = packed.order, packed.weights, packed.biases, packed.context_weight
    if not isinstance(order, Tensor) or order.dim() != 1 or order.dtype != torch.long:
        raise ValueError("packed.order must be an int64 [D] tensor")
    d = order.numel()
    if d == 0:
        raise ValueError("packed.order must have at least one entry")
    if u.shape[1] != d:
        raise ValueError(f"u must have {d} features (shape [N, {d}]), got {tuple(u.shape)}")
    if order.device != u.device:
        raise ValueError(f"packed.order is on {order.device} but u is on {u.device}")
    if _is_eager() and not torch.equal(
        torch.sort(order).values, torch.arange(d, device=order.device)
    ):
        raise ValueError(f"packed.order must be a permutation of 0..{d - 1}")
    if not isinstance(weights, (list, tuple)) or not isinstance(biases, (list, tuple)):
        raise TypeError("packed.weights and packed.biases must be lists of tensors")
    if len(weights) < 2 or len(biases) != len(weights):
        raise ValueError(
            "packed needs one weight and one bias per hidden layer plus the output layer "
            f"(at least 2), got {len(weights)} weights and {len(biases)} biases"
        )
    for i, t in enumerate(list(weights) + list(biases)):
        kind, j = ("weights", i) if i < len(weights) else ("biases", i - len(weights))
        if not isinstance(t, Tensor) or t.dtype not in B.FLOAT_DTYPES:
            raise TypeError(f"packed.{kind}[{j}] must be a floating tensor")
        if t.device != u.device:
            raise ValueError(f"packed.{kind}[{j}] is on {t.device} but u is on {u.device}")
        if t.dtype != weights[0].dtype:
            raise TypeError(
                f"packed.{kind}[{j}] has dtype {t.dtype}, packed.weights[0] {weights[0].dtype}"
            )
    L = len(weights) - 1
    hidden = [int(w.shape[0]) if w.dim() == 2 else -1 for w in weights[:-1]]
    cols = d
    for l in range(L + 1):
        rows = 2 * d if l == L else hidden[l]
        if tuple(weights[l].shape) != (rows, cols) or rows < 1:
            raise ValueError(
                f"packed.weights[{l}] must have shape [{rows if l == L else 'H'}, {cols}]"
                f"{' (2 * D rows: shifts, raw scales)' if l == L else ''}, "
                f"got {tuple(weights[l].shape)}"
            )
        if tuple(biases[l].shape) != (rows,):
            raise ValueError(
                f"packed.biases[{l}] must have shape [{rows}], got {tuple(biases[l].shape)}"
            )
        cols = rows
    if (context is None) != (cw is None):
        raise ValueError(
            "context is required by this MADE"
            if context is None
            else "this MADE takes no context, but context was given"
        )
    if cw is not None:
        if not isinstance(cw, Tensor) or cw.dim() != 2 or cw.shape[0] != hidden[0]:
            shape = tuple(cw.shape) if isinstance(cw, Tensor) else type(cw).__name__
            raise ValueError(f"packed.context_weight must have shape [{hidden[0]}, C], got {shape}")
        if cw.dtype not in B.FLOAT_DTYPES or cw.device != u.device:
            raise ValueError(
                f"packed.context_weight must be a floating tensor on {u.device}, "
                f"got {cw.dtype} on {cw.device}"
            )
        c = cw.shape[1]
        ok = isinstance(context, Tensor) and context.dim() == 2
        if not ok or context.shape != (u.shape[0], c):
            shape = tuple(context.shape) if isinstance(context, Tensor) else type(context).__name__
            raise ValueError(f"context must have shape [N, {c}] = [{u.shape[0]}, {c}], got {shape}")
        if context.dtype not in B.FLOAT_DTYPES or context.device != u.device:
            raise ValueError(
                f"context must be a floating tensor on {u.device}, "
                f"got {context.dtype} on {context.device}"
            )
    _check_bounds(packed, d, hidden)
    return hidden


def _check_bounds(packed: PackedMADE, d: int, hidden: list[int]) -> None:
    bl = packed.bounds_list
    L = len(hidden)
    if not isinstance(bl, list) or len(bl) != L * (d + 1):
        raise ValueError(f"packed.bounds_list must be a list of L * (D + 1) = {L * (d + 1)} ints")
    for l in range(L):
        row = bl[l * (d + 1) : (l + 1) * (d + 1)]
        if not all(type(v) is int for v in row):
            raise ValueError("packed.bounds_list must hold Python ints")
        ok = row[0] >= 0 and all(a <= b for a, b in zip(row, row[1:]))
        if not ok or row[d - 1] != hidden[l] or row[d] != hidden[l]:
            raise ValueError(
                f"packed.bounds_list row {l} must be a non-decreasing degree table ending in "
                f"hidden[{l}] = {hidden[l]} at degrees D - 1 and D"
            )
    bt = packed.bounds
    if not isinstance(bt, Tensor) or tuple(bt.shape) != (L, d + 1):
        raise ValueError(f"packed.bounds must be an int64 [L, D + 1] = [{L}, {d + 1}] tensor")
    if _is_eager() and bt.device.type == "cpu" and bt.flatten().tolist() != bl:
        raise ValueError("packed.bounds and packed.bounds_list disagree")


def made_affine_inverse(
    u: Tensor,
    packed: PackedMADE,
    context: Tensor | None = None,
    activation: str = "relu",
    scale_fn: str = "softclamp",
    clamp: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`made_affine_forward` in one pass of work (the degree walk).

    ``x_i = u_i * exp(s_i(x_<i)) + t_i(x_<i)`` for every ``i`` in autoregressive order,
    ``logdet = +sum(s)``. Native CPU/CUDA kernel where built (one launch on CUDA), else the naive
    reference. Differentiable (implicit-function rule, see the module docstring).

    Args:
        u: ``[N, D]`` (fp32/fp64; bf16/fp16 are computed in fp32).
        packed: the MADE in sorted coordinates (:func:`pack_made`).
        context: ``[N, C]`` when the MADE is conditional, else None.
        activation, scale_fn, clamp: as used by the density direction.

    Returns:
        ``(x, logdet)``, ``logdet`` of shape ``[N]`` (fp32, fp64 for fp64).

    Example:
        >>> D, H = 3, 8
        >>> w, b = [torch.randn(H, D), torch.randn(2 * D, H)], [torch.zeros(H), torch.zeros(2 * D)]
        >>> p = pack_made(w, b, torch.arange(1, D + 1), [torch.arange(H) % (D - 1) + 1])
        >>> u = torch.randn(5, D)
        >>> x, ld = made_affine_inverse(u, p)
        >>> torch.allclose(x, reference_made_affine_inverse(u, p)[0], atol=1e-5)
        True

    Reference: Papamakarios et al., "Masked Autoregressive Flow for Density Estimation", 2017;
    Germain et al., "MADE", 2015 (degrees).
    """
    clamp = _check_options(activation, scale_fn, clamp)
    check_float_tensor("u", u, min_dim=2)
    if u.dim() != 2:
        raise ValueError(f"u must have shape [N, D], got {tuple(u.shape)}")
    hidden = check_packed(packed, u, context)
    if not B.use_native(u):
        return reference_made_affine_inverse(u, packed, context, activation, scale_fn, clamp)
    out = native_made_affine_inverse(u, packed, context, hidden, activation, scale_fn, clamp)
    if out is None:
        return reference_made_affine_inverse(u, packed, context, activation, scale_fn, clamp)
    return out
