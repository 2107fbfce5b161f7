"""One Glow step (ActNorm, 1x1 conv, affine coupling): fastflow vs torch steps and normflows.

A thin wrapper over ``fastflow.bench.glow_step`` (also run by
``fastflow bench --only glow_step``): this script keeps its own options (``--help``)
and writes ``bench/results/glow_step.json``.
"""

import os

from fastflow.bench.glow_step import main

if __name__ == "__main__":
    main(results_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
