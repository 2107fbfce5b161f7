"""The whole benchmark suite: the same as the ``fastflow bench`` command.

    python bench/run.py --quick                 # everything at reduced sizes (minutes)
    python bench/run.py --only train_step maf   # some benchmarks, full sizes
    python bench/run.py --compare A.json B.json # the change between two runs

See ``python bench/run.py --help`` and :mod:`fastflow.bench`.
"""

import sys

from fastflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
