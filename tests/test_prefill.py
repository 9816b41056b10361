"""Prefill that computes only the logits it reads (issue 12): the num_logits_to_keep graph input
(exporters/logits.py), Decoder.forward(ids, keep=...), chunked prefill, bounded logits buffers."""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest

import edgesdk
from edgesdk.exporters import logits as keep_rewrite
from edgesdk.runtime.decoder import MAX_KEPT_ROWS, Decoder

PROMPT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
          "The quick brown fox jumps over the lazy dog. " * 3)


@pytest.fixture(scope="module")
def llama(tiny):
    return edgesdk.load(tiny.export("llama", "fp32"))


def _decoder(model, keep=True, chunk=512):
    """A fresh Decoder over ``model``'s session: with the keep input, or as an older artifact."""
    return Decoder(model.session, model.artifact.genai_config, model.max_length,
                   logits_to_keep=keep_rewrite.INPUT if keep else None, prefill_chunk=chunk)


@pytest.mark.parametrize("arch,precision", [("llama", "fp32"), ("qwen2", "int4"), ("gemma2", "fp32")])
def test_graph_keeps_last_rows(tiny, arch, precision):
    """The exported graph has an overridable num_logits_to_keep: not fed, every position's logits;
    fed n, exactly the last n rows of those (MatMul and MatMulNBits lm_heads, Gemma's softcap)."""
    path = tiny.export(arch, precision)
    manifest = json.loads((path / "edgesdk.json").read_text())
    assert manifest["model"]["logits_to_keep_input"] == keep_rewrite.INPUT
    s = ort.InferenceSession(str(path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in s.get_overridable_initializers()] == [keep_rewrite.INPUT]  # not constant-folded
    model = edgesdk.load(path)
    ids = model.tokenizer.encode(PROMPT)[:20]
    unfed = _decoder(model, keep=False)  # never binds the input: the graph's default
    full = unfed.forward(ids).copy()
    assert full.shape == (len(ids), model.decoder.vocab_size)
    dec = _decoder(model)
    for n in (1, 5, len(ids), len(ids) + 7):  # 1: a prefill; 5: verifying 4 drafts; more than the input: all
        dec.rewind(0)
        part = dec.forward(ids, keep=n)
        assert part.shape == (min(n, len(ids)), full.shape[-1])
        np.testing.assert_allclose(part, full[-part.shape[0]:], rtol=1e-5, atol=1e-5)
    # the graph itself computed only those rows (not cut afterwards): its logits output has n rows
    feeds = {"input_ids": np.asarray(ids, np.int64)[None], "attention_mask": np.ones((1, len(ids)), np.int64)}
    if arch == "llama":
        cfg = model.artifact.genai_config["model"]["decoder"]
        for i in s.get_inputs():
            if i.name.startswith("past_key_values"):
                feeds[i.name] = np.zeros((1, cfg["num_key_value_heads"], 0, cfg["head_size"]), np.float32)
        assert s.run(["logits"], feeds)[0].shape[1] == len(ids)
        got = s.run(["logits"], {**feeds, keep_rewrite.INPUT: np.array([3], np.int64)})[0]
        assert got.shape == (1, 3, full.shape[-1])
        np.testing.assert_allclose(got[0], full[-3:], rtol=1e-5, atol=1e-5)


def test_rewrite_is_graph_only_and_idempotent(tiny, tmp_path):
    import shutil

    import onnx

    src = tiny.export("llama", "fp32")
    for f in ("model.onnx", "model.onnx.data", "genai_config.json"):
        shutil.copy(src / f, tmp_path / f)
    data = (tmp_path / "model.onnx.data").read_bytes()
    assert keep_rewrite.add_keep_input(tmp_path) == {"logits_to_keep_input": keep_rewrite.INPUT}  # already there
    m = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    assert sum(n.op_type == "Slice" and n.name.startswith("/lm_head/keep") for n in m.graph.node) == 1
    assert (tmp_path / "model.onnx.data").read_bytes() == data
    # a graph whose logits do not come from an lm_head is left alone
    m.graph.node.remove(next(n for n in m.graph.node if n.name.startswith("/lm_head/MatMul")))
    m.graph.node.append(onnx.helper.make_node("Relu", ["/lm_head/keep/Slice/output_0"], ["logits"], name="x"))
    m.graph.input.remove(next(i for i in m.graph.input if i.name == keep_rewrite.INPUT))
    with pytest.raises(keep_rewrite.NotApplicable):
        keep_rewrite.rewrite(m)


def test_genai_runs_the_rewritten_graph(llama):
    """onnxruntime-genai never feeds num_logits_to_keep: it gets every row and decodes as before."""
    og = pytest.importorskip("onnxruntime_genai")
    ids = llama.encode_prompt(PROMPT)
    ours = llama.generate(tokens=ids, max_new_tokens=12).token_ids
    m = og.Model(str(llama.path))
    params = og.GeneratorParams(m)
    params.set_search_options(max_length=len(ids) + 12, do_sample=False)
    g = og.Generator(m, params)
    g.append_tokens(ids)
    theirs = []
    while not g.is_done() and len(theirs) < len(ours):
        g.generate_next_token()
        theirs.append(int(g.get_next_tokens()[0]))
    assert theirs == ours


def test_forward_keep(llama):
    ids = llama.encode_prompt(PROMPT)
    dec = _decoder(llama)
    assert dec.keep_name == keep_rewrite.INPUT
    full = dec.forward(ids).copy()
    assert full.shape == (len(ids), dec.vocab_size)
    for keep in (1, 4, len(ids), len(ids) + 3):
        dec.rewind(0)
        got = dec.forward(ids, keep=keep)
        assert got.shape == (min(keep, len(ids)), dec.vocab_size) and dec.length == len(ids)
        np.testing.assert_allclose(got, full[-got.shape[0]:], rtol=1e-5, atol=1e-5)
    # an artifact without the input (older exports): the same rows, cut after the run
    old = _decoder(llama, keep=False)
    assert old.keep_name is None
    np.testing.assert_allclose(old.forward(ids, keep=4), full[-4:], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="keep=0"):
        dec.forward(ids[:2], keep=0)


@pytest.mark.parametrize("keep_input", [True, False])
def test_chunked_prefill_equals_one_shot(llama, keep_input):
    ids = llama.encode_prompt(PROMPT)
    assert len(ids) > 40
    one = _decoder(llama, chunk=4096)
    ref = one.forward(ids).copy()
    # kept rows within the last chunk, spanning two chunks, more than a chunk, a chunk almost the input
    for chunk, keep in ((7, 1), (16, 3), (10, len(ids) % 10 + 1), (5, 9), (len(ids) - 1, 1)):
        dec = _decoder(llama, keep=keep_input, chunk=chunk)
        got = dec.forward(ids, keep=keep)
        assert dec.length == len(ids)
        np.testing.assert_allclose(got, ref[-keep:], rtol=1e-4, atol=1e-4)
        for layer in (0, 1):  # the caches hold the same keys and values; positions continued
            np.testing.assert_allclose(dec.cache.keys[layer].numpy()[0, :, :len(ids)],
                                       one.cache.keys[layer].numpy()[0, :, :len(ids)], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(dec.cache.values[layer].numpy()[0, :, :len(ids)],
                                       one.cache.values[layer].numpy()[0, :, :len(ids)], rtol=1e-4, atol=1e-4)
        # and decoding continues identically
        nxt = int(np.argmax(ref[-1]))
        one_step = _decoder(llama, chunk=4096)
        one_step.forward(ids, keep=1)
        np.testing.assert_allclose(dec.forward([nxt], keep=1), one_step.forward([nxt], keep=1), rtol=1e-4, atol=1e-4)


def test_greedy_generation_unchanged(tiny):
    """Plain greedy output with the new prefill (keep=1, chunked) equals the old full-logits path."""
    model = edgesdk.load(tiny.export("llama", "fp32"))
    new = model.generate(PROMPT, max_new_tokens=32)
    model.decoder = _decoder(model, chunk=8)  # many chunks
    chunked = model.generate(PROMPT, max_new_tokens=32)
    model.decoder = _decoder(model, keep=False)  # the graph computes every row, as before
    old = model.generate(PROMPT, max_new_tokens=32)
    assert new.token_ids == chunked.token_ids == old.token_ids
    assert len(new.token_ids) == 32


@pytest.mark.parametrize("draft", ["model", "prompt-lookup"])
def test_speculative_output_unchanged(tiny, draft):
    path = tiny.export("llama", "fp32")
    plain = edgesdk.load(path).generate(PROMPT, max_new_tokens=32)
    model = edgesdk.load(path, draft=path if draft == "model" else "prompt-lookup")
    for k in (None, 3):
        r = model.generate(PROMPT, max_new_tokens=32, num_draft_tokens=k)
        assert r.token_ids == plain.token_ids
        # (a random tiny model's output never repeats its prompt: prompt lookup proposes nothing)
        assert r.speculative["proposed"] > 0 or draft == "prompt-lookup"
    if draft == "model":  # verification kept k + 1 rows (k <= 8) in the one reusable buffer
        assert 1 < model.decoder._rows.shape[1] <= 9


def test_logits_buffers_bounded(llama):
    """After prompts of many lengths, verifies and steps, the decoder holds one buffer sized for
    the largest kept count; full-logits outputs (eval) are not kept."""
    dec = _decoder(llama, chunk=32)
    ids = llama.encode_prompt(PROMPT * 3)
    for n in range(1, min(len(ids), 120), 7):
        dec.rewind(0)
        dec.forward(ids[:n], keep=1)  # a prefill
        dec.forward(ids[n:n + 5], keep=5)  # a verify of 4 drafts
        dec.forward([7], keep=1)  # a step
    dec.rewind(0)
    dec.forward(ids[:100])  # every row (perplexity): a transient buffer
    assert dec._rows.shape[1] == 5
    assert dec._rows.nbytes <= 5 * dec.vocab_size * 4
    assert set(dec._views) <= set(range(1, 6))
    dec.rewind(0)
    big = dec.forward(ids[:MAX_KEPT_ROWS + 1])
    assert big.shape[0] == MAX_KEPT_ROWS + 1 and dec._rows.shape[1] == 5


def test_draft_vocab_export_keeps_both(tiny, tmp_path):
    """--draft-vocab restricts the lm_head and the prefill still keeps only the rows it reads."""
    text = tmp_path / "text.txt"
    text.write_text(PROMPT)
    art = tmp_path / "restricted"
    edgesdk.export(tiny.model("llama"), "cpu", art, precision="fp32", quiet=True, draft_vocab=300,
                   vocab_texts=[text])
    manifest = json.loads((art / "edgesdk.json").read_text())
    assert manifest["model"]["lm_head_tokens"]["count"] == 300
    assert manifest["model"]["logits_to_keep_input"] == keep_rewrite.INPUT
    draft = edgesdk.load(art)
    full = edgesdk.load(tiny.export("llama", "fp32"))
    ids = full.encode_prompt(PROMPT)
    ref = full.decoder.forward(ids)
    got = draft.decoder.forward(ids, keep=2)
    assert got.shape == (2, 300)
    np.testing.assert_allclose(got, ref[-2:, draft.lm_head_tokens], rtol=1e-5, atol=1e-5)
    # and it still drafts: output equals the target's plain greedy output
    target = edgesdk.load(tiny.export("llama", "fp32"), draft=draft)
    assert target.generate(PROMPT, max_new_tokens=24, num_draft_tokens=3).token_ids == \
        full.generate(PROMPT, max_new_tokens=24).token_ids
