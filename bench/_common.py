"""Shared helpers of the benchmark scripts: now in :mod:`fastflow.bench._common` (timing, peak
memory, the native-backend check, the machine record), re-exported here for scripts that import
``_common`` from this folder. ``require_native`` exits with the reason, as scripts expect.
"""

from __future__ import annotations

import os

from fastflow.bench import _common as _c
from fastflow.bench._common import (  # noqa: F401
    environment,
    measure,
    peak_memory_mb,
    sync,
    table,
    timeit,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_c.timing_mode()


def require_native() -> None:
    """Exit (``SystemExit`` with the reason) unless fastflow's ops run their native kernels."""
    try:
        _c.require_native()
    except _c.NotNativeError as e:
        raise SystemExit(str(e)) from None


def write_results(name: str, data: dict) -> str:
    """Write ``data`` (plus the environment) to ``bench/results/<name>.json``; returns the path."""
    return _c.write_results(name, data, RESULTS)
