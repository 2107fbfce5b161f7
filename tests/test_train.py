"""Training loop, checkpoints, resume, fault handling, evaluation maths."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from fastflow.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastflow.images import bits_per_dim
from fastflow.registry import MODELS, build_model, model_input_shape
from fastflow.training import (
    Preprocess,
    TrainConfig,
    TrainError,
    auroc,
    load_model,
    log_likelihood,
    train,
    typicality_scores,
)


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(
        data="moons",
        model="realnvp",
        hidden=8,
        depth=2,
        n_data=300,
        epochs=1,
        batch_size=32,
        out=str(tmp_path / "run"),
        progress=False,
        plots=False,
        warmup=3,
        schedule="constant",
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def image_npy(tmp_path):
    rng = np.random.default_rng(0)
    # structured 4x4 images (a bright bar at a random row) so the flow has something to learn
    x = rng.integers(0, 40, (96, 1, 4, 4))
    rows = rng.integers(0, 4, 96)
    x[np.arange(96), 0, rows] = 220
    p = tmp_path / "img.npy"
    np.save(p, x.astype(np.uint8))
    return str(p)


# -- maths against independent references --------------------------------------------------------


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    neg = rng.integers(0, 6, 37).astype(float)
    pos = rng.integers(2, 9, 23).astype(float)
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(neg, pos) == pytest.approx(brute, abs=1e-12)
    assert auroc(pos * 0, pos * 0) == 0.5
    with pytest.raises(ValueError):
        auroc(np.array([]), pos)


def test_typicality_scores():
    nll = np.array([1.0, 3.0, 5.0, 7.0])
    s = typicality_scores(nll, 4.0, batch=4, trials=3, seed=0)
    assert np.allclose(s, 0.0)  # the whole set's mean is the reference
    s = typicality_scores(nll, 0.0, batch=1, trials=200, seed=0)
    assert set(np.round(s, 6)) <= {1.0, 3.0, 5.0, 7.0}


def test_identity_flow_likelihoods():
    # NICE starts as the identity (zero-initialised conditioners, zero log-scales): the data
    # log-likelihood must be that of a Gaussian with the standardisation's mean/std
    flow = build_model("nice", (3,), {"hidden": 8, "depth": 2}).double()
    mean, std = [1.0, -2.0, 0.5], [2.0, 0.5, 1.5]
    pre = Preprocess("vector", (3,), (3,), mean=mean, std=std)
    x = torch.randn(11, 3, dtype=torch.float64) * 3
    ll = log_likelihood(flow, pre, x, dtype=torch.float64)
    ref = torch.distributions.Normal(torch.tensor(mean), torch.tensor(std)).log_prob(x).sum(1)
    assert torch.allclose(ll, ref, atol=1e-6)
    # images: bits/dim of the data bound equals fastflow.images.bits_per_dim for 8 bits
    pre = Preprocess("image", (1, 2, 2), (4,), levels=256)
    k = torch.randint(0, 256, (5, 1, 2, 2))
    ll = log_likelihood(build_model("nice", (1, 2, 2), {"hidden": 4, "depth": 2}), pre, k)
    assert torch.allclose(pre.bpd(ll), bits_per_dim(ll - pre.offset, (1, 2, 2), bits=8))
    assert pre.offset == pytest.approx(-4 * math.log(256))


def test_registry_entries():
    assert {"glow", "realnvp", "nice", "maf", "iaf"} <= set(MODELS)
    assert model_input_shape("nice", (1, 4, 4)) == (16,)
    with pytest.raises(ValueError, match="needs image"):
        model_input_shape("glow", (2,))
    for name in ("realnvp", "nice"):
        f = build_model(name, (4,), {"hidden": 8, "depth": 2})
        assert f.log_prob(torch.randn(3, 4)).shape == (3,)
    f = build_model("glow", (1, 4, 4), {"hidden": 8, "depth": 1, "scales": 2})
    assert f.log_prob(torch.rand(3, 1, 4, 4)).shape == (3,)
    if MODELS["maf"].available() is None:
        f = build_model("maf", (3,), {"hidden": 8, "depth": 2})
        assert f.log_prob(torch.randn(2, 3)).shape == (2,)


# -- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_atomic_and_errors(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"w": torch.arange(5.0), "step": 2}, p)
    save_checkpoint({"w": torch.arange(6.0), "step": 3}, p)  # overwrite in place
    ck = load_checkpoint(p)
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.arange(6.0))
    assert sorted(os.listdir(tmp_path)) == ["c.pt"]  # no temp files left behind
    data = p.read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "t.pt")
    torch.save({"step": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a fastflow checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_train_writes_outputs_and_learns(tmp_path):
    r = train(_cfg(tmp_path, epochs=3, plots=True, n_data=600, hidden=16))
    out = r["out"]
    for f in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "samples.png", "loss.png"):
        assert os.path.exists(os.path.join(out, f)), f
    h = r["history"]
    assert len(h) == 3 and h[-1]["val_bpd"] < h[0]["val_bpd"]
    assert math.isfinite(r["test_bpd"])
    flow, pre, ck = load_model(os.path.join(out, "best.pt"))
    assert ck["model_name"] == "realnvp" and pre.kind == "vector"


def _final_params(out):
    return load_checkpoint(os.path.join(out, "last.pt"))["state_dict"]


def test_resume_matches_uninterrupted_run(tmp_path, image_npy):
    # Glow (ActNorm data init, LU 1x1 convs, Adam state) on images: 2 epochs straight vs a run
    # stopped mid-epoch-1 and one resumed after the first epoch, both continued to 2 epochs
    kw = dict(data=image_npy, model="glow", hidden=8, depth=1, scales=2, batch_size=16, epochs=2)
    a = train(_cfg(tmp_path, out=str(tmp_path / "a"), **kw))
    train(_cfg(tmp_path, out=str(tmp_path / "b"), max_steps=3, save_every=2, **kw))
    b = train(_cfg(tmp_path, out=str(tmp_path / "b"), resume="auto", **kw))
    train(_cfg(tmp_path, out=str(tmp_path / "c"), **{**kw, "epochs": 1}))
    c = train(_cfg(tmp_path, out=str(tmp_path / "c"), resume="auto", **kw))
    pa, pb, pc = (_final_params(r["out"]) for r in (a, b, c))
    assert pa.keys() == pb.keys() == pc.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
        assert torch.equal(pa[k], pc[k]), k
    assert a["steps"] == b["steps"] == c["steps"]
    assert len(b["history"]) == 2  # the resumed run did the rest of epoch 1 and epoch 2


def test_resume_incompatible_and_missing(tmp_path):
    train(_cfg(tmp_path))
    with pytest.raises(TrainError, match="incompatible --resume options: --model"):
        train(_cfg(tmp_path, model="nice", resume="auto"))
    with pytest.raises(TrainError, match="--hidden 8"):
        train(_cfg(tmp_path, hidden=9, resume="auto"))
    # a cosine schedule's length is part of the run: changing --epochs on resume is refused
    train(_cfg(tmp_path, out=str(tmp_path / "cos"), schedule="cosine"))
    with pytest.raises(TrainError, match="--epochs 1 vs 2"):
        train(_cfg(tmp_path, out=str(tmp_path / "cos"), schedule="cosine", epochs=2, resume="auto"))
    with pytest.raises(CheckpointError, match="no checkpoint to resume"):
        train(_cfg(tmp_path, out=str(tmp_path / "empty"), resume="auto"))


def test_nonfinite_loss_stops_or_skips(tmp_path):
    with pytest.raises(
        TrainError, match=r"non-finite loss at step 12 .*last good checkpoint: .*last\.pt"
    ):
        train(_cfg(tmp_path, epochs=2, inject_nan_at=12))
    r = train(_cfg(tmp_path, out=str(tmp_path / "s"), inject_nan_at=2, skip_nonfinite=True))
    assert r["skipped_batches"] == 1 and math.isfinite(r["test_bpd"])
    for v in r["flow"].state_dict().values():
        if v.is_floating_point():
            assert torch.isfinite(v).all()


def test_bad_options(tmp_path):
    with pytest.raises(ValueError, match="--batch-size"):
        train(_cfg(tmp_path, batch_size=0))
    with pytest.raises(ValueError, match="needs image"):
        train(_cfg(tmp_path, model="glow"))


# -- the user's files (issue 11) -----------------------------------------------------------------


def test_checkpoint_permissions_follow_umask(tmp_path):
    for mask in (0o022, 0o077, 0o002):
        old = os.umask(mask)
        try:
            p = tmp_path / f"c{mask:o}.pt"
            save_checkpoint({"step": 1}, p)
            save_checkpoint({"step": 2}, p)  # replacing keeps the umask's mode too
            q = tmp_path / f"plain{mask:o}.txt"
            q.write_text("x")
        finally:
            os.umask(old)
        assert os.stat(p).st_mode & 0o777 == 0o666 & ~mask == os.stat(q).st_mode & 0o777
        assert load_checkpoint(p)["step"] == 2


def test_remove_stale_temporaries(tmp_path):
    from fastflow.checkpoint import remove_stale_temporaries

    stale = [".tmp-abcd1234.pt", ".tmp-x_y9zz0q.pt"]  # save_checkpoint's and mkstemp's names
    keep = [".tmp-abc.pt", "a.tmp-abcd1234.pt", ".tmp-abcd1234.pt.bak", ".tmp-ABCD1234.pt"]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".tmp-abcd1234.pt").write_bytes(b"")
    (tmp_path / ".tmp-dir00000.pt").mkdir()  # not a regular file
    assert remove_stale_temporaries(tmp_path) == sorted(stale)
    assert sorted(os.listdir(tmp_path)) == sorted(keep + ["sub", ".tmp-dir00000.pt"])
    assert os.listdir(tmp_path / "sub") == [".tmp-abcd1234.pt"]
    assert remove_stale_temporaries(tmp_path / "missing") == []


def _snapshot(out):
    return {f: open(os.path.join(out, f), "rb").read() for f in sorted(os.listdir(out))}


def test_resume_refuses_optimiser_changes(tmp_path):
    out = tmp_path / "run"
    train(_cfg(tmp_path))
    before = _snapshot(str(out))
    changes = {"lr": 0.5, "warmup": 7, "clip_grad": 1.0, "weight_decay": 0.1}
    for key, value in changes.items():
        flag = "--" + key.replace("_", "-")
        with pytest.raises(TrainError, match=f"incompatible --resume options: {flag} "):
            train(_cfg(tmp_path, resume="auto", epochs=2, **{key: value}))
    assert _snapshot(str(out)) == before  # config.json and metrics.jsonl untouched
    r = train(_cfg(tmp_path, resume="auto", epochs=2))  # the same options resume
    assert len(r["history"]) == 1 and r["history"][0]["epoch"] == 2


def test_fresh_run_over_a_finished_run_is_refused(tmp_path):
    r = train(_cfg(tmp_path))
    before = _snapshot(r["out"])
    assert {"best.pt", "last.pt", "config.json", "metrics.jsonl"} <= before.keys()
    with pytest.raises(TrainError, match=r"already holds a training run: pass --resume to "):
        train(_cfg(tmp_path, epochs=2))
    assert _snapshot(r["out"]) == before  # nothing rewritten
    # a folder with only the config of a run killed before its first checkpoint: refused too
    os.makedirs(tmp_path / "killed")
    (tmp_path / "killed" / "config.json").write_text("{}")
    with pytest.raises(TrainError, match="--overwrite to start over, or a new --out"):
        train(_cfg(tmp_path, out=str(tmp_path / "killed")))
    # other files do not make a folder a run
    os.makedirs(tmp_path / "mine")
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    train(_cfg(tmp_path, out=str(tmp_path / "mine")))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_overwrite_starts_over(tmp_path):
    out = tmp_path / "run"
    train(_cfg(tmp_path, plots=True))
    (out / "notes.txt").write_text("keep")
    old = load_checkpoint(out / "last.pt")
    r = train(_cfg(tmp_path, overwrite=True, seed=1, plots=False, epochs=2))
    assert r["steps"] == 2 * old["step"]
    new = load_checkpoint(out / "last.pt")
    assert new["config"]["seed"] == 1 and new["epoch"] == 2
    recs = (out / "metrics.jsonl").read_text().splitlines()
    assert len(recs) == 3  # 2 epochs + test: the old run's lines are gone
    # the old run's plots are deleted (this run writes none); files of the user's stay
    assert not (out / "samples.png").exists() and not (out / "loss.png").exists()
    assert (out / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="--resume continues a run and --overwrite starts over"):
        train(_cfg(tmp_path, overwrite=True, resume="auto"))


def test_train_cleans_stale_temporaries_and_files_share_a_mode(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".tmp-k1ll3d00.pt").write_bytes(b"")  # a save killed before the first write
    (out / "sub").mkdir()
    (out / "sub" / ".tmp-k1ll3d00.pt").write_bytes(b"")
    old = os.umask(0o022)
    try:
        train(_cfg(tmp_path))
        assert not (out / ".tmp-k1ll3d00.pt").exists()
        assert (out / "sub" / ".tmp-k1ll3d00.pt").exists()  # only the run folder itself
        files = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
        modes = {f: os.stat(out / f).st_mode & 0o777 for f in files}
        assert set(modes.values()) == {0o644}, modes
        (out / ".tmp-k1ll3d01.pt").write_bytes(b"")  # killed during a later save
        train(_cfg(tmp_path, resume="auto", epochs=2))
        assert not any(f.startswith(".tmp-") for f in os.listdir(out))
    finally:
        os.umask(old)


def test_fastflow_train_module_reexports_fastflow_training():
    # fastflow.train is the backward-compatible name of the fastflow.training package
    import fastflow.train as old
    import fastflow.training as new

    extra = [
        "LN2",
        "config_from_args",
        "evaluate_checkpoint",
        "save_samples_png",
        "typicality_scores",
    ]
    for name in [*old.__all__, *extra]:
        assert getattr(old, name) is getattr(new, name), name
