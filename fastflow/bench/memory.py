"""Peak memory of one Glow training step with and without invertible recomputation.

    python bench/memory.py                       # Glow 3 levels x 16 steps, 3x32x32, batch 64
    python bench/memory.py --batch 16 --hidden 128 --device cuda

One step = forward (log-likelihood), backward, Adam update, on a batch of uniform noise. The
model is built once; `invertible_recompute` is toggled on the same weights, so both variants do
the same math. Peak memory beyond what is live before the step (parameters, Adam state) is
measured by `bench/_common.peak_memory_mb` (VmHWM on CPU, max_memory_allocated on CUDA).
Writes bench/results/memory.json. In the suite (``fastflow bench --only memory``, with normflows'
Glow beside it): :func:`run`.
"""

from __future__ import annotations

import argparse
import os

import torch

from fastflow.bench._common import (
    measure,
    n_params,
    params_line,
    peak_memory_mb,
    peer,
    print_rows,
    require_native,
    table,
    time_rows,
    timing_mode,
    value_row,
    write_results,
)
from fastflow.models.glow import Glow

DESCRIPTION = "peak memory of a Glow training step, with and without invertible recompute"


def _stepper(module, log_prob, x):
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(x).mean()
        loss.backward()
        opt.step()

    return step


def run(cfg) -> list[dict]:
    """The suite's memory benchmark: peak memory and time of one Glow training step (forward,
    backward, Adam) with stored activations and with invertible recomputation, against
    normflows' Glow of the same architecture (which stores activations).

    Quick: 3x16x16, L2 K4 h64, batch 64. Full: 3x32x32, L3 K16 h512, batch 64.
    """
    from fastflow.bench.train_step import glow_normflows

    dev = torch.device(cfg.device)
    shape, levels, steps, hidden, batch = cfg.pick(
        ((3, 32, 32), 3, 16, 512, 64), ((3, 16, 16), 2, 4, 64, 64)
    )
    torch.manual_seed(0)
    ff = Glow(shape, levels=levels, steps=steps, hidden=hidden).to(dev)
    impls = {"fastflow": (ff, ff.log_prob)}
    if peer("normflows", cfg.log) is not None:
        torch.manual_seed(0)
        m, lp, _ = glow_normflows(shape, levels, steps, hidden)
        impls["normflows"] = (m.to(dev), lp)
    torch.manual_seed(1)
    x = torch.rand(batch, *shape, device=dev) - 0.5
    with torch.no_grad():  # data-dependent ActNorm initialisation
        for _m, lp in impls.values():
            lp(x)
    params = {k: n_params(m) for k, (m, _) in impls.items()}
    case = f"glow {'x'.join(map(str, shape))} L{levels} K{steps} h{hidden} B={batch}"
    cfg.log(f"  {case}: {params_line(params)}")
    steps_fn = {k: _stepper(m, lp, x) for k, (m, lp) in impls.items()}
    rows = []
    peer_mb = {k: peak_memory_mb(f, dev) for k, f in steps_fn.items() if k != "fastflow"}
    for recompute in (False, True):
        ff.invertible_recompute = recompute
        metric = "peak_recompute" if recompute else "peak_stored"
        mb = peak_memory_mb(steps_fn["fastflow"], dev)
        rows.append(
            value_row("memory", case, metric, "fastflow", "MiB", mb, params=params["fastflow"])
        )
        for k, v in peer_mb.items():
            rows.append(value_row("memory", case, metric, k, "MiB", v, params=params[k]))
        res = measure(steps_fn, rounds=cfg.rounds(3, 2), reps=1, warmup=1, device=dev)
        rows += time_rows(
            "memory", case, "step_recompute" if recompute else "step_stored", res, params
        )
    ff.invertible_recompute = False
    print_rows(rows, cfg.log)
    return rows


def main(argv=None, results_dir: str = os.path.join("bench", "results")) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--name", default="memory")
    ap.add_argument(
        "--rounds", type=int, default=3,
        help="interleaved timing rounds; peak memory: the least over as many measured steps",
    )  # fmt: skip
    args = ap.parse_args(argv)
    require_native()
    timing_mode()

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

    def variant(recompute: bool):
        def run_step() -> None:
            model.invertible_recompute = recompute
            step()

        return run_step

    # the two variants take turns (interleaved rounds, min over rounds): timed one after the
    # other, machine drift alone moved their ratio by 0.2
    fns = {"stored": variant(False), "recompute": variant(True)}
    times = measure(fns, rounds=args.rounds, reps=1, warmup=1, device=dev)
    rows = []
    for recompute in (False, True):
        name = "recompute" if recompute else "stored"
        mb = peak_memory_mb(fns[name], device=dev, repeats=args.rounds)
        seconds = min(times[name]) / 1e3
        rows.append(
            {
                "variant": "recompute" if recompute else "stored activations",
                "peak_mb": mb,
                "step_s": seconds,
            }
        )
        print(f"  {rows[-1]['variant']}: {mb:.0f} MiB, {seconds:.2f} s/step", flush=True)
    model.invertible_recompute = False
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
        results_dir,
    )
    print("wrote", path)


if __name__ == "__main__":
    main()
