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


def _glow_net(hidden=8):
    torch.manual_seed(1)
    return [
        nn.Conv2d(3, hidden, 3, padding=1), nn.ReLU(), nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
        nn.Conv2d(hidden, 6, 3, padding=1),
    ]  # fmt: skip


def test_conv_weights_are_kept_channels_last_through_load_and_conversion(tmp_path):
    """The convolutions' weights are stored channels-last (the layout oneDNN reads), and stay so
    through load_state_dict from a plain Sequential, .double() and torch.save/load; the values and
    keys are the plain Sequential's, both ways."""
    cl_fmt = torch.channels_last
    plain = nn.Sequential(*_glow_net())
    cl = ChannelsLastSequential(*_glow_net())
    convs = [m for m in cl if isinstance(m, nn.Conv2d)]
    assert all(m.weight.is_contiguous(memory_format=cl_fmt) for m in convs)
    cl.load_state_dict(plain.state_dict())
    assert all(m.weight.is_contiguous(memory_format=cl_fmt) for m in convs)
    for a, b in zip(cl.state_dict().values(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    back = nn.Sequential(*_glow_net())
    torch.manual_seed(2)
    for p in cl.parameters():
        p.data.add_(torch.randn_like(p))
    back.load_state_dict(cl.state_dict())  # into the plain module: same values
    for a, b in zip(back.parameters(), cl.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    path = tmp_path / "cl.pt"
    torch.save(cl.state_dict(), path)
    again = ChannelsLastSequential(*_glow_net())
    again.load_state_dict(torch.load(path))
    for a, b in zip(again.parameters(), cl.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    cl.double()
    assert all(m.weight.is_contiguous(memory_format=cl_fmt) for m in convs)


def test_gradients_come_back_in_each_weights_layout():
    """Every parameter's .grad has its parameter's strides after a backward through the fused
    Glow conditioner (native path on fp32) and the module path: Adam's updates then need no copy,
    and the values equal the plain Sequential's gradients."""
    cl = ChannelsLastSequential(*_glow_net(hidden=16))
    plain = nn.Sequential(*_glow_net(hidden=16))
    x = torch.randn(2, 3, 12, 12)
    for net in (cl, plain):
        net(x).square().sum().backward()
    for (name, p), q in zip(cl.named_parameters(), plain.parameters()):
        assert p.grad.stride() == p.stride(), name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4)
