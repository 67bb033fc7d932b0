"""Crash-safe writes: one file (:func:`atomic_write`) or a whole folder (:func:`replace_folder`).

A process killed at any instant (kill -9, power loss after the fsyncs) leaves either the old version or the new one
in place, never a mix, and the next writer or reader puts things right.

Folder protocol (``final`` is the folder being written; siblings live next to it, named ``.<final>.peftkit-*``):

1. Take an exclusive ``flock`` on the parent folder (released by the kernel if the process dies), so writers of
   the same parent take turns and every leftover found while holding it belongs to a dead or finished writer.
2. Recover and clean: if ``final`` is missing but a ``ready`` sibling exists, the last save had committed to it
   (see 5-6): rename it to ``final``. Then delete every other ``tmp`` / ``ready`` / ``old`` sibling of ``final``.
3. Build the new folder in ``.<final>.peftkit-tmp-<token>``: every file written and fsynced there. Entries of the
   existing ``final`` that the build did not write (a tokenizer, a README, another adapter's subfolder) are carried
   over as hard links (copies where the file system has none), so a save never deletes what it did not write.
4. fsync every file and folder of the staging tree, then rename it to ``.<final>.peftkit-ready-<token>`` and fsync the
   parent: a ``ready`` sibling is always complete.
5. If ``final`` exists, swap the two with ``renameat2(RENAME_EXCHANGE)`` (Linux): one atomic step, so a reader
   sees the old folder or the new, never neither. Where the call is missing (other systems, some file systems),
   rename ``final`` to ``.<final>.peftkit-old-<token>``, then ``ready`` to ``final``: a crash between the two
   renames leaves no ``final`` but a complete ``ready``, which step 2 (or :func:`recover`, which loads call)
   renames into place.
6. If ``final`` did not exist, rename ``ready`` to ``final``.
7. Delete the sibling now holding the old version, fsync the parent, release the lock.

A folder that is (or holds) the working directory, or is a mount point, cannot be swapped: a save there is refused
with the advice to save into a subfolder. Concurrent saves of one folder take turns (the lock); the last one wins.

Readers never look at siblings, so leftovers are ignored by loads; a load that finds ``final`` missing calls
:func:`recover` (which waits for a running writer's lock) before saying the folder does not exist.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

_KINDS = ("tmp", "ready", "old")  # the sibling kinds of a folder being replaced


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers see the old file or the new, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file inside a staging folder (:func:`replace_folder` fsyncs the whole tree)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a folder (a folder's entries: new names, renames) by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(final: str | os.PathLike, build: Callable[[Path], None]) -> None:
    """Write the folder ``final`` atomically: ``build(staging)`` fills a private staging folder, which then replaces
    ``final`` as one unit (the protocol is in this module's docstring). Raises before touching ``final`` if
    ``build`` does, leaving no staging folder behind."""
    final = _target(final)
    if final.exists() and not final.is_dir():
        raise FileExistsError(f"{final} exists and is a file; an adapter is saved as a folder: choose another path")
    cwd = Path.cwd()
    if final.exists() and (cwd == final.resolve() or final.resolve() in cwd.parents):
        raise ValueError(
            f"{final} is, or holds, the current working directory; a save replaces its folder as a whole, which would "
            f"pull the working directory away. Save into a subfolder (e.g. {final / 'adapter'})"
        )
    if os.path.ismount(final):
        raise ValueError(
            f"{final} is a mount point; a save replaces its folder as a whole, and a mount point cannot be renamed. "
            f"Save into a subfolder (e.g. {final / 'adapter'})"
        )
    final.parent.mkdir(parents=True, exist_ok=True)
    with _parent_lock(final.parent, blocking=True):
        _recover_locked(final)
        _clean_locked(final)
        token = secrets.token_hex(4)
        tmp, ready = _sibling(final, "tmp", token), _sibling(final, "ready", token)
        try:
            tmp.mkdir()
            build(tmp)
            if final.is_dir():
                _carry_over(final, tmp)
            _fsync_tree(tmp)
            os.rename(tmp, ready)
            fsync_path(final.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(ready, ignore_errors=True)
            raise
        if final.is_dir():
            if _exchange(ready, final):
                stale = ready  # now holds the old version
            else:
                stale = _sibling(final, "old", token)
                os.rename(final, stale)
                os.rename(ready, final)
        else:
            os.rename(ready, final)
            stale = None
        fsync_path(final.parent)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)


def recover(final: str | os.PathLike) -> bool:
    """If ``final`` is missing because a save was killed between its renames, put the committed version in place
    (waiting for a save under way to finish first). True if ``final`` exists afterwards. Loads call this."""
    final = _target(final)
    if final.exists():
        return True
    if not final.parent.is_dir() or not _siblings(final, "ready"):
        return False
    try:
        with _parent_lock(final.parent, blocking=True):
            _recover_locked(final)
    except OSError:  # a read-only folder: report what is there instead
        pass
    return final.exists()


def leftovers(final: str | os.PathLike) -> list[Path]:
    """Siblings an interrupted save left next to ``final`` (cleaned by the next save, ignored by loads)."""
    final = _target(final)
    return sorted(p for kind in _KINDS for p in _siblings(final, kind)) if final.parent.is_dir() else []


# ----------------------------------------------------------------------------------------------------------------


def _target(path: str | os.PathLike) -> Path:
    """The real folder a save writes: absolute, and through a symlink at ``path`` (the link itself stays)."""
    path = Path(path).absolute()
    return path.resolve() if path.is_symlink() else path


def _sibling(final: Path, kind: str, token: str) -> Path:
    return final.with_name(f".{final.name}.peftkit-{kind}-{token}")


def _siblings(final: Path, kind: str) -> list[Path]:
    prefix = f".{final.name}.peftkit-{kind}-"
    return [p for p in final.parent.iterdir() if p.name.startswith(prefix)]


def _recover_locked(final: Path) -> None:
    ready = sorted(_siblings(final, "ready"), key=lambda p: p.stat().st_mtime)
    if not final.exists() and ready:
        os.rename(ready[-1], final)  # the newest committed version
        fsync_path(final.parent)


def _clean_locked(final: Path) -> None:
    for kind in _KINDS:
        for path in _siblings(final, kind):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _parent_lock(parent: Path, blocking: bool) -> Iterator[None]:
    """An exclusive flock on the parent folder; where the file system cannot lock folders, no lock (concurrent
    writers of one folder are then not supported)."""
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _carry_over(old: Path, new: Path) -> None:
    """Give ``new`` every entry of ``old`` it does not have (hard links, or copies), recursively; the old save
    protocol's stray ``.<name>.<random>.tmp`` files are left behind."""
    for entry in old.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(".tmp"):
            continue
        target = new / entry.name
        if entry.is_dir() and not entry.is_symlink():
            if target.exists() and not target.is_dir():
                continue
            target.mkdir(exist_ok=True)
            _carry_over(entry, target)
        elif not target.exists() and not target.is_symlink():
            try:
                os.link(entry, target, follow_symlinks=False)
            except OSError:
                shutil.copy2(entry, target, follow_symlinks=False)


def _fsync_tree(root: Path) -> None:
    """fsync every file (``build`` may have written some through other libraries) and every folder under ``root``."""
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                fsync_path(os.path.join(folder, name))
        fsync_path(folder)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2`` with ``RENAME_EXCHANGE``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(b))
