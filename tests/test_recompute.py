"""Invertible recomputation: same gradients as stored activations, constant saved memory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastflow.models.glow import Glow
from fastflow.models.realnvp import RealNVP
from fastflow.nn.coupling import AffineCoupling
from fastflow.nn.recompute import invertible_checkpoint


def _randomize(module: nn.Module, std: float = 0.2, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def _grads(model, x, context=None, recompute=False):
    model.invertible_recompute = recompute
    model.zero_grad()
    x = x.clone().requires_grad_(True)
    if context is not None:
        context = context.clone().requires_grad_(True)
    loss = -model.log_prob(x, context).mean()
    loss.backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    out["<x>"] = x.grad
    if context is not None:
        out["<context>"] = context.grad
    return loss.detach(), out


def _compare(model, x, context=None, rtol=1e-9, atol=1e-11):
    model.log_prob(x, context)  # data-dependent ActNorm init happens once, before comparing
    loss0, g0 = _grads(model, x, context, recompute=False)
    loss1, g1 = _grads(model, x, context, recompute=True)
    torch.testing.assert_close(loss1, loss0, rtol=rtol, atol=atol)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert g1[name] is not None, name
        torch.testing.assert_close(g1[name], g0[name], rtol=rtol, atol=atol, msg=name)


def test_glow_gradients_equal_stored_activations_fp64():
    torch.manual_seed(0)
    model = _randomize(Glow((2, 8, 8), levels=2, steps=3, hidden=4)).double()
    x = torch.rand(3, 2, 8, 8, dtype=torch.float64) - 0.5
    _compare(model, x)


def test_glow_additive_plain_conv_gradients_fp64():
    torch.manual_seed(1)
    model = Glow((1, 4, 4), levels=2, steps=2, hidden=4, coupling="additive", lu=False)
    model = _randomize(model).double()
    _compare(model, torch.rand(2, 1, 4, 4, dtype=torch.float64))


def test_conditional_realnvp_gradients_including_context_fp64():
    torch.manual_seed(0)
    model = _randomize(RealNVP((1, 4, 4), levels=2, hidden=4, context_features=2)).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    c = torch.randn(3, 2, dtype=torch.float64)
    _compare(model, x, c)


def test_glow_gradients_close_in_fp32():
    torch.manual_seed(0)
    model = _randomize(Glow((3, 8, 8), levels=2, steps=4, hidden=8), std=0.05)
    _compare(model, torch.rand(4, 3, 8, 8) - 0.5, rtol=2e-3, atol=1e-4)


def _saved_bytes(model, x):
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.log_prob(x).sum()
    return total


def test_saved_activations_do_not_grow_with_depth():
    x = torch.rand(2, 3, 8, 8)
    saved = {}
    for recompute in (False, True):
        for steps in (2, 6):
            torch.manual_seed(0)
            model = Glow((3, 8, 8), levels=2, steps=steps, hidden=16)
            model.invertible_recompute = recompute
            model.log_prob(x)  # ActNorm init
            saved[recompute, steps] = _saved_bytes(model, x)
    assert saved[False, 6] > 2 * saved[False, 2]
    assert saved[True, 6] == saved[True, 2]
    assert saved[True, 6] < saved[False, 2]


def test_checkpoint_without_grad_is_plain_forward():
    layers = [_randomize(AffineCoupling(4, hidden=8, parity=i % 2)) for i in range(3)]
    x = torch.randn(5, 4)
    with torch.no_grad():
        z, ld = invertible_checkpoint(layers, x)
        z_ref, ld_ref = x, torch.zeros(5)
        for t in layers:
            z_ref, d = t(z_ref)
            ld_ref = ld_ref + d
    assert not z.requires_grad
    torch.testing.assert_close(z, z_ref, rtol=0, atol=0)
    torch.testing.assert_close(ld, ld_ref, rtol=0, atol=0)


def test_checkpoint_output_used_only_through_logdet():
    layers = [_randomize(AffineCoupling(4, hidden=8, parity=i % 2)).double() for i in range(2)]
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    _, ld = invertible_checkpoint(layers, x)
    (gx,) = torch.autograd.grad(ld.sum(), x)
    x2 = x.detach().requires_grad_(True)
    ld_ref = layers[0](x2)[1] + layers[1](layers[0](x2)[0])[1]
    (gx_ref,) = torch.autograd.grad(ld_ref.sum(), x2)
    torch.testing.assert_close(gx, gx_ref)


@pytest.mark.parametrize("steps", [1, 3])
def test_training_step_with_recompute_reduces_loss(steps):
    torch.manual_seed(0)
    model = Glow((1, 4, 4), levels=1, steps=steps, hidden=8, invertible_recompute=True)
    x = torch.rand(16, 1, 4, 4) * 0.2 + 0.4
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(20):
        loss = -model.log_prob(x).mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 1.0


def test_glow_step_recompute_runs_the_conditioner_once_and_matches_stored_gradients():
    from fastflow.nn.glow_step import GlowStep
    from fastflow.nn.recompute import invertible_checkpoint

    torch.manual_seed(0)
    steps = [GlowStep(4, hidden=8).double() for _ in range(3)]
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    for s in steps:
        s(x)  # data-dependent ActNorm init
        with torch.no_grad():
            for p in s.parameters():
                p.add_(0.1 * torch.randn_like(p))
    calls = []
    for s in steps:
        s.conditioner.register_forward_hook(lambda *a: calls.append(1))

    def grads(recompute):
        xl = x.clone().requires_grad_(True)
        if recompute:
            z, ld = invertible_checkpoint(steps, xl)
        else:
            z, ld = xl, torch.zeros(5, dtype=torch.float64)
            for s in steps:
                z, l = s(z)
                ld = ld + l
        loss = (z**2).sum() + ld.sum()
        ps = [p for s in steps for p in s.parameters()]
        return torch.autograd.grad(loss, [xl, *ps])

    ref = grads(False)
    calls.clear()
    got = grads(True)
    assert len(calls) == 2 * len(steps)  # forward once, backward once per step (not twice)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
