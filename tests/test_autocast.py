"""Every model trains under CPU autocast: the fused ops get one dtype (conditioner outputs are
cast to the data dtype) and results stay close to fp32."""

import pytest
import torch

from fastflow.models import IAF, MAF, NICE, Glow, RealNVP


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: Glow((1, 4, 4), levels=1, steps=2, hidden=8), (1, 4, 4)),
        (lambda: RealNVP((1, 4, 4), levels=1), (1, 4, 4)),
        (lambda: MAF(5, layers=2, hidden=(16,)), (5,)),
        (lambda: IAF(5, layers=2, hidden=(16,)), (5,)),
        (lambda: NICE(6, layers=2, hidden=8), (6,)),
    ],
)
def test_log_prob_and_gradients_under_bf16_autocast(make, shape):
    torch.manual_seed(0)
    model = make()
    x = torch.rand(6, *shape)
    model.train()
    with torch.no_grad():
        model.log_prob(x)  # data-dependent initialisation, outside autocast
    for p in model.parameters():  # move away from the identity initialisation
        p.data.add_(0.05 * torch.randn_like(p))
    ref = model.log_prob(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp = model.log_prob(x)
    assert lp.dtype == torch.float32 and torch.isfinite(lp).all()
    torch.testing.assert_close(lp, ref, rtol=0.05, atol=0.5 * x[0].numel() ** 0.5)
    (-lp.mean()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
