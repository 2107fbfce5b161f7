"""``fastflow bench``: the floors of the likelihood benchmark against independent computations,
a smoke run end to end (JSON, markdown, PNG) with a peer missing, ``--compare``, and the flags.
Nothing here measures or asserts a time."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from fastflow.bench import BenchConfig, benchmark_names, configure_parser
from fastflow.bench import _densities as D
from fastflow.bench._report import compare, ratios
from fastflow.cli import main
from fastflow.data import toy_data


def _grid(lo, hi, h):
    xs = np.arange(lo[0], hi[0], h) + h / 2
    ys = np.arange(lo[1], hi[1], h) + h / 2
    X, Y = np.meshgrid(xs, ys)
    return np.c_[X.ravel(), Y.ravel()]


@pytest.mark.parametrize(
    "name, lo, hi, h",
    [
        ("moons", (-2.0, -1.3), (2.0, 1.3), 0.025),
        ("8gaussians", (-3.5, -3.5), (3.5, 3.5), 0.05),
        ("checkerboard", (-2.5, -2.5), (2.5, 2.5), 0.05),
    ],
)
def test_toy_density_integrates_to_one(name, lo, hi, h):
    p = np.exp(D.TRUE_LOG_DENSITY[name](_grid(lo, hi, h)))
    assert abs(p.sum() * h * h - 1.0) < 2e-3


@pytest.mark.parametrize("name", ["moons", "8gaussians", "checkerboard"])
def test_toy_density_matches_a_histogram_of_samples(name):
    """The closed form against the generator of fastflow.data: bin probabilities from 200k
    samples vs the density integrated over each bin (midpoint rule on a 5x5 sub-grid)."""
    x = toy_data(name, n=200_000, seed=3).numpy()
    b = 0.25
    lo = np.floor(x.min(0) / b) * b - b
    hi = np.ceil(x.max(0) / b) * b + b
    ex = [np.arange(lo[i], hi[i] + b / 2, b) for i in range(2)]
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=ex)
    emp = counts / len(x)
    s = 5
    pts = _grid(lo, hi, b / s)  # sub-cells, rows of y then x
    p = np.exp(D.TRUE_LOG_DENSITY[name](pts)) * (b / s) ** 2
    ny, nx = len(ex[1]) - 1, len(ex[0]) - 1
    model = p.reshape(ny, s, nx, s).sum((1, 3)).T
    tv = 0.5 * np.abs(model - emp).sum()
    assert model.sum() == pytest.approx(1.0, abs=5e-3)
    assert tv < 0.02, tv  # sampling noise alone is about 0.01 here
    # the test can fail: a wrong width of the noise is far off
    if name == "moons":
        D.MOONS_NOISE, old = 0.1, D.MOONS_NOISE
        try:
            wrong = np.exp(D.TRUE_LOG_DENSITY[name](pts)) * (b / s) ** 2
        finally:
            D.MOONS_NOISE = old
        assert 0.5 * np.abs(wrong.reshape(ny, s, nx, s).sum((1, 3)).T - emp).sum() > 0.05


def test_checkerboard_true_nll_is_log8_on_its_samples():
    x = toy_data("checkerboard", n=1000, seed=1).numpy()
    assert -D.checkerboard_log_density(x).mean() == pytest.approx(math.log(8))


def test_histogram_baseline_by_hand():
    train = np.array([[0, 1, 2], [0, 0, 2]])
    test = np.array([[0, 2, 2], [1, 1, 0]])
    # add-one counts per pixel: [3,1,1], [2,2,1], [1,1,3], each over N + L = 5
    P = np.array([[3, 1, 1], [2, 2, 1], [1, 1, 3]]) / 5
    by_hand = [
        -(math.log2(P[0, 0]) + math.log2(P[1, 2]) + math.log2(P[2, 2])) / 3,
        -(math.log2(P[0, 1]) + math.log2(P[1, 1]) + math.log2(P[2, 0])) / 3,
    ]
    got = D.histogram_bits_per_dim(train, test, levels=3)
    assert got == pytest.approx(np.mean(by_hand), abs=1e-12)
    np.testing.assert_allclose(np.exp(D.histogram_log_probs(train, 3)), P, atol=1e-12)
    with pytest.raises(ValueError, match="levels"):
        D.histogram_log_probs(np.array([[3]]), levels=3)


def test_histogram_is_in_the_flows_dequantized_units():
    """The histogram as a density on the flows' input (x = (k + u)/L - 0.5, piecewise constant
    P(k) * L per dimension), scored the way the benchmark scores a flow (log p + Preprocess's
    offset, to bits/dim), gives the histogram's discrete bits/dim for any dequantization noise."""
    from fastflow.training.preprocess import Preprocess

    rng = np.random.default_rng(0)
    L = 5
    train = rng.integers(0, L, (40, 1, 2, 2))
    test = torch.from_numpy(rng.integers(0, L, (7, 1, 2, 2)))
    lp = D.histogram_log_probs(train, L)
    pre = Preprocess("image", (1, 2, 2), (1, 2, 2), levels=L)
    xm = pre.to_model(test, torch.Generator().manual_seed(1), torch.float64).numpy()
    k = np.floor((xm + 0.5) * L).astype(int).reshape(7, -1)  # recovered levels
    log_density = (lp[np.arange(4)[None], k] + math.log(L)).sum(1)
    bpd = float(np.mean(pre.bpd(torch.from_numpy(log_density) + pre.offset).numpy()))
    assert bpd == pytest.approx(D.histogram_bits_per_dim(train, test.numpy(), L), abs=1e-12)


def test_smoke_run_end_to_end_with_a_missing_peer(tmp_path, monkeypatch, capsys):
    """``fastflow bench --quick --only maf likelihood`` (smoke sizes) with zuko made
    unimportable: one skip line, no zuko rows, valid JSON + markdown + both PNG charts."""
    from fastflow.bench import _common

    monkeypatch.setitem(sys.modules, "zuko", None)  # import zuko -> ImportError
    monkeypatch.setattr(_common, "_skipped", set())
    argv = ["bench", "--quick", "--smoke", "--only", "maf", "likelihood"]
    argv += ["--out", str(tmp_path), "--seeds", "0", "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("bench: zuko not installed") == 1
    files = sorted(os.listdir(tmp_path))
    js = [f for f in files if f.endswith(".json")]
    assert len(js) == 1 and js[0].endswith("-cpu-quick.json")
    base = js[0][: -len(".json")]
    assert {base + ".md", base + "-speed.png", base + "-likelihood.png"} <= set(files)
    for png in (base + "-speed.png", base + "-likelihood.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / js[0]) as f:
        res = json.load(f)
    env = res["environment"]
    for key in ("cpu_model", "cpu_count", "cpu_isa", "torch", "threads", "fastflow", "date"):
        assert key in env
    assert env["fastflow"]["backend"] == "native" and res["config"]["threads"] == 1
    assert "git_revision" in env and res["errors"] == {}
    rows = res["rows"]
    impls = {r["impl"] for r in rows}
    # CI installs no peer (the `test` extra): then the pure-torch degree walk is the baseline
    has_nflows = importlib.util.find_spec("nflows") is not None
    peer = "nflows" if has_nflows else "torch-walk"
    assert "zuko" not in impls and {"fastflow", peer, "true density"} <= impls
    assert "per-pixel histogram" in impls
    timed = [r for r in rows if r["bench"] == "maf"]
    assert timed and all(r["params"] and r["unit"] == "ms" for r in timed)
    lik = [r for r in rows if r["bench"] == "likelihood" and not r.get("floor")]
    assert lik and all(len(r["wall_s"]) == 1 for r in lik)
    md = (tmp_path / (base + ".md")).read_text()
    assert "| maf |" in md and "true density" in md
    assert any(r["peer"] == peer for r in ratios(rows))


def test_quick_run_of_one_small_benchmark(tmp_path):
    """The CI check of the issue: ``fastflow bench --quick --only maf`` end to end (a few
    seconds on one thread), whatever peers are installed."""
    argv = ["bench", "--quick", "--only", "maf", "--threads", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    with open(tmp_path / js) as f:
        res = json.load(f)
    assert res["command"] == "fastflow bench --quick --threads 1 --only maf"
    rows = {(r["metric"], r["impl"]): r for r in res["rows"]}
    for key in [("log_prob", "fastflow"), ("sample", "fastflow"), ("sample", "torch-walk")]:
        r = rows[key]
        assert r["min"] <= r["value"] <= r["max"] and len(r["rounds"]) >= 2
    assert (tmp_path / (js[: -len(".json")] + "-speed.png")).exists()


def _result(values: dict, date: str) -> dict:
    rows = [
        {"bench": "b", "case": "c", "metric": "m", "impl": k, "unit": "ms", "value": v}
        for k, v in values.items()
    ]
    return {"fastflow_bench": 1, "environment": {"date": date}, "config": {}, "rows": rows}


def test_markdown_bolds_only_the_ratios_fastflow_wins():
    from fastflow.bench._report import markdown

    res = _result({"fastflow": 2.0, "zuko": 4.0, "nflows": 1.0}, "D")
    md = markdown(res)
    assert "| zuko | 4 ms | - | **2.00x** |" in md
    assert "| nflows | 1 ms | - | 0.50x (slower) |" in md
    assert "**0.50x**" not in md


def test_compare_two_runs(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result({"fastflow": 2.0, "zuko": 4.0}, "A-date")))
    b.write_text(json.dumps(_result({"fastflow": 1.0, "zuko": 4.0, "nflows": 3.0}, "B-date")))
    text = compare(str(a), str(b))
    assert "| b | c | m | fastflow | 2 ms | 1 ms | 0.500 |" in text
    assert "| b | c | m | zuko | 2.00x | 4.00x |" in text
    assert "2 measurements in both; 0 only in A, 1 only in B." in text
    assert main(["bench", "--compare", str(a), str(b)]) == 0
    assert "A-date" in capsys.readouterr().out
    c = tmp_path / "c.json"
    c.write_text("{}")
    with pytest.raises(ValueError, match="not a result file"):
        compare(str(a), str(c))


def test_flags_parse():
    import argparse

    p = argparse.ArgumentParser()
    configure_parser(p)
    a = p.parse_args(
        ["--quick", "--device", "cuda", "--only", "coupling", "maf", "--threads", "3"]
        + ["--out", "o", "--seeds", "4", "5", "--no-charts"]
    )
    assert (a.quick, a.device, a.only, a.threads, a.out, a.seeds, a.charts) == (
        True,
        "cuda",
        ["coupling", "maf"],
        3,
        "o",
        [4, 5],
        False,
    )
    a = p.parse_args(["--compare", "x.json", "y.json"])
    assert a.compare == ["x.json", "y.json"] and not a.quick and a.device == "cpu"
    assert a.out == os.path.join("bench", "results") and a.seeds == [0, 1]
    assert BenchConfig(smoke=True).quick
    names = benchmark_names()
    assert names[:6] == ["coupling", "glow_step", "maf", "train_step", "memory", "likelihood"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only", "nope"], "unknown benchmark 'nope'"),
        (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
        (["--threads", "0"], "--threads must be a positive int"),
        (["--compare", "missing-a.json", "missing-b.json"], "cannot read missing-a.json"),
    ],
)
def test_bad_flags_give_a_clear_error(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastflow bench: error:") and message in err
    assert os.listdir(tmp_path) == []  # nothing ran, nothing written


def test_bad_flag_types_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "--threads", "two"])
    assert e.value.code == 2 and "--threads: invalid int value" in capsys.readouterr().err


def test_peak_memory_is_the_least_over_repeats():
    # each repeat is a warm-up call and a measured call; the first repeat's calls allocate 8x
    # more, so the least over the two is the second's (~16 MiB), not the first's (~128 MiB)
    from fastflow.bench._common import peak_memory_mb

    sizes = iter([128, 128, 16, 16])

    def fn():
        torch.ones(next(sizes) * 2**18).sum()  # MiB of fp32 ones

    mb = peak_memory_mb(fn, repeats=2)
    if math.isnan(mb):
        pytest.skip("no resident-set measurement on this platform")
    assert 8 < mb < 64


def test_memory_script_times_both_variants_interleaved(tmp_path, capsys):
    # bench/memory.py's own entry point on a tiny Glow: both variants timed (in turns) and
    # measured, results written where asked
    import fastflow
    from fastflow.bench import memory

    if fastflow.info()["backend"] != "native":
        pytest.skip("needs the native backend")
    argv = ["--levels", "2", "--steps", "2", "--hidden", "8", "--batch", "8", "--size", "8"]
    memory.main([*argv, "--rounds", "2"], results_dir=str(tmp_path))
    out = json.loads((tmp_path / "memory.json").read_text())
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {"stored activations", "recompute"}
    assert all(r["step_s"] > 0 for r in rows.values())
    assert out["config"]["rounds"] == 2
    assert "recompute / stored" in capsys.readouterr().out


@pytest.mark.parametrize("compiled", [False, True])
def test_train_step_script_eager_and_compiled(tmp_path, monkeypatch, compiled):
    # bench/train_step.py's entry point, fastflow alone (the peers are optional): a row per timed
    # call, marked compiled under --compile (training step only), JSON and markdown written
    import fastflow
    from fastflow.bench import train_step as T

    if fastflow.info()["backend"] != "native":
        pytest.skip("needs the native backend")
    monkeypatch.setitem(T.VECTOR_MODELS, "realnvp", T.VECTOR_MODELS["realnvp"][:1])
    argv = ["--models", "realnvp", "--dims", "2", "--batches", "16", "--threads", "1"]
    argv += ["--rounds", "1", "--out", "ts"] + (["--compile"] if compiled else [])
    before = torch.get_num_threads()
    try:
        data = T.main(argv, results_dir=str(tmp_path))
    finally:
        torch.set_num_threads(before)
    whats = [r["what"] for r in data["rows"]]
    assert whats == (["train_step"] if compiled else ["train_step", "log_prob", "sample"])
    assert all(r["compiled"] is compiled and r["fastflow_ms"] > 0 for r in data["rows"])
    md = (tmp_path / "ts.md").read_text()
    assert ("(compiled)" in md) is compiled
    assert json.loads((tmp_path / "ts.json").read_text())["rows"] == data["rows"]


def test_write_results_takes_a_path_with_a_directory_as_is(tmp_path, monkeypatch):
    """``--out NAME`` goes under the results folder; ``--out some/dir/NAME`` is a path of its own
    (it used to land in results/some/dir/NAME.json)."""
    from fastflow.bench._common import write_results

    monkeypatch.chdir(tmp_path)
    results = str(tmp_path / "results")
    assert write_results("plain", {"a": 1}, results) == os.path.join(results, "plain.json")
    got = write_results(os.path.join("bench", "results", "run-a"), {"a": 2}, results)
    assert os.path.abspath(got) == str(tmp_path / "bench" / "results" / "run-a.json")
    assert json.loads((tmp_path / "bench" / "results" / "run-a.json").read_text())["a"] == 2
    assert not (tmp_path / "results" / "bench").exists()
