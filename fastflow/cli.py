"""The ``fastflow`` command (``python -m fastflow``).

Subcommands register themselves in :data:`COMMANDS`; ``info`` prints :func:`fastflow.info`,
``demo`` runs a coupling round trip on the native kernel and the reference.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(
    name: str, help: str, configure: Callable[[argparse.ArgumentParser], None] | None = None
):
    """Register ``fn(args) -> int`` as subcommand ``name``; ``configure(parser)`` adds options."""

    def deco(fn):
        COMMANDS[name] = (help, configure or (lambda p: None), fn)
        return fn

    return deco


@command("info", "print versions, compiled kernels, threads and backend")
def _info(args) -> int:
    from fastflow._info import format_info, info

    print(format_info(info()))
    return 0


@command(
    "demo",
    "run a fused coupling round trip against the reference",
    lambda p: p.add_argument("--batch", type=int, default=4, help="batch size"),
)
def _demo(args) -> int:
    import torch

    from fastflow.ops.coupling import (
        affine_coupling,
        affine_coupling_inverse,
        reference_affine_coupling,
    )

    torch.manual_seed(0)
    x, raw, t = (torch.randn(args.batch, 16, 8, 8) for _ in range(3))
    y, ld = affine_coupling(x, raw, t)
    y_ref, ld_ref = reference_affine_coupling(x, raw, t)
    x2, ld_inv = affine_coupling_inverse(y, raw, t)
    print(f"affine coupling on {tuple(x.shape)}:")
    print(f"  max |y - y_reference|           = {(y - y_ref).abs().max().item():.2e}")
    print(f"  max |logdet - logdet_reference| = {(ld - ld_ref).abs().max().item():.2e}")
    print(f"  max |inverse(forward(x)) - x|   = {(x2 - x).abs().max().item():.2e}")
    print(f"  max |logdet + inverse logdet|   = {(ld + ld_inv).abs().max().item():.2e}")
    return 0


# -- train / sample / evaluate --------------------------------------------------------------------


def _configure_train(p: argparse.ArgumentParser) -> None:
    from fastflow.registry import MODELS
    from fastflow.training import TrainConfig

    d = TrainConfig()
    g = p.add_argument_group("model")
    g.add_argument("--model", default=d.model, choices=list(MODELS), help="flow (default glow)")
    g.add_argument("--hidden", type=int, help="conditioner width (model default if omitted)")
    g.add_argument("--depth", type=int, help="steps per scale (glow) or layers (vector flows)")
    g.add_argument("--scales", type=int, help="levels of a multi-scale image flow")
    g.add_argument(
        "--marginal",
        type=int,
        help="glow: bins of a per-pixel histogram marginal layer at the data end (the image "
        "levels, e.g. 256; 0 = none; default none; glow on mnist5k: 256)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        default=d.data,
        help="digits, mnist5k, moons, circles, 8gaussians, checkerboard, pinwheel, or a "
        ".npy/.csv file or a folder of PNG images (default digits)",
    )
    g.add_argument(
        "--n-data", type=int, help="points for the 2-D toys (20000); else keep the first N"
    )
    g.add_argument("--val", type=float, default=d.val, help="validation fraction (0.1)")
    g.add_argument("--test", type=float, default=d.test, help="test fraction (0.1)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="epochs (50; glow on mnist5k: 6)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=int, help="per process (64; glow on mnist5k: 32)")
    g.add_argument("--lr", type=float, help="Adam learning rate (2e-3; glow on mnist5k: 4e-3)")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (100)")
    g.add_argument("--schedule", default=d.schedule, choices=["constant", "cosine"])
    g.add_argument("--clip-grad", type=float, default=d.clip_grad, help="max grad norm, 0 = off")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--skip-nonfinite", action="store_true", help="skip batches with NaN/inf loss")
    g.add_argument(
        "--objective",
        default=d.objective,
        choices=["mle", "fm", "fm-ot"],
        help="maximum likelihood (mle), or flow matching of a continuous model's vector field "
        "with independent (fm) or minibatch optimal-transport (fm-ot) couplings",
    )
    g.add_argument(
        "--dequantization",
        choices=["uniform", "variational"],
        help="images: uniform noise in each level (default; glow on mnist5k: variational), or a "
        "conditional flow q(u|x) trained jointly (Flow++); the test line adds the "
        "importance-weighted bound",
    )
    g = p.add_argument_group("run")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N (auto)")
    g.add_argument(
        "--threads",
        type=int,
        default=d.threads,
        help="CPU threads per process (1: small flows train fastest and do not fight other "
        "processes for cores; 0: torch's default, all cores)",
    )
    g.add_argument("--dtype", default=d.dtype, choices=["float32", "float64"])
    g.add_argument("--autocast", default=d.autocast, choices=["off", "bf16", "fp16"])
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--out", help="output folder (runs/<data>-<model>)")
    g.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue from OUT/last.pt (or from CKPT); the options that shape the run (model, "
        "data, split, seed, batch size, dtype, schedule, --lr, --warmup, --clip-grad, "
        "--weight-decay; with a cosine schedule --epochs and --max-steps) must be the "
        "checkpoint's",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an OUT that holds a run, deleting its checkpoints, config.json, "
        "metrics.jsonl and plots (without it, a new run there is refused)",
    )
    g.add_argument("--save-every", type=int, default=0, help="also checkpoint every N steps")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bar")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="no samples/loss PNGs")
    g.add_argument("--sample-n", type=int, default=d.sample_n, help="samples in samples.png")
    g.add_argument("--temperature", type=float, default=d.temperature, help="for samples.png")
    g.add_argument("--eval-batch-size", type=int, default=d.eval_batch_size)
    g.add_argument("--inject-nan-at", type=int, help=argparse.SUPPRESS)


@command(
    "train", "train a flow on a data set (defaults: a small Glow on 8x8 digits)", _configure_train
)
def _train_cmd(args) -> int:
    from fastflow.training import config_from_args, train

    train(config_from_args(args))
    return 0


def _configure_sample(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file written by fastflow train")
    p.add_argument("--n", type=int, default=64, help="number of samples (64)")
    p.add_argument("--temperature", type=float, default=1.0, help="std of the base (1.0)")
    p.add_argument("--out", help="PNG path (default: next to the checkpoint)")
    p.add_argument("--npy", help="also save the samples as .npy (levels for images)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")


@command("sample", "draw samples from a checkpoint into a PNG and/or .npy", _configure_sample)
def _sample_cmd(args) -> int:
    import numpy as np

    from fastflow.training import load_model, sample, save_samples_png

    if args.n < 1:
        raise ValueError(f"--n must be a positive int, got {args.n}")
    flow, pre, _ = load_model(args.checkpoint, args.device)
    x = sample(flow, pre, args.n, args.temperature, args.seed, args.device)
    out = args.out
    if out is None and args.npy is None:
        folder = os.path.dirname(os.path.abspath(args.checkpoint))
        out = os.path.join(folder, f"samples_t{args.temperature:g}.png")
    if out:
        save_samples_png(x, pre, out, None)
        print(f"wrote {args.n} samples to {out}")
    if args.npy:
        arr = np.rint(x * (pre.levels - 1)).astype(np.int64) if pre.kind == "image" else x
        if pre.kind == "image" and pre.levels <= 256:
            arr = arr.astype(np.uint8)
        np.save(args.npy, arr)
        print(f"wrote {args.n} samples to {args.npy} (shape {arr.shape}, {arr.dtype})")
    return 0


def _configure_train_inverse(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a TarFlow checkpoint written by fastflow train (best.pt)")
    p.add_argument("--steps", type=int, default=2000, help="optimizer steps (2000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--align-weight", type=float, default=1.0, help="hidden alignment weight")
    p.add_argument("--out", help="where to write the inverse (default: inverse.pt beside it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")


@command(
    "train-inverse",
    "train the learned one-pass inverse (BiFlow) of a TarFlow checkpoint",
    _configure_train_inverse,
)
def _train_inverse_cmd(args) -> int:
    from fastflow.models.tarflow import train_inverse_checkpoint

    train_inverse_checkpoint(
        args.checkpoint,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        align_weight=args.align_weight,
        out=args.out,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
    )
    return 0


def _configure_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .pt file written by fastflow train")
    p.add_argument("--data", help="data to score (default: the checkpoint's data, --split)")
    p.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test", "all"],
        help="split of the checkpoint's data (test)",
    )
    p.add_argument("--ood", metavar="OTHER", help="score OTHER data (or 'noise') as OOD: AUROC")
    p.add_argument("--ood-batch", type=int, default=10, help="batch size of the typicality test")
    p.add_argument("--ood-trials", type=int, default=500, help="batches drawn per set (typicality)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="dequantization noise seed")
    p.add_argument("--table", action="store_true", help="print the per-layer invertibility table")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--device", default="cpu")


@command(
    "evaluate",
    "NLL, bits/dim and invertibility of a checkpoint; --ood for out-of-distribution AUROC",
    _configure_evaluate,
)
def _evaluate_cmd(args) -> int:
    import json

    from fastflow.training import evaluate_checkpoint

    r = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        split=args.split,
        ood=args.ood,
        batch_size=args.batch_size,
        seed=args.seed,
        ood_batch=args.ood_batch,
        ood_trials=args.ood_trials,
        device=args.device,
    )
    print(f"data: {r['data']}, {r['n']} examples")
    print(f"NLL: {r['nll']:.4f} nats/example   bits/dim: {r['bpd']:.4f}")
    w = r["worst_layer"]
    if w is not None:
        print(
            f"invertibility: worst layer #{w['index']} {w['name']}: max |x - f^-1(f(x))| = "
            f"{w['max_error']:.2e}, max |logdet_f + logdet_inv| = {w['max_logdet_sum']:.2e}"
        )
    if args.table:
        print(r["invertibility"])
    if args.ood:
        print(
            f"OOD '{r['ood']}' ({r['ood_n']} examples): mean NLL {r['ood_nll']:.3f} vs "
            f"{r['in_nll']:.3f} in-distribution test (train {r['train_nll']:.3f})"
        )
        print(
            f"  AUROC by likelihood: {r['auroc_likelihood']:.3f}   "
            f"AUROC by typicality (batches of {r['ood_batch']}): {r['auroc_typicality']:.3f}"
        )
        if r["auroc_likelihood"] < 0.5:
            print("  (below 0.5: the model gives the other data HIGHER likelihood)")
    if args.json:
        out = {k: v for k, v in r.items() if k != "invertibility"}
        out["invertibility"] = [vars(row) for row in r["invertibility"]]
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


def _configure_bench(p: argparse.ArgumentParser) -> None:
    from fastflow.bench import configure_parser

    configure_parser(p)


@command(
    "bench",
    "speed, memory and likelihood against nflows, zuko, normflows and FrEIA",
    _configure_bench,
)
def _bench_cmd(args) -> int:
    from fastflow.bench import main as bench_main

    return bench_main(args)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastflow`` command; returns the exit status.

    User errors (bad data, bad checkpoint, incompatible options, a non-finite loss) print one
    line ``fastflow <command>: error: ...`` and return 1; set ``FASTFLOW_DEBUG=1`` for the
    traceback.

    Example:
        >>> main(["evaluate", "missing.pt"])  # stderr: fastflow evaluate: error: checkpoint ...
        1
    """
    parser = argparse.ArgumentParser(prog="fastflow", description="Normalizing flows, fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, configure, _fn) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command][2](args)
    except KeyboardInterrupt:
        print(f"fastflow {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        if os.environ.get("FASTFLOW_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fastflow {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
