"""A client of `edgesdk serve` (an OpenAI-compatible server) with the openai package.

    edgesdk serve build/smollm2-int4 --port 8000 &
    python samples/serve_client.py --base-url http://127.0.0.1:8000/v1

Any OpenAI client works the same way: point base_url at the server. The conversation is a plain
list of messages that the client keeps and sends whole each turn.
"""
from __future__ import annotations

import argparse
import os
import sys

from openai import OpenAI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=os.environ.get("EDGESDK_API_KEY", "none"),
                   help="the server's --api-key, if it has one")
    p.add_argument("--max-tokens", type=int, default=64)
    a = p.parse_args(argv)

    client = OpenAI(base_url=a.base_url, api_key=a.api_key)
    model = client.models.list().data[0].id                # the served artifact's name (or --alias)
    print(f"model: {model}")

    history = [{"role": "system", "content": "You are a helpful assistant. Answer briefly."}]
    for question in ("What is the capital of France?", "And of Italy?"):
        history.append({"role": "user", "content": question})
        print(f"you> {question}\nassistant> ", end="", flush=True)
        reply = []
        stream = client.chat.completions.create(model=model, messages=history, max_tokens=a.max_tokens,
                                                stream=True)
        for event in stream:                               # server-sent events, one per token or so
            if event.choices and event.choices[0].delta.content:
                reply.append(event.choices[0].delta.content)
                print(event.choices[0].delta.content, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})

    once = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=a.max_tokens)
    print(f"non-streaming: {once.choices[0].message.content!r} "
          f"({once.usage.completion_tokens} tokens, finish_reason={once.choices[0].finish_reason})")
    print(f"{len(history)} messages in the history")
    return 0


if __name__ == "__main__":
    sys.exit(main())
