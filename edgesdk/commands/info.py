"""edgesdk info ARTIFACT [--json]"""
from __future__ import annotations

import argparse
import json

from .common import add_verify_arg


def register(sub) -> None:
    p = sub.add_parser("info", help="show an artifact's manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    add_verify_arg(p)
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from .. import artifact

    mode = False if a.no_verify else "full" if a.full_verify else True
    art = artifact.read(a.artifact, verify=mode)
    if a.json:
        print(json.dumps(art.manifest, indent=2))
    else:
        print(artifact.describe(art.manifest))
        print(f"checksums     {'sizes only' if mode is False else 'verified'}")
    return 0
