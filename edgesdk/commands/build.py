"""edgesdk build BUILD.yaml [--list] [--only KEY=VALUE] [--shard I/N] [--out DIR] [--cache DIR]"""
from __future__ import annotations

import argparse
import sys


def register(sub) -> None:
    p = sub.add_parser("build", help="export a models x targets matrix from a build file (CI)")
    p.add_argument("file", metavar="BUILD.yaml")
    p.add_argument("--list", action="store_true", help="print the matrix as JSON ({\"include\": [...]}) and exit")
    p.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                   help="keep entries whose KEY (key, model, target, precision) is VALUE (comma = or); repeatable")
    p.add_argument("--shard", metavar="I/N", help="keep the I-th of N round-robin shards (1-based)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: the file's 'out', else dist/ beside it)")
    p.add_argument("--cache", metavar="DIR",
                   help="export cache (default: the file's 'cache', else .edgesdk-cache/ beside it)")
    p.add_argument("--package", metavar="NAME.ortpackage",
                   help="then bundle every output into this ONNX Runtime model package (under --out)")
    p.add_argument("--sign-key", metavar="PRIVATE.pem", help="sign every output with this key (overrides 'sign')")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..distribute import build

    b = build.load(a.file, out=a.out, cache=a.cache, sign_key=a.sign_key)
    entries = build.select(b.entries, a.only, a.shard)
    if a.list:
        build.write_json(build.matrix(entries))
        return 0
    if not entries:
        print(f"nothing to build: shard {a.shard} of {len(b.entries)} entries is empty")
        return 0
    print(f"building {len(entries)} of {len(b.entries)} entries into {b.out} (cache {b.cache})", flush=True)
    results = build.run(b, entries, log=lambda s: print(s, flush=True))
    print()
    print(build.summary(results))
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"error: {len(failed)} of {len(results)} entries failed: {', '.join(r.entry.key for r in failed)}",
              file=sys.stderr)
        return 1
    if a.package:
        from ..distribute import package

        out = package.create([r.entry.out for r in results], b.out / a.package, force=True)
        print(f"packaged {len(results)} variants into {out}")
    return 0
