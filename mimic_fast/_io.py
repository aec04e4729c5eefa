"""Crash-safe writes and folder locks: the one place that decides how files the user keeps reach the
disk, and who may read or write a folder meanwhile.

Atomic writes: a temp file in the same directory, fsync, os.replace onto the target, fsync the
directory; a crash (even kill -9 or power loss) leaves the old file or the new one, never a torn one.
The target's directory entry is replaced, never the file behind it: a reader that has the old file
open or memory-mapped keeps reading the old bytes, and a target that is a symbolic link is refused
(we never write through links into files we did not make). A temp file or folder orphaned by a kill
between the write and the rename is removed by the next write of the same target.

Folder locks: `fcntl.flock` on one lock file per folder (a store, a training run, a sweep). Readers
share it (`reader_lock`), a writer holds it alone (`writer_lock`); a request that cannot be granted is
refused naming the holders' pids (holder files `.mimic_fast.lock.<pid>` beside the lock file), or
waits where asked. The OS drops the lock of a killed process. Locks are re-entrant within a process
(a read inside this process's own write is granted; a write while this process reads is refused,
since it would wait for itself) and are never released by a forked child (a DataLoader worker
inherits the descriptor, not the lock's ownership). Limits: without fcntl (Windows) readers take no
lock and writers use `filelock`.
"""
import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading

from ._wording import option

try:
    import fcntl
except ImportError:  # Windows: see the limits above
    fcntl = None
    from filelock import FileLock, Timeout

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_write_files", "fsync_dir",
           "refuse_links", "writer_lock", "reader_lock", "LockedError", "LOCK_NAME"]

LOCK_NAME = ".mimic_fast.lock"


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


def refuse_links(folder, names):
    """Raise OSError naming the first of folder/`names` that is a symbolic link: files (and
    sub-folders) inside our own output folders are ours, so a link there would make a write land in
    somebody else's file."""
    for name in names:
        p = os.path.join(os.fspath(folder), name)
        if os.path.islink(p):
            raise OSError(f"{p} is a symbolic link (to {os.readlink(p)}): mimic_fast writes its output "
                          "files itself and never through links, which would overwrite the file they "
                          "point to; remove the link or choose another output folder")


def _temp_prefix(path):
    return "." + os.path.basename(path) + "."


def _host_id():
    """Where a pid means one process: the host name and the PID namespace (containers sharing a
    folder and a host name still number their processes apart; a temp of another namespace must
    be kept, as another host's is, not judged by a pid that means another process here)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # no procfs (macOS, Windows): the host name alone
        namespace = ""
    return hashlib.sha256(f"{socket.gethostname()}\0{namespace}".encode()).hexdigest()[:8]


_HOST = _host_id()


def _writer_prefix(path):
    """The temp-name prefix of this process's writes of `path`: .NAME.<pid>-<host>."""
    return f"{_temp_prefix(path)}{os.getpid()}-{_HOST}."


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        pass
    return True


def _remove_orphans(path):
    """Temp files or folders of `path` left by a writer that was killed: those of a process of this
    host that is gone (.NAME.<pid>-<host>.<random>.tmp), and those of older versions, which carried
    no pid (.NAME.<random>.tmp). A live writer's temp (another shard's, another thread's) stays, and
    so does one of another host or PID namespace, whose process cannot be checked from here."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = re.escape(_temp_prefix(path))
    ours = re.compile(prefix + r"(\d+)-([0-9a-f]{8})\.[a-z0-9_]+\.tmp")
    legacy = re.compile(prefix + r"[a-z0-9_]+\.tmp")
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        m = ours.fullmatch(name)
        if m is not None:
            if m.group(2) != _HOST or int(m.group(1)) == os.getpid() or _alive(int(m.group(1))):
                continue
        elif legacy.fullmatch(name) is None:
            continue
        tmp = os.path.join(directory, name)
        try:
            if os.path.isdir(tmp) and not os.path.islink(tmp):
                shutil.rmtree(tmp)
            else:
                os.remove(tmp)
        except FileNotFoundError:
            pass


def _prepare_target(path):
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    refuse_links(directory, [os.path.basename(path)])
    _remove_orphans(path)
    return path, directory


class _Recorder:
    """A file object that remembers the OSError its writes raised: torch.save reports a failed write
    (a full disk) as RuntimeError("... unexpected pos ..."), which says neither the file nor why."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        try:
            return self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


def _naming(e, path, tmp):
    """`e` as an OSError naming the target `path` when it is the temp file's (`tmp`: a file or the
    temp folder) or names no file; an error about another file (one the writer reads) as it is."""
    if e.filename is not None and not str(e.filename).startswith(tmp):
        return e
    if e.errno is None:  # an OSError with a message only: keep it, name the target
        return OSError(f"{path}: {e}")
    return OSError(e.errno, e.strerror or str(e), path)


def atomic_write_bytes(path, write):
    """Call write(fileobj) on a temp file next to `path`, then atomically replace `path` with it.
    An OS error while writing (ENOSPC, EFBIG, EIO...) is raised as an OSError naming `path`."""
    path, directory = _prepare_target(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=_writer_prefix(path), suffix=".tmp")
    recorder = None
    try:
        # mkstemp makes 0600 files; the user's files get the mode open() would give them.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            recorder = _Recorder(f)
            try:
                write(recorder)
                recorder.flush()
                os.fsync(f.fileno())
            except OSError as e:
                raise _naming(e, path, tmp) from None
            except Exception:
                if recorder.error is not None:  # the writer's own error hides the OS's
                    raise _naming(recorder.error, path, tmp) from None
                raise
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(directory)


def atomic_write_text(path, text):
    atomic_write_bytes(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_files(path, write):
    """Call write(tmp_path) where tmp_path has `path`'s name inside a temp folder beside it, then
    move every file write() made there into `path`'s folder, `path` itself last. For writers that
    make companion files named after the target (an .onnx and its .data): each keeps its name, so
    the references between them hold. Each move is atomic; a kill before the first leaves the old
    files. A write() that raises leaves nothing (the old files stay)."""
    path, directory = _prepare_target(path)
    tmp_dir = tempfile.mkdtemp(dir=directory, prefix=_writer_prefix(path), suffix=".tmp")
    name = os.path.basename(path)
    try:
        os.chmod(tmp_dir, 0o777 & ~_umask())
        try:
            write(os.path.join(tmp_dir, name))
        except OSError as e:  # a file of the temp folder (a full disk): name the target instead
            raise _naming(e, path, tmp_dir) from None
        made = sorted(os.listdir(tmp_dir), key=lambda n: n == name)  # the target last
        if name not in made:
            raise FileNotFoundError(f"the writer made no {name} (made {made})")
        refuse_links(directory, made)
        for n in made:
            with open(os.path.join(tmp_dir, n), "rb+") as f:
                os.fsync(f.fileno())
        for n in made:
            os.replace(os.path.join(tmp_dir, n), os.path.join(directory, n))
        fsync_dir(directory)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# folder locks
# ----------------------------------------------------------------------------------------------
class LockedError(BlockingIOError):
    """Another process holds a folder's lock in a mode that excludes this request (an OSError, so
    callers that report OS errors report this one too)."""


class _Held:
    """This process's hold on one lock file: its descriptor, mode and how many holds share it."""

    def __init__(self, fd, exclusive, fallback=None):
        self.fd, self.exclusive, self.fallback, self.depth = fd, exclusive, fallback, 1


_held = {}  # realpath of a lock file -> _Held, for this process only
_held_guard = threading.Lock()


def _forget_after_fork():
    # a forked child (a DataLoader worker) shares the parent's lock descriptors: it must never
    # release them (LOCK_UN would drop the parent's lock) and holds nothing of its own
    global _held_guard
    _held.clear()
    _held_guard = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


def _holders(lock_path, but=None):
    """[(pid, "read" | "write")] from the holder files beside a lock file (their processes alive)."""
    out = []
    for p in glob.glob(glob.escape(lock_path) + ".*"):
        try:
            pid = int(p.rsplit(".", 1)[1])
            with open(p, encoding="utf-8") as f:
                mode = f.read().strip()
        except (ValueError, OSError):
            continue
        if pid == but:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue  # a killed holder's file: its lock is gone with it
        except OSError:
            pass  # alive, another user's
        out.append((pid, mode))
    return sorted(out)


def _clear_holders(lock_path, keep=lambda mode: False):
    for p in glob.glob(glob.escape(lock_path) + ".*"):
        try:
            with open(p, encoding="utf-8") as f:
                mode = f.read().strip()
            if int(p.rsplit(".", 1)[1]) != os.getpid() and not keep(mode):
                os.remove(p)
        except (ValueError, OSError):
            pass


def _close(fd):
    if fd is not None:
        os.close(fd)


class _FolderLock:
    def __init__(self, folder, what, exclusive, wait):
        self.folder, self.what, self.exclusive, self.wait = os.fspath(folder), what, exclusive, wait
        self.lock_path = os.path.join(os.path.realpath(self.folder), LOCK_NAME)
        self._pid = None  # the process that holds this hold (None: not held)

    def _refusal(self, holders):
        readers = [pid for pid, mode in holders if mode == "read"]
        writers = [pid for pid, mode in holders if mode != "read"]
        wait = option("wait=True", "--wait")
        if readers and not writers:  # only a writer waits for readers
            return LockedError(
                f"{self.what} {self.folder} is being read by pid {', '.join(map(str, readers))} "
                f"(lock file {self.lock_path}): it cannot be written while it is read; let "
                f"{'them' if len(readers) > 1 else 'it'} finish, or wait for that ({wait})")
        who = f"pid {', '.join(map(str, writers))}" if writers else "pid unknown"
        why = ("two writers would mix their outputs" if self.exclusive else
               "a reader now would see it half-written")
        return LockedError(f"{self.what} {self.folder} is being written by another process ({who}; "
                           f"lock file {self.lock_path}): wait for it to finish ({wait}) "
                           f"or stop it; {why}")

    def acquire(self):
        with _held_guard:
            if self._reenter():
                return self
            fd = self._open()
            try:
                fallback = self._lock(fd, block=False)
            except BaseException:
                _close(fd)
                raise
            if fallback is not False:
                return self._register(fd, fallback)
        if not self.wait:
            _close(fd)
            raise self._refusal(_holders(self.lock_path))
        try:  # blocking, outside the guard: other threads may take and drop their locks meanwhile
            fallback = self._lock(fd, block=True)
        except BaseException:
            _close(fd)
            raise
        with _held_guard:
            if self._reenter():  # another thread of this process took it meanwhile (as a reader)
                _close(fd)
                return self
            return self._register(fd, fallback)

    def _reenter(self):
        held = _held.get(self.lock_path)
        if held is None:
            return False
        if self.exclusive and not held.exclusive:
            raise LockedError(
                f"{self.what} {self.folder} is being read by this process (pid {os.getpid()}): it "
                "cannot be written while it is read here; close what reads it (e.g. "
                "LogitDataset.close()) first")
        held.depth += 1
        self._pid = os.getpid()
        return True

    def _register(self, fd, fallback):
        _held[self.lock_path] = _Held(fd, self.exclusive, fallback)
        self._pid = os.getpid()
        if fd is not None:
            # who holds it and how, for the refusals of others (best effort: a read-only folder
            # keeps no holder file); the files of killed holders go
            _clear_holders(self.lock_path, keep=(lambda m: False) if self.exclusive else
                           (lambda m: m == "read"))
            try:
                with open(f"{self.lock_path}.{os.getpid()}", "w", encoding="utf-8") as f:
                    f.write("write\n" if self.exclusive else "read\n")
            except OSError:
                pass
        return self

    def _open(self):
        if not self.exclusive and not os.path.isdir(self.folder):
            return None  # nothing to read yet: the reader's own open reports it
        if self.exclusive:
            os.makedirs(self.folder, exist_ok=True)
        refuse_links(os.path.dirname(self.lock_path), [LOCK_NAME])
        flags = os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            return os.open(self.lock_path, os.O_RDWR | flags, 0o666)
        except OSError as e:
            if self.exclusive or e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                raise
        try:  # a reader in a folder it may not write: an existing lock file still locks
            return os.open(self.lock_path, os.O_RDONLY)
        except OSError:
            return None  # no lock file and none can be made here: nobody can write here either

    def _lock(self, fd, block):
        """Lock fd: None when locked by flock, a filelock object (no fcntl), False when busy."""
        if fd is None:
            return None
        if fcntl is None:  # Windows: writers exclude each other, readers take no lock
            if not self.exclusive:
                return None
            lock = FileLock(self.lock_path + ".filelock", timeout=-1 if block else 0)
            try:
                lock.acquire()
            except Timeout:
                return False
            return lock
        mode = fcntl.LOCK_EX if self.exclusive else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, mode | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return None

    def release(self):
        if self._pid != os.getpid():
            return  # not held, or a copy in a forked child: the parent's to release
        self._pid = None
        with _held_guard:
            held = _held.get(self.lock_path)
            if held is None:
                return
            held.depth -= 1
            if held.depth:
                return
            del _held[self.lock_path]
            if held.fd is None:
                return
            try:
                os.remove(f"{self.lock_path}.{os.getpid()}")
            except OSError:
                pass
            if held.fallback is not None:
                held.fallback.release()
            elif fcntl is not None:
                fcntl.flock(held.fd, fcntl.LOCK_UN)
            os.close(held.fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def writer_lock(folder, what, wait=False):
    """`with writer_lock(folder, "logit store"):` holds folder/.mimic_fast.lock alone.

    Raises LockedError naming the holders' pids while another process reads or writes the folder,
    or with wait=True blocks until they let it go (sweep shards wait for the one preparing their
    shared folder). Re-entrant within a process (the CLI holds a run folder's lock around the
    library call that takes it again). Creates the folder.
    """
    return _FolderLock(folder, what, True, wait)


def reader_lock(folder, what, wait=False):
    """`with reader_lock(folder, "logit store"):` shares folder/.mimic_fast.lock with other readers
    and keeps writers out for as long as it is held (also .acquire() / .release()).

    Raises LockedError naming the writer's pid while one writes the folder (wait=True: waits for
    it). A folder that does not exist is not locked (there is nothing to read).
    """
    return _FolderLock(folder, what, False, wait)
