"""Sign and verify artifacts with the OpenSSF model-signing library (no cryptography of our own).

``sign`` writes ``provenance.json`` (see ``provenance``), adds it to the manifest, then signs the
whole folder with an EC private key: ``model.sig``, a Sigstore bundle holding a DSSE-signed
in-toto statement over every file's sha256 (the manifest and provenance included). model.sig is
the one file left out of what is signed (it cannot sign itself) and out of the manifest (the
manifest is signed, so it cannot hold the signature's digest). The library's own CLI verifies it:

    model_signing verify key ARTIFACT --signature ARTIFACT/model.sig --public_key PUBLIC.pem

model_signing is imported only when a signature is made or checked: ``import edgesdk`` and
``load()`` without ``public_key`` never import it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .. import artifact
from ..artifact import SIGNATURE  # "model.sig"
from ..errors import ArtifactError, EdgeSDKError, InvalidArgumentError
from . import provenance

INSTALL = 'pip install "edgesdk[sign]"'


class SignatureError(ArtifactError):
    """An artifact is unsigned, signed with another key, or changed since it was signed."""


def _library():
    try:
        import model_signing
        import model_signing.hashing
        import model_signing.signing
        import model_signing.verifying
    except ImportError as e:
        raise EdgeSDKError(f"signing needs the model-signing library ({e.name or e} is not installed): "
                           f"{INSTALL}") from None
    return model_signing


def _hashing(ms):
    """What is signed: every file but the signature (and, the library's default, git files)."""
    return ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE])


def _key_file(key: Any, what: str) -> Path:
    if not isinstance(key, (str, os.PathLike)) or not str(key):
        raise InvalidArgumentError(f"the {what} key must be a path to a PEM file, not {key!r}")
    p = Path(key)
    if not p.is_file():
        raise InvalidArgumentError(f"{what} key {p} does not exist (or is not a file); pass a PEM file")
    return p


def _key_reason(e: Exception) -> str:
    if isinstance(e, AttributeError) or "curve" in str(e).lower() and "unsupported" not in str(e).lower():
        return "it is not an elliptic-curve key"
    if isinstance(e, TypeError) and "password" in str(e).lower():
        return "it is encrypted; edgesdk signs with an unencrypted key"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.rstrip(".")


def _check_folder(folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse files the manifest does not list: signing would vouch for what edgesdk did not build."""
    listed = set(manifest.get("files") or {})
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_symlink():
            raise SignatureError(f"{folder} holds a symbolic link, {rel}; edgesdk signs plain files only: "
                                 "replace it with the file or re-export")
        if p.is_file() and p.name != artifact.MANIFEST and rel not in listed \
                and rel not in (SIGNATURE, provenance.PROVENANCE):
            raise SignatureError(f"{folder} holds {rel}, which its manifest does not list; move it away or "
                                 "re-export before signing")


def sign(path: str | os.PathLike, private_key: str | os.PathLike) -> Path:
    """Write provenance.json and model.sig into the artifact at ``path``; return model.sig's path.

    The artifact is checked first (every sha256); an earlier signature is replaced.
    """
    key = _key_file(private_key, "private")
    ms = _library()
    try:  # read the key before any work: a bad key must not cost a full hash
        config = ms.signing.Config().use_elliptic_key_signer(private_key=key)
    except Exception as e:  # the library raises ValueError, TypeError, AttributeError, UnsupportedAlgorithm
        raise InvalidArgumentError(f"cannot sign with {key}: {_key_reason(e)}; pass an EC P-256, P-384 or "
                                   "P-521 private key in PEM") from None
    art = artifact.read(path, verify="full")
    folder = art.path
    partial = folder / f".{SIGNATURE}.partial"
    try:
        partial.unlink(missing_ok=True)  # left by an interrupted signing
        _check_folder(folder, art.manifest)
        (folder / SIGNATURE).unlink(missing_ok=True)  # the manifest must not list an old signature
        provenance.write(folder, art.manifest)
        artifact.write_manifest(folder, art.manifest)
        config.set_hashing_config(_hashing(ms)).sign(folder, partial)
        os.replace(partial, folder / SIGNATURE)
    except OSError as e:
        raise EdgeSDKError(f"cannot sign {folder}: {e.strerror or e} ({e.filename or folder})") from None
    finally:
        partial.unlink(missing_ok=True)
    return folder / SIGNATURE


def _mismatch(text: str) -> str:
    """The library's "Signature mismatch: [...]" (a list's repr) as a short clause."""
    q = r"\\?['\"]"  # a quote, escaped or not, as the repr wrote it
    for pattern, say in ((rf"Hash mismatch for {q}(.+?){q}:", "{} changed"),
                         (rf"Extra files found in model {q}.*?{q}: ([^'\"\\\]]+)", "a file was added ({})"),
                         (rf"Missing files in model {q}.*?{q}: ([^'\"\\\]]+)", "a file was removed ({})")):
        m = re.search(pattern, text)
        if m:
            return say.format(m.group(1).strip())
    return "its files changed"


def check_signature(path: str | os.PathLike, public_key: str | os.PathLike) -> None:
    """Refuse the artifact folder at ``path`` unless ``public_key`` verifies its model.sig over
    its current files. One-line SignatureError otherwise."""
    key = _key_file(public_key, "public")
    folder = Path(path)
    sig = folder / SIGNATURE
    if not sig.is_file():
        raise SignatureError(f"{folder} is not signed (no {SIGNATURE}); sign it with "
                             f"`edgesdk sign {folder} --key PRIVATE.pem`")
    ms = _library()
    try:
        config = ms.verifying.Config().use_elliptic_key_verifier(public_key=key)
    except Exception as e:
        raise InvalidArgumentError(f"cannot verify with {key}: {_key_reason(e)}; pass an EC public key in PEM") \
            from None
    try:
        config.set_hashing_config(_hashing(ms)).verify(folder, sig)
    except Exception as e:  # noqa: BLE001 - the library signals every failure with a plain exception
        text = str(e)
        if "Key mismatch" in text:
            why = f"it was signed with another key than {key}"
        elif "Signature mismatch" in text:
            why = f"{_mismatch(text)} since it was signed"
        elif type(e).__name__ == "InvalidSignature" or "signature" in text.lower():
            why = f"{SIGNATURE} is not a valid signature of its contents"
        else:
            why = f"{SIGNATURE} is unreadable ({type(e).__name__}: {text.splitlines()[0] if text else ''})"
        raise SignatureError(f"{folder} fails its signature check: {why}; do not use it, or get the "
                             "artifact again from its publisher") from None


def verify(path: str | os.PathLike, public_key: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check the artifact: every sha256 against the manifest, provenance.json against the
    manifest, and (with ``public_key``) the signature. Returns what was checked."""
    if public_key is not None:
        _key_file(public_key, "public")
    art = artifact.read(path, verify="full")
    signed = (art.path / SIGNATURE).is_file()
    has_provenance = (art.path / provenance.PROVENANCE).is_file()
    if public_key is not None or has_provenance:
        provenance.check(art.path, art.manifest)
    if public_key is not None:
        check_signature(art.path, public_key)
    return {"path": str(art.path), "files": len(art.manifest["files"]),
            "provenance": "matches the manifest" if has_provenance else "none",
            "signature": ("verified" if public_key is not None else
                          "present, not checked (pass --key PUBLIC.pem)" if signed else "none (unsigned)")}
