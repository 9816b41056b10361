"""The artifact: a folder with model.onnx (+ data), tokenizer, genai_config.json and
edgesdk.json, the manifest that says what it is and how to check it.

Writing goes to a temporary sibling folder that is renamed into place at the end, so an
interrupted export never leaves a half-written artifact at the destination.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from . import verification
from .errors import ArtifactError, ChecksumError, InvalidArgumentError, OutputExistsError

MANIFEST = "edgesdk.json"
SIGNATURE = "model.sig"  # written by `edgesdk sign`; it cannot be listed in the manifest it signs
SCHEMA_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_table(folder: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``folder`` except the manifest, by relative path."""
    table = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            rel = p.relative_to(folder).as_posix()
            table[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    return table


@dataclass
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.path / self.manifest["model"]["filename"]

    @property
    def genai_config(self) -> dict[str, Any]:
        return json.loads((self.path / "genai_config.json").read_text())

    def verify(self, mode: bool | str = True) -> None:
        """Check every file against the manifest.

        ``mode``: True (default) checks sizes, and sha256 for every file the verification
        record does not vouch for (see ``verification``); "full" hashes every file; False
        checks sizes only.
        """
        if mode not in VERIFY_MODES:
            raise InvalidArgumentError(f"verify={mode!r} is invalid; use True, \"full\" or False")
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file():
                raise ArtifactError(f"artifact {self.path} is incomplete: {rel} is missing; re-export it")
            if p.stat().st_size != meta["size"]:
                raise ChecksumError(
                    f"artifact file {rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}: "
                    "it is truncated or was modified; re-export the artifact")
        if mode is False:
            return
        record = verification.Record(self.path) if mode is True else None
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if record is not None and record.vouches(p, meta["sha256"]):
                continue
            if sha256_file(p) != meta["sha256"]:
                raise ChecksumError(
                    f"artifact file {rel} fails its sha256 check (modified or corrupt); re-export the artifact "
                    "or load with verify=False if you changed it on purpose")
            if record is not None:
                record.add(p, meta["sha256"])
        if record is not None:
            record.save()


VERIFY_MODES = (True, False, "full")


def read(path: str | os.PathLike, verify: bool | str = True) -> Artifact:
    """Open an artifact folder and check it against its manifest (see ``Artifact.verify``)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidArgumentError(f"the artifact path must be a folder path (str or os.PathLike), "
                                   f"not {type(path).__name__ if path != '' else 'an empty string'}")
    if verify not in VERIFY_MODES:
        raise InvalidArgumentError(f"verify={verify!r} is invalid; use True, \"full\" or False")
    folder = Path(path)
    if not folder.exists():
        raise ArtifactError(f"no artifact at {folder}: export one with `edgesdk export SOURCE -o {folder}`")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{folder} is not an edgesdk artifact (no {MANIFEST}); export one with `edgesdk export`")
    try:
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({e}); re-export the artifact") from None
    except OSError as e:
        raise ArtifactError(f"cannot read {mpath}: {e.strerror or e}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is not an edgesdk manifest (a JSON object); re-export the artifact")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{mpath} has schema version {version!r}, this edgesdk reads {SCHEMA_VERSION}; "
                            "re-export with this version of edgesdk")
    art = Artifact(folder, manifest)
    art.verify(verify)
    return art


# -- writing -----------------------------------------------------------------------------------
def check_destination(out: str | os.PathLike, force: bool = False) -> Path:
    """Refuse an output folder that edgesdk must not write to; return it as an absolute path.

    Nothing is ever replaced that edgesdk did not write: with ``force``, ``out`` may be an
    edgesdk artifact (a folder with edgesdk.json holding no file its manifest does not list)
    or an empty folder; anything else is refused.
    """
    if not isinstance(out, (str, os.PathLike)) or not str(out):
        raise InvalidArgumentError(f"the output path must be a folder path, not {out!r}")
    out = Path(out).absolute()
    if not (out.exists() or out.is_symlink()):
        _check_writable(out)
        return out
    if not force:
        raise OutputExistsError(f"{out} already exists; choose another -o or pass --force to replace it")
    if out.is_symlink():
        raise OutputExistsError(f"{out} is a symbolic link; edgesdk replaces only folders it wrote: "
                                "choose another -o")
    if not out.is_dir():
        raise OutputExistsError(f"{out} is a file, not an edgesdk artifact; --force replaces only an artifact "
                                "folder or an empty folder: choose another -o")
    try:
        entries = list(out.iterdir())
    except OSError as e:
        raise OutputExistsError(f"cannot read {out} ({e.strerror or e}); choose another -o") from None
    if not entries:
        return out
    if not (out / MANIFEST).is_file():
        raise OutputExistsError(f"{out} is not empty and not an edgesdk artifact (no {MANIFEST}); --force replaces "
                                "only an artifact folder or an empty folder: choose another -o")
    try:
        listed = set(json.loads((out / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputExistsError(f"{out / MANIFEST} is unreadable, so edgesdk cannot tell which files it wrote; "
                                "delete the folder yourself or choose another -o") from None
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if (p.is_file() or p.is_symlink()) and p.name not in (MANIFEST, SIGNATURE) and rel not in listed:
            raise OutputExistsError(f"{out} holds {rel}, which edgesdk did not write; --force replaces only what "
                                    "edgesdk wrote: move that file away or choose another -o")
    return out


def _check_writable(out: Path) -> None:
    """Refuse an ``out`` whose nearest existing ancestor is not a folder this process can write."""
    base = out.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise OutputExistsError(f"cannot create {out}: {base} is a file, not a folder; choose another -o")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=base))
    except OSError as e:
        raise OutputExistsError(f"cannot write to {base} ({e.strerror or e}); choose another -o") from None


def _staging_folder(out: Path) -> Path:
    """A new empty folder beside ``out`` (its parents made first)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise OutputExistsError(f"cannot write to {out.parent} ({e.strerror or e}); choose another -o") from None


@contextlib.contextmanager
def staging(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it is renamed to ``out``.

    ``out`` is checked first (``check_destination``). On any failure (or KeyboardInterrupt)
    the temporary folder is removed and ``out`` is left exactly as it was; if the final swap
    fails half-way, the old artifact is put back.
    """
    out = check_destination(out, force)
    tmp = _staging_folder(out)
    try:
        yield tmp
        check_destination(out, force)  # nothing appeared there meanwhile that we must not replace
        try:
            _swap(tmp, out)
        except OSError as e:
            raise OutputExistsError(f"cannot move the new artifact to {out} ({e.strerror or e}); "
                                    "what was there is unchanged") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is set aside first and put back on failure."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_time() -> str:
    """The manifest's creation time: SOURCE_DATE_EPOCH when set (reproducible builds), else now."""
    import datetime as dt

    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            when = dt.datetime.fromtimestamp(int(epoch), dt.timezone.utc)
        except (ValueError, OverflowError, OSError):
            raise InvalidArgumentError(f"SOURCE_DATE_EPOCH={epoch!r} is invalid: it must be a Unix time in "
                                       "seconds") from None
    else:
        when = dt.datetime.now(dt.timezone.utc)
    return when.isoformat(timespec="seconds")


def remember_verified(folder: Path, manifest: dict[str, Any]) -> None:
    """Record that ``folder``'s files, hashed just now by ``write_manifest``, match the manifest."""
    record = verification.Record(folder)
    for rel, meta in manifest["files"].items():
        record.add(folder / rel, meta["sha256"])
    record.save()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_table(folder)
    # sorted keys and a build time from SOURCE_DATE_EPOCH: the same inputs give the same bytes
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def describe(manifest: dict[str, Any]) -> str:
    """The manifest for people (``edgesdk info``)."""
    src = manifest.get("source", {})
    mdl = manifest.get("model", {})
    gen = manifest.get("generation", {})
    total = sum(f["size"] for f in manifest.get("files", {}).values())
    lines = [
        f"artifact      schema {manifest.get('schema_version')}, built by edgesdk {manifest.get('tools', {}).get('edgesdk', '?')}"
        f" on {manifest.get('created', '?')}",
        f"source        {src.get('path')} ({src.get('kind')}"
        + (f", {src['gguf_type']}" if src.get("gguf_type") else "") + ")",
        f"architecture  {src.get('architecture')} ({mdl.get('num_layers')} layers, hidden {mdl.get('hidden_size')}, "
        f"vocab {mdl.get('vocab_size')})",
        f"weights       sha256 {str(src.get('weights_sha256', '?'))[:16]}...",
        f"target        {manifest.get('target')}  precision {manifest.get('precision')}  io {mdl.get('io_dtype')}",
    ]
    q = manifest.get("quantization")
    if q:
        lines.append("quantization  " + ", ".join(f"{k}={v}" for k, v in q.items()))
    lines.append(f"context       {mdl.get('context_length')} tokens")
    provs = [p["name"] for p in manifest.get("runtime", {}).get("providers", [])]
    lines.append(f"providers     {', '.join(provs)}")
    lines.append(f"generation    eos {gen.get('eos_token_ids')}, chat template {'yes' if gen.get('chat_template') else 'no'}")
    draft = manifest.get("draft")
    if draft:
        lines.append(f"draft         {draft['path']}/ ({draft.get('source', {}).get('path')}, {draft.get('precision')}): "
                     "speculative decoding by default")
    lines.append("tools         " + ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items()))
    ins = ", ".join(f"{i['name']}:{i['dtype']}{i['shape']}" for i in mdl.get("inputs", [])[:3])
    lines.append(f"inputs        {len(mdl.get('inputs', []))}: {ins}, ...")
    outs = ", ".join(f"{i['name']}:{i['dtype']}{i['shape']}" for i in mdl.get("outputs", [])[:2])
    lines.append(f"outputs       {len(mdl.get('outputs', []))}: {outs}, ...")
    lines.append(f"files         {len(manifest.get('files', {}))}, {total / 1e6:.1f} MB")
    for rel, meta in manifest.get("files", {}).items():
        lines.append(f"  {rel:<28} {meta['size'] / 1e6:>9.2f} MB  sha256 {meta['sha256'][:16]}...")
    return "\n".join(lines)
