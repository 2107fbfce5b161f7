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
