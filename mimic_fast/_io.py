"""Crash-safe writes: the one place that decides how files the user keeps reach the disk.

Write a temp file in the same directory, fsync it, os.replace it onto the target, fsync the
directory: a crash (even kill -9 or power loss) leaves the old file or the new one, never a torn one.
"""
import os
import tempfile


def fsync_dir(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a directory; os.replace is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, write):
    """Call write(fileobj) on a temp file next to `path`, then atomically replace `path` with it."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
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
