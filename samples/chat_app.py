"""A streaming chat with history, embedded in a Python app: the few lines to copy.

    python samples/chat_app.py build/smollm2-int4            # type a message, Enter; Ctrl-D quits

edgesdk.load picks the best execution provider this machine has for the artifact; Model.chat keeps
the conversation (and its KV cache) between turns, so each turn only computes the new tokens.
"""
from __future__ import annotations

import argparse
import sys

import edgesdk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact", help="an artifact folder made by `edgesdk export`")
    p.add_argument("--system", default="You are a helpful assistant. Answer briefly.")
    p.add_argument("--max-new-tokens", type=int, default=256)
    a = p.parse_args(argv)

    model = edgesdk.load(a.artifact)                       # target="auto"
    chat = model.chat(system=a.system)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:                                       # end of input: the conversation is over
            break
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        for chunk in chat.send(line.strip(), max_new_tokens=a.max_new_tokens):
            print(chunk.text, end="", flush=True)          # text arrives token by token
        r = chat.last                                      # the whole turn: tokens, timings, why it stopped
        print(f"\n[{r.generated_tokens} tokens, {r.decode_tokens_per_s:.0f} tok/s, {r.finish_reason}]", flush=True)
    print(f"{len(chat.messages)} messages in the history")
    return 0


if __name__ == "__main__":
    sys.exit(main())
