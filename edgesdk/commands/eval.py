"""edgesdk eval ARTIFACT --text FILE [--baseline OTHER]: perplexity, and quality against a baseline."""
from __future__ import annotations

import argparse
import json
import sys

from .common import check_json_file, write_json_file


def register(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on a text file; KL and top-1 agreement against a baseline artifact")
    p.add_argument("artifact")
    p.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text to score")
    p.add_argument("--baseline", default=None, metavar="ARTIFACT",
                   help="reference artifact with the same tokenizer (e.g. the FP32 export)")
    p.add_argument("--window", type=int, default=None, help="tokens per forward pass (default: min(1024, context))")
    p.add_argument("--stride", type=int, default=None, help="how far each window moves (default: window/2)")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate only the text's first N tokens")
    p.add_argument("--target", default="auto", help="runtime target (default: auto)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="also write the result as JSON ('-': stdout)")
    p.set_defaults(fn=run)


def progress_printer():
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        print(f"\r  window {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return show


def run(a: argparse.Namespace) -> int:
    from ..evaluate import evaluate

    check_json_file(a.json_file)
    r = evaluate(a.artifact, a.text, baseline=a.baseline, window=a.window, stride=a.stride, max_tokens=a.max_tokens,
                 target=a.target, threads=a.threads, progress=progress_printer())
    if a.json_file == "-":
        print(json.dumps(r.to_dict(), indent=2))
        return 0
    print(r.summary())
    if a.json_file:
        write_json_file(a.json_file, r.to_dict())
    return 0
