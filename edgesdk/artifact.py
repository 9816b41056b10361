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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, ChecksumError, OutputExistsError

MANIFEST = "edgesdk.json"
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

    def verify(self, full: bool = True) -> None:
        """Check every file against the manifest: size always, sha256 when ``full``."""
        for rel, meta in self.manifest["files"].items():
            p = self.path / rel
            if not p.is_file():
                raise ArtifactError(f"artifact {self.path} is incomplete: {rel} is missing; re-export it")
            if p.stat().st_size != meta["size"]:
                raise ChecksumError(
                    f"artifact file {rel} has {p.stat().st_size} bytes, the manifest says {meta['size']}: "
                    "it is truncated or was modified; re-export the artifact")
            if full and sha256_file(p) != meta["sha256"]:
                raise ChecksumError(
                    f"artifact file {rel} fails its sha256 check (modified or corrupt); re-export the artifact "
                    "or load with verify=False if you changed it on purpose")


def read(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Open an artifact folder and check it against its manifest."""
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
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ArtifactError(f"{mpath} has schema version {version!r}, this edgesdk reads {SCHEMA_VERSION}; "
                            "re-export with this version of edgesdk")
    art = Artifact(folder, manifest)
    art.verify(full=verify)
    return art


@contextlib.contextmanager
def staging(out: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it is renamed to ``out``.

    On any failure (or KeyboardInterrupt) the temporary folder is removed and ``out``
    is left exactly as it was.
    """
    out = Path(out).absolute()
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists; choose another -o or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_table(folder)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
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
