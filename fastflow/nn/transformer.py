"""Transformer autoregressive flow blocks (TarFlow, Zhai et al. 2024) and the patch layer.

A :class:`TransformerAutoregressive` block maps a token sequence ``x`` of shape ``[N, T, D]`` to
``z`` with one causal transformer pass: token ``t`` gets the affine map
``z_t = x_t * exp(s_t) + m_t`` whose ``(s_t, m_t)`` are computed from the tokens before ``t``
(``s`` through the coupling ops' scale function, :func:`fastflow.ops.coupling.affine_coupling`).
Token 0 is passed through, or mapped by an affine map of the context alone when the block is
conditional. The density direction is one parallel pass; the inverse is sequential, and the
block offers three ways of computing it (``method=``):

* ``"naive"``: for every token, rerun the whole block on the sequence decoded so far (the
  reference: ``T - 1`` full passes);
* ``"exact"``: serial decoding with a preallocated key/value cache per layer: each token's
  attention and MLP are computed once, so the work equals one forward pass;
* ``"jacobi"``: block-wise Jacobi fixed-point iteration over chunks of tokens (all tokens of a
  chunk updated in parallel from the previous iterate, the cache of earlier chunks fixed), until
  the relative change is below ``tol`` or ``max_iter`` iterations; a chunk of ``k`` tokens is
  exact after at most ``k`` iterations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastflow.nn.base import Transform, zero_logdet
from fastflow.ops.coupling import affine_coupling, affine_coupling_inverse, check_scale

__all__ = ["Patchify", "TransformerAutoregressive", "INVERSE_METHODS"]

#: the inverse methods of :class:`TransformerAutoregressive` (``"learned"`` is the model's)
INVERSE_METHODS = ("naive", "exact", "jacobi")


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


class Patchify(Transform):
    """Images ``[N, C, H, W]`` -> patch tokens ``[N, (H/p)(W/p), C p p]`` (raster order), and
    back; volume preserving (log-det 0).

    Args:
        image_shape: ``(C, H, W)``.
        patch_size: ``p``; must divide ``H`` and ``W``.

    Example:
        >>> p = Patchify((1, 4, 4), 2)
        >>> z, ld = p(torch.randn(3, 1, 4, 4))
        >>> z.shape, p.inverse(z)[0].shape
        (torch.Size([3, 4, 4]), torch.Size([3, 1, 4, 4]))

    Reference: Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021 (patch tokens).
    """

    def __init__(self, image_shape: tuple[int, int, int], patch_size: int):
        super().__init__()
        shape = tuple(image_shape)
        if len(shape) != 3 or not all(isinstance(s, int) and s > 0 for s in shape):
            raise ValueError(f"image_shape must be (C, H, W) of positive ints, got {image_shape!r}")
        p = _positive_int("patch_size", patch_size)
        c, h, w = shape
        if h % p or w % p:
            raise ValueError(f"patch_size {p} does not divide the image height/width {h}x{w}")
        self.image_shape = shape
        self.patch_size = p
        self.grid = (h // p, w // p)
        self.tokens = self.grid[0] * self.grid[1]
        self.token_dim = c * p * p

    def _check(self, x: Tensor, name: str, shape: tuple[int, ...]) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != shape:
            raise ValueError(
                f"{name} must have shape [N, {', '.join(map(str, shape))}], got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x", self.image_shape)
        c, _, _ = self.image_shape
        (gh, gw), p = self.grid, self.patch_size
        z = x.reshape(x.shape[0], c, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5)
        return z.reshape(x.shape[0], self.tokens, self.token_dim), zero_logdet(x)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, "z", (self.tokens, self.token_dim))
        c, h, w = self.image_shape
        (gh, gw), p = self.grid, self.patch_size
        x = z.reshape(z.shape[0], gh, gw, c, p, p).permute(0, 3, 1, 4, 2, 5)
        return x.reshape(z.shape[0], c, h, w), zero_logdet(z)


class _Layer(nn.Module):
    """Pre-LayerNorm transformer layer: ``h + attn(LN(h))``, then ``h + MLP(LN(h))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def _qkv(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n, t, w = h.shape
        qkv = self.qkv(self.norm1(h)).reshape(n, t, 3, self.heads, w // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [N, heads, T, dh]
        return q, k, v

    def _out(self, h: Tensor, a: Tensor) -> Tensor:
        n, _, t, _ = a.shape
        h = h + self.proj(a.transpose(1, 2).reshape(n, t, -1))
        return h + self.mlp(self.norm2(h))

    def forward(self, h: Tensor, causal: bool = True) -> Tensor:
        q, k, v = self._qkv(h)
        return self._out(h, F.scaled_dot_product_attention(q, k, v, is_causal=causal))

    def step(self, h: Tensor, cache_k: Tensor, cache_v: Tensor, start: int) -> Tensor:
        """Positions ``start .. start+L-1`` of ``h`` (``[N, L, W]``), attending to the cached
        positions ``< start`` and causally within the chunk; writes the chunk's keys/values into
        the preallocated caches (``[N, heads, T, dh]``) in place."""
        q, k, v = self._qkv(h)
        end = start + h.shape[1]
        cache_k[:, :, start:end] = k
        cache_v[:, :, start:end] = v
        keys, values = cache_k[:, :, :end], cache_v[:, :, :end]
        if h.shape[1] == 1:  # one query: every cached position is visible
            a = F.scaled_dot_product_attention(q, keys, values)
        else:
            mask = torch.ones(h.shape[1], end, dtype=torch.bool, device=h.device).tril(start)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        return self._out(h, a)


class TransformerAutoregressive(Transform):
    """One TarFlow block: a causal transformer autoregressive affine flow over tokens.

    ``forward`` (data -> latent) maps ``x`` ``[N, T, D]`` to ``z_t = x_t * exp(s_t) + m_t`` with
    ``(raw_t, m_t)`` from a causal pre-LayerNorm transformer (learned positions, attention +
    MLP layers, zero-initialised output projection, so a new block is the identity) reading
    tokens ``< t``, and ``s_t = scale_fn(raw_t)`` (soft clamp by default). Token 0 is passed
    through; with ``context_features`` it gets ``(raw_0, m_0)`` from the context alone (a
    zero-initialised linear map), and the context embedding is added to every token. With
    ``flip=True`` the block runs over the reversed sequence (TarFlow alternates directions).

    Args:
        tokens: sequence length ``T``.
        token_dim: features per token ``D``.
        width: transformer width (divisible by ``heads``).
        depth: transformer layers.
        heads: attention heads.
        mlp_ratio: MLP hidden width / ``width``.
        context_features: optional vector context ``[N, F]`` (e.g. a one-hot class).
        flip: autoregressive over the reversed sequence.
        scale_fn, clamp: the scale function (:mod:`fastflow.ops.coupling`).

    ``inverse(z, context, method="exact")`` takes ``method`` in :data:`INVERSE_METHODS`; for
    ``"jacobi"`` also ``chunk``, ``tol`` and ``max_iter`` (the iterations used are in
    ``block.last_iterations``).

    Example:
        >>> block = TransformerAutoregressive(tokens=6, token_dim=3, width=16, depth=1, heads=2)
        >>> x = torch.randn(4, 6, 3)
        >>> z, logdet = block(x)
        >>> x2, ld2 = block.inverse(z, method="exact")
        >>> torch.allclose(x, x2, atol=1e-5), logdet.shape
        (True, torch.Size([4]))

    Reference: Zhai et al., "Normalizing Flows are Capable Generative Models" (TarFlow), 2024;
    Gu et al., "STARFlow", 2025 (block Jacobi decoding); Kingma et al., "Improved Variational
    Inference with Inverse Autoregressive Flow", 2016.
    """

    def __init__(
        self,
        tokens: int,
        token_dim: int,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        context_features: int | None = None,
        flip: bool = False,
        scale_fn: str = "softclamp",
        clamp: float = 2.0,
    ):
        super().__init__()
        self.tokens = _positive_int("tokens", tokens)
        self.token_dim = _positive_int("token_dim", token_dim)
        width = _positive_int("width", width)
        _positive_int("depth", depth)
        heads = _positive_int("heads", heads)
        _positive_int("mlp_ratio", mlp_ratio)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        if context_features is not None:
            _positive_int("context_features", context_features)
        self.clamp = check_scale(scale_fn, clamp)
        self.scale_fn = scale_fn
        self.width, self.heads, self.flip = width, heads, bool(flip)
        self.context_features = context_features
        self.proj_in = nn.Linear(token_dim, width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * 0.02)
        self.layers = nn.ModuleList(_Layer(width, heads, mlp_ratio) for _ in range(depth))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, 2 * token_dim)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        if context_features is not None:
            self.ctx_embed = nn.Linear(context_features, width)
            self.ctx_first = nn.Linear(context_features, 2 * token_dim)
            nn.init.zeros_(self.ctx_first.weight)
            nn.init.zeros_(self.ctx_first.bias)
        self.last_iterations: int | None = None

    # -- shared pieces ---------------------------------------------------------------------------

    def _check(self, x: Tensor, name: str, context: Tensor | None) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or tuple(x.shape[1:]) != (self.tokens, self.token_dim):
            raise ValueError(
                f"{name} must have shape [N, {self.tokens}, {self.token_dim}], got {tuple(x.shape)}"
            )
        if self.context_features is None:
            return
        if context is None:
            raise ValueError("this block is conditional: context [N, F] is required")
        if context.dim() != 2 or context.shape != (x.shape[0], self.context_features):
            raise ValueError(
                f"context must have shape [{x.shape[0]}, {self.context_features}], got "
                f"{tuple(context.shape)}"
            )

    def _embed(self, x: Tensor, start: int, context: Tensor | None) -> Tensor:
        """Input embedding of tokens ``x`` (``[N, L, D]``) at positions ``start..``."""
        h = self.proj_in(x) + self.pos[start : start + x.shape[1]]
        if self.context_features is not None:
            h = h + self.ctx_embed(context).unsqueeze(1)
        return h

    def _params(self, h: Tensor) -> tuple[Tensor, Tensor]:
        raw, shift = self.proj_out(self.norm_out(h)).chunk(2, dim=-1)
        return raw, shift

    def _first(self, ref: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(raw_0, m_0)`` of token 0, ``[N, 1, D]`` (zeros: passed through)."""
        if self.context_features is None:
            zero = ref.new_zeros(ref.shape[0], 1, self.token_dim)
            return zero, zero
        raw, shift = self.ctx_first(context).unsqueeze(1).chunk(2, dim=-1)
        return raw, shift

    def _all_params(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(raw, m)`` of every token from the (already ordered) sequence ``x``: one pass."""
        raw0, m0 = self._first(x, context)
        if self.tokens == 1:
            return raw0, m0
        h = self._embed(x[:, :-1], 0, context)
        for layer in self.layers:
            h = layer(h)
        raw, shift = self._params(h)
        return torch.cat([raw0, raw], 1), torch.cat([m0, shift], 1)

    def _order(self, x: Tensor) -> Tensor:
        return x.flip(1) if self.flip else x

    # -- normalizing direction -------------------------------------------------------------------

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, "x", context)
        xs = self._order(x)
        raw, shift = self._all_params(xs, context)
        z, logdet = affine_coupling(xs, raw, shift, self.scale_fn, self.clamp)
        return self._order(z), logdet

    # -- generative direction --------------------------------------------------------------------

    def inverse(
        self,
        z: Tensor,
        context: Tensor | None = None,
        method: str = "exact",
        chunk: int = 16,
        tol: float = 1e-3,
        max_iter: int = 32,
    ) -> tuple[Tensor, Tensor]:
        """``(x, log|det dx/dz|)`` by ``method`` (``"naive"``, ``"exact"`` or ``"jacobi"``;
        ``chunk``, ``tol`` and ``max_iter`` are Jacobi's). ``"naive"`` and ``"exact"`` give the
        same result up to rounding; ``"jacobi"`` stops a chunk when the relative change of its
        tokens is ``<= tol`` (or after ``max_iter`` passes) and is exact with ``tol=0`` and
        ``max_iter >= chunk``. ``block.last_iterations`` holds the passes used (summed over the
        chunks; ``T - 1`` for ``"exact"``)."""
        self._check(z, "z", context)
        if method not in INVERSE_METHODS:
            raise ValueError(f"method must be one of {INVERSE_METHODS}, got {method!r}")
        zs = self._order(z)
        if method == "naive":
            x, logdet = self._inverse_naive(zs, context)
        elif method == "exact":
            x, logdet = self._inverse_jacobi(zs, context, chunk=1, tol=0.0, max_iter=1)
        else:
            _positive_int("chunk", chunk)
            _positive_int("max_iter", max_iter)
            if not (tol >= 0 and math.isfinite(tol)):
                raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
            x, logdet = self._inverse_jacobi(zs, context, chunk, tol, max_iter)
        return self._order(x), logdet

    def _solve(self, z: Tensor, raw: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        return affine_coupling_inverse(z, raw, shift, self.scale_fn, self.clamp)

    def _inverse_naive(self, z: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        x = torch.zeros_like(z)
        for t in range(self.tokens):
            raw, shift = self._all_params(x, context)  # the whole block, every token
            xt, _ = self._solve(z[:, t : t + 1], raw[:, t : t + 1], shift[:, t : t + 1])
            x = torch.cat([x[:, :t], xt, x[:, t + 1 :]], 1)
        raw, shift = self._all_params(x, context)
        _, logdet = self._solve(z, raw, shift)
        return x, logdet

    def _inverse_jacobi(
        self, z: Tensor, context: Tensor | None, chunk: int, tol: float, max_iter: int
    ) -> tuple[Tensor, Tensor]:
        """Chunked decoding over a preallocated key/value cache. ``chunk=1, max_iter=1`` is the
        exact serial decoder (each input token's layers computed once); larger chunks iterate
        Jacobi updates of the chunk's tokens until the relative change is ``<= tol``."""
        n, t_len, d = z.shape
        raw0, m0 = self._first(z, context)
        x0, ld0 = self._solve(z[:, :1], raw0, m0)
        logdet = ld0
        outs = [x0]
        self.last_iterations = 0
        if t_len == 1:
            return x0, logdet
        dh = self.width // self.heads
        # input positions 0..T-2 (token t's map reads tokens < t): one cache per layer
        caches = [
            (
                z.new_empty(n, self.heads, t_len - 1, dh),
                z.new_empty(n, self.heads, t_len - 1, dh),
            )
            for _ in self.layers
        ]
        ctx_h = self.ctx_embed(context).unsqueeze(1) if self.context_features is not None else None
        prev = x0  # the last decoded token
        a = 1  # first target token of the chunk
        while a < t_len:
            b = min(a + chunk, t_len)
            # the chunk's inputs are tokens a-1..b-2: the first is decoded, the rest iterate
            guess = z[:, a : b - 1]
            iters = 0
            while True:
                h = self.proj_in(torch.cat([prev, guess], 1)) + self.pos[a - 1 : b - 1]
                if ctx_h is not None:
                    h = h + ctx_h
                for layer, (ck, cv) in zip(self.layers, caches):
                    h = layer.step(h, ck, cv, a - 1)
                xs, ld = self._solve(z[:, a:b], *self._params(h))
                iters += 1
                if b - a == 1 or iters >= max_iter:
                    break
                # Jacobi: the chunk's new inputs are this pass's outputs; the first token of
                # the chunk is exact after one pass, the k-th after k passes
                new = xs[:, :-1]
                change = (new - guess).flatten(1).norm(dim=1)
                size = new.flatten(1).norm(dim=1)
                guess = new
                if bool((change <= tol * size).all()):
                    break
            self.last_iterations += iters
            outs.append(xs)
            logdet = logdet + ld
            prev = xs[:, -1:]
            a = b
        return torch.cat(outs, 1), logdet
