"""Peak memory of one Glow training step with and without invertible recomputation.

A thin wrapper over ``fastflow.bench.memory`` (which ``fastflow bench --only memory`` runs too):
this script keeps its own options (``--help``) and writes ``bench/results/memory.json``.
"""

import os

from fastflow.bench.memory import main

if __name__ == "__main__":
    main(results_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
