"""edgesdk verify ARTIFACT [--key PUBLIC.pem] [--json]"""
from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("verify", help="check an artifact's checksums, provenance and signature")
    p.add_argument("artifact")
    p.add_argument("--key", default=None, metavar="PUBLIC.pem",
                   help="EC public key (PEM): also check model.sig; without it the signature is not checked")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..distribute import sign

    result = sign.verify(a.artifact, a.key)
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"checksums     {result['files']} files verified (sha256)")
        print(f"provenance    {result['provenance']}")
        print(f"signature     {result['signature']}")
    return 0
