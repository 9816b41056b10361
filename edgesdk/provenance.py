"""Versions of the installed packages that built or measured something (manifests, bench JSON)."""
from __future__ import annotations

import importlib.metadata as md
from typing import Iterable


def package_versions(names: Iterable[str]) -> dict[str, str]:
    """name -> version for each of ``names`` that is installed."""
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out
