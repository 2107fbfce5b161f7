"""fastflow: normalizing flows for PyTorch with fused C++/CUDA kernels.

Example:
    >>> import fastflow
    >>> info = fastflow.info()
    >>> info["backend"] in ("native", "reference")
    True
"""

from __future__ import annotations

from fastflow._backend import get_backend, native_available, set_backend
from fastflow._info import info

__version__ = "0.1.0"

from fastflow import models, nn, ops  # noqa: E402
from fastflow.diagnostics import check_invertibility  # noqa: E402
from fastflow.distributions import (  # noqa: E402
    ConditionalDiagonalGaussian,
    DiagonalGaussian,
    StandardNormal,
)
from fastflow.flow import Flow, FlowDistribution  # noqa: E402
from fastflow.images import bits_per_dim, dequantize  # noqa: E402

__all__ = [
    "ConditionalDiagonalGaussian",
    "DiagonalGaussian",
    "Flow",
    "FlowDistribution",
    "StandardNormal",
    "__version__",
    "bits_per_dim",
    "check_invertibility",
    "dequantize",
    "get_backend",
    "info",
    "models",
    "native_available",
    "nn",
    "ops",
    "set_backend",
]
