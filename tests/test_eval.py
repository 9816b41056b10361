"""`edgesdk eval` (and `export --eval-text`) on tiny models, as subprocesses; bad inputs; and a
small INT4-vs-FP32 bound on the real SmolLM2 model."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, run_cli

TEXT = ROOT / "benchmarks" / "data" / "persuasion-ch1-7.txt"


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """About 600 tokens of real prose (more than the tiny models' 256-token context)."""
    p = tmp_path_factory.mktemp("eval") / "text.txt"
    p.write_text(TEXT.read_text()[:2800])
    return p


def eval_json(*args):
    p = run_cli("eval", *args, "--json", "-")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_perplexity_matches_transformers_on_the_same_windows(tiny, text):
    """The CLI's perplexity equals one computed independently with transformers on the same ids/windows."""
    import torch
    from transformers import AutoModelForCausalLM

    from edgesdk.evaluate import spans
    from edgesdk.runtime.tokenizer import Tokenizer

    art = tiny.export("llama", "fp32")
    r = eval_json(str(art), "--text", str(text), "--window", "128", "--stride", "48")
    ids = Tokenizer(art).encode(text.read_text())
    assert r["text_tokens"] == len(ids) > 500
    assert r["scored_tokens"] == len(ids) - 1 and r["window"] == 128 and r["stride"] == 48

    hf = AutoModelForCausalLM.from_pretrained(tiny.model("llama")).eval()
    nll, n = 0.0, 0
    for begin, end, first in spans(len(ids), 128, 48):
        with torch.no_grad():
            logits = hf(torch.tensor([ids[begin:end]])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        for t in range(first, end):
            nll -= lp[t - 1 - begin, ids[t]].item()
            n += 1
    assert n == r["scored_tokens"]
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert r["perplexity"] > 1000  # a random model: far from a trained one


def test_spans_score_every_token_once():
    from edgesdk.evaluate import spans

    for n, w, s in [(10, 4, 2), (11, 4, 3), (100, 32, 7), (5, 5, 1), (1000, 1024 // 4, 128), (9, 2, 1)]:
        scored = [t for _, end, first in spans(n, w, s) for t in range(first, end)]
        assert scored == list(range(1, n))
        assert all(end - begin <= w for begin, end, _ in spans(n, w, s))


def test_eval_against_itself_and_against_fp32(tiny, text):
    fp32, int4 = tiny.export("llama", "fp32"), tiny.export("llama", "int4")
    same = eval_json(str(fp32), "--text", str(text), "--baseline", str(fp32))
    b = same["baseline"]
    assert b["top1_agreement"] == 1.0 and abs(b["kl_mean"]) < 1e-9 and abs(b["relative_increase"]) < 1e-12
    assert same["window"] == 256 and same["stride"] == 128  # the tiny model's whole context

    q = eval_json(str(int4), "--text", str(text), "--baseline", str(fp32))
    b = q["baseline"]
    assert b["perplexity"] == pytest.approx(same["perplexity"], rel=1e-9)
    assert q["precision"] == "int4" and b["precision"] == "fp32"
    assert b["relative_increase"] == pytest.approx(q["perplexity"] / b["perplexity"] - 1)
    assert 0 < b["kl_mean"] < 5 and 0 < b["top1_agreement"] < 1  # int4 of a random model: visibly different

    p = run_cli("eval", str(int4), "--text", str(text), "--baseline", str(fp32))
    assert p.returncode == 0, p.stderr
    for needle in ("perplexity increase", "top-1 agreement", "mean KL divergence", f"{b['top1_agreement'] * 100:.2f}%"):
        assert needle in p.stdout


@pytest.fixture(scope="module")
def other_tokenizer_artifact(tiny, tmp_path_factory):
    """The tiny llama with two vocabulary ids swapped in its tokenizer, exported."""
    import edgesdk

    root = tmp_path_factory.mktemp("othertok")
    hf = root / "hf"
    shutil.copytree(tiny.model("llama"), hf)
    tj = json.loads((hf / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    vocab["the"], vocab["and"] = vocab["and"], vocab["the"]
    (hf / "tokenizer.json").write_text(json.dumps(tj))
    return edgesdk.export(hf, "cpu", root / "onnx", precision="fp32", quiet=True)


def test_bad_inputs(tiny, text, tmp_path, other_tokenizer_artifact):
    art = str(tiny.export("llama", "fp32"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged.")

    assert_one_line_error(run_cli("eval", art, "--text", str(empty)), "is empty")
    assert_one_line_error(run_cli("eval", art, "--text", str(tmp_path / "nope.txt")), "does not exist")
    assert_one_line_error(run_cli("eval", art, "--text", str(short)), "fewer than the window of 256")
    assert_one_line_error(run_cli("eval", art, "--text", str(short), "--window", "64"), "fewer than the window of 64")
    assert_one_line_error(run_cli("eval", art, "--text", str(text), "--baseline", str(tmp_path / "missing")),
                          "baseline artifact", "does not exist")
    assert_one_line_error(run_cli("eval", art, "--text", str(text), "--baseline", str(other_tokenizer_artifact)),
                          "different tokenizers", "4 vocabulary entries differ")
    assert_one_line_error(run_cli("eval", art, "--text", str(text), "--window", "512"), "larger than the model's context")
    assert_one_line_error(run_cli("eval", art, "--text", str(text), "--window", "64", "--stride", "64"), "--stride 64")
    assert_one_line_error(run_cli("eval", str(tmp_path / "noart"), "--text", str(text)), "no artifact at")
    p = run_cli("eval", art)
    assert p.returncode == 2 and "--text" in p.stderr


def test_export_eval_text_prints_the_delta_against_fp32(tiny, text, tmp_path):
    out = tmp_path / "int8"
    p = run_cli("export", str(tiny.model("llama")), "--precision", "int8", "-o", str(out), "-q", "--eval-text", str(text))
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert lines[0] == str(out)
    assert "int8 perplexity" in p.stdout and "vs FP32" in p.stdout and "top-1 agreement" in p.stdout
    assert not list(tmp_path.glob(".edgesdk-fp32-ref-*")), "the temporary FP32 reference must be removed"

    ref = eval_json(str(out), "--text", str(text), "--baseline", str(tiny.export("llama", "fp32")))
    assert f"{ref['baseline']['relative_increase'] * 100:+.2f}%" in p.stdout


def test_export_eval_text_refuses_a_bad_text_before_exporting(tiny, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    out = tmp_path / "never"
    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "-o", str(out), "--eval-text", str(empty)),
                          "is empty")
    assert not out.exists()


@pytest.fixture(scope="module")
def smollm2_int4_quality(real):
    """Default INT4 vs FP32 SmolLM2 on 2,048 tokens of Persuasion (benchmarks/quality.py does 20k)."""
    from edgesdk.evaluate import evaluate

    r = evaluate(real.export("int4"), TEXT, baseline=real.export("fp32"), window=512, stride=480, max_tokens=2048)
    assert r.scored_tokens == 2047
    return r.baseline


@pytest.mark.slow
def test_smollm2_int4_meets_the_8_percent_target(smollm2_int4_quality):
    """Issue 5's target: the default INT4 at most 8% above FP32. The default carries the GGUF's
    own Q4_1/Q8_0 blocks into the graph (measured +0.4% on 4k tokens, +0.6% with 20k in
    docs/bench-eval.md); the builder's RTN re-quantization measured ~+40% here."""
    b = smollm2_int4_quality
    assert 5 < b["perplexity"] < 100  # the FP32 export on real prose
    assert -0.02 < b["relative_increase"] <= 0.08
    assert b["top1_agreement"] > 0.85 and 0 < b["kl_mean"] < 0.05
