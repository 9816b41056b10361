"""Bad input: one line saying what is wrong, non-zero exit, no traceback, nothing half-written."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import edgesdk
from edgesdk.errors import ArtifactError, ChecksumError, EdgeSDKError
from conftest import NO_EXPORT_CACHE, ROOT, run_cli, smollm2_gguf


def one_line_error(p: subprocess.CompletedProcess, *needles: str) -> str:
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    errors = [l for l in p.stderr.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for n in needles:
        assert n in errors[0], errors[0]
    return errors[0]


def no_leftovers(folder):
    return not [f for f in folder.iterdir() if ".partial-" in f.name or ".edgesdk-work-" in f.name]


def test_missing_source(tmp_path):
    p = run_cli("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out"))
    one_line_error(p, "does not exist")
    assert not (tmp_path / "out").exists()


def test_unknown_source_file(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("hello")
    one_line_error(run_cli("export", str(f), "-o", str(tmp_path / "out")), "neither a model folder nor a .gguf")


def test_unsupported_architecture(tmp_path, tiny):
    folder = tmp_path / "gpt2"
    shutil.copytree(tiny.model("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["GPT2LMHeadModel"], "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    one_line_error(run_cli("export", str(folder), "-o", str(tmp_path / "out")), "GPT2LMHeadModel", "Qwen3", "Gemma 2")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gguf(tmp_path, damage):
    bad = tmp_path / "model.gguf"
    if damage == "truncated":
        with open(smollm2_gguf(), "rb") as f:
            bad.write_bytes(f.read(5_000_000))
    else:
        bad.write_bytes(b"GGUF" + os.urandom(4096))
    out = tmp_path / "out"
    one_line_error(run_cli("export", str(bad), "-o", str(out)), "not a readable GGUF")
    assert not out.exists() and no_leftovers(tmp_path)


def test_unknown_precision(tiny, tmp_path):
    one_line_error(run_cli("export", str(tiny.model("llama")), "--precision", "int3", "-o", str(tmp_path / "o")),
                   "unknown precision 'int3'", "int4")


def test_output_exists_refused_then_forced(tiny, tmp_path):
    """--force replaces an edgesdk artifact, never a folder holding what edgesdk did not write."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out)), "--force")
    one_line_error(run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out), "--force"),
                   "not an edgesdk artifact", "choose another -o")
    assert [f.name for f in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty folder may be replaced
    p = run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out), "--force", "-q")
    assert p.returncode == 0, p.stderr
    assert (out / "edgesdk.json").exists()
    assert p.stderr == ""  # --quiet
    p = run_cli("export", str(tiny.model("llama")), "--precision", "int8", "-o", str(out), "--force", "-q")
    assert p.returncode == 0, p.stderr  # an artifact may be replaced by a new one
    assert json.loads((out / "edgesdk.json").read_text())["precision"] == "int8"
    assert no_leftovers(tmp_path)


@pytest.mark.slow
def test_interrupted_export_leaves_nothing(tmp_path):
    out = tmp_path / "smol"
    # SIGINT back to its default in the child: a test run started in the background (`cmd &` in a
    # script) ignores SIGINT, and Python then never installs its KeyboardInterrupt handler
    proc = subprocess.Popen([sys.executable, "-m", "edgesdk", "export", str(smollm2_gguf()), "-o", str(out)],
                            stderr=subprocess.DEVNULL, cwd=ROOT, env={**os.environ, **NO_EXPORT_CACHE},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # interrupt once the export is writing: its work folder beside the output holds files
    deadline = time.monotonic() + 300
    while not any(f.is_file() for d in tmp_path.glob(".edgesdk-work-*") for f in d.rglob("*")):
        assert proc.poll() is None and time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    assert not out.exists() and no_leftovers(tmp_path)


@pytest.fixture()
def artifact_copy(tiny, tmp_path):
    dst = tmp_path / "art"
    shutil.copytree(tiny.export("llama", "fp32"), dst)
    return dst


def test_tampered_file_fails_checksum(artifact_copy):
    tok = artifact_copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    i = data.index(b'"<|im_end|>"')
    data[i + 3] = ord("X")  # same size, different content
    tok.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="tokenizer.json fails its sha256"):
        edgesdk.load(artifact_copy)
    one_line_error(run_cli("run", str(artifact_copy), "hi"), "sha256")
    one_line_error(run_cli("info", str(artifact_copy)), "sha256")


def test_truncated_model_onnx(artifact_copy):
    model = artifact_copy / "model.onnx"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[:1000])
    one_line_error(run_cli("run", str(artifact_copy), "hi"), "model.onnx", "truncated")
    model.write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))  # same size: only onnxruntime notices
    with pytest.raises(ArtifactError, match="cannot load .*model.onnx.*corrupt"):
        edgesdk.load(artifact_copy, verify=False)


def test_missing_file_and_not_an_artifact(artifact_copy, tmp_path):
    (artifact_copy / "model.onnx.data").unlink()
    one_line_error(run_cli("run", str(artifact_copy), "hi"), "model.onnx.data is missing")
    one_line_error(run_cli("run", str(tmp_path / "none"), "hi"), "no artifact")
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("info", str(tmp_path / "empty")), "not an edgesdk artifact")


def test_prompt_longer_than_context(tiny):
    p = run_cli("run", str(tiny.export("llama", "fp32")), "word " * 300)
    one_line_error(p, "context holds 256")


@pytest.mark.parametrize("args,needle", [(["--temperature", "-1"], "temperature"), (["--top-p", "0"], "top_p"),
                                         (["--top-p", "1.5"], "top_p"), (["--max-new-tokens", "0"], "max_new_tokens")])
def test_invalid_sampling_cli(tiny, args, needle):
    one_line_error(run_cli("run", str(tiny.export("llama", "fp32")), "hi", *args), needle)


def test_api_errors_are_edgesdk_errors(tiny):
    with pytest.raises(EdgeSDKError):
        edgesdk.export("/definitely/not/here", out="/tmp/x-edgesdk-never")
    assert not os.path.exists("/tmp/x-edgesdk-never")


def test_hub_id_offline(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    p = run_cli("export", "HuggingFaceTB/SmolLM2-135M-Instruct", "-o", str(tmp_path / "out"), env=env)
    one_line_error(p, "HuggingFaceTB/SmolLM2-135M-Instruct", "unreachable")
    assert not (tmp_path / "out").exists()
