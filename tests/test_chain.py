"""Runs of whole-layer kernel layers as one autograd node (fastflow.ops.chain): the same numbers
as layer by layer, and used only where every layer would take its kernel anyway."""

import pytest
import torch

import fastflow
from fastflow.models import MAF, RealNVP
from fastflow.ops import chain

pytestmark = pytest.mark.skipif(
    fastflow.info()["backend"] != "native", reason="needs the native CPU kernels"
)


@pytest.fixture
def calls(monkeypatch):
    n = [0]
    orig = chain.run

    def counted(*a):
        n[0] += 1
        return orig(*a)

    monkeypatch.setattr(chain, "run", counted)
    return n


def _flow(kind, d, dtype, permutation="reverse"):
    torch.manual_seed(0)
    if kind == "maf":
        f = MAF(d, layers=3, hidden=(12, 12), permutation=permutation)
    else:
        f = RealNVP(d, layers=3, hidden=12)
    with torch.no_grad():
        for p in f.parameters():
            p.normal_(0, 0.3)  # the last layers start at zero otherwise
    return f.to(dtype)


def _both_paths(f, x, monkeypatch):
    out = []
    for enabled in (True, False):
        monkeypatch.setattr(chain, "ENABLED", enabled)
        xi = x.clone().requires_grad_()
        lp = f.log_prob(xi)
        w = torch.linspace(-1, 2, lp.numel(), dtype=lp.dtype)  # a loss other than the sum
        grads = torch.autograd.grad((lp * w).sum(), [xi, *f.parameters()])
        out.append((lp.detach(), grads))
    return out


@pytest.mark.parametrize("kind", ["maf", "realnvp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [2, 5])
def test_chain_equals_layer_by_layer(kind, dtype, d, calls, monkeypatch):
    f = _flow(kind, d, dtype)
    x = torch.randn(17, d, dtype=dtype)
    (lp1, g1), (lp2, g2) = _both_paths(f, x, monkeypatch)
    assert calls[0] == 1  # the whole flow was one run
    torch.testing.assert_close(lp1, lp2, rtol=0, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["maf", "realnvp"])
def test_chain_gradcheck_fp64(kind, calls):
    f = _flow(kind, 3, torch.float64)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: f.log_prob(x), (x,))
    assert calls[0] > 0


def test_chain_backward_twice_with_retain_graph(calls):
    f = _flow("maf", 4, torch.float32)
    x = torch.randn(9, 4, requires_grad=True)
    lp = f.log_prob(x).sum()
    (g1,) = torch.autograd.grad(lp, x, retain_graph=True)
    (g2,) = torch.autograd.grad(lp, x)
    torch.testing.assert_close(g1, g2)
    assert calls[0] == 1


def test_no_chain_where_a_layer_would_not_take_its_kernel(calls):
    f = _flow("maf", 4, torch.float32)
    x = torch.randn(9, 4)
    with torch.no_grad():
        f.log_prob(x)  # nothing recorded: layer by layer
    fastflow.set_backend("reference")
    try:
        f.log_prob(x)
    finally:
        fastflow.set_backend("auto")
    g = _flow("maf", 4, torch.float32, permutation="random")  # permutations break the runs
    g.log_prob(x)
    assert calls[0] == 0


def test_a_hook_sees_every_layer(calls):
    f = _flow("realnvp", 4, torch.float32)
    seen = []
    layer = f.transforms[1]
    h = layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o[0].shape)))
    try:
        f.log_prob(torch.randn(5, 4)).sum().backward()
    finally:
        h.remove()
    assert seen == [(5, 4)]
    assert calls[0] == 0  # layers 0 | 1 (hooked) | 2: no run of two


def test_a_full_backward_hook_sees_its_layer(calls):
    f = _flow("maf", 4, torch.float32)
    seen = []
    layer = f.transforms[2]  # the second MADE layer (0: MADE, 1: Reverse, 2: MADE, ...)
    h = layer.register_full_backward_hook(lambda m, gin, gout: seen.append(len(gout)))
    try:
        f.log_prob(torch.randn(5, 4)).sum().backward()
    finally:
        h.remove()
    assert seen == [2]  # (grad of u, grad of logdet)
    assert calls[0] == 0  # MADE | Reverse | MADE (hooked) | Reverse | MADE: no run of two
