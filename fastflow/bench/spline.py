"""Neural spline flows: spline-coupling training steps, NSF-AR sampling and NSF likelihood vs
zuko's NSF and nflows' RQ-NSF.

* ``coupling_step``: forward + backward of ``-log_prob`` (a training step without the optimizer)
  of a spline-coupling flow: fastflow's :class:`~fastflow.models.NeuralSplineFlow`
  (``kind="coupling"``) vs zuko's ``NSF(passes=2)`` (its coupling variant) at (nearly) equal
  parameters (fastflow's conditioner width is chosen to match zuko's count), nflows'
  ``PiecewiseRationalQuadraticCouplingTransform`` (linear tails on ``[-3, 3]``, the same MLP
  conditioner as fastflow's, reverse permutations between layers: the same parameter count),
  and the same fastflow flow run with ``set_backend("reference")`` ("eager-reference": the same
  flow with the pure-PyTorch spline instead of the native kernel).
* ``ar_sample``: ``sample(B)`` of a spline autoregressive flow: fastflow's
  ``NeuralSplineFlow(kind="autoregressive")`` (the degree walk: one network pass of work per
  layer) vs zuko's ``NSF`` and nflows' ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``
  (no residual blocks; both invert by running the whole MADE once per dimension), same MADE
  sizes (equal parameters), and vs fastflow's own naive D-pass inverse ("naive-d-pass").
* ``test_nll``: NSF-AR likelihood after a fixed budget (the protocol of
  :mod:`fastflow.bench.likelihood`: same steps, batch, batches, seeds, Adam lr, clipping) on two
  moons (nats; the true density beside it) and the 8x8 digits flattened to 64-D (bits/dim; the
  per-pixel histogram beside it), fastflow vs zuko vs nflows at equal parameters.

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

DESCRIPTION = (
    "spline coupling fwd+bwd, NSF-AR sampling and likelihood vs zuko NSF and nflows RQ-NSF "
    "(equal parameters)"
)

LAYERS, BINS = 3, 8


def _matched_coupling(d: int, target: int, hidden_layers: int = 2) -> NeuralSplineFlow:
    """The coupling NSF whose parameter count is closest to ``target`` (by conditioner width;
    the width is its ``hidden`` attribute)."""
    best = None
    for h in range(4, 1025):
        f = NeuralSplineFlow(d, LAYERS, BINS, hidden=h, hidden_layers=hidden_layers)
        gap = abs(n_params(f) - target)
        if best is None or gap < best[0]:
            best = (gap, h)
        elif n_params(f) > target:
            break
    flow = NeuralSplineFlow(d, LAYERS, BINS, hidden=best[1], hidden_layers=hidden_layers)
    flow.hidden = best[1]
    return flow


class _NflowsNet(torch.nn.Module):
    """An MLP with nflows' conditioner signature ``net(x, context=None)``; ``hidden_features``
    makes nflows scale the spline's width and height logits by ``1 / sqrt(hidden)`` as it does
    for its own conditioners."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.hidden_features = sizes[1]
        mods: list[torch.nn.Module] = []
        for i in range(len(sizes) - 1):
            mods.append(torch.nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                mods.append(torch.nn.ReLU())
        self.net = torch.nn.Sequential(*mods)

    def forward(self, x, context=None):
        return self.net(x)


def nflows_nsf(d: int, hidden: int, kind: str = "coupling", layers: int = LAYERS,
               bins: int = BINS, bound: float = 3.0):  # fmt: skip
    """nflows' RQ-NSF of fastflow's :class:`NeuralSplineFlow` shape: ``layers`` spline layers
    (``kind="coupling"``: ``PiecewiseRationalQuadraticCouplingTransform`` with an MLP
    ``D/2 -> hidden -> hidden -> (D - D/2)(3K - 1)``; ``"autoregressive"``:
    ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``, MADE hidden ``(hidden, hidden)``
    without residual blocks), linear tails on ``[-bound, bound]``, a ``ReversePermutation``
    between layers, standard normal base. Raises ``ImportError`` without nflows.

    Example (needs nflows):
        >>> flow = nflows_nsf(4, 8)  # doctest: +SKIP
        >>> flow.log_prob(torch.randn(3, 4)).shape  # doctest: +SKIP
        torch.Size([3])
    """
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        ReversePermutation,
    )

    if kind not in ("coupling", "autoregressive"):
        raise ValueError(f"kind must be 'coupling' or 'autoregressive', got {kind!r}")
    spline = dict(num_bins=bins, tails="linear", tail_bound=bound)
    ts = []
    for i in range(layers):
        if i > 0:
            ts.append(ReversePermutation(d))
        if kind == "coupling":
            mask = torch.zeros(d)
            mask[d // 2 :] = 1  # the second half is transformed given the first
            ts.append(
                PiecewiseRationalQuadraticCouplingTransform(
                    mask, lambda i, o: _NflowsNet([i, hidden, hidden, o]), **spline
                )
            )
        else:
            ts.append(
                MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                    d, hidden, num_blocks=1, use_residual_blocks=False, **spline
                )
            )
    return Flow(CompositeTransform(ts), StandardNormal([d]))


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


def _coupling_case(cfg, d, hidden, batch, zuko, nflows=None) -> list[dict]:
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
        ff.hidden = hidden
    if nflows:  # the same conditioner widths as fastflow's (matched to zuko's count)
        impls["nflows"] = nflows_nsf(d, ff.hidden, "coupling")
    impls = {"fastflow": ff, **impls}
    impls = {k: m.to(dev).train() for k, m in impls.items()}
    params = {k: n_params(m) for k, m in impls.items()}
    params["eager-reference"] = params["fastflow"]
    case = f"D={d} K={BINS} L={LAYERS} B={batch}"
    cfg.log(f"  coupling {case}: {params_line(params)}")
    fns = {"fastflow": _step(ff, x), "eager-reference": _reference(_step(ff, x))}
    if "zuko" in impls:
        fns["zuko"] = _zuko_step(impls["zuko"], x)
    if "nflows" in impls:
        fns["nflows"] = _step(impls["nflows"], x)
    reps = cfg.reps(5) if hasattr(cfg, "reps") else 5
    res = measure(fns, cfg.rounds(5), reps, 1 if getattr(cfg, "smoke", False) else 2, dev)
    return time_rows("spline", case, "coupling_step", res, params)


def _ar_case(cfg, d, hidden, batch, zuko, nflows=None) -> list[dict]:
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
    if nflows:
        nf = nflows_nsf(d, hidden, "autoregressive").to(dev).eval()
        params["nflows"] = n_params(nf)
        fns["nflows"] = lambda: nf.sample(batch)
    case = f"D={d} h={hidden} K={BINS} L={LAYERS} B={batch}"
    cfg.log(f"  ar-sample {case}: {params_line(params)}")
    slow = {"fastflow": 3, "naive-d-pass": 1, "zuko": 1, "nflows": 1}
    res = measure({k: no_grad(f) for k, f in fns.items()}, cfg.rounds(3, 2), slow, 1, dev)
    return time_rows("spline", case, "ar_sample", res, params)


def likelihood_cases(quick: bool) -> list:
    """NSF-AR likelihood cases (the budget and protocol of :mod:`fastflow.bench.likelihood`):
    two moons and the 8x8 digits flattened to 64-D (quick: fewer steps, one seed)."""
    from fastflow.bench.likelihood import Case

    if quick:
        return [
            Case("moons nsf-ar", "moons", "nsf", steps=300, batch=256, hidden=64, n_data=10000),
            Case("digits-flat nsf-ar", "digits", "nsf", steps=100, batch=128, hidden=64),
        ]
    return [
        Case("moons nsf-ar", "moons", "nsf", steps=2000, batch=256, hidden=64, n_data=20000),
        Case("digits-flat nsf-ar", "digits", "nsf", steps=2000, batch=128, hidden=128),
    ]


def likelihood_builders(d: int, hidden: int, zuko=None, nflows=None) -> dict:
    """``{library: build() -> (module, log_prob)}``: fastflow's, zuko's and nflows' NSF-AR
    (``LAYERS`` layers, ``BINS`` bins, MADE hidden ``(hidden, hidden)``; equal parameters), the
    peers only where given (their modules, from :func:`~fastflow.bench._common.peer`)."""

    def ff():
        m = NeuralSplineFlow(d, LAYERS, BINS, kind="autoregressive", hidden=hidden)
        return m, m.log_prob

    builders = {"fastflow": ff}
    if zuko:

        def zk():
            m = zuko.flows.NSF(d, 0, bins=BINS, transforms=LAYERS, hidden_features=(hidden,) * 2)
            return m, lambda x: m().log_prob(x)

        builders["zuko"] = zk
    if nflows:

        def nf():
            m = nflows_nsf(d, hidden, "autoregressive")
            return m, m.log_prob

        builders["nflows"] = nf
    return builders


def _likelihood_case(cfg, case, zuko, nflows=None) -> list[dict]:
    """fastflow's, zuko's and nflows' NSF (autoregressive, same MADE sizes and bins) trained
    with the same batches, seeds and Adam budget; test NLL (nats, or bits/dim for digits) beside
    the true density (moons) or the per-pixel histogram (digits)."""
    import statistics

    from fastflow.bench import likelihood as LK
    from fastflow.bench._common import value_row
    from fastflow.bench._densities import histogram_bits_per_dim
    from fastflow.training.preprocess import Preprocess, load_splits

    sp = load_splits(case.data, case.n_data, 0.1, 0.1, seed=0)
    ds = sp.ds
    d = math.prod(ds.shape)
    pre = Preprocess.fit(ds, sp.train, (d,))
    image = ds.kind == "image"
    unit, scale = ("bits/dim", 1.0 / (pre.dims * LK.LN2)) if image else ("nats", 1.0)
    test = pre.to_model(sp.test, torch.Generator().manual_seed(12345), torch.float32)
    builders = likelihood_builders(d, case.hidden, zuko, nflows)
    # quick mode: the first seed only (the suite's time budget)
    seeds = list(cfg.seeds[:1] if cfg.quick else cfg.seeds)
    rows = []
    dev = torch.device(cfg.device)
    runs: dict[str, list[dict]] = {k: [] for k in builders}
    for seed in seeds:  # seed by seed, library by library: machine load hits all
        for name, build in builders.items():
            runs[name].append(LK._fit(build, pre, sp.train, test, case, seed, dev))
    params = {k: rs[0]["params"] for k, rs in runs.items()}
    cfg.log(f"  {case.name}: {params_line(params)}")
    common = dict(steps=case.steps, batch=case.batch, lr=LK.LR, hidden=case.hidden, data=case.data)
    for name, rs in runs.items():
        vals = [r["nll"] * scale for r in rs]
        walls = [round(r["wall_s"], 2) for r in rs]
        cfg.log(f"  {case.name} {name}: test {[round(v, 4) for v in vals]} {unit}, {walls} s")
        finite = [v for v in vals if math.isfinite(v)]
        rows.append(
            value_row(
                "spline",
                case.name,
                "test_nll",
                name,
                unit,
                statistics.mean(vals) if len(finite) == len(vals) else float("nan"),
                spread=(max(finite) - min(finite)) if finite else float("nan"),
                seeds=seeds,
                seeds_values=vals,
                params=params[name],
                wall_s=walls,
                diverged_at=[r["diverged_at"] for r in rs],
                **common,
            )
        )
    if image:
        bpd = histogram_bits_per_dim(sp.train.numpy(), sp.test.numpy(), ds.levels)
        rows.append(
            value_row(
                "spline",
                case.name,
                "test_nll",
                "per-pixel histogram",
                unit,
                bpd,
                floor=True,
                params=pre.dims * (ds.levels - 1),
                **common,
            )  # fmt: skip
        )
    elif case.data in LK.TRUE_LOG_DENSITY:
        floor = float(-LK.TRUE_LOG_DENSITY[case.data](sp.test.numpy()).mean())
        rows.append(
            value_row(
                "spline", case.name, "test_nll", "true density", unit, floor, floor=True, **common
            )  # fmt: skip
        )
    cfg.log(f"  {case.name}: {rows[-1]['impl']} {rows[-1]['value']:.4f} {unit}")
    return rows


def run(cfg) -> list[dict]:
    """The suite's spline benchmark (module doc). Quick: D = 16, hidden 64, batch 256 (coupling)
    and 256 (sampling); NSF-AR likelihood on moons (300 steps) and the flattened digits (100
    steps, hidden 64), one seed. Full: D in (16, 64), hidden 128, batch 1024; likelihood on moons
    and the flattened digits (2000 steps, hidden 64 / 128), every seed. zuko / nflows rows only
    where installed (one line when not)."""
    zuko, nflows = peer("zuko", cfg.log), peer("nflows", cfg.log)
    smoke = getattr(cfg, "smoke", False)  # end to end at toy sizes (tests)
    hidden = 8 if smoke else cfg.pick(128, 64)
    batch = 16 if smoke else cfg.pick(1024, 256)
    rows: list[dict] = []
    for d in (4,) if smoke else cfg.pick((16, 64), (16,)):
        rows += _coupling_case(cfg, d, hidden, batch, zuko, nflows)
        rows += _ar_case(cfg, d, hidden, batch, zuko, nflows)
    for case in likelihood_cases(cfg.quick):
        if smoke:
            case.steps, case.batch, case.hidden = 3, 32, 8
            case.n_data = 2000 if case.data == "moons" else None
        rows += _likelihood_case(cfg, case, zuko, nflows)
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
    zuko, nflows = peer("zuko", cfg.log), peer("nflows", cfg.log)
    rows: list[dict] = []
    for d in a.dims or cfg.pick((16, 64), (16,)):
        rows += _coupling_case(cfg, d, cfg.pick(128, 64), cfg.pick(1024, 256), zuko, nflows)
        rows += _ar_case(cfg, d, cfg.pick(128, 64), cfg.pick(1024, 256), zuko, nflows)
    if a.likelihood:
        for case in likelihood_cases(cfg.quick):
            rows += _likelihood_case(cfg, case, zuko, nflows)
    print("\n".join(_ratios([r for r in rows if r["unit"] == "ms"])))
    for r in rows:
        if r["unit"] != "ms":
            print(f"{r['metric']} {r['case']}: {r['impl']} {r['value']:.4f} {r['unit']}")


if __name__ == "__main__":
    main()
