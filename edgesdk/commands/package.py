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
    for v in package.variants(out):
        print(f"  {v['name']}: {v['ep']} ({v['device']})")
    print(f"wrote {out} ({len(a.artifacts)} variants); onnxruntime selects one with ModelPackageContext")
    return 0
