"""Where the whole-layer CPU kernels stop paying: kernel vs torch-matmul path, per layer size.

``MLPAffineCoupling`` and ``MaskedAffineAutoregressive`` run their layer either as one native
call each way (the whole-layer kernel, csrc/mlp_cpu.cpp) or as one autograd node whose matrix
products are torch matmuls (MKL); ``KERNEL_MAX_MACS`` in fastflow/ops/mlp_coupling.py and
fastflow/ops/made_density.py picks by the call's multiply-adds (batch x MLP weights). This script
times one layer's forward + backward (loss = sum of outputs and log-det, gradients of input and
parameters) both ways, interleaved in rounds, and prints the ratio per size, so the bound can be
set from a measurement on the CPU at hand (the kernels' variant: ``fastflow._C.cpu_isa()``; cap it
with ``FASTFLOW_CPU_ISA=avx2``, and torch's with ``MKL_ENABLE_INSTRUCTIONS=AVX2``).

    python bench/crossover.py [--rounds 5] [--threads 1] [--layers coupling,made]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (timing, and its malloc settings)

import fastflow  # noqa: E402
from fastflow.nn import MaskedAffineAutoregressive, MLPAffineCoupling  # noqa: E402
from fastflow.ops import made_density, mlp_coupling  # noqa: E402

# (D, N, hidden width); two hidden layers, as the bench's RealNVP / MAF
SIZES = [
    (2, 256, 64),
    (16, 256, 64),
    (64, 256, 64),
    (2, 1024, 64),
    (16, 1024, 64),
    (256, 256, 64),
    (64, 1024, 64),
    (2, 4096, 64),
    (16, 256, 256),
    (64, 256, 256),
    (16, 4096, 64),
    (64, 4096, 64),
    (256, 4096, 64),
    (64, 1024, 256),
    (256, 1024, 256),
    (64, 4096, 256),
    (256, 4096, 256),
]

LAYERS = {
    "coupling": (MLPAffineCoupling, mlp_coupling),
    "made": (MaskedAffineAutoregressive, made_density),
}


def build(kind: str, d: int, h: int):
    torch.manual_seed(0)
    if kind == "coupling":
        layer = MLPAffineCoupling(d, hidden=h)
        torch.nn.init.normal_(layer.params, std=0.05)  # the last layer starts at zero otherwise
    else:
        layer = MaskedAffineAutoregressive(d, hidden=(h, h))
    return layer


def step_fn(layer, x):
    params = [p for p in layer.parameters()]

    def step():
        y, ld = layer(x)
        return torch.autograd.grad(y.sum() + ld.sum(), [x, *params])

    return step


def macs(layer, n: int) -> int:
    return n * sum(p.numel() for p in layer.parameters())  # weights dominate; biases included


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--layers", default="coupling,made")
    ap.add_argument("--max-macs", type=float, default=3e8, help="skip sizes above this")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    info = fastflow.info()
    if info["backend"] != "native":
        sys.exit(f"the native backend is not active ({info['backend']}): install fastflow first")
    print(f"cpu_isa={info['cpu_isa']} threads={args.threads} fp32; min over {args.rounds} rounds "
          "of the median; ratio = matmul path / kernel (> 1: the kernel is faster)")  # fmt: skip
    print(f"{'layer':9s} {'D':>4s} {'N':>5s} {'h':>4s} {'MACs':>9s} {'kernel ms':>10s} "
          f"{'matmul ms':>10s} {'ratio':>6s}")  # fmt: skip
    for kind in args.layers.split(","):
        cls, mod = LAYERS[kind]
        saved = dict(mod.KERNEL_MAX_MACS)
        isa = fastflow._C.cpu_isa()
        try:
            for d, n, h in SIZES:
                layer = build(kind, d, h)
                m = macs(layer, n)
                if m > args.max_macs:
                    continue
                x = torch.randn(n, d, requires_grad=True)
                fn = step_fn(layer, x)
                reps = max(3, int(2e7 // max(m, 1)))
                best = {"kernel": float("inf"), "matmul": float("inf")}
                for _ in range(args.rounds):
                    for path, bound in (("kernel", float("inf")), ("matmul", -1)):
                        mod.KERNEL_MAX_MACS[isa] = bound
                        best[path] = min(best[path], _common.timeit(fn, warmup=1, reps=reps))
                ratio = best["matmul"] / best["kernel"]
                kms, mms = best["kernel"] * 1e3, best["matmul"] * 1e3
                print(f"{kind:9s} {d:4d} {n:5d} {h:4d} {m / 1e6:8.1f}M {kms:10.3f} {mms:10.3f} "
                      f"{ratio:6.2f}", flush=True)  # fmt: skip
        finally:
            mod.KERNEL_MAX_MACS.update(saved)


if __name__ == "__main__":
    main()
