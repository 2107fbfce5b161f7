"""Coupling layers (NICE additive, RealNVP/Glow affine) on the fused coupling ops.

A coupling splits its input into a conditioning part ``x_a`` and a transformed part ``x_b``; a
conditioner network reads ``x_a`` (and an optional context) and outputs the shift (and the raw
scale) for ``x_b``. Both directions cost one conditioner pass, so forward and inverse are equally
fast. Masks:

* ``"half"`` / ``"channel"``: split dim 1 (features of vectors, channels of images) in two; the
  conditioner sees only ``x_a`` and outputs parameters for ``x_b`` alone.
* ``"checkerboard"``: images: alternate pixels ``(h + w) % 2``; vectors: alternate features.
  The conditioner sees ``x * (1 - mask)`` and outputs parameters for every element; the fused op
  applies them only where the mask is 1 (no gather/scatter of the halves).
* a tensor: an arbitrary binary mask broadcastable to the input's ``shape`` (1 = transformed).

``parity=1`` swaps the roles of the two parts, so alternating parities transform everything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from fastflow import _backend as B
from fastflow.nn.base import Transform
from fastflow.ops.conv import (
    CONV_MLP_MAX_CHANNELS,
    CONV_MLP_MAX_MACS,
    TAP_SPLIT_MAX_OUT,
    TAP_SPLIT_MIN_PIXELS,
    conv3x3,
    conv_mlp3,
    conv_mlp3_macs,
    conv_net3,
)
from fastflow.ops.coupling import (
    SCALE_FNS,
    additive_coupling,
    additive_coupling_inverse,
    affine_coupling,
    affine_coupling_inverse,
    check_scale,
)
from fastflow.ops.mlp_coupling import init_mlp_params, mlp_affine_coupling, mlp_layout

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelsLastSequential",
    "MLPAffineCoupling",
    "mlp_subnet",
    "conv_subnet",
    "checkerboard_mask",
]

Subnet = Callable[[int, int], nn.Module]


def _zero_last(net: nn.Sequential) -> nn.Sequential:
    last = net[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return net


def mlp_subnet(hidden: int = 128, hidden_layers: int = 2) -> Subnet:
    """Factory of the default vector conditioner: an MLP with ReLUs and a zero-initialised last
    layer (so a new coupling is the identity).

    Example:
        >>> net = mlp_subnet(hidden=16)(3, 4)
        >>> net(torch.randn(2, 3)).abs().max().item()
        0.0
    """

    def make(in_features: int, out_features: int) -> nn.Module:
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, out_features))
        return _zero_last(nn.Sequential(*layers))

    return make


class ChannelsLastSequential(nn.Sequential):
    """:class:`torch.nn.Sequential` of convolutions that runs in channels-last layout on the CPU:
    the input is made channels-last, the layers run, the output is made contiguous again (the
    caller sees ordinary NCHW tensors; parameters and ``state_dict`` keys are those of the plain
    ``Sequential``). On this machine's oneDNN a Glow conditioner's forward + backward is 1.1-1.4x
    faster channels-last (measured per level shape; docs/DESIGN-NOTES.md, "Glow's conditioner on
    channels-last activations"). Other devices and non-4-D inputs run unchanged.

    On fp32 CPU inputs with the native kernels, exactly Glow's 3-1-3 conditioner (3x3 conv, ReLU,
    1x1 conv, ReLU, 3x3 conv, plain ``nn.Conv2d``/``nn.ReLU`` without hooks) runs as one autograd
    node (:func:`~fastflow.ops.conv.conv_mlp3` on small inputs, else
    :func:`~fastflow.ops.conv.conv_net3`), and other plain 3x3 layers with at most 8 input or
    output channels through :func:`~fastflow.ops.conv.conv3x3`: the same parameters and values up
    to rounding (docs/DESIGN-NOTES.md, "Narrow 3x3 convolutions").

    Example:
        >>> net = ChannelsLastSequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU())
        >>> y = net(torch.randn(1, 2, 4, 4))
        >>> y.shape, y.is_contiguous()
        (torch.Size([1, 3, 4, 4]), True)
    """

    def __init__(self, *args) -> None:
        super().__init__(*args)
        # The convolutions' weights are kept channels-last, the layout oneDNN reads with
        # channels-last activations: a contiguous [O, I, k, k] weight is otherwise copied to it
        # on every call, forward and backward (and its gradient copied back), ~3% of a 3x32x32
        # Glow step. Values and state_dict keys are unchanged; load_state_dict copies into it.
        for layer in self:
            if isinstance(layer, nn.Conv2d) and layer.weight.dim() == 4:
                layer.weight.data = layer.weight.data.contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.device.type != "cpu":
            return super().forward(x)
        x = x.contiguous(memory_format=torch.channels_last)
        if x.dtype != torch.float32:
            return super().forward(x).contiguous()
        found = _conditioner_params(self, x)
        if torch.compiler.is_compiling():
            # compiled: the matrix-product conditioner as its torch.library ops (inductor would
            # otherwise run its own convolutions, slower here: docs/DESIGN-NOTES.md); the rest as
            # plain layers
            if found is not None and found[0] == "mlp3":
                return conv_mlp3(x, *found[1]).contiguous()
            return super().forward(x).contiguous()
        if found is not None:
            # Glow's whole 3-1-3 conditioner in one autograd node: on a small input as matrix
            # products (conv_mlp3: five oneDNN calls' fixed cost is most of the time there),
            # else on oneDNN with in-place ReLUs both ways (conv_net3); fastflow.ops.conv.
            path, params = found
            return (conv_mlp3 if path == "mlp3" else conv_net3)(x, *params).contiguous()
        for layer in self:
            # A plain 3x3 "same" convolution with few input or output channels runs as
            # fastflow.ops.conv.conv3x3 (the same parameters; faster on oneDNN, see there).
            x = conv3x3(x, layer.weight, layer.bias) if _narrow_same3x3(layer, x) else layer(x)
        return x.contiguous()


def _plain_conv(layer: nn.Module, k: int) -> bool:
    """Exactly an ``nn.Conv2d`` (a subclass may override ``forward``) with a k x k kernel,
    stride 1, "same" zero padding, no dilation or groups, fp32 weights and no module hooks
    (the fast paths bypass the module call)."""
    return (
        type(layer) is nn.Conv2d
        and layer.kernel_size == (k, k)
        and layer.stride == (1, 1)
        and layer.padding == (k // 2, k // 2)
        and layer.dilation == (1, 1)
        and layer.groups == 1
        and layer.padding_mode == "zeros"
        and layer.weight.dtype == torch.float32
        and not _hooked(layer)
    )


def _hooked(layer: nn.Module) -> bool:
    return bool(
        layer._forward_hooks
        or layer._forward_pre_hooks
        or layer._backward_hooks
        or layer._backward_pre_hooks
        or _global_module_hooks()
    )


def _narrow_same3x3(layer: nn.Module, x: Tensor) -> bool:
    """A plain 3x3 convolution (:func:`_plain_conv`) with at most ``TAP_SPLIT_MAX_OUT`` input or
    output channels applied to at least ``TAP_SPLIT_MIN_PIXELS`` pixels (below, conv3x3 would
    run the plain convolution anyway, through an extra Python autograd node)."""
    return (
        x.shape[0] * x.shape[2] * x.shape[3] >= TAP_SPLIT_MIN_PIXELS
        and _plain_conv(layer, 3)
        and min(layer.in_channels, layer.out_channels) <= TAP_SPLIT_MAX_OUT
    )


def _conditioner_params(seq: nn.Sequential, x: Tensor) -> tuple[str, tuple[Tensor, ...]] | None:
    """``(path, params)`` when ``seq`` is exactly Glow's conditioner (plain 3x3 conv, ReLU, plain
    1x1 conv, ReLU, plain 3x3 conv, all with biases; :func:`_plain_conv`): ``"mlp3"``
    (:func:`~fastflow.ops.conv.conv_mlp3`) for few input and output channels on an input small
    enough for it to win (``CONV_MLP_MAX_MACS``, measured), else ``"net3"``
    (:func:`~fastflow.ops.conv.conv_net3`); None for anything else, under autocast (the products
    would run in bf16) or without the native kernels."""
    if len(seq) != 5 or torch.is_autocast_enabled("cpu") or not B.use_native(x):
        return None
    c1, r1, c2, r2, c3 = seq
    if not (
        type(r1) is nn.ReLU
        and type(r2) is nn.ReLU
        and not (_hooked(r1) or _hooked(r2))
        and _plain_conv(c1, 3)
        and _plain_conv(c2, 1)
        and _plain_conv(c3, 3)
        and all(c.bias is not None for c in (c1, c2, c3))
        and c2.in_channels == c1.out_channels == c2.out_channels == c3.in_channels
    ):
        return None
    params = (c1.weight, c1.bias, c2.weight, c2.bias, c3.weight, c3.bias)
    n, ci, h, w = x.shape
    macs = conv_mlp3_macs(n, h, w, ci, c1.out_channels, c3.out_channels)
    small = max(ci, c3.out_channels) <= CONV_MLP_MAX_CHANNELS and macs <= CONV_MLP_MAX_MACS
    return ("mlp3" if small else "net3"), params


def _global_module_hooks() -> bool:
    return bool(
        _nn_module._global_forward_hooks
        or _nn_module._global_forward_pre_hooks
        or _nn_module._global_backward_hooks
        or _nn_module._global_backward_pre_hooks
    )


def conv_subnet(hidden: int = 512) -> Subnet:
    """Factory of Glow's image conditioner: 3x3 conv -> ReLU -> 1x1 conv -> ReLU -> zero-init 3x3
    conv (a new coupling is the identity).

    Example:
        >>> net = conv_subnet(hidden=8)(2, 4)
        >>> net(torch.randn(1, 2, 5, 5)).shape
        torch.Size([1, 4, 5, 5])

    Reference: Kingma & Dhariwal, "Glow: Generative Flow with Invertible 1x1 Convolutions", 2018.
    """

    def make(in_channels: int, out_channels: int) -> nn.Module:
        return _zero_last(
            ChannelsLastSequential(
                nn.Conv2d(in_channels, hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, hidden, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, out_channels, 3, padding=1),
            )
        )

    return make


def checkerboard_mask(shape: tuple[int, ...], parity: int = 0) -> Tensor:
    """Binary checkerboard mask: ``[1, H, W]`` for image shapes ``(C, H, W)``, ``[D]`` for
    ``(D,)``; 1 where ``(h + w + parity)`` (or ``(i + parity)``) is odd.

    Example:
        >>> checkerboard_mask((1, 2, 2)).tolist()
        [[[0.0, 1.0], [1.0, 0.0]]]

    Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """
    if len(shape) == 3:
        h = torch.arange(shape[1])[:, None]
        w = torch.arange(shape[2])[None, :]
        return ((h + w + parity) % 2).to(torch.get_default_dtype())[None]
    if len(shape) == 1:
        return ((torch.arange(shape[0]) + parity) % 2).to(torch.get_default_dtype())
    raise ValueError(f"checkerboard masks need shape (D,) or (C, H, W), got {tuple(shape)}")


def _normalize_shape(shape: int | tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"shape must be positive sizes (features or (C, H, W)), got {shape}")
    return shape


class _Coupling(Transform):
    """Shared machinery: masks, conditioner, context."""

    _params_per_element = 2

    def __init__(
        self,
        shape: int | tuple[int, ...],
        mask: str | Tensor = "half",
        parity: int = 0,
        subnet: Subnet | None = None,
        hidden: int | None = None,
        context_features: int | None = None,
    ):
        super().__init__()
        self.shape = _normalize_shape(shape)
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        if context_features is not None and (
            not isinstance(context_features, int) or context_features < 1
        ):
            raise ValueError(f"context_features must be a positive int, got {context_features!r}")
        self.parity = parity
        self.context_features = context_features
        image = len(self.shape) == 3
        n = self.shape[0]
        k = self._params_per_element
        if isinstance(mask, str) and mask in ("half", "channel"):
            if n < 2:
                raise ValueError(f"a {mask!r} mask needs shape[0] >= 2, got shape {self.shape}")
            self.split = True
            self.cut = n // 2
            n_a, n_b = (self.cut, n - self.cut) if parity == 0 else (n - self.cut, self.cut)
            in_f, out_f = n_a, n_b * k
            self.register_buffer("mask", None)
            self.mask_kind = "half" if mask == "half" else "channel"
        else:
            self.split = False
            if isinstance(mask, str):
                if mask != "checkerboard":
                    raise ValueError(
                        f"mask must be 'half', 'channel', 'checkerboard' or a tensor, got {mask!r}"
                    )
                m = checkerboard_mask(self.shape, parity)
                self.mask_kind = "checkerboard"
            elif isinstance(mask, torch.Tensor):
                try:
                    torch.broadcast_to(mask, self.shape)
                except RuntimeError:
                    raise ValueError(
                        f"mask of shape {tuple(mask.shape)} does not broadcast to shape "
                        f"{self.shape}"
                    ) from None
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("mask must be binary (0 = conditioning, 1 = transformed)")
                m = mask.detach().to(torch.get_default_dtype()).clone()
                if parity == 1:
                    m = 1 - m
                self.mask_kind = "custom"
            else:
                raise TypeError(f"mask must be a str or a torch.Tensor, got {type(mask).__name__}")
            self.register_buffer("mask", m)
            in_f, out_f = n, n * k
        if context_features:
            in_f += context_features
        if subnet is None:
            subnet = conv_subnet(hidden or 512) if image else mlp_subnet(hidden or 128)
        self.subnet = subnet(in_f, out_f)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, mask={self.mask_kind!r}, parity={self.parity}"

    # -- helpers -------------------------------------------------------------------------------

    def _check(self, x: Tensor, name: str, context: Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"{name} must have shape [N, {', '.join(map(str, self.shape))}], got "
                f"{tuple(x.shape)}"
            )
        if self.context_features is None:
            if context is not None:
                raise ValueError("context was given but this coupling has no context_features")
        else:
            if context is None:
                raise ValueError(
                    f"this coupling needs a context of shape [N, {self.context_features}]"
                )
            if context.dim() != 2 or context.shape != (x.shape[0], self.context_features):
                raise ValueError(
                    f"context must have shape [{x.shape[0]}, {self.context_features}], got "
                    f"{tuple(context.shape)}"
                )

    def _parts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        a, b = x[:, : self.cut], x[:, self.cut :]
        return (a, b) if self.parity == 0 else (b, a)

    def _merge(self, xa: Tensor, yb: Tensor) -> Tensor:
        return torch.cat((xa, yb) if self.parity == 0 else (yb, xa), dim=1)

    def _conditioner(self, xa: Tensor, context: Tensor | None) -> Tensor:
        if context is not None:
            if xa.dim() == 4:
                context = context[:, :, None, None].expand(-1, -1, xa.shape[2], xa.shape[3])
            xa = torch.cat((xa, context.to(xa.dtype)), dim=1)
        return self.subnet(xa)

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, "z" if inverse else "x", context)
        if self.split:
            xa, xb = self._parts(x)
            yb, logdet = self._couple(xb, self._conditioner(xa, context), None, inverse)
            return self._merge(xa, yb), logdet
        m = self.mask.to(x.dtype)
        return self._couple(x, self._conditioner(x * (1 - m), context), m, inverse)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(z, context, inverse=True)


class AffineCoupling(_Coupling):
    """Affine coupling ``y_b = x_b * exp(s(x_a)) + t(x_a)``, ``y_a = x_a`` (RealNVP, Glow).

    The conditioner outputs ``2 * |x_b|`` values, split into ``(raw_scale, shift)`` along dim 1;
    ``s = scale_fn(raw_scale)`` (see :func:`fastflow.ops.coupling.affine_coupling`). The
    elementwise part runs as one fused kernel in each direction.

    Args:
        shape: event shape: ``features`` (int) for vectors or ``(C, H, W)`` for images.
        mask: ``"half"``/``"channel"``, ``"checkerboard"`` or a binary tensor (see module doc).
        parity: 0 or 1; 1 swaps which part is transformed.
        subnet: ``subnet(in_features, out_features) -> nn.Module`` (FrEIA's convention; for images
            in/out are channel counts). Default: :func:`mlp_subnet` for vectors,
            :func:`conv_subnet` for images, both zero-initialised (a new coupling is the identity
            for ``scale_fn`` ``"softclamp"``/``"identity"``).
        hidden: hidden width of the default conditioner (128 for vectors, 512 for images).
        context_features: size of an optional vector context ``[N, F]``, concatenated to the
            conditioner input (broadcast over pixels for images).
        scale_fn: ``"softclamp"`` (default), ``"glow"`` or ``"identity"``.
        clamp: soft-clamp bound (``|s| < clamp``).

    Example:
        >>> layer = AffineCoupling(4, hidden=16)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x), logdet.shape
        (True, torch.Size([8]))

    References: Dinh et al., "Density estimation using Real NVP", 2017; Kingma & Dhariwal,
    "Glow", 2018.
    """

    def __init__(
        self,
        shape: int | tuple[int, ...],
        mask: str | Tensor = "half",
        parity: int = 0,
        subnet: Subnet | None = None,
        hidden: int | None = None,
        context_features: int | None = None,
        scale_fn: str = "softclamp",
        clamp: float = 2.0,
    ):
        clamp = check_scale(scale_fn, clamp)
        super().__init__(shape, mask, parity, subnet, hidden, context_features)
        self.scale_fn = scale_fn
        self.clamp = float(clamp)

    def _couple(self, x: Tensor, h: Tensor, mask: Tensor | None, inverse: bool):
        # under autocast the conditioner may return bf16/fp16 for fp32 data: the op wants one dtype
        raw, shift = h.to(x.dtype).chunk(2, dim=1)
        op = affine_coupling_inverse if inverse else affine_coupling
        return op(x, raw, shift, scale_fn=self.scale_fn, clamp=self.clamp, mask=mask)


class AdditiveCoupling(_Coupling):
    """Additive coupling ``y_b = x_b + t(x_a)``, ``y_a = x_a``; volume preserving (NICE).

    Arguments as :class:`AffineCoupling` without ``scale_fn``/``clamp``; the conditioner outputs
    ``|x_b|`` values (the shift).

    Example:
        >>> layer = AdditiveCoupling((4, 6, 6), mask="checkerboard", hidden=8)
        >>> x = torch.randn(2, 4, 6, 6)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x), logdet.tolist()
        (True, [0.0, 0.0])

    Reference: Dinh et al., "NICE: Non-linear Independent Components Estimation", 2015.
    """

    _params_per_element = 1

    def _couple(self, x: Tensor, h: Tensor, mask: Tensor | None, inverse: bool):
        op = additive_coupling_inverse if inverse else additive_coupling
        return op(x, h.to(x.dtype), mask=mask)


class MLPAffineCoupling(Transform):
    """Vector affine coupling with a built-in ReLU MLP conditioner, fused into one op each way.

    The same map as ``AffineCoupling(features, "half", parity, hidden=hidden)`` (``y_b = x_b *
    exp(s(x_a)) + t(x_a)``, conditioner ``|x_a| (+ C) -> hidden -> ... -> 2 |x_b|``, last layer
    zero-initialised), but the MLP's weights and biases are **one flat parameter** and the whole
    layer — MLP and coupling — runs as one autograd node with a hand-written backward
    (:func:`fastflow.ops.mlp_coupling.mlp_affine_coupling`): fewer calls, autograd nodes and
    optimizer tensors, which is where a small vector flow's training step spends its time.

    Args:
        features: ``D >= 2``.
        hidden: width of each hidden layer (default 64).
        hidden_layers: number of hidden layers (default 2).
        parity: 0: the first ``D // 2`` features condition the rest; 1: the reverse.
        context_features: size of an optional context ``[N, C]`` fed to the conditioner.
        scale_fn, clamp: as :class:`AffineCoupling`.

    Example:
        >>> layer = MLPAffineCoupling(4, hidden=16)
        >>> x = torch.randn(8, 4)
        >>> z, logdet = layer(x)
        >>> torch.allclose(layer.inverse(z)[0], x), logdet.shape, layer.params.dim()
        (True, torch.Size([8]), 1)

    Reference: Dinh et al., "Density estimation using Real NVP", 2017.
    """

    def __init__(
        self,
        features: int,
        hidden: int = 64,
        hidden_layers: int = 2,
        parity: int = 0,
        context_features: int | None = None,
        scale_fn: str = "softclamp",
        clamp: float = 2.0,
    ):
        super().__init__()
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity!r}")
        if not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        if not isinstance(hidden_layers, int) or hidden_layers < 0:
            raise ValueError(f"hidden_layers must be an int >= 0, got {hidden_layers!r}")
        if context_features is not None and (
            not isinstance(context_features, int) or context_features < 1
        ):
            raise ValueError(f"context_features must be a positive int, got {context_features!r}")
        clamp = check_scale(scale_fn, clamp)
        self.features, self.parity = features, parity
        self.cut = features // 2
        da = self.cut if parity == 0 else features - self.cut
        db = features - da
        self.context_features = context_features
        c = context_features or 0
        self.layout = mlp_layout((da + c, *([hidden] * hidden_layers), 2 * db))
        self.params = nn.Parameter(init_mlp_params(self.layout))
        self.scale_fn, self.clamp = scale_fn, float(clamp)
        self.shape = (features,)

    def extra_repr(self) -> str:
        return f"features={self.features}, mlp={self.layout.sizes}, parity={self.parity}"

    def _run(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"x must have shape [N, {self.features}], got {tuple(x.shape)}")
        if (context is None) != (self.context_features is None):
            raise ValueError(
                f"this coupling needs a context of shape [N, {self.context_features}]"
                if context is None
                else "context was given but this coupling has no context_features"
            )
        if context is not None and tuple(context.shape) != (x.shape[0], self.context_features):
            raise ValueError(
                f"context must have shape [{x.shape[0]}, {self.context_features}], got "
                f"{tuple(context.shape)}"
            )
        p = self.params if self.params.dtype == x.dtype else self.params.to(x.dtype)
        return mlp_affine_coupling(
            x, p, self.layout, self.cut, self.parity, context, self.scale_fn, self.clamp, inverse
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._run(z, context, inverse=True)

    def _chain_step(self, x: Tensor):
        """This layer as a step of a one-node run (:mod:`fastflow.ops.chain`) for ``x``, or None
        where its forward would not take the whole-layer kernel."""
        from fastflow.ops.mlp_coupling import CouplingStep, _use_kernel

        p = self.params
        if (
            self.context_features is not None
            or x.shape[1] != self.features
            or p.dtype != x.dtype
            or p.device != x.device
            or not _use_kernel(x, self.layout)
        ):
            return None
        mode = SCALE_FNS[self.scale_fn]
        return CouplingStep(p, self.layout, self.cut, self.parity, mode, self.clamp)
