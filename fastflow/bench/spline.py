"""Neural spline flows: spline-coupling training steps and NSF-AR sampling vs zuko's NSF.

* ``coupling_step``: forward + backward of ``-log_prob`` (a training step without the optimizer)
  of a spline-coupling flow: fastflow's :class:`~fastflow.models.NeuralSplineFlow`
  (``kind="coupling"``) vs zuko's ``NSF(passes=2)`` (its coupling variant) at (nearly) equal
  parameters (fastflow's conditioner width is chosen to match zuko's count), and vs the same
  fastflow flow run with ``set_backend("reference")`` ("eager-reference": the same flow with
  the pure-PyTorch spline instead of the native kernel).
* ``ar_sample``: ``sample(B)`` of a spline autoregressive flow: fastflow's
  ``NeuralSplineFlow(kind="autoregressive")`` (the degree walk: one network pass of work per
  layer, in PyTorch) vs zuko's ``NSF`` (its inverse runs the whole MADE once per dimension), same
  MADE sizes (equal parameters), and vs fastflow's own naive D-pass inverse ("naive-d-pass").
* ``test_nll``: NSF-AR likelihood after a fixed budget (the protocol of
  :mod:`fastflow.bench.likelihood`: same batches, seeds, Adam, clipping), fastflow vs zuko.

Run in the suite: ``fastflow bench --only spline [--quick]``, or ``python -m
fastflow.bench.spline [--quick] [--likelihood]`` for this benchmark alone (prints the rows and
ratios).
"""

from __future__ import annotations

import argparse
import math

import torch

import fastflow
from fastflow.bench._common import measure, n_params, no_grad, params_line, peer, time_rows
from fastflow.models.nsf import NeuralSplineFlow

DESCRIPTION = "spline coupling fwd+bwd and NSF-AR sampling vs zuko NSF (equal parameters)"

LAYERS, BINS = 3, 8


def _matched_coupling(d: int, target: int, hidden_layers: int = 2) -> NeuralSplineFlow:
    """The coupling NSF whose parameter count is closest to ``target`` (by conditioner width)."""
    best = None
    for h in range(4, 1025, 4):
        f = NeuralSplineFlow(d, LAYERS, BINS, hidden=h, hidden_layers=hidden_layers)
        gap = abs(n_params(f) - target)
        if best is None or gap < best[0]:
            best = (gap, h)
        elif n_params(f) > target:
            break
    return NeuralSplineFlow(d, LAYERS, BINS, hidden=best[1], hidden_layers=hidden_layers)


def _step(flow, x):
    def run():
        flow.zero_grad(set_to_none=True)
        (-flow.log_prob(x).mean()).backward()

    return run


def _zuko_step(flow, x):
    def run():
        flow.zero_grad(set_to_none=True)
        (-flow().log_prob(x).mean()).backward()

    return run


def _reference(fn):
    def run():
        before = fastflow.get_backend()
        fastflow.set_backend("reference")
        try:
            return fn()
        finally:
            fastflow.set_backend(before)

    return run


def _naive_sample(flow: NeuralSplineFlow, n: int):
    z = flow.base.sample(n)
    for t in reversed(flow.transforms.flat()):
        z = (t.naive_walk(z) if hasattr(t, "naive_walk") else t.inverse(z))[0]
    return z


def _coupling_case(cfg, d, hidden, batch, zuko) -> list[dict]:
    dev = torch.device(cfg.device)
    torch.manual_seed(0)
    x = torch.randn(batch, d, device=dev)
    impls = {}
    if zuko:
        impls["zuko"] = zuko.flows.NSF(
            d, 0, bins=BINS, transforms=LAYERS, hidden_features=(hidden, hidden), passes=2
        )
        ff = _matched_coupling(d, n_params(impls["zuko"]))
    else:
        ff = NeuralSplineFlow(d, LAYERS, BINS, hidden=hidden)
    impls = {"fastflow": ff, **impls}
    impls = {k: m.to(dev).train() for k, m in impls.items()}
    params = {k: n_params(m) for k, m in impls.items()}
    params["eager-reference"] = params["fastflow"]
    case = f"D={d} K={BINS} L={LAYERS} B={batch}"
    cfg.log(f"  coupling {case}: {params_line(params)}")
    fns = {"fastflow": _step(ff, x), "eager-reference": _reference(_step(ff, x))}
    if "zuko" in impls:
        fns["zuko"] = _zuko_step(impls["zuko"], x)
    reps = cfg.reps(5) if hasattr(cfg, "reps") else 5
    res = measure(fns, cfg.rounds(5), reps, 1 if getattr(cfg, "smoke", False) else 2, dev)
    return time_rows("spline", case, "coupling_step", res, params)


def _ar_case(cfg, d, hidden, batch, zuko) -> list[dict]:
    dev = torch.device(cfg.device)
    torch.manual_seed(0)
    ff = NeuralSplineFlow(d, LAYERS, BINS, kind="autoregressive", hidden=hidden).to(dev).eval()
    params = {"fastflow": n_params(ff), "naive-d-pass": n_params(ff)}
    fns = {"fastflow": lambda: ff.sample(batch), "naive-d-pass": lambda: _naive_sample(ff, batch)}
    if zuko:
        zf = zuko.flows.NSF(d, 0, bins=BINS, transforms=LAYERS, hidden_features=(hidden, hidden))
        zf = zf.to(dev).eval()
        params["zuko"] = n_params(zf)
        fns["zuko"] = lambda: zf().sample((batch,))
    case = f"D={d} h={hidden} K={BINS} L={LAYERS} B={batch}"
    cfg.log(f"  ar-sample {case}: {params_line(params)}")
    slow = {"fastflow": 3, "naive-d-pass": 1, "zuko": 1}
    res = measure({k: no_grad(f) for k, f in fns.items()}, cfg.rounds(3, 2), slow, 1, dev)
    return time_rows("spline", case, "ar_sample", res, params)


def likelihood_cases(quick: bool) -> list:
    """NSF-AR likelihood cases (the budget and protocol of :mod:`fastflow.bench.likelihood`)."""
    from fastflow.bench.likelihood import Case

    cases = [Case("moons nsf-ar", "moons", "nsf", steps=300, batch=256, hidden=64, n_data=10000)]
    if quick:
        return cases
    cases[0].steps = 2000
    return cases + [Case("digits-flat nsf-ar", "digits", "nsf", 2000, 128, 128)]


def _likelihood_case(cfg, case, zuko) -> list[dict]:
    """fastflow's and zuko's NSF (autoregressive, same MADE sizes and bins) trained with the same
    batches, seed and Adam budget; test NLL (nats, or bits/dim for digits)."""
    from fastflow.bench import likelihood as LK
    from fastflow.bench._common import value_row
    from fastflow.training.preprocess import Preprocess, load_splits

    sp = load_splits(case.data, case.n_data, 0.1, 0.1, seed=0)
    ds = sp.ds
    d = math.prod(ds.shape)
    pre = Preprocess.fit(ds, sp.train, (d,))
    image = ds.kind == "image"
    unit, scale = ("bits/dim", 1.0 / (pre.dims * LK.LN2)) if image else ("nats", 1.0)
    test = pre.to_model(sp.test, torch.Generator().manual_seed(12345), torch.float32)
    h = case.hidden

    def ff():
        m = NeuralSplineFlow(d, LAYERS, BINS, kind="autoregressive", hidden=h)
        return m, m.log_prob

    builders = {"fastflow": ff}
    if zuko:

        def zk():
            m = zuko.flows.NSF(d, 0, bins=BINS, transforms=LAYERS, hidden_features=(h, h))
            return m, lambda x: m().log_prob(x)

        builders["zuko"] = zk
    rows = []
    dev = torch.device(cfg.device)
    for name, build in builders.items():
        rs = [LK._fit(build, pre, sp.train, test, case, seed, dev) for seed in cfg.seeds]
        vals = [r["nll"] * scale for r in rs]
        cfg.log(
            f"  {case.name} {name}: test {vals} {unit}, {[round(r['wall_s'], 1) for r in rs]} s"
        )
        rows.append(
            value_row(
                "spline",
                case.name,
                "test_nll",
                name,
                unit,
                sum(vals) / len(vals),
                seeds=list(cfg.seeds),
                seeds_values=vals,
                params=rs[0]["params"],
                wall_s=[round(r["wall_s"], 2) for r in rs],
                steps=case.steps,
                batch=case.batch,
            )  # fmt: skip
        )
    if case.data in LK.TRUE_LOG_DENSITY:
        floor = float(-LK.TRUE_LOG_DENSITY[case.data](sp.test.numpy()).mean())
        rows.append(value_row("spline", case.name, "test_nll", "true density", unit, floor))
    return rows


def run(cfg) -> list[dict]:
    """The suite's spline benchmark (module doc). Quick: D = 16, hidden 64, batch 256 (coupling)
    and 256 (sampling), NSF-AR likelihood on moons (300 steps). Full: D in (16, 64), hidden 128,
    batch 1024; likelihood on moons (2000 steps) and the flattened digits."""
    zuko = peer("zuko", cfg.log)
    smoke = getattr(cfg, "smoke", False)  # end to end at toy sizes (tests)
    hidden = 8 if smoke else cfg.pick(128, 64)
    batch = 16 if smoke else cfg.pick(1024, 256)
    rows: list[dict] = []
    for d in (4,) if smoke else cfg.pick((16, 64), (16,)):
        rows += _coupling_case(cfg, d, hidden, batch, zuko)
        rows += _ar_case(cfg, d, hidden, batch, zuko)
    for case in likelihood_cases(cfg.quick):
        if smoke:
            case.steps, case.batch, case.n_data, case.hidden = 3, 32, 2000, 8
        rows += _likelihood_case(cfg, case, zuko)
    return rows


def _ratios(rows: list[dict]) -> list[str]:
    out = []
    for key in sorted({(r["case"], r["metric"]) for r in rows}):
        sel = {r["impl"]: r["value"] for r in rows if (r["case"], r["metric"]) == key}
        base = sel.get("fastflow")
        cells = [
            f"{k} {v:.2f} ms" + (f" ({v / base:.2f}x)" if base else "") for k, v in sel.items()
        ]
        out.append(f"{key[1]} {key[0]}: " + ", ".join(cells))
    return out


def main(argv: list[str] | None = None) -> None:
    from fastflow.bench import BenchConfig

    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dims", type=int, nargs="*", default=None)
    p.add_argument("--likelihood", action="store_true", help="also the NSF-AR likelihood cases")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = BenchConfig(quick=a.quick)
    zuko = peer("zuko", cfg.log)
    rows: list[dict] = []
    for d in a.dims or cfg.pick((16, 64), (16,)):
        rows += _coupling_case(cfg, d, cfg.pick(128, 64), cfg.pick(1024, 256), zuko)
        rows += _ar_case(cfg, d, cfg.pick(128, 64), cfg.pick(1024, 256), zuko)
    if a.likelihood:
        for case in likelihood_cases(cfg.quick):
            rows += _likelihood_case(cfg, case, zuko)
    print("\n".join(_ratios([r for r in rows if r["unit"] == "ms"])))
    for r in rows:
        if r["unit"] != "ms":
            print(f"{r['metric']} {r['case']}: {r['impl']} {r['value']:.4f} {r['unit']}")


if __name__ == "__main__":
    main()
