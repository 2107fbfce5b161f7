"""Continuous flows: what the divergence costs, and the two ways to train a CNF against discrete
flows at one budget.

* ``trace``: one training step (``log_prob`` + backward) of a CNF (vector field MLP, hidden
  64, fixed-step rk4 with 8 steps, so both estimators make the same 32 evaluations) with the
  exact divergence (one batched pass) and with Hutchinson's estimator, at ``D`` = 2, 8, 16;
  beside it the function evaluations of an adaptive ``dopri5`` solve (rtol = atol = 1e-5) with
  each estimator and the Monte-Carlo standard deviation of Hutchinson's log-density.
* ``toys`` (and the digits): on two moons and 8 gaussians (test NLL in nats of the data as
  generated; the true density as the floor) and the 8x8 digits flattened to 64-D (full mode;
  test bits/dim of the uniformly dequantized 17 levels, the per-pixel histogram beside it):
  CNF by maximum likelihood (trained with rk4 x 8; Hutchinson's divergence above 16 features),
  CNF by flow matching (independent and minibatch-OT couplings), RealNVP (8 couplings), MAF
  (5 layers), NSF (5 layers) and, where zuko is installed, zuko's ``CNF`` (:class:`ZukoCNF`:
  the same field widths, parameters equal up to ``D``, trained by maximum likelihood with its
  adaptive solver and adjoint), all hidden 64 (digits 128), the same steps, batch, Adam learning
  rate and batch order (and dequantization noise). CNFs are scored with the exact divergence
  and an adaptive solver (rtol = atol = 1e-5; fastflow dopri5). Each run's wall time (training
  only); for the maximum-likelihood CNFs the field evaluations per training step and per test
  solve. Flow matching, whose steps are cheap, is also trained for 10x the steps (scored at
  tenths; quick mode: the independent coupling only): the curve and the training time at which
  its test NLL first reached RealNVP's final one.

Run: ``fastflow bench --only cnf [--quick]`` or ``python -m fastflow.bench.cnf [--quick]
[--data moons digits] [--no-trace] [--json rows.json]``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from fastflow.bench._common import measure, n_params, params_line, peer, time_rows, value_row
from fastflow.bench._densities import TRUE_LOG_DENSITY

DESCRIPTION = (
    "CNF: exact vs Hutchinson divergence (time, NFE); MLE vs flow matching vs RealNVP/MAF/NSF "
    "and zuko's CNF (toys, 8x8 digits)"
)

LR = 1e-3
FM_STEPS_FACTOR = 10


def _perturbed_cnf(d: int, **kw):
    from fastflow.models import CNF

    torch.manual_seed(0)
    flow = CNF(d, hidden=64, **kw)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return flow


def trace_rows(cfg) -> list[dict]:
    """Exact vs Hutchinson: step time, adaptive NFE, estimator spread."""
    rows = []
    batch = 16 if cfg.smoke else 256
    for d in (2,) if cfg.smoke else cfg.pick((2, 8, 16), (2, 16)):
        flow = _perturbed_cnf(d, solver="rk4", steps=8)
        x = torch.randn(batch, d, generator=torch.Generator().manual_seed(1))
        fns = {}
        for trace in ("exact", "hutchinson"):

            def step(trace=trace, flow=flow, x=x):
                flow.ode.trace = trace
                flow.zero_grad(set_to_none=True)
                (-flow.log_prob(x).mean()).backward()

            fns[trace] = step
        case = f"D={d} B={batch}"
        rows += time_rows(
            "cnf",
            case,
            "train_step rk4x8",
            measure(fns, cfg.rounds(5), cfg.reps(3), warmup=1),
            params={k: n_params(flow) for k in fns},
        )
        adaptive = _perturbed_cnf(d, solver="dopri5", rtol=1e-5, atol=1e-5)
        with torch.no_grad():
            lps = {}
            for trace in ("exact", "hutchinson"):
                adaptive.ode.trace = trace
                lps[trace] = adaptive.log_prob(x)
                rows.append(value_row("cnf", case, "nfe dopri5", trace, "evals", adaptive.nfe))
            reps = 2 if cfg.smoke else cfg.pick(16, 4)
            adaptive.ode.trace = "hutchinson"
            draws = torch.stack([adaptive.log_prob(x) for _ in range(reps)])
        rows.append(
            value_row(
                "cnf",
                case,
                "log_prob std over noise",
                "hutchinson",
                "nats",
                float(draws.std(0).mean()),
                exact_minus_mean=float((lps["exact"] - draws.mean(0)).abs().mean()),
            )
        )
        cfg.log(
            f"  trace {case}: exact {rows[-5]['value']:.1f} ms, hutchinson "
            f"{rows[-4]['value']:.1f} ms per step; dopri5 NFE {rows[-3]['value']} / "
            f"{rows[-2]['value']}; Hutchinson log_prob std {rows[-1]['value']:.3f} nats"
        )
    return rows


class ZukoCNF(torch.nn.Module):
    """zuko's ``CNF`` with fastflow's :class:`~fastflow.models.CNF` shape behind a
    ``log_prob(x)`` method, counting the vector field's evaluations.

    The field is zuko's MLP ``(D + 2 freqs) -> hidden -> hidden -> D`` with ``freqs=1`` and
    softplus (fastflow's field feeds ``t`` to every layer instead, ``(D + 1) -> (hidden + 1) ->
    (hidden + 1) -> D``; the counts then differ by ``D`` parameters); zuko's adaptive solver at
    ``rtol = atol = tol``; the exact divergence for ``D <= 16``, Hutchinson's above (as
    fastflow's ``trace="auto"``), the exact one whenever :attr:`exact` is set (scoring).
    ``calls`` counts evaluations of the field (forward solves and zuko's adjoint backward
    solves); ``nfe`` those of the last ``log_prob``.

    Example (needs zuko):
        >>> flow = ZukoCNF(zuko, 2, hidden=8)  # doctest: +SKIP
        >>> flow.log_prob(torch.randn(5, 2)).shape, flow.nfe > 0  # doctest: +SKIP
        (torch.Size([5]), True)
    """

    def __init__(self, zuko, features: int, hidden: int = 64, tol: float = 1e-5):
        super().__init__()
        self.flow = zuko.flows.CNF(
            features, freqs=1, hidden_features=(hidden, hidden), activation=torch.nn.Softplus,
            atol=tol, rtol=tol, exact=features <= 16,
        )  # fmt: skip
        self.features, self.calls, self.nfe = features, 0, 0
        self.flow.transform.ode.register_forward_hook(self._count)

    def _count(self, module, args, out) -> None:
        self.calls += 1

    @property
    def exact(self) -> bool:
        return self.flow.transform.exact

    @exact.setter
    def exact(self, value: bool) -> None:
        self.flow.transform.exact = bool(value)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        before = self.calls
        lp = self.flow().log_prob(x)
        self.nfe = self.calls - before
        return lp


def _models(d: int = 2, hidden: int = 64, zuko=None) -> dict:
    """``{name: (build(), objective)}`` of the models compared on one data set (``D = d``)."""
    from fastflow.models import CNF, MAF, NeuralSplineFlow, RealNVP

    out = {
        "CNF-MLE": (lambda: CNF(d, hidden=hidden, solver="rk4", steps=8), "mle"),
        "CNF-FM": (lambda: CNF(d, hidden=hidden), "fm"),
        "CNF-FM-OT": (lambda: CNF(d, hidden=hidden), "fm-ot"),
        "RealNVP": (lambda: RealNVP(d, layers=8, hidden=hidden), "mle"),
        "MAF": (lambda: MAF(d, layers=5, hidden=(hidden, hidden)), "mle"),
        "NSF": (lambda: NeuralSplineFlow(d, layers=5, hidden=hidden), "mle"),
    }
    if zuko is not None:
        out["zuko CNF"] = (lambda: ZukoCNF(zuko, d, hidden), "mle")
    return out


def _exact_nll(flow, x: torch.Tensor, offset: float) -> tuple[float, float | None]:
    """Test NLL (nats, data units) and the mean function evaluations per solve (CNFs, else
    ``None``). A CNF is scored with the exact divergence and an adaptive solver at
    rtol = atol = 1e-5 (fastflow: dopri5; zuko: its own)."""
    from fastflow.models import CNF

    flow.eval()
    saved = None
    if isinstance(flow, CNF):
        ode = flow.ode
        saved = (ode.solver, ode.steps, ode.rtol, ode.atol, ode.trace)
        ode.solver, ode.steps, ode.rtol, ode.atol, ode.trace = "dopri5", None, 1e-5, 1e-5, "exact"
    elif isinstance(flow, ZukoCNF):
        saved, flow.exact = flow.exact, True
    nfes = []
    try:
        with torch.no_grad():
            lps = []
            for i in range(0, len(x), 1024):
                lps.append(flow.log_prob(x[i : i + 1024]).double())
                if saved is not None:
                    nfes.append(flow.nfe)
            lp = torch.cat(lps)
    finally:
        if isinstance(flow, CNF):
            ode.solver, ode.steps, ode.rtol, ode.atol, ode.trace = saved
        elif isinstance(flow, ZukoCNF):
            flow.exact = saved
        flow.train()
    return float(-(lp + offset).mean()), (sum(nfes) / len(nfes) if nfes else None)


def _step_evals(flow) -> int | None:
    """Field evaluations of the training step just taken (maximum-likelihood CNFs): fastflow's
    solve (+ the adjoint's backward solve; without the adjoint, backward is autograd through the
    stored solve), zuko's forward and adjoint backward solves."""
    from fastflow.models import CNF

    if isinstance(flow, CNF):
        return flow.ode.nfe + flow.ode.nfe_backward
    if isinstance(flow, ZukoCNF):
        n, flow.calls = flow.calls, 0
        return n
    return None


def _fit(build, objective: str, batches, xte, offset, steps, batch, seed, checkpoints=()):
    """Train ``build()`` for ``steps`` on ``batches(idx, step)`` (``idx`` drawn with replacement
    from a generator seeded by ``seed``); test NLL, training wall time, evaluations."""
    from fastflow.flow_matching import flow_matching_loss

    torch.manual_seed(seed)
    flow = build()
    opt = torch.optim.Adam(flow.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    n_train = batches.n
    wall, curve, evals = 0.0, [], []
    if isinstance(flow, ZukoCNF):
        flow.calls = 0
    for step in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, n_train, (batch,), generator=g)
        xb = batches(idx, step)
        if objective == "mle":
            loss = -flow.log_prob(xb).mean()
        else:
            coupling = "ot" if objective == "fm-ot" else "independent"
            loss = flow_matching_loss(flow, xb, coupling=coupling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 100.0)
        opt.step()
        wall += time.perf_counter() - t0
        if objective == "mle" and (e := _step_evals(flow)) is not None:
            evals.append(e)
        if step + 1 in checkpoints:
            curve.append((step + 1, wall, _exact_nll(flow, xte, offset)[0]))
    nll, test_nfe = _exact_nll(flow, xte, offset)
    if curve and curve[-1][0] == steps:
        nll = curve[-1][2]
    return {
        "nll": nll,
        "wall_s": wall,
        "params": n_params(flow),
        "curve": curve,
        "train_nfe": sum(evals) / len(evals) if evals else None,
        "test_nfe": test_nfe,
    }


class _Batches:
    """``batches(idx, step)``: training rows ``idx`` as model input; images dequantized with
    noise seeded by ``(seed, step)`` (the protocol of :mod:`fastflow.bench.likelihood`)."""

    def __init__(self, pre, train, seed: int):
        self.pre, self.seed, self.n = pre, seed, train.shape[0]
        self.image = pre.kind == "image"
        self.train = train if self.image else pre.to_model(train, None, torch.float32)

    def __call__(self, idx, step):
        if not self.image:
            return self.train[idx]
        from fastflow.training.preprocess import noise_generator

        return self.pre.to_model(self.train[idx], noise_generator(self.seed, step), torch.float32)


DATASETS = {  # data: (steps full, steps quick, batch, hidden, n_data, n_test full, n_test quick)
    "moons": (2000, 150, 256, 64, 20000, 2000, 1000),
    "8gaussians": (2000, 150, 256, 64, 20000, 2000, 1000),
    "digits": (1000, 100, 128, 128, None, None, None),  # the whole test split (180 images)
}


def dataset_rows(cfg, data: str, zuko=None) -> list[dict]:
    """CNF-MLE, CNF-FM(-OT), RealNVP, MAF, NSF (and zuko's CNF where given) at one budget on
    ``data``: test NLL (nats; bits/dim for images) beside the floor (the true density of a 2-D
    toy, the per-pixel histogram of images), training wall time, CNF evaluations."""
    from fastflow.bench._densities import LN2, histogram_bits_per_dim
    from fastflow.training.preprocess import Preprocess, load_splits

    steps_full, steps_quick, batch, hidden, n_data, n_test_full, n_test_quick = DATASETS[data]
    steps = 3 if cfg.smoke else cfg.pick(steps_full, steps_quick)
    if cfg.smoke:
        batch, n_data = 32, 1000 if n_data else None
    sp = load_splits(data, n_data, 0.1, 0.1, seed=0)
    d = math.prod(sp.ds.shape)
    pre = Preprocess.fit(sp.ds, sp.train, (d,))
    image = sp.ds.kind == "image"
    unit, scale = ("bits/dim", 1.0 / (pre.dims * LN2)) if image else ("nats", 1.0)
    n_test = 50 if cfg.smoke else cfg.pick(n_test_full, n_test_quick)
    test_raw = sp.test[:n_test]
    xte = pre.to_model(test_raw, torch.Generator().manual_seed(12345), torch.float32)
    seed = cfg.seeds[0]
    batches = _Batches(pre, sp.train, seed)
    # flow-matching steps are cheap (one field evaluation, no solve): FM also trains for
    # FM_STEPS_FACTOR x the budget, scored at tenths, for its time to reach RealNVP (quick
    # mode: the independent coupling only)
    long = steps * (1 if cfg.smoke else FM_STEPS_FACTOR)
    checks = tuple(sorted({max(1, long * q // 10) for q in range(1, 11)} | {steps}))
    results = {}
    for name, (build, objective) in _models(d, hidden, zuko).items():
        fm = objective.startswith("fm")
        ck = tuple(c for c in checks if c <= steps) if fm else ()
        r = _fit(build, objective, batches, xte, pre.offset, steps, batch, seed, ck)
        results[name] = r
        if fm and long > steps and not (cfg.quick and objective == "fm-ot"):
            results[f"{name} x{FM_STEPS_FACTOR}"] = _fit(
                build, objective, batches, xte, pre.offset, long, batch, seed, checks
            )
        for key in [k for k in results if k.startswith(name)]:
            rr = results[key]
            nfe = "" if rr["test_nfe"] is None else f", test solve {rr['test_nfe']:.0f} evals"
            if rr["train_nfe"] is not None:
                nfe += f", {rr['train_nfe']:.1f} evals per training step"
            cfg.log(
                f"  {data:10s} {key:13s}: test {rr['nll'] * scale:.4f} {unit}, train "
                f"{rr['wall_s']:.1f} s ({rr['params']:,} parameters{nfe})"
            )
    if "zuko CNF" in results:
        cfg.log(f"  {data}: " + params_line(
            {"fastflow": results["CNF-MLE"]["params"], "zuko": results["zuko CNF"]["params"]}
        ))  # fmt: skip
    ref = results["RealNVP"]["nll"]
    common = dict(steps=steps, batch=batch, lr=LR, hidden=hidden, data=data, seed=seed)
    rows = []
    for name, r in results.items():
        reach = next((w for _, w, v in r["curve"] if v <= ref), None)
        extra = {}
        if r["curve"]:
            extra = {
                "curve": [[s, round(w, 3), round(v * scale, 4)] for s, w, v in r["curve"]],
                "time_to_realnvp_s": None if reach is None else round(reach, 3),
            }
        for key in ("train_nfe", "test_nfe"):
            if r[key] is not None:
                extra[key] = round(r[key], 2)
        rows.append(
            value_row("cnf", f"{data} NLL", "test_nll", name, unit, r["nll"] * scale,
                      params=r["params"], wall_s=round(r["wall_s"], 2), **common, **extra)
        )  # fmt: skip
        rows.append(
            value_row("cnf", f"{data} wall", "train_time", name, "s", round(r["wall_s"], 2),
                      **common)
        )  # fmt: skip
    for name, r in results.items():
        if r["test_nfe"] is not None:
            rows.append(value_row("cnf", f"{data} NFE", "nfe test solve", name, "evals",
                                  round(r["test_nfe"], 2), **common))  # fmt: skip
        if r["train_nfe"] is not None:
            rows.append(value_row("cnf", f"{data} NFE", "nfe train step", name, "evals",
                                  round(r["train_nfe"], 2), **common))  # fmt: skip
    if image:
        bpd = histogram_bits_per_dim(sp.train.numpy(), test_raw.numpy(), sp.ds.levels)
        rows.append(value_row("cnf", f"{data} NLL", "test_nll", "per-pixel histogram", unit, bpd,
                              floor=True))  # fmt: skip
    elif data in TRUE_LOG_DENSITY:
        ll = TRUE_LOG_DENSITY[data](test_raw.numpy())
        rows.append(value_row("cnf", f"{data} NLL", "test_nll", "true density", unit,
                              float(-np.mean(ll)), floor=True))  # fmt: skip
    cfg.log(f"  {data:10s} {rows[-1]['impl']}: {rows[-1]['value']:.4f} {unit}")
    return rows


def toy_rows(cfg) -> list[dict]:
    """:func:`dataset_rows` on moons (quick, smoke) or moons, 8 gaussians and the 8x8 digits
    (full), with zuko's CNF where zuko is installed."""
    zuko = peer("zuko", cfg.log)
    rows = []
    for data in ("moons",) if cfg.smoke or cfg.quick else ("moons", "8gaussians", "digits"):
        rows += dataset_rows(cfg, data, zuko)
    return rows


def run(cfg) -> list[dict]:
    """The suite's CNF benchmark (see the module docstring)."""
    return trace_rows(cfg) + toy_rows(cfg)


def main() -> None:  # pragma: no cover - ``python -m fastflow.bench.cnf [--quick]``
    import argparse
    import json

    from fastflow.bench import BenchConfig

    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--data", nargs="*", choices=sorted(DATASETS), help="data sets (default: all)")
    p.add_argument("--no-trace", action="store_true", help="skip the exact vs Hutchinson rows")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = BenchConfig(quick=a.quick, smoke=a.smoke, seeds=(0,))
    if a.data:
        zuko = peer("zuko", cfg.log)
        rows = sum((dataset_rows(cfg, data, zuko) for data in a.data), [])
    else:
        rows = toy_rows(cfg)
    if not a.no_trace:
        rows = trace_rows(cfg) + rows
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    if not math.isfinite(sum(r["value"] for r in rows if isinstance(r["value"], float))):
        print("(some value is not finite)")


if __name__ == "__main__":
    main()
