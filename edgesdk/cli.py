"""The `edgesdk` command. Verbs live in edgesdk/commands/, one module each."""
from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from .errors import EdgeSDKError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import VERBS

    parser = _Parser(prog="edgesdk", description="Export language models to ONNX for a device and run them.")
    parser.add_argument("--version", action="version", version=f"edgesdk {__version__}")
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default)")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)
    for verb in VERBS:
        importlib.import_module(f".commands.{verb}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(a.log_level).upper(), logging.WARNING),
                        format="edgesdk: %(message)s")
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):  # not when started with SIGINT ignored
        from .exporters.progress import interrupt_handler

        signal.signal(signal.SIGINT, interrupt_handler)
    try:
        return a.fn(a) or 0
    except EdgeSDKError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
