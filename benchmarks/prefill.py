"""Prefill benchmark (issue 12): time to first token and peak RSS with and without the
``num_logits_to_keep`` input, at several prompt lengths.

    python benchmarks/prefill.py build/smollm2-int4-keep /work/models/qwen05-int4 \\
        --prompt-tokens 108,512,2048 --runs 3 --json prefill.json

Two modes run the same artifact (it must have been exported with the input: the manifest's
model.logits_to_keep_input):

* ``full``: the runtime before issue 12. The input is never fed, so the graph computes the
  logits of every prompt position, in one forward pass over the whole prompt.
* ``keep``: the current runtime. The prefill feeds num_logits_to_keep=1 and runs the prompt in
  chunks of PREFILL_CHUNK tokens (runtime/decoder.py). ``keep:N`` uses chunks of N tokens
  (``--modes keep:256,keep:512,keep:2048`` compares chunk sizes).

Every measurement is a fresh process (``python benchmarks/prefill.py --worker``, a JSON request
on stdin): it loads the model, runs one short warm-up generation (8 prompt tokens), then one
measured generation of ``--new-tokens`` tokens from a prompt of exactly N tokens (real text,
EOS ignored). Peak RSS is the process's ru_maxrss (weights + KV cache + activations + logits,
and the load itself); ``after load`` is the RSS right after loading. Runs are interleaved:
for each repetition, every (length, mode) pair once, modes alternating, so drift in machine
load hits both modes alike. The table shows medians; the JSON keeps every run.

The memory goal: peak RSS <= artifact (model.onnx + .data) + the KV cache of the tokens written
+ 150 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
BUDGET_EXTRA = 150 * MB


def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def worker(req: dict) -> dict:
    import numpy as np

    import edgesdk
    from edgesdk.bench import prompt_of
    from edgesdk.runtime.decoder import Decoder

    t0 = time.perf_counter()
    model = edgesdk.load(req["artifact"], max_length=req["max_length"], threads=req["threads"])
    load_s = time.perf_counter() - t0
    mode, _, chunk = req["mode"].partition(":")
    if mode == "full":  # the old runtime: never feeds the input, one pass over the prompt
        model.decoder = Decoder(model.session, model.artifact.genai_config, model.max_length,
                                logits_to_keep=None, prefill_chunk=1 << 30)
    elif not model.decoder.keep_name:
        raise SystemExit(f"{req['artifact']} has no num_logits_to_keep input: export it again")
    elif chunk:  # keep:N -- another chunk size than PREFILL_CHUNK
        model.decoder.prefill_chunk = int(chunk)
    model.eos_token_ids = set()
    warm, _ = prompt_of(model.tokenizer, 8)
    model.generate(warm, max_new_tokens=2)
    after_load = _rss_now()
    text, n = prompt_of(model.tokenizer, req["prompt_tokens"])
    r = model.generate(text, max_new_tokens=req["new_tokens"])
    spec = model.decoder.spec
    kv = 2 * spec.num_layers * spec.num_kv_heads * spec.head_size * (n + r.generated_tokens) * \
        np.dtype(spec.dtype).itemsize
    return {"mode": req["mode"], "prompt_tokens": n, "ttft_s": r.time_to_first_token_s,
            "decode_tok_s": r.decode_tokens_per_s, "generated_tokens": r.generated_tokens,
            "token_ids": r.token_ids, "load_s": load_s, "rss_after_load": after_load,
            "peak_rss": _peak_rss(), "kv_cache_bytes": kv, "providers": model.providers}


def spawn(req: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, __file__, "--worker"], input=json.dumps(req), capture_output=True,
                       text=True, env=env, timeout=1800)
    if p.returncode != 0 or not p.stdout.strip():
        raise RuntimeError(f"worker failed (exit {p.returncode}): {p.stderr.strip()[-2000:]}")
    return json.loads(p.stdout)


def artifact_bytes(path: Path) -> int:
    manifest = json.loads((path / "edgesdk.json").read_text())
    name = manifest["model"]["filename"]
    return sum(f.stat().st_size for f in path.iterdir() if f.name.startswith(name))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifacts", nargs="*")
    ap.add_argument("--prompt-tokens", default="108,512,2048")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--modes", default="full,keep")
    ap.add_argument("--json", help="write every run here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        sys.stdout.write(json.dumps(worker(json.loads(sys.stdin.read()))))
        return 0
    lengths = [int(x) for x in a.prompt_tokens.split(",")]
    modes = a.modes.split(",")
    results: dict = {"system": {"python": platform.python_version(), "machine": platform.machine(),
                                "cpus": os.cpu_count(), "threads": a.threads},
                     "settings": vars(a), "artifacts": {}}
    for art in a.artifacts:
        path = Path(art)
        runs: list[dict] = []
        for rep in range(a.runs):
            for n in lengths:
                order = modes if rep % 2 == 0 else modes[::-1]
                for mode in order:
                    out = spawn({"artifact": str(path), "mode": mode, "prompt_tokens": n, "new_tokens": a.new_tokens,
                                 "threads": a.threads, "max_length": a.max_length})
                    out["rep"] = rep
                    runs.append(out)
                    print(f"  {path.name} n={n} {mode}: ttft {out['ttft_s']:.3f} s, "
                          f"peak {out['peak_rss'] / MB:.0f} MiB", file=sys.stderr, flush=True)
        results["artifacts"][str(path)] = {"artifact_bytes": artifact_bytes(path), "runs": runs}
    print_table(results)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


def print_table(results: dict) -> None:
    print(f"{'artifact':<22} {'prompt':>6} {'mode':<10} {'TTFT s':>8} {'peak RSS MiB':>12} {'after load':>10} "
          f"{'prefill +':>9} {'KV MiB':>6} {'budget MiB':>10} {'ok':>3} {'same tokens':>11}")
    for art, entry in results["artifacts"].items():
        name = Path(art).name
        size = entry["artifact_bytes"]
        by: dict = {}
        for r in entry["runs"]:
            by.setdefault((r["prompt_tokens"], r["mode"]), []).append(r)
        for (n, mode), rs in sorted(by.items()):  # (prompt tokens, mode)
            ttft = statistics.median(r["ttft_s"] for r in rs)
            peak = statistics.median(r["peak_rss"] for r in rs)
            after = statistics.median(r["rss_after_load"] for r in rs)
            budget = size + rs[0]["kv_cache_bytes"] + BUDGET_EXTRA
            other = by.get((n, "full")) if mode != "full" else next(
                (v for (m, o), v in by.items() if m == n and o != "full"), None)
            same = "" if not other else "yes" if all(r["token_ids"] == other[0]["token_ids"] for r in rs) else "NO"
            extra = statistics.median(r["peak_rss"] - r["rss_after_load"] for r in rs)
            print(f"{name:<22} {n:>6} {mode:<10} {ttft:>8.3f} {peak / MB:>12.0f} {after / MB:>10.0f} "
                  f"{extra / MB:>9.0f} {rs[0]['kv_cache_bytes'] / MB:>6.0f} {budget / MB:>10.0f} "
                  f"{'yes' if peak <= budget else 'no':>3} {same:>11}")


if __name__ == "__main__":
    sys.exit(main())
