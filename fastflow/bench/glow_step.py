"""Benchmark: one Glow step (ActNorm -> invertible 1x1 conv -> affine coupling), fastflow vs
pure-PyTorch implementations written the way peer libraries write it, in the same run.

Implementations (same parameters, outputs checked to agree before timing):

* ``fastflow``: :class:`fastflow.nn.GlowStep`: ActNorm folded into the LU 1x1 convolution (one
  ``channel_affine`` pass), weight/inverse/log-det from one ``lu_weight`` call, fused coupling.
* ``torch-conv``: ActNorm as its own pass, ``F.conv2d`` with a 1x1 kernel, ``torch.slogdet`` per
  forward and ``torch.inverse`` per inverse call, coupling in elementwise torch ops.
* ``torch-einsum``: the same with ``torch.einsum`` for the 1x1 convolution.
* ``normflows``: ``normflows.flows.GlowBlock`` (LU 1x1 conv, sigmoid-scale coupling, same 3-1-3
  conditioner), when normflows is installed; its normalizing direction is ``GlowBlock.inverse``.
  Its coupling is ``(x - shift) * s`` rather than ``x * s + shift`` (same cost and log-det), so
  only its log-det and its own round trip are checked against fastflow.

Two settings, C = 32 and C = 96, 16x16 images, batch 64, fp32 on CPU:

* (a) ``flow``: the flow part alone, with a trivial (parameter-free, elementwise) conditioner;
* (b) ``step``: the whole step with Glow's conditioner (3x3 conv, 512 hidden, 1x1 conv,
  zero-initialised 3x3 conv).

Measured: forward (no grad, the log-likelihood evaluation), forward+backward (the step inside a
model during training: forward, then backward from given upstream gradients for ``z`` and the
log-det), inverse (no grad, sampling), and the peak memory of forward+backward.
Each is timed call by call, interleaved across the implementations; the reported time is the
minimum (the least disturbed call on a shared machine), the median is stored too. Ratios are
baseline / fastflow (above 1: fastflow is faster / uses less memory).

Run: ``python bench/glow_step.py [--quick] [--samples N]``; writes ``bench/results/glow_step.json``.
In the suite (``fastflow bench --only glow_step``): :func:`run`.
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch
import torch.nn.functional as F
from torch import nn

from fastflow.bench._common import (
    measure,
    n_params,
    params_line,
    peak_memory_mb,
    peer,
    print_rows,
    require_native,
    table,
    time_rows,
    timeit,
    timing_mode,
    value_row,
    write_results,
)
from fastflow.nn.glow_step import GlowConditioner, GlowStep

DESCRIPTION = "one Glow step (ActNorm, 1x1 conv, coupling) vs torch conv/einsum steps, normflows"


class TrivialConditioner(nn.Module):
    """Parameter-free stand-in for the coupling network: cheap elementwise work only. Returns
    ``(raw_scale, shift)`` like :class:`GlowConditioner`."""

    def forward(self, xa):
        return 0.5 * xa, -0.25 * xa


class Interleave(nn.Module):
    """normflows' couplings take one tensor h with shift = h[:, 0::2], scale = h[:, 1::2]."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        raw, shift = self.net(x)
        return torch.stack([shift, raw], 2).flatten(1, 2)


class TorchGlowStep(nn.Module):
    """A Glow step as pure-PyTorch libraries write it (the baseline)."""

    def __init__(self, channels, conditioner, mix="conv"):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.weight = nn.Parameter(torch.eye(channels))
        self.conditioner = conditioner
        self.mix = mix

    def _mix(self, x, w):
        if self.mix == "conv":
            return F.conv2d(x, w[:, :, None, None])
        return torch.einsum("oc,nchw->nohw", w, x)

    def forward(self, x):
        hw = x.shape[2] * x.shape[3]
        y = x * torch.exp(self.log_scale) + self.loc
        ld = hw * self.log_scale.sum()
        y = self._mix(y, self.weight)
        ld = ld + hw * torch.slogdet(self.weight)[1]
        xa, xb = y.chunk(2, 1)
        raw, shift = self.conditioner(xa)
        s = torch.sigmoid(raw + 2.0)
        yb = xb * s + shift
        ld = ld + torch.log(s).flatten(1).sum(1)
        return torch.cat([xa, yb], 1), ld

    def inverse(self, z):
        hw = z.shape[2] * z.shape[3]
        za, zb = z.chunk(2, 1)
        raw, shift = self.conditioner(za)
        s = torch.sigmoid(raw + 2.0)
        xb = (zb - shift) / s
        ld = -torch.log(s).flatten(1).sum(1)
        y = self._mix(torch.cat([za, xb], 1), torch.inverse(self.weight))
        ld = ld - hw * torch.slogdet(self.weight)[1]
        x = (y - self.loc) * torch.exp(-self.log_scale)
        return x, ld - hw * self.log_scale.sum()


class NormflowsStep(nn.Module):
    """normflows' GlowBlock in fastflow's direction convention (forward = normalizing)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.inverse(x)

    def inverse(self, z):
        return self.block.forward(z)


def build(c, part, seed=0, log=print, hidden=512, batch=64):
    nf = peer("normflows", log)
    torch.manual_seed(seed)
    if part == "flow":
        make_cond = TrivialConditioner
    else:

        def make_cond():
            net = GlowConditioner(c // 2, c - c // 2, hidden=hidden)
            with torch.no_grad():  # the zero init would make the coupling trivially cheap to check
                net.net[-1].weight.normal_(0, 1e-3)
            return net

    ff = GlowStep(c, conditioner=make_cond())
    x = torch.randn(batch, c, 16, 16) * 1.5 + 0.3
    ff(x)  # data-dependent ActNorm initialisation
    with torch.no_grad():
        ff.invconv.L.add_(torch.randn_like(ff.invconv.L) * 0.02)
        ff.invconv.U.add_(torch.randn_like(ff.invconv.U) * 0.02)
        W = ff.invconv.weight_and_inverse()[0].detach()
    impls = {"fastflow": ff}
    for mix in ("conv", "einsum"):
        t = TorchGlowStep(c, make_cond(), mix)
        t.conditioner.load_state_dict(ff.conditioner.state_dict())
        with torch.no_grad():
            t.loc.copy_(ff.actnorm.bias.view(1, c, 1, 1))
            t.log_scale.copy_(ff.actnorm.log_scale.view(1, c, 1, 1))
            t.weight.copy_(W)
        impls[f"torch-{mix}"] = t
    if nf is not None:
        block = nf.flows.GlowBlock(c, hidden if part == "step" else 8)
        coupling = block.flows[0].flows[1]
        coupling.param_map = Interleave(make_cond())
        coupling.param_map.net.load_state_dict(ff.conditioner.state_dict())
        conv, act = block.flows[1], block.flows[2]
        with torch.no_grad():
            inv = ff.invconv
            conv.P.copy_(inv.P)
            conv.L.copy_(torch.tril(inv.L, -1) + torch.eye(c))
            conv.U.copy_(torch.triu(inv.U, 1))
            conv.log_S.copy_(inv.log_s)
            conv.sign_S.copy_(inv.sign_s)
            # normflows' ActNorm (generative direction) is z * exp(s) + t; its inverse is ours
            act.s.copy_(-ff.actnorm.log_scale.view(1, c, 1, 1))
            act.t.copy_((-ff.actnorm.bias * torch.exp(-ff.actnorm.log_scale)).view(1, c, 1, 1))
            act.data_dep_init_done = torch.tensor(1.0)
        impls["normflows"] = NormflowsStep(block)
    return impls, x


def check_agree(impls, x):
    with torch.no_grad():
        z0, ld0 = impls["fastflow"](x)
        for name, m in impls.items():
            z, ld = m(x)
            dld = ((ld - ld0).abs().max() / ld0.abs().max().clamp_min(1)).item()
            if name == "normflows":
                # its coupling is (x - shift) * s instead of x * s + shift: same log-det and
                # cost, different z; check its own round trip instead
                dz = 0.0
                x2, _ = m.inverse(z)
            else:
                dz = (z - z0).abs().max().item()
                x2, _ = m.inverse(z0)
            dx = (x2 - x).abs().max().item()
            if dz > 1e-3 or dld > 1e-4 or dx > 1e-3:
                raise RuntimeError(
                    f"{name} disagrees with fastflow: |dz|={dz:.2e}, "
                    f"rel |dlogdet|={dld:.2e}, inverse |dx|={dx:.2e}"
                )


def closures(m, x):
    with torch.no_grad():
        z = m(x)[0]

    def fwd():
        with torch.no_grad():
            return m(x)

    # the step inside a model: gradients arrive from the layers above (here fixed tensors), so
    # time and memory are the step's own, not a loss function's
    g = torch.Generator().manual_seed(1)
    grad_z = torch.randn(z.shape, generator=g).to(x.device)
    grad_logdet = torch.full((x.shape[0],), -1.0 / x.shape[0], device=x.device)

    def fwd_bwd():
        m.zero_grad(set_to_none=True)
        z, ld = m(x)
        torch.autograd.backward((z, ld), (grad_z, grad_logdet))

    def inv():
        with torch.no_grad():
            return m.inverse(z)

    return {"forward": fwd, "fwd_bwd": fwd_bwd, "inverse": inv}


METRICS = ("forward", "fwd_bwd", "inverse")


def time_config(impls, x, samples):
    """Single-call timings, interleaved across implementations and repeated ``samples`` times:
    on a shared machine the minimum is the least disturbed measurement, so ratios use it (the
    median is reported too)."""
    fns = {name: closures(m, x) for name, m in impls.items()}
    times = {name: {k: [] for k in METRICS} for name in impls}
    for name in impls:  # warm-up
        for k in METRICS:
            timeit(fns[name][k], warmup=2, reps=1)
    for _ in range(samples):
        for name in impls:
            for k in METRICS:
                times[name][k].append(timeit(fns[name][k], warmup=0, reps=1))
    out = {}
    for name in impls:
        out[name] = {}
        for k in METRICS:
            out[name][f"{k}_ms"] = 1e3 * min(times[name][k])
            out[name][f"{k}_median_ms"] = 1e3 * statistics.median(times[name][k])
    return out


def run(cfg) -> list[dict]:
    """The suite's Glow-step benchmark: forward, forward+backward and inverse of one step, and
    the peak memory of forward+backward, fastflow vs the torch steps and normflows' GlowBlock.

    Quick: C = 32, batch 16, conditioner hidden 128. Full: C in (32, 96), batch 64, hidden 512.
    """
    dev = torch.device(cfg.device)
    hidden, batch = cfg.pick((512, 64), (128, 16))
    rows = []
    for part in ("flow", "step"):
        for c in cfg.pick((32, 96), (32,)):
            impls, x = build(c, part, log=cfg.log, hidden=hidden, batch=batch)
            check_agree(impls, x)
            impls = {k: m.to(dev) for k, m in impls.items()}
            x = x.to(dev)
            params = {k: n_params(m) for k, m in impls.items()}
            case = f"{part} C={c} 16x16 B={batch}" + (f" h={hidden}" if part == "step" else "")
            cfg.log(f"  {case}: {params_line(params)}")
            fns = {k: closures(m, x) for k, m in impls.items()}
            case_rows = []
            for metric in METRICS:
                res = measure(
                    {k: f[metric] for k, f in fns.items()},
                    rounds=cfg.rounds(7 if part == "flow" else 5),
                    reps=cfg.reps(cfg.pick(5 if part == "flow" else 2, 2)),
                    device=dev,
                )
                case_rows += time_rows("glow_step", case, metric, res, params)
            for k, f in fns.items():
                mb = peak_memory_mb(f["fwd_bwd"], dev)
                case_rows.append(value_row("glow_step", case, "fwd_bwd_peak", k, "MiB", mb))
            print_rows(case_rows, cfg.log)
            rows += case_rows
    return rows


def main(argv=None, results_dir: str = os.path.join("bench", "results")):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer samples")
    ap.add_argument("--samples", type=int, default=0, help="timed calls per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch/kernel threads (0: default)")
    ap.add_argument("--parts", default="flow,step", help="comma-separated: flow, step")
    ap.add_argument("--name", default="glow_step", help="results file name (bench/results/)")
    args = ap.parse_args(argv)
    require_native()
    timing_mode()
    nf = peer("normflows")
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    configs = [(part, c) for part in parts for c in (32, 96)]
    # Phase 1, peak memory (peak_memory_mb switches to its exact-RSS allocator policy).
    memory = {}
    for part, c in configs:
        impls, x = build(c, part)
        check_agree(impls, x)
        memory[part, c] = {n: peak_memory_mb(closures(m, x)["fwd_bwd"]) for n, m in impls.items()}
    # Phase 2, time (with _common's default heap-reuse allocator policy).
    rows = []
    cols = ["part", "C", "impl", "forward_ms", "fwd_bwd_ms", "inverse_ms", "peak_mb"]
    for part, c in configs:
        impls, x = build(c, part)
        samples = args.samples or ((40 if part == "flow" else 8) // (4 if args.quick else 1))
        best = time_config(impls, x, samples)
        for name in impls:
            best[name]["peak_mb"] = memory[part, c][name]
            rows.append({"part": part, "C": c, "impl": name, **best[name]})
        ref = best["fastflow"]
        for name in impls:
            if name != "fastflow":
                rows.append(
                    {
                        "part": part,
                        "C": c,
                        "impl": f"ratio {name}/fastflow",
                        **{k: best[name][k] / ref[k] for k in ref},
                    }
                )
        print(table([r for r in rows if r["part"] == part and r["C"] == c], cols), flush=True)
        print()
    config = {
        "batch": 64,
        "image": [16, 16],
        "dtype": "float32",
        "device": "cpu",
        "hidden": 512,
        "normflows": getattr(nf, "__version__", None),
        "timing": "*_ms: minimum over single-call samples interleaved across implementations; "
        "*_median_ms: their median; allocator policies of bench/_common.py",
        "ratio": "baseline / fastflow (above 1: fastflow faster or smaller); peak_mb is the "
        "peak memory of forward+backward (backward from given upstream gradients)",
    }
    config["threads"] = torch.get_num_threads()
    config["load_average_at_end"] = os.getloadavg()
    path = write_results(args.name, {"config": config, "rows": rows}, results_dir)
    print("wrote", path)


if __name__ == "__main__":
    main()
