"""Load test for `edgesdk serve`: N concurrent streaming chat clients on loopback for M minutes.

Starts `python -m edgesdk serve ARTIFACT` as a subprocess on a free port, then runs N client
threads (the real openai client, streaming) that send requests back to back until the time is
up; each request is bounded (--max-tokens) and so is the run (--minutes, and --max-requests in
total). Reports completed requests, errors, generated tokens/s, p50/p95 time to first token
and the server's RSS at start (after --warmup seconds of the same load) and end. Prints a table and JSON.

    python benchmarks/serve_load.py build/smollm2-int4 --clients 32 --minutes 10 --parallel 4
    python benchmarks/serve_load.py build/smollm2-int4 --clients 8 --minutes 1 --json load.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import openai
import psutil

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about rain.",
             "How many legs does a spider have?", "Give me a synonym for happy.", "What is 12 times 7?",
             "Explain what a CPU does in one sentence.", "Suggest a name for a cat."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("artifact")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests in all")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--warmup", type=float, default=30.0, help="seconds of load before measuring (every slot's "
                   "cache and buffers get touched; RSS start is taken after it)")
    p.add_argument("--parallel", type=int, default=4, help="server slots")
    p.add_argument("--max-queue", type=int, default=None, help="server queue (default: --clients)")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--json", default=None, help="also write the JSON here")
    a = p.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "edgesdk", "serve", a.artifact, "--port", str(port),
                               "--parallel", str(a.parallel), "--max-queue", str(a.max_queue or a.clients),
                               "--max-length", str(a.max_length)], stderr=subprocess.DEVNULL)
    proc = psutil.Process(server.pid)
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise SystemExit("the server did not become ready")
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=8)

        lock = threading.Lock()
        stats = {"requests": 0, "errors": 0, "tokens": 0, "ttft": [], "error_kinds": {}}
        measured = time.time() + a.warmup  # requests started before this are warm-up, not counted
        stop_at = measured + a.minutes * 60

        def run(i: int) -> None:
            n = 0
            while time.time() < stop_at:
                with lock:
                    if stats["requests"] + stats["errors"] >= a.max_requests:
                        return
                q = QUESTIONS[(i + n) % len(QUESTIONS)]
                n += 1
                counted = time.time() >= measured
                t0 = time.perf_counter()
                first = None
                try:
                    s = client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": q}], max_tokens=a.max_tokens,
                        temperature=0.7, seed=i * 1000 + n, stream=True, stream_options={"include_usage": True})
                    tokens = 0
                    for c in s:
                        if first is None and c.choices and c.choices[0].delta.content:
                            first = time.perf_counter() - t0
                        if c.usage:
                            tokens = c.usage.completion_tokens
                    if not counted:
                        continue
                    with lock:
                        stats["requests"] += 1
                        stats["tokens"] += tokens
                        if first is not None:
                            stats["ttft"].append(first)
                except Exception as e:  # counted, and the client goes on
                    if not counted:
                        continue
                    with lock:
                        stats["errors"] += 1
                        kind = type(e).__name__
                        stats["error_kinds"][kind] = stats["error_kinds"].get(kind, 0) + 1

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(a.clients)]
        for t in threads:
            t.start()
        time.sleep(max(0.0, measured - time.time()))
        rss_start = proc.memory_info().rss
        rss_samples = []
        while any(t.is_alive() for t in threads):
            rss_samples.append(proc.memory_info().rss)
            time.sleep(1)
        elapsed = time.time() - measured
        rss_end = proc.memory_info().rss
        metrics = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(30)

    ttft = stats["ttft"]
    out = {
        "artifact": os.path.basename(os.path.normpath(a.artifact)), "clients": a.clients, "parallel": a.parallel,
        "max_tokens": a.max_tokens, "seconds": round(elapsed, 1), "requests": stats["requests"],
        "errors": stats["errors"], "error_kinds": stats["error_kinds"],
        "tokens_per_s": round(stats["tokens"] / elapsed, 1), "requests_per_min": round(stats["requests"] / elapsed * 60, 1),
        "ttft_p50_s": round(pct(ttft, 0.5), 3) if ttft else None,
        "ttft_p95_s": round(pct(ttft, 0.95), 3) if ttft else None,
        "ttft_mean_s": round(statistics.mean(ttft), 3) if ttft else None,
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_drift_pct": round((rss_end - rss_start) / rss_start * 100, 2),
        "rss_max_mb": round(max(rss_samples, default=rss_end) / 2**20, 1),
        "server_completion_tokens": next((float(l.split()[1]) for l in metrics.splitlines()
                                          if l.startswith("edgesdk_completion_tokens_total ")), None),
    }
    rows = [("clients / slots", f"{a.clients} / {a.parallel}"), ("duration", f"{out['seconds']} s"),
            ("requests (errors)", f"{out['requests']} ({out['errors']})"),
            ("generated tokens/s", out["tokens_per_s"]), ("TTFT p50 / p95", f"{out['ttft_p50_s']} / {out['ttft_p95_s']} s"),
            ("server RSS start -> end", f"{out['rss_start_mb']} -> {out['rss_end_mb']} MiB ({out['rss_drift_pct']:+}%)")]
    print("| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(json.dumps(out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
