"""The Python side of the native bindings agrees with fastflow._C.

Python keeps its own copy of every constant it shares with the kernels (dtype codes, scale modes,
activations, ISA names, the MLP kernel's acts layout) so that the reference backend works without
_C; these tests pin each copy to the value _C exports. Every entry point takes named arguments
and the package calls it by keyword (a swapped pointer and stride cannot pass silently).
"""

import inspect
import pathlib
import re

import pytest
import torch

from fastflow import _backend as B
from fastflow.ops import _mlp_native, made
from fastflow.ops import coupling as C

pytestmark = pytest.mark.skipif(B._C is None, reason="needs fastflow._C")


def test_dtype_codes_match():
    py = {str(dt).removeprefix("torch."): code for dt, code in B.DTYPE_CODES.items()}
    assert py == dict(B._C.DTYPE_CODES)
    assert set(B.FLOAT_DTYPES) == set(B.DTYPE_CODES)


def test_scale_modes_match():
    assert {**C.SCALE_FNS, "additive": C._ADDITIVE} == dict(B._C.SCALE_MODES)


def test_activations_match():
    assert made.ACTIVATIONS == dict(B._C.ACTIVATIONS)


def test_cpu_isa_names_match():
    assert B.CPU_ISA_NAMES == tuple(B._C.CPU_ISA_NAMES)
    assert B._C.cpu_isa() in B.CPU_ISA_NAMES
    assert B._C.invconv_cpu_isa() == B._C.cpu_isa()


def test_mlp_acts_layout_constants_match():
    assert _mlp_native.ACTS_ROW_ALIGN_BYTES == B._C.MLP_ACTS_ROW_ALIGN_BYTES
    assert _mlp_native.ACTS_ROW_QUANTUM == B._C.MLP_ACTS_ROW_QUANTUM
    rows, _ = B._C.mlp_coupling_acts_shape(dtype=0, n=13, sizes=[1, 4, 2])
    assert rows % _mlp_native.ACTS_ROW_QUANTUM == 0 and rows >= 13


def _entry_points():
    return sorted(
        name for name in dir(B._C) if not name.startswith("_") and callable(getattr(B._C, name))
    )


def test_every_entry_point_has_named_arguments():
    # pybind11 names an argument declared without py::arg "arg0", "arg1", ...
    unnamed = [n for n in _entry_points() if re.search(r"\barg\d+\b", getattr(B._C, n).__doc__)]
    assert not unnamed, f"declare py::arg names for {unnamed}"


def test_entry_points_refuse_positional_mixups():
    with pytest.raises(TypeError):
        B._C.coupling_forward_cpu(dtype=0, mode=0, clamp=2.0, n=2, m=3, x_stride=3, s_x=3)


def test_package_calls_entry_points_by_keyword():
    # every `_C.<entry>(` call in the package passes keywords only (or nothing)
    root = pathlib.Path(inspect.getfile(B)).parent
    bad = []
    call = re.compile(r"_C\.(\w+)\(|getattr\(B\._C, [^)]*\)\(")
    for path in root.rglob("*.py"):
        src = path.read_text()
        for m in call.finditer(src):
            i = m.end()
            depth, j = 1, i
            while depth and j < len(src):
                depth += {"(": 1, ")": -1}.get(src[j], 0)
                j += 1
            args = src[i : j - 1].strip()
            first = args.split(",")[0].strip() if args else ""
            if args and not (first.startswith("**") or re.match(r"^\w+\s*=", first)):
                bad.append(f"{path.name}: {src[m.start() : j]}")
    assert not bad, bad


def test_named_call_runs():
    x = torch.randn(3, 4)
    y = torch.empty_like(x)
    ld = torch.empty(3)
    B._C.coupling_forward_cpu(
        dtype=0, mode=C.SCALE_FNS["identity"], clamp=1.0, n=3, m=4, x_ptr=x.data_ptr(),
        x_stride=4, raw_ptr=x.data_ptr(), raw_stride=4, shift_ptr=x.data_ptr(), shift_stride=4,
        mask_ptr=0, y_ptr=y.data_ptr(), logdet_ptr=ld.data_ptr(), nthreads=1,
    )  # fmt: skip
    torch.testing.assert_close(y, x * torch.exp(x) + x)
    torch.testing.assert_close(ld, x.sum(1))
