"""Peak memory of one Glow training step with and without invertible recomputation.

    python bench/memory.py                       # Glow 3 levels x 16 steps, 3x32x32, batch 64
    python bench/memory.py --batch 16 --hidden 128 --device cuda

One step = forward (log-likelihood), backward, Adam update, on a batch of uniform noise. The
model is built once; `invertible_recompute` is toggled on the same weights, so both variants do
the same math. Peak memory beyond what is live before the step (parameters, Adam state) is
measured by `bench/_common.peak_memory_mb` (VmHWM on CPU, max_memory_allocated on CUDA).
Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import peak_memory_mb, require_native, table, timeit, write_results  # noqa: E402

from fastflow.models.glow import Glow  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="memory")
    args = ap.parse_args()
    require_native()

    torch.manual_seed(0)
    dev = torch.device(args.device)
    shape = (3, args.size, args.size)
    model = Glow(shape, levels=args.levels, steps=args.steps, hidden=args.hidden).to(dev)
    x = torch.rand(args.batch, *shape, device=dev) - 0.5
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    with torch.no_grad():
        model.train()
        model.log_prob(x[: max(1, args.batch // 4)])  # data-dependent ActNorm initialisation

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        opt.step()

    rows = []
    for recompute in (False, True):
        model.invertible_recompute = recompute
        seconds = timeit(step, warmup=1, reps=2, device=dev)
        mb = peak_memory_mb(step, device=dev)
        rows.append(
            {
                "variant": "recompute" if recompute else "stored activations",
                "peak_mb": mb,
                "step_s": seconds,
            }
        )
        print(f"  {rows[-1]['variant']}: {mb:.0f} MiB, {seconds:.1f} s/step", flush=True)
    ratio = rows[1]["peak_mb"] / rows[0]["peak_mb"]
    for r in rows:
        r["ratio"] = r["peak_mb"] / rows[0]["peak_mb"]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"Glow {args.levels}x{args.steps} hidden={args.hidden}, {params / 1e6:.1f}M params, "
        f"input {args.batch}x{'x'.join(map(str, shape))}, device {dev}"
    )
    print(table(rows, ["variant", "peak_mb", "ratio", "step_s"]))
    print(f"recompute / stored = {ratio:.3f} (target <= 0.35)")
    path = write_results(
        args.name,
        {
            "config": vars(args) | {"params": params, "image_shape": list(shape)},
            "rows": rows,
            "ratio": ratio,
            "target": 0.35,
        },
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
