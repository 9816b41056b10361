"""Staged log lines for long work (bars come from the libraries doing the work)."""
from __future__ import annotations

import contextlib
import io
import os
import re
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


class _LayerBar(io.TextIOBase):
    """Turns the builder's "Reading layer N" lines into one progress bar on stderr."""

    def __init__(self, total: int, label: str):
        self.total, self.label, self.pending, self.drawn = total, label, "", False

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        while "\n" in self.pending:
            line, self.pending = self.pending.split("\n", 1)
            m = re.match(r"Reading layer (\d+)", line)
            if m and self.total:
                done = int(m.group(1)) + 1
                bar = "#" * (24 * done // self.total)
                sys.stderr.write(f"\r    {self.label} [{bar:<24}] {done}/{self.total} layers")
                self.drawn = True
            elif line.strip():
                if self.drawn:
                    sys.stderr.write("\n")
                    self.drawn = False
                sys.stderr.write(line + "\n")
        sys.stderr.flush()
        return len(text)


@contextlib.contextmanager
def library_output(layers: int = 0, label: str = ""):
    """Libraries doing the work print progress freely: send it to stderr (stdout stays clean
    for results), or nowhere when quiet. With ``layers``, per-layer lines become a bar."""
    if _quiet:
        with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
            yield
    elif layers:
        bar = _LayerBar(layers, label)
        with contextlib.redirect_stdout(bar):
            yield
        bar.write("\n")
    else:
        with contextlib.redirect_stdout(sys.stderr):
            yield
