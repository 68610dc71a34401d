"""Self-describing model files and atomic writes.

A reslab model file is a safetensors file whose metadata (key ``"reslab"``, JSON) says how to
rebuild the model: ``{"model": name, "model_kwargs": {...}, "dataset": ..., "mean": [...],
"std": [...], "classes": [...], "image_size": [H, W]}``. Loading never executes pickled code:
safetensors holds only tensors, and ``.pth`` files are read with ``weights_only=True``.

Every write goes to a temporary file in the same folder, is fsync'ed, then renamed over the
target, so a crash leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

META_KEY = "reslab"
MODEL_FILE = "model.safetensors"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        # mkstemp creates 0600 files, and a writer may replace the file it was given with one of
        # its own (safetensors' save_file does): the finished file gets the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_model(path: str | os.PathLike, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write `model`'s weights and the metadata needed to rebuild it, atomically."""
    from safetensors.torch import save_file

    if "model" not in meta:
        raise ValueError("model metadata needs at least the registered model name under 'model'")
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={META_KEY: json.dumps(meta)}))


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(META_KEY)
    if raw is None:
        raise ValueError(
            f"{path} is a safetensors file without reslab metadata; load its tensors with "
            "load_state_dict_file() into a model you create yourself, or convert it with "
            "`reslab convert`"
        )
    return json.loads(raw)


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors or .pth/.pt file, without executing pickled code."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle with code in it, or not a torch file at all
        raise ValueError(
            f"{path} could not be read as a weights-only PyTorch file ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); reslab never unpickles code. "
            "Save the state_dict alone (torch.save(model.state_dict(), path)) or use safetensors."
        ) from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    # DataParallel/DDP checkpoints prefix every key with 'module.'.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def resolve_model_file(path: str | os.PathLike) -> Path:
    """A model file, or the best/last model file of a run folder."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / MODEL_FILE, path / "checkpoints" / "best.safetensors",
                          path / "checkpoints" / "last.safetensors"):
            if candidate.exists():
                return candidate
        raise FileNotFoundError(
            f"{path} is a folder without {MODEL_FILE} or checkpoints/*.safetensors; "
            "pass a run folder written by `reslab train` or a model file"
        )
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run folder: {path}")
    return path


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu"
               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a reslab model file (or run folder) and load its weights strictly."""
    from .models import create_model

    file = resolve_model_file(path)
    meta = read_meta(file)
    model = create_model(meta["model"], **meta.get("model_kwargs", {}))
    state = load_state_dict_file(file)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{file} does not match model {meta['model']!r} built with {meta.get('model_kwargs')}: "
            f"{str(e).splitlines()[0]}"
        ) from None
    return model.to(map_location), meta


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP or torch.compile wrappers (their state_dict keys differ)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
