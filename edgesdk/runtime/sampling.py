"""Samplers and logits processors: plain functions made by small factories."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..errors import InvalidArgumentError

Sampler = Callable[[np.ndarray], int]
Processor = Callable[[np.ndarray, Sequence[int]], np.ndarray]


def validate(temperature: float, top_k: int, top_p: float, repetition_penalty: float,
             max_new_tokens: int) -> None:
    def bad(name, value, rule):
        raise InvalidArgumentError(f"{name}={value!r} is invalid: {rule}")
    if not isinstance(temperature, (int, float)) or math.isnan(temperature) or temperature < 0:
        bad("temperature", temperature, "use 0 for greedy or a positive number")
    if not isinstance(top_k, int) or top_k < 0:
        bad("top_k", top_k, "use 0 to disable or a positive integer")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        bad("top_p", top_p, "it must be in (0, 1]")
    if not isinstance(repetition_penalty, (int, float)) or repetition_penalty <= 0:
        bad("repetition_penalty", repetition_penalty, "use 1.0 to disable or a positive number")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        bad("max_new_tokens", max_new_tokens, "it must be a positive integer")


def repetition_penalty(penalty: float) -> Processor | None:
    """transformers' rule: divide positive logits of seen tokens by ``penalty``, multiply negative ones."""
    if penalty == 1.0:
        return None

    def process(logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        seen = np.unique(np.asarray(context, dtype=np.int64))
        if seen.size:
            logits = logits.copy()
            vals = logits[seen]
            logits[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
        return logits
    return process


def distribution(temperature: float, top_k: int = 0, top_p: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """logits -> probabilities after temperature, top-k and top-p (temperature > 0)."""

    def probs(logits: np.ndarray) -> np.ndarray:
        x = logits.astype(np.float64) / temperature
        if 0 < top_k < x.shape[-1]:
            kth = np.partition(x, -top_k)[-top_k]
            x = np.where(x < kth, -np.inf, x)
        x = x - x.max()
        p = np.exp(x)
        p /= p.sum()
        if top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, top_p)) + 1]
            mask = np.zeros_like(p)
            mask[keep] = p[keep]
            p = mask / mask.sum()
        return p
    return probs


def sampler(temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> Sampler:
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    probs = distribution(temperature, top_k, top_p)

    def sample(logits: np.ndarray) -> int:
        p = probs(logits)
        return int(rng.choice(p.shape[-1], p=p))
    return sample


def presence_frequency_penalty(presence: float, frequency: float) -> Processor | None:
    """OpenAI's rule over the generated tokens only: logit -= count * frequency + (count > 0) * presence.
    The first call's context is the prompt; later tokens are what was generated."""
    if not presence and not frequency:
        return None
    start: list[int] = []

    def process(logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        if not start:
            start.append(len(context))
        generated = np.asarray(context[start[0]:], dtype=np.int64)
        if generated.size == 0:
            return logits
        tokens, counts = np.unique(generated, return_counts=True)
        logits = logits.copy()
        logits[tokens] -= counts * frequency + presence
        return logits
    return process
