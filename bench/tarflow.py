"""TarFlow on MNIST (issue 16): the time to draw samples by the naive, exact (KV cache), Jacobi
and learned (BiFlow) inverses, sample quality (a Frechet distance in a small CNN's features,
not the Inception FID), the learned inverse's reconstruction error and test bits/dim beside
Glow at a similar parameter count and training time. The benchmark is
:mod:`fastflow.bench.tarflow` (also ``fastflow bench --only tarflow``); this script runs it
with its own budgets and writes the whole record to ``bench/results/tarflow.json``.

    python bench/tarflow.py                      # the default budget (about 10 minutes, 1 thread)
    python bench/tarflow.py --train-seconds 60   # a shorter run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from fastflow.bench.tarflow import DEFAULTS, options, run_bench

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for k, v in DEFAULTS.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            p.add_argument(flag, action="store_true", help="8x8 digits instead of MNIST")
        else:
            p.add_argument(flag, type=type(v), default=v, help=f"({v})")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--out", default=os.path.join(RESULTS, "tarflow.json"))
    args = vars(p.parse_args(argv))
    torch.set_num_threads(args.pop("threads"))
    out = args.pop("out")
    t0 = time.perf_counter()
    res = run_bench(options(**args))
    res["command"] = "python bench/tarflow.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=2)
    print(json.dumps({"ratios": res["ratios"], "targets_met": res["targets_met"]}, indent=2))
    print(f"wrote {out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
