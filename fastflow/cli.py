"""The ``fastflow`` command (``python -m fastflow``).

Subcommands register themselves in :data:`COMMANDS`; ``info`` prints :func:`fastflow.info`,
``demo`` runs a coupling round trip on the native kernel and the reference.
"""

from __future__ import annotations

import argparse
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastflow", description="Normalizing flows, fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, configure, _fn) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return COMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
