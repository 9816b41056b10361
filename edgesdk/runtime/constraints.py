"""Constrained decoding: a JSON schema, regex or Lark grammar compiled by llguidance into a
token mask applied to the logits at every step (a logits processor, see generate.py).

llguidance is optional (``pip install edgesdk[serve]``): the runtime imports without it and
only a request for ``response_format`` needs it.
"""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np

from ..errors import EdgeSDKError, InvalidArgumentError

FORMATS = ("text", "json_object", "json_schema", "regex", "grammar")
# compact JSON with the usual spaces: free whitespace lets a weak model pad forever
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise EdgeSDKError("response_format needs llguidance: pip install \"edgesdk[serve]\"") from None
    return llguidance


def ll_tokenizer(tokenizer, eos_ids: Sequence[int]):
    """llguidance's view of our tokenizer (built once per Tokenizer: it takes ~1 s)."""
    ll = tokenizer.__dict__.get("_llguidance")
    if ll is None:
        lg = _llguidance()
        eos = sorted(eos_ids) or None
        ll = lg.LLTokenizer(tokenizer._tok.to_str(), eos_token=eos)
        tokenizer._llguidance = ll
    return ll


def grammar(response_format: Any) -> str | None:
    """The llguidance grammar for a response_format (None for plain text)."""
    lg = _llguidance()
    rf = response_format
    if isinstance(rf, str):
        rf = {"type": rf}
    if not isinstance(rf, dict):
        raise InvalidArgumentError(f"response_format must be a dict such as {{'type': 'json_object'}}, "
                                   f"not {type(rf).__name__}")
    kind = rf.get("type")
    if kind not in FORMATS:  # a bare JSON schema
        kind, rf = "json_schema", {"type": "json_schema", "json_schema": {"schema": rf}}
    if kind == "text":
        return None
    if kind == "json_object":
        return lg.LLMatcher.grammar_from_json_schema({"type": "object"}, JSON_OPTIONS)
    if kind == "json_schema":
        spec = rf.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidArgumentError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        return lg.LLMatcher.grammar_from_json_schema(json.dumps(schema), JSON_OPTIONS)
    key = kind
    if not isinstance(rf.get(key), str) or not rf[key]:
        raise InvalidArgumentError(f"response_format {kind} needs a non-empty string field {key!r}")
    if kind == "regex":
        return lg.LLMatcher.grammar_from_regex(rf["regex"])
    return lg.LLMatcher.grammar_from_lark(rf["grammar"])


class Constraint:
    """Logits processor: masks every token the grammar does not allow next.

    It learns what was sampled from the context it is handed on the next call (the first
    call's context is the prompt); a context that went back (a rejected speculative draft) rolls
    the grammar back, so draft proposals and verification steps are masked too.
    ``mask_s`` and ``steps`` measure what the mask costs.
    """

    def __init__(self, matcher, vocab_size: int, eos_ids: Sequence[int] = ()):
        lg = _llguidance()
        self.matcher = matcher
        self.eos = set(eos_ids)
        self._fill = lg.numpy.fill_next_token_bitmask
        self._bits = lg.numpy.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size
        self.start: int | None = None
        self.tokens: list[int] = []  # what the matcher has consumed (after the prompt)
        self.mask_s = 0.0
        self.steps = 0

    def __call__(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        t0 = time.perf_counter()
        if self.start is None:
            self.start = len(context)
        want, have = context[self.start:], self.tokens
        n = len(have)
        if len(want) < n or want[:n] != have:  # speculative decoding went back: roll the grammar back too
            n = next((i for i, (a, b) in enumerate(zip(have, want)) if a != b), min(len(have), len(want)))
            self.matcher.rollback(len(have) - n)
            del have[n:]
        new = [int(t) for t in want[n:]]
        if new:
            ok = self.matcher.try_consume_tokens(new)
            have.extend(new[:ok])
            if ok < len(new) and new[ok] in self.eos and self.matcher.is_accepting():
                return logits  # a step past the end (a speculative step after EOS): the driver drops it
            if ok < len(new):
                raise EdgeSDKError(f"token {new[ok]} breaks the output constraint; this is a bug in the decoding "
                                   "loop, please report it")
        if self.matcher.is_error():
            raise EdgeSDKError(f"the output constraint failed: {self.matcher.get_error()}; "
                               "check the schema or grammar")
        self._fill(self.matcher, self._bits)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: logits.shape[-1]]
        if allowed.shape[0] < logits.shape[-1]:  # graph vocabulary wider than the tokenizer's
            allowed = np.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        out = np.where(allowed.astype(bool), logits, -np.inf).astype(logits.dtype, copy=False)
        self.mask_s += time.perf_counter() - t0
        self.steps += 1
        return out


def constraint(tokenizer, response_format: Any, eos_ids: Sequence[int]) -> Constraint | None:
    g = grammar(response_format)
    if g is None:
        return None
    return matcher_constraint(tokenizer, g, eos_ids)


def matcher_constraint(tokenizer, grammar_text: str, eos_ids: Sequence[int]) -> Constraint:
    lg = _llguidance()
    ll = ll_tokenizer(tokenizer, eos_ids)
    error = lg.LLMatcher.validate_grammar(grammar_text, ll)
    if error and not error.startswith("WARNING"):
        raise InvalidArgumentError(f"response_format is invalid: {error.splitlines()[0][:300]}")
    m = lg.LLMatcher(ll, grammar_text, log_level=0)
    if m.is_error():
        raise InvalidArgumentError(f"response_format is invalid: {m.get_error()[:300]}")
    return Constraint(m, ll.vocab_size, eos_ids)
