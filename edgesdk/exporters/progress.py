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
