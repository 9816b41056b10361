"""The OpenAI endpoints' work: messages and tools to tokens, sampling settings, a Job for the
worker, and its events back as an OpenAI response or an SSE stream."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from ..errors import ContextOverflowError, EdgeSDKError, InvalidArgumentError
from ..runtime import sampling
from . import tools as toolkit
from .schemas import ApiError, ChatRequest, CompletionRequest, error_body
from .worker import Job, QueueFull, Worker


def _settings(req, model, prompt_len: int, max_new: int | None) -> dict:
    room = model.max_length - prompt_len + 1
    s = {"max_new_tokens": max(1, min(max_new or room, room)), "temperature": 1.0 if req.temperature is None
         else req.temperature, "top_p": 1.0 if req.top_p is None else req.top_p, "top_k": req.top_k or 0,
         "seed": req.seed, "stop": [req.stop] if isinstance(req.stop, str) else list(req.stop or [])}
    if any(not x for x in s["stop"]):
        raise ApiError(400, "stop strings must be non-empty", param="stop")
    penalty = sampling.presence_frequency_penalty(req.presence_penalty, req.frequency_penalty)
    s["logits_processors"] = [penalty] if penalty else []
    return s


def _check_context(model, ids: list[int]) -> None:
    if len(ids) >= model.max_length:
        raise ApiError(400, f"the prompt has {len(ids)} tokens but the context holds {model.max_length} (with room "
                       "for one new token); shorten it or start the server with a larger --max-length",
                       param="messages", code="context_length_exceeded")


def _submit(worker: Worker, job_tokens, settings, top_logprobs) -> tuple[Job, asyncio.Queue]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def emit(event):
        with contextlib.suppress(RuntimeError):  # the loop is gone (server shutting down)
            loop.call_soon_threadsafe(queue.put_nowait, event)

    job = Job(tokens=job_tokens, settings=settings, emit=emit, top_logprobs=top_logprobs)
    try:
        worker.submit(job)
    except QueueFull:
        raise ApiError(429, f"the server is busy: {worker.max_queue} requests are already waiting; retry later",
                       "rate_limit_error", code="queue_full") from None
    return job, queue


async def _events(request: Request, worker: Worker, job: Job, queue: asyncio.Queue):
    """The job's events; cancels the job if the client goes away (non-streaming requests)."""
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                worker.cancel(job)
                return
            continue
        yield event
        if event[0] != "chunk":
            return


def _finish_reason(result, calls) -> str:
    if calls:
        return "tool_calls"
    return "stop" if result.finish_reason == "stop" else "length"


def _usage(result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.generated_tokens,
            "total_tokens": result.prompt_tokens + result.generated_tokens}


def _raise_job_error(e: BaseException):
    if isinstance(e, ContextOverflowError):
        raise ApiError(400, str(e), code="context_length_exceeded")
    if isinstance(e, (InvalidArgumentError, EdgeSDKError)):
        raise ApiError(400, str(e))
    raise ApiError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


def _trim(entries: list[dict], text: str) -> list[dict]:
    """Logprob entries whose token texts join to ``text`` (a stop string cuts the tail)."""
    out, used = [], 0
    for e in entries:
        if used >= len(text) and e["token"]:
            break
        tok = e["token"][: len(text) - used]
        out.append({**e, "token": tok})
        used += len(tok)
    return out


def _chat_logprobs(entries: list[dict]) -> dict:
    def one(tok, lp):
        return {"token": tok, "logprob": lp, "bytes": list(tok.encode())}
    return {"content": [{**one(e["token"], e["logprob"]), "top_logprobs": [one(t, lp) for t, lp in e["top"]]}
                        for e in entries]}


# -- /v1/chat/completions ------------------------------------------------------------------
async def chat(request: Request, req: ChatRequest, model, worker: Worker, model_id: str, ping_s: float):
    template = model.tokenizer.chat_template
    # "developer" is OpenAI's newer name for "system"; chat templates know only the latter
    messages = [m.model_dump(exclude_none=True) | {"content": m.text()} | ({"role": "system"} if m.role == "developer"
                                                                           else {}) for m in req.messages]
    choice = req.tool_choice or ("auto" if req.tools else "none")
    if choice != "none" and not req.tools:
        raise ApiError(400, f"tool_choice={choice!r} needs tools; pass tools or drop tool_choice", param="tool_choice")
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and choice != "none" else None
    messages, template_tools = toolkit.prepare(messages, tools, template)
    try:
        ids = model.encode_prompt(messages=messages, tools=template_tools)
    except EdgeSDKError as e:
        raise ApiError(400, str(e), param="messages") from None
    _check_context(model, ids)
    settings = _settings(req, model, len(ids), req.max_completion_tokens or req.max_tokens)
    grammar = None
    formatted = req.response_format is not None and req.response_format.type != "text"
    if tools and choice != "auto":
        if formatted:
            raise ApiError(400, f"response_format and tool_choice={choice if isinstance(choice, str) else 'a function'!r} "
                           "both constrain the output; drop one", param="response_format")
        try:
            grammar = toolkit.call_grammar(tools, choice if isinstance(choice, str) else choice.model_dump(), template)
        except InvalidArgumentError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
    elif formatted:
        grammar = _format_grammar(req.response_format)
    if grammar is not None:
        from ..runtime.constraints import matcher_constraint

        try:
            settings["logits_processors"].append(matcher_constraint(model.tokenizer, grammar, model.eos_token_ids))
        except EdgeSDKError as e:
            raise ApiError(400, str(e), param="response_format" if not tools else "tools") from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    job, queue = _submit(worker, ids, settings, top)
    rid, created = "chatcmpl-" + uuid.uuid4().hex[:24], int(time.time())
    base = {"id": rid, "created": created, "model": model_id, "system_fingerprint": "edgesdk"}
    splitter = toolkit.StreamSplitter(template) if tools else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_chat_stream(worker, job, queue, base, splitter, top is not None, include_usage),
                                   ping=ping_s, sep="\n")
    text, entries = [], []
    async for event in _events(request, worker, job, queue):
        if event[0] == "chunk":
            text.append(event[1])
            entries.extend(event[2] or [])
        elif event[0] == "error":
            _raise_job_error(event[1])
        else:
            result = event[1]
            content, calls = toolkit.parse(result.text, template) if tools else (result.text, [])
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = calls
            logprobs = _chat_logprobs(_trim(entries, result.text)) if top is not None else None
            return {**base, "object": "chat.completion", "usage": _usage(result),
                    "choices": [{"index": 0, "message": message, "logprobs": logprobs,
                                 "finish_reason": _finish_reason(result, calls)}]}
    return Response(status_code=499)  # the client went away


def _format_grammar(rf) -> str:
    from ..runtime.constraints import grammar

    spec = {"type": rf.type}
    if rf.type == "json_schema":
        if rf.json_schema is None:
            raise ApiError(400, "response_format json_schema needs a json_schema object with a schema",
                           param="response_format.json_schema")
        spec["json_schema"] = {"schema": rf.json_schema.schema_}
    try:
        return grammar(spec)
    except EdgeSDKError as e:
        raise ApiError(400, str(e), param="response_format") from None


async def _chat_stream(worker, job, queue, base, splitter, want_logprobs: bool, include_usage: bool):
    done = False

    def chunk(delta, finish=None, logprobs=None, **extra):
        body = {**base, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}
        if include_usage:
            body["usage"] = None
        return json.dumps(body | extra)

    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            event = await queue.get()
            if event[0] == "chunk":
                text = splitter.feed(event[1]) if splitter else event[1]
                lp = _chat_logprobs(event[2]) if want_logprobs and event[2] else None
                if text or lp:
                    yield chunk({"content": text}, logprobs=lp)
            elif event[0] == "error":
                e = event[1]
                kind = "invalid_request_error" if isinstance(e, EdgeSDKError) else "server_error"
                yield json.dumps(error_body(f"generation failed: {e}", kind))
                done = True
                break
            else:
                result, calls = event[1], []
                if splitter:
                    rest, calls = splitter.finish()
                    if rest:
                        yield chunk({"content": rest})
                    for i, call in enumerate(calls):
                        head = {"index": i, "id": call["id"], "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""}}
                        yield chunk({"tool_calls": [head]})
                        yield chunk({"tool_calls": [{"index": i, "function": {"arguments": call["function"]["arguments"]}}]})
                yield chunk({}, _finish_reason(result, calls))
                if include_usage:
                    yield json.dumps({**base, "object": "chat.completion.chunk", "choices": [],
                                      "usage": _usage(result)})
                done = True
                break
        yield "[DONE]"
    finally:
        if not done:  # the client disconnected: free the slot at its next step
            worker.cancel(job)


# -- /v1/completions -----------------------------------------------------------------------
async def completion(request: Request, req: CompletionRequest, model, worker: Worker, model_id: str, ping_s: float):
    prompt = req.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt has {len(prompt)} strings; send one (batches are not supported)",
                           param="prompt")
        prompt = prompt[0]
    try:
        ids = model.encode_prompt(prompt=prompt)
    except EdgeSDKError as e:
        raise ApiError(400, str(e), param="prompt") from None
    _check_context(model, ids)
    settings = _settings(req, model, len(ids), req.max_tokens or 16)  # OpenAI's default for completions
    job, queue = _submit(worker, ids, settings, req.logprobs)
    rid, created = "cmpl-" + uuid.uuid4().hex[:24], int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": model_id,
            "system_fingerprint": "edgesdk"}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return EventSourceResponse(_completion_stream(worker, job, queue, base, req.logprobs is not None,
                                                      include_usage), ping=ping_s, sep="\n")
    entries = []
    async for event in _events(request, worker, job, queue):
        if event[0] == "chunk":
            entries.extend(event[2] or [])
        elif event[0] == "error":
            _raise_job_error(event[1])
        else:
            result = event[1]
            lp = _completion_logprobs(_trim(entries, result.text)) if req.logprobs is not None else None
            return {**base, "usage": _usage(result),
                    "choices": [{"index": 0, "text": result.text, "logprobs": lp,
                                 "finish_reason": _finish_reason(result, [])}]}
    return Response(status_code=499)


def _completion_logprobs(entries: list[dict], offset: int = 0) -> dict:
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [dict(e["top"]) for e in entries], "text_offset": offsets}


async def _completion_stream(worker, job, queue, base, want_logprobs: bool, include_usage: bool):
    done, offset = False, 0
    try:
        while True:
            event = await queue.get()
            if event[0] == "chunk":
                text, entries = event[1], event[2] or []
                if text or entries:
                    lp = _completion_logprobs(entries, offset) if want_logprobs else None
                    offset += len(text)
                    yield json.dumps({**base, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                                           "finish_reason": None}]})
            elif event[0] == "error":
                yield json.dumps(error_body(f"generation failed: {event[1]}", "server_error"))
                done = True
                break
            else:
                result = event[1]
                yield json.dumps({**base, "choices": [{"index": 0, "text": "", "logprobs": None,
                                                       "finish_reason": _finish_reason(result, [])}]})
                if include_usage:
                    yield json.dumps({**base, "choices": [], "usage": _usage(result)})
                done = True
                break
        yield "[DONE]"
    finally:
        if not done:
            worker.cancel(job)
