import pytest
import torch

import fastflow


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


@pytest.fixture
def fp64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def pytest_sessionstart(session):
    # In CI the native module must load: a broken build must fail the run, not skip the tests.
    import os

    from fastflow import _backend

    if os.environ.get("FASTFLOW_REQUIRE_NATIVE") == "1" and _backend._C is None:
        raise pytest.UsageError(
            f"FASTFLOW_REQUIRE_NATIVE=1 but fastflow._C failed to import: {_backend._IMPORT_ERROR}"
        )
