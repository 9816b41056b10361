"""Speculative decoding: a proposer guesses the next k tokens, the target checks them all in
one forward pass over k+1 positions and keeps the longest prefix it agrees with, plus one
token of its own (the correction at the first disagreement, or a bonus token after k hits).

Two proposers share one loop:
  * DraftModel: a small model with the same tokenizer, greedy or sampled from its own
    distribution q (rejection sampling keeps the output distributed as the target's p);
  * PromptLookup: the tokens that followed the longest recent match of the context's tail
    (a point-mass q), free to compute, strong when the answer copies the input.

Greedy is exact: a draft token is kept only if it is the target's argmax at that position,
so the output equals plain greedy decoding up to floating-point near-ties between the
k+1-position and 1-position kernels. Both KV caches roll back to the accepted length in
O(1) (Decoder.rewind only moves the valid length).

k adapts by default (AdaptiveK): it keeps a running estimate of the per-token acceptance
rate and of the measured costs (target call as a function of positions, draft call), and
each round picks the k that maximises expected tokens per second -- which is k=0 (a plain
target step) when speculation does not pay, so a bad draft costs almost nothing.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Sequence

import numpy as np

from . import sampling
from .decoder import Decoder

log = logging.getLogger("edgesdk")
TokenSource = Any  # Iterator[tuple[list[int], bool]]; see generate.py


# -- statistics ---------------------------------------------------------------------------------
def new_stats(method: str, num_draft_tokens: int | None) -> dict[str, Any]:
    """Acceptance statistics; the source updates the dict in place as it verifies.

    proposed/accepted count draft tokens sent to / kept by the target's verification;
    target_calls and tokens_per_target_call cover the decode loop (the prompt's prefill, which
    also yields the first token, is not counted), so plain decoding scores exactly 1.0.
    """
    return {"method": method, "num_draft_tokens": "adaptive" if num_draft_tokens is None else num_draft_tokens,
            "proposed": 0, "accepted": 0, "acceptance_rate": 0.0, "target_calls": 0, "target_tokens": 0,
            "tokens_per_target_call": 0.0, "draft_calls": 0, "speculative_rounds": 0}


def _record(stats: dict[str, Any], proposed: int, accepted: int, drafted_calls: int) -> None:
    stats["proposed"] += proposed
    stats["accepted"] += accepted
    stats["target_calls"] += 1
    stats["target_tokens"] += accepted + 1
    stats["draft_calls"] += drafted_calls
    stats["speculative_rounds"] += proposed > 0
    stats["acceptance_rate"] = stats["accepted"] / stats["proposed"] if stats["proposed"] else 0.0
    stats["tokens_per_target_call"] = stats["target_tokens"] / stats["target_calls"]


# -- adaptive k ---------------------------------------------------------------------------------
class AdaptiveK:
    """Pick k to maximise E[tokens per round] / E[seconds per round].

    With per-token acceptance rate a, a round with k drafts yields (1 - a^(k+1)) / (1 - a)
    tokens and costs k * draft_call + verify(k + 1), where verify(m) = t1 + slope * (m - 1).
    Costs are measured online: an exponential average per number of verified positions m, and
    a line fitted through those averages (with one m seen so far, a prior shape is scaled to
    it). k = 0 is a plain target step. While k = 0 a low acceptance estimate drifts back
    towards its prior, so speculation is retried now and then (a failed retry pushes it down).
    """

    def __init__(self, k_max: int = 8, prior: float = 0.7, draft_cost: float | None = 0.35,
                 slope: float = 0.125, weight: float = 0.15, margin: float = 1.03):
        self.k_max = k_max
        self.prior = prior
        self.alpha = prior
        self.weight = weight  # EMA weight per observed draft token
        self.margin = margin  # a k > 0 must beat a plain step by this factor
        self.draft_ratio = draft_cost  # prior draft-call cost / t1 (None: free, e.g. prompt lookup)
        self.slope_ratio = slope  # prior verify slope / t1
        self.draft_s: float | None = None if draft_cost is not None else 0.0
        self._t: dict[int, list[float]] = {}  # m -> [EMA seconds, observations]

    # observations
    def target_call(self, m: int, seconds: float) -> None:
        e = self._t.get(m)
        if e is None:
            self._t[m] = [seconds, 1]
        else:
            w = max(0.25, 1.0 / (e[1] + 1))
            e[0] += w * (seconds - e[0])
            e[1] += 1

    def draft_call(self, seconds: float) -> None:
        self.draft_s = seconds if self.draft_s is None else 0.8 * self.draft_s + 0.2 * seconds

    def verified(self, proposed: int, accepted: int) -> None:
        w = self.weight
        for _ in range(accepted):
            self.alpha += w * (1.0 - self.alpha)
        if accepted < proposed:
            self.alpha -= w * self.alpha

    def plain_step(self) -> None:
        if self.alpha < self.prior:
            self.alpha += 0.04 * (self.prior - self.alpha)

    # the model
    def costs(self) -> tuple[float, float, float] | None:
        """(t1, slope, draft) in seconds, or None before any measurement."""
        if not self._t:
            return None
        ms = np.array(sorted(self._t), dtype=np.float64)
        ts = np.array([self._t[int(m)][0] for m in ms])
        ws = np.array([min(self._t[int(m)][1], 8) for m in ms], dtype=np.float64)
        x = ms - 1
        if len(ms) >= 2:  # weighted least squares through the per-m averages
            xm = (ws * x).sum() / ws.sum()
            tm = (ws * ts).sum() / ws.sum()
            slope = max(0.0, (ws * (x - xm) * (ts - tm)).sum() / (ws * (x - xm) ** 2).sum())
            t1 = max(1e-6, tm - slope * xm)
        else:  # scale the prior shape to the one measured level
            t1 = float(ts[0] / (1.0 + self.slope_ratio * x[0]))
            slope = self.slope_ratio * t1
        draft = self.draft_s if self.draft_s is not None else self.draft_ratio * t1
        return t1, slope, draft

    def choose(self, limit: int, remaining: int | None = None, setup_s: float = 0.0) -> int:
        """k for the next round. ``setup_s``: seconds speculation must spend before its first draft
        (a draft model's prefill of what it has not read); a k > 0 is chosen only when the
        ``remaining`` tokens (None: unbounded) save more than that at the best k's rate."""
        limit = min(limit, self.k_max)
        if limit <= 0:
            return 0
        if 1 not in self._t:
            return 0  # measure a plain step first, then a verify: two points for the cost line
        t1, slope, draft = self.costs()
        a = min(self.alpha, 0.999)
        best_k, best = 0, self.margin / t1
        for k in range(1, limit + 1):
            tokens = (1.0 - a ** (k + 1)) / (1.0 - a)
            rate = tokens / (k * draft + t1 + slope * k)
            if rate > best:
                best_k, best = k, rate
        if setup_s and remaining is not None:
            # the time speculation saves over the tokens left, at the best rate, against the setup
            if not best_k or remaining * (t1 - 1.0 / best) < setup_s * self.margin:
                return 0
        if len(self._t) == 1:
            return min(3, limit)  # a first verify: the cost line's second point
        return best_k


# -- proposers ----------------------------------------------------------------------------------
class DraftModel:
    """Proposes with a small model's decoder; its cache follows the accepted context."""

    method = "draft-model"

    def __init__(self, decoder: Decoder, lm_head_tokens: np.ndarray | None = None, vocab_size: int = 0):
        self.dec = decoder
        self.tokens = lm_head_tokens  # a restricted draft lm_head: column j is token tokens[j]
        # its logits scattered back to the full vocabulary; dropped tokens stay -inf (impossible)
        self._full = None if lm_head_tokens is None else \
            np.full(max(vocab_size, int(lm_head_tokens[-1]) + 1), -np.inf, dtype=np.float32)
        self.calls = 0
        self.seconds = 0.0
        self.enabled = True

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        """Only checks that the prompt fits: the draft reads the context it lacks (the prompt,
        tokens decoded without it) at its first proposal, so a request that never speculates
        never pays for the draft's prefill, and the first token does not wait for it."""
        if len(prompt_ids) >= self.dec.max_length:
            self.enabled = False  # the prompt does not fit the draft: plain decoding

    def backlog(self, context_len: int) -> int:
        """Positions the draft must read before it can propose."""
        return max(0, context_len - 1 - self.dec.length)

    def room(self, context_len: int) -> int:
        # proposing k tokens leaves context + k - 1 positions in the draft cache
        return self.dec.max_length - context_len + 1 if self.enabled else 0

    def propose(self, context: list[int], k: int, choose: Callable, eos: set[int]):
        """k draft tokens and their draft distributions (None when greedy)."""
        feed = context[self.dec.length:]
        out: list[int] = []
        qs: list[np.ndarray] | None = []
        self.calls = 0
        t0 = time.perf_counter()
        self.step_s: list[float] = []
        for _ in range(k):
            t = time.perf_counter()
            logits = self.dec.forward(feed, keep=1)[-1]
            if self._full is not None:
                self._full[self.tokens] = logits
                logits = self._full
            if len(feed) == 1:  # catch-up calls after plain steps are not typical draft steps
                self.step_s.append(time.perf_counter() - t)
            self.calls += 1
            tok, q = choose(logits, context, out)
            out.append(tok)
            if q is None:
                qs = None
            else:
                qs.append(q)
            if tok in eos:
                break
            feed = [tok]
        self.seconds = time.perf_counter() - t0
        return out, qs

    def rewind(self, valid: int) -> None:
        """Keep at most ``valid`` positions (the context the target accepted)."""
        if self.dec.length > valid:
            self.dec.rewind(valid)


class PromptLookup:
    """Proposes what followed the longest (then latest) earlier match of the context's tail."""

    method = "prompt-lookup"

    def __init__(self, max_ngram: int = 8, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.calls = 0
        self.seconds = 0.0

    def prefill(self, prompt_ids: Sequence[int]) -> None:
        pass

    def backlog(self, context_len: int) -> int:
        return 0

    def room(self, context_len: int) -> int:
        return 1 << 30

    def propose(self, context: list[int], k: int, choose: Callable, eos: set[int]):
        self.calls = 0
        n = len(context)
        if n <= self.min_ngram:
            return [], None
        ctx = np.asarray(context, dtype=np.int64)
        # candidates: earlier positions i whose token equals the last one (i + 1 < n)
        cand = np.flatnonzero(ctx[: n - 1] == ctx[n - 1])
        length = 1
        while cand.size and length < self.max_ngram:
            prev = cand - length
            ok = prev >= 0
            ok[ok] = ctx[prev[ok]] == ctx[n - 1 - length]
            if not ok.any():
                break
            cand = cand[ok]
            length += 1
        if length < self.min_ngram or not cand.size:
            return [], None
        start = int(cand[-1]) + 1  # the latest among the longest matches
        out = [int(t) for t in ctx[start: start + k]]
        for i, t in enumerate(out):
            if t in eos:
                out = out[: i + 1]
                break
        return out, None  # a point mass: q(d) = 1

    def rewind(self, valid: int) -> None:
        pass


# -- the loop -----------------------------------------------------------------------------------
def speculative_tokens(target: Decoder, proposer, prompt_ids: Sequence[int], pending: Sequence[int],
                       config, eos: set[int], budget: int, stats: dict[str, Any],
                       num_draft_tokens: int | None = None) -> TokenSource:
    """A token source (see generate.plain_tokens) that speculates with ``proposer``.

    Yields accepted draft tokens as one (tokens, True) step and the target's own token as a
    (token, False) step. ``budget`` is the most tokens the driver will keep.
    """
    greedy = config.temperature == 0
    rng = np.random.default_rng(config.seed)
    # one sampler for the draft's and the target's steps: the same processors (constraint masks
    # see every draft and verify step), penalty and distribution; its context counts follow the
    # rollbacks, since every call passes its whole context
    picker: sampling.TokenSampler = config.sampler(rng)
    steps = picker.uses_context
    # k_max 8 covers what pays on CPU; prompt lookup copies long runs for free, so allow more
    # Priors: a same-family draft usually agrees on 3 tokens in 4 or more; a prompt-lookup match is
    # a weaker guess, but free to propose, and copies long runs when it holds.
    policy = AdaptiveK(k_max=8, prior=0.75, draft_cost=0.35, weight=0.1) if isinstance(proposer, DraftModel) \
        else AdaptiveK(k_max=12, prior=0.6, draft_cost=None, weight=0.35)

    def target_pick(logits: np.ndarray, context: Sequence[int]) -> int:
        return picker(logits, context)

    def draft_choose(logits: np.ndarray, context: list[int], drafted: list[int]):
        ctx = context + drafted if steps else context
        if greedy:
            return picker(logits, ctx), None
        q = picker.distribution(logits, ctx)
        return q.sample(rng), q

    context = list(prompt_ids)
    t0 = time.perf_counter()
    logits = target.forward(pending, keep=1)[-1]
    prefill_s = time.perf_counter() - t0
    proposer.prefill(context)
    tok = target_pick(logits, context)
    context.append(tok)
    generated = 1
    yield [tok], False

    while True:
        # the target's cache holds context[:-1]; a verify of k drafts writes k + 1 positions
        limit = min(budget - generated - 1, target.max_length - len(context), proposer.room(len(context)))
        if num_draft_tokens is None:
            # what the draft has not read yet costs about its share of the target's prefill time
            backlog = proposer.backlog(len(context))
            setup = 0.0 if backlog < 16 or not len(pending) else \
                (policy.draft_ratio or 0.0) * prefill_s * backlog / len(pending)
            k = policy.choose(limit, budget - generated, setup)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("speculative: k=%d alpha=%.2f costs=%s", k, policy.alpha, policy.costs())
        else:
            k = max(0, min(num_draft_tokens, limit))
        proposer.calls = 0
        drafts, qs = proposer.propose(context, k, draft_choose, eos) if k > 0 else ([], None)
        for seconds in getattr(proposer, "step_s", ()) if k > 0 else ():
            policy.draft_call(seconds)

        t0 = time.perf_counter()
        logits = target.forward([context[-1]] + drafts, keep=len(drafts) + 1)  # k + 1 rows
        policy.target_call(len(drafts) + 1, time.perf_counter() - t0)

        n = 0
        extra = None
        if greedy and not steps:
            best = np.argmax(logits, axis=-1)
            while n < len(drafts) and best[n] == drafts[n]:
                n += 1
            extra = int(best[n])
        elif greedy:
            for i, d in enumerate(drafts):
                t = target_pick(logits[i], context + drafts[:i])
                if t != d:
                    extra = t
                    break
                n += 1
        else:
            n, extra = accept_sampled(drafts, lambda i: picker.distribution(logits[i], context + drafts[:i]), qs, rng)
        if extra is None:  # all k accepted (or k = 0): the target's token after them
            extra = target_pick(logits[len(drafts)], context + drafts)

        if drafts:
            policy.verified(len(drafts), n)
        else:
            policy.plain_step()
        _record(stats, len(drafts), n, proposer.calls)
        valid = len(context) + n  # context + accepted drafts; `extra` is not in any cache yet
        target.rewind(valid)
        proposer.rewind(valid)

        accepted = drafts[:n]
        context.extend(accepted)
        context.append(extra)
        generated += n + 1
        if accepted:
            yield accepted, True
        yield [extra], False


def accept_sampled(drafts: Sequence[int], p_at: Callable[[int], Any], qs: list | None,
                   rng: np.random.Generator) -> tuple[int, int | None]:
    """Speculative rejection sampling (Leviathan et al. 2023, Chen et al. 2023).

    Draft token d_i (drawn from q_i) is kept with probability min(1, p_i(d) / q_i(d)); at the
    first rejection the target's token is drawn from the residual max(0, p_i - q_i), normalised,
    which makes every emitted token distributed exactly as p. ``qs`` None means point-mass
    proposals (prompt lookup): keep with probability p_i(d), else draw from p_i without d.
    p and q are ``sampling.Distribution``s (what the plain sampler draws from) or probability
    vectors. Returns (accepted count, the residual token or None when all were kept).
    """
    for i, d in enumerate(drafts):
        p = _dist(p_at(i))
        q = None if qs is None else _dist(qs[i])
        pd = p.prob(d)
        qd = None if q is None else (q.prob(d) if d < q.size else 0.0)
        ratio = pd if q is None else (pd / qd if qd > 0 else 1.0)
        if rng.random() < ratio:
            continue
        return i, p.residual(q, d).sample(rng)
    return len(drafts), None


def _dist(x) -> "sampling.Distribution":
    return x if isinstance(x, sampling.Distribution) else sampling.Distribution.from_probs(x)


# -- tokenizer identity ---------------------------------------------------------------------------
def tokenizer_difference(target_fp: dict[str, Any], draft_fp: dict[str, Any]) -> str | None:
    """None if the two tokenizers map text to the same ids, else the first difference, in words."""
    tv, dv = target_fp["vocab"], draft_fp["vocab"]
    if tv != dv:
        for token, i in sorted(tv.items(), key=lambda kv: kv[1]):
            j = dv.get(token)
            if j is None:
                return f"token {token!r} (id {i}) is in the target's vocabulary but not the draft's"
            if j != i:
                return f"token {token!r} has id {i} in the target but {j} in the draft"
        extra = min(set(dv) - set(tv), key=lambda t: dv[t])
        return f"token {extra!r} (id {dv[extra]}) is in the draft's vocabulary but not the target's"
    ts, ds = target_fp["special"], draft_fp["special"]
    if ts != ds:
        only_t, only_d = sorted(set(ts) - set(ds)), sorted(set(ds) - set(ts))
        if only_t:
            return f"special token {only_t[0]!r} is special in the target but not in the draft"
        return f"special token {only_d[0]!r} is special in the draft but not in the target"
    return None


def check_tokenizers(target_tok, draft_tok, target_name: str, draft_name: str) -> None:
    from ..errors import InvalidArgumentError

    diff = tokenizer_difference(target_tok.fingerprint(), draft_tok.fingerprint())
    if diff is not None:
        raise InvalidArgumentError(f"draft {draft_name} cannot speculate for {target_name}: their tokenizers "
                                   f"differ ({diff}); use a draft from the same model family")


__all__ = ["AdaptiveK", "DraftModel", "PromptLookup", "speculative_tokens", "new_stats", "check_tokenizers",
           "tokenizer_difference"]
