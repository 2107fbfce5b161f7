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


def test_cnf_bench_digits_case_smoke_without_zuko(monkeypatch):
    """The 8x8-digits case of the CNF bench (smoke sizes): every model, bits/dim beside the
    per-pixel histogram, evaluations of the maximum-likelihood CNF's solves."""
    from fastflow.bench import cnf

    _no_peers(monkeypatch)
    lines = []
    cfg = BenchConfig(smoke=True, seeds=(0,), log=lines.append)
    rows = cnf.dataset_rows(cfg, "digits", cnf.peer("zuko", lines.append))
    assert sum("zuko not installed" in s for s in lines) == 1
    nll = {r["impl"]: r for r in rows if r["metric"] == "test_nll"}
    assert set(nll) == {"CNF-MLE", "CNF-FM", "CNF-FM-OT", "RealNVP", "MAF", "NSF",
                        "per-pixel histogram"}  # fmt: skip
    assert all(r["unit"] == "bits/dim" and math.isfinite(r["value"]) for r in nll.values())
    assert nll["per-pixel histogram"]["floor"]
    nfe = {(r["metric"], r["impl"]): r["value"] for r in rows if r["unit"] == "evals"}
    assert nfe[("nfe train step", "CNF-MLE")] == 32  # rk4 x 8, no adjoint
    assert nfe[("nfe test solve", "CNF-MLE")] >= 6  # dopri5: at least one step
    assert ("nfe train step", "CNF-FM") not in nfe


def test_zuko_cnf_adapter_counts_evaluations_and_matches_parameters():
    zuko = pytest.importorskip("zuko")
    from fastflow.bench.cnf import ZukoCNF
    from fastflow.models import CNF

    for d in (2, 20):
        z = ZukoCNF(zuko, d, hidden=8)
        assert _common.n_params(z) == _common.n_params(CNF(d, hidden=8)) - d
        assert z.exact == (d <= 16)
    z = ZukoCNF(zuko, 2, hidden=8)
    with torch.no_grad():
        lp = z.log_prob(torch.randn(7, 2))
    assert lp.shape == (7,) and z.nfe >= 6 and z.calls == z.nfe
    x = torch.randn(7, 2)
    with torch.no_grad():
        exact = [z.log_prob(x) for _ in range(2)]
        z.exact = False  # Hutchinson: a different (random) estimate of the same density
        est = z.log_prob(x)
    torch.testing.assert_close(exact[0], exact[1])
    assert not torch.allclose(est, exact[0]) and z.calls >= 3 * 6
