"""Small building blocks shared by every family: convolutions, drop-path, shortcuts, input checks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=bias)


def conv1x1(in_ch: int, out_ch: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=bias)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): drop a whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop-path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ZeroPadShortcut(nn.Module):
    """Option A of He et al. 2015: subsample by striding and pad the new channels with zeros.

    Parameter-free, so a residual net with option A has exactly the parameters of its plain twin.
    The added channels are split evenly before and after the existing ones, as in the CIFAR
    reproductions (akamaster, fb.resnet.torch concatenates zeros after; both are identities on
    the original channels).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch < in_ch:
            raise ValueError(f"option A cannot reduce channels ({in_ch} -> {out_ch}); use option B")
        self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_ch - self.in_ch
        if extra:
            x = F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_ch}->{self.out_ch}, stride={self.stride}"


def check_input(x: torch.Tensor, in_chans: int, min_size: int, model: str) -> None:
    """Reject inputs a model cannot take, naming the shape it expects."""
    if x.ndim != 4 or x.shape[1] != in_chans or x.shape[-1] < min_size or x.shape[-2] < min_size:
        raise ValueError(
            f"{model} expects input of shape (N, {in_chans}, H, W) with H, W >= {min_size} "
            f"(smaller images vanish in its downsampling), got {tuple(x.shape)}. "
            + (
                f"Create the model with in_chans={x.shape[1]} for {x.shape[1]}-channel images."
                if x.ndim == 4 and x.shape[1] != in_chans
                else "Resize or pad the images."
            )
        )


def he_init(module: nn.Module) -> None:
    """He (MSRA) initialisation as in the papers: fan-out normal for convs, BN to (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PatchWhitening(nn.Conv2d):
    """A fixed k×k convolution whose filters whiten the image's k×k patches (PCA whitening).

    The patches of the input (C·k·k values each) are projected onto the eigenvectors of their
    second-moment matrix and scaled by 1/sqrt(eigenvalue + eps), so the outputs are decorrelated
    with unit variance; each filter comes with its negation (2·C·k·k outputs), so a ReLU that
    follows keeps both signs. The fast CIFAR-10 recipes whiten the input this way (Page 2018,
    "How to train your ResNet 8"; Jordan 2024, airbench): the first trained layer then sees
    inputs whose directions all vary alike, which lets a high learning rate work from the start.

    The filters are not trained (``requires_grad`` is False, so optimizers built from the
    trainable parameters leave them alone) and are saved with the model; the bias (zero at
    first) is, so the activation that follows can learn where to cut each direction. Until `fit`
    sees data they whiten independent unit-variance pixels, i.e. they pass each pixel through
    with both signs; ``reslab train`` fits them to the training images before the first step.
    No padding: the output is k-1 pixels smaller than the input.
    """

    def __init__(self, in_chans: int, patch: int = 2, eps: float = 5e-4) -> None:
        dim = in_chans * patch * patch
        super().__init__(in_chans, 2 * dim, patch)
        self.eps = eps
        self.weight.requires_grad_(False)
        nn.init.zeros_(self.bias)
        self.register_buffer("fitted", torch.tensor(False))
        self._set(torch.ones(dim, dtype=torch.float64), torch.eye(dim, dtype=torch.float64))

    def _set(self, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor) -> None:
        # largest variance first; the rows of `filters` are the scaled eigenvectors
        order = eigenvalues.argsort(descending=True, stable=True)
        std = (eigenvalues[order].clamp(min=0) + self.eps).sqrt()
        filters = eigenvectors[:, order].T / std[:, None]
        with torch.no_grad():
            self.weight.copy_(torch.cat([filters, -filters]).view_as(self.weight))

    @torch.no_grad()
    def fit(self, images: torch.Tensor, chunk: int = 1000) -> PatchWhitening:
        """Fit the filters to `images` (N, C, H, W), normalised as the model will see them."""
        c, k = self.in_channels, self.kernel_size[0]
        if images.dim() != 4 or images.shape[1] != c or min(images.shape[-2:]) < k:
            raise ValueError(f"PatchWhitening.fit needs images of shape (N, {c}, H, W) with "
                             f"H, W >= {k}, got {tuple(images.shape)}")
        dim = c * k * k
        moment = torch.zeros(dim, dim, dtype=torch.float64)
        count = 0
        for batch in images.split(chunk):
            patches = F.unfold(batch.float().cpu(), k).transpose(1, 2).reshape(-1, dim).double()
            moment += patches.T @ patches
            count += len(patches)
        self._set(*torch.linalg.eigh(moment / count))
        self.fitted.fill_(True)
        return self

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}, fitted={bool(self.fitted)}"


def unfitted_whitening(model: nn.Module) -> list[PatchWhitening]:
    """The `PatchWhitening` layers of `model` that have not seen data yet."""
    return [m for m in model.modules() if isinstance(m, PatchWhitening) and not m.fitted]


def fit_whitening(model: nn.Module, images: torch.Tensor) -> int:
    """Fit every not yet fitted `PatchWhitening` in `model` to `images` (normalised, N×C×H×W);
    returns how many it fitted. Modules fitted before (e.g. loaded from a checkpoint) are kept."""
    layers = unfitted_whitening(model)
    for m in layers:
        m.fit(images)
    return len(layers)
