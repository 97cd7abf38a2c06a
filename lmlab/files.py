"""Files a run writes: atomic writes, the run folder's lock, and clean-up of what a killed writer left.

An atomic write goes to a temp file in the same folder (named after the writing process, so that a
later run can tell a dead writer's leftovers from a live one's work), is fsynced, then renamed over the
target: a crash at any point leaves the old file or the new one, never a torn one. A full disk is
reported as :class:`~lmlab.errors.DiskFull` naming the file, with the old file intact.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lmlab.errors import DiskFull, RunFolderBusy

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    import torch  # here, not at the top: the lock and temp-file helpers are used where torch is not loaded

    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (and fsync the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=path.parent)
    try:
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
    """The run folder's single-writer lock: ``.lmlab.lock`` holding the owner's host, pid and start time.

    Taken before a run writes anything; a second run into the same folder is refused while the owner
    lives, and a lock left by a dead process (kill -9, power loss) is taken over."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / ".lmlab.lock"

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        owner = {"host": _host(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):  # a stale lock is removed, then the exclusive create is tried again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and _alive(holder.get("host", ""), int(holder.get("pid", 0))):
                    raise RunFolderBusy(
                        f"{self.path.parent} is in use by another run (pid {holder['pid']} on {holder['host']}, "
                        f"started {holder.get('started', '?')}); wait for it to finish or choose another "
                        "hydra.run.dir"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(owner, f)
            return self
        raise RunFolderBusy(f"could not take the lock {self.path}; another run keeps taking it")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and str(holder.get("pid", "")).isdigit() else None
        except (OSError, ValueError):
            return None  # unreadable: a writer died between create and write

    def __exit__(self, *exc: object) -> None:
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == _host():
            self.path.unlink(missing_ok=True)
