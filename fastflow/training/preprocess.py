"""Preprocessing between a data set and a flow: the train/val/test splits of a run,
:class:`Preprocess` (uniform dequantization of images, standardisation of vectors, and the
log-det of that map), the seeded noise generators that make every batch's dequantization
reproducible, and the reshaping of other data into the layout a trained model expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fastflow.data import DataError, DataSet, load_data, split_indices

LN2 = math.log(2.0)


class Preprocess:
    """Maps data to the flow's input and back, and knows the log-det of that map.

    Images: ``x_model = (k + u) / L - 0.5`` reshaped to the model's input shape;
    ``offset = -D log L`` (so ``log p(y) + offset`` bounds ``log P(k)``). With
    ``dequantization="variational"`` the rows are the bin centres ``(k + 0.5) / L - 0.5`` and
    the model (:class:`~fastflow.dequantization.VariationalDequantization`) draws ``u``. Vectors:
    ``x_model = (x - mean) / std``; ``offset = -sum(log std)``.

    Example:
        >>> pre = Preprocess("vector", (2,), (2,), mean=[0.0, 0.0], std=[2.0, 2.0])
        >>> round(pre.offset, 4) == round(-2 * math.log(2.0), 4)
        True
    """

    def __init__(
        self,
        kind: str,
        data_shape: tuple[int, ...],
        model_shape: tuple[int, ...],
        levels: int | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        dequantization: str = "uniform",
    ):
        self.kind = kind
        self.data_shape = tuple(data_shape)
        self.model_shape = tuple(model_shape)
        self.levels = levels
        self.dims = math.prod(self.data_shape)
        if dequantization not in ("uniform", "variational"):
            raise ValueError(
                f"--dequantization must be uniform or variational, got {dequantization!r}"
            )
        if dequantization == "variational" and kind != "image":
            raise DataError("--dequantization variational is for images (discrete levels)")
        self.dequantization = dequantization
        if kind == "image":
            self.offset = -self.dims * math.log(levels)
        else:
            self.mean = torch.tensor(mean, dtype=torch.float64)
            self.std = torch.tensor(std, dtype=torch.float64)
            self.offset = -float(torch.log(self.std).sum())

    @classmethod
    def fit(
        cls,
        ds: DataSet,
        train_x: Tensor,
        model_shape: tuple[int, ...],
        dequantization: str = "uniform",
    ) -> Preprocess:
        """Build from a data set (vector mean/std from the training rows)."""
        if ds.kind == "image":
            return cls(
                "image", ds.shape, model_shape, levels=ds.levels, dequantization=dequantization
            )
        if dequantization != "uniform":
            raise DataError(f"--dequantization {dequantization} is for images; {ds.name} is not")
        mean = train_x.mean(0)
        std = train_x.std(0) if train_x.shape[0] > 1 else torch.ones_like(mean)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        return cls("vector", ds.shape, model_shape, mean=mean.tolist(), std=std.tolist())

    def state(self) -> dict:
        s: dict[str, Any] = {
            "kind": self.kind,
            "data_shape": list(self.data_shape),
            "model_shape": list(self.model_shape),
            "levels": self.levels,
            "dequantization": self.dequantization,
        }
        if self.kind == "vector":
            s["mean"], s["std"] = self.mean.tolist(), self.std.tolist()
        return s

    @classmethod
    def from_state(cls, s: dict) -> Preprocess:
        return cls(
            s["kind"],
            tuple(s["data_shape"]),
            tuple(s["model_shape"]),
            s.get("levels"),
            s.get("mean"),
            s.get("std"),
            s.get("dequantization", "uniform"),
        )

    def to_model(self, x: Tensor, generator: torch.Generator | None, dtype: torch.dtype) -> Tensor:
        """Raw data rows -> flow input (dequantized for images)."""
        if self.kind == "image" and self.dequantization == "variational":
            y = (x.double() + 0.5) / self.levels - 0.5  # bin centres: the model draws u
        elif self.kind == "image":
            u = torch.rand(x.shape, generator=generator, dtype=torch.float64)
            y = (x.double() + u) / self.levels - 0.5
        else:
            y = (x.double() - self.mean) / self.std
        return y.to(dtype).reshape(x.shape[0], *self.model_shape)

    def from_model(self, xm: Tensor) -> np.ndarray:
        """Flow output -> data: image levels as floats in ``[0, 1]``, or vectors."""
        x = xm.detach().double().cpu().reshape(xm.shape[0], *self.data_shape)
        if self.kind == "image":
            k = torch.floor((x + 0.5).clamp(0, 1 - 1e-9) * self.levels)
            return (k / (self.levels - 1)).numpy()
        return (x * self.std + self.mean).numpy()

    def bpd(self, loglik: Tensor | float) -> Tensor | float:
        """Bits per dimension of a data log-likelihood (``log p + offset``)."""
        return -loglik / (self.dims * LN2)


def noise_generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from ``parts`` (e.g. ``(seed, epoch, batch, rank)``), so each
    batch's dequantization noise depends on where it is in the run, not on what ran before."""
    seed = int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])
    return torch.Generator().manual_seed(seed)


@dataclass
class Splits:
    """A data set and its train/val/test rows."""

    ds: DataSet
    train: Tensor
    val: Tensor
    test: Tensor


def load_splits(data: str, n_data: int | None, val: float, test: float, seed: int) -> Splits:
    """Load ``data`` and split it as a run with these options does (reproducible from ``seed``)."""
    ds = load_data(data, n=n_data, seed=seed)
    tr, va, te = split_indices(len(ds), val, test, seed=seed)
    return Splits(ds, ds.x[tr], ds.x[va], ds.x[te])


def rows_for(pre: Preprocess, ds: DataSet) -> Tensor:
    """Rows of ``ds`` in the layout ``pre`` expects (images resized/requantized if needed)."""
    from fastflow.data import resize_images

    if pre.kind == "image":
        if ds.kind != "image":
            raise DataError(f"{ds.name}: the model was trained on images {pre.data_shape}")
        if ds.shape != pre.data_shape or ds.levels != pre.levels:
            ds = resize_images(ds, pre.data_shape, pre.levels)
        return ds.x
    if ds.kind == "image" or ds.shape != pre.data_shape:
        raise DataError(
            f"{ds.name}: shape {ds.shape} does not match the model's vectors {pre.data_shape}"
        )
    return ds.x
