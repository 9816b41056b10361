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
    g = p.add_argument_group("speculative decoding")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--draft", default=None, metavar="DRAFT", help="draft model artifact (same tokenizer, smaller)")
    x.add_argument("--prompt-lookup", action="store_true", help="propose tokens copied from the prompt (no draft model)")
    x.add_argument("--no-draft", action="store_true", help="ignore a draft bundled in the artifact")
    g.add_argument("--num-draft-tokens", type=int, default=None, metavar="K",
                   help="tokens proposed per target call (default: adaptive)")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    draft = "prompt-lookup" if a.prompt_lookup else False if a.no_draft else a.draft
    model = load_model(a, draft=draft)
    kwargs = {"messages": [{"role": "user", "content": a.prompt}]} if a.chat else {"prompt": a.prompt}
    stream = model.stream(**kwargs, **settings(a), num_draft_tokens=a.num_draft_tokens)
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
        s = r.speculative
        if s:
            print(f"[{s['method']}: {s['accepted']}/{s['proposed']} draft tokens accepted "
                  f"({s['acceptance_rate']:.0%}), {s['tokens_per_target_call']:.2f} tokens per target call]",
                  file=sys.stderr)
    return 0
