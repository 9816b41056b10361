"""Nothing lost, honest errors, cheap verified loads (issue 9).

--force replaces only what edgesdk wrote; a failed swap puts the old artifact back; every public
entry point refuses bad arguments with an EdgeSDKError; session failures are named for what they
are; the verification record skips rehashing only files that have not changed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import onnx
import pytest

import edgesdk
from edgesdk import artifact
from edgesdk.errors import (ArtifactError, ChecksumError, EdgeSDKError, EnvironmentMismatchError, OutputExistsError)
from conftest import ROOT, assert_one_line_error, run_cli, smollm2_gguf


# -- nothing lost --------------------------------------------------------------------------------
@pytest.fixture()
def art(tiny, tmp_path):
    """A private copy of a real (tiny) artifact."""
    dst = tmp_path / "art"
    shutil.copytree(tiny.export("llama", "fp32"), dst)
    return dst


def _fill(folder, text="new"):
    with artifact.staging(folder, force=True) as tmp:
        (tmp / "payload.txt").write_text(text)
        artifact.write_manifest(tmp, {"what": text})


@pytest.mark.parametrize("where", ["cwd", "home-like", "nested"])
def test_force_refuses_a_folder_edgesdk_did_not_write(tiny, tmp_path, where):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "notes.txt").write_text("mine")
    out, cwd = {"cwd": (".", project), "home-like": (str(project), ROOT),
                "nested": (str(project), ROOT)}[where]
    if where == "nested":  # an artifact's manifest does not make the rest of the folder ours
        (project / "edgesdk.json").write_text(json.dumps({"files": {}}))
    p = subprocess.run([sys.executable, "-m", "edgesdk", "export", str(tiny.model("llama")), "--precision", "fp32",
                        "-o", out, "--force"], cwd=cwd, capture_output=True, text=True)
    line = assert_one_line_error(p, "choose another -o")
    assert ("did not write" in line) if where == "nested" else ("not an edgesdk artifact" in line)
    assert (project / "src" / "main.py").read_text() == "print('mine')"
    assert (project / "notes.txt").read_text() == "mine"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["project"]  # no partial or old folders


def test_force_replaces_an_artifact_or_an_empty_folder(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, "one")  # empty folder: replaced
    assert (out / "payload.txt").read_text() == "one"
    (out / "model.sig").write_text("a signature from `edgesdk sign`")  # edgesdk's too, though unlisted
    _fill(out, "two")  # an artifact: replaced, nothing of the old one left
    assert not (out / "model.sig").exists()
    assert (out / "payload.txt").read_text() == "two"
    assert json.loads((out / "edgesdk.json").read_text())["what"] == "two"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_force_refuses_files_links_and_extra_files(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("mine")
    with pytest.raises(OutputExistsError, match="is a file"):
        _fill(f)
    real = tmp_path / "real"
    _fill(real, "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        _fill(link)
    (real / "my-notes.md").write_text("mine")  # the user added a file to an artifact
    with pytest.raises(OutputExistsError, match="my-notes.md, which edgesdk did not write"):
        _fill(real)
    assert f.read_text() == "mine" and (real / "payload.txt").read_text() == "real" and link.is_symlink()


def test_failed_swap_puts_the_old_artifact_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _fill(out, "old")
    real_replace = os.replace

    def replace(src, dst):  # the rename of the new folder into place fails (disk full, ...)
        if ".partial-" in str(src):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(artifact.os, "replace", replace)
    with pytest.raises(OutputExistsError, match="No space left on device.*unchanged"):
        _fill(out, "new")
    monkeypatch.undo()
    assert (out / "payload.txt").read_text() == "old"
    artifact.read(out, verify="full")
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("dest,needle", [("/proc/x", "cannot write to /proc"),
                                         ("/etc/hostname/x", "/etc/hostname is a file")])
def test_unwritable_output_is_one_line(tiny, dest, needle):
    p = run_cli("export", str(tiny.model("llama")), "-o", dest)
    assert_one_line_error(p, needle, "choose another -o")


# -- every public entry point validates its arguments --------------------------------------------
@pytest.mark.parametrize("call,needle", [
    (lambda a: edgesdk.load(None), "artifact path must be a folder path"),
    (lambda a: edgesdk.load(""), "artifact path must be a folder path"),
    (lambda a: edgesdk.load(42), "not int"),
    (lambda a: edgesdk.load(a, target=None), "target=None is invalid"),
    (lambda a: edgesdk.load(a, threads=0), "threads=0 is invalid"),
    (lambda a: edgesdk.load(a, threads="2"), "threads='2' is invalid"),
    (lambda a: edgesdk.load(a, max_length=1), "max_length=1 is invalid"),
    (lambda a: edgesdk.load(a, verify="yes"), "verify='yes' is invalid"),
    (lambda a: edgesdk.load(a, prefer=3), "prefer=3 is invalid"),
    (lambda a: edgesdk.export(None), "source must be"),
    (lambda a: edgesdk.export("x", target=None), "target must be"),
    (lambda a: edgesdk.export(a, out=a.parent / "o", precision=4), "unknown precision"),
    (lambda a: edgesdk.load(a).generate(None), "pass exactly one of prompt="),
    (lambda a: edgesdk.load(a).generate(123), "prompt must be a string"),
    (lambda a: edgesdk.load(a).generate("hi", max_new_tokens="3"), "max_new_tokens"),
    (lambda a: edgesdk.load(a).chat(system=5), "system must be a string"),
    (lambda a: next(edgesdk.load(a).chat().send(None)), "non-empty string"),
])
def test_public_entry_points_raise_edgesdk_errors(art, call, needle):
    with pytest.raises(EdgeSDKError, match=needle):
        call(art)


# -- session failures named for what they are ------------------------------------------------------
def _rewrite_graph(art, edit):
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    edit(model)
    onnx.save(model, str(art / "model.onnx"))
    manifest = json.loads((art / "edgesdk.json").read_text())
    artifact.write_manifest(art, {k: v for k, v in manifest.items() if k != "files"})


def test_onnxruntime_too_old_for_the_graph(art):
    def future_opset(model):
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                imp.version = 99
    _rewrite_graph(art, future_opset)
    with pytest.raises(EnvironmentMismatchError, match=r"onnxruntime .* is too old .*opset 99.*upgrade it"):
        edgesdk.load(art)
    assert_one_line_error(run_cli("run", str(art), "hi"), "is too old", "pip install -U onnxruntime")


def test_unknown_operator_is_too_old_not_corrupt(art):
    def unknown_op(model):
        node = next(n for n in model.graph.node if n.domain == "com.microsoft")
        node.op_type = "MatMulNBitsV9"
    _rewrite_graph(art, unknown_op)
    with pytest.raises(EnvironmentMismatchError, match="MatMulNBitsV9.*is not a registered function/op"):
        edgesdk.load(art)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is how the test limits memory")
def test_out_of_memory_is_named(real):
    """A real allocation failure: the process may map only a little more than it needs before loading."""
    code = textwrap.dedent(f"""
        import resource, sys
        import psutil, edgesdk
        from edgesdk.errors import EnvironmentMismatchError
        vm = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vm + 300_000_000, resource.RLIM_INFINITY))
        try:
            edgesdk.load({str(real.export("fp32"))!r}, verify=False)
        except EnvironmentMismatchError as e:
            print(e)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.startswith("not enough memory to load model.onnx (0.5"), p.stdout


def test_corrupt_graph_is_still_called_corrupt(art):
    size = (art / "model.onnx").stat().st_size
    (art / "model.onnx").write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(ArtifactError, match="corrupt or incomplete, re-export it"):
        edgesdk.load(art, verify=False)


# -- GGUF file types this gguf does not know ------------------------------------------------------
def _patched_gguf(tmp_path, key, value):
    """A copy of the real SmolLM2 GGUF with one integer of its header changed."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(smollm2_gguf()))
    if key == "general.file_type":
        part = reader.fields[key].parts[reader.fields[key].data[0]]
    else:  # the first tensor's type field
        part = reader.tensors[0].field.parts[4]
    offset = int(part.ctypes.data - reader.data.ctypes.data)
    dst = tmp_path / "patched.gguf"
    shutil.copy(smollm2_gguf(), dst)
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(np.array([value], dtype=part.dtype).tobytes())
    return dst


def test_unknown_gguf_file_type_is_a_label_not_corruption(tmp_path):
    from edgesdk.exporters import sources

    src = sources.resolve(_patched_gguf(tmp_path, "general.file_type", 250))
    assert src.gguf_type == "file type 250" and src.architecture == "LlamaForCausalLM"


def test_unknown_gguf_tensor_type_names_the_upgrade(tmp_path):
    bad = _patched_gguf(tmp_path, "tensor_type", 200)
    p = run_cli("export", str(bad), "-o", str(tmp_path / "out"), "-q")
    assert_one_line_error(p, "GGML type 200", "pip install -U gguf")
    assert "corrupt" not in p.stderr and not (tmp_path / "out").exists()


# -- cheap verified loads ----------------------------------------------------------------------------
@pytest.fixture()
def hashes(monkeypatch):
    """Counts the files load() hashes (the real sha256 still runs)."""
    seen = []
    real = artifact.sha256_file

    def counting(path, *a, **k):
        seen.append(path.name)
        return real(path, *a, **k)

    monkeypatch.setattr(artifact, "sha256_file", counting)
    return seen


def test_unchanged_files_are_not_rehashed(art, hashes, verification_cache):
    n = len(json.loads((art / "edgesdk.json").read_text())["files"])
    edgesdk.load(art)
    assert len(hashes) == n  # first load of this copy: every file hashed, then recorded
    hashes.clear()
    edgesdk.load(art)
    assert hashes == []  # nothing changed: nothing rehashed
    edgesdk.load(art, verify="full")
    assert len(hashes) == n
    assert list(verification_cache.glob("verified/*.json")) and not list(art.glob("*record*"))


def test_a_modified_file_is_rehashed_even_with_size_and_mtime_restored(art, hashes):
    edgesdk.load(art)
    hashes.clear()
    tok = art / "tokenizer.json"
    st = tok.stat()
    data = bytearray(tok.read_bytes())
    i = data.index(b'"<|im_end|>"')
    data[i + 3] = ord("X")
    tok.write_bytes(bytes(data))
    os.utime(tok, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only ctime tells
    with pytest.raises(ChecksumError, match="tokenizer.json fails its sha256"):
        edgesdk.load(art)
    assert hashes == ["tokenizer.json"]
    tok.unlink()  # a replaced file (new inode) with the original bytes passes again, after a hash
    tok.write_bytes(bytes(data[:i + 3]) + b"i" + bytes(data[i + 4:]))
    hashes.clear()
    edgesdk.load(art)
    assert hashes == ["tokenizer.json"]


def test_an_export_leaves_a_record_so_its_first_load_hashes_nothing(tiny, tmp_path, hashes):
    out = edgesdk.export(tiny.model("llama"), "cpu", tmp_path / "fresh", precision="fp32", quiet=True)
    files = json.loads((out / "edgesdk.json").read_text())["files"]
    assert sorted(hashes) == sorted(name.rsplit("/", 1)[-1] for name in files)  # each file hashed once
    hashes.clear()
    edgesdk.load(out)
    assert hashes == []
    p = run_cli("info", str(out), "--full-verify")
    assert p.returncode == 0 and "checksums     verified" in p.stdout


def test_an_unwritable_cache_still_verifies(art, hashes, monkeypatch, tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("EDGESDK_CACHE_DIR", str(blocked))
    edgesdk.load(art)
    edgesdk.load(art)
    n = len(json.loads((art / "edgesdk.json").read_text())["files"])
    assert len(hashes) == 2 * n  # no record could be kept: every load hashes everything


@pytest.mark.parametrize("verb", ["bench", "eval"])
def test_json_report_to_a_folder_is_refused_before_the_work(art, tmp_path, verb):
    extra = ["--text", str(ROOT / "README.md")] if verb == "eval" else []
    p = run_cli(verb, str(art), *extra, "--json", str(tmp_path))
    assert_one_line_error(p, f"cannot write {tmp_path}: it is a folder")
