"""Fuzz every op in fastflow.ops on the native backend, each case isolated from pytest.

The cases (tests/_fuzz_cases.py: random and adversarial shapes, layouts, dtypes, values, wrong
types and hand-built structures, with a fixed seed) run in a few worker processes, one per op
family, started in parallel. A worker reports each case on stdout as it starts and ends, so a
case that crashes (segfault, abort) or hangs its worker fails here by name, and the worker is
restarted after it to run the rest. A case passes when the op raises ValueError/TypeError, or
returns a result (and gradients, where asked) that agrees with the op's reference.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import fastflow

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_fuzz_cases.py")

if HERE not in sys.path:  # pytest's default (prepend) import mode puts it there already
    sys.path.insert(0, HERE)
F = importlib.import_module("_fuzz_cases")

STARTUP_TIMEOUT = 120.0  # importing torch on a loaded machine
CASE_TIMEOUT = 60.0  # one case: a worker silent this long is hung
MAX_STARTS = 12  # worker starts per family (the first plus restarts after crashes)

NAMES = {fam: [c.name for c in F.build_cases(fam)] for fam in F.FAMILIES}
ALL = [(fam, name) for fam in F.FAMILIES for name in NAMES[fam]]

pytestmark = pytest.mark.skipif(
    not fastflow.native_available("cpu"), reason="fastflow._C was not built: nothing to fuzz"
)


def _reader(stream, q: queue.Queue) -> None:
    for line in stream:
        q.put(line)
    q.put(None)


def _tail(path: str, n: int = 1500) -> str:
    with open(path, errors="replace") as f:
        text = f.read()
    return text[-n:].strip()


def _run_worker(family: str, start: int, results: dict) -> tuple[int, str]:
    """Run ``family`` from case ``start``; returns (index to resume from, or -1 when done, why)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTFLOW_BACKEND"}
    env["PYTHONFAULTHANDLER"] = "1"
    with tempfile.NamedTemporaryFile("w+", suffix=".stderr", delete=False) as err:
        err_path = err.name
    try:
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen(
                [sys.executable, WORKER, family, str(start)],
                stdout=subprocess.PIPE,
                stderr=err_file,
                text=True,
                env=env,
                cwd=os.path.dirname(HERE),
            )
            q: queue.Queue = queue.Queue()
            threading.Thread(target=_reader, args=(proc.stdout, q), daemon=True).start()
            current, ready, hung = None, False, False
            while True:
                try:
                    line = q.get(timeout=CASE_TIMEOUT if ready else STARTUP_TIMEOUT)
                except queue.Empty:
                    hung = True
                    proc.kill()
                    break
                if line is None:
                    break
                at = line.find("FUZZ {")  # other output may precede it on the line
                if at < 0:
                    continue
                ev = json.loads(line[at + 5 :])
                if "ready" in ev:
                    ready = True
                elif "start" in ev:
                    current = ev["start"]
                elif "done" in ev:
                    results[ev["name"]] = ev
                    current = None
                elif "end" in ev:
                    proc.wait()
                    return -1, "done"
            rc = proc.wait()
        stderr = _tail(err_path)
    finally:
        os.unlink(err_path)
    if not ready:
        return -2, f"worker failed to start (rc {rc}, hung {hung}):\n{stderr}"
    if current is None:  # died between cases
        return -2, f"worker exited (rc {rc}) outside any case:\n{stderr}"
    name = NAMES[family][current]
    how = f"hung for {CASE_TIMEOUT:.0f} s (killed)" if hung else f"crashed the worker (rc {rc})"
    results[name] = {"ok": False, "msg": f"{how}\n{stderr}", "outcome": "crash"}
    return current + 1, how


def _run_family(family: str) -> dict:
    results: dict = {}
    start, why = 0, ""
    for _ in range(MAX_STARTS):
        start, why = _run_worker(family, start, results)
        if start < 0 or start >= len(NAMES[family]):
            break
    for name in NAMES[family]:
        results.setdefault(name, {"ok": False, "msg": f"not run ({why})", "outcome": "not-run"})
    return results


@pytest.fixture(scope="module")
def fuzz_results(request) -> dict:
    """Every selected family's results, its worker processes run in parallel."""
    selected = {
        item.callspec.params["family"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_fuzz" and hasattr(item, "callspec")
    }
    families = [f for f in F.FAMILIES if f in selected] or list(F.FAMILIES)
    t0 = time.monotonic()
    with ThreadPoolExecutor(len(families)) as pool:
        per_family = dict(zip(families, pool.map(_run_family, families)))
    n = sum(len(NAMES[f]) for f in families)
    print(f"\nfuzz: {n} cases of {', '.join(families)} in {time.monotonic() - t0:.1f} s")
    return per_family


@pytest.mark.parametrize("family, name", ALL, ids=[name for _, name in ALL])
def test_fuzz(family, name, fuzz_results):
    res = fuzz_results[family][name]
    if not res["ok"]:
        pytest.fail(f"{name}: {res['msg']}", pytrace=False)
