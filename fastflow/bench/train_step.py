"""Benchmark: the step a user runs — forward, backward and an Adam update of a whole model —
fastflow against the peer libraries at equal parameter count, interleaved in one process.

Models and peers (each peer only where it has the model; parameter counts printed side by side):

* ``realnvp`` on vectors ``D``: 5 affine couplings, half masks alternating, MLP conditioner
  ``D/2 -> 64 -> 64 -> D`` (ReLU): fastflow ``RealNVP``, normflows ``AffineCouplingBlock`` +
  swap permutations, nflows ``AffineCouplingTransform`` + reverse permutations, FrEIA
  ``AffineCouplingOneSided`` + reverse permutations.
* ``maf`` on vectors ``D``: 5 affine MADE layers with hidden ``(64, 64)``: fastflow ``MAF``, zuko
  ``MAF``, nflows ``MaskedAffineAutoregressiveTransform`` (no residual blocks, no batch norm).
* ``glow`` on images: see :mod:`glow_case` below (fastflow ``Glow`` vs normflows ``GlowBlock``
  multi-scale stack).

Also timed per model: ``log_prob`` without gradients and ``sample(B)``.

Method: every implementation is built from the same seed and trained on the same batch; each
round times ``reps`` calls of every implementation in turn (interleaved, so machine load hits all
of them), after warm-up; the reported time is the minimum over rounds of the per-round median, the
median over rounds is stored too. Ratios are ``peer / fastflow`` (above 1: fastflow is faster);
``best_peer`` is the fastest peer of the same run. Threads are set with ``torch.set_num_threads``.

``--compile``: every side's ``log_prob`` wrapped in ``torch.compile`` (default mode, graph breaks
allowed; fastflow's custom ops have fake implementations), training step only; an implementation
whose compilation fails is left out of that case with the error printed. Compilation happens in
the warm-up, outside the timed rounds.

Run: ``python bench/train_step.py [--quick] [--models realnvp maf glow] [--threads 1 2]
[--compile]``; writes ``bench/results/train_step.json`` and ``.md``. In the suite
(``fastflow bench --only train_step``): :func:`run`.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from torch import nn

import fastflow
from fastflow.bench._common import (
    environment,
    measure,
    n_params,
    no_grad,
    params_line,
    peer,
    print_rows,
    require_native,
    table,
    time_rows,
    timing_mode,
    write_results,
)
from fastflow.models import MAF, RealNVP

DESCRIPTION = "whole training step (forward, backward, Adam), log_prob and sampling vs peers"

LAYERS, HIDDEN = 5, 64


def _mlp(sizes, zero_last=True) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            mods.append(nn.ReLU())
    if zero_last:
        nn.init.zeros_(mods[-1].weight)
        nn.init.zeros_(mods[-1].bias)
    return nn.Sequential(*mods)


# -- model builders: each returns (module, log_prob(x), sample(n) or None) ----------------------


def realnvp_fastflow(d, hidden=HIDDEN):
    m = RealNVP(d, layers=LAYERS, hidden=hidden)
    return m, m.log_prob, m.sample


def realnvp_normflows(d, hidden=HIDDEN):
    nf = peer("normflows")
    flows = []
    for _ in range(LAYERS):
        net = nf.nets.MLP([d // 2, hidden, hidden, 2 * (d - d // 2)], init_zeros=True)
        flows += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(d, mode="swap")]
    m = nf.NormalizingFlow(nf.distributions.DiagGaussian(d, trainable=False), flows)
    return m, m.log_prob, lambda n: m.sample(n)[0]


def realnvp_nflows(d, hidden=HIDDEN):
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import AffineCouplingTransform, CompositeTransform, ReversePermutation

    mask = torch.zeros(d)
    mask[d // 2 :] = 1
    ts = []
    for _ in range(LAYERS):
        ts.append(
            AffineCouplingTransform(mask, lambda i, o: _NflowsNet(_mlp([i, hidden, hidden, o])))
        )
        ts.append(ReversePermutation(d))
    m = Flow(CompositeTransform(ts), StandardNormal([d]))
    return m, m.log_prob, m.sample


class _NflowsNet(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, context=None):
        return self.net(x)


def realnvp_freia(d, hidden=HIDDEN):
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(d)
    for _ in range(LAYERS):
        inn.append(
            Fm.AffineCouplingOneSided,
            subnet_constructor=lambda i, o: _mlp([i, hidden, hidden, o]),
        )
        inn.append(Fm.PermuteRandom, seed=0)

    def log_prob(x):
        z, ld = inn(x)
        return -0.5 * (z**2).sum(1) - 0.5 * d * math.log(2 * math.pi) + ld

    def sample(n):
        dev = next(inn.parameters()).device
        return inn(torch.randn(n, d, device=dev), rev=True)[0]

    return inn, log_prob, sample


def maf_fastflow(d, hidden=HIDDEN):
    m = MAF(d, layers=LAYERS, hidden=(hidden, hidden))
    return m, m.log_prob, m.sample


def maf_zuko(d, hidden=HIDDEN):
    zuko = peer("zuko")
    f = zuko.flows.MAF(d, transforms=LAYERS, hidden_features=(hidden, hidden))
    return f, lambda x: f().log_prob(x), lambda n: f().sample((n,))


def maf_nflows(d, hidden=HIDDEN):
    from nflows.distributions import StandardNormal
    from nflows.flows import Flow
    from nflows.transforms import (
        CompositeTransform,
        MaskedAffineAutoregressiveTransform,
        ReversePermutation,
    )

    ts = []
    for _ in range(LAYERS):
        ts.append(
            MaskedAffineAutoregressiveTransform(
                d, hidden, num_blocks=1, use_residual_blocks=False, use_batch_norm=False
            )
        )
        ts.append(ReversePermutation(d))
    m = Flow(CompositeTransform(ts), StandardNormal([d]))
    return m, m.log_prob, m.sample


def glow_fastflow(shape, levels, steps, hidden):
    from fastflow.models import Glow

    m = Glow(shape, levels=levels, steps=steps, hidden=hidden)
    return m, m.log_prob, m.sample


def glow_normflows(shape, levels, steps, hidden):
    """normflows' multi-scale Glow (its README/example construction): per level K GlowBlocks
    (ActNorm, LU 1x1 conv, affine coupling with a 3-1-3 conv net), squeeze, and a learned
    diagonal Gaussian per factored-out latent."""
    nf = peer("normflows")
    c0, h0, w0 = shape
    q0, merges, flows = [], [], []
    for i in range(levels):
        ch = c0 * 2 ** (levels + 1 - i)
        flows.append(
            [nf.flows.GlowBlock(ch, hidden, split_mode="channel", scale=True) for _ in range(steps)]
            + [nf.flows.Squeeze()]
        )
        if i > 0:
            merges.append(nf.flows.Merge())
            lat = (c0 * 2 ** (levels - i), h0 // 2 ** (levels - i), w0 // 2 ** (levels - i))
        else:
            lat = (c0 * 2 ** (levels + 1), h0 // 2**levels, w0 // 2**levels)
        q0.append(nf.distributions.DiagGaussian(lat))
    m = nf.MultiscaleFlow(q0, flows, merges)
    return m, lambda x: m.log_prob(x, None), lambda n: m.sample(n)[0]


GLOW_CASES = {
    # name: (shape, levels, steps, hidden, batch)
    "1x8x8": ((1, 8, 8), 2, 8, 64, 64),
    "1x28x28": ((1, 28, 28), 2, 8, 128, 64),
    "3x32x32": ((3, 32, 32), 3, 8, 256, 32),
}


def glow_case(key: str, rounds: int, reps: int, quick: bool, compiled: bool = False) -> list[dict]:
    shape, levels, steps, hidden, batch = GLOW_CASES[key]
    if quick:
        steps, hidden = max(2, steps // 4), max(16, hidden // 4)
    impls = {}
    for name, build, lib in (
        ("fastflow", glow_fastflow, None),
        ("normflows", glow_normflows, "normflows"),
    ):
        if lib is None or peer(lib) is not None:
            torch.manual_seed(0)
            impls[name] = build(shape, levels, steps, hidden)
    torch.manual_seed(1)
    x = torch.rand(batch, *shape)
    with torch.no_grad():  # data-dependent ActNorm initialisation on the first batch
        for _mod, lp, _ in impls.values():
            lp(x)
    return _time_cases(impls, x, "glow", key, batch, rounds, reps, reps, compiled)


# model -> [(implementation, builder(d, hidden), the peer library it needs or None)]
VECTOR_MODELS = {
    "realnvp": [
        ("fastflow", realnvp_fastflow, None),
        ("normflows", realnvp_normflows, "normflows"),
        ("nflows", realnvp_nflows, "nflows"),
        ("FrEIA", realnvp_freia, "FrEIA"),
    ],
    "maf": [
        ("fastflow", maf_fastflow, None),
        ("zuko", maf_zuko, "zuko"),
        ("nflows", maf_nflows, "nflows"),
    ],
}


def build_vector(model: str, d: int, hidden: int = HIDDEN, log=print) -> dict:
    """``{implementation: (module, log_prob, sample)}`` of every installed library that has
    ``model`` (``realnvp`` or ``maf``) for ``d`` features, each built from seed 0."""
    impls = {}
    for name, build, lib in VECTOR_MODELS[model]:
        if lib is not None and peer(lib, log) is None:
            continue
        torch.manual_seed(0)
        try:
            impls[name] = build(d, hidden)
        except Exception as exc:  # noqa: BLE001 - a peer that cannot build the model is skipped
            log(f"bench: {name} cannot build {model} D={d}: {exc}")
    return impls


# -- timing ---------------------------------------------------------------------------------------


MODELS = ("realnvp", "maf", "glow")


def _stepper(module, log_prob, x):
    opt = torch.optim.Adam(module.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = -log_prob(x).mean()
        loss.backward()
        opt.step()

    return step


def interleaved(fns: dict, rounds: int, reps: int, warmup: int = 2) -> dict:
    """``{name: (min over rounds of the per-round median, median over rounds)}`` in ms."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            per[k].append(statistics.median(ts))
    return {k: (1e3 * min(v), 1e3 * statistics.median(v)) for k, v in per.items()}


def vector_case(
    model: str, d: int, batch: int, rounds: int, reps: int, compiled: bool = False
) -> list[dict]:
    impls = build_vector(model, d)
    torch.manual_seed(1)
    x = torch.randn(batch, d)
    sample_reps = reps if model != "maf" else max(1, reps // 4)
    return _time_cases(impls, x, model, d, batch, rounds, reps, sample_reps, compiled)


def _compiled(impls: dict, x) -> dict:
    """``impls`` with each ``log_prob`` wrapped in ``torch.compile``, compiled here (forward and
    backward, one training step); implementations that fail to compile are left out, with the
    error printed. Dynamo's caches are reset first, so that each case compiles as a user's one
    model would: static shapes, not the dynamic ones automatic dynamic shapes pick after a case of
    another size has compiled the same code."""
    torch._dynamo.reset()
    out = {}
    for k, (mod, lp, smp) in impls.items():
        clp = torch.compile(lp)
        try:
            _stepper(mod, clp, x)()
        except Exception as e:  # a peer's model torch.compile cannot handle: report, go on
            print(f"  {k}: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); left out")
            continue
        out[k] = (mod, clp, smp)
    return out


def _time_cases(
    impls, x, model, size, batch, rounds, reps, sample_reps, compiled: bool = False
) -> list[dict]:
    rows = []
    if compiled:
        impls = _compiled(impls, x)
        if "fastflow" not in impls:
            return rows
    params = {k: n_params(v[0]) for k, v in impls.items()}
    # the peers' MAF sampling is D network passes: cap its batch so the run stays short
    n_sample = min(batch, 1024) if model == "maf" else batch
    for what in ("train_step",) if compiled else ("train_step", "log_prob", "sample"):
        fns = {}
        for k, (mod, lp, sample) in impls.items():
            if what == "train_step":
                fns[k] = _stepper(mod, lp, x)
            elif what == "log_prob":
                fns[k] = no_grad(lambda lp=lp: lp(x))
            else:
                fns[k] = no_grad(lambda sample=sample: sample(n_sample))
        res = interleaved(fns, rounds, sample_reps if what == "sample" else reps)
        ff = res["fastflow"][0]
        peers = {k: v for k, v in res.items() if k != "fastflow"}
        best = min(peers, key=lambda k: peers[k][0]) if peers else None
        row = {
            "model": model,
            "size": size,
            "batch": n_sample if what == "sample" else batch,
            "threads": torch.get_num_threads(),
            "what": what,
            "compiled": compiled,
            "fastflow_ms": round(ff, 3),
            "params": params,
            "ms": {k: round(v[0], 3) for k, v in res.items()},
            "median_ms": {k: round(v[1], 3) for k, v in res.items()},
            "best_peer": best,
            "speedup_vs_best_peer": round(peers[best][0] / ff, 3) if best else None,
        }
        rows.append(row)
        print(
            f"{model:8s} {size!s:8s} B={batch:<5d} t={row['threads']} {what:10s} "
            + ("compiled " if compiled else "")
            + "  ".join(f"{k}={v[0]:.2f}" for k, v in res.items())
            + (f"  -> {row['speedup_vs_best_peer']:.2f}x vs {best}" if best else "")
            + "  params "
            + " ".join(f"{k}={v}" for k, v in params.items()),
            flush=True,
        )
    return rows


# -- the suite entry point ------------------------------------------------------------------------


def _suite_case(cfg, model, size, impls, x, reps) -> list[dict]:
    dev = torch.device(cfg.device)
    impls = {k: (m.to(dev), lp, smp) for k, (m, lp, smp) in impls.items()}
    x = x.to(dev)
    params = {k: n_params(v[0]) for k, v in impls.items()}
    batch = x.shape[0]
    n_sample = min(batch, 1024) if model == "maf" else batch
    case = f"{model} {size} B={batch}"
    cfg.log(f"  {case}: {params_line(params)}")
    rows = []
    for what in ("train_step", "log_prob", "sample"):
        fns = {}
        for k, (mod, lp, smp) in impls.items():
            if what == "train_step":
                fns[k] = _stepper(mod, lp, x)
            elif what == "log_prob":
                fns[k] = no_grad(lambda lp=lp: lp(x))
            else:
                fns[k] = no_grad(lambda smp=smp: smp(n_sample))
        n = max(1, reps // 4) if (what == "sample" and model == "maf") else reps
        res = measure(fns, rounds=cfg.rounds(5), reps=cfg.reps(n), warmup=2, device=dev)
        rows += time_rows(
            "train_step", case, what, res, params, batch=n_sample if what == "sample" else batch
        )
    print_rows(rows, cfg.log)
    return rows


def run(cfg) -> list[dict]:
    """The suite's training-step benchmark: RealNVP and MAF on vectors, Glow on images, fastflow
    and every installed peer that has the model, interleaved; train step, ``log_prob``, sample.

    Quick: RealNVP and MAF at D=16, batch 256, and a small Glow (L2 K2 h32) on 1x8x8. Full:
    D in (2, 16, 64, 256) x batch in (256, 4096) and the three Glow cases of :data:`GLOW_CASES`.
    """
    dims = cfg.pick((2, 16, 64, 256), (16,))
    batches = cfg.pick((256, 4096), (256,))
    rows = []
    for model in ("realnvp", "maf"):
        for d in dims:
            for b in batches:
                impls = build_vector(model, d, log=cfg.log)
                torch.manual_seed(1)
                x = torch.randn(b, d)
                rows += _suite_case(cfg, model, d, impls, x, reps=10 if b <= 256 else 3)
    glow_cases = GLOW_CASES if not cfg.quick else {"1x8x8": ((1, 8, 8), 2, 2, 32, 64)}
    for key, (shape, levels, steps, hidden, batch) in glow_cases.items():
        impls = {}
        for name, build, lib in (
            ("fastflow", glow_fastflow, None),
            ("normflows", glow_normflows, "normflows"),
        ):
            if lib is None or peer(lib, cfg.log) is not None:
                torch.manual_seed(0)
                impls[name] = build(shape, levels, steps, hidden)
        torch.manual_seed(1)
        x = torch.rand(batch, *shape) - 0.5
        with torch.no_grad():  # data-dependent ActNorm initialisation on the first batch
            for _mod, lp, _ in impls.values():
                lp(x)
        case_rows = _suite_case(cfg, "glow", key, impls, x, reps=cfg.pick(3, 2))
        rows += case_rows
    return rows


def main(argv=None, results_dir: str = os.path.join("bench", "results")) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="reduced sizes and repetitions")
    ap.add_argument(
        "--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="model families"
    )
    ap.add_argument("--glow", nargs="+", default=None, choices=list(GLOW_CASES))
    ap.add_argument("--dims", nargs="+", type=int, default=None)
    ap.add_argument("--batches", nargs="+", type=int, default=None)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument(
        "--out", default="train_step", help="result name under bench/results, or a path"
    )
    ap.add_argument(
        "--compile", action="store_true", help="torch.compile every side (training step only)"
    )
    args = ap.parse_args(argv)
    require_native()
    timing_mode()
    dims = args.dims or ([2, 16, 64] if args.quick else [2, 16, 64, 256])
    batches = args.batches or ([256] if args.quick else [256, 4096])
    rounds = args.rounds or 3
    rows = []
    for t in args.threads:
        torch.set_num_threads(t)
        for model in args.models:
            if model == "glow":
                for key in args.glow or (["1x8x8"] if args.quick else list(GLOW_CASES)):
                    reps = 3 if key != "1x8x8" else 5
                    rows += glow_case(key, rounds, reps, args.quick, args.compile)
                continue
            for d in dims:
                for b in batches:
                    reps = 10 if b <= 256 else 3
                    rows += vector_case(model, d, b, rounds, reps, args.compile)
    cols = ["model", "size", "batch", "threads", "what", "fastflow_ms", "best_peer"]
    print(table([{**r, "x": r["speedup_vs_best_peer"]} for r in rows], [*cols, "x"]))
    data = {
        "method": "min over rounds of per-round medians, interleaved; ratios peer/fastflow",
        "environment": environment(),
        "fastflow": fastflow.info(),
        "rows": rows,
    }
    path = write_results(args.out, data, results_dir)
    md = path[: -len(".json")] + ".md"
    with open(md + ".tmp", "w") as f:
        f.write(markdown(rows, data["environment"]))
    os.replace(md + ".tmp", md)
    print(f"wrote {path} and {md}")
    return data


def markdown(rows: list[dict], env: dict) -> str:
    """The results as a markdown table: ms per call of fastflow and every peer, and the ratio
    against the fastest peer of the same run."""
    peers = sorted({k for r in rows for k in r["ms"] if k != "fastflow"})
    head = ["model", "size", "batch", "threads", "what", "fastflow ms", *peers, "vs fastest peer"]
    out = [
        f"Machine: {env.get('cpu_model')} ({env.get('cpu_count')} cores), torch "
        f"{env.get('torch')}; ms per call, min over rounds of per-round medians, interleaved.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        what = r["what"] + (" (compiled)" if r.get("compiled") else "")
        cells = [r["model"], str(r["size"]), str(r["batch"]), str(r["threads"]), what]
        cells.append(f"{r['fastflow_ms']:.2f}")
        cells += [f"{r['ms'][k]:.2f}" if k in r["ms"] else "-" for k in peers]
        x = r["speedup_vs_best_peer"]
        cells.append("-" if x is None else f"**{x:.2f}x** ({r['best_peer']})")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
