"""``fastflow.info()``: what was built and what runs."""

from __future__ import annotations

import os

import torch

from fastflow import _backend as B


def info() -> dict:
    """Describe this installation: versions, compiled kernels, threads and backend.

    Returns:
        A dict with ``version``, ``torch``, ``cpu_kernels`` (bool), ``cuda_kernels`` (bool),
        ``cuda_architectures``, ``openmp``, ``cpu_isa`` (SIMD variant of the CPU kernels),
        ``cpu_vendor`` (``intel``, ``amd`` or ``other``: the kernel/matmul crossovers use it),
        ``cuda_device`` (name or None), ``threads`` and ``backend`` (what ops run on CPU
        tensors: ``native`` or ``reference``), ``imported_from`` (the package directory) and
        ``native_import_error`` (why ``_C`` is missing, or None).

    Example:
        >>> import fastflow
        >>> fastflow.info()["threads"] >= 1
        True
    """
    from fastflow import __version__

    built = B._C.build_info() if B._C is not None else {}
    cuda_dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    forced = B.get_backend()
    cpu_native = B._C is not None and forced != "reference"
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cpu_kernels": B._C is not None,
        "cuda_kernels": bool(built.get("cuda", False)),
        "cuda_architectures": built.get("cuda_architectures", ""),
        "openmp": bool(built.get("openmp", False)),
        "cpu_isa": B._C.cpu_isa() if B._C is not None else "",
        "cpu_vendor": B.cpu_vendor(),
        "compiler": built.get("compiler", ""),
        "cuda_device": cuda_dev,
        "threads": B.num_threads(),
        "backend_setting": forced,
        "backend": "native" if cpu_native else "reference",
        "imported_from": _package_dir(),
        "native_import_error": _import_error(),
    }


def _package_dir() -> str:
    import fastflow

    return os.path.dirname(os.path.abspath(fastflow.__file__))


def _import_error() -> str | None:
    """Why ``_C`` is missing, with the usual cause spelled out: a source checkout shadowing the
    installed package (``python`` run from the repository root after a non-editable install)."""
    if B._IMPORT_ERROR is None:
        return None
    msg = str(B._IMPORT_ERROR)
    pkg = _package_dir()
    if os.path.exists(os.path.join(os.path.dirname(pkg), "pyproject.toml")):
        msg += (
            f" -- fastflow was imported from the source tree {pkg}, which has no compiled _C "
            "(it shadows an installed copy when python runs from the repository root): use "
            "`pip install -e .`, or run from another directory"
        )
    return msg


def format_info(d: dict) -> str:
    width = max(len(k) for k in d)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in d.items())
