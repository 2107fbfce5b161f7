"""Benchmark the fused affine coupling op against the pure-PyTorch reference.

Compares, in one run: the native kernel (``fastflow.ops.coupling.affine_coupling``), the
reference in eager mode, and ``torch.compile`` of the reference, for forward, inverse and
forward+backward, plus peak memory of forward+backward. Cases: a coupling layer on an image
batch of N=64, C=32, 32x32 (the transformed half and the conditioner's scale and shift are
[64, 16, 32, 32]) and on vectors N=4096, D=64 ([4096, 32] halves). fp32.

    python bench/coupling.py [--reps 10] [--rounds 5] [--scale-fn softclamp] [--no-large]

Writes bench/results/coupling.json. In the suite (``fastflow bench --only coupling``): :func:`run`.
"""

from __future__ import annotations

import argparse
import os

import torch

import fastflow
from fastflow.bench._common import (
    measure,
    peak_memory_mb,
    print_rows,
    require_native,
    table,
    time_rows,
    timeit,
    timing_mode,
    value_row,
    write_results,
)
from fastflow.ops import coupling as C

DESCRIPTION = "fused affine coupling op vs the eager (and compiled) pure-PyTorch reference"

CASES = {"image": (64, 16, 32, 32), "vector": (4096, 32)}
# not a target of the issue: tensors well beyond the last-level cache (32 MiB each), where the
# eager reference's intermediates spill to memory
LARGE = {"image_large": (64, 32, 64, 64)}


def make_variants(scale_fn: str, compiled: bool = True):
    def native(x, raw, t):
        return C.affine_coupling(x, raw, t, scale_fn=scale_fn)

    def native_inv(y, raw, t):
        return C.affine_coupling_inverse(y, raw, t, scale_fn=scale_fn)

    def eager(x, raw, t):
        return C.reference_affine_coupling(x, raw, t, scale_fn=scale_fn)

    def eager_inv(y, raw, t):
        return C.reference_affine_coupling_inverse(y, raw, t, scale_fn=scale_fn)

    out = {"native": (native, native_inv), "reference": (eager, eager_inv)}
    if compiled:
        out["compiled_reference"] = (torch.compile(eager), torch.compile(eager_inv))
    return out


def closures(shape, variants, device="cpu") -> dict:
    """``{variant: {"forward", "inverse", "fwd_bwd": fn()}}`` on random inputs of ``shape``."""
    torch.manual_seed(0)
    x, raw, t = (torch.randn(shape).to(device) for _ in range(3))
    gy, gl = torch.randn(shape).to(device), torch.randn(shape[0]).to(device)
    leaves = [v.clone().requires_grad_() for v in (x, raw, t)]
    fns = {}
    for name, (fwd, inv) in variants.items():

        def forward(fwd=fwd):
            with torch.no_grad():
                return fwd(x, raw, t)

        def inverse(inv=inv):
            with torch.no_grad():
                return inv(x, raw, t)

        def fwd_bwd(fwd=fwd):
            y, ld = fwd(*leaves)
            torch.autograd.backward((y, ld), (gy, gl))
            # drop the gradients here, not at the next call: nothing may stay alive between
            # calls, or peak_memory_mb's baseline would include it
            for v in leaves:
                v.grad = None

        fns[name] = {"forward": forward, "inverse": inverse, "fwd_bwd": fwd_bwd}
    return fns


def run(cfg) -> list[dict]:
    """The suite's coupling-op benchmark: forward, inverse, forward+backward and the peak memory
    of forward+backward of the fused op (``fastflow``) against the eager reference
    (``torch-eager``) and, in full mode, ``torch.compile`` of it (``torch-compile``).

    Quick: image [32, 8, 16, 16] halves, vectors [1024, 16]. Full: :data:`CASES` and
    :data:`LARGE`.
    """
    dev = torch.device(cfg.device)
    v = make_variants("softclamp", compiled=not cfg.quick)
    names = {
        "native": "fastflow",
        "reference": "torch-eager",
        "compiled_reference": "torch-compile",
    }
    cases = (
        {**CASES, **LARGE} if not cfg.quick else {"image": (32, 8, 16, 16), "vector": (1024, 16)}
    )
    rows = []
    for case, shape in cases.items():
        label = f"{case} {'x'.join(map(str, shape))}"
        fns = {names[k]: f for k, f in closures(shape, v, dev).items()}
        case_rows = []
        for metric in ("forward", "inverse", "fwd_bwd"):
            res = measure(
                {k: f[metric] for k, f in fns.items()},
                rounds=cfg.rounds(7),
                reps=cfg.reps(cfg.pick(10, 5)),
                warmup=3,
                device=dev,
            )
            case_rows += time_rows("coupling", label, metric, res)
        for k, f in fns.items():
            mb = peak_memory_mb(f["fwd_bwd"], dev)
            case_rows.append(value_row("coupling", label, "fwd_bwd_peak", k, "MiB", mb))
        print_rows(case_rows, cfg.log)
        rows += case_rows
    return rows


def measure_legacy(case: str, shape, variants, reps: int, rounds: int) -> list[dict]:
    """Times of every variant, interleaved: ``rounds`` rounds in which each variant and metric
    takes its turn for the median of ``reps`` calls; the minimum over rounds is reported (on a
    shared machine it is the least disturbed), so all variants see the same background load."""
    fns = closures(shape, variants)
    best = {name: dict.fromkeys(("forward", "inverse", "fwd_bwd"), float("inf")) for name in fns}
    for r in range(rounds):
        for name, metrics in fns.items():
            for metric, fn in metrics.items():
                sec = timeit(fn, warmup=3 if r == 0 else 1, reps=reps)
                best[name][metric] = min(best[name][metric], sec)
    rows = []
    for name, metrics in fns.items():
        row = {"case": case, "variant": name}
        for metric in ("forward", "inverse", "fwd_bwd"):
            row[metric + "_ms"] = 1e3 * best[name][metric]
        row["fwd_bwd_peak_mb"] = peak_memory_mb(metrics["fwd_bwd"])
        rows.append(row)
        print(
            f"  {case:11s} {name:18s} fwd {row['forward_ms']:7.2f} ms  inv "
            f"{row['inverse_ms']:7.2f} ms  fwd+bwd {row['fwd_bwd_ms']:7.2f} ms  peak "
            f"{row['fwd_bwd_peak_mb']:6.1f} MiB",
            flush=True,
        )
    return rows


def main(argv=None, results_dir: str = os.path.join("bench", "results")) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--reps", type=int, default=10, help="calls per median")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (min is reported)")
    p.add_argument("--scale-fn", default="softclamp", choices=sorted(C.SCALE_FNS))
    p.add_argument("--no-large", action="store_true", help="skip the cache-exceeding image case")
    args = p.parse_args(argv)
    require_native()
    timing_mode()
    if not fastflow.native_available("cpu"):
        raise SystemExit("fastflow._C is not built: the benchmark needs the native kernels")
    variants = make_variants(args.scale_fn)
    cases = dict(CASES) if args.no_large else {**CASES, **LARGE}
    rows = []
    for case, shape in cases.items():
        rows += measure_legacy(case, shape, variants, args.reps, args.rounds)
    ratios = []
    for case in cases:
        by = {r["variant"]: r for r in rows if r["case"] == case}
        nat = by["native"]
        for base in ("reference", "compiled_reference"):
            b = by[base]
            ratios.append(
                {
                    "case": case,
                    "baseline": base,
                    "forward_speedup": b["forward_ms"] / nat["forward_ms"],
                    "inverse_speedup": b["inverse_ms"] / nat["inverse_ms"],
                    "fwd_bwd_speedup": b["fwd_bwd_ms"] / nat["fwd_bwd_ms"],
                    "peak_mem_ratio": nat["fwd_bwd_peak_mb"] / b["fwd_bwd_peak_mb"],
                }
            )
    print()
    print(
        table(
            rows, ["case", "variant", "forward_ms", "inverse_ms", "fwd_bwd_ms", "fwd_bwd_peak_mb"]
        )
    )
    print()
    print("speedup = baseline time / native time; peak_mem_ratio = native / baseline")
    print(
        table(
            ratios,
            [
                "case",
                "baseline",
                "forward_speedup",
                "inverse_speedup",
                "fwd_bwd_speedup",
                "peak_mem_ratio",
            ],
        )
    )
    targeted = [r for r in ratios if r["case"] in CASES]  # the two cases
    targets = {
        "fwd_bwd >= 3x eager reference": all(
            r["fwd_bwd_speedup"] >= 3 for r in targeted if r["baseline"] == "reference"
        ),
        "fwd_bwd >= 1.5x compiled reference": all(
            r["fwd_bwd_speedup"] >= 1.5 for r in targeted if r["baseline"] == "compiled_reference"
        ),
        "peak memory <= 0.5x eager reference": all(
            r["peak_mem_ratio"] <= 0.5 for r in targeted if r["baseline"] == "reference"
        ),
    }
    for k, v in targets.items():
        print(f"target {k}: {'met' if v else 'NOT met'}")
    result = {
        "timing": "min over interleaved rounds of the median of --reps calls",
        "scale_fn": args.scale_fn,
        "cases": {k: list(v) for k, v in cases.items()},
        "rows": rows,
        "ratios": ratios,
        "targets": targets,
    }
    print("wrote", write_results("coupling", result, results_dir))
    return result


if __name__ == "__main__":
    main()
