"""Speculative decoding (draft model and prompt lookup): greedy output is plain greedy output,
token for token; stopping rules inside an accepted run; sampled output follows the target's
distribution; tokenizer identity; bundles; CLI."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgesdk
from edgesdk.errors import InvalidArgumentError
from edgesdk.runtime import speculative as spec

PROMPT = "The quick brown fox jumps over the lazy dog because"


# -- fixtures -----------------------------------------------------------------------------------
def _variant(tiny, name: str, seed: int, noise: float | None = None, **changes):
    """A tiny llama with SmolLM2's tokenizer: another random model (``seed``, ``changes``) or
    the tiny target's weights plus Gaussian noise (``noise`` x each tensor's std)."""
    key = ("variant", name)
    if key in tiny.exports:
        return tiny.exports[key]
    import torch
    import transformers as tf

    from conftest import tiny_config

    out = tiny.root / f"hf-{name}"
    if noise is None:
        config, arch = tiny_config("llama")
        config.architectures = [arch]
        for k, v in changes.items():
            setattr(config, k, v)
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(config).eval()
    else:
        model = tf.LlamaForCausalLM.from_pretrained(tiny.model("llama")).eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim > 1:
                    p.add_(torch.randn(p.shape, generator=g) * p.std() * noise)
    model.save_pretrained(out)
    for f in tiny.tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    art = tiny.root / f"onnx-{name}"
    edgesdk.export(out, "cpu", art, precision="fp32", quiet=True)
    tiny.exports[key] = art
    return art


@pytest.fixture(scope="module")
def target_path(tiny):
    return tiny.export("llama", "fp32")


@pytest.fixture(scope="module")
def unrelated_path(tiny):
    return _variant(tiny, "draft-unrelated", seed=1, num_hidden_layers=1, intermediate_size=64)


@pytest.fixture(scope="module")
def noisy_path(tiny):
    return _variant(tiny, "draft-noisy", seed=2, noise=0.1)


@pytest.fixture(scope="module")
def restricted_path(tiny, tmp_path_factory):
    """The tiny target itself with its lm_head cut to 400 tokens, ranked by their counts in
    PROMPT and the first half of the target's own greedy output (so some of its tokens are kept)."""
    target = edgesdk.load(tiny.export("llama", "fp32"))
    ref = greedy(target, n=48)
    text = tmp_path_factory.mktemp("vocab") / "text.txt"
    text.write_text(PROMPT + target.tokenizer.decode(ref.token_ids[:24]))
    art = tiny.root / "onnx-restricted-400"
    if not art.exists():
        edgesdk.export(tiny.model("llama"), "cpu", art, precision="fp32", quiet=True, draft_vocab=400,
                       vocab_texts=[text])
    return art


@pytest.fixture(scope="module")
def plain(target_path):
    return edgesdk.load(target_path)


def greedy(model, n=40, **kw):
    return model.generate(PROMPT, max_new_tokens=n, **kw)


def check_caches(model, result):
    """Both KV caches hold a prefix of prompt + output, and _cached says which."""
    every = model.encode_prompt(PROMPT) + result.token_ids
    for m in (model, model.draft if isinstance(model.draft, edgesdk.Model) else None):
        if m is None:
            continue
        assert m.decoder.length <= len(every)
        assert m._cached == every[: m.decoder.length]


# -- greedy = plain greedy ------------------------------------------------------------------------
@pytest.mark.parametrize("k", [None, 1, 4, 7])
def test_self_draft_accepts_everything(target_path, plain, k):
    ref = greedy(plain)
    model = edgesdk.load(target_path, draft=target_path)
    out = greedy(model, num_draft_tokens=k)
    assert out.token_ids == ref.token_ids
    s = out.speculative
    assert s["method"] == "draft-model" and s["proposed"] > 0
    assert s["accepted"] == s["proposed"] and s["acceptance_rate"] == 1.0
    if k is not None:
        assert s["tokens_per_target_call"] > 1 + 0.8 * min(k, 4)
    check_caches(model, out)


def test_unrelated_draft_low_acceptance_same_output(plain, target_path, unrelated_path):
    ref = greedy(plain, n=48)
    model = edgesdk.load(target_path, draft=unrelated_path)
    fixed = greedy(model, n=48, num_draft_tokens=4)
    assert fixed.token_ids == ref.token_ids
    assert fixed.speculative["acceptance_rate"] < 0.3
    adaptive = greedy(model, n=48)
    assert adaptive.token_ids == ref.token_ids
    # adaptive k backs off: far fewer proposals than the fixed k=4 run
    assert adaptive.speculative["proposed"] < fixed.speculative["proposed"] / 2
    check_caches(model, adaptive)


def test_prompt_lookup_same_output(plain, target_path):
    ref = greedy(plain, n=48)
    model = edgesdk.load(target_path, draft="prompt-lookup")
    out = greedy(model, n=48)
    assert out.token_ids == ref.token_ids
    assert out.speculative["method"] == "prompt-lookup"


def test_prompt_lookup_copies():
    p = spec.PromptLookup()
    ctx = [5, 6, 7, 8, 9, 10, 1, 2, 6, 7, 8]
    assert p.propose(ctx, 3, None, set())[0] == [9, 10, 1]
    assert p.propose(ctx, 3, None, {10})[0] == [9, 10]  # stops at EOS
    assert p.propose([1, 2, 3, 4], 3, None, set())[0] == []  # no match
    # the longest match wins over a later, shorter one
    ctx = [1, 2, 3, 4, 50, 9, 3, 4, 60, 2, 3, 4]
    assert p.propose(ctx, 2, None, set())[0] == [50, 9]


# -- stopping rules inside an accepted run --------------------------------------------------------
def steps(model, **kw):
    stream = model.stream(PROMPT, **kw)
    chunks = list(stream)
    return chunks, stream.result


def test_eos_inside_accepted_run(target_path, plain):
    ref = greedy(plain, n=40).token_ids
    # with the target as its own draft and k=4 the steps are 1 | 4 drafts | 1 | 4 drafts | 1 ...
    # pick as "EOS" a token whose first occurrence is the 3rd of a draft run
    pos = next(i for i in range(len(ref)) if i % 5 == 3 and ref.index(ref[i]) == i)
    eos = {ref[pos]}
    model = edgesdk.load(target_path, draft=target_path)
    model.eos_token_ids = plain.eos_token_ids = eos
    try:
        want = greedy(plain, n=40)
        chunks, got = steps(model, max_new_tokens=40, num_draft_tokens=4)
    finally:
        plain.eos_token_ids = edgesdk.load(target_path).eos_token_ids
    assert got.token_ids == want.token_ids == ref[: pos + 1]
    assert got.finish_reason == want.finish_reason == "stop"
    assert chunks[-1].from_draft and chunks[-1].finish_reason == "stop"
    check_caches(model, got)
    # the caches are consistent: reusing them gives the plain output again
    model.eos_token_ids = set()
    again = model.generate(PROMPT, max_new_tokens=20, reuse_cache=True, num_draft_tokens=4)
    assert again.token_ids == ref[:20]


def test_stop_string_inside_accepted_run(target_path, plain):
    ref = greedy(plain, n=40)
    tok = plain.tokenizer
    for pos in range(6, 30):
        if pos % 5 not in (2, 3):
            continue
        text = tok.decode(ref.token_ids[: pos + 1])
        before = tok.decode(ref.token_ids[:pos])
        stop = text[len(before):].strip()[:3]
        if len(stop) >= 2 and text.find(stop) >= len(before) - 1 and text.find(stop) == text.rfind(stop):
            break
    else:
        pytest.skip("no usable stop string in this random model's output")
    want = plain.generate(PROMPT, max_new_tokens=40, stop=[stop])
    model = edgesdk.load(target_path, draft=target_path)
    chunks, got = steps(model, max_new_tokens=40, stop=[stop], num_draft_tokens=4)
    assert got.text == want.text and got.token_ids == want.token_ids
    assert got.finish_reason == "stop" and stop not in got.text
    assert "".join(c.text for c in chunks) == got.text
    check_caches(model, got)


@pytest.mark.parametrize("n", [3, 8, 9])
def test_max_new_tokens_inside_accepted_run(target_path, plain, n):
    want = greedy(plain, n=n)
    model = edgesdk.load(target_path, draft=target_path)
    chunks, got = steps(model, max_new_tokens=n, num_draft_tokens=4)
    assert got.token_ids == want.token_ids and len(got.token_ids) == n
    assert got.finish_reason == "length"
    assert sum(len(c.token_ids) for c in chunks) == n
    check_caches(model, got)


def test_context_limit_inside_accepted_run(target_path):
    n_prompt = len(edgesdk.load(target_path).encode_prompt(PROMPT))
    limit = n_prompt + 7  # room for 8 new tokens
    plain_small = edgesdk.load(target_path, max_length=limit)
    want = greedy(plain_small, n=40)
    model = edgesdk.load(target_path, draft=target_path, max_length=limit)
    for k in (None, 3, 4, 8):
        got = greedy(model, n=40, num_draft_tokens=k)
        assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "context"
        assert model.decoder.length <= limit
        check_caches(model, got)


def test_draft_with_shorter_context(target_path, plain):
    """A draft whose context is full falls back to plain steps."""
    n_prompt = len(plain.encode_prompt(PROMPT))
    ref = greedy(plain, n=30)
    draft = edgesdk.load(target_path, max_length=n_prompt + 10)
    model = edgesdk.load(target_path, draft=draft)
    got = greedy(model, n=30, num_draft_tokens=3)
    assert got.token_ids == ref.token_ids
    assert 0 < got.speculative["proposed"] < 30


def test_stream_chunks_say_where_tokens_came_from(target_path, plain):
    ref = greedy(plain, n=30)
    model = edgesdk.load(target_path, draft=target_path)
    chunks, got = steps(model, max_new_tokens=30, num_draft_tokens=4)
    assert [t for c in chunks for t in c.token_ids] == ref.token_ids
    assert any(c.from_draft for c in chunks) and any(not c.from_draft for c in chunks)
    assert all(len(c.token_ids) == 1 for c in chunks if not c.from_draft)
    assert all(c.speculative is not None for c in chunks)
    assert chunks[-1].speculative["accepted"] == got.speculative["accepted"]
    assert got.speculative["accepted"] == sum(len(c.token_ids) for c in chunks if c.from_draft)


def test_repetition_penalty_greedy(plain, target_path, noisy_path):
    want = greedy(plain, repetition_penalty=1.3)
    model = edgesdk.load(target_path, draft=noisy_path)
    got = greedy(model, repetition_penalty=1.3, num_draft_tokens=3)
    assert got.token_ids == want.token_ids


def test_reuse_cache_multi_turn(target_path, plain, noisy_path):
    model = edgesdk.load(target_path, draft=noisy_path)
    chat_plain, chat_spec = plain.chat(), model.chat()
    for text in ("Hello there", "Tell me more"):
        a = "".join(c.text for c in chat_plain.send(text, max_new_tokens=12))
        b = "".join(c.text for c in chat_spec.send(text, max_new_tokens=12))
        assert a == b
    assert chat_spec.last.prefilled_tokens < chat_spec.last.prompt_tokens


# -- sampling follows the target's distribution ---------------------------------------------------
def test_rejection_sampling_unit():
    """accept_sampled on synthetic distributions: the emitted token is distributed as p."""
    rng = np.random.default_rng(0)
    V = 6
    p = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    q = np.array([0.05, 0.1, 0.5, 0.05, 0.2, 0.1])
    n = 60000
    counts = np.zeros(V)
    for _ in range(n):
        d = int(rng.choice(V, p=q))
        k, extra = spec.accept_sampled([d], lambda i: p, [q], rng)
        counts[d if k == 1 else extra] += 1
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.01, tv
    # point-mass proposals (prompt lookup)
    counts[:] = 0
    for _ in range(n):
        k, extra = spec.accept_sampled([2], lambda i: p, None, rng)
        counts[2 if k == 1 else extra] += 1
    assert 0.5 * np.abs(counts / n - p).sum() < 0.01
    # a wrong rule (keep every draft) would be far off: the test has power
    assert 0.5 * np.abs(q - p).sum() > 0.3


def _exact_joint(model, ids, depth, temperature, top_k):
    """P(t0, t1, ...) of the target's sampling, by enumerating the top_k support."""
    from edgesdk.runtime.sampling import distribution

    probs = distribution(temperature, top_k)
    out = {}

    def walk(prefix, prob):
        model.decoder.rewind(0)
        p = probs(model.decoder.forward(ids + prefix)[-1])
        for t in np.flatnonzero(p > 0):
            if len(prefix) + 1 == depth:
                out[tuple(prefix + [int(t)])] = prob * p[t]
            else:
                walk(prefix + [int(t)], prob * p[t])
    walk([], 1.0)
    model.decoder.rewind(0)
    model._cached = []
    return out


@pytest.mark.parametrize("draft", ["noisy", "prompt-lookup", "restricted"])
def test_sampled_output_follows_target_distribution(target_path, noisy_path, restricted_path, draft):
    from scipy.stats import chisquare

    target = edgesdk.load(target_path)
    ids = target.encode_prompt(PROMPT)
    settings = dict(temperature=1.0, top_k=3)
    joint = _exact_joint(target, ids, 3, **settings)
    model = edgesdk.load(target_path, draft={"noisy": noisy_path, "restricted": restricted_path}.get(draft, draft))
    if draft == "noisy":  # the draft's own joint is far from the target's: a wrong rule would show
        q_joint = _exact_joint(model.draft, ids, 3, **settings)
        cells = set(joint) | set(q_joint)
        assert 0.5 * sum(abs(joint.get(c, 0) - q_joint.get(c, 0)) for c in cells) > 0.2
    n = 3000
    counts: dict[tuple, int] = {}
    proposed = accepted = 0
    for seed in range(n):
        r = model.generate(PROMPT, max_new_tokens=3, seed=seed, num_draft_tokens=2, **settings)
        key = tuple(r.token_ids)
        counts[key] = counts.get(key, 0) + 1
        proposed += r.speculative["proposed"]
        accepted += r.speculative["accepted"]
    assert set(counts) <= set(joint)
    cells = sorted(joint)
    obs = np.array([counts.get(c, 0) for c in cells], dtype=float)
    exp = np.array([joint[c] for c in cells]) * n
    tv = 0.5 * np.abs(obs / n - exp / n).sum()
    # pool the rare cells so the chi-square approximation holds
    big = exp >= 5
    obs_c = np.append(obs[big], obs[~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    if exp_c[-1] == 0:
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    pvalue = chisquare(obs_c, exp_c * obs_c.sum() / exp_c.sum()).pvalue
    assert pvalue > 1e-3, (pvalue, tv)
    assert tv < 0.06, tv
    if draft == "noisy":  # both acceptance and rejection paths ran
        assert 0.1 < accepted / proposed < 0.95


# -- a draft with a restricted lm_head (export --draft-vocab) -------------------------------------
def test_restricted_draft_vocab(target_path, plain, restricted_path):
    from edgesdk.evaluate import evaluate

    manifest = json.loads((restricted_path / "edgesdk.json").read_text())
    assert manifest["model"]["lm_head_tokens"] == {"file": "lm_head_tokens.npy", "count": 400,
                                                   "ranked_by": ["text.txt"]}
    assert manifest["model"]["outputs"][0]["shape"][-1] == 400
    draft = edgesdk.load(restricted_path)
    ids = draft.lm_head_tokens
    assert len(ids) == 400 and np.all(np.diff(ids) > 0)
    prompt_ids = plain.encode_prompt(PROMPT)
    assert set(prompt_ids) <= set(ids.tolist())  # counted in the text, so kept
    # the restricted graph computes exactly the kept columns of the full lm_head
    plain.reset()
    full = plain.decoder.forward(prompt_ids)
    plain.reset()
    np.testing.assert_allclose(draft.decoder.forward(prompt_ids), full[:, ids], rtol=1e-5, atol=1e-5)
    draft.reset()
    # alone it can only be a draft
    with pytest.raises(InvalidArgumentError, match="can only serve as a draft"):
        draft.generate(PROMPT, max_new_tokens=4)
    with pytest.raises(InvalidArgumentError, match="can only serve as a draft"):
        edgesdk.load(restricted_path, draft="prompt-lookup")
    text = restricted_path.parent / "eval.txt"
    text.write_text(PROMPT * 40)
    with pytest.raises(InvalidArgumentError, match="can only serve as a draft"):
        evaluate(restricted_path, text, window=64, stride=32)
    # as a draft: the target's own output, accepted wherever the target's token was kept
    ref = greedy(plain, n=48)
    model = edgesdk.load(target_path, draft=restricted_path)
    out = greedy(model, n=48, num_draft_tokens=4)
    assert out.token_ids == ref.token_ids
    outside = sum(t not in set(ids.tolist()) for t in ref.token_ids)
    assert outside > 0, "the test needs target tokens the draft cannot propose"
    s = out.speculative
    assert 0 < s["accepted"] < s["proposed"]
    check_caches(model, out)


def test_draft_vocab_bad_input(tiny, tmp_path):
    from conftest import assert_one_line_error, run_cli

    out = tmp_path / "x"
    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "-o", str(out), "--draft-vocab", "0"),
                          "--draft-vocab 0 is invalid")
    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "-o", str(out), "--draft-vocab", "100",
                                  "--vocab-text", str(tmp_path / "missing.txt")), "does not exist")
    assert_one_line_error(run_cli("export", str(tiny.model("llama")), "-o", str(out), "-q", "--draft-vocab", "999999"),
                          "must be between")
    assert not out.exists()


# -- tokenizers, bundles, errors ------------------------------------------------------------------
def test_tokenizer_difference_names_first_difference():
    a = {"vocab": {"a": 0, "b": 1, "c": 2}, "special": ["<s>"]}
    assert spec.tokenizer_difference(a, a) is None
    b = {"vocab": {"a": 0, "b": 2, "c": 1}, "special": ["<s>"]}
    assert "'b' has id 1 in the target but 2 in the draft" in spec.tokenizer_difference(a, b)
    c = {"vocab": {"a": 0, "b": 1}, "special": ["<s>"]}
    assert "'c' (id 2) is in the target's vocabulary but not the draft's" in spec.tokenizer_difference(a, c)
    d = {"vocab": {"a": 0, "b": 1, "c": 2, "d": 3}, "special": ["<s>"]}
    assert "'d' (id 3) is in the draft's" in spec.tokenizer_difference(a, d)
    e = {"vocab": a["vocab"], "special": ["<s>", "</s>"]}
    assert "'</s>' is special in the draft" in spec.tokenizer_difference(a, e)


def test_load_rejects_other_tokenizer(target_path, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(target_path, other)
    tj = json.loads((other / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    first = min(vocab, key=vocab.get)
    second = sorted(vocab, key=vocab.get)[1]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (other / "tokenizer.json").write_text(json.dumps(tj))
    from edgesdk import artifact

    artifact.write_manifest(other, json.loads((other / "edgesdk.json").read_text()))
    with pytest.raises(InvalidArgumentError, match="tokenizers differ.*has id"):
        edgesdk.load(target_path, draft=other)


def test_bad_arguments(target_path, plain):
    with pytest.raises(InvalidArgumentError, match="num_draft_tokens"):
        plain.generate(PROMPT, num_draft_tokens=-1)
    with pytest.raises(InvalidArgumentError, match="own draft"):
        plain.set_draft(plain)
    with pytest.raises(InvalidArgumentError, match="draft="):
        plain.set_draft(42)


def test_num_draft_tokens_zero_is_plain(target_path, plain):
    model = edgesdk.load(target_path, draft=target_path)
    r = greedy(model, num_draft_tokens=0)
    assert r.token_ids == greedy(plain).token_ids and r.speculative is None


def test_adaptive_k_backs_off_and_grows():
    ak = spec.AdaptiveK(k_max=8, prior=0.7, draft_cost=0.35)
    for m in (1, 2, 4, 6, 8, 1, 3, 5):
        ak.target_call(m, 0.030 + 0.004 * (m - 1))
        ak.draft_call(0.010)
    t1, slope, draft = ak.costs()
    assert abs(t1 - 0.030) < 1e-6 and abs(slope - 0.004) < 1e-6 and draft == 0.010
    for _ in range(30):
        ak.verified(4, 4)
    assert ak.choose(8) >= 5
    for _ in range(30):
        ak.verified(2, 0)
    assert ak.choose(8) == 0
    for _ in range(200):  # drifts back towards the prior: it will try again
        ak.plain_step()
    assert ak.choose(8) > 0



def test_first_token_does_not_wait_for_the_draft(target_path, plain):
    """The draft reads the prompt at its first proposal, after the first token is out (TTFT is
    the target's own); the output is still plain greedy decoding's."""
    model = edgesdk.load(target_path, draft=target_path)
    model.draft.reset()
    with model.stream(PROMPT, max_new_tokens=40) as s:
        first = next(iter(s))
        assert first.token_ids and model.draft.decoder.length == 0
        rest = [t for c in s for t in c.token_ids]
    assert first.token_ids + rest == greedy(plain).token_ids
    assert model.draft.decoder.length > 0  # it did speculate afterwards


def test_adaptive_k_speculates_only_when_the_draft_prefill_is_repaid():
    """A draft that has not read the prompt yet costs its prefill first: speculation starts only
    when the tokens left save more time than that (at the best k's rate), and never otherwise."""
    ak = spec.AdaptiveK(k_max=8, prior=0.7, draft_cost=0.35)
    for m in (1, 4):
        ak.target_call(m, 0.030 + 0.004 * (m - 1))
    ak.draft_call(0.005)
    for _ in range(30):
        ak.verified(4, 4)  # a draft that agrees: high acceptance
    k = ak.choose(8)
    assert k >= 5
    t1, slope, draft = ak.costs()
    a = min(ak.alpha, 0.999)
    rate = (1 - a ** (k + 1)) / (1 - a) / (k * draft + t1 + slope * k)
    saved_per_token = t1 - 1 / rate
    setup = 1.0  # one second of draft prefill to repay
    need = setup * ak.margin / saved_per_token
    assert ak.choose(8, remaining=int(need) + 1, setup_s=setup) == k
    assert ak.choose(8, remaining=int(need) - 1, setup_s=setup) == 0
    assert ak.choose(8, remaining=None, setup_s=setup) == k  # no known end: the setup is always repaid
    assert ak.choose(8, remaining=2) > 0

# -- bundles and CLI ------------------------------------------------------------------------------
def test_export_bundle_and_cli(tiny, tmp_path):
    from conftest import run_cli

    out = tmp_path / "bundle"
    r = run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out), "-q",
                "--draft", str(tiny.model("llama")), "--draft-precision", "int4")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "edgesdk.json").read_text())
    assert manifest["draft"]["path"] == "draft" and manifest["draft"]["precision"] == "int4"
    assert (out / "draft" / "edgesdk.json").is_file()
    model = edgesdk.load(out)
    assert isinstance(model.draft, edgesdk.Model)
    assert edgesdk.load(out, draft=False).draft is None
    ref = greedy(edgesdk.load(out, draft=False), n=16)
    got = greedy(model, n=16)
    assert got.speculative["proposed"] > 0
    assert got.token_ids == ref.token_ids

    r = run_cli("info", str(out))
    assert r.returncode == 0 and "draft         draft/" in r.stdout
    r = run_cli("run", str(out), PROMPT, "--max-new-tokens", "16", "-v")
    assert r.returncode == 0, r.stderr
    assert "accepted" in r.stderr
    r = run_cli("run", str(out), PROMPT, "--max-new-tokens", "16", "--no-draft", "-v")
    assert r.returncode == 0 and "accepted" not in r.stderr
    r = run_cli("run", str(tiny.export("llama", "fp32")), PROMPT, "--max-new-tokens", "16", "--prompt-lookup",
                "--num-draft-tokens", "3", "-v")
    assert r.returncode == 0, r.stderr
    assert "prompt-lookup" in r.stderr
    r = run_cli("run", str(tiny.export("llama", "fp32")), PROMPT, "--draft", str(out / "draft"),
                "--max-new-tokens", "8", "-v")
    assert r.returncode == 0, r.stderr


def test_export_rejects_other_tokenizer(tiny, tmp_path):
    from conftest import run_cli

    src = tmp_path / "hf-other-tok"
    shutil.copytree(tiny.model("llama"), src)
    tj = json.loads((src / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[5:7]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (src / "tokenizer.json").write_text(json.dumps(tj))
    out = tmp_path / "bad-bundle"
    r = run_cli("export", str(tiny.model("llama")), "--precision", "fp32", "-o", str(out), "-q",
                "--draft", str(src))
    assert r.returncode == 2
    assert "tokenizers differ" in r.stderr and "has id" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not out.exists()


# -- real model -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_int4_draft_for_fp32(real):
    fp32, int4 = real.export("fp32"), real.export("int4")
    plain_fp32 = edgesdk.load(fp32)
    model = edgesdk.load(fp32, draft=int4)
    messages = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    want = plain_fp32.generate(messages=messages, max_new_tokens=64)
    got = model.generate(messages=messages, max_new_tokens=64)
    assert got.speculative["accepted"] > 0
    assert got.token_ids == want.token_ids
