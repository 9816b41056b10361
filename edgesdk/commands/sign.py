"""edgesdk sign ARTIFACT --key PRIVATE.pem"""
from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("sign", help="sign an artifact (model.sig) with its provenance (provenance.json)")
    p.add_argument("artifact")
    p.add_argument("--key", required=True, metavar="PRIVATE.pem",
                   help="EC (P-256/384/521) private key in PEM, unencrypted")
    p.set_defaults(fn=run)


def run(a: argparse.Namespace) -> int:
    from ..distribute import provenance, sign

    sig = sign.sign(a.artifact, a.key)
    print(f"signed {sig.parent}: {sig.name} (Sigstore bundle) over every file, "
          f"provenance in {provenance.PROVENANCE}")
    print(f"verify with: edgesdk verify {sig.parent} --key PUBLIC.pem")
    return 0
