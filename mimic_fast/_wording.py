"""How an error message names an option: the Python keyword (`resume=True`) in a library call, the
command-line flag (`--resume`) under `mimic-fast`. The library's messages say `option("resume=True",
"--resume")`; `mimic_fast.cli` runs each command inside `cli_wording()`, so a user of the command
line is never told to pass a keyword argument, and a Python caller never a flag. A context variable:
threads and other callers keep their own wording.

Also how a message quotes another library's (`one_line`) and which failures are a lack of memory
(`out_of_memory`: worded as such by the CLI, never as a damaged file or a bad option).
"""
import contextlib
import contextvars
import re

import torch

__all__ = ["option", "cli_wording", "one_line", "out_of_memory"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its messages

_CLI = contextvars.ContextVar("mimic_fast_cli_wording", default=False)


def option(python, flag):
    """`python` (e.g. "resume=True") in a library call, `flag` (e.g. "--resume") under the CLI."""
    return flag if _CLI.get() else python


@contextlib.contextmanager
def cli_wording():
    token = _CLI.set(True)
    try:
        yield
    finally:
        _CLI.reset(token)


def one_line(e, limit=200):
    """Another library's message (an exception or a string) quoted in one of ours: colours removed,
    whitespace collapsed to one line, at most `limit` characters; an exception's type name when it
    has no text."""
    text = " ".join(_ANSI.sub("", str(e)).split())[:limit]
    return text or (type(e).__name__ if isinstance(e, BaseException) else "")


def out_of_memory(e):
    """Whether `e` is an allocation that failed (torch's CPU allocator raises RuntimeError, CUDA's
    torch.OutOfMemoryError, numpy and Python MemoryError)."""
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(e, RuntimeError) and any(
        s in str(e) for s in ("can't allocate memory", "not enough memory", "out of memory"))
