"""Phi-3 GGUFs with LongRoPE (Phi-3-mini-128k, Phi-3.5-mini, Phi-4-mini): the context, original
context, rope dimension, attention factor and rope_factors_long/short tensors llama.cpp's
converter writes become the builder's LongRoPE config (edgesdk.exporters.gguf_stream.gguf_rope).

Which factors apply: transformers (Phi3RotaryEmbedding's longrope update) takes the long ones
when max(position_ids) + 1 > original context, for every position of that forward; the builder's
graph takes them when the attention mask's length (cached + new tokens) > original context (an
If over two cos/sin caches). For one forward over a whole sequence the two choose alike, which is
what is compared here, on both sides of the switch. They part in incremental decoding across the
switch: the graph's cached keys keep their short-factor rotation while transformers' generate()
drops its cache and recomputes every position with the long factors (llama.cpp picks by the
context size it was started with, not by the sequence).
"""
from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import edgesdk  # noqa: E402
from conftest import NO_EXPORT_CACHE, ROOT  # noqa: E402
from test_gguf_stream import HEADS, HIDDEN, KV_HEADS, TYPES, Q, write_tiny_gguf  # noqa: E402

CONTEXT, ORIGINAL = 64, 16


@pytest.fixture(scope="module")
def exact_profile(tmp_path_factory):
    text = (ROOT / "edgesdk" / "targets" / "profiles" / "cpu.yaml").read_text()
    path = tmp_path_factory.mktemp("profile") / "cpu-exact.yaml"
    path.write_text(text.replace("name: cpu", "name: cpu-exact").replace("accuracy_level: 4, algorithm", "accuracy_level: 0, algorithm"))
    return path


def _rope(dims: int, seed: int, **extra) -> dict:
    rng = np.random.default_rng(seed)
    return {"context": CONTEXT, "original": ORIGINAL, "dims": dims,
            "short": rng.uniform(1.0, 1.5, dims // 2).tolist(), "long": rng.uniform(2.0, 8.0, dims // 2).tolist(), **extra}


def _reference(path, rope: dict, ids: list[int]) -> np.ndarray:
    """transformers' Phi3ForCausalLM with the GGUF's (dequantized) weights and a LongRoPE config
    written here from ``rope`` (not from the code under test)."""
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    c = loaded.config
    scaling = {"type": "longrope", "long_factor": [float(np.float32(x)) for x in rope["long"]],
               "short_factor": [float(np.float32(x)) for x in rope["short"]]}
    if "attn_factor" in rope:
        scaling["attention_factor"] = float(np.float32(rope["attn_factor"]))
    config = Phi3Config(vocab_size=c.vocab_size, hidden_size=HIDDEN, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                        max_position_embeddings=CONTEXT, original_max_position_embeddings=ORIGINAL, rope_scaling=scaling,
                        partial_rotary_factor=rope["dims"] / (HIDDEN // HEADS), rms_norm_eps=1e-5, rope_theta=10000.0,
                        tie_word_embeddings=False, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
                        eos_token_id=c.eos_token_id)
    m = Phi3ForCausalLM(config).eval()
    missing, unexpected = m.load_state_dict(loaded.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("case", ["full", "partial"])
def test_longrope_phi3_gguf_matches_transformers(case, tmp_path, exact_profile, monkeypatch):
    """full: rope over the whole head, the attention factor llama.cpp computes (the default);
    partial: Phi-4-mini's kind (rope over half the head) with an attention factor of its own."""
    for k, v in NO_EXPORT_CACHE.items():
        monkeypatch.setenv(k, v)
    head_dim = HIDDEN // HEADS
    if case == "full":
        rope = _rope(head_dim, 0, attn_factor=float(np.sqrt(1 + np.log(CONTEXT / ORIGINAL) / np.log(ORIGINAL))))
    else:
        rope = _rope(head_dim // 2, 1, attn_factor=1.1)
    symmetric = {k: (Q.Q8_0 if v in (Q.F16, Q.F32, Q.Q8_0, Q.Q4_1, Q.Q4_K, Q.Q5_1, Q.Q5_K, Q.Q6_K) else v)
                 for k, v in TYPES.items()}  # exact carries only: the logits differ by float rounding
    path = tmp_path / "long.gguf"
    write_tiny_gguf(path, seed=3, arch="phi3", types=symmetric, rope=rope)
    out = edgesdk.export(path, str(exact_profile), tmp_path / "art", quiet=True)
    model = edgesdk.load(out)
    blocks = model.manifest["quantization"]["gguf_blocks"]
    assert blocks["streamed"] and blocks["requantized"] == {}
    assert not any("rope_factors" in name for name in blocks["tensors"])  # settings, not weights
    rng = np.random.default_rng(0)
    for n in (ORIGINAL - 4, ORIGINAL, 3 * ORIGINAL):  # short factors; short (the last position); long
        ids = [int(i) for i in rng.integers(0, 257, n)]
        ref = _reference(path, rope, ids)
        model.decoder.rewind(0)
        ours = model.decoder.forward(ids)
        err = np.abs(ours - ref).max() / np.abs(ref).max()
        assert err < 1e-4, (n, err)  # measured 1.0-1.7e-6
    # the factors matter: the long-context logits with the short factors instead are far off (measured 1.1-1.3)
    wrong = _reference(path, dict(rope, long=rope["short"]), ids)
    assert np.abs(ours - wrong).max() > 100 * np.abs(ours - ref).max()


@pytest.mark.parametrize("bad, message", [
    ({"long": [1.0] * 5}, "rope_factors_long.weight has shape [5], not [32]"),
    ({"short": None}, "has rope_factors_long.weight but no rope_factors_short.weight"),
    ({"original": 128}, "the original context must be smaller"),
])
def test_inconsistent_longrope_gguf_one_line_error(bad, message, tmp_path, exact_profile, monkeypatch):
    from edgesdk.errors import SourceError

    for k, v in NO_EXPORT_CACHE.items():
        monkeypatch.setenv(k, v)
    rope = {k: v for k, v in {**_rope(HIDDEN // HEADS, 0), **bad}.items() if v is not None}
    path = tmp_path / "bad.gguf"
    write_tiny_gguf(path, arch="phi3", types={k: Q.Q8_0 for k in TYPES}, rope=rope)
    with pytest.raises(SourceError) as e:
        edgesdk.export(path, str(exact_profile), tmp_path / "art", quiet=True)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
