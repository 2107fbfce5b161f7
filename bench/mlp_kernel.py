"""Micro-benchmark: the native one-call MLP coupling kernel against the current torch path.

For a few layer sizes, the time of one coupling layer's forward + backward (ReLU MLP conditioner
+ affine coupling) on one thread, interleaved in rounds (the machine may be shared): the native
kernel through ``fastflow.ops._mlp_native`` (forward storing activations, then backward) and the
torch path of ``fastflow.ops.mlp_coupling._FusedMLPCoupling`` (addmm per layer, native coupling
kernel, hand-written backward). Also the native forward alone (no activations) and the inverse.
Reports the minimum over rounds of each round's median, and in brackets the fastest single call
(the machine may be shared: the latter is the least disturbed estimate). fp32 unless ``--fp64``.

    python bench/mlp_kernel.py [--rounds 7] [--reps 30] [--threads 1] [--fp64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402, F401  (its malloc settings: reused heap blocks, as in a long run)

from fastflow.ops import _mlp_native as M  # noqa: E402
from fastflow.ops.mlp_coupling import _FusedMLPCoupling, init_mlp_params, mlp_layout  # noqa: E402

# (name, n, d, hidden, context)
CASES = [
    ("toy 2-D", 256, 2, (64, 64), 0),
    ("D=16", 256, 16, (64, 64), 0),
    ("D=64 ctx=8", 256, 64, (128, 128), 8),
    ("D=64 n=1024", 1024, 64, (256, 256), 0),
    ("big", 4096, 256, (256, 256), 0),
]


def make(n, d, hidden, nc, dtype):
    torch.manual_seed(0)
    cut = d // 2
    lay = mlp_layout((cut + nc, *hidden, 2 * (d - cut)))
    p = init_mlp_params(lay, zero_last=False).to(dtype)
    x = torch.randn(n, d, dtype=dtype)
    c = torch.randn(n, nc, dtype=dtype) if nc else None
    gy, gl = torch.randn(n, d, dtype=dtype), torch.randn(n, dtype=dtype)

    def native():
        y, ld, acts = M.forward(x, c, p, lay, cut, 0, 0, 2.0, True)
        return M.backward(x, c, p, lay, cut, 0, 0, 2.0, acts, gy, gl)

    def native_fwd():
        return M.forward(x, c, p, lay, cut, 0, 0, 2.0, False)

    def native_inv():
        return M.inverse(x, c, p, lay, cut, 0, 0, 2.0)

    xt = x.clone().requires_grad_()
    pt = p.clone().requires_grad_()
    ct = None if c is None else c.clone().requires_grad_()

    def torch_path():
        y, ld = _FusedMLPCoupling.apply(xt, ct, pt, lay, cut, 0, 0, 2.0)
        inputs = [xt, pt] + ([] if ct is None else [ct])
        return torch.autograd.grad((y, ld), inputs, (gy, gl))

    return {"native f+b": native, "torch f+b": torch_path, "native fwd": native_fwd,
            "native inv": native_inv}  # fmt: skip


def _times(fn, reps: int) -> list[float]:
    for _ in range(2):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fp64", action="store_true")
    ap.add_argument("--cases", default="", help="comma-separated case indices (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = torch.float64 if args.fp64 else torch.float32
    cases = CASES
    if args.cases:
        cases = [CASES[int(i)] for i in args.cases.split(",")]
    from fastflow import _backend as B

    print(f"cpu_isa={B._C.cpu_isa()} threads={args.threads} dtype={dtype} "
          f"(min over {args.rounds} rounds of the median of {args.reps})")  # fmt: skip
    keys = ("native f+b", "torch f+b", "native fwd", "native inv")
    print(f"{'case':12s} {'n':>5s} {'sizes':>20s} " + " ".join(f"{k:>19s}" for k in keys)
          + f" {'speedup':>8s}")  # fmt: skip
    for name, n, d, hidden, nc in cases:
        fns = make(n, d, hidden, nc, dtype)
        med = {k: float("inf") for k in fns}
        fast = {k: float("inf") for k in fns}
        reps = max(3, args.reps * 256 // max(n * max(hidden) // 64, 256))
        for _ in range(args.rounds):
            for k, f in fns.items():  # interleaved: every variant in every round
                ts = _times(f, reps)
                med[k] = min(med[k], statistics.median(ts))
                fast[k] = min(fast[k], min(ts))
        sizes = str((d // 2 + nc, *hidden, 2 * (d - d // 2)))
        cells = " ".join(f"{med[k] * 1e6:9.1f} [{fast[k] * 1e6:7.1f}]" for k in keys)
        speedup = med["torch f+b"] / med["native f+b"]
        print(f"{name:12s} {n:5d} {sizes:>20s} {cells} {speedup:7.2f}x")


if __name__ == "__main__":
    main()
