"""Writing files without ever losing one: every file this pack writes goes through ``write_new``."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def write_new(path, write: Callable[[str], None], overwrite: bool = False) -> Path:
    """Write ``path`` through ``write(temporary_path)``, then move the finished file into place.

    Refuses an existing ``path`` (``FileExistsError`` naming it) unless ``overwrite``. The name is claimed by
    an exclusive create before anything is written, so two writers never pick the same name, and readers
    never see a half-written file. On failure nothing is left behind. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        try:
            with open(path, "xb"):
                pass
        except FileExistsError:
            raise FileExistsError(f"'{path}' already exists; it is never replaced without an explicit "
                                  "overwrite") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        if not overwrite:
            path.unlink(missing_ok=True)  # the empty file that claimed the name
        raise
    return path
