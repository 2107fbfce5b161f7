"""Continuous flows: what the divergence costs, and the two ways to train a CNF against discrete
flows at one budget.

* ``trace``: one training step (``log_prob`` + backward) of a CNF (vector field MLP, hidden
  64, fixed-step rk4 with 8 steps, so both estimators make the same 32 evaluations) with the
  exact divergence (one batched pass) and with Hutchinson's estimator, at ``D`` = 2, 8, 16;
  beside it the function evaluations of an adaptive ``dopri5`` solve (rtol = atol = 1e-5) with
  each estimator and the Monte-Carlo standard deviation of Hutchinson's log-density.
* ``toys``: on two moons and 8 gaussians (test NLL in nats of the data as generated; the true
  density as the floor), CNF by maximum likelihood (trained with rk4 x 8), CNF by flow matching
  (independent and minibatch-OT couplings), RealNVP (8 couplings), MAF (5 layers) and NSF
  (5 layers), all hidden 64, the same steps, batch, Adam learning rate and batch order. CNFs are
  scored with the exact ODE likelihood (dopri5, rtol = atol = 1e-5). Each run's wall time
  (training only). Flow matching, whose steps are cheap, is also trained for 10x the steps
  (scored at tenths): the curve and the training time at which its test NLL first reached
  RealNVP's final one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from fastflow.bench._common import measure, n_params, time_rows, value_row
from fastflow.bench._densities import TRUE_LOG_DENSITY

DESCRIPTION = (
    "CNF: exact vs Hutchinson divergence (time, NFE); MLE vs flow matching vs RealNVP/MAF/NSF"
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


def _models():
    from fastflow.models import CNF, MAF, NeuralSplineFlow, RealNVP

    return {
        "CNF-MLE": (lambda: CNF(2, hidden=64, solver="rk4", steps=8), "mle"),
        "CNF-FM": (lambda: CNF(2, hidden=64), "fm"),
        "CNF-FM-OT": (lambda: CNF(2, hidden=64), "fm-ot"),
        "RealNVP": (lambda: RealNVP(2, layers=8, hidden=64), "mle"),
        "MAF": (lambda: MAF(2, layers=5, hidden=(64, 64)), "mle"),
        "NSF": (lambda: NeuralSplineFlow(2, layers=5, hidden=64), "mle"),
    }


def _exact_nll(flow, x: torch.Tensor, offset: float) -> float:
    """Test NLL (nats, data units); a CNF is scored with dopri5 at rtol = atol = 1e-5."""
    from fastflow.models import CNF

    flow.eval()
    saved = None
    if isinstance(flow, CNF):
        ode = flow.ode
        saved = (ode.solver, ode.steps, ode.rtol, ode.atol)
        ode.solver, ode.steps, ode.rtol, ode.atol = "dopri5", None, 1e-5, 1e-5
    try:
        with torch.no_grad():
            lp = torch.cat(
                [flow.log_prob(x[i : i + 1024]).double() for i in range(0, len(x), 1024)]
            )
    finally:
        if saved is not None:
            ode.solver, ode.steps, ode.rtol, ode.atol = saved
        flow.train()
    return float(-(lp + offset).mean())


def _fit(build, objective: str, xtr, xte, offset, steps, batch, seed, checkpoints=()):
    from fastflow.flow_matching import flow_matching_loss

    torch.manual_seed(seed)
    flow = build()
    opt = torch.optim.Adam(flow.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    wall, curve = 0.0, []
    for step in range(steps):
        t0 = time.perf_counter()
        idx = torch.randint(0, xtr.shape[0], (batch,), generator=g)
        xb = xtr[idx]
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
        if step + 1 in checkpoints:
            curve.append((step + 1, wall, _exact_nll(flow, xte, offset)))
    nll = curve[-1][2] if curve and curve[-1][0] == steps else _exact_nll(flow, xte, offset)
    return {"nll": nll, "wall_s": wall, "params": n_params(flow), "curve": curve}


def toy_rows(cfg) -> list[dict]:
    """CNF-MLE, CNF-FM(-OT), RealNVP, MAF, NSF at one budget on moons and 8 gaussians."""
    from fastflow.training.preprocess import Preprocess, load_splits

    steps = 3 if cfg.smoke else cfg.pick(2000, 150)
    batch = 32 if cfg.smoke else 256
    rows = []
    for data in ("moons",) if cfg.smoke or cfg.quick else ("moons", "8gaussians"):
        sp = load_splits(data, 1000 if cfg.smoke else 20000, 0.1, 0.1, seed=0)
        pre = Preprocess.fit(sp.ds, sp.train, (2,))
        xtr = pre.to_model(sp.train, None, torch.float32)
        n_test = 50 if cfg.smoke else cfg.pick(2000, 1000)
        xte = pre.to_model(sp.test[:n_test], None, torch.float32)
        # flow-matching steps are cheap (one field evaluation, no solve): FM also trains for
        # FM_STEPS_FACTOR x the budget, scored at tenths, for its time to reach RealNVP
        long = steps * (1 if cfg.smoke else FM_STEPS_FACTOR)
        checks = tuple(sorted({max(1, long * q // 10) for q in range(1, 11)} | {steps}))
        results = {}
        for name, (build, objective) in _models().items():
            fm = objective.startswith("fm")
            ck = tuple(c for c in checks if c <= steps) if fm else ()
            r = _fit(build, objective, xtr, xte, pre.offset, steps, batch, cfg.seeds[0], ck)
            if fm and long > steps:
                r_long = _fit(build, objective, xtr, xte, pre.offset, long, batch, cfg.seeds[0],
                              checks)  # fmt: skip
            results[name] = r
            if fm and long > steps:
                results[f"{name} x{FM_STEPS_FACTOR}"] = r_long
            for key in [k for k in results if k.startswith(name)]:
                rr = results[key]
                cfg.log(
                    f"  {data:10s} {key:13s}: test NLL {rr['nll']:.4f} nats, train "
                    f"{rr['wall_s']:.1f} s ({rr['params']:,} parameters)"
                )
        ref = results["RealNVP"]["nll"]
        for name, r in results.items():
            reach = next((w for _, w, v in r["curve"] if v <= ref), None)
            extra = {}
            if r["curve"]:
                extra = {
                    "curve": [[s, round(w, 3), round(v, 4)] for s, w, v in r["curve"]],
                    "time_to_realnvp_s": None if reach is None else round(reach, 3),
                }
            common = dict(steps=steps, batch=batch, lr=LR, hidden=64, data=data)
            rows.append(
                value_row(
                    "cnf",
                    f"{data} NLL",
                    "test_nll",
                    name,
                    "nats",
                    r["nll"],
                    params=r["params"],
                    wall_s=round(r["wall_s"], 2),
                    **common,
                    **extra,
                )  # fmt: skip
            )
            rows.append(
                value_row(
                    "cnf", f"{data} wall", "train_time", name, "s", round(r["wall_s"], 2), **common
                )  # fmt: skip
            )
        if data in TRUE_LOG_DENSITY:
            ll = TRUE_LOG_DENSITY[data](sp.test[: xte.shape[0]].numpy())
            rows.append(
                value_row(
                    "cnf",
                    f"{data} NLL",
                    "test_nll",
                    "true density",
                    "nats",
                    float(-np.mean(ll)),
                    floor=True,
                )  # fmt: skip
            )
            cfg.log(f"  {data:10s} true density: {rows[-1]['value']:.4f} nats")
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
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = run(BenchConfig(quick=a.quick, smoke=a.smoke, seeds=(0,)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1, default=float)
    if not math.isfinite(sum(r["value"] for r in rows if isinstance(r["value"], float))):
        print("(some value is not finite)")


if __name__ == "__main__":
    main()
