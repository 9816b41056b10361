"""Load-time benchmark: how long `edgesdk.load(artifact)` takes in a fresh process, by how it
verifies the files against the manifest.

  record   verify=True, the default: files unchanged since they were last hashed are not hashed
  full     verify="full": every file hashed (what every load cost before the record existed)
  sizes    verify=False: sizes only (the floor: session creation, tokenizer, KV cache)
  peer     optional (--peer-src DIR): another edgesdk checkout's load(), e.g. the landed main,
           run from its own source folder in the same interleaved rounds

Each round runs every mode once, each in a new process, in an interleaved order, so machine drift
hits every mode alike. The first `record` run of an artifact with no record hashes everything and
writes the record: the benchmark primes it before the rounds. The page cache is left as it is (a
warm cache is the common app start); run with --drop-caches as root to measure cold starts as well.

    python benchmarks/load.py build/qwen15-int4 --rounds 5 --json load.json
    python benchmarks/load.py build/qwen15-int4 --peer-src /path/to/landed/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import json, sys, time
t0 = time.perf_counter()
import edgesdk
t1 = time.perf_counter()
mode = sys.argv[2]
verify = {"record": True, "full": "full", "sizes": False, "peer": True}[mode]
model = edgesdk.load(sys.argv[1], verify=verify)
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "edgesdk": edgesdk.__file__}))
"""


def run_one(artifact: str, mode: str, peer_src: str | None, drop_caches: bool) -> dict:
    if drop_caches:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    env = dict(os.environ)
    if mode == "peer":
        env["PYTHONPATH"] = peer_src
    p = subprocess.run([sys.executable, "-c", WORKER, artifact, mode], capture_output=True, text=True, env=env,
                       cwd=peer_src if mode == "peer" else None, timeout=900)
    if p.returncode != 0:
        raise SystemExit(f"{mode} run failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("artifact")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--peer-src", default=None, help="source folder of another edgesdk to compare (its load())")
    ap.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root, Linux)")
    ap.add_argument("--json", default=None, metavar="FILE")
    a = ap.parse_args()
    modes = ["record", "full", "sizes"] + (["peer"] if a.peer_src else [])
    size = sum(f.stat().st_size for f in Path(a.artifact).rglob("*") if f.is_file())
    print(f"artifact {a.artifact}: {size / 1e9:.2f} GB; priming the verification record", file=sys.stderr)
    run_one(a.artifact, "record", None, False)
    if a.peer_src:
        where = run_one(a.artifact, "peer", a.peer_src, False)["edgesdk"]
        assert where.startswith(str(Path(a.peer_src).resolve())), f"the peer imported {where}"
    results: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(a.rounds):
        order = modes[r % len(modes):] + modes[:r % len(modes)]  # rotate who goes first
        for m in order:
            results[m].append(run_one(a.artifact, m, a.peer_src, a.drop_caches)["load_s"])
        print(f"round {r + 1}/{a.rounds}: " + ", ".join(f"{m} {results[m][-1]:.2f} s" for m in modes),
              file=sys.stderr, flush=True)
    med = {m: statistics.median(v) for m, v in results.items()}
    print(f"\n{'mode':<8} {'median s':>9} {'min s':>7} {'max s':>7} {'vs full':>8}")
    for m in modes:
        print(f"{m:<8} {med[m]:>9.3f} {min(results[m]):>7.3f} {max(results[m]):>7.3f} {med[m] / med['full']:>7.2f}x")
    report = {"artifact": str(a.artifact), "bytes": size, "rounds": a.rounds, "drop_caches": a.drop_caches,
              "load_s": results, "median_s": med, "ratio_to_full": {m: med[m] / med["full"] for m in modes},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    print(json.dumps(report))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
