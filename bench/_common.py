"""Shared helpers for the benchmarks: timing, CPU peak memory, result files.

Speed is reported as ratios against baselines measured in the same run; nothing here is asserted
in tests.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

_libc = None
if platform.system() == "Linux":
    try:
        _libc = ctypes.CDLL("libc.so.6")
    except OSError:
        _libc = None


def _malloc_mode(exact_rss: bool) -> None:
    """glibc allocation policy for the two kinds of measurement.

    Timing (``exact_rss=False``, the default from import on): large blocks come from the heap and
    are reused, as in a long-running process whose dynamic mmap threshold has grown; otherwise
    every tensor would be a fresh mapping and pay page faults (about 1 ms per 4 MiB here), which
    would swamp a fused kernel's own time. Peak memory (``exact_rss=True``): every block above
    64 KiB is its own mapping and returns to the OS when freed, so the resident-set high-water
    mark tracks live tensor memory.
    """
    if _libc is None:
        return
    if exact_rss:
        _libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        _libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        _libc.malloc_trim(0)
    else:
        _libc.mallopt(-3, 64 * 2**20)
        _libc.mallopt(-1, 1024 * 2**20)


_malloc_mode(exact_rss=False)


def sync(device: str | torch.device = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(
    fn: Callable[[], object],
    warmup: int = 3,
    reps: int = 20,
    min_time: float = 0.0,
    device: str | torch.device = "cpu",
) -> float:
    """Median wall time of ``fn()`` in seconds over ``reps`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start) < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(fn: Callable[[], object], device: str | torch.device = "cpu") -> float:
    """Peak memory ``fn()`` allocates beyond what is live before it, in MiB.

    ``fn`` must not keep anything alive between calls (e.g. ``.grad`` of leaves: free them at the
    end of ``fn``), since the baseline is taken after a warm-up call.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU (Linux): the resident-set high-water mark
    (VmHWM), reset through ``/proc/self/clear_refs`` just before the call, minus the resident set
    before it, measured with every large allocation mmapped (see :func:`_malloc_mode`) so freed
    memory leaves the resident set. Returns NaN where neither is available.
    """
    if torch.device(device).type == "cuda":
        fn()  # warm-up: lazy initialisation must not count
        gc.collect()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if _libc is None or not os.path.exists("/proc/self/clear_refs"):
        return float("nan")
    _malloc_mode(exact_rss=True)
    try:
        fn()  # warm-up under the exact-RSS policy
        gc.collect()
        _libc.malloc_trim(0)
        base = _status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        fn()
        return (_status_kb("VmHWM") - base) / 1024
    finally:
        _malloc_mode(exact_rss=False)


def require_native() -> None:
    """Refuse to time anything unless fastflow's ops run their native kernels.

    From the repository root ``import fastflow`` can pick up the source folder (no ``_C``), and then
    every op silently runs its pure-PyTorch reference: a benchmark would measure the reference.
    Every script here calls this before timing.
    """
    import fastflow

    inf = fastflow.info()
    if inf["backend"] != "native":
        raise SystemExit(
            f"bench: refusing to time: fastflow's backend is {inf['backend']!r}, not 'native' "
            f"(fastflow imported from {inf['imported_from']}; _C: "
            f"{inf['native_import_error'] or 'present'}; FASTFLOW_BACKEND="
            f"{os.environ.get('FASTFLOW_BACKEND', '')!r}). Install with `pip install -e .` or run "
            "from outside the source tree after `pip install .`."
        )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict:
    return {
        "cpu_model": _cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_results(name: str, data: dict) -> str:
    """Write ``data`` (plus the environment) to ``bench/results/<name>.json``; returns the path."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment(), **data}, f, indent=2)
    os.replace(tmp, path)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of ``rows`` (dicts) with the given columns."""

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
