"""Multi-process training: 2 CPU processes (gloo on localhost) end with identical parameters."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, data: str, out: str, result_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    from fastflow.training import TrainConfig, train

    cfg = TrainConfig(
        data=data,
        model="glow",
        hidden=8,
        depth=1,
        scales=2,
        epochs=2,
        max_steps=4,
        batch_size=8,
        warmup=2,
        out=out,
        progress=False,
        plots=False,
        device="cpu",
    )
    r = train(cfg)
    torch.save(
        {
            "state": r["flow"].state_dict(),
            "history": r["history"],
            "test_bpd": r["test_bpd"],
            "steps": r["steps"],
        },
        os.path.join(result_dir, f"rank{rank}.pt"),
    )


@pytest.fixture
def images(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 60, (80, 1, 4, 4))
    x[np.arange(80), 0, rng.integers(0, 4, 80)] = 230
    p = tmp_path / "img.npy"
    np.save(p, x.astype(np.uint8))
    return str(p)


def test_two_processes_identical_parameters(tmp_path, images):
    out = str(tmp_path / "run")
    mp.spawn(_worker, args=(2, _free_port(), images, out, str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["steps"] == r1["steps"] == 4
    s0, s1 = r0["state"], r1["state"]
    assert s0.keys() == s1.keys()
    for k in s0:
        assert torch.equal(s0[k], s1[k]), k
    # ActNorm layers were data-initialised (not the identity) and agree across ranks
    inits = [k for k in s0 if k.endswith("bias") and "transforms" in k and s0[k].dim() == 1]
    assert any(s0[k].abs().max() > 0 for k in inits)
    # metrics are averaged over ranks: both ranks report the same numbers
    for a, b in zip(r0["history"], r1["history"], strict=True):
        for key in ("train_bpd", "val_bpd", "train_nll", "val_nll", "step"):
            assert a[key] == b[key], key
    assert r0["test_bpd"] == r1["test_bpd"]
    # only rank 0 wrote, and what it wrote are the trained parameters
    last = torch.load(os.path.join(out, "last.pt"), weights_only=True)["state_dict"]
    for k in s0:
        assert torch.equal(last[k], s0[k]), k
    assert sorted(f for f in os.listdir(out) if not f.startswith(".")) == [
        "best.pt",
        "config.json",
        "last.pt",
        "metrics.jsonl",
    ]


def test_torchrun_cli(tmp_path, images):
    out = str(tmp_path / "tr")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "fastflow", "train", "--data", images, "--model", "glow", "--hidden", "4"]
    cmd += ["--depth", "1", "--scales", "1", "--max-steps", "2", "--batch-size", "8"]
    cmd += ["--out", out, "--no-progress", "--no-plots"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    # on failure show the ranks' own error lines, not only torchrun's summary at the end
    causes = [ln for ln in p.stderr.splitlines() if "rror" in ln or "terminate" in ln]
    assert p.returncode == 0, "\n".join(causes[:20]) + "\n...\n" + p.stderr[-1500:]
    assert p.stdout.count("test bits/dim") == 1  # only rank 0 prints the summary
    assert "2 processes" in p.stdout
    assert os.path.exists(os.path.join(out, "last.pt"))
