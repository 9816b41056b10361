"""Runtime behaviour on tiny models: KV cache in place, rewind, limits, sampling, streaming, chat."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgesdk
from edgesdk.errors import ContextOverflowError, InvalidArgumentError
from edgesdk.runtime.tokenizer import IncrementalDecoder


@pytest.fixture(scope="module")
def llama(tiny):
    return edgesdk.load(tiny.export("llama", "fp32"))


def test_decode_step_updates_cache_in_place(llama):
    dec = llama.decoder
    dec.rewind(0)
    ptrs = [v.data_ptr() for v in dec.cache.keys + dec.cache.values]
    dec.forward(llama.tokenizer.encode("Hello there"))
    n = dec.length
    before = dec.cache.keys[0].numpy()[0, :, n].copy()
    dec.forward([42])
    after = dec.cache.keys[0].numpy()[0, :, n]
    assert [v.data_ptr() for v in dec.cache.keys + dec.cache.values] == ptrs  # same buffers, no copy
    assert not np.array_equal(before, after)  # the new position was written into the shared buffer
    assert dec.length == n + 1


def test_rewind_recomputes_identically(llama):
    ids = llama.tokenizer.encode("one two three four five six")
    dec = llama.decoder
    dec.rewind(0)
    full = dec.forward(ids)
    dec.rewind(3)
    again = dec.forward(ids[3:])
    assert np.abs(full[3:] - again).max() < 1e-4


def test_prompt_longer_than_context(tiny):
    model = edgesdk.load(tiny.export("llama", "fp32"), max_length=16)
    with pytest.raises(ContextOverflowError, match="context holds 16"):
        model.generate("word " * 40)


def test_generation_stops_at_context_limit(tiny):
    model = edgesdk.load(tiny.export("llama", "fp32"), max_length=16)
    ids = model.tokenizer.encode("one two three four five")
    r = model.generate("one two three four five", max_new_tokens=100)
    assert r.finish_reason == "context"
    assert len(ids) + r.generated_tokens == 16 + 1  # the last token needs no cache slot


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-3),
                                    dict(max_new_tokens=0), dict(repetition_penalty=0.0)])
def test_invalid_sampling_values(llama, kwargs):
    with pytest.raises(InvalidArgumentError):
        llama.generate("hi", **kwargs)


def test_seed_reproducible_and_greedy_default(llama):
    a = llama.generate("Once upon a time", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)
    b = llama.generate("Once upon a time", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=1)
    c = llama.generate("Once upon a time", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=2)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    g1, g2 = llama.generate("Once upon a time", max_new_tokens=20), llama.generate("Once upon a time", max_new_tokens=20)
    assert g1.token_ids == g2.token_ids


def test_top_k_one_is_greedy(llama):
    greedy = llama.generate("Once upon a time", max_new_tokens=16)
    k1 = llama.generate("Once upon a time", max_new_tokens=16, temperature=2.0, top_k=1, seed=3)
    assert greedy.token_ids == k1.token_ids


def test_repetition_penalty_matches_transformers_and_applies(llama):
    import torch
    from transformers import RepetitionPenaltyLogitsProcessor

    from edgesdk.runtime.sampling import repetition_penalty

    rng = np.random.default_rng(0)
    logits = rng.normal(size=100).astype(np.float32) * 5
    context = [3, 7, 7, 50, 99]
    ours = repetition_penalty(1.3)(logits, context)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([context]), torch.tensor(logits[None]))[0].numpy()
    assert np.allclose(ours, ref)
    prompt = "a b c d e f g"
    r = llama.generate(prompt, max_new_tokens=24, repetition_penalty=1e6)
    seen = llama.tokenizer.encode(prompt) + r.token_ids
    assert len(set(seen)) == len(seen)  # a huge penalty forbids every repeat


def test_stop_string(llama):
    full = llama.generate("Hello", max_new_tokens=24)
    assert len(full.text) > 6
    stop = full.text[3:6]
    r = llama.generate("Hello", max_new_tokens=24, stop=[stop])
    assert r.finish_reason == "stop"
    assert r.text == full.text[: full.text.find(stop)]
    chunks = list(llama.stream("Hello", max_new_tokens=24, stop=[stop]))
    assert "".join(c.text for c in chunks) == r.text
    assert chunks[-1].finish_reason == "stop"


def test_eos_stops(tiny):
    model = edgesdk.load(tiny.export("llama", "fp32"))
    first = model.generate("Hello", max_new_tokens=5).token_ids
    model.eos_token_ids = {first[2]}
    r = model.generate("Hello", max_new_tokens=5)
    assert r.finish_reason == "stop" and r.token_ids == first[:3]


def test_stream_equals_generate_with_result(llama):
    full = llama.generate("The weather", max_new_tokens=30)
    stream = llama.stream("The weather", max_new_tokens=30)
    text = "".join(c.text for c in stream)
    assert text == full.text
    assert stream.result.token_ids == full.token_ids


def test_incremental_detokenization_multibyte(llama):
    tok = llama.tokenizer
    text = "naïve café — 東京タワー 🙂🎉 Ünïcödé"
    ids = tok.encode(text, add_special_tokens=False)
    dec = IncrementalDecoder(tok)
    chunks = [dec.add([i]) for i in ids] + [dec.finish()]
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == tok.decode(ids) == text
    assert sum(1 for c in chunks if c == "") > 0  # some tokens were partial characters, held back


def test_chat_reuses_cache_across_turns(tiny):
    model = edgesdk.load(tiny.export("llama", "fp32"))
    chat = model.chat(system="You are terse.")
    list(chat.send("Hi!", max_new_tokens=8))
    first = chat.last
    assert first.prefilled_tokens == first.prompt_tokens
    list(chat.send("And then?", max_new_tokens=8))
    second = chat.last
    assert second.prompt_tokens > first.prompt_tokens
    assert second.prefilled_tokens < second.prompt_tokens - first.prompt_tokens + 4  # only the new turn
    fresh = edgesdk.load(tiny.export("llama", "fp32")).generate(messages=chat.messages[:-1], max_new_tokens=8)
    assert fresh.token_ids == second.token_ids


def test_messages_use_chat_template(llama):
    ids = llama.encode_prompt(messages=[{"role": "user", "content": "Hi"}])
    text = llama.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    with pytest.raises(InvalidArgumentError):
        llama.encode_prompt(messages=[{"content": "no role"}])
    with pytest.raises(InvalidArgumentError):
        llama.generate()


def test_providers_and_threads(llama):
    assert llama.providers == ["CPUExecutionProvider"]
    assert llama.session.get_session_options().intra_op_num_threads >= 1


def test_runtime_needs_no_torch_or_transformers(tiny):
    art = tiny.export("llama", "fp32")
    code = textwrap.dedent(f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split('.')[0] in ('torch', 'transformers', 'onnxruntime_genai'):
                    raise ImportError('blocked ' + name)
        sys.meta_path.insert(0, Block())
        import edgesdk
        m = edgesdk.load({str(art)!r})
        r = m.generate("Hello", max_new_tokens=5)
        assert r.generated_tokens == 5, r
        assert not any(k.split('.')[0] in ('torch', 'transformers') for k in sys.modules)
        print('ok')
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _thread_states() -> dict[int, str]:
    """tid -> scheduler state (R running/runnable, S sleeping, ...) of this process's threads."""
    import os

    states = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                states[int(tid)] = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            pass  # the thread ended
    return states


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread states from /proc")
def test_no_busy_spinning_while_idle(tiny):
    """After a generation, onnxruntime's worker threads sleep instead of spinning. A spinning
    thread is runnable (R) in every sample however loaded the machine is; a parked one sleeps."""
    import threading
    import time

    model = edgesdk.load(tiny.export("llama", "fp32"), threads=2)
    model.generate("Hello", max_new_tokens=16)
    workers = set(_thread_states()) - {threading.get_native_id()}
    assert workers, "onnxruntime started no worker thread"
    time.sleep(0.2)  # workers may spin briefly after a run, then park
    runnable = {t: 0 for t in workers}
    for _ in range(20):
        for tid, state in _thread_states().items():
            if tid in runnable and state == "R":
                runnable[tid] += 1
        time.sleep(0.02)
    assert max(runnable.values(), default=0) <= 2, runnable
