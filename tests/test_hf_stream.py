"""INT4 from a Hugging Face folder, one weight at a time (edgesdk.exporters.hf_stream).

Real safetensors folders (the tiny random models saved as BF16/FP16, and a wider FP16 llama of
~340 MB), real exports through both paths and ONNX Runtime sessions. The reference is the old
path: transformers loads the model and the builder quantizes it (forced by turning the hook off).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgesdk
import edgesdk.exporters as exporters
from conftest import ROOT

PROMPT = "The capital of France is"


def _half(tiny, arch: str, dtype: str) -> Path:
    """The tiny model ``arch`` saved again with its weights in ``dtype`` (bfloat16 / float16)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    src = tiny.model(arch)
    out = tiny.root / f"hf-{arch}-{dtype}"
    if not out.exists():
        AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype)).save_pretrained(out)
        for f in src.iterdir():
            if not (out / f.name).exists():
                shutil.copy(f, out / f.name)
    return out


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(folder / "model.onnx"))
    return {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}


@pytest.mark.parametrize("arch,dtype", [("llama", "bfloat16"), ("qwen2", "float16"), ("mistral", "bfloat16")])
def test_streamed_matches_old_path(tiny, arch, dtype, tmp_path, monkeypatch):
    """Same quantizer, same settings: the same bytes, tokens and logits as the builder's own
    INT4 pass; tied embeddings (llama, qwen2) share lm_head's bytes, an untied one (mistral)
    stays float as the builder keeps it."""
    monkeypatch.setenv("EDGESDK_EXPORT_CACHE", "")  # both paths have the same cache key
    src = _half(tiny, arch, dtype)
    new = edgesdk.export(src, "cpu", tmp_path / "new", precision="int4", quiet=True)
    monkeypatch.setattr(exporters, "_stream_hf", lambda *a, **k: None)
    old = edgesdk.export(src, "cpu", tmp_path / "old", precision="int4", quiet=True)

    quant = edgesdk.load(new).manifest["quantization"]
    tag = {"bfloat16": "BF16", "float16": "F16"}[dtype]
    tied = arch != "mistral"
    assert quant["streamed"] == {"from": "safetensors", "matmulnbits": 11,
                                 "source_dtypes": {tag: 15 if tied else 16},
                                 "embedding": "GatherBlockQuantized 4-bit, shared with lm_head" if tied
                                 else "Gather float32"}
    assert "streamed" not in edgesdk.load(old).manifest["quantization"]

    a, b = _initializers(old), _initializers(new)
    assert len([n for n in b if n.endswith(("_Q4", "_scales"))]) == 22
    assert set(a) - set(b) == set()  # (the tied Reshape's shape is an initializer here, a Constant there)
    for name in a:  # packed weights, scales, norms, biases, rotary caches, a float embedding
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name]), name

    m_old, m_new = edgesdk.load(old), edgesdk.load(new)
    r_old, r_new = m_old.generate(PROMPT, max_new_tokens=32), m_new.generate(PROMPT, max_new_tokens=32)
    assert r_new.token_ids == r_old.token_ids and len(r_new.token_ids) == 32
    assert len(set(r_new.token_ids)) > 8, "the tiny model should not be degenerate"
    ids = m_old.tokenizer.encode(PROMPT + " Paris, and the capital of Italy is Rome.")
    m_old.decoder.rewind(0)
    lo = np.array(m_old.decoder.forward(ids))
    m_new.decoder.rewind(0)
    ln = np.array(m_new.decoder.forward(ids))
    # a wrong weight, row order or embedding moves the logits by their own scale
    assert np.abs(ln - lo).max() <= 1e-4 * np.abs(lo).max(), np.abs(ln - lo).max()


def test_unstreamable_falls_back_in_one_line(tiny, tmp_path, monkeypatch, capsys):
    """An architecture the streaming path does not map (Phi-3: fused q|k|v and gate|up in the
    checkpoint) takes the old path, with one line saying why."""
    monkeypatch.setenv("EDGESDK_EXPORT_CACHE", "")
    out = edgesdk.export(tiny.model("phi3"), "cpu", tmp_path / "phi3", precision="int4")
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "cannot stream" in line]
    assert len(notes) == 1 and "Phi3ForCausalLM" in notes[0] and "loading it through transformers" in notes[0], err
    model = edgesdk.load(out)
    assert "streamed" not in model.manifest["quantization"]
    assert len(model.generate(PROMPT, max_new_tokens=4).token_ids) == 4


def _wide_fp16(root: Path, tokenizer_dir: Path) -> Path:
    """A random tied llama with 172M parameters in FP16 safetensors (344 MB)."""
    import shutil

    import torch
    import transformers as tf
    from safetensors.numpy import save_file

    out = root / "hf-wide-fp16"
    if out.exists():
        return out
    cfg = tf.LlamaConfig(vocab_size=49152, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True, dtype="float16")
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        shapes = {k: tuple(p.shape) for k, p in tf.LlamaForCausalLM(cfg).state_dict().items() if k != "lm_head.weight"}
    rng = np.random.default_rng(0)
    tensors = {k: np.ones(s, np.float16) if len(s) == 1 else
               (rng.standard_normal(s, np.float32) * 0.05).astype(np.float16) for k, s in shapes.items()}
    out.mkdir()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def test_export_peak_rss(tiny, tmp_path):
    """Peak RSS of a whole export in a fresh process, against the artifact's size.

    Measured here (this 344 MB FP16 model, 108 MB artifact, imports alone ~440 MB): the old path
    peaked at 1,851 MB (13x the artifact above the imports); the streamed export at ~120 MB above
    the imports (1.1x the artifact). Its last step, loading the artifact in ONNX Runtime to check
    it (the weights and their prepacked copy, ~2x the artifact), runs in a child process of its
    own, so the export's peak does not carry it."""
    src = _wide_fp16(tiny.root, tiny.tokenizer_dir)
    out = tmp_path / "wide"
    code = ("import resource, sys, edgesdk, edgesdk.exporters as ex\n"
            "check = ex._smoke_test\n"
            "def observed(folder):\n"
            "    print('before-check', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
            "    check(folder)\n"
            "ex._smoke_test = observed\n"
            "edgesdk.export(sys.argv[1], 'cpu', sys.argv[2], precision='int4', quiet=True)\n"
            "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    env = dict(os.environ, EDGESDK_EXPORT_CACHE="")
    # Linux carries a process's peak RSS over fork and exec: a process started from this (big)
    # one would start from its peak. Each measured process is started by a small one.
    fresh = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)",
             sys.executable, "-c"]
    p = subprocess.run([*fresh, code, str(src), str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    kb = dict(line.split() for line in p.stdout.splitlines() if line.startswith(("before-check", "peak")))
    before_check, peak = int(kb["before-check"]) * 1024, int(kb["peak"]) * 1024
    base = subprocess.run([*fresh, "import resource, edgesdk.exporters.hf_stream, torch, transformers, "
                           "onnxruntime, onnxruntime_genai.models.builder; "
                           "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    baseline = int(base.stdout) * 1024
    size = sum(f.stat().st_size for f in out.glob("model.onnx*"))
    print(f"artifact {size / 1e6:.0f} MB; imports {baseline / 1e6:.0f} MB; peak before the load check "
          f"{before_check / 1e6:.0f} MB, whole export {peak / 1e6:.0f} MB")
    quant = json.loads((out / "edgesdk.json").read_text())["quantization"]
    assert quant["streamed"]["source_dtypes"] == {"F16": 57}
    assert before_check <= baseline + 2 * size, (before_check, baseline, size)
    assert peak <= baseline + 2 * size, (peak, baseline, size)  # the old path: baseline + 13x


def test_truncated_safetensors_is_one_line_error(tiny, tmp_path):
    """A cut-off weights file is the source's fault: one line, before any graph is built, and
    nothing written."""
    import shutil

    from conftest import assert_one_line_error, run_cli

    src = tmp_path / "cut"
    shutil.copytree(_half(tiny, "llama", "bfloat16"), src)
    weights = src / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 1000)
    p = run_cli("export", str(src), "-o", str(tmp_path / "out"), "-q", env={"EDGESDK_EXPORT_CACHE": ""})
    assert_one_line_error(p, "model.safetensors is truncated")
    assert not (tmp_path / "out").exists()
