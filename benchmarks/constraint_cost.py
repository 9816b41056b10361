"""What a response_format mask costs per decode step: the same chat prompt decoded with a JSON
schema constraint (llguidance), timing the mask (matcher update + bitmask + applying it to the
logits) against the whole step. Median of --runs after a warm-up. Prints a table and JSON.

    python benchmarks/constraint_cost.py build/smollm2-int4 --runs 3
"""
from __future__ import annotations

import argparse
import json
import statistics

import edgesdk
from edgesdk.runtime.constraints import constraint

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "city", "hobbies"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "city": {"type": "string"},
                         "hobbies": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}}
PROMPT = [{"role": "user", "content": "Describe a person named Alice who lives in Paris, as JSON."}]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    model = edgesdk.load(a.artifact, threads=a.threads)
    constraint(model.tokenizer, SCHEMA, model.eos_token_ids)  # builds llguidance's tokenizer once (~1 s)
    model.generate(messages=PROMPT, max_new_tokens=16)
    rows = []
    for _ in range(a.runs):
        c = constraint(model.tokenizer, SCHEMA, model.eos_token_ids)
        r = model.generate(messages=PROMPT, max_new_tokens=96, logits_processors=[c])
        rows.append({"mask_ms": c.mask_s * 1000 / c.steps, "step_ms": 1000 / r.decode_tokens_per_s,
                     "tokens": r.generated_tokens, "valid_json": r.finish_reason == "stop", "text": r.text})
    mask = statistics.median(x["mask_ms"] for x in rows)
    step = statistics.median(x["step_ms"] for x in rows)
    out = {"artifact": a.artifact, "mask_ms_per_step": round(mask, 3), "decode_step_ms": round(step, 2),
           "mask_share_pct": round(mask / step * 100, 2), "tokens": rows[0]["tokens"],
           "valid_json": all(x["valid_json"] for x in rows), "sample": rows[0]["text"][:120]}
    print("| mask per step | decode step (with mask) | share |\n|---|---|---|")
    print(f"| {out['mask_ms_per_step']} ms | {out['decode_step_ms']} ms | {out['mask_share_pct']}% |")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
