import os

import pytest
import torch

import fastflow
from fastflow import _backend

# SIMD variants of the CPU kernels, narrowest first (csrc/cpu_isa.h, cpu_isa_level)
_ISA_ORDER = _backend.CPU_ISA_NAMES


def _cpu_isas() -> list[str]:
    """The variants this CPU runs, narrowest first, up to its widest (detected with
    FASTFLOW_CPU_ISA unset); ``["base", "avx2"]`` without the native module (the fixture skips)."""
    if _backend._C is None:
        return list(_ISA_ORDER[:2])
    saved = os.environ.pop("FASTFLOW_CPU_ISA", None)
    try:
        widest = _backend._C.cpu_isa()
    finally:
        if saved is not None:
            os.environ["FASTFLOW_CPU_ISA"] = saved
    if widest not in _ISA_ORDER:
        return [widest]
    return list(_ISA_ORDER[: _ISA_ORDER.index(widest) + 1])


_CPU_ISAS = _cpu_isas()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and fastflow.native_available("cuda"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and fastflow built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_backend():
    before = fastflow.get_backend()
    yield
    fastflow.set_backend(before)


@pytest.fixture(params=_CPU_ISAS)
def cpu_isa(request, monkeypatch):
    """Runs the test once per SIMD variant of the CPU kernels this CPU supports ("base", "avx2"
    and the widest, e.g. "avx512") and returns its name. The kernels dispatch to the widest
    variant; FASTFLOW_CPU_ISA=base|avx2 caps it (read on every call), so every copy is tested on
    one machine. The widest runs with the variable unset (the default dispatch); the variable is
    restored after the test."""
    if _backend._C is None:
        pytest.skip("needs fastflow._C")
    isa = request.param
    if isa == _CPU_ISAS[-1]:
        monkeypatch.delenv("FASTFLOW_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("FASTFLOW_CPU_ISA", isa)
    return isa


@pytest.fixture
def fp64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def pytest_sessionstart(session):
    # In CI the native module must load: a broken build must fail the run, not skip the tests.
    if os.environ.get("FASTFLOW_REQUIRE_NATIVE") == "1" and _backend._C is None:
        raise pytest.UsageError(
            f"FASTFLOW_REQUIRE_NATIVE=1 but fastflow._C failed to import: {_backend._IMPORT_ERROR}"
        )


def _install_pointer_liveness_check() -> None:
    """Every pointer handed to ``_C`` must point into a tensor somebody still holds: a pointer
    taken from a temporary (``B.ptr(t.contiguous(), ...)`` as a call argument) is freed before
    the kernel runs — garbage gradients for small tensors, a segfault for large ones (found in
    the MLP-coupling and MADE backward with non-contiguous incoming gradients). During the tests
    ``_backend.ptr`` raises when its tensor argument is only referenced by the call itself.
    Calibrated here on this interpreter (reference counts differ between Python versions); off
    where a temporary cannot be told apart."""
    import sys

    orig = _backend.ptr

    def probe(t, *a, **k):
        return sys.getrefcount(t)

    named = torch.zeros(2)
    temp_count, named_count = probe(named + 1), probe(named)
    if not temp_count < named_count:
        return

    def checked_ptr(t, *args, **kwargs):
        if isinstance(t, torch.Tensor) and sys.getrefcount(t) <= temp_count:
            raise AssertionError(
                "_backend.ptr got a tensor nobody else references: it is freed before the "
                "kernel reads it (bind the tensor to a name that lives through the call)"
            )
        return orig(t, *args, **kwargs)

    _backend.ptr = checked_ptr


_install_pointer_liveness_check()


@pytest.fixture
def set_threads():
    """``set_threads(n)`` sets torch's intra-op thread count (which the CPU kernels use) for the
    rest of the test; the count before is restored afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
