"""Optional dependencies (the extras of pyproject.toml): imported on demand, or a clear error."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ImportError, ValueError):
    """An optional dependency is not installed (a ValueError too: the CLI reports it in one
    line, exit 2, as a usage error)."""


def missing_extra_message(module: str, extra: str, needed_by: str) -> str:
    return f"{needed_by} needs {module}, the optional extra: pip install 'smoothcert[{extra}]'"


def import_extra(module: str, extra: str, needed_by: str) -> ModuleType:
    """`module`, imported; MissingExtraError naming the extra to install where it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtraError(missing_extra_message(module, extra, needed_by)) from None
