"""ChannelsLastSequential: same function and gradients as the plain Sequential, NCHW in and out."""

import torch
from torch import nn

from fastflow.nn import ChannelsLastSequential, GlowConditioner, conv_subnet


def _pair(seed=0):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU()]
    layers.append(nn.Conv2d(8, 5, 3, padding=1))
    plain = nn.Sequential(*layers).double()
    cl = ChannelsLastSequential(*[m for m in plain])  # the same parameter objects
    return plain, cl


def test_matches_plain_sequential_forward_and_backward():
    plain, cl = _pair()
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    y0 = plain(x)
    gx0, *gp0 = torch.autograd.grad(y0, [x, *plain.parameters()], g)
    y1 = cl(x)
    assert y1.is_contiguous() and y1.shape == y0.shape
    gx1, *gp1 = torch.autograd.grad(y1, [x, *cl.parameters()], g)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-12, atol=1e-12)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_same_state_dict_keys_and_passthrough_for_other_ranks():
    plain, cl = _pair()
    assert list(cl.state_dict()) == list(plain.state_dict())
    lin = ChannelsLastSequential(nn.Linear(3, 2))
    x = torch.randn(5, 3)
    torch.testing.assert_close(lin(x), lin[0](x))


def test_conv_subnet_and_glow_conditioner_use_it():
    assert isinstance(conv_subnet(4)(2, 4), ChannelsLastSequential)
    assert isinstance(GlowConditioner(2, 2, hidden=4).net, ChannelsLastSequential)
    assert type(GlowConditioner(2, 2, hidden=4, channels_last=False).net) is nn.Sequential
