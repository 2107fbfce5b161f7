"""MAF sampling and log_prob: fastflow vs nflows, zuko and a pure-PyTorch degree walk.

A thin wrapper over ``fastflow.bench.maf`` (which ``fastflow bench --only maf`` runs too):
this script keeps its own options (``--help``) and writes ``bench/results/maf.json``.
"""

import os

from fastflow.bench.maf import main

if __name__ == "__main__":
    main(results_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
