"""Loading of the native module and the choice between native kernels and the reference.

Every op in :mod:`fastflow.ops` asks :func:`use_native` whether to run its compiled kernel for a
tensor's device; when it answers False the op runs its pure-PyTorch reference implementation,
which is also the specification the tests compare against.
"""

from __future__ import annotations

import os
import warnings

import torch

try:  # the compiled module is optional: without it every op runs its reference implementation
    from fastflow import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _IMPORT_ERROR = exc

_BACKENDS = ("auto", "native", "reference")
_backend = "auto"
_warned = False

#: dtype codes understood by the kernels (csrc/storage.h, enum DType; _C.DTYPE_CODES, pinned by
#: tests/test_bindings.py). Kept here so that the reference backend works without _C.
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
FLOAT_DTYPES = tuple(DTYPE_CODES)
#: SIMD variants of the CPU kernels, narrowest first, as FASTFLOW_CPU_ISA and _C.cpu_isa() name
#: them (csrc/cpu_isa.h; _C.CPU_ISA_NAMES)
CPU_ISA_NAMES = ("base", "avx2", "avx512")
#: the kernels' variant when the module loaded (``_C.cpu_isa()``), as a plain value for code that
#: torch.compile traces (a call into the pybind module there breaks the graph)
CPU_ISA = _C.cpu_isa() if _C is not None else ""


def cpu_isa() -> str:
    """The CPU kernels' SIMD variant: ``_C.cpu_isa()`` (it follows ``FASTFLOW_CPU_ISA``), or its
    value at load time while torch.compile traces."""
    if _C is None:
        return ""
    return CPU_ISA if torch.compiler.is_compiling() else _C.cpu_isa()


def _warn_missing_once() -> None:
    global _warned
    if _C is None and not _warned:
        _warned = True
        warnings.warn(
            f"fastflow._C could not be imported ({_IMPORT_ERROR}); every op runs its pure-PyTorch "
            "reference implementation. Reinstall fastflow (pip install .) to build the kernels.",
            RuntimeWarning,
            stacklevel=3,
        )


def set_backend(name: str) -> None:
    """Force the kernel backend.

    Args:
        name: ``"auto"`` (native kernel where one was built for the tensor's device, else the
            reference), ``"native"`` (same, but an error where no native kernel exists) or
            ``"reference"`` (always the pure-PyTorch implementation).

    Example:
        >>> import fastflow
        >>> fastflow.set_backend("reference")
        >>> fastflow.set_backend("auto")
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def get_backend() -> str:
    """The backend set by :func:`set_backend` (initially from ``FASTFLOW_BACKEND``, else auto)."""
    return _backend


def native_available(device: torch.device | str = "cpu") -> bool:
    """Whether compiled kernels exist for ``device``'s type."""
    if _C is None:
        return False
    kind = torch.device(device).type
    if kind == "cpu":
        return True
    if kind == "cuda":
        return bool(_C.build_info()["cuda"])
    return False


_CUDA_BUILT = None


def use_native(t: torch.Tensor) -> bool:
    """Whether ops run the compiled kernel for tensors like ``t`` under the current backend."""
    global _CUDA_BUILT
    if _backend == "reference":
        return False
    if _C is None:
        if _backend == "native":
            raise RuntimeError(
                f"backend 'native' was forced but fastflow._C is missing ({_IMPORT_ERROR})"
            )
        _warn_missing_once()
        return False
    kind = t.device.type
    if kind == "cpu":
        return True
    if kind == "cuda":
        if _CUDA_BUILT is None:
            _CUDA_BUILT = bool(_C.build_info()["cuda"])
        if _CUDA_BUILT:
            return True
    if _backend == "native":
        raise RuntimeError(f"backend 'native' was forced but no native kernel exists for {kind}")
    return False


_CPU_VENDOR: str | None = None


def cpu_vendor() -> str:
    """``"intel"``, ``"amd"`` or ``"other"``: the CPU's vendor (Linux ``/proc/cpuinfo``; other
    systems report ``"other"``). The kernel/matmul crossovers depend on it: torch's MKL runs its
    own tuned kernels on Intel CPUs and generic ones on AMD's, where the whole-layer kernels win
    at every size measured (fastflow/ops/mlp_coupling.py, made_density.py)."""
    global _CPU_VENDOR
    if _CPU_VENDOR is None:
        vendor = "other"
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                for line in f:
                    if line.startswith("vendor_id"):
                        tag = line.split(":", 1)[-1].strip()
                        vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(tag, "other")
                        break
        except OSError:
            pass
        _CPU_VENDOR = vendor
    return _CPU_VENDOR


def num_threads() -> int:
    """Threads the CPU kernels use: torch's intra-op thread count."""
    return max(1, torch.get_num_threads())


def ptr(
    t: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    numel: int | None = None,
    device: torch.device | None = None,
    name: str = "tensor",
) -> int:
    """Data pointer of ``t`` (0 for None) for passing to ``_C``: **the one place pointers are
    taken**, so it checks what the kernel will assume of the buffer.

    Every pointer an op body hands to ``_C`` goes through here with the dtype, element count and
    device the kernel reads it as: a buffer whose dtype changed behind the op's back (autocast),
    a short hand-built structure or a direct ``torch.ops.fastflow.*`` call with a re-laid-out
    tensor raises ``ValueError`` naming ``name`` instead of letting C++ read out of bounds. The
    buffer must be contiguous (the kernels index it densely); an op that reads batch-strided
    inputs in place checks those itself and passes ``numel=None``.
    """
    if t is None:
        return 0
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name}: the kernel reads {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: the kernel runs on {device}, got a tensor on {t.device}")
    if numel is not None:
        if t.numel() != numel:
            raise ValueError(
                f"{name}: the kernel reads {numel} elements, got {t.numel()} {tuple(t.shape)}"
            )
        if not t.is_contiguous():
            raise ValueError(f"{name}: the kernel needs a contiguous buffer")
    return t.data_ptr()


def cuda_guard(t: torch.Tensor):
    """Context manager making ``t``'s CUDA device current for the kernel launch (a no-op context
    for CPU tensors): pointers and streams come from ``t.device`` and the kernel must launch on
    that device, not on the thread's current one."""
    if t.device.type != "cuda":
        return _NULL_CTX
    return torch.cuda.device(t.device)


class _NullCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NULL_CTX = _NullCtx()


def stream_of(t: torch.Tensor) -> int:
    """The current CUDA stream of ``t``'s device, as the integer handle ``_C`` expects."""
    return torch.cuda.current_stream(t.device).cuda_stream


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for log-dets and reductions: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _init_from_env() -> None:
    env = os.environ.get("FASTFLOW_BACKEND", "").strip().lower()
    if env:
        set_backend(env)


_init_from_env()
