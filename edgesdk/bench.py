"""Speed and memory of an artifact: load time, time to first token, prefill and decode tokens/s,
peak RSS; median with min and max over the measured runs, after warm-up.

Every measurement runs in a fresh Python process (``python -m edgesdk.bench``, a JSON request
on stdin and a JSON answer on stdout), so one configuration's buffers and page cache state do
not leak into another's numbers and peak RSS is the process's own:

* load: ``warmup + runs`` processes that each import edgesdk and call ``edgesdk.load``; the
  first ``warmup`` are discarded (they warm the OS file cache). Peak RSS is the process's
  ru_maxrss once loaded.
* generation: one process per prompt length loads the model once, runs ``warmup`` unmeasured
  generations, then ``runs`` measured ones. Before each measured run the kernel's peak-RSS
  counter is reset (Linux: /proc/self/clear_refs), so each run reports its own peak
  (weights + KV cache + activations + logits). Where that reset is not available the process
  peak (ru_maxrss, monotone) is reported and the JSON says so.

Prompts are cut from a built-in English passage to exactly the requested token count; EOS is
ignored so every run generates ``new_tokens`` tokens.
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .provenance import package_versions
from .errors import ArtifactError, EdgeSDKError, InvalidArgumentError

SCHEMA = 1
PACKAGES = ("edgesdk", "onnxruntime", "onnxruntime-genai", "numpy", "tokenizers")

# Prompt material: the opening of Jane Austen's Pride and Prejudice (public domain), repeated
# as needed. Real prose keeps the tokenization and (for speculative decoding) the acceptance
# rates realistic.
_PASSAGE = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is considered "
    "the rightful property of some one or other of their daughters. \"My dear Mr. Bennet,\" said his lady to "
    "him one day, \"have you heard that Netherfield Park is let at last?\" Mr. Bennet replied that he had not. "
    "\"But it is,\" returned she; \"for Mrs. Long has just been here, and she told me all about it.\" Mr. Bennet "
    "made no answer. \"Do you not want to know who has taken it?\" cried his wife impatiently. \"You want to "
    "tell me, and I have no objection to hearing it.\" This was invitation enough. \"Why, my dear, you must "
    "know, Mrs. Long says that Netherfield is taken by a young man of large fortune from the north of England; "
    "that he came down on Monday in a chaise and four to see the place, and was so much delighted with it, that "
    "he agreed with Mr. Morris immediately; that he is to take possession before Michaelmas, and some of his "
    "servants are to be in the house by the end of next week.\" "
)


# -- statistics and environment --------------------------------------------------------------
def summarize(values: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "samples": list(values)}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or platform.processor()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine()


def system_info() -> dict[str, Any]:
    versions = package_versions(PACKAGES)
    return {"cpu": cpu_model(), "logical_cores": os.cpu_count(), "machine": platform.machine(),
            "os": platform.platform(), "python": platform.python_version(), "packages": versions}


# -- peak RSS ------------------------------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes(since_reset: bool) -> int | None:
    if since_reset:
        m = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        if m:
            return int(m.group(1)) * 1024
    try:
        import resource
    except ImportError:  # Windows
        try:
            import psutil  # optional

            return int(psutil.Process().memory_info().peak_wset)
        except Exception:
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


# -- the worker (runs in a fresh process) ------------------------------------------------------
def _load(req: dict):
    from .runtime.model import load

    kwargs = {"target": req["target"], "threads": req["threads"], "max_length": req["max_length"]}
    if req.get("draft"):
        kwargs["draft"] = req["draft"]
    return load(req["artifact"], **kwargs)


def prompt_of(tokenizer, n: int) -> tuple[str, int]:
    """A prompt of real text that encodes (with special tokens, as generate() does) to ``n`` tokens."""
    unit = tokenizer.encode(_PASSAGE, add_special_tokens=False)
    base = (unit * (n // len(unit) + 2))[: n + 8]
    k = n
    text, got = "", 0
    for _ in range(16):
        text = tokenizer.decode(base[:k], skip_special_tokens=False)
        got = len(tokenizer.encode(text, add_special_tokens=True))
        if got == n or k <= 1:
            break
        k += n - got
    return text, got


def _worker_load(req: dict) -> dict:
    t0 = time.perf_counter()
    model = _load(req)
    load_s = time.perf_counter() - t0
    return {"load_s": load_s, "peak_rss": _peak_rss_bytes(False), "providers": model.providers,
            "precision": model.manifest.get("precision"), "max_length": model.max_length}


def _worker_generate(req: dict) -> dict:
    model = _load(req)
    model.eos_token_ids = set()  # generate exactly new_tokens tokens
    draft_model = getattr(model, "draft", None)
    if draft_model is not None and hasattr(draft_model, "eos_token_ids"):
        draft_model.eos_token_ids = set()
    text, prompt_tokens = prompt_of(model.tokenizer, req["prompt_tokens"])
    for _ in range(req["warmup"]):
        model.generate(text, max_new_tokens=req["new_tokens"])
    runs = []
    resettable = _reset_peak_rss()
    for _ in range(req["runs"]):
        if resettable:
            _reset_peak_rss()
        r = model.generate(text, max_new_tokens=req["new_tokens"])
        runs.append({"ttft_s": r.time_to_first_token_s,
                     "prefill_tok_s": r.prefilled_tokens / r.time_to_first_token_s,
                     "decode_tok_s": r.decode_tokens_per_s,
                     "total_s": r.total_s,
                     "generated_tokens": r.generated_tokens,
                     "prompt_tokens": r.prompt_tokens,
                     "peak_rss": _peak_rss_bytes(resettable),
                     "speculative": r.speculative})
    return {"runs": runs, "prompt_tokens": prompt_tokens, "rss_per_run": resettable,
            "providers": model.providers}


def _worker_main() -> int:
    req = json.loads(sys.stdin.read())
    try:
        out = _worker_load(req) if req["mode"] == "load" else _worker_generate(req)
    except EdgeSDKError as e:
        out = {"error": str(e), "error_type": type(e).__name__}
    sys.stdout.write(json.dumps(out))
    return 0


def _spawn(req: dict, timeout: float | None) -> dict:
    env = dict(os.environ)
    # the worker must import this same edgesdk, wherever it was imported from
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run([sys.executable, "-m", "edgesdk.bench"], input=json.dumps(req), capture_output=True,
                       text=True, env=env, timeout=timeout)
    if p.returncode != 0 or not p.stdout.strip():
        tail = " | ".join(p.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"the benchmark process failed (exit {p.returncode}): {tail}")
    out = json.loads(p.stdout)
    if "error" in out:
        from . import errors

        raise getattr(errors, out["error_type"], EdgeSDKError)(out["error"])
    return out


# -- the driver ----------------------------------------------------------------------------
def bench(artifact: str | os.PathLike, *, target: str = "auto", prompt_tokens: Sequence[int] = (128, 512, 2048),
          new_tokens: int = 128, runs: int = 5, warmup: int = 1, draft: str | os.PathLike | None = None,
          threads: int | None = None, max_length: int | None = None,
          progress: Callable[[str], None] | None = None, timeout: float | None = 3600) -> dict[str, Any]:
    """Measure ``artifact``; returns the JSON-able report (see ``format_table`` for the human view)."""
    from . import artifact as _artifact
    from .runtime.model import load

    if runs < 1:
        raise InvalidArgumentError(f"--runs {runs} is invalid: measure at least 1 run")
    if warmup < 0:
        raise InvalidArgumentError(f"--warmup {warmup} is invalid: it must be 0 or more")
    if new_tokens < 1:
        raise InvalidArgumentError(f"--new-tokens {new_tokens} is invalid: generate at least 1 token")
    prompt_tokens = list(prompt_tokens)
    if not prompt_tokens or any(p < 1 for p in prompt_tokens):
        raise InvalidArgumentError(f"--prompt-tokens {prompt_tokens} is invalid: give lengths of at least 1 token")
    if threads is not None and threads < 1:
        raise InvalidArgumentError(f"--threads {threads} is invalid: it must be at least 1")
    if draft is not None:
        if "draft" not in inspect.signature(load).parameters:
            raise InvalidArgumentError("--draft needs speculative decoding, which this edgesdk runtime does not have")
        if str(draft) != "prompt-lookup" and not Path(draft).exists():
            raise ArtifactError(f"no draft artifact at {draft}")
    art = _artifact.read(artifact, verify=False)  # fail fast; the workers' load() verifies checksums
    context = int(art.manifest["model"]["context_length"])
    room = min(context, max_length) if max_length else context
    longest = max(prompt_tokens) + new_tokens
    if longest > room:
        raise InvalidArgumentError(
            f"a {max(prompt_tokens)}-token prompt plus {new_tokens} new tokens needs {longest} tokens of context; "
            f"{'--max-length' if max_length and max_length < context else 'the model'} holds {room}")

    req = {"artifact": str(Path(artifact).absolute()), "target": target, "threads": threads,
           "max_length": max_length, "draft": None if not draft else "prompt-lookup" if str(draft) == "prompt-lookup" else str(Path(draft).absolute())}
    say = progress or (lambda msg: None)

    loads = []
    for i in range(warmup + runs):
        say(f"load {i + 1}/{warmup + runs}{' (warm-up)' if i < warmup else ''}")
        loads.append(_spawn({**req, "mode": "load"}, timeout))
    measured = loads[warmup:]
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "artifact": str(artifact),
        "precision": art.manifest.get("precision"),
        "source": (art.manifest.get("source") or {}).get("path") or (art.manifest.get("source") or {}).get("id"),
        "target": target,
        "providers": measured[0]["providers"],
        "execution_provider": measured[0]["providers"][0],
        "threads": threads,  # None: onnxruntime's default (one per physical core)
        "max_length": measured[0]["max_length"],
        "draft": str(draft) if draft else None,
        "new_tokens": new_tokens,
        "prompt_tokens": prompt_tokens,
        "runs": runs,
        "warmup": warmup,
        "system": system_info(),
        "load": {"load_s": summarize([m["load_s"] for m in measured]),
                 "peak_rss_bytes": summarize([m["peak_rss"] for m in measured])
                 if all(m["peak_rss"] is not None for m in measured) else None},
        "results": [],
    }
    for n in prompt_tokens:
        say(f"prompt {n} tokens: {warmup} warm-up + {runs} runs of {new_tokens} new tokens")
        out = _spawn({**req, "mode": "generate", "prompt_tokens": n, "new_tokens": new_tokens,
                      "runs": runs, "warmup": warmup}, timeout)
        rs = out["runs"]
        entry = {
            "prompt_tokens": out["prompt_tokens"],
            "new_tokens": new_tokens,
            "generated_tokens": summarize([r["generated_tokens"] for r in rs]),
            "ttft_s": summarize([r["ttft_s"] for r in rs]),
            "prefill_tok_s": summarize([r["prefill_tok_s"] for r in rs]),
            "decode_tok_s": summarize([r["decode_tok_s"] for r in rs]),
            "total_s": summarize([r["total_s"] for r in rs]),
            "peak_rss_bytes": summarize([r["peak_rss"] for r in rs]) if all(r["peak_rss"] is not None for r in rs)
            else None,
            "peak_rss_scope": "run" if out["rss_per_run"] else "process",
        }
        spec = [r["speculative"] for r in rs if r.get("speculative")]
        if spec:
            entry["speculative"] = spec
        report["results"].append(entry)
    return report


# -- presentation ----------------------------------------------------------------------------
def _mib(b: float) -> float:
    return b / (1 << 20)


def _cell(s: dict | None, scale: float = 1.0, fmt: str = "{:.0f}") -> str:
    if not s:
        return "n/a"
    return f"{fmt.format(s['median'] * scale)} ({fmt.format(s['min'] * scale)}-{fmt.format(s['max'] * scale)})"


def format_table(r: dict[str, Any]) -> str:
    threads = r["threads"] if r["threads"] is not None else "default"
    lines = [
        f"edgesdk bench {r['artifact']}",
        f"  {r['precision']} on {r['execution_provider']}, threads {threads}, context {r['max_length']}"
        + (f", draft {r['draft']}" if r.get("draft") else ""),
        f"  {r['system']['cpu']} ({r['system']['logical_cores']} logical cores), {r['system']['os']}",
        f"  median (min-max) of {r['runs']} run{'s' if r['runs'] != 1 else ''} after {r['warmup']} warm-up",
        "",
        f"  load {_cell(r['load']['load_s'], 1.0, '{:.2f}')} s, "
        f"peak RSS after load {_cell(r['load']['peak_rss_bytes'], 1 / (1 << 20))} MiB",
        "",
    ]
    head = ("prompt", "new", "TTFT ms", "prefill tok/s", "decode tok/s", "peak RSS MiB")
    rows = [head]
    for e in r["results"]:
        rows.append((str(e["prompt_tokens"]), str(e["new_tokens"]), _cell(e["ttft_s"], 1000.0),
                     _cell(e["prefill_tok_s"]), _cell(e["decode_tok_s"], 1.0, "{:.1f}"),
                     _cell(e["peak_rss_bytes"], 1 / (1 << 20))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        lines.append("  " + "  ".join(c.rjust(w) if i < 2 else c.ljust(w) for i, (c, w) in
                                      enumerate(zip(row, widths))).rstrip())
    for e in r["results"]:
        spec = e.get("speculative")
        if spec:
            rate = statistics.median(s.get("acceptance_rate", 0.0) for s in spec)
            per_call = statistics.median(s.get("tokens_per_target_call", 0.0) for s in spec)
            lines.append(f"  {e['prompt_tokens']}-token prompt, {spec[0].get('method', 'speculative')}: "
                         f"{rate:.0%} of draft tokens accepted, {per_call:.2f} tokens per target call (median)")
    short = [e for e in r["results"] if e["generated_tokens"]["min"] < e["new_tokens"]]
    for e in short:
        lines.append(f"  note: the {e['prompt_tokens']}-token runs stopped after {e['generated_tokens']['min']} "
                     f"of {e['new_tokens']} new tokens")
    if any(e.get("peak_rss_scope") == "process" for e in r["results"]):
        lines.append("  note: peak RSS is the process peak (this OS cannot reset it per run)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_worker_main())
