"""edgesdk package ARTIFACT ... -o NAME.ortpackage"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("package", help="bundle artifacts (one per target) into an ONNX Runtime model package")
    p.add_argument("artifacts", nargs="+", metavar="ARTIFACT")
    p.add_argument("-o", "--out", required=True, metavar="NAME.ortpackage")
    p.add_argument("--name", help="package name (default: NAME)")
    p.add_argument("--version", dest="pkg_version", metavar="VERSION", help="package version (default 1.0)")
    p.add_argument("--force", action="store_true", help="replace an existing model package")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..distribute import package

    out = package.create(a.artifacts, a.out, name=a.name, version=a.pkg_version, force=a.force)
    vs = package.variants(out)
    for v in vs:
        print(f"  {v['name']}: {v['ep']} ({v['device']})"
              + (f", {len(v['shared'])} shared file(s)" if v["shared"] else ""))
    assets = {uri for v in vs for uri in v["assets"]}
    print(f"wrote {out} ({len(vs)} variants" + (f", {len(assets)} shared assets" if assets else "")
          + "); onnxruntime selects one with ModelPackageContext")
    return 0
