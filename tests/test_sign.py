"""Signing and provenance (issue 14): edgesdk sign / verify, load(public_key=...), and the
signature checked by model-signing's own CLI. Keys are made here (EC P-256), never committed."""
from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("model_signing", reason='needs edgesdk[sign]: pip install "edgesdk[sign]"')

from conftest import assert_one_line_error, run_cli  # noqa: E402

import edgesdk  # noqa: E402
from edgesdk import artifact  # noqa: E402
from edgesdk.distribute import provenance, sign  # noqa: E402
from edgesdk.errors import EdgeSDKError, InvalidArgumentError  # noqa: E402


def _pem_pair(folder: Path, name: str, key) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization as s

    priv, pub = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    d = tmp_path_factory.mktemp("keys")
    priv, pub = _pem_pair(d, "signer", ec.generate_private_key(ec.SECP256R1()))
    _, other = _pem_pair(d, "other", ec.generate_private_key(ec.SECP256R1()))
    rsa_priv, _ = _pem_pair(d, "rsa", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    bad = d / "malformed.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    return {"priv": priv, "pub": pub, "other": other, "rsa": rsa_priv, "malformed": bad}


@pytest.fixture(scope="module")
def source(tiny) -> Path:
    return tiny.export("llama", "fp32")


@pytest.fixture(scope="module")
def signed(source, keys, tmp_path_factory) -> Path:
    """A signed copy of the tiny artifact (read-only use: tests that change it copy it first)."""
    out = tmp_path_factory.mktemp("signed") / "art"
    shutil.copytree(source, out)
    sign.sign(out, keys["priv"])
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    out = tmp_path / "art"
    shutil.copytree(folder, out)
    return out


def _statement(sig: Path) -> dict:
    bundle = json.loads(sig.read_text())
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def test_cli_sign_then_verify_and_model_signing_cli_agrees(source, keys, tmp_path):
    art = _copy(source, tmp_path)
    p = run_cli("sign", str(art), "--key", str(keys["priv"]))
    assert p.returncode == 0, p.stderr
    assert "model.sig" in p.stdout
    manifest = artifact.read(art, verify="full").manifest
    # provenance.json is an artifact file (listed, checksummed); the signature cannot be
    assert "provenance.json" in manifest["files"] and "model.sig" not in manifest["files"]
    # the bundle is an in-toto statement over every file but itself, the manifest included
    st = _statement(art / "model.sig")
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    signed_files = {r["name"]: r["digest"] for r in st["predicate"]["resources"]}
    on_disk = {p.name for p in art.iterdir() if p.is_file()}
    assert set(signed_files) == on_disk - {"model.sig"}
    assert signed_files["edgesdk.json"] == artifact.sha256_file(art / "edgesdk.json")
    for rel, meta in manifest["files"].items():
        assert signed_files[rel] == meta["sha256"]

    p = run_cli("verify", str(art), "--key", str(keys["pub"]))
    assert p.returncode == 0, p.stderr
    assert "signature     verified" in p.stdout and "matches the manifest" in p.stdout
    assert f"{len(manifest['files'])} files verified" in p.stdout

    # the library's own CLI verifies edgesdk's signature, and refuses the wrong key
    lib = [sys.executable, "-m", "model_signing", "verify", "key", str(art),
           "--signature", str(art / "model.sig"), "--public_key"]
    ok = subprocess.run(lib + [str(keys["pub"])], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, ok.stdout + ok.stderr
    bad = subprocess.run(lib + [str(keys["other"])], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Verification failed" in bad.stderr


def test_provenance_records_the_build(signed):
    manifest = artifact.read(signed, verify=False).manifest
    st = json.loads((signed / "provenance.json").read_text())
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://slsa.dev/provenance/v1"
    subjects = {s["name"]: s["digest"]["sha256"] for s in st["subject"]}
    assert subjects == {rel: m["sha256"] for rel, m in manifest["files"].items() if rel != "provenance.json"}
    build = st["predicate"]["buildDefinition"]
    assert build["externalParameters"]["target"] == manifest["target"] == "cpu"
    assert build["externalParameters"]["precision"] == manifest["precision"] == "fp32"
    src = build["resolvedDependencies"][0]
    assert src["digest"]["sha256"] == manifest["source"]["weights_sha256"]
    assert src["annotations"]["architecture"] == "LlamaForCausalLM"
    run = st["predicate"]["runDetails"]
    assert run["builder"]["version"] == manifest["tools"] and "onnxruntime" in run["builder"]["version"]
    assert run["metadata"]["finishedOn"] == manifest["created"]
    platform = build["internalParameters"]["platform"]
    assert platform["system"] and platform["python"]
    assert "model-signing" in build["internalParameters"]["signed_with"]
    # deterministic: rebuilding from the manifest gives the same bytes
    again = provenance.dumps(provenance.build(manifest, build["internalParameters"]))
    assert again == (signed / "provenance.json").read_text()


def test_provenance_has_evaluation_and_data_digests_when_the_manifest_does():
    manifest = {"files": {"model.onnx": {"sha256": "a" * 64, "size": 1}}, "target": "qnn", "precision": "int8",
                "quantization": {"scheme": "QDQ", "calibration": "cal.txt", "calibration_sha256": "b" * 64},
                "source": {"kind": "hf-folder", "path": "/m", "weights_sha256": "c" * 64},
                "tools": {"edgesdk": "0.1.0"},
                "evaluation": {"perplexity": 12.5, "data": "wiki.txt", "data_sha256": "d" * 64}}
    st = provenance.build(manifest)
    deps = {d["name"]: d for d in st["predicate"]["buildDefinition"]["resolvedDependencies"]}
    assert deps["quantization.calibration"]["digest"]["sha256"] == "b" * 64
    assert deps["quantization.calibration"]["uri"] == "cal.txt"
    assert deps["evaluation.data"]["digest"]["sha256"] == "d" * 64
    assert deps["source"]["digest"]["sha256"] == "c" * 64
    assert st["predicate"]["runDetails"]["byproducts"][0]["annotations"]["perplexity"] == 12.5


def test_load_with_public_key(signed, source, keys, tmp_path):
    model = edgesdk.load(signed, public_key=keys["pub"])
    assert len(model.generate("Hi", max_new_tokens=2).token_ids) >= 1
    with pytest.raises(sign.SignatureError, match="signed with another key") as e:
        edgesdk.load(signed, public_key=keys["other"])
    assert "\n" not in str(e.value)
    with pytest.raises(sign.SignatureError, match="is not signed") as e:
        edgesdk.load(source, public_key=keys["pub"])
    assert "\n" not in str(e.value)
    # a consistent forgery: a file changed and the manifest rewritten to match it
    art = _copy(signed, tmp_path)
    cfg = json.loads((art / "genai_config.json").read_text())
    cfg["search"]["max_length"] = 7
    (art / "genai_config.json").write_text(json.dumps(cfg))
    artifact.write_manifest(art, json.loads((art / "edgesdk.json").read_text()))
    edgesdk.load(art)  # the checksums alone cannot tell
    with pytest.raises(sign.SignatureError, match="changed since it was signed") as e:
        edgesdk.load(art, public_key=keys["pub"])
    assert "\n" not in str(e.value)


def test_added_file_and_resign(signed, keys, tmp_path):
    art = _copy(signed, tmp_path)
    bundle = json.loads((art / "model.sig").read_text())  # a forged statement: the DSSE signature fails
    st = _statement(art / "model.sig")
    st["predicate"]["resources"][0]["digest"] = "0" * 64
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(st).encode()).decode()
    (art / "model.sig").write_text(json.dumps(bundle))
    with pytest.raises(sign.SignatureError, match="model.sig is not a valid signature of its contents"):
        sign.check_signature(art, keys["pub"])
    shutil.copy(signed / "model.sig", art / "model.sig")
    (art / "extra.txt").write_text("x")
    with pytest.raises(sign.SignatureError, match="a file was added"):
        sign.check_signature(art, keys["pub"])
    with pytest.raises(sign.SignatureError, match="extra.txt, which its manifest does not list"):
        sign.sign(art, keys["priv"])
    (art / "extra.txt").unlink()
    sign.sign(art, keys["priv"])  # signing again replaces the signature
    assert sign.verify(art, keys["pub"])["signature"] == "verified"
    assert "model.sig" not in artifact.read(art, verify=False).manifest["files"]


def test_verify_refuses_provenance_that_does_not_match(signed, keys, tmp_path):
    art = _copy(signed, tmp_path)
    manifest = artifact.read(art, verify=False).manifest
    manifest["precision"] = "int4"
    artifact.write_manifest(art, manifest)
    with pytest.raises(EdgeSDKError, match=r"does not match the manifest \(at predicate\.buildDefinition"
                                           r"\.externalParameters\.precision\)"):
        sign.verify(art)
    (art / "provenance.json").unlink()
    manifest.pop("files")
    artifact.write_manifest(art, manifest)
    with pytest.raises(EdgeSDKError, match="has no provenance.json"):
        sign.verify(art, keys["pub"])
    assert sign.verify(art)["provenance"] == "none"


def test_bad_input_one_line_errors(signed, source, keys, tmp_path):
    art = _copy(signed, tmp_path)
    before = {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()}
    for key, needle in ((keys["malformed"], "cannot sign with"), (keys["rsa"], "not an elliptic-curve key"),
                        (tmp_path / "none.pem", "does not exist")):
        with pytest.raises(InvalidArgumentError, match=needle) as e:
            sign.sign(art, key)
        assert "\n" not in str(e.value)
    assert {p.name: p.read_bytes() for p in art.iterdir() if p.is_file()} == before  # nothing written
    p = run_cli("sign", str(art), "--key", str(keys["malformed"]))
    assert_one_line_error(p, "cannot sign with", "EC P-256")
    p = run_cli("verify", str(art), "--key", str(keys["other"]))
    assert_one_line_error(p, "fails its signature check", "another key")
    p = run_cli("verify", str(source), "--key", str(keys["pub"]))  # unsigned
    assert_one_line_error(p, "has no provenance.json")
    (art / "model.sig").unlink()
    p = run_cli("verify", str(art), "--key", str(keys["pub"]))
    assert_one_line_error(p, "is not signed (no model.sig)")
    shutil.copy(signed / "model.sig", art / "model.sig")
    with open(art / "model.onnx.data", "r+b") as f:  # tampered in place, same size
        f.seek(100)
        f.write(b"\x7f\x7f\x7f\x7f")
    p = run_cli("verify", str(art), "--key", str(keys["pub"]))
    assert_one_line_error(p, "model.onnx.data fails its sha256 check")
    with pytest.raises(sign.SignatureError, match="model.onnx.data changed since it was signed"):
        sign.check_signature(art, keys["pub"])


def test_missing_library_names_the_extra(signed, keys, monkeypatch):
    for name in [m for m in sys.modules if m == "model_signing" or m.startswith("model_signing.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "model_signing", None)
    with pytest.raises(EdgeSDKError, match=r'pip install "edgesdk\[sign\]"'):
        edgesdk.load(signed, public_key=keys["pub"])


def test_load_without_key_does_not_import_model_signing(signed):
    code = ("import sys, edgesdk; edgesdk.load(sys.argv[1]); "
            "print('imported' if 'model_signing' in sys.modules else 'not imported')")
    p = subprocess.run([sys.executable, "-c", code, str(signed)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "not imported"
