"""Reading and writing the project's files: JSON with clear errors, atomic writes.

Every file the tool writes goes through :func:`write_atomic` (a temporary sibling renamed into
place), so a failure never leaves a partial file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sequoia.errors import FileFormatError

CACHE_ENV = "SEQUOIA_CACHE"


def cache_dir() -> Path:
    """Root of Sequoia's cache (converted models, this device's profiles): ``$SEQUOIA_CACHE``,
    else ``$XDG_CACHE_HOME/sequoia``, else ``~/.cache/sequoia``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "sequoia"


def read_json(path: str | os.PathLike) -> Any:
    """Load a JSON file, turning a missing or malformed file into :class:`FileFormatError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise FileFormatError(f"file not found: {path}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"{path} is not valid JSON: {exc}") from exc
    except IsADirectoryError as exc:
        raise FileFormatError(f"{path} is a directory, not a JSON file") from exc


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place, so a
    failure (or an exception raised by ``write``) leaves no partial file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON through a temporary file and rename, so failures leave no partial file."""
    text = json.dumps(data, indent=1) + "\n"  # serialise first: a bad value writes nothing
    write_atomic(path, lambda tmp: tmp.write_text(text))
