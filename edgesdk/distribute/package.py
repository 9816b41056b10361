"""ONNX Runtime model packages: several artifacts of one model (a variant per target, EP and
device) in the folder format onnxruntime itself reads (``manifest.json`` + ``variants/``),
authored with onnxruntime's own ``ModelPackage`` API (onnxruntime >= 1.32).

Each variant's folder is the whole edgesdk artifact, copied as it is (its manifest, checksums
and signature still hold), so ``select()`` hands back a folder ``edgesdk.load`` opens directly,
and onnxruntime's ``ModelPackageContext`` selects and runs the same package from its EP list.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .. import artifact
from ..errors import ArtifactError, InvalidArgumentError, OutputExistsError

COMPONENT = "model"
MANIFEST = "manifest.json"  # onnxruntime's package manifest
SUFFIX = ".ortpackage"
_DEVICE_RANK = {"npu": 0, "gpu": 1, "cpu": 2}  # auto prefers the most specialised device


def _ort():
    import onnxruntime as ort

    if not hasattr(ort, "ModelPackage"):
        raise InvalidArgumentError(f"onnxruntime {ort.__version__} has no ModelPackage API; model packages "
                                   "need onnxruntime >= 1.32")
    return ort


def is_package(path: str | os.PathLike) -> bool:
    p = Path(path)
    return (p / MANIFEST).is_file() and not (p / artifact.MANIFEST).is_file()


def create(artifacts: list[str | os.PathLike], out: str | os.PathLike, *, name: str | None = None,
           version: str | None = None, force: bool = False) -> Path:
    """Write the package ``out`` with one variant (``TARGET-PRECISION``) per artifact."""
    from .. import targets

    ort = _ort()
    if not artifacts:
        raise InvalidArgumentError("give at least one artifact to package")
    arts = [artifact.read(a) for a in artifacts]  # checksums first: nothing damaged goes in
    variants: dict[str, tuple[artifact.Artifact, dict[str, Any]]] = {}
    for a in arts:
        m = a.manifest
        vname = f"{m['target']}-{m['precision']}"
        if vname in variants:
            raise InvalidArgumentError(f"{a.path} and {variants[vname][0].path} are both {vname}: "
                                       "a package holds one variant per target and precision")
        providers = (m.get("runtime") or {}).get("providers") or [{"name": "CPUExecutionProvider"}]
        try:
            device = targets.load(m["target"]).device
        except Exception:  # a profile this machine does not have: say what the EP implies
            device = "cpu" if providers[0]["name"] == "CPUExecutionProvider" else "gpu"
        variants[vname] = (a, {"variant_directory": f"variants/{vname}", "ep": providers[0]["name"],
                               "device": device,
                               "executor_info": {"ort": {"model_file": m["model"]["filename"]}}})
    out = Path(out).absolute()
    if out.exists():
        if not (force and is_package(out)):
            raise OutputExistsError(f"{out} already exists; pass --force to replace a model package"
                                    if is_package(out) else f"{out} already exists and is not a model package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        stage = tmp / "pkg"
        pkg = ort.ModelPackage()
        src_name = arts[0].manifest.get("source", {})
        pkg.set_metadata(name or out.name.removesuffix(SUFFIX), version or "1.0",
                         f"edgesdk artifacts of {src_name.get('id') or src_name.get('architecture', 'a model')}")
        pkg.set_component_inline(COMPONENT, json.dumps({"variants": {}}))
        pkg.commit(str(stage))
        for vname, (a, _) in variants.items():
            shutil.copytree(a.path, stage / "variants" / vname)
        pkg = ort.ModelPackage.open(str(stage))
        for vname, (a, spec) in variants.items():
            pkg.set_variant(COMPONENT, vname, json.dumps(spec, sort_keys=True))
        pkg.commit()
        os.replace(stage, tmp / "ready")  # then swap the whole folder into place
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "ready", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def variants(package: str | os.PathLike) -> list[dict[str, Any]]:
    """The package's variants as onnxruntime reads them, plus each one's edgesdk target and folder."""
    ort = _ort()
    p = Path(package)
    if not is_package(p):
        raise ArtifactError(f"{p} is not an ONNX Runtime model package (no {MANIFEST}); "
                            f"write one with `edgesdk package ARTIFACT ... -o NAME{SUFFIX}`")
    try:
        info = ort.ModelPackage.open(str(p)).get_info()
    except Exception as e:  # onnxruntime raises RuntimeError / Fail with its own message
        raise ArtifactError(f"{p} is not a valid model package: {str(e).splitlines()[0]}") from None
    comp = next((c for c in info["components"] if c["name"] == COMPONENT), None)
    if comp is None:
        raise ArtifactError(f"{p} has no '{COMPONENT}' component; it was not written by edgesdk package")
    out = []
    for v in comp["variants"]:
        folder = p / (v["variant_directory"] or "")
        target = None
        if (folder / artifact.MANIFEST).is_file():
            target = json.loads((folder / artifact.MANIFEST).read_text()).get("target")
        out.append({"name": v["name"], "ep": v["ep"], "device": v["device"], "target": target, "path": folder})
    return out


def select(package: str | os.PathLike, target: str = "auto") -> Path:
    """The artifact folder of the variant for this machine (``auto``: a variant whose EP this
    onnxruntime has, NPU before GPU before CPU), or of the variant built for ``target``."""
    ort = _ort()
    vs = variants(package)
    if target != "auto":
        for v in vs:
            if v["target"] == target:
                return v["path"]
        raise ArtifactError(f"{package} has no variant for target {target} "
                            f"(it has {', '.join(v['name'] for v in vs) or 'none'})")
    have = set(ort.get_available_providers())
    ok = [v for v in vs if v["ep"] in have]
    if not ok:
        needs = ", ".join(f"{v['name']} needs {v['ep']}" for v in vs) or "it has no variants"
        raise ArtifactError(f"{package} has no variant for this machine ({needs}; this onnxruntime has "
                            f"{', '.join(sorted(have))})")
    ok.sort(key=lambda v: _DEVICE_RANK.get(v["device"] or "cpu", 3))
    return ok[0]["path"]
