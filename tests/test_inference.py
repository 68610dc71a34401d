"""`optimize_for_inference`: the same function as the model it came from, in each of its forms,
and (compiled) the weights really frozen into oneDNN's packed convolutions."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from reslab import create_model, optimize_for_inference


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    m = create_model("resnet20")
    # Non-trivial BN statistics, so that folding them has something to get wrong.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 3, 32, 32) * 2 + 0.5)
    return m.eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def reference(model, x):
    with torch.no_grad():
        return model(x)


def test_fp32_is_the_same_function_and_leaves_the_model_alone(model, images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = optimize_for_inference(model, precision="fp32")
    with torch.no_grad():
        got = fast(images)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(model, images), rtol=1e-4, atol=1e-4)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())  # folded
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_bf16_agrees_within_bf16_tolerance(model, images):
    fast = optimize_for_inference(model)  # bf16, channels_last, folded
    with torch.no_grad():
        got = fast(images)
    assert got.dtype == torch.bfloat16
    ref = reference(model, images)
    # bf16 keeps 8 bits of mantissa; ~20 layers of rounding stay within a few percent.
    torch.testing.assert_close(got.float(), ref, rtol=0.05, atol=0.05 * ref.abs().max().item())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs PyTorch's oneDNN (mkldnn)")
def test_compiled_freezes_the_weights_into_packed_fused_convolutions(model, images):
    fast = optimize_for_inference(model, precision="fp32", compile=True)
    # Called with grad mode on: the module turns it off itself (freezing needs it off).
    got = fast(images)
    with profile() as prof:
        again = fast(images)
    names = {e.name for e in prof.events()}
    # Frozen: oneDNN's prepacked convolutions with the ReLU / residual add as post-ops. Without
    # freezing Inductor calls plain aten convolutions (measured: options={"freezing": True}
    # passed to torch.compile alone gives exactly that).
    assert any(n.startswith("mkldnn::_convolution_pointwise") for n in names), sorted(names)
    assert "aten::mkldnn_convolution" not in names and "aten::convolution" not in names
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(model, images), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, got)


def test_unknown_precision_is_refused(model):
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16; got 'int8'"):
        optimize_for_inference(model, precision="int8")
