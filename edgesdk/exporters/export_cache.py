"""A content-addressed export cache: an export whose inputs have all been seen before is copied
from the cache instead of being built again.

The key covers everything that decides the output: the source's weights digest and manifest,
the resolved target profile, every export option (files by their sha256), the versions of every
tool that builds, and a digest of edgesdk's own code. If any of these changes, the key changes.
The cache is opt-in: set ``EDGESDK_EXPORT_CACHE=DIR``. It is meant for CI machines and test
suites that export the same model again and again. Entries are written atomically and never
modified, and nothing outside DIR is touched.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ENV = "EDGESDK_EXPORT_CACHE"


def root() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over edgesdk's own code and data files (a changed exporter makes a new key)."""
    pkg = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*")):
        if p.is_file() and p.suffix in (".py", ".yaml", ".txt", ".json", ".jinja"):
            h.update(p.relative_to(pkg).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def _file_digest(path: str | os.PathLike) -> str:
    from ..artifact import sha256_file

    return sha256_file(Path(path))


def key(source_manifest: dict, profile: dict, options: dict[str, Any], files: dict[str, Any],
        tools: dict[str, str]) -> str:
    """The key of one export; ``files`` maps option names to paths (or lists of paths) hashed by content."""
    digests = {}
    for name, value in files.items():
        if value is None:
            digests[name] = None
        elif isinstance(value, (list, tuple)):
            digests[name] = [_file_digest(v) for v in value]
        else:
            digests[name] = _file_digest(value) if Path(value).is_file() else str(value)
    doc = {"source": source_manifest, "profile": profile, "options": options, "files": digests, "tools": tools,
           "code": code_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def lookup(cache_key: str) -> Path | None:
    """The cached artifact for ``cache_key``, checked in full; a damaged entry is dropped (a miss)."""
    from .. import artifact
    from ..errors import ArtifactError

    base = root()
    entry = base / cache_key if base else None
    if entry is None or not (entry / artifact.MANIFEST).is_file():
        return None
    try:
        artifact.read(entry, verify="full")
    except ArtifactError as e:
        import logging

        logging.getLogger("edgesdk").warning("dropping the damaged export cache entry %s: %s", entry, e)
        shutil.rmtree(entry, ignore_errors=True)
        return None
    return entry


def copy_into(entry: Path, folder: Path) -> None:
    """Copy a cached artifact's files into the (empty) staging folder."""
    shutil.copytree(entry, folder, dirs_exist_ok=True)


def store(cache_key: str, folder: Path) -> None:
    """Keep a copy of a finished artifact under its key (best effort: a full disk only logs)."""
    import logging

    base = root()
    if base is None or (base / cache_key).exists():
        return
    tmp = None
    try:
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{cache_key[:12]}-", dir=base))
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
        os.replace(tmp, base / cache_key)
    except OSError as e:
        logging.getLogger("edgesdk").warning("could not store the export in the cache %s: %s", base, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
