"""edgesdk serve: the real openai client against the server on a free loopback port (in-process
uvicorn), over a tiny random Qwen2 and the real SmolLM2-135M INT4; plus the library fixes under
it (one generation at a time per Model, early close, constrained decoding, fork)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
import uvicorn  # noqa: E402

import edgesdk  # noqa: E402
from conftest import ROOT, assert_one_line_error, run_cli  # noqa: E402
from edgesdk.errors import ModelBusyError  # noqa: E402
from edgesdk.serve import tools as toolkit  # noqa: E402
from edgesdk.serve.app import create_app  # noqa: E402

KEY = "sk-test-key"
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "member"],
          "properties": {"name": {"type": "string", "maxLength": 10},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "member": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 16},
                                  "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "additionalProperties": False, "required": ["a", "b"],
                                      "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}}}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """create_app(...) served by uvicorn in a thread on a free loopback port."""

    def __init__(self, artifact, draft=None, **options):
        self.app = create_app(lambda: edgesdk.load(artifact, draft=draft), "served-model", **options)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the server did not become ready")

    def client(self, key: str | None = KEY, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=120, **kw)

    def busy(self) -> int:
        return httpx.get(self.url + "/health").json()["busy"]

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def tiny_model(tiny):
    return tiny.export("qwen2")


@pytest.fixture(scope="module")
def srv(tiny_model):
    s = Server(tiny_model, api_key=KEY, parallel=2, max_queue=4, max_body=64 * 1024, cors=["http://app.example"])
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(srv):
    return srv.client()


def chat(client, content="Hello there", **kw):
    return client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **kw)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# -- tiny model: the API surface -----------------------------------------------------------
def test_models_health_metrics(srv, client):
    assert [m.id for m in client.models.list().data] == ["served-model"]
    assert client.models.retrieve("served-model").id == "served-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    assert httpx.get(srv.url + "/models").json()["data"][0]["id"] == "served-model"  # no /v1 prefix, no key
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"
    chat(client, max_tokens=3)
    text = httpx.get(srv.url + "/metrics", headers={"x-api-key": KEY}).text
    for name in ("edgesdk_requests_total", "edgesdk_completion_tokens_total", "edgesdk_time_to_first_token_seconds_bucket",
                 "edgesdk_time_per_output_token_seconds_bucket", "edgesdk_queue_depth", "edgesdk_busy_slots"):
        assert name in text, name
    assert 'route="/v1/chat/completions",status="200"' in text


def test_chat_stream_equals_nonstream_and_seed_is_deterministic(client):
    a = chat(client, temperature=0.9, seed=11, max_tokens=24)
    b = chat(client, temperature=0.9, seed=11, max_tokens=24)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.role == "assistant" and a.choices[0].finish_reason == "length"
    assert a.usage.completion_tokens == 24 and a.usage.total_tokens == a.usage.prompt_tokens + 24
    text, chunks = stream_text(chat(client, temperature=0.9, seed=11, max_tokens=24, stream=True))
    assert text == a.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None  # no include_usage
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_stream_usage_chunk_only_with_include_usage(client):
    chunks = list(chat(client, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_stream_and_usage(client):
    r = client.completions.create(model="x", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 12
    s = client.completions.create(model="x", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in s) == r.choices[0].text
    bare = httpx.post(srv_url(client) + "/completions", headers={"authorization": f"Bearer {KEY}"},
                      json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}).json()
    assert bare["choices"][0]["text"] == r.choices[0].text  # the route without /v1


def srv_url(client) -> str:
    return str(client.base_url).rstrip("/").removesuffix("/v1")


def test_stop_string(client):
    full = chat(client, temperature=0, max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip()
    r = chat(client, temperature=0, max_tokens=20, stop=[stop, "zzzz-never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]
    text, _ = stream_text(chat(client, temperature=0, max_tokens=20, stop=stop, stream=True))
    assert text == full[: full.index(stop)]


def test_logprobs(client):
    r = chat(client, max_tokens=16, temperature=0.7, seed=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content
    assert len(content) == 16 and all(t.logprob <= 0 for t in content)
    for t in content:
        tops = [x.logprob for x in t.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and all(x <= 0 for x in tops)
        assert t.logprob <= tops[0] + 1e-9
    # greedy: the chosen token is the most likely one
    g = chat(client, max_tokens=8, temperature=0, logprobs=True, top_logprobs=1).choices[0].logprobs.content
    assert all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-6 for t in g)
    c = client.completions.create(model="x", prompt="Hello", max_tokens=8, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert "".join(lp.tokens) == c.choices[0].text and all(x <= 0 for x in lp.token_logprobs)
    assert lp.text_offset[0] == 0 and all(len(d) == 2 for d in lp.top_logprobs)


def test_json_schema_from_a_random_model(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    for seed in range(3):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=64, response_format=fmt)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    text, _ = stream_text(chat(client, temperature=1.0, seed=5, max_tokens=64, response_format=fmt, stream=True))
    jsonschema.validate(json.loads(text), PERSON)
    r = chat(client, temperature=1.0, seed=1, max_tokens=64, response_format={"type": "json_object"})
    assert r.choices[0].finish_reason != "stop" or isinstance(json.loads(r.choices[0].message.content), dict)


def test_tool_choice_required_and_named_from_a_random_model(client):
    r = chat(client, "What is 2 + 3?", tools=TOOLS, tool_choice="required", temperature=1.0, seed=2, max_tokens=80)
    assert r.choices[0].finish_reason == "tool_calls"
    call = r.choices[0].message.tool_calls[0]
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call.function.name)
    jsonschema.validate(json.loads(call.function.arguments), schema)
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = chat(client, "Weather?", tools=TOOLS, tool_choice=named, temperature=1.0, seed=4, max_tokens=80)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_") and call.type == "function"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])
    # streamed: the name first, then the arguments, as OpenAI's deltas do
    chunks = list(chat(client, "Weather?", tools=TOOLS, tool_choice=named, temperature=1.0, seed=4, max_tokens=80,
                       stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # a tool result goes back through the template and the model answers (any text)
    follow = client.chat.completions.create(model="m", max_tokens=4, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "tool_calls": [{"id": call.id, "type": "function", "function": {
            "name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "21 C"}], tools=TOOLS)
    assert follow.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_tool_call_parsing_per_family():
    qwen_tpl = "{% if tools %}<tool_call>{% endif %}"
    text = 'Sure.<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    content, calls = toolkit.parse(text, qwen_tpl)
    assert content == "Sure." and calls[0]["function"]["name"] == "add"
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    llama_tpl = "{% if tools %}{{ '<|python_tag|>' }} parameters{% endif %}"
    content, calls = toolkit.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}', llama_tpl)
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert toolkit.parse("{not json", llama_tpl) == ("{not json", [])
    split = toolkit.StreamSplitter(qwen_tpl)
    out = "".join(split.feed(p) for p in ["Hi <to", "ol_call>\n{\"name\": \"add\", ", "\"arguments\": {}}\n</tool_call>"])
    rest, calls = split.finish()
    assert out == "Hi " and rest == "" and calls[0]["function"]["name"] == "add"


# -- errors -------------------------------------------------------------------------------
def err(response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_400_unsupported_fields_and_values(srv):
    h = {"authorization": f"Bearer {KEY}"}
    msgs = [{"role": "user", "content": "hi"}]
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"messages": msgs, "logit_bias": {"1": 2}})
    assert r.status_code == 400 and err(r)["param"] == "logit_bias" and "logit_bias" in err(r)["message"]
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"messages": msgs, "n": 2})
    assert r.status_code == 400 and err(r)["param"] == "n"
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"messages": msgs, "temperature": -1})
    assert r.status_code == 400 and err(r)["param"] == "temperature"
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h, content=b"{not json")
    assert r.status_code == 400
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h,
                   json={"messages": msgs, "response_format": {"type": "json_schema", "json_schema": {
                       "schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}}})
    assert r.status_code == 400 and err(r)["param"] == "response_format"
    r = httpx.post(srv.url + "/v1/chat/completions", headers=h, json={"messages": msgs, "tool_choice": "required"})
    assert r.status_code == 400 and err(r)["param"] == "tool_choice"


def test_401_public_routes_and_cors_preflight(srv):
    with pytest.raises(openai.AuthenticationError):
        chat(srv.client(key="wrong"), max_tokens=2)
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 401 and err(r)["type"] == "authentication_error"
    r = httpx.post(srv.url + "/v1/completions", headers={"X-Api-Key": KEY}, json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/v1/models").status_code == 200
    assert httpx.get(srv.url + "/metrics").status_code == 401
    pre = httpx.options(srv.url + "/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://app.example"


def test_404_and_413(srv):
    r = httpx.get(srv.url + "/v1/embeddings", headers={"x-api-key": KEY})
    assert r.status_code == 404 and err(r)["code"] == "not_found"
    big = {"messages": [{"role": "user", "content": "x" * 70_000}]}
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"x-api-key": KEY}, json=big)
    assert r.status_code == 413 and err(r)["code"] == "request_too_large"


def test_context_overflow_is_a_400_before_the_stream(client):
    long = "word " * 400  # the tiny model's context is 256
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            r = chat(client, long, max_tokens=4, stream=stream)
            list(r) if stream else None
        assert e.value.code == "context_length_exceeded" and "256" in e.value.message


def test_two_concurrent_streams_match_their_sequential_runs(srv, client):
    prompts = ["The weather today", "My favourite food"]
    solo = [chat(client, p, temperature=0.8, seed=9, max_tokens=40).choices[0].message.content for p in prompts]
    out, interleaved = [None, None], []

    def run(i):
        text = []
        for c in chat(client, prompts[i], temperature=0.8, seed=9, max_tokens=40, stream=True):
            if c.choices and c.choices[0].delta.content:
                text.append(c.choices[0].delta.content)
                interleaved.append(i)
        out[i] = "".join(text)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == solo
    assert srv.busy() == 0


def test_speculative_server_matches_plain(tiny_model, client):
    plain = [chat(client, p, temperature=0, max_tokens=24).choices[0].message.content for p in ("Hi", "Bye")]
    s = Server(tiny_model, draft=tiny_model, parallel=2)
    try:
        c = s.client(key=None)
        out = [None, None]

        def run(i):
            out[i] = stream_text(chat(c, ("Hi", "Bye")[i], temperature=0, max_tokens=24, stream=True))[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert out == plain  # two slots, each a fork with its own draft, speculating at once
        lp = chat(c, "Hi", temperature=0, max_tokens=8, logprobs=True).choices[0]
        assert "".join(t.token for t in lp.logprobs.content) == lp.message.content
    finally:
        s.close()


# -- SmolLM2: real answers, cancel, queue --------------------------------------------------
@pytest.fixture(scope="module")
def smol(real):
    s = Server(real.export("int4"), parallel=2, max_queue=1, ping_s=0.1)
    yield s
    s.close()


@pytest.mark.slow
def test_smollm2_chat_and_stream(smol):
    c = smol.client(key=None)
    q = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    r = c.chat.completions.create(model="gpt-4o-mini", messages=q, temperature=0, max_tokens=16)
    assert "Paris" in r.choices[0].message.content and r.choices[0].finish_reason == "stop"
    text, _ = stream_text(c.chat.completions.create(model="m", messages=q, temperature=0, max_tokens=16, stream=True))
    assert text == r.choices[0].message.content
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    p = c.chat.completions.create(model="m", temperature=0, max_tokens=48, response_format=fmt, messages=[
        {"role": "user", "content": "Describe Alice, 30 years old, a member, as JSON."}])
    jsonschema.validate(json.loads(p.choices[0].message.content), PERSON)
    weather = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                                  "parameters": {"type": "object", "required": ["city"],
                                                                 "properties": {"city": {"type": "string"}}}}}]
    t = c.chat.completions.create(model="m", temperature=0, max_tokens=40, tools=weather, tool_choice="required",
                                  messages=[{"role": "user", "content": "What's the weather in Paris right now?"}])
    call = t.choices[0].message.tool_calls[0].function
    assert call.name == "get_weather" and "Paris" in json.loads(call.arguments)["city"]


@pytest.mark.slow
def test_smollm2_cancel_frees_the_slot_and_full_queue_is_429(smol):
    c = smol.client(key=None)
    counting = dict(model="m", prompt="1, 2, 3, 4, 5,", max_tokens=2000, temperature=0)
    a, b = c.completions.create(stream=True, **counting), c.completions.create(stream=True, **counting)
    next(iter(a)), next(iter(b))  # both slots are decoding
    assert smol.busy() == 2
    queued = c.completions.create(stream=True, **counting)  # waits in the queue (max_queue=1)
    with pytest.raises(openai.RateLimitError) as e:
        c.completions.create(**counting)
    assert e.value.status_code == 429 and e.value.code == "queue_full"
    a.close()  # the client goes away mid-stream: its slot goes to the queued request
    first = next(iter(queued))
    assert first.choices[0].text is not None
    b.close()
    queued.close()
    deadline = time.time() + 5
    while smol.busy() and time.time() < deadline:
        time.sleep(0.02)
    assert smol.busy() == 0


@pytest.mark.slow
def test_smollm2_prefix_reuse_across_turns(smol, real):
    c = smol.client(key=None)
    turn = [{"role": "user", "content": "Name a colour."}]
    r1 = c.chat.completions.create(model="m", messages=turn, temperature=0, max_tokens=8)
    before = _metric(smol, "edgesdk_prefilled_tokens_total")
    turn2 = turn + [{"role": "assistant", "content": r1.choices[0].message.content},
                    {"role": "user", "content": "Another one."}]
    r2 = c.chat.completions.create(model="m", messages=turn2, temperature=0, max_tokens=8)
    prefilled = _metric(smol, "edgesdk_prefilled_tokens_total") - before
    assert prefilled < r2.usage.prompt_tokens - r1.usage.prompt_tokens + 8  # only the new turn (and the reply)


@pytest.mark.slow
def test_smollm2_long_prefill_keeps_alive_and_others_keep_decoding(smol):
    long = "Summarise this text. " + "The quick brown fox jumps over the lazy dog. " * 40  # ~450 tokens: 2 chunks
    body = {"model": "m", "messages": [{"role": "user", "content": long}], "max_tokens": 8, "temperature": 0,
            "stream": True}
    lines, short = [], {}

    def other():  # a short request while the long prompt is prefilled chunk by chunk
        time.sleep(0.05)
        t0 = time.perf_counter()
        c = smol.client(key=None).completions.create(model="m", prompt="Hi", max_tokens=4, temperature=0)
        short["s"], short["tokens"] = time.perf_counter() - t0, c.usage.completion_tokens

    t = threading.Thread(target=other)
    t0 = time.perf_counter()
    with httpx.stream("POST", smol.url + "/v1/chat/completions", json=body, timeout=120) as r:
        t.start()
        for line in r.iter_lines():
            if line:
                lines.append(line)
    total = time.perf_counter() - t0
    t.join(60)
    data = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[0].startswith("data: ") and data[0]["choices"][0]["delta"]["role"] == "assistant"
    assert lines[-1] == "data: [DONE]" and data[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    if total > 0.5:  # pings every 0.1 s: a stream this long must carry keep-alive comments
        assert any(x.startswith(":") for x in lines), lines[:5]
    assert short["tokens"] == 4 and short["s"] < total + 5


def _metric(server, name) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


# -- the CLI verb ---------------------------------------------------------------------------
def test_cli_serve_subprocess(tiny_model):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "edgesdk", "serve", str(tiny_model), "--port", str(port),
                          "--alias", "tiny", "--api-key", KEY], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        assert c.models.list().data[0].id == "tiny"
        assert c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3).usage.completion_tokens == 3
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(20)
    assert "tiny ready on http://127.0.0.1:%d/v1" % port in p.stderr.read()


def test_cli_serve_bad_arguments(tiny_model, tmp_path):
    assert_one_line_error(run_cli("serve", str(tiny_model), "--parallel", "0"), "--parallel")
    assert_one_line_error(run_cli("serve", str(tmp_path)), "not an edgesdk artifact")
    broken = tmp_path / "broken"  # a manifest without its files: the load fails, the server stops
    broken.mkdir()
    (broken / "edgesdk.json").write_text((tiny_model / "edgesdk.json").read_text())
    assert_one_line_error(run_cli("serve", str(broken), "--port", str(free_port()), timeout=120))


# -- the library under it -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_model):
    return edgesdk.load(tiny_model)


def test_model_refuses_two_generations_at_once(model):
    reference = model.generate("Hello", max_new_tokens=8).text
    s = model.stream("Hello", max_new_tokens=8)
    next(s)
    with pytest.raises(ModelBusyError, match="already generating"):
        model.generate("Other", max_new_tokens=4)
    s.close()
    assert s.result.finish_reason == "cancelled" and s.result.generated_tokens == 1
    assert model.generate("Hello", max_new_tokens=8).text == reference
    for _ in model.stream("Hello", max_new_tokens=8):
        break  # dropping the stream releases the model
    assert model.generate("Hello", max_new_tokens=8, reuse_cache=True).text == reference


def test_chat_closed_early_stays_consistent(model):
    chat = model.chat(system="Be brief.")
    first = []
    for chunk in chat.send("Tell me a story", max_new_tokens=30):
        first.append(chunk.text)
        if len(first) == 3:
            break
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant"]
    assert chat.messages[-1]["content"] == "".join(first)
    # the next turn reuses the cache and matches a fresh model on the same history
    reply = "".join(c.text for c in chat.send("Go on", max_new_tokens=6))
    fresh = model.fork().generate(messages=chat.messages[:-1], max_new_tokens=6)
    assert reply == fresh.text and chat.last.prefilled_tokens < chat.last.prompt_tokens


def test_library_response_format_and_mask_cost(model):
    for rf in ({"type": "json_schema", "json_schema": {"schema": PERSON}}, PERSON):
        r = model.generate("Person:", max_new_tokens=64, temperature=1.0, seed=7, response_format=rf)
        jsonschema.validate(json.loads(r.text), PERSON)
    r = model.generate("Date:", max_new_tokens=16, response_format={"type": "regex", "regex": r"20[0-9]{2}-[01][0-9]"})
    assert r.finish_reason == "stop" and len(r.text) == 7 and r.text.startswith("20")
    with pytest.raises(edgesdk.errors.InvalidArgumentError, match="response_format"):
        model.generate("x", response_format={"type": "regex"})


def test_response_format_with_speculative_decoding(tiny_model, model):
    prompt = 'Person: {"name": "Bob", "age": 3, "member": true}'
    for draft in (tiny_model, "prompt-lookup"):
        spec = edgesdk.load(tiny_model, draft=draft)
        greedy = spec.generate(prompt, max_new_tokens=64, response_format=PERSON, num_draft_tokens=4)
        assert greedy.speculative["proposed"] > 0
        assert greedy.text == model.generate(prompt, max_new_tokens=64, response_format=PERSON).text
        for seed in range(2):
            r = spec.generate(prompt, max_new_tokens=64, temperature=1.0, seed=seed, response_format=PERSON,
                              num_draft_tokens=4)
            jsonschema.validate(json.loads(r.text), PERSON)


def test_fork_shares_weights_not_cache(model):
    twin = model.fork()
    assert twin.session is model.session and twin.decoder.cache is not model.decoder.cache
    s = model.stream("Hello", max_new_tokens=6)
    next(s)
    assert twin.generate("Hello", max_new_tokens=6).text == model.fork().generate("Hello", max_new_tokens=6).text
    s.close()


def test_runtime_works_without_llguidance(tiny_model):
    code = ("import sys; sys.modules['llguidance'] = None\n"
            "import edgesdk\n"
            f"m = edgesdk.load({str(tiny_model)!r})\n"
            "print(m.generate('Hi', max_new_tokens=2).generated_tokens)\n"
            "try:\n    m.generate('Hi', response_format={'type': 'json_object'})\n"
            "except edgesdk.errors.EdgeSDKError as e:\n    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["2", 'response_format needs llguidance: pip install "edgesdk[serve]"']
