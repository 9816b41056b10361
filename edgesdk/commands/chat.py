"""edgesdk chat ARTIFACT: interactive multi-turn chat; only each new turn is prefilled."""
from __future__ import annotations

import argparse
import sys

from .common import add_runtime_args, add_sampling_args, load_model, settings


def register(sub) -> None:
    p = sub.add_parser("chat", help="interactive multi-turn chat (the KV cache is kept across turns)")
    p.add_argument("artifact")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("-v", "--verbose", action="store_true", help="print per-turn timings to stderr")
    add_sampling_args(p)
    add_runtime_args(p)
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    model = load_model(a)
    chat = model.chat(system=a.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"edgesdk chat: {model.path.name} on {model.providers[0]}. Empty line or Ctrl-D to quit.",
              file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        for chunk in chat.send(line.strip(), **settings(a)):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        r = chat.last
        if a.verbose:
            print(f"[prefilled {r.prefilled_tokens} of {r.prompt_tokens} prompt tokens, {r.generated_tokens} "
                  f"generated, TTFT {r.time_to_first_token_s * 1000:.0f} ms, "
                  f"decode {r.decode_tokens_per_s:.1f} tok/s]", file=sys.stderr)
