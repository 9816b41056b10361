"""Provenance: an in-toto statement with an SLSA v1 predicate, written into the artifact.

``edgesdk sign`` writes it as ``provenance.json`` before signing, so the signature covers it.
Everything in it is derived from the manifest, except what only the signing machine knows
(its platform, unless the manifest records the build's, and the signing tools' versions):

- subject: every artifact file the manifest lists (name and sha256), except provenance.json;
- buildDefinition.externalParameters: the build config (target, precision, quantization,
  context length, bundled draft);
- buildDefinition.resolvedDependencies: the source (and the draft's source) with its weight
  digest, and calibration/evaluation data where the manifest records their digests;
- runDetails.builder.version: every tool's version (manifest["tools"]);
- runDetails.byproducts: the evaluation results, when the manifest has them.

``check`` rebuilds the statement from the manifest and refuses any difference. The output is
deterministic (sorted keys, no clock): the same manifest on the same machine gives the same bytes.
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

from ..errors import ArtifactError

PROVENANCE = "provenance.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
# URIs that name edgesdk's build; URNs because the project has no canonical URL yet.
BUILD_TYPE = "urn:edgesdk:buildtype:export:v1"
BUILDER_ID = "urn:edgesdk:builder:export"
# Manifest keys that may hold data digests (calibration text, evaluation sets) under quantization
# or evaluation; each becomes a resolved dependency.
_DATA_DIGEST_KEYS = ("calibration_sha256", "data_sha256", "dataset_sha256")


def this_platform() -> dict[str, str]:
    return {"system": platform.system().lower(), "machine": platform.machine().lower(),
            "release": platform.release(), "python": platform.python_version(),
            "implementation": sys.implementation.name}


def signer_tools() -> dict[str, str]:
    from ..provenance import package_versions

    return package_versions(["edgesdk", "model-signing"])


def _source(name: str, src: dict[str, Any]) -> dict[str, Any]:
    dep: dict[str, Any] = {"name": name, "annotations": src}
    uri = src.get("id") or src.get("path")
    if uri:
        dep["uri"] = str(uri)
    if src.get("weights_sha256"):
        dep["digest"] = {"sha256": src["weights_sha256"]}
    return dep


def _data(name: str, record: Any) -> list[dict[str, Any]]:
    if not isinstance(record, dict):
        return []
    deps = []
    for key in _DATA_DIGEST_KEYS:
        if record.get(key):
            label = key[: -len("_sha256")]
            uri = record.get(label) if isinstance(record.get(label), str) else None
            dep = {"name": f"{name}.{label}", "digest": {"sha256": record[key]}}
            if uri:
                dep["uri"] = uri
            deps.append(dep)
    return deps


def build(manifest: dict[str, Any], recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance statement of the artifact ``manifest`` describes.

    ``recorded``: the internalParameters of an earlier statement (platform, signing tools) to
    reuse; by default they describe this machine (or the manifest's platform, if it has one).
    """
    files = manifest.get("files") or {}
    subject = [{"name": rel, "digest": {"sha256": meta["sha256"]}}
               for rel, meta in sorted(files.items()) if rel != PROVENANCE]
    model = manifest.get("model") or {}
    draft = manifest.get("draft")
    external = {
        "target": manifest.get("target"),
        "precision": manifest.get("precision"),
        "quantization": manifest.get("quantization"),
        "context_length": model.get("context_length"),
        "draft": ({k: draft.get(k) for k in ("path", "precision")} if isinstance(draft, dict) else None),
    }
    deps = [_source("source", manifest.get("source") or {})]
    if isinstance(draft, dict) and isinstance(draft.get("source"), dict):
        deps.append(_source("draft.source", draft["source"]))
    deps += _data("quantization", manifest.get("quantization"))
    deps += _data("evaluation", manifest.get("evaluation"))
    if recorded is None:
        recorded = {"platform": manifest.get("platform") or this_platform(),
                    "platform_recorded_by": "manifest" if manifest.get("platform") else "edgesdk sign",
                    "signed_with": signer_tools()}
    run_details: dict[str, Any] = {
        "builder": {"id": BUILDER_ID, "version": dict(manifest.get("tools") or {})},
        "metadata": {"finishedOn": manifest["created"]} if manifest.get("created") else {},
    }
    if manifest.get("evaluation") is not None:
        run_details["byproducts"] = [{"name": "evaluation", "mediaType": "application/json",
                                      "annotations": manifest["evaluation"]}]
    return {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": recorded,
                "resolvedDependencies": deps,
            },
            "runDetails": run_details,
        },
    }


def dumps(statement: dict[str, Any]) -> str:
    return json.dumps(statement, indent=2, sort_keys=True) + "\n"


def write(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / PROVENANCE
    path.write_text(dumps(build(manifest)))
    return path


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k, ...) != b.get(k, ...):
                return _first_difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return where or "the statement"


def check(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Refuse a provenance.json that does not match the manifest; return the statement."""
    path = Path(folder) / PROVENANCE
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {PROVENANCE}; sign it with `edgesdk sign {folder} --key PRIVATE.pem`")
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); sign the artifact again") from None
    if not isinstance(stored, dict) or stored.get("_type") != STATEMENT_TYPE \
            or stored.get("predicateType") != PREDICATE_TYPE:
        raise ArtifactError(f"{path} is not an in-toto statement with an SLSA v1 predicate; sign the artifact again")
    recorded = ((stored.get("predicate") or {}).get("buildDefinition") or {}).get("internalParameters")
    expected = build(manifest, recorded if isinstance(recorded, dict) else {})
    if stored != expected:
        raise ArtifactError(f"{path} does not match the manifest (at {_first_difference(stored, expected)}): "
                            "the artifact was modified after signing; re-export and sign it again")
    return stored
