"""edgesdk run ARTIFACT "prompt": one shot, streamed to stdout."""
from __future__ import annotations

import argparse
import sys

from .common import add_runtime_args, add_sampling_args, load_model, settings


def register(sub) -> None:
    p = sub.add_parser("run", help="generate a completion for one prompt, streamed to stdout")
    p.add_argument("artifact")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("-v", "--verbose", action="store_true", help="print timings to stderr")
    add_sampling_args(p)
    add_runtime_args(p)
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    model = load_model(a)
    kwargs = {"messages": [{"role": "user", "content": a.prompt}]} if a.chat else {"prompt": a.prompt}
    stream = model.stream(**kwargs, **settings(a))
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    r = stream.result
    if a.verbose:
        print(f"[{r.prompt_tokens} prompt tokens, {r.generated_tokens} generated, finish={r.finish_reason}; "
              f"load {model.load_s:.2f}s, TTFT {r.time_to_first_token_s * 1000:.0f} ms, "
              f"decode {r.decode_tokens_per_s:.1f} tok/s; providers {', '.join(model.providers)}]", file=sys.stderr)
    return 0
