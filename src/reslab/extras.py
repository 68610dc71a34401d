"""Optional dependencies: each is installed by one of reslab's pip extras (pyproject.toml), and a
missing one is reported with the command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ModuleNotFoundError):
    """A feature's optional dependency is not installed; the message names the pip extra. The
    `reslab` command prints it as an error line, without a traceback."""


def require(*modules: str, extra: str, purpose: str) -> list[ModuleType]:
    """Import `modules` for `purpose` (a phrase: "ONNX export"), or raise `MissingExtraError`
    saying "`purpose` needs `module`: pip install 'reslab[`extra`]'"."""
    imported = []
    for name in modules:
        try:
            imported.append(importlib.import_module(name))
        except ModuleNotFoundError as e:
            raise MissingExtraError(
                f"{purpose} needs {e.name or name}: pip install 'reslab[{extra}]'", name=name
            ) from None
    return imported
