"""Files a run writes: atomic writes, the run folder's lock, and clean-up of what a killed writer left.

An atomic write goes to a temp file in the same folder (named after the writing process, so that a
later run can tell a dead writer's leftovers from a live one's work), is fsynced, then renamed over the
target: a crash at any point leaves the old file or the new one, never a torn one. A full disk is
reported as :class:`~lmlab.errors.DiskFull` naming the file, with the old file intact.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmlab.errors import DiskFull, RunFolderBusy, UnsafeRunFile

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def open_append(path: str | os.PathLike) -> IO[str]:
    """``open(path, "a")`` for a run's own append-only files (run.log, metrics.jsonl, steps.jsonl, metrics.csv),
    refusing a symbolic link planted in their place: a run writes its folder's files, never through a link to
    somewhere else."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise UnsafeRunFile(
                f"{path} is a symbolic link; a run writes its own files and never through a link: remove it, or "
                "give the run a new hydra.run.dir"
            ) from None
        raise
    return os.fdopen(fd, "a", encoding="utf-8", errors="replace")


def folder_refusal(path: str | os.PathLike) -> str | None:
    """Why a run or sweep folder cannot be made at ``path`` (None: it can): a name past the file system's limits,
    a file where a folder is needed, or a place this user cannot write."""
    path = Path(path).expanduser().absolute()
    longest = max((len(part.encode()) for part in path.parts), default=0)
    if longest > 255:
        return f"a folder name in it is {longest} bytes long; file systems take 255 at most"
    if len(str(path).encode()) > 4000:
        return f"it is {len(str(path).encode()):,} bytes long; paths take 4,096 at most"
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} cannot be written by this user"
    return None


RECORD_LIMIT = 8 << 20  # a run's records (results.json, .hydra/*.yaml, metrics.jsonl) are kilobytes


def read_record(path: str | os.PathLike, limit: int = RECORD_LIMIT) -> str:
    """The text of one of a run's own record files, read without trusting what sits at ``path``: a FIFO or a
    device there would block the reader for ever, a huge file fill its memory; either raises ``ValueError``
    naming the file (a reader lists that run as unreadable). Missing: ``FileNotFoundError``."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if info.st_size > limit:
            raise ValueError(f"{path} is {info.st_size / 2**20:,.0f} MB, past the {limit >> 20} MB a run record has")
        return f.read(limit + 1).decode("utf-8", errors="replace")


def plain_yaml(text: str) -> Any:
    """``yaml.safe_load`` of a run record, refusing aliases: lmlab writes none, and a few lines of nested
    aliases expand to gigabytes (raises ``ValueError``)."""
    import yaml

    if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
        raise ValueError("a YAML alias (*name): run records have none")
    return yaml.safe_load(text)


@functools.cache
def _umask() -> int:
    """The process's umask, read once (by setting it, the only way, and setting it back: not while other threads
    may create files, hence once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch  # here, not at the top: the lock and temp-file helpers are used where torch is not loaded

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (and fsync the folder).
    The file gets the mode a plain ``open`` would give it (0666 less the umask), as the run's other files have:
    ``mkstemp`` alone makes it 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if is_disk_full(err):
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise DiskFull(f"no space left on the disk while writing {path} ({kept}); free space there") from None
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def is_disk_full(err: BaseException | None) -> bool:
    """Whether an error, or one it was raised from, is "no space left" (torch wraps it in a RuntimeError)."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def _host() -> str:
    return socket.gethostname().replace(".", "_")  # dots would break the temp-file name's fields


def _writer_tag() -> str:
    return f"{_host()}-{os.getpid()}"


def _alive(host: str, pid: int) -> bool:
    """Whether the process ``pid`` on ``host`` may still run (another host's process: assume so)."""
    if host != _host():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet: what making ``path``
    would create. None if ``path`` exists."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    return missing[-1] if missing else None


def remove_made_folders(path: Path, made: Path | None) -> None:
    """Undo making ``path``: remove it and its parents while they are empty, up to ``made`` (from
    :func:`first_missing` before they were made); folders that were there before stay."""
    if made is None:
        return
    for folder in (path, *path.parents):
        if not folder.is_dir() or any(folder.iterdir()):
            return
        folder.rmdir()
        if folder == made:
            return


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the atomic-write temp files in ``folder`` whose writer process is gone; returns them."""
    removed = []
    for tmp in Path(folder).glob(".*.tmp"):
        host, _, pid = tmp.name[: -len(".tmp")].rsplit(".", 2)[-2].rpartition("-")
        if pid.isdigit() and not _alive(host, int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class RunLock:
    """The run folder's single-writer lock: ``.lmlab.lock``, locked with ``flock`` for the whole run and
    holding the owner's host, pid and start time (for the message a refused run prints).

    Taken before a run writes anything; a second run into the same folder is refused while the owner
    holds it. The kernel releases the lock when its holder dies (kill -9, power loss), so a lock left by
    a dead process is simply taken, and two processes can never both hold it: there is no
    check-then-write window. The holder removes the file while still holding it; a process that opened
    the old file just before is told apart by the file's inode and tries again."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lmlab.lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": _host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(100):  # each round is lost only to a holder that released the file meanwhile
            try:  # never through a link: the lock file is written to, and a planted link would aim that
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as err:
                raise RunFolderBusy(
                    f"{self.path} cannot be a lock file ({err.strerror}: a link or not a file); remove it, or "
                    "choose another hydra.run.dir"
                ) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderBusy(self._busy_message()) from None
            if not self._names(fd):
                os.close(fd)  # the previous holder removed this file after we opened it
                continue
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(owner).encode())
            self._fd = fd
            return self
        raise RunFolderBusy(f"could not take the lock {self.path}; other runs keep taking it")

    def _names(self, fd: int) -> bool:
        """Whether ``self.path`` still names the open file ``fd``."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def _busy_message(self) -> str:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            holder = None  # the holder is between taking the lock and writing its name
        who = (
            f" (pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started', '?')})"
            if isinstance(holder, dict)
            else ""
        )
        return (
            f"{self.path.parent} is in use by another run{who}; wait for it to finish or choose another hydra.run.dir"
        )

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # while still held: see the class docstring
            os.close(self._fd)
            self._fd = None
