"""download=True: fetch, md5 check, safe and atomic extraction, offline errors."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from reslab.data import DataError, DownloadError, load_dataset
from reslab.data import cifar
from reslab.data.download import extract


def make_archive(tmp_path: Path, name: str = "cifar-10-python.tar.gz") -> tuple[Path, str, np.ndarray]:
    """A CIFAR-10 python archive with 1 image per batch; returns (path, md5, train pixels)."""
    src = tmp_path / "src" / "cifar-10-batches-py"
    src.mkdir(parents=True)
    pixels = np.arange(6 * 3072, dtype=np.int64).reshape(6, 3072) % 251
    pixels = pixels.astype(np.uint8)
    for i, f in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        with open(src / f, "wb") as out:
            pickle.dump({b"data": pixels[i : i + 1], b"labels": [i]}, out, protocol=2)
    archive = tmp_path / name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest(), pixels[:5]


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "cifar-10-batches-py")


@pytest.mark.parametrize("as_uri", [False, True])
def test_download_with_good_checksum_extracts_and_loads(tmp_path, as_uri):
    archive, md5, pixels = make_archive(tmp_path)
    root = tmp_path / "data"
    url = archive.as_uri() if as_uri else str(archive)
    bundle = load_dataset("cifar10", data_dir=root, download=True, url=url, md5=md5)
    assert torch.equal(bundle.train.images, torch.from_numpy(pixels).reshape(5, 3, 32, 32))
    assert bundle.train.labels.tolist() == [0, 1, 2, 3, 4]
    assert (root / "cifar-10-batches-py" / "test_batch").is_file()
    assert leftovers(root) == []  # no archive, no .part file, no staging folder


def test_download_with_bad_checksum_leaves_nothing_behind(tmp_path):
    archive, _, _ = make_archive(tmp_path)
    root = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"checksum mismatch for .*expected 0{32}"):
        load_dataset("cifar10", data_dir=root, download=True, url=str(archive), md5="0" * 32)
    assert list(root.iterdir()) == []


def test_offline_download_says_what_to_do(tmp_path):
    url = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # nothing listens on the discard port
    with pytest.raises(DownloadError) as info:
        load_dataset("cifar10", data_dir=tmp_path, download=True, url=url)
    message = str(info.value)
    assert message.startswith(f"could not download {url}: ")
    assert f"download it by hand from {url} and pass --data-dir DIR" in message
    assert list(tmp_path.iterdir()) == []


def test_missing_local_archive_is_a_download_error(tmp_path):
    with pytest.raises(DownloadError, match="could not download .*nothing.tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "d", download=True, url=str(tmp_path / "nothing.tar.gz"), md5="0" * 32)


def test_default_source_is_the_official_archive_and_checksum(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "download_and_extract", lambda url, md5, root: calls.append((url, md5, root)))
    with pytest.raises(DataError, match="does not hold cifar100"):
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    assert calls == [("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", tmp_path)]


def test_known_archive_names_imply_their_checksum(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cifar, "download_and_extract", lambda url, md5, root: calls.append(md5))
    with pytest.raises(DataError):
        load_dataset("cifar10", data_dir=tmp_path, download=True, url="https://mirror.example/x/cifar-10-binary.tar.gz")
    assert calls == ["c32a1d4ab5d03f1284b67883e8d87530"]
    with pytest.raises(DataError, match="no known md5 for my.tar.gz; pass md5="):
        load_dataset("cifar10", data_dir=tmp_path, download=True, url="https://mirror.example/my.tar.gz")


def test_present_dataset_is_not_downloaded_again(tmp_path):
    archive, md5, _ = make_archive(tmp_path)
    root = tmp_path / "data"
    load_dataset("cifar10", data_dir=root, download=True, url=str(archive), md5=md5)
    archive.unlink()
    assert len(load_dataset("cifar10", data_dir=root, download=True, url=str(archive), md5=md5).train) == 5


def tar_with(tmp_path: Path, member: tarfile.TarInfo, payload: bytes = b"") -> Path:
    archive = tmp_path / "bad.tar"
    with tarfile.open(archive, "w") as tar:
        member.size = len(payload) if member.isfile() else 0
        tar.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return archive


@pytest.mark.parametrize("name", ["../evil.txt", "/tmp/evil.txt", "ok/../../evil.txt"])
def test_extraction_refuses_paths_outside_the_folder(tmp_path, name):
    archive = tar_with(tmp_path, tarfile.TarInfo(name), b"x")
    root = tmp_path / "root" / "inner"
    with pytest.raises(DownloadError, match="points outside the folder"):
        extract(archive, root)
    assert not (tmp_path / "root" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()
    assert list(root.iterdir()) == []


def test_extraction_refuses_links(tmp_path):
    link = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    with pytest.raises(DownloadError, match="is a link or device"):
        extract(tar_with(tmp_path, link), tmp_path / "root")
    assert list((tmp_path / "root").iterdir()) == []


def test_extraction_will_not_overwrite_an_existing_folder(tmp_path):
    archive, _, _ = make_archive(tmp_path)
    root = tmp_path / "root"
    (root / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DownloadError, match="already exists but does not hold the complete dataset; remove it"):
        extract(archive, root)
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-py"]
