"""Staged log lines for long work (bars come from the libraries doing the work)."""
from __future__ import annotations

import contextlib
import sys
import time

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def say(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(what: str):
    say(f"==> {what} ...")
    t = time.perf_counter()
    yield
    say(f"    done in {time.perf_counter() - t:.1f}s")


@contextlib.contextmanager
def library_output():
    """Libraries doing the work print progress freely: send it to stderr (stdout stays clean
    for results), or nowhere when quiet."""
    if _quiet:
        import os

        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield
    else:
        with contextlib.redirect_stdout(sys.stderr):
            yield
