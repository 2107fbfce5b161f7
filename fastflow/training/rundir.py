"""The output folder of a run, which belongs to that run: refusing a fresh run over another
run's files, ``--overwrite`` (deleting exactly the files a run writes), clearing a killed
save's temporaries, ``config.json``, and ``metrics.jsonl`` (cut back to the resumed
checkpoint's records on ``--resume``, one JSON record per line). Rank 0 does the writing.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict

import torch

from fastflow.checkpoint import remove_stale_temporaries
from fastflow.training.config import TrainConfig, TrainError
from fastflow.training.distributed import any_rank, dist_info

# what makes a folder hold a run (a fresh run there is refused without --overwrite) ...
RUN_STATE = ("config.json", "metrics.jsonl", "last.pt", "best.pt")
# ... and every file a run writes there (--overwrite deletes these, and only these)
RUN_FILES = (*RUN_STATE, "samples.png", "loss.png")


def refuse_other_run(cfg: TrainConfig, out: str, device: torch.device) -> None:
    """A fresh run (no ``--resume``, no ``--overwrite``) does not write over another run's files."""
    taken = False
    if dist_info()[0] == 0 and cfg.resume is None and not cfg.overwrite:
        taken = any(os.path.lexists(os.path.join(out, f)) for f in RUN_STATE)
    if any_rank(taken, device):  # rank 0 looked (it writes the files); all ranks stop
        raise TrainError(
            f"{out} already holds a training run: pass --resume to continue it, --overwrite to "
            "start over, or a new --out"
        )


def _clear_out_dir(cfg: TrainConfig, out: str) -> None:
    """Before the first write: with ``--overwrite`` delete the old run's files; always delete the
    temporaries of a checkpoint save that was killed."""
    if cfg.overwrite:
        for name in RUN_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(out, name))
    remove_stale_temporaries(out)


def start_run_folder(cfg: TrainConfig, out: str, world: int, keep_metrics: int | None) -> None:
    """Create/clear ``out``, write ``config.json``, and start ``metrics.jsonl`` afresh or, on a
    resume, with its first ``keep_metrics`` records (those the checkpoint had seen)."""
    os.makedirs(out, exist_ok=True)
    _clear_out_dir(cfg, out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump({**asdict(cfg), "out": out, "world_size": world}, f, indent=2)
    metrics_path = os.path.join(out, "metrics.jsonl")
    kept = []
    if keep_metrics is not None and os.path.exists(metrics_path):
        with open(metrics_path) as f:
            kept = [ln for ln in f.read().splitlines() if ln.strip()][:keep_metrics]
    with open(metrics_path, "w") as f:
        f.writelines(ln + "\n" for ln in kept)


def append_metrics(out: str, record: dict) -> None:
    """Add one record (a line of JSON) to ``out/metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out: str) -> list[dict]:
    """The records of ``out/metrics.jsonl``."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(ln) for ln in f if ln.strip()]
