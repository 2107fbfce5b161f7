"""The fused affine coupling op against the pure-PyTorch reference (eager and compiled).

A thin wrapper over ``fastflow.bench.coupling`` (which ``fastflow bench --only coupling`` runs too):
this script keeps its own options (``--help``) and writes ``bench/results/coupling.json``.
"""

import os

from fastflow.bench.coupling import main

if __name__ == "__main__":
    main(results_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
