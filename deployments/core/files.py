"""Files written whole or not at all, so a reader (encoder replicas starting together, a service
polling for a new fit, a request for a stored photo) never sees half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: str | Path, content: bytes | str | Callable[[Path], None]) -> Path:
    """Write `content` (bytes; text, as UTF-8; or a callable that writes the file at the path
    it is given) under a temporary name of this process beside `path`, then rename it to
    `path`: atomic on POSIX within one file system. Creates the parent folder; returns `path`.
    Whatever the write raises is raised after the temporary file is removed, leaving `path`
    as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        elif isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        else:
            content(tmp)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
