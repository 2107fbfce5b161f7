"""TarFlow (Zhai et al. 2024): images as patch sequences through causal transformer
autoregressive flow blocks, with four inverses and the one-step score denoiser; and the BiFlow
learned inverse (Lu et al. 2026), a bidirectional transformer that maps noise to data in one
pass.

Sampling methods (``TarFlow.sample(method=...)``):

* ``"naive"``: every block reruns on the whole sequence for each token (the reference);
* ``"exact"``: serial decoding with a preallocated key/value cache (one forward pass of work
  per block);
* ``"jacobi"``: chunked Jacobi fixed-point decoding with a tolerance and an iteration cap
  (``model.last_sample_info["iterations"]``);
* ``"learned"``: the attached :class:`LearnedInverse` (train it with :func:`train_inverse` or
  ``fastflow train-inverse RUN/best.pt``); it learns the denoising, so no score step follows.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fastflow.distributions import StandardNormal
from fastflow.flow import Flow
from fastflow.nn.base import Compose
from fastflow.nn.transformer import INVERSE_METHODS, Patchify, TransformerAutoregressive, _Layer

__all__ = [
    "SAMPLE_METHODS",
    "LearnedInverse",
    "TarFlow",
    "load_inverse",
    "save_inverse",
    "reconstruction_error",
    "train_inverse",
    "train_inverse_checkpoint",
]

#: the ``method`` values of :meth:`TarFlow.sample`
SAMPLE_METHODS = (*INVERSE_METHODS, "learned")

_LN2 = math.log(2.0)


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _heads_for(width: int) -> int:
    return next(h for h in (4, 2, 1) if width % h == 0)


class TarFlow(Flow):
    """TarFlow: patch tokens -> ``blocks`` causal transformer autoregressive flow blocks
    (alternating sequence direction) -> a standard normal over the tokens.

    Trained on data with Gaussian noise of standard deviation ``noise_std`` added
    (``fastflow train`` does that: it reads ``model.train_noise_std``); ``sample`` then takes
    one score step ``x + noise_std**2 * grad log p(x)`` to clean the samples
    (``denoise=True``).

    Args:
        image_shape: ``(C, H, W)``.
        patch_size: patch side ``p`` (divides ``H`` and ``W``): ``H W / p**2`` tokens of
            ``C p**2`` features.
        width: transformer width.
        depth: transformer layers per block.
        blocks: flow blocks.
        heads: attention heads (divide ``width``).
        noise_std: training noise and denoising step size (in the model's input units).
        num_classes: ``> 0`` for a class-conditional model: ``context`` (or ``labels``) is an
            int tensor ``[N]`` of labels, or a float ``[N, num_classes]`` (e.g. one-hot).
        mlp_ratio, scale_fn, clamp: passed to every
            :class:`~fastflow.nn.TransformerAutoregressive`.

    Example:
        >>> model = TarFlow((1, 8, 8), patch_size=2, width=16, depth=1, blocks=2, heads=2,
        ...                 noise_std=0.05)
        >>> x = torch.rand(4, 1, 8, 8) - 0.5
        >>> model.log_prob(x).shape, model.sample(3, method="exact").shape
        (torch.Size([4]), torch.Size([3, 1, 8, 8]))

    Reference: Zhai et al., "Normalizing Flows are Capable Generative Models", 2024; Gu et al.,
    "STARFlow", 2025; Lu et al., "Bidirectional Normalizing Flow: From Data to Noise and Back",
    2026.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        patch_size: int = 4,
        width: int = 128,
        depth: int = 2,
        blocks: int = 4,
        heads: int = 4,
        noise_std: float = 0.05,
        num_classes: int = 0,
        mlp_ratio: int = 4,
        scale_fn: str = "softclamp",
        clamp: float = 2.0,
    ):
        patch = Patchify(tuple(image_shape), patch_size)
        _positive_int("blocks", blocks)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
        if not (
            isinstance(noise_std, (int, float)) and math.isfinite(noise_std) and noise_std >= 0
        ):
            raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")
        ctx = num_classes or None
        layers = [
            TransformerAutoregressive(
                patch.tokens,
                patch.token_dim,
                width=width,
                depth=depth,
                heads=heads,
                mlp_ratio=mlp_ratio,
                context_features=ctx,
                flip=bool(i % 2),
                scale_fn=scale_fn,
                clamp=clamp,
            )
            for i in range(blocks)
        ]
        base = StandardNormal((patch.tokens, patch.token_dim))
        super().__init__(Compose([patch, *layers]), base, event_shape=patch.image_shape)
        self.image_shape = patch.image_shape
        self.patch_size = patch.patch_size
        self.width, self.depth, self.heads, self.mlp_ratio = width, depth, heads, mlp_ratio
        self.num_classes = num_classes
        self.noise_std = float(noise_std)
        #: what ``fastflow train`` adds to each training batch (Gaussian, this std)
        self.train_noise_std = self.noise_std
        self.last_sample_info: dict = {}
        self.__dict__["learned_inverse"] = None  # not a submodule: checkpoints stay the flow's

    # -- pieces ----------------------------------------------------------------------------------

    @property
    def patchify(self) -> Patchify:
        return self.transforms[0]

    @property
    def blocks(self) -> list[TransformerAutoregressive]:
        return list(self.transforms)[1:]

    def _context(self, context: Tensor | None, n: int | None = None) -> Tensor | None:
        """Labels ``[N]`` -> one-hot; float context checked; ``None`` for unconditional."""
        if context is None:
            if self.num_classes:
                raise ValueError(
                    f"this TarFlow is class-conditional (num_classes={self.num_classes}): "
                    "pass labels (an int tensor [N]) or a context [N, num_classes]"
                )
            return None
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"labels/context must be a torch.Tensor, got {type(context).__name__}")
        if not self.num_classes:
            raise ValueError("labels/context given, but this TarFlow is unconditional")
        if not context.is_floating_point():
            if context.dim() != 1:
                raise ValueError(f"labels must be a 1-D int tensor, got {tuple(context.shape)}")
            if context.numel() and (context.min() < 0 or context.max() >= self.num_classes):
                raise ValueError(
                    f"labels must be in [0, {self.num_classes}), got values "
                    f"{int(context.min())}..{int(context.max())}"
                )
            dtype = self.base._anchor.dtype
            context = nn.functional.one_hot(context.long(), self.num_classes).to(dtype)
        if n is not None and context.shape[0] == 1 and n != 1:
            context = context.expand(n, *context.shape[1:])
        return context

    # -- density ---------------------------------------------------------------------------------

    def _run_forward(self, x: Tensor, context: Tensor | None):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        return super()._run_forward(x, self._context(context, x.shape[0]))

    def inverse(self, z, context=None, latents=None, temperature: float = 1.0):
        """``(x, log|det dx/dz|)`` by exact KV-cached decoding (see :meth:`decode`)."""
        return super().inverse(z, self._context(context, z.shape[0]), latents, temperature)

    def bits_per_dim(self, x: Tensor, context: Tensor | None = None, levels: int = 256) -> Tensor:
        """Bits/dim of dequantized images ``x = (k + u) / levels - 0.5`` (``fastflow train``'s
        convention): ``-log p(x) / (D log 2) + log2(levels)``, a bound on the discrete NLL."""
        _positive_int("levels", levels)
        d = math.prod(self.image_shape)
        return -self.log_prob(x, context) / (d * _LN2) + math.log2(levels)

    def trajectory(self, x: Tensor, context: Tensor | None = None) -> list[Tensor]:
        """The token states ``[s_0, ..., s_B]`` of the forward pass (``s_0`` the patches of
        ``x``, ``s_B = z``), each ``[N, T, D]`` in natural token order."""
        ctx = self._context(context, x.shape[0])
        s, _ = self.patchify(x)
        states = [s]
        for block in self.blocks:
            s, _ = block(s, ctx)
            states.append(s)
        return states

    # -- sampling --------------------------------------------------------------------------------

    def decode(
        self,
        z: Tensor,
        context: Tensor | None = None,
        method: str = "exact",
        chunk: int = 16,
        tol: float = 1e-3,
        max_iter: int = 32,
    ) -> Tensor:
        """Latent tokens ``z`` ``[N, T, D]`` -> images by ``method`` (:data:`SAMPLE_METHODS`),
        without the denoising step. Records ``self.last_sample_info`` (method, seconds, and for
        ``"jacobi"``/``"exact"`` the passes per block)."""
        if method not in SAMPLE_METHODS:
            raise ValueError(f"method must be one of {SAMPLE_METHODS}, got {method!r}")
        ctx = self._context(context, z.shape[0])
        t0 = time.perf_counter()
        info: dict = {"method": method}
        if method == "learned":
            inv = self.learned_inverse
            if inv is None:
                raise ValueError(
                    "method='learned' needs a trained inverse: train_inverse(model, data) or "
                    "model.attach_inverse(load_inverse(path, model))"
                )
            x = inv(z, ctx)
        else:
            s, iters = z, []
            for block in reversed(self.blocks):
                s, _ = block.inverse(s, ctx, method=method, chunk=chunk, tol=tol, max_iter=max_iter)
                iters.append(block.last_iterations)
            if method != "naive":
                info["iterations"] = iters
                info["iterations_total"] = sum(iters)
            x, _ = self.patchify.inverse(s)
        info["seconds"] = time.perf_counter() - t0
        self.last_sample_info = info
        return x

    def denoise(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """One score step ``x + noise_std**2 * grad_x log p(x)`` (Tweedie's formula)."""
        if self.noise_std == 0:
            return x
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(self.log_prob(xg, context).sum(), xg)
        return (x + self.noise_std**2 * g).detach()

    def sample(
        self,
        n: int | Sequence[int] | None = None,
        context: Tensor | None = None,
        temperature: float = 1.0,
        *,
        method: str = "exact",
        denoise: bool = True,
        labels: Tensor | None = None,
        chunk: int = 16,
        tol: float = 1e-3,
        max_iter: int = 32,
    ) -> Tensor:
        """``n`` images ``[n, C, H, W]`` (``n`` may be a ``sample_shape`` tuple), without
        gradients.

        Args:
            n: number of samples (defaults to the rows of ``labels``/``context``).
            context, labels: class labels ``[N]`` (or one-hot ``[N, num_classes]``); one row is
                used for all ``n``. ``labels`` is an alias of ``context``.
            temperature: standard deviation of the base.
            method: ``"naive"``, ``"exact"``, ``"jacobi"`` or ``"learned"``.
            denoise: take the score step afterwards (skipped for ``"learned"``, which learns
                the clean data).
            chunk, tol, max_iter: ``"jacobi"``'s chunk length, relative tolerance and cap.
        """
        if labels is not None and context is not None:
            raise ValueError("pass labels or context, not both")
        context = labels if labels is not None else context
        if isinstance(n, (tuple, list, torch.Size)):
            shape = tuple(n)
            if not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in shape):
                raise ValueError(f"sample_shape must hold non-negative ints, got {n!r}")
            x = self.sample(
                math.prod(shape), context, temperature, method=method, denoise=denoise,
                chunk=chunk, tol=tol, max_iter=max_iter,
            )  # fmt: skip
            return x.reshape(*shape, *x.shape[1:])
        n = self._n(n, context)
        ctx = self._context(context, n)
        if ctx is not None and ctx.shape[0] != n:
            raise ValueError(f"labels/context have {ctx.shape[0]} rows but n={n}")
        with torch.no_grad():
            z = self.base.sample(n, temperature=temperature)
            x = self.decode(z, ctx, method, chunk, tol, max_iter)
        if denoise and method != "learned":
            x = self.denoise(x, ctx)
        return x

    # -- the learned inverse ---------------------------------------------------------------------

    def attach_inverse(self, inverse: LearnedInverse | None) -> TarFlow:
        """Use ``inverse`` for ``method="learned"`` (kept outside the flow's ``state_dict``)."""
        if inverse is not None:
            if not isinstance(inverse, LearnedInverse):
                raise TypeError(f"inverse must be a LearnedInverse, got {type(inverse).__name__}")
            inverse.check_fits(self)
            a = self.base._anchor
            inverse.to(device=a.device, dtype=a.dtype)
        self.__dict__["learned_inverse"] = inverse
        return self


class LearnedInverse(nn.Module):
    """BiFlow's learned inverse of a :class:`TarFlow`: a bidirectional (non-causal)
    transformer mapping latent tokens to clean images in one pass.

    It has one stage per flow block (``depth`` layers each); stage ``j`` ends in a projection
    of its hidden state to token space, trained to match the forward trajectory's state before
    block ``B - 1 - j`` (hidden alignment); the last stage's projection is the output. See
    :func:`train_inverse`.

    Args:
        tokens, token_dim: the flow's token layout.
        image_shape, patch_size: to turn tokens back into images.
        width, depth, blocks, heads, mlp_ratio: the transformer (defaults: the flow's).
        num_classes: class conditioning as in the flow.

    Example:
        >>> flow = TarFlow((1, 4, 4), patch_size=2, width=8, depth=1, blocks=2, heads=2)
        >>> inv = LearnedInverse.for_model(flow)
        >>> inv(torch.randn(3, 4, 4)).shape
        torch.Size([3, 1, 4, 4])

    Reference: Lu et al., "Bidirectional Normalizing Flow: From Data to Noise and Back", 2026.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        patch_size: int,
        width: int,
        depth: int,
        blocks: int,
        heads: int,
        mlp_ratio: int = 4,
        num_classes: int = 0,
    ):
        super().__init__()
        self.patchify = Patchify(tuple(image_shape), patch_size)
        t, d = self.patchify.tokens, self.patchify.token_dim
        for name, v in (("width", width), ("depth", depth), ("blocks", blocks), ("heads", heads)):
            _positive_int(name, v)
        if width % heads:
            raise ValueError(f"width ({width}) must be divisible by heads ({heads})")
        self.options = {
            "image_shape": list(self.patchify.image_shape),
            "patch_size": self.patchify.patch_size,
            "width": width,
            "depth": depth,
            "blocks": blocks,
            "heads": heads,
            "mlp_ratio": mlp_ratio,
            "num_classes": num_classes,
        }
        self.num_classes = num_classes
        self.proj_in = nn.Linear(d, width)
        self.pos = nn.Parameter(torch.randn(t, width) * 0.02)
        self.ctx_embed = nn.Linear(num_classes, width) if num_classes else None
        self.stages = nn.ModuleList(
            nn.ModuleList(_Layer(width, heads, mlp_ratio) for _ in range(depth))
            for _ in range(blocks)
        )
        self.heads = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, d)) for _ in range(blocks)
        )

    @classmethod
    def for_model(cls, model: TarFlow, **overrides) -> LearnedInverse:
        """An inverse with the flow's layout and transformer sizes (``overrides`` replace them)."""
        opts = {
            "image_shape": model.image_shape,
            "patch_size": model.patch_size,
            "width": model.width,
            "depth": model.depth,
            "blocks": len(model.blocks),
            "heads": model.heads,
            "mlp_ratio": model.mlp_ratio,
            "num_classes": model.num_classes,
        }
        opts.update(overrides)
        a = model.base._anchor
        return cls(**opts).to(device=a.device, dtype=a.dtype)

    def check_fits(self, model: TarFlow) -> None:
        if (
            tuple(self.options["image_shape"]) != tuple(model.image_shape)
            or self.options["patch_size"] != model.patch_size
            or self.options["blocks"] != len(model.blocks)
            or self.options["num_classes"] != model.num_classes
        ):
            raise ValueError(
                f"this inverse ({self.options}) does not fit the TarFlow (image "
                f"{model.image_shape}, patch {model.patch_size}, {len(model.blocks)} blocks, "
                f"{model.num_classes} classes)"
            )

    def states(self, z: Tensor, context: Tensor | None = None) -> list[Tensor]:
        """The projected states of the stages, ``[N, T, D]`` each; the last is the output."""
        t, d = self.patchify.tokens, self.patchify.token_dim
        if not isinstance(z, torch.Tensor) or z.dim() != 3 or tuple(z.shape[1:]) != (t, d):
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must have shape [N, {t}, {d}], got {got}")
        h = self.proj_in(z) + self.pos
        if self.ctx_embed is not None:
            if context is None:
                raise ValueError("this inverse is class-conditional: pass a context")
            h = h + self.ctx_embed(context).unsqueeze(1)
        out = []
        for stage, head in zip(self.stages, self.heads):
            for layer in stage:
                h = layer(h, causal=False)
            out.append(head(h))
        return out

    def forward(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Latent tokens ``[N, T, D]`` -> images ``[N, C, H, W]`` in one pass."""
        return self.patchify.inverse(self.states(z, context)[-1])[0]


def _norm_mse(pred: Tensor, target: Tensor) -> Tensor:
    """``|pred - target|^2 / |target|^2`` averaged over the batch (the norm control: every
    block's alignment term is scale free, so blocks whose states are large do not dominate)."""
    num = (pred - target).pow(2).flatten(1).sum(1)
    den = target.pow(2).flatten(1).sum(1).clamp_min(1e-8)
    return (num / den).mean()


def train_inverse(
    model: TarFlow,
    data: Tensor,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 1e-3,
    align_weight: float = 1.0,
    labels: Tensor | None = None,
    inverse: LearnedInverse | None = None,
    seed: int = 0,
    log_every: int = 0,
    max_seconds: float | None = None,
) -> tuple[LearnedInverse, list[dict]]:
    """Train BiFlow's learned inverse of a frozen ``model`` and attach it
    (``model.sample(method="learned")``).

    Each step draws a batch of clean images ``x`` (model input units, as ``fastflow train``
    feeds them), adds the training noise (``model.noise_std``), runs the frozen flow to get the
    trajectory ``s_0 (noisy patches) ... s_B = z``, and fits the inverse on ``z``: the
    reconstruction ``|inverse(z) - x|^2`` (the clean image: the inverse learns the denoising)
    plus ``align_weight`` times the hidden alignment, the norm-normalised error of each earlier
    stage's projected state against ``s_{B-1-j}``.

    Args:
        model: a trained :class:`TarFlow` (left unchanged; its parameters get no gradients).
        data: images ``[N, C, H, W]`` in model units (dequantized, ``- 0.5``).
        steps, batch_size, lr: Adam on the inverse's parameters (cosine decay).
        align_weight: weight of the hidden-alignment terms.
        labels: ``[N]`` class labels for a class-conditional model.
        inverse: continue training this one (default: a new :meth:`LearnedInverse.for_model`).
        seed: batch order and noise.
        log_every: print the losses every this many steps (0: quiet).
        max_seconds: also stop after this much wall time (``steps`` is then an upper bound;
            the cosine decay still spans ``steps``).

    Returns:
        ``(inverse, history)``; ``history`` has ``{"step", "loss", "recon", "align"}`` records
        (every ``max(1, steps // 50)`` steps and the last).

    Example:
        >>> flow = TarFlow((1, 4, 4), patch_size=2, width=8, depth=1, blocks=2, heads=2)
        >>> inv, hist = train_inverse(flow, torch.rand(32, 1, 4, 4) - 0.5, steps=3, batch_size=8)
        >>> flow.sample(2, method="learned").shape
        torch.Size([2, 1, 4, 4])
    """
    if not isinstance(model, TarFlow):
        raise TypeError(f"model must be a TarFlow, got {type(model).__name__}")
    if not isinstance(data, torch.Tensor) or tuple(data.shape[1:]) != tuple(model.image_shape):
        got = tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__
        raise ValueError(
            f"data must have shape [N, {', '.join(map(str, model.image_shape))}], got {got}"
        )
    _positive_int("steps", steps)
    _positive_int("batch_size", batch_size)
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if labels is not None and labels.shape[0] != data.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows, data {data.shape[0]}")
    a = model.base._anchor
    inv = inverse if inverse is not None else LearnedInverse.for_model(model)
    inv.check_fits(model)
    inv.to(device=a.device, dtype=a.dtype).train()
    was_training = model.training
    model.eval()
    opt = torch.optim.Adam(inv.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    n = data.shape[0]
    every = max(1, steps // 50)
    history: list[dict] = []
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            idx = torch.randint(0, n, (min(batch_size, n),), generator=g)
            x = data[idx].to(device=a.device, dtype=a.dtype)
            lab = None if labels is None else labels[idx].to(a.device)
            noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
            with torch.no_grad():
                ctx = model._context(lab, x.shape[0])
                traj = model.trajectory(x + model.noise_std * noise, ctx)
            preds = inv.states(traj[-1], ctx)
            clean, _ = model.patchify(x)
            recon = (preds[-1] - clean).pow(2).mean()
            nb = len(preds)
            align = sum(
                (_norm_mse(preds[j], traj[nb - 1 - j]) for j in range(nb - 1)),
                torch.zeros((), device=x.device, dtype=x.dtype),
            )
            loss = recon + align_weight * align
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(inv.parameters(), 1.0)
            opt.step()
            sched.step()
            if step % every == 0 or step == steps - 1:
                rec = {
                    "step": step + 1,
                    "loss": loss.item(),
                    "recon": recon.item(),
                    "align": align.item(),
                }
                history.append(rec)
                if log_every and (step % log_every == 0 or step == steps - 1):
                    print(
                        f"train-inverse step {step + 1}/{steps}  loss {rec['loss']:.4f}  "
                        f"recon {rec['recon']:.5f}  align {rec['align']:.4f}"
                    )
            if max_seconds is not None and time.perf_counter() - t0 >= max_seconds:
                history.append(
                    {"step": step + 1, "loss": loss.item(), "recon": recon.item(),
                     "align": align.item()}
                )  # fmt: skip
                break
    finally:
        model.train(was_training)
    inv.eval()
    model.attach_inverse(inv)
    return inv, history


@torch.no_grad()
def reconstruction_error(
    model: TarFlow, x: Tensor, labels: Tensor | None = None, noise_seed: int = 0
) -> float:
    """Mean squared error between clean images ``x`` and the learned inverse of the flow's
    latent of ``x`` plus the training noise (what :func:`train_inverse` minimises)."""
    inv = model.learned_inverse
    if inv is None:
        raise ValueError("the model has no learned inverse attached")
    g = torch.Generator().manual_seed(noise_seed)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64).to(x)
    ctx = model._context(labels, x.shape[0])
    z = model.trajectory(x + model.noise_std * noise, ctx)[-1]
    return float((inv(z, ctx) - x).pow(2).mean())


def save_inverse(inverse: LearnedInverse, path: str) -> None:
    """Write a learned inverse (options and weights), atomically
    (:func:`fastflow.checkpoint.save_checkpoint`)."""
    from fastflow.checkpoint import save_checkpoint

    state = {k: v.detach().cpu() for k, v in inverse.state_dict().items()}
    save_checkpoint(
        {"kind": "tarflow-inverse", "options": inverse.options, "state_dict": state}, path
    )


def load_inverse(path: str, model: TarFlow | None = None) -> LearnedInverse:
    """Read a learned inverse written by :func:`save_inverse` (attached to ``model`` if given).

    Raises:
        CheckpointError: missing/corrupt file, or not a learned inverse.
    """
    from fastflow.checkpoint import CheckpointError, load_checkpoint

    ck = load_checkpoint(path)
    if ck.get("kind") != "tarflow-inverse":
        raise CheckpointError(f"{path}: not a TarFlow learned inverse")
    opts = dict(ck["options"])
    opts["image_shape"] = tuple(opts["image_shape"])
    inv = LearnedInverse(**opts)
    try:
        inv.load_state_dict(ck["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path}: weights do not fit ({str(e).splitlines()[0][:150]})"
        ) from None
    inv.eval()
    if model is not None:
        model.attach_inverse(inv)
    return inv


def train_inverse_checkpoint(
    path: str,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    align_weight: float = 1.0,
    out: str | None = None,
    seed: int = 0,
    threads: int = 0,
    device: str = "cpu",
) -> dict:
    """``fastflow train-inverse``: load a TarFlow ``fastflow train`` checkpoint, train its
    learned inverse on the run's training split (dequantized as the run did) with
    :func:`train_inverse`, report the validation reconstruction error, and write the inverse
    (``out``, default ``inverse.pt`` beside the checkpoint; :func:`load_inverse` reads it).

    Returns:
        ``{"out", "val_recon_before", "val_recon_after", "history"}``.
    """
    import os

    from fastflow.training import load_model
    from fastflow.training.preprocess import load_splits, noise_generator

    flow, pre, ck = load_model(path, device)
    if not isinstance(flow, TarFlow):
        raise ValueError(f"{path}: holds a {ck['model_name']!r} model, not a TarFlow")
    cfg = ck.get("config", {})
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        splits = load_splits(cfg["data"], cfg.get("n_data"), cfg["val"], cfg["test"], cfg["seed"])
        dtype = flow.base._anchor.dtype
        train_x = pre.to_model(splits.train, noise_generator(seed, 0), dtype)
        val_x = pre.to_model(splits.val, noise_generator(seed, 1), dtype).to(device)
        inv0 = LearnedInverse.for_model(flow)
        flow.attach_inverse(inv0)
        rec0 = reconstruction_error(flow, val_x, noise_seed=seed)
        inv, history = train_inverse(
            flow, train_x, steps=steps, batch_size=batch_size, lr=lr,
            align_weight=align_weight, inverse=inv0, seed=seed, log_every=max(1, steps // 10),
        )  # fmt: skip
        rec1 = reconstruction_error(flow, val_x, noise_seed=seed)
    finally:
        torch.set_num_threads(before)
    out = out or os.path.join(os.path.dirname(os.path.abspath(path)), "inverse.pt")
    save_inverse(inv, out)
    print(
        f"train-inverse: validation reconstruction MSE {rec0:.5f} -> {rec1:.5f} "
        f"({steps} steps); wrote {out}"
    )
    return {"out": out, "val_recon_before": rec0, "val_recon_after": rec1, "history": history}
