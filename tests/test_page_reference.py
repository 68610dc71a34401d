"""benchmarks/page_reference.py, the independent plain-PyTorch cross-check of reslab's ResNet-9 loop."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from reslab.models import create_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "page_reference.py"


@pytest.fixture(scope="module")
def page():
    spec = importlib.util.spec_from_file_location("page_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reference_network_computes_reslab_resnet9(page):
    """Written independently, the two networks are the same function: same parameter count, and
    the reference loaded with reslab's weights (in module order) gives reslab's logits."""
    ours = create_model("resnet9").eval()
    ref = page.resnet9(64).eval()
    assert sum(p.numel() for p in ref.parameters()) == 6_573_120
    theirs, mine = list(ref.state_dict().values()), list(ours.state_dict().values())
    assert [t.shape for t in theirs] == [t.shape for t in mine]
    with torch.no_grad():
        for t, m in zip(theirs, mine):
            t.copy_(m)
        x = torch.randn(4, 3, 32, 32)
        torch.testing.assert_close(ref(x), ours(x), rtol=1e-4, atol=1e-5)


def test_augment_takes_reflect_padded_crops_and_flips(page):
    torch.manual_seed(0)
    images = torch.randn(64, 3, 32, 32)
    padded = F.pad(images, (4, 4, 4, 4), mode="reflect")
    out = page.augment(padded, cutout=0)
    windows = padded.unfold(2, 32, 1).unfold(3, 32, 1)  # (N, 3, 9, 9, 32, 32): every crop
    flips = 0
    for i in range(len(images)):
        candidates = windows[i].permute(1, 2, 0, 3, 4).reshape(81, 3, 32, 32)
        plain = (candidates == out[i]).flatten(1).all(1).any()
        mirrored = (candidates.flip(3) == out[i]).flatten(1).all(1).any()
        assert plain or mirrored, f"image {i} is not a crop of its padded image or its mirror"
        flips += int(mirrored and not plain)
    assert 16 < flips < 48  # about half are mirrored


def test_augment_cutout_zeroes_one_square_inside_the_image(page):
    torch.manual_seed(1)
    padded = F.pad(torch.rand(32, 3, 32, 32) + 1, (4, 4, 4, 4), mode="reflect")  # no zero pixels
    out = page.augment(padded, cutout=8)
    zero = (out == 0).all(1)  # (N, 32, 32)
    assert zero.flatten(1).sum(1).tolist() == [64] * 32
    for mask in zero:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7


def test_reference_trains_end_to_end_on_tiny_cifar_files(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}.bin", 8) for i in range(1, 6)] + [("test_batch.bin", 6)]:
        labels = rng.integers(0, 10, (n, 1), dtype=np.uint8)
        (tmp_path / name).write_bytes(np.hstack([labels, rng.integers(0, 256, (n, 3072), dtype=np.uint8)]).tobytes())
    result = subprocess.run([sys.executable, str(SCRIPT), "--data-dir", str(tmp_path), "--epochs", "2",
                             "--width", "4", "--batch", "8", "--precision", "fp32"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:2]] == [["epoch", "1"], ["epoch", "2"]]
    assert lines[-1].startswith("test accuracy ")
