"""Writing files so that a crash leaves either the old content or the new, never a torn file:
write, flush, fsync, then (for a file that replaces another) rename, then fsync the folder so
the rename itself survives. Shared by the coordinator's checkpoints and the device's state."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable (a no-op where directories cannot
    be opened, as on Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (created with ``mode``) and fsync it."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode), "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``: a hidden temporary file beside it, fsynced,
    renamed over it. The caller fsyncs the folder once after its last rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover from a crash keeps its old mode otherwise
    write_file(tmp, data, mode=mode)
    os.replace(tmp, path)
