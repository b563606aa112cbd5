"""One writer per run directory (and per sweep folder): a lock file holding its owner's pid and host.

The lock is an ``flock`` on ``gradlab.lock`` inside the folder. The kernel releases it when its
process ends, however it ends (SIGKILL included), so a lock file left behind by a killed process
is stale by construction: the next writer gets the flock, reads who held it before and takes it
over. The file's content (pid, host, start time) is only for the message a refused writer sees.
On Linux NFS clients ``flock`` is carried out as a POSIX lock on the server, so the lock also
holds between the nodes of a cluster that share the folder.

    with RunLock(run_dir) as lock:      # RunError (LockError) when another process writes there
        ...                             # lock.stale: the dead owner taken over, or None
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from .runs import RunError

LOCK = "gradlab.lock"
POLL_SECONDS = 0.1  # while waiting for a busy lock


class LockError(RunError):
    """The folder is in use by another gradlab process; the message names it."""


@dataclass(frozen=True)
class Owner:
    pid: int | None
    host: str | None
    started: str | None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}" + (f", since {self.started}" if self.started else "")


def _read_owner(fd: int) -> Owner | None:
    """The owner recorded in an open lock file; None when it is empty or garbled."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096).decode())
        return Owner(int(data["pid"]), str(data["host"]), data.get("started"))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, OSError):
        return None


def _make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; the ones created, innermost first."""
    missing = []
    path = folder
    while not path.exists():
        missing.append(path)
        if path.parent == path:
            break
        path = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    return missing


class RunLock:
    """The lock of one folder (created with its parents if missing, removed again if left empty).

    ``wait``: seconds to wait for a busy lock before giving up (0: refuse at once). ``what``
    names the folder in messages ("run directory", "sweep folder").
    """

    def __init__(self, folder: str | os.PathLike, what: str = "run directory", wait: float = 0.0) -> None:
        self.folder, self.what, self.wait = Path(folder), what, wait
        self.path = self.folder / LOCK
        self.stale: Owner | None = None  # the previous owner, when a stale lock was taken over
        self._fd: int | None = None
        self._created: list[Path] = []

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: this RunLock is already held")
        try:
            self._created = _make_dirs(self.folder)
        except OSError as exc:
            raise RunError(f"{self.folder}: cannot create the {self.what} ({exc.strerror or exc}); "
                           "choose another --out") from None
        deadline = time.monotonic() + self.wait
        try:
            while self._fd is None:
                self._fd = self._try_lock(deadline)
        except BaseException:
            self._remove_created()
            raise
        return self

    def _try_lock(self, deadline: float) -> int | None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RunError(f"{self.folder}: cannot write in the {self.what} ({exc.strerror or exc}); "
                           "choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            owner = _read_owner(fd)
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"{self.path}: cannot lock ({exc.strerror}); the file system may not "
                               "support locks: put the output on a local or NFS disk") from None
            if time.monotonic() < deadline:
                time.sleep(POLL_SECONDS)
                return None
            who = owner.describe() if owner else "another process"
            raise LockError(f"{self.folder}: in use by another gradlab process ({who}); wait until it "
                            f"ends or stop it, or use another --out (one writer per {self.what})") from None
        try:  # a releasing owner unlinks the file: make sure we locked the file that is at the path now
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                os.close(fd)
                return None
        except FileNotFoundError:
            os.close(fd)
            return None
        previous = _read_owner(fd)
        if previous is not None and (previous.pid, previous.host) != (os.getpid(), platform.node()):
            self.stale = previous  # its process died without releasing: the kernel dropped its flock
        owner = {"pid": os.getpid(), "host": platform.node(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)
        return fd

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see ``_try_lock``). Idempotent."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)
        self._remove_created()

    def _remove_created(self) -> None:
        for folder in self._created:  # innermost first; a folder that holds anything stays
            try:
                folder.rmdir()
            except OSError:
                break
        self._created = []

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
