"""Helpers of the spline and CNF benchmarks that run without any peer library: smoke runs with
the peers made unimportable (each skipped with one line), the parameter matching, and (where
nflows / zuko are installed) that their models have the parameter counts the bench claims.
Nothing here measures or asserts a time."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from fastflow.bench import BenchConfig, _common
from fastflow.models import NeuralSplineFlow


def _no_peers(monkeypatch):
    for name in ("zuko", "nflows"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    monkeypatch.setattr(_common, "_skipped", set())


def test_matched_coupling_finds_the_width_of_a_target_count():
    from fastflow.bench.spline import BINS, LAYERS, _matched_coupling

    for d, h in ((4, 37), (6, 12)):
        target = _common.n_params(NeuralSplineFlow(d, LAYERS, BINS, hidden=h))
        flow = _matched_coupling(d, target)
        assert flow.hidden == h and _common.n_params(flow) == target
    # between two widths: the closer one
    lo = _common.n_params(NeuralSplineFlow(4, LAYERS, BINS, hidden=20))
    hi = _common.n_params(NeuralSplineFlow(4, LAYERS, BINS, hidden=21))
    assert _matched_coupling(4, lo + (hi - lo) // 4).hidden == 20
    assert _matched_coupling(4, hi - (hi - lo) // 4).hidden == 21


def test_spline_bench_smoke_without_peers(monkeypatch):
    from fastflow.bench import spline

    _no_peers(monkeypatch)
    lines = []
    rows = spline.run(BenchConfig(smoke=True, seeds=(0,), log=lines.append))
    assert sum("zuko not installed" in s for s in lines) == 1
    assert sum("nflows not installed" in s for s in lines) == 1
    impls = {r["impl"] for r in rows}
    assert not impls & {"zuko", "nflows"}
    metrics = {(r["metric"], r["impl"]) for r in rows}
    for key in [("coupling_step", "fastflow"), ("coupling_step", "eager-reference"),
                ("ar_sample", "fastflow"), ("ar_sample", "naive-d-pass")]:  # fmt: skip
        assert key in metrics
    lik = {(r["case"], r["impl"]): r for r in rows if r["metric"] == "test_nll"}
    assert lik[("moons nsf-ar", "true density")]["floor"]
    hist = lik[("digits-flat nsf-ar", "per-pixel histogram")]
    assert hist["unit"] == "bits/dim" and hist["floor"]
    for case in ("moons nsf-ar", "digits-flat nsf-ar"):
        r = lik[(case, "fastflow")]
        assert math.isfinite(r["value"]) and r["seeds"] == [0] and len(r["wall_s"]) == 1
        assert r["params"] > 0 and r["steps"] == 3


def test_nflows_nsf_has_fastflows_parameter_count():
    pytest.importorskip("nflows")
    from fastflow.bench.spline import BINS, LAYERS, nflows_nsf

    for kind in ("coupling", "autoregressive"):
        ff = NeuralSplineFlow(6, LAYERS, BINS, kind=kind, hidden=16)
        nf = nflows_nsf(6, 16, kind)
        assert _common.n_params(nf) == _common.n_params(ff)
        x = torch.randn(5, 6)
        assert nf.log_prob(x).shape == (5,)
    with pytest.raises(ValueError, match="kind"):
        nflows_nsf(6, 16, "planar")
