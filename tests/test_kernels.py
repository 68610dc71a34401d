"""reslab.kernels: the fused BN-(add-)ReLU CPU kernel against PyTorch's modules.

float64 makes the comparisons exact up to rounding; gradcheck checks the hand-written backward
against finite differences; bf16 is checked against a float64 computation from the same inputs.
The kernel is compiled on first use (about half a minute, once per machine).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import reslab.kernels as kernels
from reslab import create_model
from reslab.kernels import bn_relu, fusable, set_fused_kernels
from reslab.train.step import make_train_step

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason=f"fused kernel not built here: {kernels.unavailable_reason()}")


def cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def make_bn(c: int, dtype=torch.float32, seed: int = 0) -> nn.BatchNorm2d:
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.fixture
def count_fused(monkeypatch):
    """How many times the fused kernel ran, by kind (plain BN-ReLU / BN-add-ReLU)."""
    calls = {"plain": 0, "residual": 0}
    apply = kernels._BNReLU.apply

    def counting(x, w, b, r, eps):
        calls["plain" if r is None else "residual"] += 1
        return apply(x, w, b, r, eps)

    monkeypatch.setattr(kernels._BNReLU, "apply", counting)
    return calls


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_the_modules(dtype, tol, residual):
    """Output, input/residual/weight/bias gradients, running statistics and the batch counter."""
    torch.manual_seed(1)
    x = cl(torch.randn(6, 8, 5, 7, dtype=dtype) * 3 + 2).requires_grad_()
    r = cl(torch.randn(6, 8, 5, 7, dtype=dtype)).requires_grad_() if residual else None
    bn = make_bn(8, dtype)
    ref_bn = copy.deepcopy(bn)
    x2 = x.detach().clone().requires_grad_()
    r2 = r.detach().clone().requires_grad_() if residual else None
    y = bn_relu(bn, x, r)
    y2 = F.relu(ref_bn(x2) + (r2 if residual else 0))
    assert y.is_contiguous(memory_format=torch.channels_last) and y.shape == y2.shape
    g = torch.randn_like(y2)
    y.backward(g)
    y2.backward(g)
    close = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(y, y2, **close)
    torch.testing.assert_close(x.grad, x2.grad, **close)
    if residual:
        torch.testing.assert_close(r.grad, r2.grad, **close)
    for a, b in ((bn.weight.grad, ref_bn.weight.grad), (bn.bias.grad, ref_bn.bias.grad),
                 (bn.running_mean, ref_bn.running_mean), (bn.running_var, ref_bn.running_var)):
        torch.testing.assert_close(a, b, **close)
    assert bn.num_batches_tracked.item() == ref_bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("residual", [False, True])
def test_backward_passes_gradcheck(residual):
    torch.manual_seed(2)
    x = cl(torch.randn(3, 4, 3, 5, dtype=torch.float64)).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64).requires_grad_()
    inputs = (x, w, b)
    if residual:
        inputs += (cl(torch.randn(3, 4, 3, 5, dtype=torch.float64)).requires_grad_(),)

    def f(x, w, b, r=None):
        return kernels._BNReLU.apply(x, w, b, r, 1e-5)[0]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("residual", [False, True])
def test_bf16_is_at_least_as_accurate_as_pytorch(residual):
    """The kernel computes in float and rounds once; PyTorch rounds BN's output to bf16 first.
    Both are compared with float64 on the same bf16 inputs."""
    torch.manual_seed(3)
    x0 = cl((torch.randn(16, 16, 8, 8) * 2 + 3).bfloat16())
    r0 = cl(torch.randn(16, 16, 8, 8).bfloat16()) if residual else None
    g = cl(torch.randn(16, 16, 8, 8).bfloat16())
    bn = make_bn(16)

    def run(fn, bn, dtype):
        x = x0.to(dtype).requires_grad_()
        r = r0.to(dtype).requires_grad_() if residual else None
        y = fn(bn, x, r)
        y.backward(g.to(dtype))
        return [t.double() for t in (y, x.grad, bn.weight.grad, bn.bias.grad)]

    def modules(bn, x, r):
        return F.relu(bn(x) + (r if r is not None else 0))

    exact = run(modules, copy.deepcopy(bn).double(), torch.float64)
    fused = run(bn_relu, copy.deepcopy(bn), torch.bfloat16)
    ref = run(modules, copy.deepcopy(bn), torch.bfloat16)
    for f, p, e in zip(fused, ref, exact):
        err_fused = ((f - e).abs().mean() / e.abs().mean()).item()
        err_ref = ((p - e).abs().mean() / e.abs().mean()).item()
        assert err_fused <= 1.01 * err_ref + 1e-6 and err_fused < 5e-3


def test_falls_back_to_the_modules_where_it_cannot_stand_in(count_fused):
    bn = make_bn(4)
    x = cl(torch.randn(2, 4, 3, 3))
    assert fusable(bn, x)
    # eval mode, NCHW input, a hook on the BN, SyncBN-like subclasses: all run the modules
    assert not fusable(bn, x.contiguous())
    assert not fusable(copy.deepcopy(bn).eval(), x)
    assert not fusable(nn.BatchNorm2d(4, affine=False), x)
    assert not fusable(nn.BatchNorm2d(4, momentum=None), x)
    seen = []
    hooked = copy.deepcopy(bn)
    hooked.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert not fusable(hooked, x)
    bn_eval = copy.deepcopy(bn).eval()
    torch.testing.assert_close(bn_relu(bn_eval, x), F.relu(bn_eval(x)))
    torch.testing.assert_close(bn_relu(hooked, x.contiguous()), F.relu(bn(x.contiguous())))
    assert seen == [x.shape]
    # a residual of another dtype goes through the modules too
    r = cl(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(bn_relu(copy.deepcopy(bn), x, r), F.relu(bn(x).double() + r))
    assert count_fused == {"plain": 0, "residual": 0}


@pytest.mark.parametrize("name, kwargs, size, fused", [
    ("resnet20", {}, 32, {"plain": 10, "residual": 9}),
    ("resnet20", {"shortcut": "B"}, 32, {"plain": 10, "residual": 9}),
    ("resnet20", {"unit": "relu_before_add"}, 32, {"plain": 19, "residual": 0}),
    ("resnet18", {}, 32, {"plain": 9, "residual": 8}),
    ("preact_resnet164", {}, 32, {"plain": 163, "residual": 0}),
    ("resnet9", {"widths": (8, 16, 16, 32)}, 32, {"plain": 8, "residual": 0}),
])
def test_models_train_the_same_with_the_fused_path(name, kwargs, size, fused, count_fused):
    """One forward/backward in float64: same logits, gradients and BN buffers, and every BN-ReLU
    of the model actually went through the kernel."""
    torch.manual_seed(4)
    model = create_model(name, num_classes=10, **kwargs).double().to(memory_format=torch.channels_last)
    ref = copy.deepcopy(model)
    assert set_fused_kernels(model) > 0
    x = cl(torch.randn(3, 3, size, size, dtype=torch.float64))
    out, ref_out = model(x), ref(x)
    out.square().sum().backward()
    ref_out.square().sum().backward()
    assert count_fused == fused
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        scale = q.grad.abs().max().item()  # the gradients span many orders of magnitude
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-10 * scale, msg=n)
    for (n, a), b in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)


def test_the_analysis_hooks_and_lesions_see_the_plain_modules(count_fused):
    """A hook on residual_out (the residual-response experiment) and a lesioned unit keep the
    unfused order, so they observe exactly what they observe without the switch."""
    model = create_model("resnet20").to(memory_format=torch.channels_last)
    set_fused_kernels(model)
    seen = []
    model.layer1[0].residual_out.register_forward_hook(lambda m, i, o: seen.append(o))
    model.layer2[1].lesioned = True
    model(cl(torch.randn(2, 3, 32, 32)))
    assert len(seen) == 1 and count_fused["residual"] == 7  # 9 units, one hooked, one lesioned


def test_train_step_switches_the_path_on_and_warns_when_it_cannot_build(monkeypatch):
    model = create_model("resnet20")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    make_train_step(model, opt, channels_last=True, fused_kernels=True)
    assert model.fused_bn_relu and all(u.fused_bn_relu for u in model.units())
    make_train_step(model, opt, channels_last=True)
    assert not model.fused_bn_relu and not any(u.fused_bn_relu for u in model.units())
    monkeypatch.setattr(kernels, "_ext", None)
    monkeypatch.setattr(kernels, "_error", "RuntimeError: no C++ compiler found")
    with pytest.warns(UserWarning, match="not available .*no C\\+\\+ compiler found.*standard modules"):
        step = make_train_step(model, opt, channels_last=True, fused_kernels=True)
    assert not model.fused_bn_relu
    x, y = cl(torch.randn(4, 3, 32, 32)), torch.randint(0, 10, (4,))
    assert torch.isfinite(step(x, y).loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_same_bits_on_any_number_of_threads(dtype):
    """The reductions are cut into the same chunks whatever the thread count (a resumed run on
    another machine size computes what the uninterrupted one did). 48 channels: three 16-lane
    groups; 35 channels: two groups and a scalar remainder."""
    ext = kernels._load()
    threads = torch.get_num_threads()
    for c in (48, 35):
        torch.manual_seed(5)
        x = torch.randn(3000, c).to(dtype)
        g = torch.randn(3000, c).to(dtype)
        r = torch.randn(3000, c).to(dtype)
        w, b = torch.rand(c) + 0.5, torch.randn(c)
        outs = []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                y, mean, invstd, var = ext.forward(x, w, b, r, 1e-5)
                outs.append([y, mean, invstd, var, *ext.backward(g, x, y, w, b, mean, invstd)])
        finally:
            torch.set_num_threads(threads)
        for other in outs[1:]:
            for a, b_ in zip(outs[0], other):
                assert torch.equal(a, b_)


def test_the_fast_recipe_uses_the_fused_kernel():
    from reslab.train import TrainConfig

    assert TrainConfig.from_recipe("fast").fused_kernels
    assert not TrainConfig.from_recipe("default").fused_kernels


def test_bad_tensors_get_a_clear_error():
    ext = kernels._load()
    w, b = torch.ones(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="contiguous \\(M, C\\) view"):
        ext.forward(torch.randn(4, 8).t(), w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must be Double for Double activations"):
        ext.forward(torch.randn(8, 4, dtype=torch.float64), w, b, None, 1e-5)
    with pytest.raises(RuntimeError, match="residual must match x"):
        ext.forward(torch.randn(8, 4), w, b, torch.randn(8, 4, dtype=torch.float64), 1e-5)


# ----------------------------------------------------------------------------- the 2×2 max-pool

def pool_both(x: torch.Tensor, g_seed: int = 0):
    """(values, input gradient) of reslab's kernel and of F.max_pool2d for the same x and grad."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = kernels.max_pool2x2(xa), F.max_pool2d(xb, 2)
    g = torch.randn(ya.shape, generator=torch.Generator().manual_seed(g_seed)).to(x.dtype)
    ya.backward(g)
    yb.backward(g)
    return (ya, xa.grad), (yb, xb.grad)


# 48 channels: three 16-lane groups; 35: two and a scalar remainder; 64 in bf16: two 32-lane
# groups of gradient bits. An odd side drops its last row/column (PyTorch's floor mode), which
# then gets a zero gradient.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("channels", [48, 35, 64])
@pytest.mark.parametrize("size", [(8, 6), (7, 6), (8, 7), (7, 5)])
def test_max_pool_gives_pytorchs_values_and_gradients_bit_for_bit(dtype, channels, size):
    torch.manual_seed(6)
    x = torch.randn(3, channels, *size).to(dtype)
    x = x.round(decimals=1)  # many exact ties inside windows
    x[0, :, :2, :2] = 0.0  # whole windows tied (what a ReLU before the pool leaves)
    x[1, 3, 2, 2] = x[1, 3, 3, 3] = float("nan")  # two NaNs in one window: the last wins
    x[2, 5, 4, 4] = float("-inf")
    (ya, ga), (yb, gb) = pool_both(cl(x))
    assert ya.is_contiguous(memory_format=torch.channels_last) and ya.dtype == dtype
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    assert torch.equal(ga, gb)
    assert int(ya.isnan().sum()) == 1


def test_max_pool_gradcheck_and_no_silent_double_backward():
    x = cl(torch.randn(2, 17, 5, 7, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(kernels.max_pool2x2, (x,))
    y = kernels.max_pool2x2(x)
    v = torch.randn_like(y, requires_grad=True)
    (g,) = torch.autograd.grad(y, x, v, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_a_traced_model_records_pytorchs_pooling():
    model = create_model("resnet9", widths=(8, 16, 16, 32)).to(memory_format=torch.channels_last).eval()
    set_fused_kernels(model)
    x = cl(torch.randn(1, 3, 32, 32))
    traced = torch.jit.trace(model, x)
    assert "max_pool2d" in str(traced.inlined_graph) and "PythonOp" not in str(traced.inlined_graph)
    torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("shape, layout, dtype", [
    ((2, 16, 6, 6), torch.contiguous_format, torch.float32),  # NCHW
    ((2, 16, 6, 6), torch.channels_last, torch.float16),
])
def test_max_pool_leaves_what_it_does_not_cover_to_pytorch(shape, layout, dtype, monkeypatch):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=layout)
    assert not kernels.poolable(x)
    monkeypatch.setattr(kernels, "_MaxPool2x2", None)  # would fail if it were called
    torch.testing.assert_close(kernels.max_pool2x2(x), F.max_pool2d(x, 2), rtol=0, atol=0)


def test_resnet9_pools_through_the_kernel_when_switched_on(monkeypatch):
    # eval: the BN-ReLU kernel stays out (training only), so the logits must be identical.
    model = create_model("resnet9", widths=(8, 16, 16, 32)).to(memory_format=torch.channels_last).eval()
    calls = []
    real = kernels._MaxPool2x2.apply
    monkeypatch.setattr(kernels._MaxPool2x2, "apply", lambda x: calls.append(x.shape) or real(x))
    x = cl(torch.randn(2, 3, 32, 32))
    ref = model(x)
    assert calls == []
    set_fused_kernels(model)
    assert torch.equal(model(x), ref) and len(calls) == 3  # one pool per stage
    set_fused_kernels(model, False)
    model(x)
    assert len(calls) == 3
