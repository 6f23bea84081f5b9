"""Writing files so that a crash leaves either the old content or the new, never a torn file:
write, flush, fsync, then (for a file that replaces another) rename, then fsync the folder so
the rename itself survives. Shared by the coordinator's checkpoints and run files and the
device's state.

None of these helpers writes through a symbolic link: files are opened with ``O_NOFOLLOW``
(a link where a file is expected is an error, ``ELOOP``), temporary files are created with
``O_EXCL``, and a replacement is renamed over the path, which replaces a link planted there
instead of writing into whatever it points to. Folders written by other libraries (peft's and
transformers' ``save_pretrained``, which follow links) are filled in a fresh private folder and
renamed into place whole (``fresh_folder``)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

# 0 where the platform has no such flag (Windows): there, links are not followed by open anyway.
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


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


# Whether folders can be worked on through descriptors (POSIX): then a folder being filled is
# reached through its descriptor, whatever is renamed or planted around it meanwhile.
_DIR_FD = O_DIRECTORY and {os.open, os.mkdir, os.rename, os.unlink, os.stat} <= os.supports_dir_fd


@contextmanager
def fresh_folder(dest: str | Path) -> Iterator[Path]:
    """Fill a new folder that then replaces ``dest`` whole: ``with fresh_folder(run / "adapter")
    as folder: model.save_pretrained(folder)``. For writers that follow symbolic links (peft,
    transformers), in a folder others may write into.

    The folder is made inside a private staging folder (``tempfile.mkdtemp`` beside ``dest``:
    a name nobody can have planted, mode 0700) and, where the platform allows, handed out as
    ``/proc/self/fd/<n>``, a path through its open descriptor: the writer reaches that very
    folder even if the staging folder is renamed, or a link is planted at its name, meanwhile.
    When the block ends, the files are fsynced and the folder is renamed to ``dest``. What stood
    at ``dest`` is replaced, never written through: a symbolic link (to a folder or a file) is
    removed itself, its target left as it was; a file is removed; a folder (an earlier export)
    is first moved into the staging folder and deleted with it. An error in the block leaves
    ``dest`` as it was, and nothing of the attempt behind."""
    dest = Path(os.path.abspath(dest))
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=parent)
    if not _DIR_FD:  # pragma: no cover - platforms without descriptor-relative calls (Windows)
        try:
            folder = Path(staging) / dest.name
            folder.mkdir()
            yield folder
            _fsync_tree(folder)
            remove_path(dest)
            os.replace(folder, dest)
            fsync_dir(parent)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    parent_fd = staging_fd = folder_fd = -1
    try:
        parent_fd = os.open(parent, os.O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        staging_fd = os.open(os.path.basename(staging), os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=parent_fd)
        st = os.fstat(staging_fd)
        if st.st_uid != os.geteuid() or stat.S_IMODE(st.st_mode) & 0o077:
            raise OSError(errno.EPERM, "the staging folder was replaced before it could be opened", staging)
        os.mkdir(dest.name, 0o777, dir_fd=staging_fd)  # the mode an ordinary mkdir gives (umask applies)
        folder_fd = os.open(dest.name, os.O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC, dir_fd=staging_fd)
        through_fd = Path(f"/proc/self/fd/{folder_fd}")
        yield through_fd if through_fd.is_dir() else Path(staging) / dest.name
        _fsync_tree_fd(folder_fd)
        _install(staging_fd, parent_fd, dest)
        os.fsync(parent_fd)
    finally:
        for fd in (folder_fd, staging_fd, parent_fd):
            if fd >= 0:
                os.close(fd)
        _remove_staging(parent, os.path.basename(staging))


def _install(staging_fd: int, parent_fd: int, dest: Path) -> None:
    """Rename the staged folder ``dest.name`` (in ``staging_fd``) to ``dest.name`` in
    ``parent_fd``, moving what stands there out of the way (a folder into the staging folder,
    a link or file unlinked). A few tries: something planted again between the two renames
    makes the rename fail (a folder never lands on a link), it is then moved away again."""
    name = dest.name
    for attempt in range(5):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            os.rename(name, f"{name}.old-{attempt}", src_dir_fd=parent_fd, dst_dir_fd=staging_fd)
        elif st is not None:
            os.unlink(name, dir_fd=parent_fd)  # a link itself (never its target), or a file
        try:
            os.rename(name, name, src_dir_fd=staging_fd, dst_dir_fd=parent_fd)
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR) or attempt == 4:
                raise


def _fsync_tree_fd(folder_fd: int) -> None:
    """fsync every file and folder under the folder open as ``folder_fd`` (links not followed)."""
    for entry in os.listdir(folder_fd):
        try:
            fd = os.open(entry, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC, dir_fd=folder_fd)
        except OSError:  # a link (ELOOP) or something that is not there any more
            continue
        try:
            if stat.S_ISDIR(os.fstat(fd).st_mode):
                _fsync_tree_fd(fd)
            else:
                os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(folder_fd)


def _fsync_tree(folder: Path) -> None:  # pragma: no cover - the fallback of fresh_folder
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(root))


def _remove_staging(parent: Path, name: str) -> None:
    """Delete the staging folder ``name`` in ``parent`` and what is left in it (an earlier
    export moved aside, or a failed attempt). shutil.rmtree neither follows links inside, nor
    deletes anything when a link stands at the name itself."""
    shutil.rmtree(parent / name, ignore_errors=True)
