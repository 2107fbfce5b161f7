"""Backward-compatible alias of :mod:`fastflow.training`, where the training, sampling and
evaluation code now lives (one module per job); import from there in new code. Re-exports the
old module's public names: its ``__all__`` and the rest (``X as X``)."""

from fastflow.training import LN2 as LN2
from fastflow.training import (
    Preprocess,
    TrainConfig,
    TrainError,
    auroc,
    default_out_dir,
    load_model,
    log_likelihood,
    sample,
    train,
)
from fastflow.training import config_from_args as config_from_args
from fastflow.training import evaluate_checkpoint as evaluate_checkpoint
from fastflow.training import save_samples_png as save_samples_png
from fastflow.training import typicality_scores as typicality_scores

__all__ = [
    "TrainConfig",
    "TrainError",
    "Preprocess",
    "train",
    "load_model",
    "log_likelihood",
    "sample",
    "auroc",
    "default_out_dir",
]
