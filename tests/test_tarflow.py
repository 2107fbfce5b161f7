"""TarFlow: the transformer autoregressive block (log-det, causality, the three inverses), the
model (bits/dim, sampling methods, denoising, bad input) and the learned (BiFlow) inverse.

Tiny models; exactness is checked in fp64 against independent references (the fp64 autograd
Jacobian, the naive decoder, round trips).
"""

from __future__ import annotations

import math

import pytest
import torch

from fastflow.models.tarflow import (
    LearnedInverse,
    TarFlow,
    load_inverse,
    reconstruction_error,
    save_inverse,
    train_inverse,
)
from fastflow.nn.transformer import Patchify, TransformerAutoregressive

T, D = 7, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread handoffs on a loaded machine cost far more than the work
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Move every parameter away from the (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module.eval()


def _block(context_features=None, flip=False, depth=2) -> TransformerAutoregressive:
    torch.manual_seed(0)
    b = TransformerAutoregressive(
        T, D, width=16, depth=depth, heads=2, context_features=context_features, flip=flip
    )
    return _perturb(b.double())


def _inputs(n=3, context_features=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, D, generator=g, dtype=torch.float64)
    c = None
    if context_features:
        c = torch.randn(n, context_features, generator=g, dtype=torch.float64)
    return x, c


# -- the block ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx,flip", [(None, False), (2, True)])
def test_block_logdet_is_the_autograd_jacobian(ctx, flip):
    b = _block(ctx, flip)
    x, c = _inputs(2, ctx)
    _, ld = b(x, c)
    for i in range(x.shape[0]):
        ci = None if c is None else c[i : i + 1]

        def f(v, ci=ci):
            return b(v.reshape(1, T, D), ci)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(f, x[i].reshape(-1))
        # autoregressive: the Jacobian in the block's token order is triangular
        sign, logabs = torch.linalg.slogdet(jac)
        assert sign != 0
        assert torch.allclose(ld[i], logabs, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("flip", [False, True])
def test_block_is_causal(flip):
    b = _block(None, flip)
    x, _ = _inputs(2)
    z, _ = b(x)
    order = list(range(T))[::-1] if flip else list(range(T))
    for k in range(T - 1):
        later = order[k + 1 :]
        x2 = x.clone()
        x2[:, later] += torch.randn(2, len(later), D, dtype=torch.float64)
        z2, _ = b(x2)
        # output token t and every earlier one (in the block's order) are unchanged
        assert torch.equal(z2[:, order[: k + 1]], z[:, order[: k + 1]])
        assert not torch.allclose(z2[:, later], z[:, later])
    # the first token is passed through without a context
    assert torch.equal(z[:, order[0]], x[:, order[0]])


def test_block_first_token_depends_on_context_only():
    b = _block(2)
    x, c = _inputs(2, 2)
    z, _ = b(x, c)
    x2 = x.clone()
    x2[:, 1:] += 1.0
    assert torch.equal(b(x2, c)[0][:, 0], z[:, 0])
    assert not torch.allclose(b(x, c + 1.0)[0][:, 0], z[:, 0])


def test_new_block_is_the_identity():
    b = TransformerAutoregressive(T, D, width=8, depth=1, heads=2, context_features=2)
    x, c = torch.randn(2, T, D), torch.randn(2, 2)
    z, ld = b(x, c)
    assert torch.equal(z, x) and torch.equal(ld, torch.zeros(2))


@pytest.mark.parametrize("ctx,flip", [(None, False), (2, True)])
def test_exact_equals_naive_and_round_trips(ctx, flip):
    b = _block(ctx, flip)
    x, c = _inputs(3, ctx)
    z, ld = b(x, c)
    xn, ldn = b.inverse(z, c, method="naive")
    xe, lde = b.inverse(z, c, method="exact")
    assert torch.allclose(xe, xn, atol=1e-12, rtol=0)
    assert torch.allclose(lde, ldn, atol=1e-12, rtol=0)
    assert torch.allclose(xe, x, atol=1e-10, rtol=0)
    assert torch.allclose(lde, -ld, atol=1e-10, rtol=0)
    assert b.last_iterations == T - 1  # one pass per decoded token
    # and the other way round: forward(inverse(z0)) == z0
    z0 = torch.randn(3, T, D, dtype=torch.float64)
    x0, _ = b.inverse(z0, c, method="exact")
    assert torch.allclose(b(x0, c)[0], z0, atol=1e-10, rtol=0)


@pytest.mark.parametrize("chunk", [1, 3, 16])
def test_jacobi_converges_to_exact(chunk):
    b = _block(None, True)
    x, _ = _inputs(3)
    with torch.no_grad():
        z, _ = b(x)
        xe, lde = b.inverse(z, method="exact")
    # tol = 0 and a cap >= chunk: exact (each pass fixes at least one more token)
    xj, ldj = b.inverse(z, method="jacobi", chunk=chunk, tol=0.0, max_iter=max(chunk, 1))
    assert torch.allclose(xj, xe, atol=1e-12, rtol=0)
    assert torch.allclose(ldj, lde, atol=1e-12, rtol=0)
    # with a tolerance: within it (relative to the sequence), with the passes reported
    for tol in (1e-2, 1e-6):
        xj, _ = b.inverse(z, method="jacobi", chunk=chunk, tol=tol, max_iter=32)
        err = (xj - xe).flatten(1).norm(dim=1) / xe.flatten(1).norm(dim=1)
        assert err.max().item() <= 10 * tol
        assert 1 <= b.last_iterations <= 32 * math.ceil((T - 1) / chunk)
    # a cap below the chunk length stops early: fewer passes than the exact decoder needs
    b.inverse(z, method="jacobi", chunk=6, tol=0.0, max_iter=2)
    assert b.last_iterations == 2


def test_block_fp32_matches_fp64():
    b64 = _block(2)
    b32 = TransformerAutoregressive(T, D, width=16, depth=2, heads=2, context_features=2)
    b32.load_state_dict({k: v.float() for k, v in b64.state_dict().items()})
    x, c = _inputs(3, 2)
    z64, ld64 = b64(x, c)
    z32, ld32 = b32.eval()(x.float(), c.float())
    assert torch.allclose(z32.double(), z64, atol=1e-4) and torch.allclose(
        ld32.double(), ld64, atol=1e-3
    )
    x32, _ = b32.inverse(z32, c.float(), method="exact")
    assert torch.allclose(x32.double(), x, atol=1e-4)


def test_block_bad_input():
    b = _block(2)
    with pytest.raises(ValueError, match="x must have shape"):
        b(torch.randn(2, T + 1, D, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="is conditional"):
        b(torch.randn(2, T, D, dtype=torch.float64))
    with pytest.raises(ValueError, match="context must have shape"):
        b(torch.randn(2, T, D, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64))
    z, c = torch.randn(2, T, D, dtype=torch.float64), torch.randn(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="method"):
        b.inverse(z, c, method="fast")
    with pytest.raises(ValueError, match="tol"):
        b.inverse(z, c, method="jacobi", tol=-1.0)
    with pytest.raises(ValueError, match="divisible by heads"):
        TransformerAutoregressive(T, D, width=10, heads=4)
    with pytest.raises(ValueError, match="tokens"):
        TransformerAutoregressive(0, D)


def test_patchify_round_trip_and_layout():
    p = Patchify((2, 4, 6), 2)
    x = torch.randn(3, 2, 4, 6)
    z, ld = p(x)
    assert z.shape == (3, 6, 8) and torch.equal(ld, torch.zeros(3))
    # token (i, j) holds the (2, 2, 2) patch at rows 2i.., columns 2j..
    assert torch.equal(z[:, 1 * 3 + 2], x[:, :, 2:4, 4:6].reshape(3, -1))
    assert torch.equal(p.inverse(z)[0], x)
    with pytest.raises(ValueError, match="does not divide"):
        Patchify((1, 6, 6), 4)
    with pytest.raises(ValueError, match="x must have shape"):
        p(torch.randn(3, 2, 4, 4))


# -- the model ------------------------------------------------------------------------------------

IMG = (1, 8, 8)


def _model(num_classes=0, blocks=2, seed=0) -> TarFlow:
    torch.manual_seed(seed)
    m = TarFlow(IMG, patch_size=2, width=16, depth=1, blocks=blocks, heads=2, noise_std=0.1,
                num_classes=num_classes)  # fmt: skip
    return _perturb(m.double(), 0.2, seed)


def _images(n=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *IMG, generator=g, dtype=torch.float64) - 0.5


def test_model_methods_agree_and_round_trip():
    m = _model(num_classes=3)
    labels = torch.tensor([0, 2, 1])
    g = torch.Generator().manual_seed(5)
    z = torch.randn(3, 16, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        xn = m.decode(z, labels, "naive")
        xe = m.decode(z, labels, "exact")
        assert m.last_sample_info["iterations"] == [15, 15]
        xj = m.decode(z, labels, "jacobi", chunk=4, tol=0.0, max_iter=4)
        # the exact decoder inverts the density direction
        zz, _ = m(xe, labels)
    assert torch.allclose(xe, xn, atol=1e-12, rtol=0)
    assert torch.allclose(xj, xe, atol=1e-12, rtol=0)
    assert torch.allclose(zz, z, atol=1e-10, rtol=0)


def test_bits_per_dim_and_log_prob():
    m = _model()
    x = _images()
    lp = m.log_prob(x)
    z, ld = m(x)
    normal = -0.5 * (z**2).flatten(1).sum(1) - 0.5 * 64 * math.log(2 * math.pi)
    assert torch.allclose(lp, normal + ld, atol=1e-10)
    bpd = m.bits_per_dim(x, levels=17)
    assert torch.allclose(bpd, -lp / (64 * math.log(2)) + math.log2(17), atol=1e-12)


def test_denoise_is_the_score_step():
    # a new TarFlow is the identity: log p(x) is the standard normal, grad = -x
    m = TarFlow(IMG, patch_size=2, width=8, depth=1, blocks=2, heads=2, noise_std=0.3).double()
    x = _images()
    assert torch.allclose(m.denoise(x), x * (1 - 0.3**2), atol=1e-12)
    # a perturbed model: against a central finite difference of log p
    m = _model()
    d = m.denoise(x[:1]) - x[:1]
    e = torch.zeros_like(x[:1])
    e[0, 0, 3, 5] = 1e-6
    with torch.no_grad():
        fd = (m.log_prob(x[:1] + e) - m.log_prob(x[:1] - e)) / 2e-6
    assert torch.allclose(d[0, 0, 3, 5] / 0.1**2, fd[0], rtol=1e-5)


def test_sample_methods_shapes_and_labels():
    m = _model(num_classes=3)
    for method in ("naive", "exact", "jacobi"):
        torch.manual_seed(0)
        x = m.sample(2, labels=torch.tensor([1]), method=method, denoise=False)
        assert x.shape == (2, *IMG) and m.last_sample_info["method"] == method
    torch.manual_seed(0)
    a = m.sample(2, labels=torch.tensor([1, 1]), method="exact", denoise=False)
    # same noise: jacobi (default tol 1e-3, relative) is within its tolerance of exact
    assert ((a - x).norm() / a.norm()).item() < 1e-2
    assert m.sample((2, 3), labels=torch.tensor([0]), temperature=0.5).shape == (2, 3, *IMG)
    assert m.sample(labels=torch.tensor([0, 1, 2])).shape == (3, *IMG)


def test_model_bad_input():
    m = _model(num_classes=3)
    x = _images(2)
    with pytest.raises(ValueError, match="x must have shape"):
        m.log_prob(torch.rand(2, 1, 8, 4, dtype=torch.float64), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="does not divide"):
        TarFlow((1, 8, 8), patch_size=3, width=8, depth=1, blocks=1, heads=2)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        m.log_prob(x, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        m.sample(2, labels=torch.tensor([-1]))
    with pytest.raises(ValueError, match="class-conditional"):
        m.log_prob(x)
    with pytest.raises(ValueError, match="unconditional"):
        _model().log_prob(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="method must be one of"):
        m.sample(2, labels=torch.tensor([0]), method="fast")
    with pytest.raises(ValueError, match="needs a trained inverse"):
        m.sample(2, labels=torch.tensor([0]), method="learned")
    with pytest.raises(ValueError, match="noise_std"):
        TarFlow(IMG, patch_size=2, width=8, depth=1, blocks=1, heads=2, noise_std=-1.0)
    with pytest.raises(ValueError, match="image_shape"):
        TarFlow((8, 8), patch_size=2)


# -- the learned inverse --------------------------------------------------------------------------


def _digits_model_space(n=256):
    from fastflow.data import load_data

    ds = load_data("digits")
    g = torch.Generator().manual_seed(0)
    x = ds.x[:n].double()
    return ((x + torch.rand(x.shape, generator=g, dtype=torch.float64)) / ds.levels - 0.5).float()


def test_learned_inverse_learns_the_inverse(tmp_path):
    torch.manual_seed(0)
    m = TarFlow(IMG, patch_size=2, width=16, depth=1, blocks=2, heads=2, noise_std=0.05)
    _perturb(m, 0.1)
    data = _digits_model_space()
    test = data[-32:]
    inv0 = LearnedInverse.for_model(m)
    m.attach_inverse(inv0)
    before = reconstruction_error(m, test)
    inv, hist = train_inverse(m, data[:-32], steps=100, batch_size=32, lr=3e-3, inverse=inv0)
    after = reconstruction_error(m, test)
    assert after < 0.2 * before, (before, after)
    # and it reads the latent: well below the error of predicting the mean training image
    mean_only = (test - data[:-32].mean(0)).pow(2).mean().item()
    assert after < 0.5 * mean_only, (after, mean_only)
    assert hist[-1]["recon"] < hist[0]["recon"]
    assert m.sample(3, method="learned").shape == (3, *IMG)
    # the flow was frozen: its parameters have no gradients
    assert all(p.grad is None for p in m.parameters())
    # save / load
    path = str(tmp_path / "inverse.pt")
    save_inverse(inv, path)
    inv2 = load_inverse(path, TarFlow(IMG, patch_size=2, width=16, depth=1, blocks=2, heads=2))
    z = torch.randn(2, 16, 4)
    assert torch.equal(inv2(z), inv(z))
    with pytest.raises(ValueError, match="does not fit"):
        TarFlow(IMG, patch_size=2, width=16, depth=1, blocks=3, heads=2).attach_inverse(inv2)


def test_registry_and_training_with_noise(tmp_path):
    from fastflow.cli import main
    from fastflow.registry import build_model
    from fastflow.training import load_model

    flow = build_model("tarflow", (1, 8, 8), {"hidden": 8, "depth": 2})
    assert isinstance(flow, TarFlow) and flow.patch_size == 2 and len(flow.blocks) == 2
    out = str(tmp_path / "run")
    args = ["train", "--model", "tarflow", "--data", "digits", "--hidden", "8", "--depth", "1",
            "--epochs", "1", "--max-steps", "3", "--no-progress", "--no-plots",
            "--out", out]  # fmt: skip
    assert main(args) == 0
    ck = str(tmp_path / "run" / "best.pt")
    assert main(["train-inverse", ck, "--steps", "3", "--batch-size", "8"]) == 0
    flow, _, _ = load_model(ck)
    load_inverse(str(tmp_path / "run" / "inverse.pt"), flow)
    assert flow.sample(2, method="learned").shape == (2, 1, 8, 8)


def test_bench_smoke():
    """``fastflow bench --only tarflow`` at smoke sizes: runs end to end, rows of every method."""
    pytest.importorskip("sklearn")
    from fastflow.bench import BenchConfig
    from fastflow.bench.tarflow import run

    rows = run(BenchConfig(smoke=True, log=lambda s: None))
    decode = {r["impl"]: r for r in rows if r["metric"] == "decode"}
    assert set(decode) == {"naive", "exact", "jacobi", "learned"}
    assert decode["exact"]["iterations"] == 2 * 15  # two blocks of 16 tokens, one pass per token
    assert {r["impl"] for r in rows if r["metric"] == "test_bpd"} == {"TarFlow", "Glow"}
    assert all(math.isfinite(r["value"]) for r in rows)
