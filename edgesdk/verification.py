"""The verification record: which artifact files were hashed, and what they were like then.

Hashing a 1 GB artifact on every app start costs seconds. After a file's sha256 has been checked
once, the record keeps its identity: device, inode, size, mtime and ctime (nanoseconds). A later
load trusts the earlier check only while all five are unchanged. Writing a file changes its
mtime and ctime, and a program cannot set ctime back, so a modified file is hashed again.
Replacing a file gives it a new inode. Any doubt means a full hash.

The record lives in the user's cache (``EDGESDK_CACHE_DIR``, else the platform cache folder),
never inside the artifact. That works for read-only installs, and nothing edgesdk did not
write is changed. It is an optimisation only: if it is missing, unreadable or unwritable, files
are hashed.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("edgesdk")
VERSION = 1


def cache_dir() -> Path:
    env = os.environ.get("EDGESDK_CACHE_DIR")
    if env:
        return Path(env)
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "edgesdk" / "cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "edgesdk"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgesdk"


def _identity(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Record:
    """The verification record of one artifact folder (keyed by its resolved path)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder).resolve()
        key = hashlib.sha256(str(self.folder).encode()).hexdigest()[:32]
        self.path = cache_dir() / "verified" / f"{key}.json"
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text())
            if data.get("version") == VERSION and data.get("folder") == str(self.folder):
                self.entries = data["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no record (or an unreadable one): every file gets hashed

    def vouches(self, path: Path, sha256: str) -> bool:
        """True if ``path`` was hashed to ``sha256`` and has not changed since."""
        entry = self.entries.get(self._rel(path))
        if not entry or entry.get("sha256") != sha256:
            return False
        try:
            return entry.get("stat") == _identity(path.stat())
        except OSError:
            return False

    def add(self, path: Path, sha256: str) -> None:
        """Record that ``path`` was just hashed to ``sha256``."""
        try:
            self.entries[self._rel(path)] = {"sha256": sha256, "stat": _identity(path.stat())}
            self.changed = True
        except OSError:
            pass

    def save(self) -> None:
        if not self.changed:
            return
        data = {"version": VERSION, "folder": str(self.folder), "files": self.entries}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".record-", dir=self.path.parent)
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError as e:  # a read-only home or cache: verification still happened
            log.debug("cannot save the verification record %s: %s", self.path, e)

    def _rel(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.folder).as_posix()
