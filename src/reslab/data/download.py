"""Fetch a dataset archive, verify its md5, and unpack it safely and atomically.

The archive is streamed to a temporary file beside its destination while its md5 is computed;
a wrong checksum deletes it. Extraction accepts only plain files and folders whose paths stay
inside the destination (no absolute paths, no "..", no links or devices), unpacks into a
temporary folder and then renames the archive's top-level entries into place, so an
interrupted download or extraction never leaves a half-written dataset behind.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from .base import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadError(DataError):
    """A dataset archive could not be fetched, did not match its checksum, or is unsafe."""


def _open(url: str, timeout: float):
    """A readable stream for an http(s)/ftp/file URL or a plain local path."""
    if "://" not in url:
        return open(url, "rb")
    return urllib.request.urlopen(url, timeout=timeout)  # noqa: S310 (scheme chosen by the caller)


def fetch(url: str, md5: str, dest: Path, *, timeout: float = 60.0) -> Path:
    """Download `url` (or copy a local path) to `dest` if its md5 is `md5`; return `dest`."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with _open(url, timeout) as stream:
                    while chunk := stream.read(CHUNK):
                        digest.update(chunk)
                        out.write(chunk)
            except (OSError, urllib.error.URLError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DownloadError(
                    f"could not download {url}: {reason}; download it by hand from {url} "
                    f"and pass --data-dir DIR (the folder that holds it, unpacked)"
                ) from e
        if digest.hexdigest() != md5.lower():
            raise DownloadError(
                f"checksum mismatch for {url}: md5 is {digest.hexdigest()}, expected {md5}; "
                "the download is corrupt or not the expected archive. Try again, or download it "
                "by hand, check its md5 and pass --data-dir DIR"
            )
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


def _safe_members(tar: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    members = []
    for m in tar.getmembers():
        parts = PurePosixPath(m.name).parts
        if m.name.startswith(("/", "\\")) or PurePosixPath(m.name).is_absolute() or ".." in parts:
            raise DownloadError(f"refusing to extract {archive}: member {m.name!r} points outside the folder")
        if not (m.isfile() or m.isdir()):
            raise DownloadError(
                f"refusing to extract {archive}: member {m.name!r} is a link or device, "
                "which a dataset archive never needs"
            )
        members.append(m)
    return members


def extract(archive: Path, root: Path) -> list[Path]:
    """Unpack a tar archive into `root` atomically; return the top-level paths created."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
    try:
        try:
            with tarfile.open(archive) as tar:
                members = _safe_members(tar, archive)
                # The "data" filter re-checks what _safe_members enforces (Python >= 3.11.4).
                tar.extractall(staging, members=members, filter="data")
        except tarfile.TarError as e:
            raise DownloadError(f"{archive} is not a readable tar archive: {e}") from e
        entries = sorted(staging.iterdir())
        # Check every target before moving any, so a clash never leaves a partial dataset.
        for entry in entries:
            if (root / entry.name).exists():
                raise DownloadError(
                    f"{root / entry.name} already exists but does not hold the complete dataset; "
                    "remove it and run again"
                )
        for entry in entries:
            os.replace(entry, root / entry.name)
        return [root / entry.name for entry in entries]
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def archive_name(url: str) -> str:
    """The file name at the end of a URL or local path ("cifar-10-python.tar.gz")."""
    return PurePosixPath(urllib.parse.urlparse(url).path).name or "archive.tar.gz"


def download_and_extract(url: str, md5: str, root: Path) -> list[Path]:
    """Fetch `url` into `root`, check `md5`, unpack it there, delete the archive."""
    archive = root / archive_name(url)
    log.info("downloading %s to %s", url, root)
    fetch(url, md5, archive)
    try:
        return extract(archive, root)
    finally:
        archive.unlink(missing_ok=True)
