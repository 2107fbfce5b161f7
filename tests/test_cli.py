"""The ``fastflow`` command: train / sample / evaluate end to end, and one-line user errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fastflow.cli import main

TINY = ["--model", "realnvp", "--hidden", "8", "--depth", "2", "--no-progress", "--warmup", "2"]
TINY += ["--schedule", "constant"]


def _train(tmp_path, *extra, name="run"):
    out = str(tmp_path / name)
    args = ["train", "--data", "moons", "--n-data", "400", "--epochs", "2", "--out", out]
    assert main(args + TINY + list(extra)) == 0
    return out


def _err(capsys, argv) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_info_and_demo(capsys):
    assert main(["info"]) == 0
    assert main(["demo", "--batch", "2"]) == 0
    assert "affine coupling" in capsys.readouterr().out


def test_train_sample_evaluate(tmp_path, capsys):
    out = _train(tmp_path)
    printed = capsys.readouterr().out
    assert "test bits/dim" in printed and "epoch 2/2" in printed
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model"] == "realnvp" and cfg["data"] == "moons"
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("epoch") for r in recs[:2]] == [1, 2]
    for key in ("train_nll", "train_bpd", "val_nll", "val_bpd", "samples_per_s"):
        assert np.isfinite(recs[0][key])
    assert recs[-1]["split"] == "test"
    for f in ("samples.png", "loss.png", "best.pt", "last.pt"):
        assert os.path.getsize(os.path.join(out, f)) > 0

    ck = os.path.join(out, "best.pt")
    png, npy = str(tmp_path / "s.png"), str(tmp_path / "s.npy")
    assert (
        main(["sample", ck, "--n", "50", "--temperature", "0.5", "--out", png, "--npy", npy]) == 0
    )
    arr = np.load(npy)
    assert arr.shape == (50, 2) and os.path.getsize(png) > 0
    # temperature 0 maps the base's mode: every sample is the same point
    assert main(["sample", ck, "--n", "3", "--temperature", "0", "--npy", npy]) == 0
    a0 = np.load(npy)
    assert np.allclose(a0, a0[:1])

    js = str(tmp_path / "e.json")
    assert main(["evaluate", ck, "--ood", "noise", "--json", js, "--ood-trials", "50"]) == 0
    text = capsys.readouterr().out
    assert "bits/dim" in text and "invertibility" in text and "AUROC by likelihood" in text
    r = json.load(open(js))
    assert 0 <= r["auroc_likelihood"] <= 1 and 0 <= r["auroc_typicality"] <= 1
    assert r["invertibility"] and r["invertibility"][0]["max_error"] < 1e-4
    # the test NLL evaluate reports equals the one training logged (same split, same noise seed)
    assert r["bpd"] == pytest.approx(recs[-1]["test_bpd"], rel=1e-6)


def test_image_sample_npy_levels(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "im.npy", rng.integers(0, 256, (40, 4, 4), dtype=np.uint8))
    out = str(tmp_path / "g")
    argv = ["train", "--data", str(tmp_path / "im.npy"), "--model", "glow", "--hidden", "4"]
    argv += ["--depth", "1", "--scales", "1", "--epochs", "1", "--out", out, "--no-progress"]
    assert main(argv) == 0
    npy = str(tmp_path / "s.npy")
    assert main(["sample", os.path.join(out, "last.pt"), "--n", "5", "--npy", npy]) == 0
    s = np.load(npy)
    assert s.shape == (5, 1, 4, 4) and s.dtype == np.uint8


def test_user_errors_are_one_line(tmp_path, capsys):
    assert "data file not found" in _err(capsys, ["train", "--data", "/nope/x.npy"])
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2\n3\n")
    assert "row 2 has 1 columns" in _err(capsys, ["train", "--data", str(bad), *TINY])
    assert "needs image data" in _err(capsys, ["train", "--data", "moons", "--model", "glow"])

    out = _train(tmp_path)
    capsys.readouterr()
    ck = os.path.join(out, "last.pt")
    # truncated checkpoint
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(open(ck, "rb").read()[:1000])
    assert "truncated or corrupt" in _err(capsys, ["evaluate", str(trunc)])
    assert "truncated or corrupt" in _err(capsys, ["sample", str(trunc)])
    # a checkpoint whose weights belong to another model
    obj = torch.load(ck, weights_only=True)
    obj["model_name"] = "nice"
    other = tmp_path / "other.pt"
    torch.save(obj, other)
    assert "weights do not fit model 'nice'" in _err(capsys, ["evaluate", str(other)])
    # resume with other options
    argv = ["train", "--data", "moons", "--n-data", "400", "--out", out, "--resume", *TINY]
    msg = _err(capsys, [*argv, "--batch-size", "32"])
    assert "incompatible --resume options: --batch-size 64 (checkpoint) vs 32 (now)" in msg
    # NaN loss names the step and the last good checkpoint
    msg = _err(capsys, [*argv, "--epochs", "3", "--inject-nan-at", "12"])
    assert "non-finite loss at step 12" in msg and "last.pt" in msg


def test_subprocess_no_traceback(tmp_path):
    env = dict(os.environ)
    p = subprocess.run(
        [sys.executable, "-m", "fastflow", "evaluate", str(tmp_path / "missing.pt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 1
    assert p.stderr.strip().startswith("fastflow evaluate: error: checkpoint not found")
    assert "Traceback" not in p.stderr


def test_resume_after_sigkill_matches_straight_run(tmp_path):
    # a real kill (SIGKILL, no cleanup) mid-run: last.pt is intact (atomic writes) and --resume
    # reaches exactly the parameters of an uninterrupted run
    import signal
    import time

    from fastflow.training import TrainConfig, train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (240, 1, 4, 4))
    x[np.arange(240), 0, rng.integers(0, 4, 240)] = 230
    data = str(tmp_path / "img.npy")
    np.save(data, x.astype(np.uint8))
    opts = dict(data=data, model="glow", hidden=8, depth=2, scales=2, epochs=2, batch_size=16)
    straight = train(TrainConfig(**opts, out=str(tmp_path / "a"), progress=False, plots=False))

    out = str(tmp_path / "b")
    argv = ["--data", data, "--model", "glow", "--hidden", "8", "--depth", "2", "--scales", "2"]
    argv += ["--epochs", "2", "--batch-size", "16", "--out", out, "--no-progress", "--no-plots"]
    env = dict(os.environ)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastflow", "train", *argv, "--save-every", "1"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = os.path.join(out, "last.pt")
    deadline = time.time() + 60
    while not os.path.exists(last) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step = torch.load(last, weights_only=True)["step"]
    assert 0 < step < straight["steps"], (step, straight["steps"])
    assert main(["train", *argv, "--resume"]) == 0
    a = straight["flow"].state_dict()
    b = torch.load(last, weights_only=True)["state_dict"]
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- the user's files (issue 11) -----------------------------------------------------------------


class _NotAFlow:
    """Something a foreign .pt file pickles."""


def test_foreign_pickle_is_one_clear_line(tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save({"a": _NotAFlow()}, plain)  # fails torch.load(weights_only=True)
    raw = tmp_path / "raw.pt"
    with open(raw, "wb") as f:
        pickle.dump({"a": _NotAFlow()}, f, protocol=4)  # not torch.save's; torch warns on it
    text = tmp_path / "text.pt"
    text.write_text("hello\n")
    for path, why in (
        (plain, "_NotAFlow object; fastflow reads only tensors and plain data)"),
        (raw, "(not a file written by torch.save)"),
        (text, "(not a file written by torch.save)"),
    ):
        for cmd in ("evaluate", "sample"):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                msg = _err(capsys, [cmd, str(path)])
            assert not caught, [str(w.message) for w in caught]
            assert msg.startswith(f"fastflow {cmd}: error: {path} is not a fastflow checkpoint (")
            assert msg.endswith(why) and "Weights only" not in msg, msg
    assert not os.path.exists(tmp_path / "samples_t1.png")


def test_foreign_pickle_subprocess_no_warning(tmp_path):
    raw = tmp_path / "raw.pt"
    with open(raw, "wb") as f:
        pickle.dump({"a": [1, 2]}, f, protocol=4)
    p = subprocess.run(
        [sys.executable, "-m", "fastflow", "evaluate", str(raw)], capture_output=True, text=True
    )
    assert p.returncode == 1
    assert p.stderr.splitlines() == [
        f"fastflow evaluate: error: {raw} is not a fastflow checkpoint (not a file written by "
        "torch.save)"
    ]


def test_resume_with_other_lr_is_refused(tmp_path, capsys):
    out = _train(tmp_path, "--no-plots")
    config = open(os.path.join(out, "config.json")).read()
    capsys.readouterr()
    argv = ["train", "--data", "moons", "--n-data", "400", "--epochs", "3", "--out", out, *TINY]
    argv += ["--resume", "--no-plots"]
    msg = _err(capsys, argv + ["--lr", "0.5"])
    assert "incompatible --resume options: --lr 0.002 (checkpoint) vs 0.5 (now)" in msg
    assert "--weight-decay 0.0 (checkpoint) vs 0.1 (now)" in _err(
        capsys, argv + ["--weight-decay", "0.1"]
    )
    assert "--clip-grad 50.0 (checkpoint) vs 0.0 (now)" in _err(capsys, argv + ["--clip-grad", "0"])
    assert "--warmup 2 (checkpoint) vs 5 (now)" in _err(capsys, argv + ["--warmup", "5"])
    assert open(os.path.join(out, "config.json")).read() == config


def test_train_over_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = _train(tmp_path, "--no-plots")
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)}
    capsys.readouterr()
    argv = ["train", "--data", "moons", "--n-data", "400", "--epochs", "1", "--out", out, *TINY]
    msg = _err(capsys, argv + ["--no-plots"])
    assert f"{out} already holds a training run" in msg
    assert "--resume to continue it, --overwrite to start over, or a new --out" in msg
    assert {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} == before
    assert main(argv + ["--no-plots", "--overwrite"]) == 0
    recs = [json.loads(ln) for ln in open(os.path.join(out, "metrics.jsonl"))]
    assert [r.get("epoch") for r in recs] == [1, None]  # the new run's epoch and test line
    assert json.load(open(os.path.join(out, "config.json")))["epochs"] == 1
    assert "--resume continues a run and --overwrite" in _err(
        capsys, argv + ["--overwrite", "--resume"]
    )


def test_help_documents_overwrite(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--overwrite start over in an OUT that holds a run" in text
    assert "--lr, --warmup, --clip-grad, --weight-decay" in text
