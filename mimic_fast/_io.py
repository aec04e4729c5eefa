"""Crash-safe writes and writer locks: the one place that decides how files the user keeps reach the
disk and who may write them.

Atomic writes: a temp file in the same directory, fsync, os.replace onto the target, fsync the
directory; a crash (even kill -9 or power loss) leaves the old file or the new one, never a torn one.
A temp file orphaned by a kill between the write and the rename is removed by the next write of the
same target. Writer locks: one `filelock` lock file per folder (a store, a training run, a sweep), so
a second writer is refused naming the holder's pid (or, where asked, waits for the first); the OS
drops the lock of a killed process, so a stale lock is taken over by the next run.
"""
import glob
import os
import tempfile
import threading

from filelock import FileLock, Timeout

__all__ = ["atomic_write_bytes", "atomic_write_text", "fsync_dir", "writer_lock", "LockedError",
           "LOCK_NAME"]

LOCK_NAME = ".mimic_fast.lock"
OWNER_NAME = ".mimic_fast.lock.owner"


def fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def _temp_prefix(path):
    return "." + os.path.basename(path) + "."


def _remove_orphans(path):
    """Temp files of `path` left by a killed writer (ours have the pattern .NAME.<random>.tmp)."""
    directory = os.path.dirname(os.path.abspath(path))
    pattern = os.path.join(glob.escape(directory), glob.escape(_temp_prefix(path)) + "*.tmp")
    for tmp in glob.glob(pattern):
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass


def atomic_write_bytes(path, write):
    """Call write(fileobj) on a temp file next to `path`, then atomically replace `path` with it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_temp_prefix(path), suffix=".tmp")
    try:
        # mkstemp makes 0600 files; the user's files get the mode open() would give them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path, text):
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


class LockedError(BlockingIOError):
    """Another process holds the writer lock of a folder (an OSError, so callers that report OS
    errors report this one too)."""


_held = {}  # realpath of a lock file -> [FileLock, depth]: re-entrant within one process
_held_guard = threading.Lock()


class writer_lock:
    """`with writer_lock(folder, "logit store"):` holds folder/.mimic_fast.lock.

    Raises LockedError naming the holder's pid when another process holds it, or with wait=True
    blocks until that process lets it go (sweep shards wait for the one preparing their shared
    folder). Re-entrant within a process (the CLI holds a run folder's lock around the library call
    that takes it again).
    """

    def __init__(self, folder, what, wait=False):
        self.folder, self.what, self.wait = os.fspath(folder), what, wait
        self.lock_path = os.path.realpath(os.path.join(self.folder, LOCK_NAME))
        self.owner_path = os.path.join(os.path.dirname(self.lock_path), OWNER_NAME)

    def __enter__(self):
        with _held_guard:
            entry = _held.get(self.lock_path)
            if entry is not None:
                entry[1] += 1
                return self
            os.makedirs(self.folder, exist_ok=True)
            lock = FileLock(self.lock_path, timeout=-1 if self.wait else 0)
            try:
                lock.acquire()
            except Timeout:
                raise LockedError(f"{self.what} {self.folder} is being written by another process "
                                  f"({self._owner()}; lock file {self.lock_path}): wait for it to "
                                  "finish or stop it; two writers would mix their outputs") from None
            try:
                # after the lock, so a writer refused above never overwrites the holder's pid
                atomic_write_text(self.owner_path, f"{os.getpid()}\n")
            except BaseException:
                lock.release()
                raise
            _held[self.lock_path] = [lock, 1]
        return self

    def _owner(self):
        try:
            with open(self.owner_path, encoding="utf-8") as f:
                return f"pid {int(f.read().strip())}"
        except (OSError, ValueError):
            return "pid unknown"

    def __exit__(self, *exc):
        with _held_guard:
            entry = _held[self.lock_path]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[self.lock_path]
                try:
                    os.remove(self.owner_path)
                except OSError:
                    pass
                entry[0].release()
        return False
