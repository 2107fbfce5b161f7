"""The native MAF inverse (:func:`fastflow.ops.made.made_affine_inverse`'s kernel path): the degree
walk as a ``torch.library`` op over ``_C.made_affine_inverse_cpu`` / ``_cuda`` in sorted
coordinates, and its backward by the implicit-function rule.

At the walk's solution ``x``, with ``J = du/dx`` of the density direction (triangular),
``grad_u = J^-T g`` and ``grad_theta = -(J^-T g)^T du/dtheta``. ``J^-T g`` comes from the exact
fixed-point (Neumann) iteration ``lam += exp(s) * (g - J^T lam)``, each step one
vector-Jacobian product of the density direction (``_sorted_density``, pure PyTorch); it ends
after at most ``D`` steps because the off-diagonal part of ``J`` is nilpotent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastflow import _backend as B
from fastflow.ops.coupling import SCALE_FNS
from fastflow.ops.made_reference import PackedMADE, _context_term, _sorted_density

__all__ = ["ACTIVATIONS", "native_made_affine_inverse"]

#: activation name -> kernel code (csrc/made.h, enum Activation; _C.ACTIVATIONS, pinned by
#: tests/test_bindings.py)
ACTIVATIONS = {"relu": 0, "tanh": 1, "elu": 2}

_ACT_NAMES = {v: k for k, v in ACTIVATIONS.items()}
_MODE_NAMES = {v: k for k, v in SCALE_FNS.items()}


def _device_bounds(bounds_list: list[int], device: torch.device) -> Tensor:
    t = torch.tensor(bounds_list, dtype=torch.long)
    return t if device.type == "cpu" else t.to(device, non_blocking=True)


def _cuda_walk_fits(dtype: torch.dtype, d: int, hidden: list[int], device: torch.device) -> bool:
    """Whether the CUDA walk handles this MADE on ``device`` (layers, shared memory per block)."""
    with torch.cuda.device(device):
        return bool(B._C.made_cuda_supported(dtype=B.DTYPE_CODES[dtype], d=d, hidden=hidden))


def _workspace(u: Tensor, d: int, hidden: list[int]) -> tuple[Tensor | None, int]:
    if u.device.type == "cuda":
        return None, 0
    nbytes = B._C.made_workspace_bytes(
        dtype=B.DTYPE_CODES[u.dtype], d=d, hidden=hidden, nthreads=B.num_threads()
    )
    return torch.empty(max(nbytes, 1), dtype=torch.uint8, device=u.device), nbytes


@torch.library.custom_op("fastflow::made_affine_inverse", mutates_args=())
def _made_inv(
    us: Tensor,
    init: Tensor | None,
    weights: list[Tensor],
    biases: list[Tensor],
    bounds: Tensor,
    bounds_list: list[int],
    act: int,
    mode: int,
    clamp: float,
) -> tuple[Tensor, Tensor]:
    if us.dim() != 2 or us.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"us must be a float32/float64 [N, D] tensor, got {us.dtype} {us.shape}")
    n, d = us.shape
    dt, dev = us.dtype, us.device
    if len(weights) < 2 or len(biases) != len(weights):
        raise ValueError("weights and biases: one per hidden layer plus the output layer")
    hidden = [w.shape[0] for w in weights[:-1]]
    if len(bounds_list) != len(hidden) * (d + 1) or bounds.numel() != len(bounds_list):
        raise ValueError("bounds/bounds_list must hold L * (D + 1) entries")
    xs = torch.empty_like(us)
    logdet = torch.empty(n, dtype=dt, device=dev)
    code = B.DTYPE_CODES[dt]
    wp, bp, cols = [], [], d
    for l, (w, b) in enumerate(zip(weights, biases)):
        rows = 2 * d if l == len(hidden) else hidden[l]
        wp.append(B.ptr(w, dt, rows * cols, dev, f"weights[{l}]"))
        bp.append(B.ptr(b, dt, rows, dev, f"biases[{l}]"))
        cols = rows
    kw = dict(
        dtype=code, act=act, mode=mode, clamp=clamp, n=n, d=d, hidden=hidden,
        u_ptr=B.ptr(us, dt, n * d, dev, "us"), init_ptr=B.ptr(init, dt, n * hidden[0], dev, "init"),
        weight_ptrs=wp, bias_ptrs=bp, bounds=bounds_list, x_ptr=B.ptr(xs),
        logdet_ptr=B.ptr(logdet),
    )  # fmt: skip
    if dev.type == "cuda":
        pb = B.ptr(bounds, torch.long, len(bounds_list), dev, "bounds")
        with B.cuda_guard(us):
            B._C.made_affine_inverse_cuda(**kw, bounds_dev_ptr=pb, stream=B.stream_of(us))
    else:
        ws, nbytes = _workspace(us, d, hidden)
        B._C.made_affine_inverse_cpu(
            **kw, workspace_ptr=B.ptr(ws), workspace_bytes=nbytes, nthreads=B.num_threads()
        )
    return xs, logdet


@_made_inv.register_fake
def _(us, init, weights, biases, bounds, bounds_list, act, mode, clamp):
    return torch.empty_like(us), us.new_empty(us.shape[0])


def _setup_inv(ctx, inputs, output):
    _us, init, weights, biases, _bounds, _bl, act, mode, clamp = inputs
    ctx.has_init = init is not None
    ctx.n_layers = len(weights)
    ctx.save_for_backward(output[0], init, *weights, *biases)
    ctx.act, ctx.mode, ctx.clamp = _ACT_NAMES[act], _MODE_NAMES[mode], clamp


def _backward_inv(ctx, grad_x, grad_logdet):
    saved = ctx.saved_tensors
    nl = ctx.n_layers
    xs, init = saved[0], saved[1]
    weights, biases = list(saved[2 : 2 + nl]), list(saved[2 + nl :])
    with torch.enable_grad():
        x = xs.detach().requires_grad_(True)
        theta = [t.detach().requires_grad_(True) for t in weights + biases]
        init_l = init.detach().requires_grad_(True) if init is not None else None
        u_hat, ld_f, s = _sorted_density(
            x, theta[:nl], theta[nl:], init_l, ctx.act, ctx.mode, ctx.clamp
        )
        gl = grad_logdet.to(x.dtype)
        # the inverse's logdet is -ld_f(x): its explicit dependence on x
        (g_ld_x,) = torch.autograd.grad(ld_f, x, gl, retain_graph=True)
        g = grad_x - g_ld_x
        # lam = J^-T g by the nilpotent fixed-point iteration (exact after <= D steps)
        e = torch.exp(s.detach())
        lam = e * g
        for _ in range(x.shape[1] - 1):
            (jt,) = torch.autograd.grad(u_hat, x, lam, retain_graph=True)
            step = e * (g - jt)
            if not bool(step.any()):
                break
            lam = lam + step
        leaves = theta + ([init_l] if init_l is not None else [])
        grads = torch.autograd.grad((u_hat, ld_f), leaves, (-lam, -gl), allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for gr, t in zip(grads, leaves)]
    g_init = grads[-1] if init is not None else None
    return lam, g_init, grads[:nl], grads[nl : 2 * nl], None, None, None, None, None


_made_inv.register_autograd(_backward_inv, setup_context=_setup_inv)


def native_made_affine_inverse(
    u: Tensor,
    packed: PackedMADE,
    context: Tensor | None,
    hidden: list[int],
    activation: str,
    scale_fn: str,
    clamp: float,
) -> tuple[Tensor, Tensor] | None:
    """The walk in the native kernel for validated arguments (``hidden``: the hidden sizes
    :func:`~fastflow.ops.made.check_packed` returned), or None where the kernel does not take this
    MADE (more layers or a wider state than the CUDA shared-memory walk holds on this GPU)."""
    acc = B.acc_dtype(u.dtype)
    with torch.autocast(u.device.type, enabled=False):
        # index_select, not advanced indexing: the same gather, 4-5x cheaper on [256, 16-64]
        # (32 -> 8 us, 109 -> 20 us), paid twice per layer per call
        us = u.to(acc).index_select(1, packed.order)
        init = _context_term(packed, None if context is None else context.to(acc))
    ws = [w.to(acc).contiguous() for w in packed.weights]
    bs = [b.to(acc).contiguous() for b in packed.biases]
    if u.device.type == "cuda" and not _cuda_walk_fits(acc, us.shape[1], hidden, u.device):
        return None
    # the device copy of the degree table is built from the validated host list
    bounds = _device_bounds(packed.bounds_list, u.device)
    xs, logdet = _made_inv(
        us,
        init,
        ws,
        bs,
        bounds,
        packed.bounds_list,
        ACTIVATIONS[activation],
        SCALE_FNS[scale_fn],
        clamp,
    )
    x = xs.index_select(1, torch.argsort(packed.order))
    return x.to(u.dtype), logdet
