"""Tool calls: tools go into the model's own chat template; calls in the output are parsed into
OpenAI's tool_calls. Two output styles:

- "hermes": ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, Qwen3 and any
  template that names <tool_call>; also what we ask of a template without tool support, whose
  system message then gets the tool list)
- "llama": a bare ``{"name": ..., "parameters": {...}}`` (Llama 3.1+ templates)
"""
from __future__ import annotations

import json
import re
import uuid
from typing import Any

from ..errors import InvalidArgumentError
from ..runtime.constraints import JSON_OPTIONS

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def style(template: str | None) -> tuple[str, bool]:
    """(output style, whether the template renders tools itself)."""
    t = template or ""
    if "tools" not in t:
        return "hermes", False
    if OPEN in t:
        return "hermes", True
    if "<|python_tag|>" in t or "parameters" in t:
        return "llama", True
    return "hermes", True


def _system_text(tools: list[dict]) -> str:
    lines = "\n".join(json.dumps(t["function"], ensure_ascii=False, separators=(",", ":")) for t in tools)
    return (f"You can call these functions:\n<tools>\n{lines}\n</tools>\nTo call one, reply with "
            f'{OPEN}{{"name": <name>, "arguments": <JSON object>}}{CLOSE}')


def prepare(messages: list[dict], tools: list[dict] | None, template: str | None) -> tuple[list[dict], list | None]:
    """Messages (and the tools= to hand the template) for a request that may carry tools and
    earlier tool calls/results."""
    kind, native = style(template)
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if calls:
            if native:  # templates expect arguments as a mapping
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _args(c["function"])}}
                                   for c in calls]
                if m.get("content") is None:
                    m["content"] = ""
            else:
                text = "".join(f"{OPEN}\n{json.dumps({'name': c['function']['name'], 'arguments': _args(c['function'])})}"
                               f"\n{CLOSE}" for c in calls)
                m = {"role": m["role"], "content": (m.get("content") or "") + text}
        elif m.get("content") is None:
            m["content"] = ""
        if m["role"] == "tool" and not native:
            m = {"role": "tool", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        out.append(m)
    if not tools:
        return out, None
    if native:
        return out, tools
    system = _system_text(tools)
    if out and out[0]["role"] == "system":
        out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out, None


def _args(function: dict) -> Any:
    a = function.get("arguments")
    if isinstance(a, str):
        try:
            return json.loads(a)
        except ValueError:
            return a
    return a


def call_grammar(tools: list[dict], choice: Any, template: str | None) -> str:
    """A Lark grammar (llguidance) that admits exactly one valid call: of the named function, or
    of any tool for tool_choice "required"."""
    kind, _ = style(template)
    key = "parameters" if kind == "llama" else "arguments"
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        chosen = [t for t in tools if t["function"]["name"] == name]
        if not chosen:
            raise InvalidArgumentError(f"tool_choice names {name!r}, which is not in tools; name one of "
                                       f"{[t['function']['name'] for t in tools]}")
    else:
        chosen = tools
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                 key: t["function"].get("parameters") or {"type": "object"}},
                "required": ["name", key], "additionalProperties": False} for t in chosen]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    schema = {**schema, "x-guidance": JSON_OPTIONS}  # compact JSON: no free whitespace to pad with
    body = f"%json {json.dumps(schema)}"
    if kind == "llama":
        return f"start: call\ncall: {body}\n"
    return f"start: {json.dumps(OPEN + chr(10))} call {json.dumps(chr(10) + CLOSE)}\ncall: {body}\n"


_HERMES = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.S)


def parse(text: str, template: str | None) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) from a model's output; content is None when it is only calls."""
    kind, _ = style(template)
    calls = []
    if kind == "llama":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        for part in (body.split(";") if body.startswith("{") else []):
            call = _call(part, "parameters")
            if call is None:
                return text, []
            calls.append(call)
        return (None, calls) if calls else (text, [])
    rest = text
    for m in _HERMES.finditer(text):
        call = _call(m.group(1), "arguments")
        if call is not None:
            calls.append(call)
            rest = rest.replace(m.group(0), "", 1)
    if not calls:
        return text, []
    rest = rest.strip()
    return (rest or None), calls


def _call(text: str, key: str) -> dict | None:
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


class StreamSplitter:
    """Splits streamed text into content deltas and (at the end) tool calls: content flows until
    something that may start a call appears; from there the text is held and parsed at the end."""

    def __init__(self, template: str | None):
        self.template = template
        self.kind, _ = style(template)
        self.held = ""
        self.sent = 0  # chars of held already emitted as content
        self.in_call = False

    def feed(self, text: str) -> str:
        self.held += text
        if self.in_call:
            return ""
        if self.kind == "llama":
            stripped = self.held.lstrip()
            if stripped.startswith(("{", "<|python_tag|>")) and self.sent == 0:
                self.in_call = True
                return ""
            if not stripped:
                return ""
            out, self.sent = self.held[self.sent:], len(self.held)
            return out
        i = self.held.find(OPEN, self.sent)
        if i >= 0:
            self.in_call = True
            out, self.sent = self.held[self.sent:i], i
            return out
        end = len(self.held)
        for k in range(min(len(OPEN) - 1, end - self.sent), 0, -1):  # a tail that may begin <tool_call>
            if OPEN.startswith(self.held[end - k:]):
                end -= k
                break
        out, self.sent = self.held[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """(content not yet emitted, tool calls)."""
        rest = self.held[self.sent:]
        if not rest:
            return "", []
        content, calls = parse(rest, self.template)
        if not calls:
            return rest, []
        return content or "", calls
