"""edgesdk info ARTIFACT [--json]"""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("info", help="show an artifact's manifest")
    p.add_argument("artifact")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from .. import artifact

    art = artifact.read(a.artifact, verify=not a.no_verify)
    if a.json:
        print(json.dumps(art.manifest, indent=2))
    else:
        print(artifact.describe(art.manifest))
        print(f"checksums     {'verified' if not a.no_verify else 'sizes only'}")
    return 0
