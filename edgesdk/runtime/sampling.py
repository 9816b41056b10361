"""Samplers and logits processors.

One function, ``next_token_distribution``, turns logits into the distribution a token is drawn
from (temperature, top-k, top-p with transformers' semantics); the plain sampler draws from it
and speculative decoding's rejection step compares the target's and the draft's, so both draw
from exactly the same distribution. It costs O(V) vectorised passes plus a sort of a small
candidate set (never a full sort of the vocabulary):

* top-k: the candidates are the logits within a margin of the maximum, widened until they hold
  k tokens; the k-th largest is partitioned out of those (ties with it are kept, as in
  transformers' ``TopKLogitsWarper``).
* top-p: the full softmax mass Z is computed (one exp pass); the candidates are the tokens
  within a margin of the maximum, widened until their mass reaches top_p * Z, so they always
  hold the whole nucleus (top_p is over the full distribution, never a truncated one). They are
  binned by logit; only the bin where the cumulative mass crosses top_p * Z is sorted. A token
  is kept when the mass ranked before it is < top_p (transformers' ``TopPLogitsWarper``); among
  equal logits the lower token id ranks first (transformers' order there is torch.sort's,
  which is not stable: the same number of tied tokens is kept, maybe other ones).
* no truncation: the distribution stays dense and a draw uses block sums (two small cumsums).

The repetition penalty (and the presence/frequency penalty) keep per-token counts of the
context incrementally (``ContextCounts``): each step costs O(new tokens + distinct tokens), not
np.unique over the whole context, and a rollback (speculative decoding rejecting drafts) is
followed exactly.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

from ..errors import InvalidArgumentError

Sampler = Callable[[np.ndarray], int]
Processor = Callable[[np.ndarray, Sequence[int]], np.ndarray]

_BLOCK = 1024  # dense draws: block sums, then a cumsum inside one block
_MARGINS = (8.0, 9.5, 11.0, 13.0, 16.0, 20.0, 26.0, 34.0, 64.0, 128.0)  # candidate margins below the max (nats)


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


# -- the distribution ---------------------------------------------------------------------------
class Distribution:
    """A next-token distribution over a vocabulary of ``size`` tokens.

    Sparse: ``ids`` (int64) with ``weights`` (unnormalised, float32 or float64), every other
    token has probability 0. Dense: ``ids`` is None and ``weights`` covers the vocabulary
    (padded with zeros to whole blocks). ``total`` is the sum of the weights.
    """

    __slots__ = ("ids", "weights", "total", "size", "_blocks", "_lookup")

    def __init__(self, ids: np.ndarray | None, weights: np.ndarray, size: int, total: float | None = None,
                 blocks: np.ndarray | None = None):
        self.ids = ids
        self.weights = weights
        self.size = size
        self._blocks = blocks  # dense: cumulative block sums (float64)
        if total is None:
            total = float(blocks[-1]) if blocks is not None else float(weights.sum(dtype=np.float64))
        self.total = total
        self._lookup = None

    # construction
    @classmethod
    def point(cls, token: int, size: int) -> "Distribution":
        return cls(np.array([token], dtype=np.int64), np.ones(1), size, 1.0)

    @classmethod
    def from_probs(cls, p: np.ndarray) -> "Distribution":
        """A dense probability (or weight) vector."""
        p = np.asarray(p)
        return _dense(p, p.shape[-1])

    # queries
    def prob(self, token: int) -> float:
        token = int(token)
        if self.ids is None:
            return float(self.weights[token]) / self.total if 0 <= token < self.size else 0.0
        if self.ids.size == 1:
            return float(self.weights[0]) / self.total if self.ids[0] == token else 0.0
        hit = np.flatnonzero(self.ids == token)
        return float(self.weights[hit[0]]) / self.total if hit.size else 0.0

    def probs_at(self, ids: np.ndarray) -> np.ndarray:
        """Probabilities of ``ids`` (float64); ids outside the vocabulary or the support get 0."""
        ids = np.asarray(ids, dtype=np.int64)
        if self.ids is None:
            out = np.zeros(ids.shape, dtype=np.float64)
            ok = (ids >= 0) & (ids < self.size)
            out[ok] = self.weights[ids[ok]] / self.total
            return out
        if self._lookup is None:
            order = np.argsort(self.ids, kind="stable")
            self._lookup = (self.ids[order], self.weights[order].astype(np.float64) / self.total)
        keys, vals = self._lookup
        pos = np.minimum(np.searchsorted(keys, ids), keys.size - 1)
        return np.where(keys[pos] == ids, vals[pos], 0.0)

    def support(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) of the tokens with a nonzero probability, ids ascending."""
        if self.ids is None:
            w = self.weights[: self.size]
            ids = np.flatnonzero(w)
            return ids, w[ids].astype(np.float64) / self.total
        keep = self.weights > 0
        ids, w = self.ids[keep], self.weights[keep]
        order = np.argsort(ids, kind="stable")
        return ids[order], w[order].astype(np.float64) / self.total

    def dense(self) -> np.ndarray:
        """The probability vector over the vocabulary (float64)."""
        if self.ids is None:
            return self.weights[: self.size].astype(np.float64) / self.total
        p = np.zeros(self.size, dtype=np.float64)
        p[self.ids] = self.weights / self.total
        return p

    # drawing
    def sample(self, rng: np.random.Generator) -> int:
        if self.ids is not None:
            if self.ids.size == 1:
                return int(self.ids[0])
            cum = np.cumsum(self.weights, dtype=np.float64)
            i = int(np.searchsorted(cum, rng.random() * cum[-1], side="right"))
            if i >= cum.size:  # u rounded up to the total: the last token with weight
                i = int(np.flatnonzero(self.weights)[-1])
            return int(self.ids[i])
        blocks = self._blocks
        u = rng.random() * blocks[-1]
        b = int(np.searchsorted(blocks, u, side="right"))  # the first block whose end passes u
        if b >= blocks.size:  # u rounded up to the total: the last block with weight
            b = int(np.flatnonzero(np.diff(blocks, prepend=0.0))[-1])
        u -= blocks[b - 1] if b else 0.0
        w = self.weights[b * _BLOCK: (b + 1) * _BLOCK]
        j = int(np.searchsorted(np.cumsum(w, dtype=np.float64), u, side="right"))
        if j >= w.size:  # rounding at the block's end
            j = int(np.flatnonzero(w)[-1])
        return b * _BLOCK + j

    # speculative decoding
    def residual(self, q: "Distribution | None", token: int) -> "Distribution":
        """max(0, p - q) normalised (a rejected draft token drawn from q); q None: a point-mass
        proposal of ``token``, so p without it. Falls back to p when nothing is left."""
        if self.ids is None:
            r = self.dense()
            if q is None:
                if 0 <= int(token) < self.size:
                    r[int(token)] = 0.0
            else:
                r -= _as_dense(q, self.size)
                np.maximum(r, 0.0, out=r)
            out = _dense(r, self.size)
        else:
            p = self.weights.astype(np.float64) / self.total
            r = p.copy()
            if q is None:
                r[self.ids == int(token)] = 0.0
            else:
                r = np.maximum(p - q.probs_at(self.ids), 0.0)
            out = Distribution(self.ids, r, self.size, float(r.sum()))
        return out if out.total > 0 else self


def _as_dense(q: Distribution, size: int) -> np.ndarray:
    """q's probabilities over a vocabulary of ``size`` tokens (cut or padded with zeros; a draft
    graph may pad its vocabulary differently). Mass beyond ``size`` is not renormalised: those
    tokens have probability 0 under the target, and rejection sampling needs q as drawn."""
    out = np.zeros(size, dtype=np.float64)
    if q.ids is None:
        n = min(size, q.size)
        out[:n] = q.weights[:n] / q.total
    else:
        ok = q.ids < size
        out[q.ids[ok]] = q.weights[ok] / q.total
    return out


def _dense(weights: np.ndarray, size: int) -> Distribution:
    """A dense distribution over ``weights[:size]``: padded to whole blocks, with block sums."""
    nb = -(-size // _BLOCK)
    if weights.shape[-1] != nb * _BLOCK:
        w = np.zeros(nb * _BLOCK, dtype=weights.dtype)
        w[:size] = weights[:size]
    else:
        w = weights
    sums = w.reshape(nb, _BLOCK) @ _ones(_BLOCK, w.dtype)
    return Distribution(None, w, size, blocks=np.cumsum(sums, dtype=np.float64))


def _penalized(x: np.ndarray, ids: np.ndarray, penalty: float) -> np.ndarray:
    """transformers' repetition penalty of the logits ``x[ids]`` (float32)."""
    v = x[ids]
    return np.where(v < 0, v * np.float32(penalty), v / np.float32(penalty))


def next_token_distribution(logits: np.ndarray, temperature: float, top_k: int = 0,
                            top_p: float = 1.0, scratch: np.ndarray | None = None,
                            penalty: tuple[np.ndarray, np.ndarray, float] | None = None,
                            hint: list[int] | None = None) -> Distribution:
    """The distribution transformers' Temperature -> TopK -> TopP warpers sample from.

    ``logits`` (1-D, float32) are the processed logits; they are not modified. temperature 0:
    a point mass on the argmax (the first on ties). ``scratch``: an optional float32 work
    buffer of at least ``logits.size`` (never part of the result). ``penalty``: (distinct seen
    token ids, per-token counts, factor), transformers' repetition penalty applied on the fly
    (without copying the logits where the path allows). ``hint``: [margin index, streak],
    the top-p candidate margin to try first (a sampler keeps it from step to step; the result
    never depends on it, only the number of passes does).
    """
    x = logits if logits.dtype == np.float32 else logits.astype(np.float32)
    size = x.shape[-1]
    if penalty is not None and (temperature == 0 or 0 < top_k < size):
        x = x.copy()
        x[penalty[0]] = _penalized(x, penalty[0], penalty[2])
        penalty = None
    if temperature == 0:
        return Distribution.point(int(np.argmax(x)), size)
    t = np.float32(temperature)
    if not 0 < top_k < size:
        return _full(x, t, top_p, size, scratch, penalty, hint)
    xm = x.max()
    if xm == -np.inf or np.isnan(xm):
        raise InvalidArgumentError("every token is masked out (all logits are -inf or NaN): nothing to sample")
    m = xm / t  # float32: the max of x / T (division rounds monotonically), as transformers computes it

    # top-k: the k-th largest lies among the logits within some margin of the max; the margin is
    # wide enough when the k-th scaled logit is above the lowest candidate's, so no token
    # left out can tie with it
    for margin in _MARGINS:
        cand = np.flatnonzero(x >= xm - np.float32(margin) * t)
        if cand.size < top_k:
            continue
        v = x[cand] / t  # float32 x / T, bit for bit what transformers computes
        kth = np.partition(v, -top_k)[-top_k]
        if kth > v.min():
            break
    else:
        cand = np.flatnonzero(x > -np.inf)
        v = x[cand] / t
        kth = np.partition(v, -top_k)[-top_k] if cand.size > top_k else v.min()
    keep = v >= kth  # ties with the k-th are kept
    cand, v = cand[keep], v[keep]
    w = np.exp(v - m)
    if top_p >= 1.0:
        nz = w > 0
        return Distribution(cand[nz], w[nz], size)
    return _nucleus(cand, v, w, float(w.sum(dtype=np.float64)), top_p, size)[0]


def _full(x: np.ndarray, t: np.float32, top_p: float, size: int, scratch: np.ndarray | None,
          penalty: tuple[np.ndarray, np.ndarray, float] | None, hint: list[int] | None = None) -> Distribution:
    """Temperature (and top-p) over the full softmax, the repetition penalty patched in."""
    if top_p >= 1.0 or scratch is None or scratch.size < size:
        scratch = np.empty(-(-size // _BLOCK) * _BLOCK, dtype=np.float32)
    s = scratch[:size]
    np.divide(x, t, out=s)  # float32 x / T, bit for bit what transformers computes
    if penalty is not None:
        ids, counts, factor = penalty
        s[ids] = _penalized(x, ids, factor) / t
    m = s.max()
    if m == -np.inf or np.isnan(m):
        raise InvalidArgumentError("every token is masked out (all logits are -inf or NaN): nothing to sample")
    first = hint[0] if hint else 0
    if top_p < 1.0:  # the hinted margin's candidates and their scaled logits, taken before the exp
        cand = np.flatnonzero(s >= m - np.float32(_MARGINS[first]))
        v = s[cand]  # x / T, penalised: bit for bit what the logits give
    # weights exp(x / T - max), or exp(x / T) with the max's factor kept apart (one pass fewer)
    # where that neither overflows nor underflows anything exp(x / T - max) keeps
    shift = 1.0
    if 16.0 <= m < 60.0:
        shift = math.exp(-float(m))  # weight = exp(x / T) * shift
    else:
        np.subtract(s, m, out=s)
    np.exp(s, out=s)
    if top_p >= 1.0:
        scratch[size:] = 0.0
        return _dense(scratch, size)
    total = float(np.dot(s, _ones(size)))
    need = top_p * total
    # candidates: an upper set of the scaled logits (those within a margin of the max), widened
    # until they hold top_p of the mass, so the whole nucleus is among them
    w = s[cand]
    i = first
    if float(w.sum(dtype=np.float64)) < need:
        for i in range(first + 1, len(_MARGINS)):
            cand = np.flatnonzero(s >= np.float32(math.exp(-_MARGINS[i]) / shift))
            w = s[cand]
            if float(w.sum(dtype=np.float64)) >= need:
                break
        else:
            i = len(_MARGINS) - 1
            cand = np.flatnonzero(s > 0)
            w = s[cand]
        xc = x[cand]
        if penalty is not None and counts.size:
            seen = counts[np.minimum(cand, counts.size - 1)] > 0
            seen &= cand < counts.size
            if seen.any():
                xc[seen] = _penalized(xc, np.flatnonzero(seen), factor)
        v = xc / t
    if hint is not None:  # next time: this margin; after 16 steps in a row at it, try a narrower one
        streak = hint[1] + 1 if i == first else 0
        hint[:] = [i - 1, 0] if i > 0 and streak >= 16 else [i, streak]
    return _nucleus(cand, v, w, total, top_p, size)[0]


def _nucleus(ids: np.ndarray, v: np.ndarray, w: np.ndarray, total: float, top_p: float,
             size: int) -> tuple[Distribution, float]:
    """transformers' top-p over ``ids`` (ascending) with scaled logits ``v`` and weights ``w``,
    which hold the nucleus of a distribution of mass ``total``: rank by v (equal v: lower id
    first) and keep each token whose preceding mass is < top_p * total (at least the first).

    Only the tokens of one bin are sorted: bin the candidates by v, find the bin where the
    cumulative mass crosses top_p * total; the bins above it are kept whole, the ones below
    dropped (a bin holds whole tie groups, since equal v fall into the same bin). Also returns
    the mass ranked before the last token kept."""
    need = top_p * total
    nz = w > 0  # zero-weight tokens change no preceding mass and are never drawn
    if not nz.all():
        ids, v, w = ids[nz], v[nz], w[nz]
    if ids.size > 1024:
        d = v.max() - v
        span = float(d.max())
        nbins = min(256, ids.size // 8)
        b = np.minimum((d * np.float32(nbins / span)).astype(np.intp), nbins - 1) if span > 0 else \
            np.zeros(ids.size, dtype=np.intp)
        cum = np.cumsum(np.bincount(b, weights=w, minlength=nbins))
        k = min(int(np.searchsorted(cum, need, side="left")), nbins - 1)
        prev = float(cum[k - 1]) if k else 0.0
        inbin = b == k
        above = b < k
        head_ids, head_w = ids[above], w[above]
        ids, v, w = ids[inbin], v[inbin], w[inbin]
    else:
        prev, head_ids, head_w = 0.0, None, None
    order = np.argsort(-v, kind="stable")
    w = w[order]
    before = prev + (np.cumsum(w, dtype=np.float64) - w)
    n = int(np.searchsorted(before, need, side="left"))
    if head_ids is None or head_ids.size == 0:
        n = max(n, 1)  # the top token is always kept
    last_before = float(before[n - 1]) if n else prev
    ids, w = ids[order[:n]], w[:n]
    if head_ids is not None and head_ids.size:
        ids, w = np.concatenate([head_ids, ids]), np.concatenate([head_w, w])
    return Distribution(ids, w, size, float(w.sum(dtype=np.float64))), last_before


_ONES: dict[tuple, np.ndarray] = {}


def _ones(n: int, dtype=np.float32) -> np.ndarray:
    key = (n, np.dtype(dtype).char)
    v = _ONES.get(key)
    if v is None:
        v = _ONES[key] = np.ones(n, dtype=dtype)
    return v


def distribution(temperature: float, top_k: int = 0, top_p: float = 1.0) -> Callable[[np.ndarray], np.ndarray]:
    """logits -> the dense probability vector after temperature, top-k and top-p (temperature > 0)."""
    return lambda logits: next_token_distribution(logits, temperature, top_k, top_p).dense()


def sampler(temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> Sampler:
    if temperature == 0:
        return lambda logits: int(np.argmax(logits))
    return lambda logits: next_token_distribution(logits, temperature, top_k, top_p).sample(rng)


# -- context counts and penalties ---------------------------------------------------------------
class ContextCounts:
    """Per-token counts of a context from position ``start`` on (None: the first context's
    length, i.e. the prompt), kept up to date incrementally.

    Every call passes the whole context; it is compared with the one seen last (one C-level
    list comparison), so an append costs O(new tokens) and a rollback (speculative decoding
    rejecting drafts) undoes only the dropped tail. The distinct tokens are kept in order of
    first appearance, so a rollback pops them from the end.
    """

    def __init__(self, start: int | None = 0):
        self.start = start
        self.ids: list[int] = []  # the context as last seen
        self.counts = np.zeros(0, dtype=np.int32)  # per token id, positions >= start
        self._distinct = np.zeros(64, dtype=np.int64)  # [:n]: in order of first appearance
        self._first = np.zeros(64, dtype=np.int64)  # their first positions
        self.n = 0
        self.max_id = -1

    @property
    def distinct(self) -> np.ndarray:
        return self._distinct[: self.n]

    def update(self, context: Sequence[int]) -> np.ndarray:
        """Follow ``context``; return its distinct tokens (a view, valid until the next call)."""
        if not isinstance(context, list):
            context = context.tolist() if isinstance(context, np.ndarray) else list(context)
        if self.start is None:
            self.start = len(context)
        old = self.ids
        n, c = len(old), len(context)
        if not (c >= n and context[:n] == old):
            m = min(n, c)
            if context[:m] == old[:m]:
                keep = m
            else:
                diff = np.asarray(context[:m], dtype=np.int64) != np.asarray(old[:m], dtype=np.int64)
                keep = int(np.argmax(diff))
            self._truncate(keep)
        if c > len(self.ids):
            self._extend(context[len(self.ids):])
        return self._distinct[: self.n]

    def _truncate(self, keep: int) -> None:
        dropped = self.ids[max(keep, self.start):]
        if dropped:
            np.subtract.at(self.counts, np.asarray(dropped, dtype=np.int64), 1)
        n = self.n
        while n and self._first[n - 1] >= keep:  # first seen in the dropped tail
            n -= 1
        self.n = n
        del self.ids[keep:]

    def _extend(self, new: list[int]) -> None:
        pos = len(self.ids)
        self.ids.extend(new)
        skip = max(0, self.start - pos)
        new = new[skip:]
        pos += skip
        if not new:
            return
        top = max(new)
        if top >= self.counts.size:
            grown = np.zeros(max(top + 1, 2 * self.counts.size), dtype=np.int32)
            grown[: self.counts.size] = self.counts
            self.counts = grown
        self.max_id = max(self.max_id, top)
        counts = self.counts
        if len(new) <= 16:
            for i, tok in enumerate(new):
                if counts[tok] == 0:
                    self._push(np.array([tok]), np.array([pos + i]))
                counts[tok] += 1
            return
        arr = np.asarray(new, dtype=np.int64)
        uniq, first = np.unique(arr, return_index=True)
        fresh = counts[uniq] == 0
        order = np.argsort(first[fresh], kind="stable")
        self._push(uniq[fresh][order], first[fresh][order] + pos)
        np.add.at(counts, arr, 1)

    def _push(self, toks: np.ndarray, firsts: np.ndarray) -> None:
        end = self.n + toks.size
        if end > self._distinct.size:
            size = max(end, 2 * self._distinct.size)
            self._distinct = np.concatenate([self._distinct[: self.n], np.zeros(size - self.n, np.int64)])
            self._first = np.concatenate([self._first[: self.n], np.zeros(size - self.n, np.int64)])
        self._distinct[self.n: end] = toks
        self._first[self.n: end] = firsts
        self.n = end


def _fit_ids(ids: np.ndarray, size: int, counts: ContextCounts) -> np.ndarray:
    """Drop token ids beyond a (smaller) logits width."""
    return ids if counts.max_id < size else ids[ids < size]


class RepetitionPenalty:
    """transformers' rule: divide positive logits of seen tokens by ``penalty``, multiply negative
    ones (the whole context, prompt included). ``apply`` works in place."""

    def __init__(self, penalty: float):
        self.penalty = penalty
        self.seen = ContextCounts(0)

    def apply(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        ids = _fit_ids(self.seen.update(context), logits.shape[-1], self.seen)
        if ids.size:
            vals = logits[ids]
            logits[ids] = np.where(vals < 0, vals * self.penalty, vals / self.penalty)
        return logits

    def __call__(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        return self.apply(logits.copy(), context)


def repetition_penalty(penalty: float) -> Processor | None:
    """transformers' rule: divide positive logits of seen tokens by ``penalty``, multiply negative ones."""
    return None if penalty == 1.0 else RepetitionPenalty(penalty)


def presence_frequency_penalty(presence: float, frequency: float) -> Processor | None:
    """OpenAI's rule over the generated tokens only: logit -= count * frequency + (count > 0) * presence.
    The first call's context is the prompt; later tokens are what was generated."""
    if not presence and not frequency:
        return None
    counts = ContextCounts(None)

    def process(logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        ids = _fit_ids(counts.update(context), logits.shape[-1], counts)
        if ids.size == 0:
            return logits
        logits = logits.copy()
        logits[ids] -= counts.counts[ids] * frequency + presence
        return logits
    return process


# -- the sampler --------------------------------------------------------------------------------
class TokenSampler:
    """(logits, context) -> token: the logits processors, then the repetition penalty, then
    greedy argmax (temperature 0) or a draw from ``next_token_distribution``.

    ``distribution(logits, context)`` is what a draw uses; speculative decoding's rejection
    step compares the target's and the draft's, so plain and speculative sampling agree.
    """

    def __init__(self, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 repetition_penalty: float = 1.0, processors: Sequence[Processor] = (),
                 rng: np.random.Generator | None = None):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.greedy = temperature == 0
        self.processors = list(processors)
        self.penalty = RepetitionPenalty(repetition_penalty) if repetition_penalty != 1.0 else None
        self.rng = rng if rng is not None else np.random.default_rng()
        self._buf = np.zeros(0, dtype=np.float32)  # the penalised logits
        self._scratch = np.zeros(0, dtype=np.float32)  # next_token_distribution's work buffer
        self._hint = [0, 0]  # the top-p candidate margin that held the nucleus last time

    @property
    def uses_context(self) -> bool:
        """Whether the context changes the result (processors or a penalty)."""
        return bool(self.processors) or self.penalty is not None

    def process(self, logits: np.ndarray, context: Sequence[int]) -> np.ndarray:
        """The processed logits (with a penalty: a buffer the next call overwrites)."""
        for step in self.processors:
            logits = step(logits, context)
        if self.penalty is not None:
            n = logits.shape[-1]
            if self._buf.size < n:
                self._buf = np.empty(n, dtype=np.float32)
            buf = self._buf[:n]
            np.copyto(buf, logits)
            logits = self.penalty.apply(buf, context)
        return logits

    def distribution(self, logits: np.ndarray, context: Sequence[int]) -> Distribution:
        for step in self.processors:
            logits = step(logits, context)
        n = logits.shape[-1]
        if self._scratch.size < n:
            self._scratch = np.empty(-(-n // _BLOCK) * _BLOCK, dtype=np.float32)
        penalty = None
        if self.penalty is not None:  # applied on the fly: no copy of the logits
            seen = self.penalty.seen
            penalty = (_fit_ids(seen.update(context), n, seen), seen.counts, self.penalty.penalty)
        return next_token_distribution(logits, self.temperature, self.top_k, self.top_p, self._scratch, penalty,
                                       self._hint)

    def __call__(self, logits: np.ndarray, context: Sequence[int]) -> int:
        if self.greedy:
            return int(np.argmax(self.process(logits, context)))
        return self.distribution(logits, context).sample(self.rng)
