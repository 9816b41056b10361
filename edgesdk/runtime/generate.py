"""The generation loop: token sources (plain decoding here, speculative in speculative.py)
feed a driver that handles EOS, stop strings, length and context limits, streaming text and
timings. A token source is an iterator of (tokens, from_draft) steps.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from . import sampling
from .decoder import Decoder
from .tokenizer import IncrementalDecoder, Tokenizer

TokenSource = Iterator[tuple[list[int], bool]]


@dataclass
class GenerationConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    num_draft_tokens: int | None = None  # speculative decoding: None = adaptive, 0 = plain steps
    response_format: Any = None  # constrained decoding (constraints.py); Model turns it into a processor
    logits_processors: Sequence[Callable[[np.ndarray, Sequence[int]], np.ndarray]] = ()

    def validate(self) -> None:
        sampling.validate(self.temperature, self.top_k, self.top_p, self.repetition_penalty, self.max_new_tokens)
        if any(not callable(f) for f in self.logits_processors):
            raise InvalidArgumentError("logits_processors must be callables (logits, context_ids) -> logits")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidArgumentError("stop must be a list of non-empty strings")
        k = self.num_draft_tokens
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise InvalidArgumentError(
                f"num_draft_tokens={k!r} is invalid: use None (adaptive), 0 (no drafting) or a positive integer")

    def sampler(self, rng: np.random.Generator | None = None) -> sampling.TokenSampler:
        """(logits, context) -> token: the logits processors, the repetition penalty, then greedy
        or a draw; ``.distribution(logits, context)`` is the distribution a draw uses (shared by
        plain and speculative decoding). ``rng`` defaults to one seeded with ``seed``."""
        return sampling.TokenSampler(self.temperature, self.top_k, self.top_p, self.repetition_penalty,
                                     self.logits_processors,
                                     rng if rng is not None else np.random.default_rng(self.seed))


@dataclass
class GenerationChunk:
    text: str
    token_ids: list[int]
    from_draft: bool = False
    finish_reason: str | None = None  # set on the last chunk: "stop", "length" or "context"
    speculative: dict[str, Any] | None = None  # acceptance statistics so far (speculative decoding only)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    generated_tokens: int
    time_to_first_token_s: float
    decode_tokens_per_s: float
    total_s: float
    prefilled_tokens: int  # prompt tokens actually computed (fewer when a cached prefix was reused)
    speculative: dict[str, Any] | None = field(default=None)

    def __str__(self) -> str:
        return self.text


def plain_tokens(decoder: Decoder, prompt_ids: Sequence[int], pending: Sequence[int],
                 pick: Callable[[np.ndarray, Sequence[int]], int]) -> TokenSource:
    """One target forward per token. ``pending`` are the prompt tokens not yet in the cache."""
    context = list(prompt_ids)
    logits = decoder.forward(pending, keep=1)[-1]  # a prefill computes only the last row
    while True:
        tok = pick(logits, context)
        context.append(tok)
        yield [tok], False
        logits = decoder.forward([tok], keep=1)[-1]


class Driver:
    """Consumes a token source, applies the stopping rules and produces chunks + a result."""

    def __init__(self, tokenizer: Tokenizer, config: GenerationConfig, eos_ids: set[int],
                 prompt_tokens: int, room: int, prefilled: int, started: float):
        self.tok = tokenizer
        self.cfg = config
        self.eos = eos_ids
        self.prompt_tokens = prompt_tokens
        self.budget = min(config.max_new_tokens, room)
        self.limit_reason = "length" if config.max_new_tokens <= room else "context"
        self.prefilled = prefilled
        self.started = started
        self.detok = IncrementalDecoder(tokenizer)
        self.tokens: list[int] = []
        self.emitted = 0  # chars of detok.text already handed out
        self.first_at: float | None = None
        self.finish_reason: str | None = None
        self.text_end: int | None = None  # set when a stop string truncates the text
        self.hold = max((len(s) for s in config.stop), default=1) - 1
        self.stats: dict[str, Any] | None = None

    def run(self, source: TokenSource) -> Iterator[GenerationChunk]:
        try:
            for new, from_draft in source:
                if self.first_at is None:
                    self.first_at = time.perf_counter()
                kept = []
                # token by token, so a stop inside a multi-token (speculative) step ends exactly
                # where one-token steps would have ended
                for t in new:
                    kept.append(t)
                    if t in self.eos:
                        self.finish_reason = "stop"
                        break
                    self.detok.add([t])
                    if self.cfg.stop:
                        self._check_stop()
                        if self.finish_reason:
                            break
                    if len(self.tokens) + len(kept) >= self.budget:
                        self.finish_reason = self.limit_reason
                        break
                self.tokens.extend(kept)
                chunk = self._chunk(kept, from_draft)
                if chunk is not None:
                    yield chunk
                if self.finish_reason:
                    return
        finally:
            self.ended = time.perf_counter()
            if hasattr(source, "close"):
                source.close()

    def _check_stop(self) -> None:
        text = self.detok.text
        start = max(0, self.emitted - self.hold)
        hits = [i for i in (text.find(s, start) for s in self.cfg.stop) if i >= 0]
        if hits:
            self.text_end = min(hits)
            self.finish_reason = "stop"

    def _chunk(self, kept: list[int], from_draft: bool) -> GenerationChunk | None:
        if self.finish_reason and self.text_end is None:
            self.detok.finish()
        text = self.detok.text if self.text_end is None else self.detok.text[: self.text_end]
        end = len(text)
        if not self.finish_reason and self.cfg.stop:
            # hold back a tail that could be the start of a stop string
            for k in range(min(self.hold, end - self.emitted), 0, -1):
                if any(s.startswith(text[end - k:]) for s in self.cfg.stop):
                    end -= k
                    break
        out = text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        stats = dict(self.stats) if self.stats else None
        if not out and not self.finish_reason:
            return None if not kept else GenerationChunk("", kept, from_draft, speculative=stats)
        return GenerationChunk(out, kept, from_draft, self.finish_reason, stats)

    def result(self) -> GenerationResult:
        text = self.detok.text if self.text_end is None else self.detok.text[: self.text_end]
        first = self.first_at or self.ended
        n = len(self.tokens)
        decode_s = self.ended - first
        return GenerationResult(
            text=text, token_ids=list(self.tokens), finish_reason=self.finish_reason or self.limit_reason,
            prompt_tokens=self.prompt_tokens, generated_tokens=n,
            time_to_first_token_s=first - self.started,
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
            total_s=self.ended - self.started, prefilled_tokens=self.prefilled,
            speculative=dict(self.stats) if self.stats else None)
