"""PiecewiseLinearMarginal: the per-element histogram density it defines (closed form), its
data-dependent init (by hand on a tiny batch), round trips at the ends of the interval, the
fp64 autograd Jacobian, errors, and the registry's / ``fastflow train``'s ``marginal`` option."""

from __future__ import annotations

import math

import pytest
import torch

from fastflow import Flow
from fastflow.distributions import StandardNormal
from fastflow.nn import PiecewiseLinearMarginal


def _layer(shape=(2, 3), bins=4, **kw):
    torch.manual_seed(0)
    layer = PiecewiseLinearMarginal(shape, bins=bins, data_init=False, **kw)
    with torch.no_grad():
        layer.logits.normal_()
    return layer


def test_density_is_the_histogram():
    # with a standard normal base the flow's density is p_ik * bins / (high - low) on bin k
    # (times the fixed squeeze 1 - 2 eps), whatever x is inside the bin
    layer = _layer(low=-1.0, high=3.0, eps=1e-4).double()
    flow = Flow(layer, StandardNormal((2, 3)))
    x = -1.0 + 4.0 * torch.rand(50, 2, 3, dtype=torch.float64)
    k = ((x + 1.0) / 4.0 * 4).floor().long()
    logp = torch.log_softmax(layer.logits.double(), -1)  # [2, 3, bins]
    want = torch.gather(logp.expand(50, -1, -1, -1), 3, k[..., None])[..., 0]
    want = want.sum((1, 2)) + 6 * (math.log(4 / 4.0) + math.log1p(-2e-4))
    assert torch.allclose(flow.log_prob(x), want, atol=1e-10)


def test_round_trip_jacobian_and_interval_ends():
    layer = _layer(bins=5, eps=1e-6).double()
    x = torch.rand(6, 2, 3, dtype=torch.float64) - 0.5
    x[0, 0, 0], x[1, 1, 2] = -0.5, 0.5  # the ends of the interval stay finite
    z, ld = layer(x)
    assert bool(torch.isfinite(z).all()) and bool(torch.isfinite(ld).all())
    x2, ld2 = layer.inverse(z)
    assert torch.allclose(x2, x, atol=1e-9) and torch.allclose(ld2, -ld, atol=1e-9)
    jac = torch.autograd.functional.jacobian(lambda v: layer(v)[0].sum(0), x[2:3])
    assert torch.allclose(ld[2], torch.logdet(jac.reshape(6, 6)), atol=1e-9)
    # any latent maps back into [low, high], extreme ones to the ends
    zs = torch.tensor([[[-30.0, -3.0, 0.0], [3.0, 30.0, -30.0]]], dtype=torch.float64)
    xs, _ = layer.inverse(zs)
    assert bool(((xs >= -0.5) & (xs <= 0.5)).all())


def test_data_init_by_hand():
    # 2 elements, 3 bins on [0, 3): element 0 sees bins 0, 0, 0, 1; element 1 sees 0, 2, 2, 2
    x = torch.tensor([[0.5, 0.5], [0.5, 2.5], [0.5, 2.5], [1.5, 2.5]])
    layer = PiecewiseLinearMarginal((2,), bins=3, low=0.0, high=3.0)
    layer(x)  # training mode: initialises
    assert layer._initialized and bool(layer.initialized)
    pooled = torch.tensor([4.0, 1.0, 3.0]) + 1e-3  # the mode: bin 0
    own = (torch.tensor([3.0, 1.0]) + pooled[0] / pooled.sum()) / 5.0
    rest = torch.tensor([0.0, pooled[1], pooled[2]]) / (pooled[1] + pooled[2])
    p = (1 - own)[:, None] * rest[None]
    p[:, 0] = own
    got = torch.softmax(layer.logits.double(), -1)
    assert torch.allclose(got, p.double(), atol=1e-6)
    assert torch.allclose(got.sum(1), torch.ones(2, dtype=torch.float64))
    # initialised once; eval mode and inverse never initialise; state_dict keeps the flag
    before = layer.logits.detach().clone()
    layer(x.flip(0) * 0 + 0.5)
    assert torch.equal(layer.logits, before)
    fresh = PiecewiseLinearMarginal((2,), bins=3, low=0.0, high=3.0)
    fresh.load_state_dict(layer.state_dict())
    assert fresh._initialized
    lazy = PiecewiseLinearMarginal((2,), bins=3, low=0.0, high=3.0).eval()
    lazy(x)
    assert not lazy._initialized


def test_errors():
    with pytest.raises(ValueError, match="bins"):
        PiecewiseLinearMarginal((2,), bins=0)
    with pytest.raises(ValueError, match="low < high"):
        PiecewiseLinearMarginal((2,), low=1.0, high=1.0)
    with pytest.raises(ValueError, match="eps"):
        PiecewiseLinearMarginal((2,), eps=0.5)
    with pytest.raises(ValueError, match="shape"):
        PiecewiseLinearMarginal((2, 0))
    layer = PiecewiseLinearMarginal((2,), bins=3)
    with pytest.raises(ValueError, match="outside"):
        layer(torch.tensor([[0.0, 0.7]]))
    with pytest.raises(ValueError, match="event shape"):
        layer(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        layer([[0.0, 0.0]])


def test_registry_option():
    from fastflow.registry import build_model

    flow = build_model("glow", (1, 4, 4), {"hidden": 4, "depth": 1, "scales": 1, "marginal": 8})
    assert isinstance(flow.transforms[0], PiecewiseLinearMarginal)
    assert flow.transforms[0].bins == 8
    plain = build_model("glow", (1, 4, 4), {"hidden": 4, "depth": 1, "scales": 1})
    assert not any(isinstance(m, PiecewiseLinearMarginal) for m in plain.modules())
    with pytest.raises(ValueError, match="--marginal"):
        build_model("realnvp", (2,), {"marginal": 8})
    with pytest.raises(ValueError, match="--marginal"):
        build_model("glow", (1, 4, 4), {"marginal": -1})


def test_data_defaults():
    from fastflow.training.config import TrainConfig, model_options, resolve_defaults

    cfg, picked = resolve_defaults(TrainConfig(data="mnist5k"))
    assert picked == {
        "epochs": 6,
        "batch_size": 32,
        "lr": 4e-3,
        "marginal": 256,
        "dequantization": "variational",
    }
    assert model_options(cfg)["marginal"] == 256
    # given options win; models without the option do not get it; other data: general defaults
    cfg, picked = resolve_defaults(
        TrainConfig(data="mnist5k", marginal=0, dequantization="uniform")
    )
    assert (cfg.marginal, cfg.dequantization, picked["epochs"]) == (0, "uniform", 6)
    assert "marginal" not in picked and "dequantization" not in picked
    cfg, picked = resolve_defaults(TrainConfig(data="mnist5k", model="realnvp"))
    assert cfg.marginal is None and "marginal" not in model_options(cfg) and picked == {}
    assert (cfg.epochs, cfg.dequantization) == (50, "uniform")  # measured for glow only
    cfg, picked = resolve_defaults(TrainConfig(data="digits"))
    assert (cfg.epochs, cfg.batch_size, cfg.lr) == (50, 64, 2e-3) and picked == {}
    assert (cfg.dequantization, cfg.marginal) == ("uniform", None)


def test_train_cli_with_marginal(tmp_path, capsys):
    from fastflow.cli import main
    from fastflow.training import load_model

    out = str(tmp_path / "run")
    argv = ["train", "--data", "digits", "--n-data", "96", "--marginal", "17", "--hidden", "4"]
    argv += ["--depth", "1", "--scales", "1", "--epochs", "1", "--batch-size", "32", "--out", out]
    assert main([*argv, "--no-progress", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "per-pixel histogram baseline: " in printed
    flow, pre, ck = load_model(f"{out}/best.pt")
    assert ck["model_options"]["marginal"] == 17
    assert (
        isinstance(flow.transforms[0], PiecewiseLinearMarginal) and flow.transforms[0]._initialized
    )
    assert (
        main(["train", "--data", "moons", "--model", "maf", "--marginal", "8", "--out", out + "2"])
        == 1
    )
    assert "--marginal is for the models glow" in capsys.readouterr().err


def test_resume_checks_resolved_defaults():
    from dataclasses import asdict

    from fastflow.training.config import TrainConfig, TrainError, check_resume, resolve_defaults

    new = {"config": asdict(resolve_defaults(TrainConfig(data="mnist5k"))[0])}
    new.update(state_dict={}, optimizer={})
    check_resume(TrainConfig(data="mnist5k"), new, "new.pt")  # the defaults resolve alike
    # a glow run on mnist5k from before --marginal existed: 50 epochs, batch 64, no marginal
    old = {k: v for k, v in new["config"].items() if k not in ("marginal", "dequantization")}
    old.update(epochs=50, batch_size=64, lr=2e-3)
    with pytest.raises(TrainError, match="--marginal 0 \\(checkpoint\\) vs 256"):
        check_resume(TrainConfig(data="mnist5k"), {**new, "config": old}, "old.pt")
    args = dict(epochs=50, batch_size=64, lr=2e-3, marginal=0, dequantization="uniform")
    check_resume(TrainConfig(data="mnist5k", **args), {**new, "config": old}, "old.pt")
