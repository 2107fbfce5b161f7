import pytest
import torch

from fastflow.nn.lulinear import LULinear


def test_round_trip_and_logdet_against_autograd_jacobian():
    torch.manual_seed(0)
    layer = LULinear(5).double()
    with torch.no_grad():
        layer.bias.normal_()
        layer.log_s.normal_(0, 0.3)
        layer.L.normal_(0, 0.3)
        layer.U.normal_(0, 0.3)
    x = torch.randn(4, 5, dtype=torch.float64)
    z, ld = layer(x)
    x2, ld2 = layer.inverse(z)
    torch.testing.assert_close(x2, x)
    torch.testing.assert_close(ld2, -ld)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v[None])[0][0], x[0])
    torch.testing.assert_close(ld, torch.linalg.slogdet(jac)[1].expand(4))
    # the map is affine: z = J x + b
    torch.testing.assert_close(z, x @ jac.T + layer.bias)


def test_gradients_reach_every_parameter_both_directions():
    layer = LULinear(4)
    for direction in (layer.forward, layer.inverse):
        layer.zero_grad()
        out, ld = direction(torch.randn(3, 4))
        (out.square().sum() + ld.sum()).backward()
        for name, p in layer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_state_dict_round_trip_and_no_bias():
    a, b = LULinear(3, bias=False), LULinear(3, bias=False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3)
    torch.testing.assert_close(a(x)[0], b(x)[0])
    assert a.bias is None


def test_bad_input():
    layer = LULinear(3)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        layer(torch.randn(2, 3, 2))
