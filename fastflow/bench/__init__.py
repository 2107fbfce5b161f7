"""``fastflow bench``: speed, memory and likelihood of fastflow against the peer libraries
(nflows, zuko, normflows, FrEIA) in one command, on the machine it runs on.

Every public module of this package is one benchmark: it defines ``DESCRIPTION`` and
``run(cfg: BenchConfig) -> list[dict]`` and nothing else needs to know about it. A new model family
adds its benchmark by adding one file, ``fastflow/bench/<name>.py``::

    DESCRIPTION = "spline flows vs zuko NSF and nflows"

    def run(cfg):
        from fastflow.bench._common import measure, peer, time_rows
        zuko = peer("zuko")  # None (one line printed) when not installed
        fns = {"fastflow": ..., **({"zuko": ...} if zuko else {})}
        return time_rows("spline", "D=16 B=256", "train_step", measure(fns, cfg.rounds(5)))

Rows are dicts with ``bench``, ``case``, ``metric``, ``impl`` (``fastflow``, a peer, or a
baseline), ``unit`` (``ms``, ``MiB``, ``nats``, ``bits/dim``: lower is better for all) and
``value``; timed rows also ``min``/``max``/``rounds`` (per-round medians, interleaved with the
other implementations, so per-round ratios are paired) and ``params``. Likelihood rows have a
``metric`` starting with ``test`` (e.g. ``test_nll``), per-seed ``seeds_values`` and ``wall_s``
lists, and their case's floor a row with ``floor=True``. The suite turns them
into the JSON, the markdown table (ratios peer / fastflow) and the charts
(:mod:`fastflow.bench._report`).

Example:
    >>> from fastflow.bench import benchmark_names
    >>> "coupling" in benchmark_names()
    True
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import pkgutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["BenchConfig", "benchmark_names", "configure_parser", "main", "run_suite"]

# the built-in benchmarks in the order a run takes them; others (new modules) follow by name
ORDER = ("coupling", "glow_step", "maf", "train_step", "memory", "likelihood")


@dataclass
class BenchConfig:
    """Options of one suite run (``fastflow bench`` flags).

    Attributes:
        quick: reduced sizes and repetitions (the whole suite in minutes on 2 CPU cores).
        device: ``cpu`` or ``cuda`` (``cuda:N``).
        threads: torch (and fastflow kernel) threads; ``None`` keeps torch's default.
        only: benchmark names to run (``None``: all).
        out: folder of the JSON, markdown and PNG files.
        seeds: seeds of the likelihood runs.
        charts: write the PNG charts (needs matplotlib).
        smoke: one round of one call per measurement and a few training steps: checks that
            everything runs end to end (tests, CI), measures nothing meaningful.
        log: where progress lines go.

    Example:
        >>> cfg = BenchConfig(quick=True)
        >>> cfg.rounds(5), BenchConfig().rounds(5)
        (3, 5)
    """

    quick: bool = False
    device: str = "cpu"
    threads: int | None = None
    only: list[str] | None = None
    out: str = os.path.join("bench", "results")
    seeds: tuple[int, ...] = (0, 1)
    charts: bool = True
    smoke: bool = False
    log: Callable[[str], None] = field(default=lambda s: print(s, flush=True), repr=False)

    def __post_init__(self):
        if self.smoke:
            self.quick = True

    def rounds(self, full: int, quick: int | None = None) -> int:
        """Interleaved rounds: ``full`` in full mode, ``quick`` (default ``min(full, 3)``) in
        quick mode, 1 in smoke mode."""
        if self.smoke:
            return 1
        return (min(full, 3) if quick is None else quick) if self.quick else full

    def reps(self, n: int) -> int:
        """Calls per round: ``n``, or 1 in smoke mode."""
        return 1 if self.smoke else n

    def pick(self, full, quick):
        """``quick`` in quick mode, else ``full``."""
        return quick if self.quick else full


def benchmark_names() -> list[str]:
    """Names of the benchmarks: the public modules of ``fastflow.bench``, built-ins first."""
    found = [
        m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_") and not m.ispkg
    ]
    return [n for n in ORDER if n in found] + sorted(n for n in found if n not in ORDER)


def load_benchmark(name: str):
    """The module of benchmark ``name`` (has ``run(cfg)`` and ``DESCRIPTION``)."""
    names = benchmark_names()
    if name not in names:
        raise ValueError(f"unknown benchmark {name!r} in --only; choose from {', '.join(names)}")
    mod = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(mod, "run", None)):
        raise TypeError(f"fastflow.bench.{name} has no run(cfg) entry point")
    return mod


def _validate(cfg: BenchConfig) -> list[str]:
    import torch

    dev = str(cfg.device)
    if not (dev == "cpu" or dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ValueError(f"--device must be cpu, cuda or cuda:N, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {dev}: no CUDA device is available to this torch")
    if cfg.threads is not None and (isinstance(cfg.threads, bool) or cfg.threads < 1):
        raise ValueError(f"--threads must be a positive int, got {cfg.threads!r}")
    if not cfg.seeds:
        raise ValueError("seeds must name at least one seed")
    names = list(cfg.only) if cfg.only else benchmark_names()
    for n in names:
        load_benchmark(n)  # unknown names fail before anything runs
    return names


def run_suite(cfg: BenchConfig) -> dict:
    """Run the benchmarks of ``cfg`` and write ``<out>/bench-<date>-<device>[-quick].json``,
    ``.md`` and the PNG charts; returns the result (``rows``, ``environment``, ``files``...).

    The backend is checked to be native before anything is timed. A benchmark that fails is
    recorded (``errors``) and the others still run.
    """
    import torch

    from fastflow.bench import _common as C
    from fastflow.bench import _report as R

    names = _validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    C.require_native(cfg.device)
    C.timing_mode()
    env = C.environment(cfg.device)
    load = (env.get("load_average") or [0.0])[0]
    if load > 0.75 * (env["cpu_count"] or 1) and str(cfg.device) == "cpu":
        cfg.log(
            f"bench: note: load average {load:.1f} on {env['cpu_count']} cores: other processes "
            "share the CPU, so timings are noisy (ratios are paired per round); with several "
            "threads per process small ops can slow down many times over, --threads 1 suffers "
            "least"
        )
    cfg.log(
        f"fastflow bench{' --quick' if cfg.quick else ''}: {', '.join(names)} on {cfg.device} "
        f"({env['cpu_model']}, {env['cpu_count']} cores, {torch.get_num_threads()} threads, "
        f"torch {env['torch']}, git {env['git_revision']})"
    )
    rows: list[dict] = []
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    cpu_seconds: dict[str, float] = {}
    t_all, c_all = time.perf_counter(), time.process_time()
    for name in names:
        mod = load_benchmark(name)
        cfg.log(f"== {name}: {getattr(mod, 'DESCRIPTION', '')}")
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            got = mod.run(cfg)
        except C.NotNativeError:
            raise
        except Exception as e:  # noqa: BLE001 - one broken benchmark must not lose the others
            if os.environ.get("FASTFLOW_DEBUG"):
                raise
            errors[name] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            cfg.log(f"bench: {name} failed: {errors[name]}")
            got = []
        seconds[name] = round(time.perf_counter() - t0, 2)
        cpu_seconds[name] = round(time.process_time() - c0, 2)
        rows += got
        cfg.log(
            f"   {name}: {len(got)} rows in {seconds[name]:.1f} s "
            f"({cpu_seconds[name]:.1f} s of CPU time)"
        )
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d-%H%M")
    dev = str(cfg.device).replace(":", "")
    base = os.path.join(cfg.out, f"bench-{stamp}-{dev}{'-quick' if cfg.quick else ''}")
    result = {
        "fastflow_bench": 1,
        "command": _command_line(cfg),
        "config": {
            "quick": cfg.quick,
            "smoke": cfg.smoke,
            "device": str(cfg.device),
            "threads": torch.get_num_threads(),
            "only": names,
            "seeds": list(cfg.seeds),
        },
        "method": R.METHOD,
        "environment": env,
        "seconds": {**seconds, "total": round(time.perf_counter() - t_all, 2)},
        "cpu_seconds": {**cpu_seconds, "total": round(time.process_time() - c_all, 2)},
        "errors": errors,
        "rows": rows,
    }
    try:
        files = R.write_outputs(result, base, charts=cfg.charts)
        cfg.log("")
        cfg.log(R.markdown(result))
    except Exception as e:  # noqa: BLE001 - the JSON is written first and must not be lost
        if os.environ.get("FASTFLOW_DEBUG"):
            raise
        files = [base + ".json"]
        result["errors"]["report"] = " ".join(f"{type(e).__name__}: {e}".split())[:500]
        cfg.log(f"bench: the report failed ({result['errors']['report']}); rows are in {files[0]}")
    result["files"] = files
    cfg.log("wrote " + ", ".join(files))
    return result


def _command_line(cfg: BenchConfig) -> str:
    parts = ["fastflow bench"] + (["--quick"] if cfg.quick and not cfg.smoke else [])
    parts += ["--smoke"] if cfg.smoke else []
    parts += [] if cfg.device == "cpu" else [f"--device {cfg.device}"]
    parts += [] if cfg.threads is None else [f"--threads {cfg.threads}"]
    parts += [f"--only {' '.join(cfg.only)}"] if cfg.only else []
    parts += [] if tuple(cfg.seeds) == (0, 1) else [f"--seeds {' '.join(map(str, cfg.seeds))}"]
    return " ".join(parts)


# -- the command ----------------------------------------------------------------------------------


def configure_parser(p: argparse.ArgumentParser) -> None:
    """Add the ``fastflow bench`` options to ``p``."""
    p.add_argument("--quick", action="store_true", help="reduced sizes (minutes on 2 CPU cores)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (cpu)")
    p.add_argument(
        "--only", nargs="+", metavar="NAME", help="run these benchmarks only (see --list)"
    )
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default)")
    p.add_argument(
        "--out", default=os.path.join("bench", "results"), help="output folder (bench/results)"
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="likelihood seeds (0 1)")
    p.add_argument("--no-charts", dest="charts", action="store_false", help="no PNG charts")
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A.json", "B.json"),
        help="print the change from run A to run B and exit",
    )
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: runs, fast


def main(args: argparse.Namespace) -> int:
    """Run ``fastflow bench`` with parsed ``args`` (see :func:`configure_parser`)."""
    if args.list:
        for n in benchmark_names():
            print(f"{n:12s} {getattr(load_benchmark(n), 'DESCRIPTION', '')}")
        return 0
    if args.compare:
        from fastflow.bench._report import compare

        print(compare(*args.compare))
        return 0
    cfg = BenchConfig(
        quick=args.quick,
        device=args.device,
        threads=args.threads,
        only=args.only,
        out=args.out,
        seeds=tuple(args.seeds),
        charts=args.charts,
        smoke=args.smoke,
    )
    result = run_suite(cfg)
    return 1 if result["errors"] else 0
