"""Speculative decoding with a small draft model: same text as the target alone, fewer target steps.

    python samples/speculative_pair.py build/qwen-1.5b-int4 build/qwen-0.5b-int4 "Explain DNS briefly."

The draft must share the target's tokenizer (the same model family). With greedy decoding the
output is exactly the target's own; the draft only changes how many target calls it takes.
"""
from __future__ import annotations

import argparse
import sys

import edgesdk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("target", help="the large model's artifact")
    p.add_argument("draft", help="the small model's artifact (same tokenizer)")
    p.add_argument("prompt", nargs="?", default="Write a haiku about the sea.")
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args(argv)

    messages = [{"role": "user", "content": a.prompt}]
    alone = edgesdk.load(a.target)
    plain = alone.generate(messages=messages, max_new_tokens=a.max_new_tokens)

    fast = edgesdk.load(a.target, draft=a.draft)          # draft_target="auto": the draft may run on the CPU
    spec = fast.generate(messages=messages, max_new_tokens=a.max_new_tokens)

    s = spec.speculative
    print(spec.text)
    print(f"same text as the target alone: {spec.text == plain.text}")
    print(f"acceptance {s['acceptance_rate']:.0%} ({s['accepted']}/{s['proposed']} drafted tokens), "
          f"{s['target_calls']} target calls for {spec.generated_tokens} tokens")
    print(f"{plain.decode_tokens_per_s:.0f} tok/s alone, {spec.decode_tokens_per_s:.0f} tok/s with the draft")
    return 0 if spec.text == plain.text else 1


if __name__ == "__main__":
    sys.exit(main())
