"""Writing files so that a crash leaves either the old content or the new, never a torn file:
write, flush, fsync, then (for a file that replaces another) rename, then fsync the folder so
the rename itself survives. Shared by the coordinator's checkpoints and run files and the
device's state.

None of these helpers writes through a symbolic link: files are opened with ``O_NOFOLLOW``
(a link where a file is expected is an error, ``ELOOP``), temporary files are created with
``O_EXCL``, and a replacement is renamed over the path, which replaces a link planted there
instead of writing into whatever it points to."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# 0 where the platform has no such flag (Windows): there, links are not followed by open anyway.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_file(path: Path, data: bytes, *, mode: int = 0o644, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` (created with ``mode``) and fsync it. A symbolic link at
    ``path`` is refused (OSError ELOOP), never written through; ``exclusive``: ``path`` must
    not exist at all (OSError EEXIST)."""
    flags = os.O_WRONLY | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_file(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Atomically replace ``path`` with ``data``: a hidden temporary file beside it, created
    afresh (``O_EXCL``), fsynced, renamed over it. A symbolic link at ``path`` is replaced by
    the file, its target left as it was. The caller fsyncs the folder once after its last
    rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover from a crash (or a link planted there)
    write_file(tmp, data, mode=mode, exclusive=True)
    os.replace(tmp, path)


def append_line(path: Path, line: bytes, *, mode: int = 0o644) -> None:
    """Append ``line`` (one record ending in a newline) to ``path`` with a single ``write`` on
    an ``O_APPEND`` descriptor, then fsync, so that a crash leaves the record whole or absent
    (at worst torn at the very end of the file, never interleaved). A file that does not end in
    a newline (a record torn by an earlier crash) gets one first, so the torn record stays
    alone on its line. A symbolic link at ``path`` is refused (OSError ELOOP)."""
    created = not os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | O_NOFOLLOW | O_CLOEXEC, mode)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        _write_all(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_text_nofollow(path: Path) -> str | None:
    """The text of the regular file at ``path``; None where there is none, or where a symbolic
    link stands there instead (not a file this program wrote)."""
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return None
        raise
    with os.fdopen(fd, "rb") as fh:
        return fh.read().decode("utf-8", errors="replace")


def remove_path(path: Path) -> None:
    """Remove what stands at ``path``: a symbolic link itself (never its target), a file, or a
    whole folder."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
