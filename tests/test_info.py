"""fastflow.info(), the info command, and running without the compiled module."""

import os
import subprocess
import sys

import fastflow
from fastflow.cli import main


def test_info_reports_build_and_backend():
    info = fastflow.info()
    assert info["version"] == fastflow.__version__
    assert info["threads"] >= 1
    assert info["backend"] in ("native", "reference")
    assert isinstance(info["cuda_kernels"], bool) and isinstance(info["cpu_kernels"], bool)
    if info["cpu_kernels"]:
        assert info["cpu_isa"] in ("base", "avx2", "avx512")
    fastflow.set_backend("reference")
    assert fastflow.info()["backend"] == "reference"


def test_cpu_vendor_and_the_crossover_tables(monkeypatch, tmp_path):
    """cpu_vendor reads /proc/cpuinfo's vendor_id; the kernel/matmul bounds follow it."""
    import builtins

    from fastflow import _backend as B
    from fastflow.ops import made_density, mlp_coupling

    assert fastflow.info()["cpu_vendor"] == B.cpu_vendor() in ("intel", "amd", "other")
    for mod in (made_density, mlp_coupling):
        want = mod._MAX_MACS_AMD if B.cpu_vendor() == "amd" else mod._MAX_MACS_INTEL
        assert mod.KERNEL_MAX_MACS == want
    real_open = builtins.open
    for text, vendor in (
        ("processor\t: 0\nvendor_id\t: AuthenticAMD\n", "amd"),
        ("vendor_id\t: GenuineIntel\n", "intel"),
        ("vendor_id\t: HygonGenuine\n", "other"),
        ("processor : 0\n", "other"),
    ):
        fake = tmp_path / "cpuinfo"
        fake.write_text(text)
        monkeypatch.setattr(
            builtins,
            "open",
            lambda path, *a, _f=fake, **k: real_open(
                _f if path == "/proc/cpuinfo" else path, *a, **k
            ),
        )
        monkeypatch.setattr(B, "_CPU_VENDOR", None)
        assert B.cpu_vendor() == vendor
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(B, "_CPU_VENDOR", None)


def test_info_command_prints_every_field(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("version", "torch", "cpu_kernels", "cuda_kernels", "threads", "backend"):
        assert key in out


_NO_NATIVE = r"""
import sys, warnings
sys.modules["fastflow._C"] = None  # makes `from fastflow import _C` raise ImportError
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import fastflow
    from fastflow.ops import coupling as C
    from fastflow.models import Glow, MAF
    x, raw, t = (torch.randn(3, 4) for _ in range(3))
    y, ld = C.affine_coupling(x, raw, t)
    y_ref, ld_ref = C.reference_affine_coupling(x, raw, t)
    assert torch.equal(y, y_ref) and torch.equal(ld, ld_ref)
    C.affine_coupling(x, raw, t)
    lp = Glow((1, 4, 4), levels=1, steps=1, hidden=4).log_prob(torch.rand(2, 1, 4, 4))
    s = MAF(3, layers=1, hidden=(8,)).sample(2)
    assert torch.isfinite(lp).all() and s.shape == (2, 3)
info = fastflow.info()
assert info["cpu_kernels"] is False and info["backend"] == "reference", info
assert info["native_import_error"], info
n = sum("fastflow._C could not be imported" in str(w.message) for w in caught)
assert n == 1, [str(w.message) for w in caught]
print("ok")
"""


def test_import_without_native_module_warns_once_and_runs_references():
    env = {k: v for k, v in os.environ.items() if k != "FASTFLOW_BACKEND"}
    res = subprocess.run(
        [sys.executable, "-c", _NO_NATIVE], capture_output=True, text=True, timeout=300, env=env
    )
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]
