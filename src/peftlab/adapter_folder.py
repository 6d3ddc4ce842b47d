"""Whole-folder atomic adapter saves, and loads that read one saved version.

A save writes every adapter ("default" in the folder itself, others in sub-folders) into a
private staging folder beside the target, then swaps it in with one system call, so a reader
or a kill at any instant finds the old folder or the new one, never a mix.

Design (Linux): ``renameat2(RENAME_EXCHANGE)`` swaps the staging folder and the target
atomically (a plain ``rename`` cannot replace a non-empty folder); the old version then sits
under the staging name and is deleted. Files in the old folder that the new save does not
write (a tokenizer, a README, adapters not selected this time) are hard-linked into the
staging folder first, as peft keeps them when it saves into an existing folder. Where the
exchange is unavailable (other systems, some network file systems) the target is renamed aside
and the staging folder renamed in: never a mix, but a reader may briefly find no folder.

A staging folder is ``flock``-ed by its writer for its whole life; the next save beside it
deletes every unlocked staging folder, i.e. those of killed saves. Two concurrent saves into
one folder each swap in a whole version: the last swap wins.

A reader pins the folder (an open directory descriptor) and reads the config and the weights
relative to it. If a save swaps the folder and deletes the old version mid-read, a file vanishes
from the pinned folder; the reader then starts again on the new version.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import random
import shutil
import stat
import time
import uuid
import warnings
from collections.abc import Callable, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locks, leftovers are kept
    fcntl = None  # type: ignore[assignment]

from peftlab.errors import CheckpointError

STAGING_MARK = ".peftlab-save-"
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
# Per-file temporary names of peftlab's atomic writes (peftlab.io), left by saves killed before
# whole-folder saves existed; never carried into a new version.
_STALE_TMP_PREFIXES = (".adapter_model.safetensors.", ".adapter_config.json.")
_READ_ATTEMPTS = 100


def save_folder(target: str | os.PathLike, write: Callable[[str], None], carry_over: bool = True) -> None:
    """Call ``write(staging_folder)`` and swap the result in as ``target`` as a whole.

    On any exception the staging folder is removed and ``target`` is untouched. ``carry_over=False``
    replaces the folder exactly by what ``write`` wrote (no files of the old version kept).
    """
    target = os.path.realpath(os.fspath(target))
    parent, base = os.path.split(target)
    if not base:  # the root folder has no parent to stage beside it
        warnings.warn(f"saving into {target} file by file; a save into a sub-folder is atomic as a whole.", stacklevel=3)
        write(target)
        return
    # Swapping the folder this process works in leaves it inside the old version (deleted below):
    # it steps into the new version at the same path right after the swap.
    cwd = os.getcwd() if _holds_cwd(target) else None
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(target)
    staging, lock_fd = _new_staging(parent, base)
    try:
        write(staging)
        if carry_over and os.path.isdir(target):
            _carry_over(target, staging)
            with contextlib.suppress(OSError):
                os.chmod(staging, os.stat(target).st_mode & 0o7777)
        _fsync_tree(staging)
        _swap_in(staging, target)
        if cwd is not None:
            os.chdir(cwd if os.path.isdir(cwd) else target)
        _fsync_dir(parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after a swap: the old version
        os.close(lock_fd)


def remove_leftovers(target: str | os.PathLike) -> list[str]:
    """Delete staging folders beside ``target`` whose writer is gone (killed saves); return them."""
    target = os.path.realpath(os.fspath(target))
    parent, base = os.path.split(target)
    prefix = f".{base}{STAGING_MARK}"
    removed = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    if not os.path.lexists(target):  # a fallback swap killed between its renames: put the old version back
        for entry in entries:
            if entry.startswith(prefix) and entry.endswith("-old"):
                with contextlib.suppress(OSError):
                    os.rename(os.path.join(parent, entry), target)
                    break
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        path = os.path.join(parent, entry)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            continue
        try:
            if fcntl is None:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live save is writing it
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _new_staging(parent: str, base: str) -> tuple[str, int]:
    """A fresh, locked, empty staging folder beside the target, and its lock descriptor."""
    for _ in range(100):
        path = os.path.join(parent, f".{base}{STAGING_MARK}{uuid.uuid4().hex[:12]}")
        os.mkdir(path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:  # another save's clean-up took it between mkdir and open (not locked yet): retry
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        # Another save's clean-up may have taken the folder between mkdir and flock: retry.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                return path, fd
        os.close(fd)
    raise OSError(errno.EAGAIN, "could not create a staging folder", parent)


def _carry_over(old: str, new: str) -> None:
    """Hard-link (or copy) into ``new`` every entry of ``old`` that ``new`` lacks."""
    for entry in os.listdir(old):
        if entry.startswith(_STALE_TMP_PREFIXES) and entry.endswith(".tmp"):
            continue
        src, dst = os.path.join(old, entry), os.path.join(new, entry)
        if os.path.isdir(src) and not os.path.islink(src):
            if not os.path.exists(dst):
                os.mkdir(dst)
            if os.path.isdir(dst) and not os.path.islink(dst):
                _carry_over(src, dst)
        elif not os.path.lexists(dst):
            try:
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:
                    os.link(src, dst)
            except FileNotFoundError:
                pass  # deleted meanwhile (a concurrent save's old version)
            except OSError:
                with contextlib.suppress(FileNotFoundError):
                    shutil.copy2(src, dst)


def _swap_in(staging: str, target: str) -> None:
    for _ in range(100):
        if os.path.lexists(target):
            try:
                _exchange(staging, target)
                return
            except FileNotFoundError:
                continue  # the target vanished (a fallback swap of another save): rename instead
            except _NoExchange:
                _rename_aside(staging, target)
                return
        try:
            os.rename(staging, target)  # also replaces an empty folder
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    raise OSError(errno.EAGAIN, "the folder kept changing during the save", target)


class _NoExchange(Exception):
    """The system or file system cannot exchange two names atomically."""


_libc: ctypes.CDLL | None = None


def _exchange(a: str, b: str) -> None:
    """Atomically swap the folders at paths ``a`` and ``b`` (Linux renameat2)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(_libc, "renameat2", None)
    if renameat2 is None:
        raise _NoExchange
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        raise _NoExchange
    raise OSError(err, os.strerror(err), b)


def _rename_aside(staging: str, target: str) -> None:
    """Fallback swap: move the old folder under a staging name, then the new one in."""
    aside = f"{staging}-old"
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise
    os.rename(aside, staging)  # deleted by the caller, or by the next save if we are killed


def _fsync_tree(folder: str) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(root)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _holds_cwd(path: str) -> bool:
    cwd = os.path.realpath(os.getcwd())
    return cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep)


# ----- reading one version -----------------------------------------------------------------------
class Vanished(Exception):
    """A file disappeared from a pinned folder because a save replaced the folder: read again.

    Readers should open every file they need before reading any: an open file stays readable
    after a save deletes the version it belongs to."""


@contextlib.contextmanager
def pinned(folder: str | os.PathLike) -> Iterator["PinnedFolder"]:
    """Hold ``folder`` open so every file is read from the same saved version."""
    fd = os.open(os.fspath(folder), os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield PinnedFolder(os.fspath(folder), fd)
    finally:
        os.close(fd)


class PinnedFolder:
    """An open folder: files are opened relative to it, whatever is renamed meanwhile."""

    def __init__(self, path: str, fd: int) -> None:
        self.path, self.fd = path, fd

    def exists(self, name: str) -> bool:
        try:
            os.stat(name, dir_fd=self.fd)
            return True
        except FileNotFoundError:
            return False

    def open(self, name: str, max_bytes: int, too_large: type[Exception] = CheckpointError) -> int:
        """A descriptor of the regular file ``name`` in this version (see :func:`open_regular`);
        :class:`Vanished` when a save replaced the folder."""
        try:
            return open_regular(self.path, name, max_bytes, dir_fd=self.fd, too_large=too_large)
        except FileNotFoundError:
            if self.replaced():
                raise Vanished(name) from None
            raise

    def replaced(self) -> bool:
        try:
            return os.stat(self.path).st_ino != os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return True


# ----- reading one file safely ------------------------------------------------------------------
_KINDS = {stat.S_IFDIR: "folder", stat.S_IFIFO: "named pipe (FIFO)", stat.S_IFCHR: "character device",
          stat.S_IFBLK: "block device", stat.S_IFSOCK: "socket"}


def open_regular(
    folder: str, name: str, max_bytes: int, dir_fd: int | None = None, too_large: type[Exception] = CheckpointError
) -> int:
    """A read descriptor of ``name`` in ``folder``, refused with :class:`CheckpointError` unless it
    is a regular file of at most ``max_bytes`` inside the folder: all checked before a byte is read.

    Opening never blocks (a FIFO would wait forever for a writer) and a symbolic link is followed
    only to a file inside the folder, or, for a folder of the Hugging Face cache, to the cache's own
    ``blobs`` store, where the hub client keeps the files its snapshot folders link to.
    ``FileNotFoundError`` passes through (a concurrent save may have replaced the folder); a file
    over ``max_bytes`` raises ``too_large`` (a config reader raises its own error class).
    """
    where = os.path.join(folder, name)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(name if dir_fd is not None else where, flags | getattr(os, "O_NOFOLLOW", 0), dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno != errno.ELOOP:  # ELOOP: ``name`` is a symbolic link
            raise
        target = os.path.realpath(where)
        if not _link_allowed(os.path.realpath(folder), target):
            raise CheckpointError(f"{where} is a symbolic link to {target}, outside the adapter folder; an adapter folder "
                                  f"holds its own files. Copy the file into the folder.") from None
        fd = os.open(target, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "special file")
            raise CheckpointError(f"{where} is a {kind}, not a regular file; an adapter folder holds plain files. "
                                  f"Replace it with the file save_pretrained writes.")
        if info.st_size > max_bytes:
            limit = f"{max_bytes // 2**20} MiB" if max_bytes % 2**20 == 0 else f"{max_bytes:,} bytes"
            raise too_large(f"{where} is larger than {limit} ({info.st_size:,} bytes), the most this file may have "
                            f"(see peftlab.limits); it is not an adapter file, or it is damaged.")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _link_allowed(folder: str, target: str) -> bool:
    """A link target inside ``folder``, or in the ``blobs`` store of the hub cache ``folder`` is a snapshot of."""
    if target.startswith(folder.rstrip(os.sep) + os.sep):
        return True
    parts = folder.split(os.sep)
    if "snapshots" in parts:
        repo = os.sep.join(parts[: len(parts) - 1 - parts[::-1].index("snapshots")])
        return target.startswith(os.path.join(repo, "blobs") + os.sep)
    return False


def read_consistently(folder: str | os.PathLike, read: Callable[[PinnedFolder], object]) -> object:
    """``read(pinned_folder)``, started again when a concurrent save swaps the folder mid-read."""
    for _ in range(_READ_ATTEMPTS):
        try:
            with pinned(folder) as pin:
                return read(pin)
        except Vanished:
            time.sleep(random.uniform(0, 0.005))  # let the save that replaced the folder finish
            continue
        except FileNotFoundError:
            if not os.path.lexists(folder):  # fallback swap in progress: the folder is back in a moment
                time.sleep(0.01)
                continue
            raise
    raise OSError(errno.EAGAIN, f"{folder} was replaced {_READ_ATTEMPTS} times while being read", os.fspath(folder))


def resolve_adapter_file(path: str | os.PathLike, filename: str, subfolder: str | None = None) -> str:
    """Local path of ``filename`` in an adapter folder, downloading it when ``path`` is a hub id.

    Here rather than in :mod:`peftlab.checkpoint` so that reading a config needs no weight code
    (``config`` -> ``checkpoint`` -> ``config`` was an import cycle).
    """
    local_dir = os.path.join(os.fspath(path), subfolder) if subfolder else os.fspath(path)
    candidate = os.path.join(local_dir, filename)
    if os.path.lexists(candidate):  # whatever it is: open_regular refuses it if it is not a plain file
        return candidate
    if os.path.isdir(local_dir) or os.path.isabs(os.fspath(path)) or os.fspath(path).startswith("."):
        raise CheckpointError(f"{candidate} does not exist; is {local_dir} an adapter folder saved by save_pretrained?")
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id=os.fspath(path), filename=filename, subfolder=subfolder)
    except Exception as exc:  # offline, unknown repo, missing file: one clear message for all
        raise CheckpointError(
            f"could not find {filename} in a local folder {local_dir!r} or download it from the Hugging Face Hub "
            f"repo {os.fspath(path)!r} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            f"Check the path, or set HF_HUB_OFFLINE=0 and your network."
        ) from None
