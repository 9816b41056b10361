"""Every verb of the core slice, run as a subprocess."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import ROOT, run_cli


def test_export_info_run(tiny, tmp_path):
    out = tmp_path / "qwen-int4"
    p = run_cli("export", str(tiny.model("qwen2")), "--target", "cpu", "-o", str(out))
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
