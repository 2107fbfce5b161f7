"""Whole training steps (forward, backward, Adam) of fastflow vs the peer libraries.

A thin wrapper over ``fastflow.bench.train_step`` (also run by
``fastflow bench --only train_step``): this script keeps its own options (``--help``)
and writes ``bench/results/train_step.json``.
"""

import os

from fastflow.bench.train_step import main

if __name__ == "__main__":
    main(results_dir=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
