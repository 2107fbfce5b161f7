"""Argument validation shared by the ops: clear Python errors before any kernel runs."""

from __future__ import annotations

import torch

from fastflow._backend import FLOAT_DTYPES


def check_float_tensor(name: str, t: object, min_dim: int = 1) -> torch.Tensor:
    """``t`` must be a floating tensor (fp32/fp64/bf16/fp16) with at least ``min_dim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")
    if t.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dims ([N, ...]), got shape {tuple(t.shape)}"
        )
    return t


def check_device_dtype(name: str, t: object, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """``t`` must be a tensor on ``ref``'s device with ``ref``'s dtype."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
    return t


def check_like(name: str, t: object, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """``t`` must have the same shape, dtype and device as ``ref``."""
    check_device_dtype(name, t, ref, ref_name)
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}"
        )
    return t


def check_finite_scalar(name: str, value: float, positive: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {value!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v
