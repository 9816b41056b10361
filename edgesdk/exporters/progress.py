"""Staged log lines for long work (bars come from the libraries doing the work)."""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import threading
import time

_quiet = False
_interrupted = False


def interrupt_handler(signum, frame) -> None:
    """The CLI's SIGINT handler: remember the interrupt, then raise KeyboardInterrupt as Python's
    own does. Python drops an exception raised while a ``__del__`` or a gc callback runs
    ("Exception ignored in ..."), and one interrupt during an export was once lost that way
    (the export finished with status 0); ``stage`` raises it again at the next stage boundary."""
    global _interrupted
    _interrupted = True
    raise KeyboardInterrupt


def check_interrupted() -> None:
    if _interrupted:
        raise KeyboardInterrupt


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def say(message: str) -> None:
    if not _quiet:
        print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(what: str):
    check_interrupted()
    say(f"==> {what} ...")
    t = time.perf_counter()
    yield
    check_interrupted()
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
    elif layers and not sys.stderr.isatty():
        # piped: the stage's own lines only, no bar redraws and none of the libraries' progress
        # text (the builder's per-layer lines, tqdm bars), which would fill a log with redraws
        sink = io.StringIO()
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    elif layers:
        bar = _LayerBar(layers, label)
        with contextlib.redirect_stdout(bar):
            yield
        bar.write("\n")
    else:
        with contextlib.redirect_stdout(sys.stderr):
            yield


class Bar:
    """A progress bar redrawn in place on a terminal; nothing when stderr is piped or quiet (the
    stage's own lines say what is happening there)."""

    def __init__(self, total: int, unit: str):
        self.total, self.unit = total, unit
        self.live = not _quiet and sys.stderr.isatty()
        self.last, self.drawn = 0.0, False

    def update(self, done: int) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < 0.1:
            return
        self.last = now
        bar = "#" * (24 * done // max(self.total, 1))
        sys.stderr.write(f"\r    [{bar:<24}] {done}/{self.total} {self.unit}")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()
            self.drawn = False


@contextlib.contextmanager
def ticking(label: str):
    """On a terminal, ``label`` and the seconds elapsed, redrawn each second, for work that has
    no count to show; nothing when stderr is piped or quiet."""
    err = sys.stderr  # the terminal itself, even if the work redirects sys.stderr
    if _quiet or not err.isatty():
        yield
        return
    stop, t0 = threading.Event(), time.monotonic()

    def run() -> None:
        while not stop.wait(1.0):
            err.write(f"\r    {label} ... {time.monotonic() - t0:.0f}s")
            err.flush()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        if time.monotonic() - t0 >= 1.0:
            err.write("\r\033[K")
            err.flush()
