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

__all__ = ["__version__", "get_backend", "info", "native_available", "set_backend"]
