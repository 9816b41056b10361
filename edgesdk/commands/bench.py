"""edgesdk bench ARTIFACT: load time, TTFT, prefill/decode tokens/s and peak RSS (table + JSON)."""
from __future__ import annotations

import argparse
import json
import sys

from .common import check_json_file, write_json_file


def _lengths(value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma-separated list of token counts") from None
    if not out:
        raise argparse.ArgumentTypeError("give at least one prompt length")
    return out


def register(sub) -> None:
    p = sub.add_parser("bench", help="measure load time, time to first token, tokens/s and peak memory")
    p.add_argument("artifact")
    p.add_argument("--target", default="auto", help="runtime target (default: auto)")
    p.add_argument("--prompt-tokens", type=_lengths, default=[128, 512, 2048], metavar="N[,N...]",
                   help="prompt lengths to measure (default: 128,512,2048)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate per run (default: 128)")
    p.add_argument("--runs", type=int, default=5, help="measured runs per prompt length (default: 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs first (default: 1)")
    p.add_argument("--draft", default=None, help="draft artifact for speculative decoding, or prompt-lookup")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: onnxruntime's)")
    p.add_argument("--max-length", type=int, default=None, help="cap the KV cache (default: model context)")
    p.add_argument("--json", dest="json_file", default=None, metavar="FILE", help="also write the report as JSON ('-': stdout)")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..bench import bench, format_table

    check_json_file(a.json_file)
    # one staged line per measurement, on a terminal or piped (each can take a minute)
    progress = lambda msg: print(f"==> {msg}", file=sys.stderr, flush=True)  # noqa: E731
    report = bench(a.artifact, target=a.target, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                   runs=a.runs, warmup=a.warmup, draft=a.draft, threads=a.threads, max_length=a.max_length,
                   progress=progress)
    if a.json_file == "-":
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(report))
    if a.json_file:
        write_json_file(a.json_file, report)
    return 0
