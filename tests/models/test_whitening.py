"""PatchWhitening: fixed filters that whiten k×k patches (the input whitening of the fast CIFAR
recipes), and ResNet-9's ``whiten`` option that puts one in front of the stem."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reslab
from reslab.models.layers import PatchWhitening, fit_whitening


def correlated_images(n: int = 64, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    """Smooth random images: neighbouring pixels and channels strongly correlated."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(n, 1, size // 3, size // 3, generator=g)
    mix = torch.randn(n, c, size // 3, size // 3, generator=g)
    x = F.interpolate(coarse + 0.3 * mix, size=size, mode="bilinear", align_corners=False)
    return x + 0.05 * torch.randn(n, c, size, size, generator=g)


def test_fitted_filters_decorrelate_the_patches_and_scale_them_to_unit_variance():
    x = correlated_images()
    layer = PatchWhitening(3, patch=2).fit(x)
    assert bool(layer.fitted)
    # the second moment of the patches, computed independently in numpy
    patches = F.unfold(x, 2).transpose(1, 2).reshape(-1, 12).double().numpy()
    eigenvalues = np.linalg.eigvalsh(patches.T @ patches / len(patches))[::-1]
    with torch.no_grad():
        out = F.conv2d(x, layer.weight)  # without the bias
    assert out.shape == (64, 24, 11, 11)
    half = out[:, :12].permute(0, 2, 3, 1).reshape(-1, 12).double().numpy()
    moment = half.T @ half / len(half)
    expected = np.diag(eigenvalues / (eigenvalues + layer.eps))
    np.testing.assert_allclose(moment, expected, atol=2e-4)
    assert eigenvalues[0] > 100 * eigenvalues[-1]  # the patches really were correlated
    torch.testing.assert_close(out[:, 12:], -out[:, :12])  # each filter and its negation


def test_unfitted_filters_pass_each_pixel_through_with_both_signs():
    layer = PatchWhitening(2, patch=3)
    x = torch.randn(4, 2, 7, 7)
    with torch.no_grad():
        out = layer(x)
    pixels = F.unfold(x, 3).view(4, 18, 5, 5) / (1 + layer.eps) ** 0.5
    torch.testing.assert_close(out, torch.cat([pixels, -pixels], 1))
    assert not bool(layer.fitted)


def test_filters_are_frozen_the_bias_is_trained_and_both_are_saved():
    layer = PatchWhitening(3).fit(correlated_images())
    assert not layer.weight.requires_grad and layer.bias.requires_grad
    assert torch.count_nonzero(layer.bias) == 0
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "fitted"}
    copy = PatchWhitening(3)
    copy.load_state_dict(state)
    assert bool(copy.fitted) and torch.equal(copy.weight, layer.weight)


def test_fit_whitening_fits_only_layers_not_yet_fitted():
    model = reslab.create_model("resnet9", widths=(8, 8, 8, 8), whiten=2)
    assert fit_whitening(model, correlated_images(size=12)) == 1
    before = model.whiten.weight.clone()
    assert fit_whitening(model, correlated_images(size=12, seed=1)) == 0
    assert torch.equal(model.whiten.weight, before)


@pytest.mark.parametrize("shape", [(4, 1, 12, 12), (4, 3, 1, 12), (3, 12, 12)])
def test_fit_refuses_images_of_the_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"needs images of shape \(N, 3, H, W\) with H, W >= 2"):
        PatchWhitening(3).fit(torch.randn(shape))


def test_resnet9_with_whitening_feeds_the_stem_24_channels_one_pixel_smaller():
    model = reslab.create_model("resnet9", whiten=2)
    plain = reslab.create_model("resnet9")
    assert model.stem[0].in_channels == 24
    # 24 fixed filters of 3×2×2 plus their 24 biases; the stem's conv takes 24 channels, not 3
    extra = 24 * 12 + 24 + (24 - 3) * 64 * 9
    assert sum(p.numel() for p in model.parameters()) == 6_573_120 + extra
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 6_573_120 + extra - 24 * 12
    seen = {}
    model.stem.register_forward_hook(lambda m, i, o: seen.update(stem=o.shape))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert seen["stem"] == (2, 64, 31, 31)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) with H, W >= 9 "):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="whiten is the side of the whitened patches"):
        reslab.create_model("resnet9", whiten=-1)


def test_whitened_resnet9_runs_through_optimize_for_inference_unchanged():
    torch.manual_seed(0)
    model = reslab.create_model("resnet9", widths=(8, 16, 16, 16), whiten=2).eval()
    fit_whitening(model, correlated_images(size=16))
    with torch.no_grad():
        model.whiten.bias.normal_()
        x = torch.randn(3, 3, 16, 16)
        fast = reslab.optimize_for_inference(model, precision="fp32")
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-4)
