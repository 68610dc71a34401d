"""Page 2018's ResNet-9 recipe in plain PyTorch, independent of reslab: the cross-check of its loop.

This file imports nothing from reslab. It reads the CIFAR-10 binary files itself, augments on
tensors (reflect-padded random crops, flips, 8×8 cutout painted with the mean, i.e. 0 after
normalisation), and trains Page's network with his optimiser: SGD Nesterov 0.9, weight decay
5e-4 on every parameter, lr 0.4·(batch/512) rising linearly from 0 to its peak at 5/24 of
training and falling linearly to 0, no label smoothing. Running reslab with the same settings,

    reslab train --model resnet9 --model-kwargs "widths=(32,64,128,256)" --data cifar10 \\
        --data-dir DIR --recipe fast --cutout 8 --batch-size 512 --lr 0.4 --label-smoothing 0 \\
        --decay-bn-bias --onecycle-peak 0.2083 --epochs 10 --eval-every 10 --eval-tta flip

and this script with ``--width 32 --epochs 10 --batch 512`` should end within seed noise of each
other; a larger gap is a bug in one of them. Usage:

    python benchmarks/page_reference.py --data-dir ../shared/data/cifar-10-batches-bin
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# -------------------------------------------------------------------------------------------
# Data: the binary CIFAR-10 files, normalised once, augmented per epoch on whole tensors
# -------------------------------------------------------------------------------------------

MEAN = torch.tensor([125.31, 122.95, 113.87]).view(1, 3, 1, 1)
STD = torch.tensor([62.99, 62.09, 66.70]).view(1, 3, 1, 1)


def load(folder: Path, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) normalised fp32 and labels (N,) from CIFAR-10 binary batches."""
    raw = np.concatenate([np.fromfile(folder / n, np.uint8).reshape(-1, 3073) for n in names])
    images = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).copy())
    return (images.float() - MEAN) / STD, torch.from_numpy(raw[:, 0].astype(np.int64))


def augment(padded: torch.Tensor, cutout: int) -> torch.Tensor:
    """Random 32×32 crops of the reflect-padded images, random flips, one cutout square each."""
    n, size = len(padded), padded.shape[-1] - 8
    dx, dy = torch.randint(0, 9, (n,)), torch.randint(0, 9, (n,))
    out = torch.empty(n, 3, size, size)
    for i in range(9):  # one slice per crop offset: 81 tensor ops, no per-image Python
        for j in range(9):
            chosen = (dx == i) & (dy == j)
            out[chosen] = padded[chosen][:, :, j:j + size, i:i + size]
    flipped = torch.rand(n) < 0.5
    out[flipped] = out[flipped].flip(3)
    if cutout:
        r = torch.arange(size)
        cx = torch.randint(0, size - cutout + 1, (n, 1, 1))
        cy = torch.randint(0, size - cutout + 1, (n, 1, 1))
        inside = ((r.view(1, 1, -1) >= cx) & (r.view(1, 1, -1) < cx + cutout)
                  & (r.view(1, -1, 1) >= cy) & (r.view(1, -1, 1) < cy + cutout))
        out = out * (~inside).unsqueeze(1)
    return out

# -------------------------------------------------------------------------------------------
# Network: Page's ResNet-9 (prep, layer1 + residual, layer2, layer3 + residual, ×0.125)
# -------------------------------------------------------------------------------------------


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.res = nn.Sequential(conv_bn(c, c), conv_bn(c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.res(x)


class Mul(nn.Module):
    def __init__(self, weight: float) -> None:
        super().__init__()
        self.weight = weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def resnet9(width: int) -> nn.Sequential:
    w = [width, 2 * width, 4 * width, 8 * width]
    return nn.Sequential(
        conv_bn(3, w[0]),
        conv_bn(w[0], w[1]), nn.MaxPool2d(2), Residual(w[1]),
        conv_bn(w[1], w[2]), nn.MaxPool2d(2),
        conv_bn(w[2], w[3]), nn.MaxPool2d(2), Residual(w[3]),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w[3], 10, bias=False), Mul(0.125),
    )

# -------------------------------------------------------------------------------------------
# Training and evaluation
# -------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--width", type=int, default=64, help="stem width (Page: 64)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--cutout", type=int, default=8)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    x_train, y_train = load(args.data_dir, [f"data_batch_{i}.bin" for i in range(1, 6)])
    x_test, y_test = load(args.data_dir, ["test_batch.bin"])
    padded = F.pad(x_train, (4, 4, 4, 4), mode="reflect")
    net = resnet9(args.width).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.0, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = len(x_train) // args.batch
    total, peak_lr = args.epochs * steps, 0.4 * args.batch / 512
    peak = 5 / 24 * total
    autocast = dict(device_type="cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    start, step = time.time(), 0
    for epoch in range(args.epochs):
        images, order = augment(padded, args.cutout), torch.randperm(len(x_train))
        loss_sum = correct = 0.0
        for k in range(steps):
            idx = order[k * args.batch:(k + 1) * args.batch]
            x, y = images[idx].contiguous(memory_format=torch.channels_last), y_train[idx]
            lr = peak_lr * (step / peak if step < peak else (total - step) / (total - peak))
            for group in opt.param_groups:
                group["lr"] = lr
            with torch.autocast(**autocast):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item()
            correct += (logits.argmax(1) == y).sum().item()
        print(f"epoch {epoch + 1} loss {loss_sum / steps:.3f} train acc {correct / (steps * args.batch):.4f} "
              f"{time.time() - start:.0f}s", flush=True)

    net.eval()
    plain = flip = 0
    with torch.inference_mode(), torch.autocast(**autocast):
        for k in range(0, len(x_test), 1000):
            x, y = x_test[k:k + 1000].contiguous(memory_format=torch.channels_last), y_test[k:k + 1000]
            p1 = net(x).float().softmax(1)
            p2 = p1 + net(x.flip(3)).float().softmax(1)
            plain += (p1.argmax(1) == y).sum().item()
            flip += (p2.argmax(1) == y).sum().item()
    print(f"test accuracy {plain / len(x_test):.4f} (with flip TTA {flip / len(x_test):.4f}); "
          f"{time.time() - start:.0f}s in all")


if __name__ == "__main__":
    main()
