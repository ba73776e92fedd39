"""Files written whole or not at all, so a reader (encoder replicas starting together, a service
polling for a new fit, a request for a stored photo) never sees half of one."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

Content = bytes | bytearray | memoryview | str | Callable[[Path], None]


def write_atomically(path: str | Path, content: Content) -> Path:
    """Write `content` (bytes-like; text, as UTF-8; or a callable that writes the file at the
    path it is given) under a temporary name of its own beside `path`, then rename it to
    `path`: atomic on POSIX within one file system, and safe for writers of the same path in
    several threads or processes at once (the last rename wins; each is whole). Creates the
    parent folder; returns `path`. Whatever the write raises is raised after the temporary
    file is removed, leaving `path` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A name per call (not per process: the bulk job stores photos from several threads), kept
    # under the 255-byte name limit for long file names.
    tmp = path.with_name(f".{path.name[:180]}.{uuid.uuid4().hex}.tmp")
    try:
        if isinstance(content, bytes | bytearray | memoryview):
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
