"""edgesdk build (issue 14): a models x targets matrix from one build file, --list/--only/--shard,
the export cache per entry, signing, a failed entry that does not stop the others, and one-line
errors for a bad build file. Sources are the session's tiny random llama (an HF folder)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli

import edgesdk
from edgesdk import artifact


def _write(folder: Path, text: str) -> Path:
    f = folder / "build.yaml"
    f.write_text(text)
    return f


def _matrix(f: Path, *args: str) -> list[dict]:
    p = run_cli("build", str(f), "--list", *args)
    assert p.returncode == 0, p.stderr
    assert len(p.stdout.splitlines()) == 1  # one line: fits $GITHUB_OUTPUT
    return json.loads(p.stdout)["include"]


def test_list_only_and_shards_split_the_matrix(tiny, tmp_path):
    f = _write(tmp_path, f"""
defaults:
  targets: [cpu, directml]
models:
  - name: chat
    source: {tiny.model("llama")}
    precisions: [int4, fp16]
  - name: npu
    source: {tiny.model("llama")}
    targets: [qnn, {{name: cpu, precisions: [fp32]}}]
""")
    full = _matrix(f)
    keys = [e["key"] for e in full]
    assert keys == ["chat-cpu-int4", "chat-cpu-fp16", "chat-directml-int4", "chat-directml-fp16",
                    "npu-qnn-int8", "npu-cpu-fp32"]  # qnn's default precision (int8) from its profile
    e = full[0]
    assert (e["model"], e["target"], e["precision"]) == ("chat", "cpu", "int4")
    assert Path(e["out"]).resolve() == (tmp_path / "dist" / "chat-cpu-int4").resolve()  # dist/ beside the file
    assert [x["key"] for x in _matrix(f, "--only", "target=cpu")] == ["chat-cpu-int4", "chat-cpu-fp16", "npu-cpu-fp32"]
    assert [x["key"] for x in _matrix(f, "--only", "model=chat", "--only", "precision=fp16,fp32")] == \
        ["chat-cpu-fp16", "chat-directml-fp16"]
    shards = [_matrix(f, "--shard", f"{i}/4") for i in (1, 2, 3, 4)]
    flat = [x["key"] for s in shards for x in s]
    assert sorted(flat) == sorted(keys) and len(flat) == len(keys)  # disjoint and complete
    assert all(shards)


def test_build_caches_signs_and_survives_a_failed_entry(tiny, tmp_path):
    from cryptography.hazmat.primitives import serialization as s
    from cryptography.hazmat.primitives.asymmetric import ec

    broken = tmp_path / "broken"  # exists (so the file is valid) but is no model: fails at export time
    broken.mkdir()
    (broken / "README").write_text("not a model")
    f = _write(tmp_path, f"""
out: out
models:
  - name: tiny
    source: {tiny.model("llama")}
    targets: [cpu]
    precisions: [fp32]
  - name: broken
    source: ./broken
    targets: [cpu]
    precisions: [fp32]
""")
    p = run_cli("build", str(f))
    assert p.returncode == 1, p.stdout + p.stderr
    assert "[1/2] tiny-cpu-fp32: built" in p.stdout and "[2/2] broken-cpu-fp32: failed" in p.stdout
    assert "2 entries: 1 built, 0 cached, 1 failed" in p.stdout
    assert p.stderr.strip() == "error: 1 of 2 entries failed: broken-cpu-fp32"
    out = tmp_path / "out" / "tiny-cpu-fp32"
    first = {n: (out / n).read_bytes() for n in artifact.read(out).manifest["files"]}
    assert (tmp_path / ".edgesdk-cache").is_dir()

    # unchanged: the entry comes from the cache, byte for byte, and is signed with the key given
    key = ec.generate_private_key(ec.SECP256R1())
    priv, pub = tmp_path / "k.pem", tmp_path / "k.pub.pem"
    priv.write_bytes(key.private_bytes(s.Encoding.PEM, s.PrivateFormat.PKCS8, s.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(s.Encoding.PEM, s.PublicFormat.SubjectPublicKeyInfo))
    f.write_text(f.read_text().replace("precisions: [fp32]", "precisions: [fp32, int4]", 1))
    for i in range(2):  # the second time over signed outputs
        p = run_cli("build", str(f), "--only", "model=tiny", "--sign-key", str(priv), "--package", "tiny.ortpackage")
        assert p.returncode == 0, p.stdout + p.stderr
        assert "tiny-cpu-fp32: cached" in p.stdout, p.stdout
        assert f"2 entries: {1 - i} built, {1 + i} cached, 0 failed" in p.stdout
        assert "cached, signed" in p.stdout
    assert "provenance.json" in artifact.read(out).manifest["files"]
    for n, data in first.items():  # every payload file (the manifest lists all but itself)
        assert (out / n).read_bytes() == data, n
    from edgesdk.distribute import package

    pkg = tmp_path / "out" / "tiny.ortpackage"
    vs = package.variants(pkg)
    assert sorted(v["name"] for v in vs) == ["cpu-fp32", "cpu-int4"] and "packaged 2 variants" in p.stdout
    assert all("tokenizer.json" in v["shared"] for v in vs)  # stored once, as a shared asset
    for target in ("auto", "cpu"):  # each variant, with its shared files, still verifies as signed
        model = edgesdk.load(package.select(pkg, target), public_key=pub)
        assert model.generate("Hello", max_new_tokens=4).generated_tokens >= 1
    assert (out / "model.sig").is_file()
    model = edgesdk.load(out, public_key=pub)
    assert model.generate("Hello", max_new_tokens=4).generated_tokens >= 1


@pytest.mark.parametrize("text,needles", [
    ("modles: []\n", ["unknown key 'modles'", "did you mean 'models'"]),
    ("models:\n  - {name: m, source: SRC, targets: [directm]}\n", ["unknown target 'directm'", "directml"]),
    ("models:\n  - {name: m, source: ./nowhere, targets: [cpu]}\n", ["model m source ./nowhere does not exist"]),
    ("models:\n  - {name: m, targets: [cpu]}\n", ["model m needs a source"]),
    ("models:\n  - {name: m, source: SRC, targets: [directml], precisions: [int8]}\n",
     ["target directml does not support int8"]),
    ("models:\n  - {name: m, source: SRC, target: [cpu]}\n", ["unknown key 'target'", "did you mean 'targets'"]),
    ("models:\n  - {name: m, source: SRC, targets: [cpu], chunk: 64}\n", ["chunk does not apply to target cpu"]),
    ("defaults: {targets: [cpu]}\nmodels:\n  - {name: m, source: SRC}\n  - {name: m, source: SRC}\n",
     ["entry m-cpu-int4 appears twice"]),
])
def test_invalid_build_file_is_one_line_before_any_work(tiny, tmp_path, text, needles):
    f = _write(tmp_path, text.replace("SRC", str(tiny.model("llama"))))
    p = run_cli("build", str(f))
    assert_one_line_error(p, "build.yaml", *needles)
    assert not (tmp_path / "dist").exists() and not (tmp_path / ".edgesdk-cache").exists()


@pytest.mark.parametrize("args,needle", [
    (["--shard", "3/2"], "--shard 3/2 is out of range"),
    (["--shard", "0/2"], "--shard 0/2 is out of range"),
    (["--shard", "two"], "use I/N"),
    (["--only", "taget=cpu"], "did you mean 'target'"),
    (["--only", "target=qnn"], "matches no entry"),
])
def test_bad_selection_is_one_line(tiny, tmp_path, args, needle):
    f = _write(tmp_path, f"models:\n  - {{name: m, source: {tiny.model('llama')}, targets: [cpu]}}\n")
    assert_one_line_error(run_cli("build", str(f), "--list", *args), needle)


def _run_decoder(session):
    """One decode step of a builder graph with an empty KV cache: feeds made from its inputs."""
    import numpy as np

    feeds = {}
    for i in session.get_inputs():
        named = {"past_sequence_length": 0, "kv_cache_dim": 16}  # the tiny llama: head size 16
        shape = [d if isinstance(d, int) else named.get(d, 1) for d in i.shape]
        dtype = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                 "tensor(float16)": np.float16}[i.type]
        feeds[i.name] = np.full(shape, 5, dtype) if i.name == "input_ids" else np.ones(shape, dtype) \
            if "mask" in i.name else np.zeros(shape, dtype)
    return session.run(["logits"], feeds)[0]


@pytest.fixture(scope="module")
def two_targets(tiny) -> tuple[Path, Path]:
    return tiny.export("llama", "fp32"), tiny.export("llama", "int4", "directml")


def test_package_is_selected_and_run_by_onnxruntime_and_edgesdk(two_targets, tmp_path):
    import numpy as np
    import onnxruntime as ort

    from edgesdk.distribute import package

    cpu, dml = two_targets
    pkg = tmp_path / "tiny.ortpackage"
    p = run_cli("package", str(cpu), str(dml), "-o", str(pkg))
    assert p.returncode == 0, p.stderr
    assert "cpu-fp32: CPUExecutionProvider (cpu)" in p.stdout
    assert "directml-int4: DmlExecutionProvider (gpu)" in p.stdout
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert set(manifest["components"]["model"]["variants"]) == {"cpu-fp32", "directml-int4"}

    # files byte-identical in both variants (the tokenizer) are stored once, as onnxruntime's
    # content-addressed shared assets; each variant keeps its own graph, manifest and the rest
    same = sorted(rel for rel, meta in artifact.read(cpu).manifest["files"].items()
                  if artifact.read(dml).manifest["files"].get(rel, {}).get("sha256") == meta["sha256"])
    assert "tokenizer.json" in same and "model.onnx" not in same
    assets = sorted((pkg / "shared_assets").iterdir())
    assert len(assets) == len(same) and all(a.name.startswith("sha256-") for a in assets)
    assert ort.ModelPackage.compute_directory_hash(str(assets[0])) == assets[0].name.replace("-", ":", 1)
    assert "2 variants, %d shared assets" % len(same) in p.stdout
    for v in ("cpu-fp32", "directml-int4"):
        assert not any((pkg / "variants" / v / rel).exists() for rel in same)
        assert (pkg / "variants" / v / "model.onnx").is_file() and (pkg / "variants" / v / "edgesdk.json").is_file()
    size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
    assert size < sum(f.stat().st_size for a in (cpu, dml) for f in a.rglob("*") if f.is_file())

    # onnxruntime's own reader picks the variant its EPs can run (CPU here) and runs it
    ctx = ort.ModelPackageContext(str(pkg))
    assert ctx.get_variant_ep_name("model", "directml-int4") == "DmlExecutionProvider"
    comp = ctx.select_component("model", ort.ModelPackageOptions(ort.SessionOptions()))
    assert comp.get_selected_variant_name() == "cpu-fp32"
    direct = ort.InferenceSession(str(cpu / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(_run_decoder(comp.create_session()), _run_decoder(direct))

    # edgesdk picks the same variant for this machine, as a whole artifact that load() opens and
    # checks: the variant's files and its shared files, linked once into a view
    chosen = package.select(pkg, target="auto")
    assert chosen.parent == pkg / ".edgesdk" / "views" and chosen.name.startswith("cpu-fp32-")
    assert artifact.read(chosen, verify="full").manifest == artifact.read(cpu).manifest
    assert os.path.samefile(chosen / "tokenizer.json", next(
        p for p in (pkg / "shared_assets").rglob("tokenizer.json")))
    assert package.select(pkg, target="auto") == chosen  # made once
    assert package.select(pkg, target="directml").name.startswith("directml-int4-")
    want = edgesdk.load(cpu).generate("Hello", max_new_tokens=6).token_ids
    assert edgesdk.load(chosen, target="auto").generate("Hello", max_new_tokens=6).token_ids == want
    loaded = edgesdk.load(pkg)  # load() takes the package itself and opens this machine's variant
    assert loaded.path == chosen and loaded.generate("Hello", max_new_tokens=6).token_ids == want

    # replacing needs --force; a folder that is not a package is never replaced
    assert_one_line_error(run_cli("package", str(cpu), "-o", str(pkg)), "already exists", "--force")
    assert_one_line_error(run_cli("package", str(cpu), "-o", str(cpu)), "is not a model package")


def test_package_without_a_variant_for_this_machine(two_targets, tmp_path):
    import onnxruntime as ort

    from edgesdk.distribute import package
    from edgesdk.errors import ArtifactError

    if "DmlExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has DirectML")
    pkg = package.create([two_targets[1]], tmp_path / "dml-only.ortpackage")
    with pytest.raises(RuntimeError, match="No suitable model variant"):
        ort.ModelPackageContext(str(pkg)).select_component("model", ort.ModelPackageOptions(ort.SessionOptions()))
    with pytest.raises(ArtifactError) as e:
        package.select(pkg)
    msg = str(e.value)
    assert "no variant for this machine" in msg and "directml-int4 needs DmlExecutionProvider" in msg
    assert "\n" not in msg
    with pytest.raises(ArtifactError, match="no variant for target cpu"):
        package.select(pkg, target="cpu")
    with pytest.raises(ArtifactError, match="no variant for this machine"):
        edgesdk.load(pkg)
