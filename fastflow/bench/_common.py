"""Shared helpers of the benchmark suite: the interleaved timer (CUDA events on CUDA), peak
memory, the native-backend check, the machine record, peer imports and result rows.

Nothing here is asserted in tests against a time: speed is only ever reported as ratios against
baselines measured in the same run.
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import importlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

_libc = None
if platform.system() == "Linux":
    try:
        _libc = ctypes.CDLL("libc.so.6")
    except OSError:
        _libc = None


def malloc_mode(exact_rss: bool) -> None:
    """glibc allocation policy for the two kinds of measurement.

    Timing (``exact_rss=False``, set by :func:`timing_mode` when a benchmark starts): large
    blocks come from the heap and are reused, as in a long-running process whose dynamic mmap
    threshold has grown; otherwise every tensor would be a fresh mapping and pay page faults
    (about 1 ms per 4 MiB here), which would swamp a fused kernel's own time. Peak memory
    (``exact_rss=True``): every block above 64 KiB is its own mapping and returns to the OS when
    freed, so the resident-set high-water mark tracks live tensor memory.
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


def timing_mode() -> None:
    """The allocator policy for timing (see :func:`malloc_mode`); benchmarks call it first."""
    malloc_mode(exact_rss=False)


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


def measure(
    fns: dict[str, Callable[[], object]],
    rounds: int = 5,
    reps: int | dict[str, int] = 5,
    warmup: int | dict[str, int] = 2,
    device: str | torch.device = "cpu",
) -> dict[str, list[float]]:
    """Per-round medians in ms of every function, interleaved.

    After ``warmup`` calls of each (an int, or one per name), ``rounds`` rounds run; in each
    every function takes its turn for ``reps`` calls (an int, or one per name), and the round's
    median is kept. The order alternates between rounds (forward, then reversed) so no function
    always runs first. Taking
    turns exposes every function to the same background load, so the per-round ratios between
    two functions are paired measurements. On CUDA each call is timed with CUDA events after a
    synchronisation; on CPU with ``time.perf_counter``.

    Example:
        >>> r = measure({"a": lambda: sum(range(100)), "b": lambda: None}, rounds=2, reps=2)
        >>> sorted(r), len(r["a"])
        (['a', 'b'], 2)
    """
    cuda = torch.device(device).type == "cuda"
    names = list(fns)
    for k in names:
        for _ in range(warmup[k] if isinstance(warmup, dict) else warmup):
            fns[k]()
    sync(device)
    out: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            fn, ts = fns[k], []
            for _ in range(reps[k] if isinstance(reps, dict) else reps):
                if cuda:
                    start = torch.cuda.Event(enable_timing=True)
                    end = torch.cuda.Event(enable_timing=True)
                    torch.cuda.synchronize()
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    ts.append(start.elapsed_time(end))
                else:
                    t0 = time.perf_counter()
                    fn()
                    ts.append(1e3 * (time.perf_counter() - t0))
            out[k].append(statistics.median(ts))
    return out


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_mb(
    fn: Callable[[], object], device: str | torch.device = "cpu", repeats: int = 1
) -> float:
    """Peak memory ``fn()`` allocates beyond what is live before it, in MiB: the least over
    ``repeats`` calls, each measured on its own (on CPU one call's high-water mark varies with
    allocation order across threads: 229-426 MiB between runs for the same Glow step).

    ``fn`` must not keep anything alive between calls (e.g. ``.grad`` of leaves: free them at the
    end of ``fn``), since the baseline is taken after a warm-up call.

    On CUDA: ``torch.cuda.max_memory_allocated``. On CPU (Linux): the resident-set high-water mark
    (VmHWM), reset through ``/proc/self/clear_refs`` just before the call, minus the resident set
    before it, measured with every large allocation mmapped (see :func:`malloc_mode`) so freed
    memory leaves the resident set. Returns NaN where neither is available.
    """
    if repeats > 1:
        return min(peak_memory_mb(fn, device) for _ in range(repeats))
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
    malloc_mode(exact_rss=True)
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
        malloc_mode(exact_rss=False)


class NotNativeError(RuntimeError):
    """fastflow's ops would run their pure-PyTorch references: nothing may be timed."""


def require_native(device: str | torch.device = "cpu") -> None:
    """Refuse to time anything unless fastflow's ops run their native kernels.

    From the repository root ``import fastflow`` can pick up the source folder (no ``_C``), and then
    every op silently runs its pure-PyTorch reference: a benchmark would measure the reference.
    Raises :class:`NotNativeError` (a ``RuntimeError``) saying why.
    """
    import fastflow

    inf = fastflow.info()
    why = None
    if inf["backend"] != "native":
        why = f"fastflow's backend is {inf['backend']!r}, not 'native'"
    elif torch.device(device).type == "cuda" and not fastflow.native_available(device):
        why = "fastflow was built without CUDA kernels (or no CUDA device is visible)"
    if why:
        raise NotNativeError(
            f"bench: refusing to time: {why} (fastflow imported from {inf['imported_from']}; "
            f"_C: {inf['native_import_error'] or 'present'}; FASTFLOW_BACKEND="
            f"{os.environ.get('FASTFLOW_BACKEND', '')!r}). Install with `pip install -e .` or run "
            "from outside the source tree after `pip install .`."
        )


# -- the machine ----------------------------------------------------------------------------------


def _cpuinfo(key: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _isa() -> list[str]:
    flags = set((_cpuinfo("flags") or "").split())
    wanted = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
    return [f for f in wanted if f in flags] or ([platform.machine()] if not flags else [])


def git_revision(path: str | None = None) -> str | None:
    """The git commit of the source tree fastflow runs from (``+dirty`` when modified), or
    ``None`` outside a git checkout (an installed package)."""
    import fastflow

    root = path or os.path.dirname(os.path.dirname(os.path.abspath(fastflow.__file__)))
    try:
        rev = subprocess.run(
            ["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str | torch.device = "cpu") -> dict:
    """The machine and software a run measured: CPU model, cores, ISA, torch, threads, CUDA
    device, fastflow's build, git revision and the date (UTC)."""
    import fastflow

    dev = torch.device(device)
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_isa": _isa(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(dev),
        "cuda_device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_revision": git_revision(),
        "fastflow": fastflow.info(),
    }
    if dev.type != "cuda" and torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name(0)
    return env


# -- peers ----------------------------------------------------------------------------------------

PEERS = ("nflows", "zuko", "normflows", "FrEIA")
_skipped: set[str] = set()


def peer(name: str, log: Callable[[str], None] | None = None):
    """The peer library ``name`` (``nflows``, ``zuko``, ``normflows``, ``FrEIA``), or ``None``
    when it cannot be imported; the first miss prints one line, never an exception.

    Example:
        >>> peer("not_a_flow_library", log=lambda s: None) is None
        True
    """
    try:
        return importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - a peer that fails to import is skipped
        if name not in _skipped:
            _skipped.add(name)
            why = "not installed" if isinstance(e, ImportError) else f"fails to import ({e})"
            (log or print)(
                f"bench: {name} {why}: its measurements are skipped "
                '(pip install "fastflow[bench]" installs the peers)'
            )
        return None


def n_params(m: torch.nn.Module) -> int:
    """Trainable parameters of ``m``."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def params_line(params: dict[str, int]) -> str:
    """``params fastflow=N peer=M (+0.1%)`` with the relative difference to fastflow, and a
    warning where a peer library differs by more than 1% (baselines such as a plain-torch step
    with a dense weight instead of an LU factorisation are only shown).

    Example:
        >>> params_line({"fastflow": 1000, "zuko": 1020})
        'params fastflow=1000 zuko=1020 (+2.00%, NOT within 1%)'
    """
    ref = params.get("fastflow")
    cells = []
    for k, v in params.items():
        s = f"{k}={v}"
        if ref and k != "fastflow":
            d = (v - ref) / ref
            warn = ", NOT within 1%" if abs(d) > 0.01 and k in PEERS else ""
            s += f" ({100 * d:+.2f}%{warn})"
        cells.append(s)
    return "params " + " ".join(cells)


# -- rows -----------------------------------------------------------------------------------------


def time_rows(
    bench: str,
    case: str,
    metric: str,
    rounds_ms: dict[str, list[float]],
    params: dict[str, int] | None = None,
    **extra,
) -> list[dict]:
    """One result row per implementation of a timed measurement: ``value`` the median of the
    per-round medians, ``min``/``max`` over rounds, ``rounds`` the per-round values (ms)."""
    rows = []
    for impl, rs in rounds_ms.items():
        rows.append(
            {
                "bench": bench,
                "case": case,
                "metric": metric,
                "impl": impl,
                "unit": "ms",
                "value": statistics.median(rs),
                "min": min(rs),
                "max": max(rs),
                "rounds": [round(v, 4) for v in rs],
                "params": (params or {}).get(impl),
                **extra,
            }
        )
    return rows


def value_row(bench: str, case: str, metric: str, impl: str, unit: str, value: float, **extra):
    """A single-valued row (memory in MiB, a likelihood floor...)."""
    return {
        "bench": bench,
        "case": case,
        "metric": metric,
        "impl": impl,
        "unit": unit,
        "value": value,
        **extra,
    }


def print_rows(rows: list[dict], log: Callable[[str], None] = print) -> None:
    """One line per measurement: every implementation's value, then the parameter counts."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["bench"], r["case"], r["metric"]), []).append(r)
    for (b, c, m), rs in groups.items():
        cells = "  ".join(f"{r['impl']}={_fmt(r['value'])}" for r in rs)
        log(f"  {b:12s} {c:24s} {m:12s} [{rs[0]['unit']}] {cells}")


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "nan"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


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


def write_json(path: str, data: dict) -> str:
    """Write ``data`` to ``path`` atomically (through a temporary file); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (torch.Size, tuple, set)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)


def write_results(name: str, data: dict, results_dir: str) -> str:
    """Write ``data`` plus the environment to ``results_dir/<name>.json`` (the per-script result
    files of ``bench/*.py``); returns the path. A ``name`` with a directory part is a path of its
    own (relative to the working directory), so ``--out bench/results/run-a`` writes
    ``bench/results/run-a.json``, not ``bench/results/bench/results/run-a.json``."""
    path = f"{name}.json" if os.path.dirname(name) else os.path.join(results_dir, f"{name}.json")
    return write_json(path, {"environment": environment(), **data})


def no_grad(fn: Callable[[], object]) -> Callable[[], object]:
    def run():
        with torch.no_grad():
            return fn()

    return run


def stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
