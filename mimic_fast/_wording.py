"""How an error message names an option: the Python keyword (`resume=True`) in a library call, the
command-line flag (`--resume`) under `mimic-fast`. The library's messages say `option("resume=True",
"--resume")`; `mimic_fast.cli` runs each command inside `cli_wording()`, so a user of the command
line is never told to pass a keyword argument, and a Python caller never a flag. A context variable:
threads and other callers keep their own wording.
"""
import contextlib
import contextvars

__all__ = ["option", "cli_wording"]

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
