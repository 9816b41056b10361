"""Every verb of the core slice, run as a subprocess."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import edgesdk
from conftest import NO_EXPORT_CACHE, ROOT, run_cli


def test_piped_export_prints_staged_lines_only(tiny, tmp_path):
    """A piped export through the builder (fp32 here) prints its stages, not the builder's or
    tqdm's progress redraws."""
    out = tmp_path / "llama-fp32"
    p = run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out), env=NO_EXPORT_CACHE)
    assert p.returncode == 0, p.stderr
    assert "==> Building the fp32 graph" in p.stderr and "==> Wrote" in p.stderr
    assert "\r" not in p.stderr and "it/s" not in p.stderr and "Saving" not in p.stderr, p.stderr
    assert all(line.startswith(("==>", "    ")) for line in p.stderr.strip().splitlines()), p.stderr


def test_export_info_run(tiny, tmp_path):
    out = tmp_path / "qwen-int4"
    p = run_cli("export", str(tiny.model("qwen2")), "--target", "cpu", "-o", str(out), env=NO_EXPORT_CACHE)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(out)
    assert "==> Building the int4 graph" in p.stderr and "==> Wrote" in p.stderr  # staged progress
    names = {f.name for f in out.iterdir()}
    assert {"model.onnx", "model.onnx.data", "tokenizer.json", "genai_config.json", "edgesdk.json"} <= names
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp folders left

    info = run_cli("info", str(out), "--json")
    assert info.returncode == 0, info.stderr
    m = json.loads(info.stdout)
    assert m["precision"] == "int4" and m["target"] == "cpu"
    assert m["quantization"]["block_size"] == 32 and m["quantization"]["accuracy_level"] == 4
    assert m["source"]["architecture"] == "Qwen2ForCausalLM" and len(m["source"]["weights_sha256"]) == 64
    assert set(m["files"]) == names - {"edgesdk.json"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in m["files"].values())
    assert {"onnxruntime", "onnxruntime-genai", "transformers", "edgesdk"} <= set(m["tools"])
    assert m["model"]["inputs"][0]["name"] == "input_ids" and m["model"]["outputs"][0]["name"] == "logits"
    human = run_cli("info", str(out))
    assert human.returncode == 0 and "Qwen2ForCausalLM" in human.stdout and "verified" in human.stdout

    run = run_cli("run", str(out), "Hello", "--max-new-tokens", "8", "--verbose")
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert "8 generated" in run.stderr and "tok/s" in run.stderr


def test_run_matches_api(tiny):
    import edgesdk

    art = tiny.export("llama", "fp32")
    expected = edgesdk.load(art).generate("Hello world", max_new_tokens=12).text
    p = run_cli("run", str(art), "Hello world", "--max-new-tokens", "12")
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected + "\n"


def test_chat_keeps_cache_across_turns(tiny):
    art = tiny.export("llama", "fp32")
    p = run_cli("chat", str(art), "--max-new-tokens", "6", "--verbose", input="Hi there\nTell me more\n")
    assert p.returncode == 0, p.stderr
    turns = [l for l in p.stderr.splitlines() if l.startswith("[prefilled")]
    assert len(turns) == 2
    (pre1, tot1), (pre2, tot2) = [tuple(int(w) for w in l.split()[1:4:2]) for l in turns]
    assert pre1 == tot1
    assert tot2 > tot1 and pre2 < tot2 - tot1 + 8  # only the new turn was prefilled


def test_console_script_and_module(tiny):
    exe = shutil.which("edgesdk")
    assert exe, "the edgesdk console script is installed"
    a = subprocess.run([exe, "--version"], capture_output=True, text=True)
    b = subprocess.run([sys.executable, "-m", "edgesdk", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert a.returncode == b.returncode == 0
    assert a.stdout == b.stdout and a.stdout.startswith("edgesdk ")


def test_export_cache_reuses_only_identical_exports(tiny, tmp_path):
    cache = {"EDGESDK_EXPORT_CACHE": str(tmp_path / "cache")}
    model = str(tiny.model("llama"))
    first = run_cli("export", model, "--precision", "fp32", "-o", str(tmp_path / "a"), env=cache)
    assert first.returncode == 0 and "Copying the identical export" not in first.stderr, first.stderr
    again = run_cli("export", model, "--precision", "fp32", "-o", str(tmp_path / "b"), env=cache)
    assert again.returncode == 0 and "Copying the identical export cached in" in again.stderr, again.stderr
    a, b = (json.loads((tmp_path / d / "edgesdk.json").read_text()) for d in "ab")
    assert a["files"] == b["files"] and a["precision"] == "fp32"
    other = run_cli("export", model, "--precision", "int8", "-o", str(tmp_path / "c"), env=cache)
    assert other.returncode == 0 and "Copying the identical export" not in other.stderr  # another option: built
    assert len([e for e in (tmp_path / "cache").iterdir() if not e.name.startswith(".")]) == 2
    entry = next(e for e in (tmp_path / "cache").iterdir()
                 if json.loads((e / "edgesdk.json").read_text())["precision"] == "fp32")
    (entry / "tokenizer.json").write_text("{}")  # a damaged entry is dropped and the export built again
    p = run_cli("export", model, "--precision", "fp32", "-o", str(tmp_path / "d"), env=cache)
    assert p.returncode == 0 and "Copying the identical export" not in p.stderr
    assert edgesdk.load(tmp_path / "d").generate("Hi", max_new_tokens=4).generated_tokens == 4


def test_same_inputs_give_byte_identical_artifacts(tiny, tmp_path):
    """Nothing random or time-stamped goes into an artifact: two builds (not cached) of the same
    inputs with SOURCE_DATE_EPOCH set are identical to the byte, manifest included."""
    env = {**NO_EXPORT_CACHE, "SOURCE_DATE_EPOCH": "1767225600"}
    for name in "ab":
        p = run_cli("export", str(tiny.model("qwen2")), "-o", str(tmp_path / name), "-q", env=env)
        assert p.returncode == 0, p.stderr
    files = sorted(f.relative_to(tmp_path / "a") for f in (tmp_path / "a").rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(tmp_path / "b") for f in (tmp_path / "b").rglob("*") if f.is_file())
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert json.loads((tmp_path / "a" / "edgesdk.json").read_text())["created"] == "2026-01-01T00:00:00+00:00"
