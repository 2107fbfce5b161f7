"""Training, sampling and evaluation behind the ``fastflow`` command.

:func:`train` fits a registered model (:mod:`fastflow.registry`) to a data set
(:mod:`fastflow.data`) by maximum likelihood, single-process or under ``torchrun`` with
DistributedDataParallel, and leaves in its output folder ``config.json``, ``metrics.jsonl``,
``last.pt`` / ``best.pt`` (atomic, :mod:`fastflow.checkpoint`), ``samples.png`` and
``loss.png``. A run is reproducible from its seed: the data order of every epoch and the
dequantization noise of every batch are derived from ``(seed, epoch, batch)``, so ``--resume``
from a checkpoint (even one written mid-epoch) reaches the same parameters as an uninterrupted
run on the same machine.

Images are dequantized uniformly, ``y = (k + u) / L`` with ``L`` levels, and fed to the flow as
``y - 0.5``; bits/dim is ``-log p(y) / (D log 2) + log2(L)``, a bound on the discrete negative
log-likelihood. Vectors are standardised with the training split's mean and std, whose log-det
is counted, so NLLs are in the data's own units.

One job per module: :mod:`~fastflow.training.config` (options and their checks),
:mod:`~fastflow.training.preprocess` (splits, dequantization, standardisation),
:mod:`~fastflow.training.distributed` (process group, ranks, collectives),
:mod:`~fastflow.training.loop` (:class:`~fastflow.training.loop.Run` and :func:`train`),
:mod:`~fastflow.training.checkpoints` (checkpoints, resume, :func:`load_model`),
:mod:`~fastflow.training.rundir` (the output folder), :mod:`~fastflow.training.evaluation`
(likelihoods, ``fastflow evaluate``, OOD scores) and :mod:`~fastflow.training.sampling`
(samples and plots).
"""

from fastflow.training.checkpoints import load_model
from fastflow.training.config import TrainConfig, TrainError, config_from_args, default_out_dir
from fastflow.training.evaluation import (
    auroc,
    evaluate_checkpoint,
    log_likelihood,
    typicality_scores,
)
from fastflow.training.loop import Run, train
from fastflow.training.preprocess import LN2, Preprocess
from fastflow.training.sampling import sample, save_samples_png

__all__ = [
    "LN2",
    "Preprocess",
    "Run",
    "TrainConfig",
    "TrainError",
    "auroc",
    "config_from_args",
    "default_out_dir",
    "evaluate_checkpoint",
    "load_model",
    "log_likelihood",
    "sample",
    "save_samples_png",
    "train",
    "typicality_scores",
]
