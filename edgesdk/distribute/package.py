"""ONNX Runtime model packages: several artifacts of one model (a variant per target, EP and
device) in the folder format onnxruntime itself reads (``manifest.json`` + ``variants/``),
authored with onnxruntime's own ``ModelPackage`` API (onnxruntime >= 1.32).

Each variant's folder is an edgesdk artifact copied as it is (its manifest, checksums and
signature still hold), except the files that are byte-identical in two or more variants
(tokenizer, chat template, a shared draft...): each of those is stored once, as a shared asset
under ``shared_assets/sha256-<digest of the asset folder>`` (written by ``add_shared_asset``),
and the component's additional metadata maps each variant's file to its asset. The graph a
variant's ``executor_info`` names (and its external data) always stays in the variant folder, so
onnxruntime's ``ModelPackageContext`` selects and runs every variant from its EP list as it is.
``select()`` hands ``edgesdk.load`` a complete artifact folder: the variant folder itself, or,
when it has shared files, a view of hard links (copies where links are impossible) made once
under the package's ``.edgesdk/views/`` (or the user cache when the package is read-only);
``load`` then checks it against the variant's manifest as usual.
"""
from __future__ import annotations

import hashlib
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
METADATA_KEY = "edgesdk"  # in the component's additional metadata: {"shared_files": {variant: {file: uri/file}}}
VIEWS = Path(".edgesdk") / "views"  # complete artifact folders of variants with shared files
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
        shared = _shared_files({v: a for v, (a, _) in variants.items()})
        uris: dict[tuple[str, str], str] = {}
        for i, (rel, digest) in enumerate(sorted({k for files in shared.values() for k in files.items()})):
            holder = next(v for v, files in shared.items() if files.get(rel) == digest)
            asset = tmp / "assets" / str(i)
            (asset / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(variants[holder][0].path / rel, asset / rel)
            uris[rel, digest] = pkg.add_shared_asset(str(asset))
        pkg.commit(str(stage))
        for vname, (a, _) in variants.items():
            skip = set(shared.get(vname, {}))
            shutil.copytree(a.path, stage / "variants" / vname,
                            ignore=lambda d, names, root=a.path, skip=skip: [
                                n for n in names if (Path(d) / n).relative_to(root).as_posix() in skip])
        pkg = ort.ModelPackage.open(str(stage))
        for vname, (a, spec) in variants.items():
            pkg.set_variant(COMPONENT, vname, json.dumps(spec, sort_keys=True))
        if shared:
            pkg.set_additional_metadata_json("component", COMPONENT, None, json.dumps({METADATA_KEY: {
                "shared_files": {v: {rel: f"{uris[rel, d]}/{rel}" for rel, d in sorted(files.items())}
                                 for v, files in sorted(shared.items())}}}, sort_keys=True))
        pkg.commit()
        os.replace(stage, tmp / "ready")  # then swap the whole folder into place
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "ready", out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _shared_files(arts: dict[str, artifact.Artifact]) -> dict[str, dict[str, str]]:
    """variant -> {file: sha256} of the files byte-identical in two or more variants. The
    manifest, the provenance and the graph onnxruntime opens (with its external data) are never
    shared: each variant stays a folder onnxruntime can run and whose signature covers its own."""
    seen: dict[tuple[str, str], list[str]] = {}
    for vname, a in arts.items():
        model_file = a.manifest["model"]["filename"]
        for rel, meta in a.manifest["files"].items():
            if rel == "provenance.json" or rel == model_file or rel.startswith(model_file + "."):
                continue
            seen.setdefault((rel, meta["sha256"]), []).append(vname)
    out: dict[str, dict[str, str]] = {}
    for (rel, digest), names in seen.items():
        if len(names) > 1:
            for v in names:
                out.setdefault(v, {})[rel] = digest
    return out


def variants(package: str | os.PathLike) -> list[dict[str, Any]]:
    """The package's variants as onnxruntime reads them, plus each one's edgesdk target and folder."""
    ort = _ort()
    p = Path(package)
    if not is_package(p):
        raise ArtifactError(f"{p} is not an ONNX Runtime model package (no {MANIFEST}); "
                            f"write one with `edgesdk package ARTIFACT ... -o NAME{SUFFIX}`")
    try:
        pkg = ort.ModelPackage.open(str(p))
        info = pkg.get_info()
    except Exception as e:  # onnxruntime raises RuntimeError / Fail with its own message
        raise ArtifactError(f"{p} is not a valid model package: {str(e).splitlines()[0]}") from None
    comp = next((c for c in info["components"] if c["name"] == COMPONENT), None)
    if comp is None:
        raise ArtifactError(f"{p} has no '{COMPONENT}' component; it was not written by edgesdk package")
    meta = json.loads(comp.get("additional_metadata_json") or "{}").get(METADATA_KEY) or {}
    shared = meta.get("shared_files") or {}
    out = []
    for v in comp["variants"]:
        folder = p / (v["variant_directory"] or "")
        target = None
        if (folder / artifact.MANIFEST).is_file():
            target = json.loads((folder / artifact.MANIFEST).read_text()).get("target")
        files, assets = {}, set()
        for rel, ref in (shared.get(v["name"]) or {}).items():
            uri, _, inner = ref.partition("/")
            assets.add(uri)
            try:
                files[rel] = Path(pkg.resolve_asset_uri(uri)) / inner
            except Exception:
                raise ArtifactError(f"{p} is damaged: variant {v['name']}'s shared file {rel} names asset {uri}, "
                                    "which the package does not hold; rebuild it with `edgesdk package`") from None
        out.append({"name": v["name"], "ep": v["ep"], "device": v["device"], "target": target, "path": folder,
                    "shared": files, "assets": sorted(assets)})
    return out


def select(package: str | os.PathLike, target: str = "auto") -> Path:
    """The artifact folder of the variant for this machine (``auto``: a variant whose EP this
    onnxruntime has, NPU before GPU before CPU), or of the variant built for ``target``."""
    ort = _ort()
    vs = variants(package)
    if target != "auto":
        for v in vs:
            if v["target"] == target:
                return _complete(Path(package), v)
        raise ArtifactError(f"{package} has no variant for target {target} "
                            f"(it has {', '.join(v['name'] for v in vs) or 'none'})")
    have = set(ort.get_available_providers())
    ok = [v for v in vs if v["ep"] in have]
    if not ok:
        needs = ", ".join(f"{v['name']} needs {v['ep']}" for v in vs) or "it has no variants"
        raise ArtifactError(f"{package} has no variant for this machine ({needs}; this onnxruntime has "
                            f"{', '.join(sorted(have))})")
    ok.sort(key=lambda v: _DEVICE_RANK.get(v["device"] or "cpu", 3))
    return _complete(Path(package), ok[0])


def _complete(package: Path, v: dict[str, Any]) -> Path:
    """The variant as a complete artifact folder: its own folder when nothing in it is shared,
    else a view (hard links to the variant's files and its shared assets), made once."""
    if not v["shared"]:
        return v["path"]
    from ..verification import cache_dir

    manifest = (v["path"] / artifact.MANIFEST).read_bytes()
    tag = hashlib.sha256(manifest + repr(sorted((k, str(p)) for k, p in v["shared"].items())).encode()).hexdigest()
    name = f"{v['name']}-{tag[:16]}"
    roots = [package / VIEWS, cache_dir() / "package-views" / hashlib.sha256(
        str(package.resolve()).encode()).hexdigest()[:16]]
    for root in roots:
        view = root / name
        if (view / artifact.MANIFEST).is_file():
            return view
    last: OSError | None = None
    for root in roots:
        try:
            return _make_view(root / name, v)
        except OSError as e:  # a read-only package: the user cache instead
            last = e
    raise ArtifactError(f"cannot assemble variant {v['name']} of {package} (its shared files need a folder of "
                        f"links): {last.strerror if last else 'no writable place'}; set EDGESDK_CACHE_DIR to a "
                        "writable folder")


def _make_view(view: Path, v: dict[str, Any]) -> Path:
    view.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{view.name}-", dir=view.parent))
    try:
        files = {p.relative_to(v["path"]).as_posix(): p for p in v["path"].rglob("*") if p.is_file()}
        files.update(v["shared"])
        for rel, src in sorted(files.items()):
            dst = tmp / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(src, dst)
        try:
            os.replace(tmp, view)
        except OSError:
            if not (view / artifact.MANIFEST).is_file():  # not made meanwhile by another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return view
