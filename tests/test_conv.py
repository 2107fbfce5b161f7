"""fastflow.ops.conv.conv3x3 (the tap form of narrow 3x3 convolutions) against F.conv2d, and its
use inside ChannelsLastSequential."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastflow
import fastflow.nn.coupling as coupling_mod
import fastflow.ops.conv as conv_mod
from fastflow.nn import ChannelsLastSequential, GlowConditioner
from fastflow.ops.conv import conv3x3


def _grads(fn, x, w, b, g):
    y = fn(x, w, b)
    params = [x, w] + ([b] if b is not None else [])
    return (y, *torch.autograd.grad(y, params, g))


@pytest.mark.parametrize("c_out", [1, 4, 8, 12])
@pytest.mark.parametrize("c_in", [2, 7])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
def test_matches_conv2d_fp64(c_out, c_in, bias, channels_last):
    """Values and all three gradients equal F.conv2d's (fp64, rounding only) on an input above
    the tap-form threshold, in both layouts, narrow and wide output, narrow and wider input."""
    torch.manual_seed(c_out * 10 + c_in)
    n, h, w_ = 16, 16, 17  # 4352 pixels >= TAP_SPLIT_MIN_PIXELS
    assert n * h * w_ >= conv_mod.TAP_SPLIT_MIN_PIXELS
    x = torch.randn(n, c_in, h, w_, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True) if bias else None
    g = torch.randn(n, c_out, h, w_, dtype=torch.float64)
    ref = _grads(lambda x, w, b: F.conv2d(x, w, b, padding=1), x, w, b, g)
    got = _grads(conv3x3, x, w, b, g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.fixture
def avx512_thresholds(monkeypatch):
    """The AVX-512 thresholds whatever this CPU is (tests that count which form runs)."""
    monkeypatch.setattr(conv_mod, "TAP_SPLIT_MAX_OUT", 8)
    monkeypatch.setattr(conv_mod, "TAP_SPLIT_MAX_WGRAD", 6)


@pytest.fixture
def mlp3_limits(monkeypatch):
    """conv_mlp3's limits as measured on AMD Zen 5 (12M MACs, 8 channels) whatever this CPU is,
    for the tests that count which conditioner path runs (the Intel limits are far larger)."""
    monkeypatch.setattr(coupling_mod, "CONV_MLP_MAX_MACS", 12_000_000)
    monkeypatch.setattr(coupling_mod, "CONV_MLP_MAX_CHANNELS", 8)


def test_tap_form_runs_for_narrow_layers(monkeypatch, avx512_thresholds):
    """The narrow forward, input gradient and weight gradient take the tap form (one 1x1
    convolution to 9 * C channels), the wide ones the plain convolution."""
    seen = []
    real = F.conv2d

    def spy(x, w, *args, **kw):
        seen.append(tuple(w.shape))
        return real(x, w, *args, **kw)

    monkeypatch.setattr(conv_mod.F, "conv2d", spy)
    x = torch.randn(16, 32, 16, 16, requires_grad=True)
    w = torch.randn(4, 32, 3, 3, requires_grad=True)
    conv3x3(x, w).sum().backward()
    assert seen[0] == (36, 32, 1, 1)  # forward: 4 outputs -> one 1x1 conv to 36 channels
    assert seen[1] == (32, 4, 3, 3)  # input gradient: 32 outputs -> plain (flipped) conv
    seen.clear()
    x2 = torch.randn(16, 4, 16, 16, requires_grad=True)
    w2 = torch.randn(32, 4, 3, 3, requires_grad=True)
    conv3x3(x2, w2).sum().backward()
    assert seen == [(32, 4, 3, 3), (36, 32, 1, 1)]  # wide forward, narrow input gradient


def test_gradcheck_and_double_backward(monkeypatch):
    """First and second derivatives by finite differences (the tap form forced on a tiny input)."""
    monkeypatch.setattr(conv_mod, "TAP_SPLIT_MIN_PIXELS", 1)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(conv3x3, (x, w, b))
    assert torch.autograd.gradgradcheck(conv3x3, (x, w, b))


def test_bad_shapes_name_the_argument():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="x must be"):
        conv3x3(torch.randn(3, 4, 4), torch.randn(2, 3, 3, 3))
    with pytest.raises(ValueError, match="weight must be"):
        conv3x3(x, torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="weight must be"):
        conv3x3(x, torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match="bias must be"):
        conv3x3(x, torch.randn(2, 3, 3, 3), torch.randn(3))


def _conditioner_pair(hidden=64):
    torch.manual_seed(1)
    net = GlowConditioner(2, 2, hidden=hidden)
    nn.init.normal_(net.net[4].weight, std=0.1)
    plain = nn.Sequential(*list(net.net))  # the same parameter objects, never routed
    return net, plain


def test_channels_last_sequential_routes_narrow_convs_fp32(monkeypatch):
    """A Sequential that is not Glow's whole conditioner (fp32, CPU, >= 4096 pixels) sends its
    narrow 3x3 convolutions (2 -> 64, 64 -> 4) through conv3x3, with the plain Sequential's
    values and gradients up to fp32 rounding."""
    calls = []
    real = coupling_mod.conv3x3

    def counting(x, w, b):
        calls.append(tuple(w.shape))
        return real(x, w, b)

    monkeypatch.setattr(coupling_mod, "conv3x3", counting)
    torch.manual_seed(2)
    layers = [nn.Conv2d(2, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 4, 3, padding=1)]
    net, plain = ChannelsLastSequential(*layers), nn.Sequential(*layers)
    x = torch.randn(16, 2, 16, 16, requires_grad=True)
    g = torch.randn(16, 4, 16, 16)
    y1 = net(x)
    g1 = torch.autograd.grad(y1, [x, *net.parameters()], g)
    assert calls == [(64, 2, 3, 3), (4, 64, 3, 3)]
    y0 = plain(x)
    g0 = torch.autograd.grad(y0, [x, *plain.parameters()], g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, r in zip(g1, g0):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("gemm_last", [True, False])
@pytest.mark.parametrize("n", [1, 9])
def test_conv_net3_matches_the_convolutions_fp64(monkeypatch, n, gemm_last, avx512_thresholds):
    """conv_net3's values and gradients equal autograd through the five plain layers (fp64),
    with the tap forms forced (n=9: 9 x 16 x 16 pixels above a lowered threshold) or not, and the
    last layer as a matrix product + tap sum (NET3_GEMM_LAST) or a convolution."""
    from fastflow.ops.conv import _conv_mlp3_plain, conv_net3

    monkeypatch.setattr(conv_mod, "NET3_GEMM_LAST", gemm_last)
    if n == 9:
        monkeypatch.setattr(conv_mod, "TAP_SPLIT_MIN_PIXELS", 2048)
    ps = _mlp3_params(3, 10, 4, torch.float64, seed=4)
    x = torch.randn(n, 3, 16, 16, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(n, 4, 16, 16, dtype=torch.float64)
    got = _value_and_grads(conv_net3, x, ps, g)
    for a, r in zip(got, _value_and_grads(_conv_mlp3_plain, x, ps, g)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)
    ps2 = _mlp3_params(2, 3, 2, torch.float64, seed=5)
    x2 = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *p: conv_net3(x, *p), (x2, *ps2))


def _routed_like_plain(monkeypatch, fn: str, hidden: int, shape: tuple[int, ...]):
    """A GlowConditioner's net on an input of ``shape`` calls ``fn`` once (counted through the
    name fastflow.nn.coupling uses) and matches the plain Sequential's values and gradients."""
    calls = []
    real = getattr(coupling_mod, fn)
    monkeypatch.setattr(coupling_mod, fn, lambda *a: (calls.append(1), real(*a))[1])
    net, plain = _conditioner_pair(hidden=hidden)
    x = torch.randn(*shape, requires_grad=True)
    g = torch.randn(shape[0], 4, *shape[2:])
    y1 = net.net(x)
    g1 = torch.autograd.grad(y1, [x, *net.parameters()], g)
    assert calls == [1] and y1.is_contiguous()
    y0 = plain(x)
    g0 = torch.autograd.grad(y0, [x, *plain.parameters()], g)
    torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
    for a, r in zip(g1, g0):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
    return net, calls, x


def test_glow_conditioner_above_the_small_size_runs_as_one_oneDNN_node(monkeypatch, mlp3_limits):
    _routed_like_plain(monkeypatch, "conv_net3", 64, (16, 2, 16, 16))  # 31M MACs: above mlp3's


def test_channels_last_sequential_keeps_module_calls_where_observed(monkeypatch):
    """A hook on the convolution, a small input or fp64 keep the ordinary module call."""
    calls = []
    monkeypatch.setattr(coupling_mod, "conv3x3", lambda *a: calls.append(1))
    net, _ = _conditioner_pair()
    fired = []
    handles = [net.net[i].register_forward_hook(lambda *a: fired.append(1)) for i in (0, 4)]
    net.net(torch.randn(16, 2, 16, 16))
    assert len(fired) == 2 and not calls
    for h in handles:
        h.remove()
    net.net(torch.randn(2, 2, 8, 8))  # 128 pixels: below the threshold
    net.double().net(torch.randn(16, 2, 16, 16, dtype=torch.float64))
    assert not calls
    assert isinstance(net.net, ChannelsLastSequential)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_tap_kernels_match_the_slice_code(monkeypatch, dtype, avx512_thresholds, cpu_isa):
    """Channels-last CPU tensors take the tap kernels (csrc/conv_taps_cpu.cpp) forward and
    backward; the reference backend runs the slice code: same values and gradients."""
    from fastflow import _backend as B

    if not hasattr(B._C, "conv_tap_sum_cpu"):
        pytest.skip("no native kernels")
    calls = []
    for name in ("conv_tap_sum_cpu", "conv_tap_shift_cpu"):
        real = getattr(B._C, name)
        monkeypatch.setattr(
            B._C, name, lambda *a, _r=real, _n=name, **k: (calls.append(_n), _r(*a, **k))[1]
        )
    torch.manual_seed(3)
    x = torch.randn(8, 5, 23, 24, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 5, 3, 3, dtype=dtype) * 0.2
    b = torch.randn(3, dtype=dtype)
    g = torch.randn(8, 3, 23, 24, dtype=dtype)
    out = {}
    for backend in ("auto", "reference"):
        fastflow.set_backend(backend)
        xx, ww, bb = (t.clone().requires_grad_() for t in (x, w, b))
        y = conv3x3(xx, ww, bb)
        out[backend] = (y, *torch.autograd.grad(y, [xx, ww, bb], g))
    fastflow.set_backend("auto")
    assert calls.count("conv_tap_sum_cpu") == 2  # forward (3 outputs), input gradient (5)
    assert calls.count("conv_tap_shift_cpu") == 1  # weight gradient (3 outputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for a, r in zip(out["auto"], out["reference"]):
        torch.testing.assert_close(a, r, rtol=tol, atol=tol)


def _taps_ref(img: torch.Tensor, sign: int) -> torch.Tensor:
    """[N, H, W, ...] -> [N, H, W, 9, ...]: tap t = 3 (dy + 1) + (dx + 1) holds img[y + sign dy,
    x + sign dx] (zero outside the image), by padding and slicing."""
    h, w = img.shape[1:3]
    pad = F.pad(img, (0, 0) * (img.dim() - 3) + (1, 1, 1, 1))
    taps = [
        pad[:, 1 + sign * dy : 1 + sign * dy + h, 1 + sign * dx : 1 + sign * dx + w]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    return torch.stack(taps, 3)


# every channel count with its own copy of the kernels (csrc/conv_taps_cpu.cpp, FF_TAP_WIDTHS)
# and three that take the generic loops
@pytest.mark.parametrize("c", [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 50])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tap_kernels_match_padded_slices_at_every_width(c, dtype, cpu_isa):
    """conv_tap_shift / conv_tap_sum against padding and slicing, on images down to 1x1 and one
    large enough to split over two threads: the shift exactly, the sum to the last bit of a sum
    in the same order (bias, then taps 0..8)."""
    from fastflow import _backend as B

    torch.manual_seed(c)
    threads = torch.get_num_threads()
    try:
        for nt, (n, h, w) in ((1, (2, 5, 4)), (1, (3, 1, 1)), (1, (2, 1, 6)), (2, (4, 33, 7))):
            torch.set_num_threads(nt)
            g = torch.randn(n, h, w, c, dtype=dtype)
            got = conv_mod._tap_shift(g.reshape(-1, c), n, h, w, c)
            assert torch.equal(got, _taps_ref(g, -1).reshape(-1, 9 * c))
            t9 = torch.randn(n, h, w, 9, c, dtype=dtype)
            bias = torch.randn(c, dtype=dtype)
            for b in (bias, None):
                got = conv_mod._tap_sum(t9.reshape(-1, 9 * c), n, h, w, c, b)
                ref = torch.zeros(n, h, w, c, dtype=dtype) if b is None else b.expand(n, h, w, c)
                for t, tap in enumerate(_taps_ref(t9, 1).unbind(3)):
                    ref = ref + tap[..., t, :]
                torch.testing.assert_close(got, ref.reshape(-1, c), rtol=0, atol=0)
    finally:
        torch.set_num_threads(threads)
    assert B._C is not None


def test_tap_kernels_reject_bad_arguments():
    from fastflow import _backend as B

    if not hasattr(B._C, "conv_tap_sum_cpu"):
        pytest.skip("no native kernels")
    buf = torch.zeros(9 * 4 * 4 * 2)
    args = dict(dtype=0, n=1, h=4, w=4, c=2, bias_ptr=0, nthreads=1)
    with pytest.raises(ValueError, match="h, w, c >= 1"):
        B._C.conv_tap_sum_cpu(**{**args, "c": 0}, taps_ptr=buf.data_ptr(), out_ptr=buf.data_ptr())
    with pytest.raises(ValueError, match="taps: null pointer"):
        B._C.conv_tap_sum_cpu(**args, taps_ptr=0, out_ptr=buf.data_ptr())
    with pytest.raises(ValueError, match="fp32 and fp64 only"):
        B._C.conv_tap_sum_cpu(
            **{**args, "dtype": 2}, taps_ptr=buf.data_ptr(), out_ptr=buf.data_ptr()
        )
    with pytest.raises(ValueError, match="nthreads"):
        B._C.conv_tap_shift_cpu(
            dtype=0, n=1, h=4, w=4, c=2, grad_ptr=buf.data_ptr(), shifted_ptr=buf.data_ptr(),
            nthreads=0,
        )  # fmt: skip


def _value_and_grads(f, x, ps, g) -> tuple:
    """``f(x, *ps)`` and its gradients with respect to x and every parameter for ``g``."""
    y = f(x, *ps)
    return (y, *torch.autograd.grad(y, [x, *ps], g))


def _mlp3_params(ci, hid, co, dtype, seed=0):
    torch.manual_seed(seed)
    shapes = [(hid, ci, 3, 3), (hid,), (hid, hid, 1, 1), (hid,), (co, hid, 3, 3), (co,)]
    return [(torch.randn(s, dtype=dtype) * 0.3).requires_grad_() for s in shapes]


def test_conv_mlp3_keeps_the_hidden_activations_not_the_im2col():
    """The eager node saves x and the two hidden activations, not the [P, 9 C_in] im2col (its
    backward rebuilds it from x), and its gradients still equal the plain layers' (fp64)."""
    from fastflow import _backend as B
    from fastflow.ops.conv import _conv_mlp3_plain, conv_mlp3

    if B._C is None:
        pytest.skip("no native kernels")
    ps = _mlp3_params(5, 7, 4, torch.float64, seed=2)
    x = torch.randn(3, 5, 6, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    y = conv_mlp3(x, *ps)
    saved = [tuple(t.shape) for t in y.grad_fn.saved_tensors]
    rows = 3 * 6 * 4
    assert (rows, 7) in saved and (rows, 9 * 5) not in saved
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ps], g)
    ref = torch.autograd.grad(_conv_mlp3_plain(x, *ps), [x, *ps], g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape", [(3, 2, 5, 6), (2, 4, 1, 7), (1, 3, 2, 2)])
def test_conv_mlp3_matches_the_convolutions_fp64(shape):
    """Values and every gradient equal autograd through the five plain layers (fp64)."""
    from fastflow.ops.conv import _conv_mlp3_plain, conv_mlp3

    n, ci, h, w = shape
    ps = _mlp3_params(ci, 6, 4, torch.float64)
    x = torch.randn(n, ci, h, w, dtype=torch.float64, requires_grad=True)
    g = torch.randn(n, 4, h, w, dtype=torch.float64)
    got = _value_and_grads(conv_mlp3, x, ps, g)
    for a, r in zip(got, _value_and_grads(_conv_mlp3_plain, x, ps, g)):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


def test_conv_mlp3_double_backward():
    from fastflow.ops.conv import conv_mlp3

    ps = _mlp3_params(2, 3, 2, torch.float64, seed=1)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, *p: conv_mlp3(x, *p), (x, *ps))


def test_conv_mlp3_bad_arguments_name_them():
    f, fn = conv_mod.conv_mlp3, "conv_mlp3"
    ps = _mlp3_params(2, 3, 2, torch.float32)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match=f"{fn}: w2 must be"):
        f(x, ps[0], ps[1], ps[2][:, :2], *ps[3:])
    with pytest.raises(ValueError, match="b3 must be"):
        f(x, *ps[:5], ps[5].double())
    with pytest.raises(ValueError, match="x must be"):
        f(x[0], *ps)


def test_small_glow_conditioner_runs_as_one_node(monkeypatch, mlp3_limits):
    """A small fp32 input (Glow's 1x8x8 levels) takes conv_mlp3, with the plain Sequential's
    values and gradients; hooks, autocast and the reference backend keep the layer calls."""
    net, calls, x = _routed_like_plain(monkeypatch, "conv_mlp3", 16, (8, 2, 4, 4))
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net.net(x)
    fastflow.set_backend("reference")
    try:
        net.net(x)
    finally:
        fastflow.set_backend("auto")
    handle = net.net[2].register_forward_hook(lambda *a: None)
    net.net(x)
    handle.remove()
    assert calls == []
    net.net(torch.randn(64, 2, 16, 16))  # 16384 pixels: above CONV_MLP_MAX_MACS
    assert calls == []


def _count_native(monkeypatch, name: str) -> list:
    """Counts the calls of the native kernel ``name`` (the test is skipped without it)."""
    from fastflow import _backend as B

    if not hasattr(B._C, name):
        pytest.skip("no native kernels")
    calls, real = [], getattr(B._C, name)
    monkeypatch.setattr(B._C, name, lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    return calls


def _relu_grad_sum_reference(grad, act):
    """threshold_backward (ReLU's backward) and the bias sum in fp64: the independent oracle."""
    masked = torch.ops.aten.threshold_backward(grad, act, 0)
    return masked, masked.double().sum((0, 2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "shape,threads",
    [
        ((2, 5, 3, 4), 1), ((1, 1, 1, 1), 1), ((0, 3, 4, 4), 1),
        ((4, 40, 16, 16), 2), ((3, 7, 9, 130), 2),
    ],
)  # fmt: skip
def test_relu_grad_sum_matches_threshold_backward(
    monkeypatch, set_threads, dtype, shape, threads, cpu_isa
):
    """The native ReLU backward + bias sum (csrc/conv_taps_cpu.cpp, relu_grad_sum_cpu) masks the
    gradient in place exactly as threshold_backward does (act <= 0 -> 0, a NaN act keeps the
    gradient, a NaN gradient passes where act > 0) and sums it per channel to fp64 accuracy, on
    one thread and (above the parallel grain, 40960 and 10x more elements) on two."""
    calls = _count_native(monkeypatch, "relu_grad_sum_cpu")
    set_threads(threads)
    torch.manual_seed(7)
    cl = torch.channels_last
    act = torch.randn(shape, dtype=dtype).relu_().contiguous(memory_format=cl)
    grad = torch.randn(shape, dtype=dtype).contiguous(memory_format=cl)
    if act.numel() >= 4:
        a, g = act.permute(0, 2, 3, 1).view(-1), grad.permute(0, 2, 3, 1).view(-1)
        a[:4] = torch.tensor([float("nan"), -0.0, 0.0, 1.0], dtype=dtype)
        g[3] = float("nan")  # act > 0: passes through, into its channel's sum
    want, want_sum = _relu_grad_sum_reference(grad, act)
    with torch.no_grad():
        got = grad.clone(memory_format=cl)
        got_sum = conv_mod._relu_grad_sum(got, act)
    assert calls == [1]
    assert got_sum.dtype == dtype and got_sum.shape == (shape[1],)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got_sum.double(), want_sum, rtol=tol, atol=tol, equal_nan=True)


def test_relu_grad_sum_falls_back_off_the_native_layout(monkeypatch):
    """A contiguous (NCHW) buffer, or a call under autograd recording, takes threshold_backward
    and a sum: the same values; the native kernel is not called."""
    from fastflow import _backend as B

    if hasattr(B._C, "relu_grad_sum_cpu"):
        monkeypatch.setattr(B._C, "relu_grad_sum_cpu", lambda *a, **k: pytest.fail("native"))
    torch.manual_seed(8)
    act, grad = torch.randn(3, 4, 5, 6).relu_(), torch.randn(3, 4, 5, 6)
    want, want_sum = _relu_grad_sum_reference(grad, act)
    with torch.no_grad():
        got = grad.clone()
        got_sum = conv_mod._relu_grad_sum(got, act)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got_sum.double(), want_sum, rtol=1e-5, atol=1e-5)
    got = grad.clone(memory_format=torch.channels_last)  # grad mode on: not the native path
    torch.testing.assert_close(
        conv_mod._relu_grad_sum(got, act.contiguous(memory_format=torch.channels_last)).double(),
        want_sum, rtol=1e-5, atol=1e-5,
    )  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,c,threads", [(7, 5, 1), (0, 3, 1), (1000, 40, 2), (3, 1, 2)])
def test_mm_bias_relu_matches_addmm_relu(
    monkeypatch, set_threads, dtype, rows, c, threads, cpu_isa
):
    """relu(a @ b + bias) through the native in-place bias + ReLU pass (bias_relu_cpu) equals
    torch.relu(torch.addmm(...)) (NaN stays NaN, as torch.relu), on 1 and 2 threads (40000
    elements: above the parallel grain), and the native pass ran."""
    calls = _count_native(monkeypatch, "bias_relu_cpu")
    set_threads(threads)
    torch.manual_seed(9)
    a, b = torch.randn(rows, 6, dtype=dtype), torch.randn(6, c, dtype=dtype)
    bias = torch.randn(c, dtype=dtype)
    if rows:
        a[0, 0] = float("nan")  # a NaN row
    want = torch.relu(torch.addmm(bias, a, b))
    with torch.no_grad():
        got = conv_mod._mm_bias_relu(a, b, bias)
    assert calls == [1]
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


_BUF = torch.zeros(8)
_P = _BUF.data_ptr()
_ROW_KERNELS = {
    "relu_grad_sum_cpu": dict(grad_ptr=_P, act_ptr=_P, sum_ptr=_P),
    "bias_relu_cpu": dict(y_ptr=_P, bias_ptr=_P),
}


@pytest.mark.parametrize(
    "kernel,change,match",
    [
        ("relu_grad_sum_cpu", {"c": 0}, "rows >= 0 and c >= 1"),
        ("relu_grad_sum_cpu", {"rows": -1}, "rows >= 0 and c >= 1"),
        ("relu_grad_sum_cpu", {"rows": 2**62}, "overflows"),
        ("relu_grad_sum_cpu", {"act_ptr": 0}, "act: null pointer"),
        ("relu_grad_sum_cpu", {"dtype": 2}, "fp32 and fp64 only"),
        ("relu_grad_sum_cpu", {"nthreads": 0}, "nthreads"),
        ("bias_relu_cpu", {"c": 0}, "rows >= 0 and c >= 1"),
        ("bias_relu_cpu", {"rows": 2**62}, "overflows"),
        ("bias_relu_cpu", {"bias_ptr": 0}, "bias: null pointer"),
        ("bias_relu_cpu", {"dtype": 2}, "fp32 and fp64 only"),
        ("bias_relu_cpu", {"nthreads": 0}, "nthreads"),
    ],
)
def test_row_kernels_reject_bad_arguments(kernel, change, match):
    """The ReLU passes check sizes, pointers, dtype and threads themselves (ValueError)."""
    from fastflow import _backend as B

    if not hasattr(B._C, kernel):
        pytest.skip("no native kernels")
    args = dict(dtype=0, rows=2, c=4, nthreads=1, **_ROW_KERNELS[kernel])
    with pytest.raises(ValueError, match=match):
        getattr(B._C, kernel)(**{**args, **change})


def test_conv_mlp3_ops_pass_opcheck_and_match_the_function():
    """``fastflow::conv_mlp3_fwd`` / ``_bwd`` (what a compiled conditioner calls): opcheck
    (schema, fake layouts, autograd registration) and the values and gradients of conv_mlp3."""
    from fastflow.ops.conv import _image_of_rows, _mlp3_bwd_op, _mlp3_fwd_op, conv_mlp3

    if not fastflow.info()["cpu_kernels"]:
        pytest.skip("no native kernels")
    ps = _mlp3_params(3, 8, 4, torch.float32, seed=2)
    ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)  # as the module keeps
    x = torch.randn(2, 3, 5, 4).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(_mlp3_fwd_op, (x, *ps))
    out, x9, h1, h2 = _mlp3_fwd_op(x.detach(), *[p.detach() for p in ps])
    g = torch.randn_like(out)
    w1, _, w2, _, w3, _ = (p.detach() for p in ps)
    torch.library.opcheck(_mlp3_bwd_op, (g, x.detach(), w1, w2, w3, x9, h1, h2))
    gi = torch.randn(2, 4, 5, 4)
    got = _value_and_grads(lambda *a: _image_of_rows(_mlp3_fwd_op(*a)[0], x), x, ps, gi)
    for a, r in zip(got, _value_and_grads(conv_mlp3, x, ps, gi)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        assert a.stride() == r.stride()


def test_compiled_glow_conditioner_calls_the_mlp3_op_and_matches_eager(mlp3_limits):
    """Under torch.compile Glow's small conditioner is the ``conv_mlp3`` op (not inductor's
    convolutions), with the plain layers' values and gradients."""
    if not fastflow.info()["cpu_kernels"]:
        pytest.skip("no native kernels")
    from fastflow.nn.coupling import conv_subnet

    torch.manual_seed(3)
    net = conv_subnet(hidden=8)(2, 4)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 2, 4, 4, requires_grad=True)
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch.compile(net, backend=record, fullgraph=True)(x)
    assert "fastflow.conv_mlp3_fwd" in graphs[0] and "conv2d" not in graphs[0]
    compiled = torch.compile(net, fullgraph=True)
    plain = nn.Sequential(*net)
    g = torch.randn(3, 4, 4, 4)
    got = _value_and_grads(lambda x, *_: compiled(x), x, list(net.parameters()), g)
    for a, r in zip(got, _value_and_grads(lambda x, *_: plain(x), x, list(net.parameters()), g)):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)
