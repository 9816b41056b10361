"""The sampler (edgesdk.runtime.sampling) against transformers' warpers and processors: the same
probability vectors (same support, allclose) at Qwen's vocabulary size, draws that follow them,
the incremental repetition/presence/frequency penalties through speculative rollbacks, and the
distribution speculative decoding's rejection step shares with the plain sampler."""
from __future__ import annotations

import numpy as np
import pytest

from edgesdk.errors import InvalidArgumentError
from edgesdk.runtime import sampling
from edgesdk.runtime.sampling import Distribution, TokenSampler, next_token_distribution
from edgesdk.runtime.speculative import accept_sampled

V = 152064  # Qwen2.5's lm_head width

torch = pytest.importorskip("torch")
lp = pytest.importorskip("transformers.generation.logits_process")


def reference(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0,
              penalty: float = 1.0, context=()) -> np.ndarray:
    """transformers: RepetitionPenalty -> Temperature -> TopK -> TopP, then softmax (float64 out)."""
    ids = torch.tensor([list(context) or [0]])
    s = torch.tensor(logits, dtype=torch.float32)[None]
    if penalty != 1.0:
        s = lp.RepetitionPenaltyLogitsProcessor(penalty)(ids, s)
    s = lp.TemperatureLogitsWarper(temperature)(ids, s)
    if top_k:
        s = lp.TopKLogitsWarper(top_k)(ids, s)
    if top_p < 1.0:
        s = lp.TopPLogitsWarper(top_p)(ids, s)
    return torch.softmax(s, dim=-1)[0].double().numpy()


def logits_of(kind: str, size: int = V, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "random":  # a wide nucleus: ~2,000 tokens at T=0.7, top_p=0.9
        return (rng.standard_normal(size) * 2.5).astype(np.float32)
    if kind == "flat":  # the nucleus is most of the vocabulary: every widening step runs
        return (rng.standard_normal(size) * 0.3).astype(np.float32)
    if kind == "peaked":  # an LLM-like head: a few strong tokens over a long low tail
        x = rng.standard_normal(size).astype(np.float32) * 1.5 - 4.0
        x[rng.choice(size, 6, replace=False)] = [14.0, 13.2, 12.9, 11.0, 10.5, 10.4]
        return x
    raise ValueError(kind)


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    assert np.array_equal(ours > 0, ref > 0), (np.count_nonzero(ours), np.count_nonzero(ref))
    assert np.allclose(ours, ref, rtol=1e-4, atol=1e-8), np.abs(ours - ref).max()
    assert abs(ours.sum() - 1.0) < 1e-6


# -- the distribution equals transformers' --------------------------------------------------------
SETTINGS = [(0.7, 0, 1.0), (0.7, 0, 0.9), (0.7, 50, 0.9), (1.0, 50, 1.0), (0.7, 5000, 0.9),
            (1.3, 0, 0.5), (0.5, 20, 0.99), (0.7, 1, 0.9)]


@pytest.mark.parametrize("kind", ["random", "peaked"])
def test_distribution_matches_transformers(kind):
    x = logits_of(kind)
    for temperature, top_k, top_p in SETTINGS:
        ours = next_token_distribution(x, temperature, top_k, top_p).dense()
        assert_same(ours, reference(x, temperature, top_k, top_p))
    # top_k larger than the nucleus: top_p decides; the nucleus is not cut to a candidate set
    d = next_token_distribution(x, 0.7, 5000, 0.9)
    assert d.support()[0].size < 5000
    if kind == "random":
        assert d.support()[0].size > 500  # far more than any first candidate set


def test_flat_logits_widen_to_the_whole_nucleus():
    x = logits_of("flat")
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (1.0, 0, 0.999), (0.7, 100000, 0.95)]:
        ours = next_token_distribution(x, temperature, top_k, top_p).dense()
        assert_same(ours, reference(x, temperature, top_k, top_p))
        assert np.count_nonzero(ours) > V // 2


def test_repetition_penalty_then_warpers_match_transformers():
    rng = np.random.default_rng(3)
    x = logits_of("peaked", seed=3)
    context = rng.integers(0, V, 1500).tolist() + list(np.flatnonzero(x > 10))  # the strong tokens too
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (0.7, 50, 0.9), (0.9, 0, 1.0)]:
        s = TokenSampler(temperature, top_k, top_p, repetition_penalty=1.3, rng=np.random.default_rng(0))
        ours = s.distribution(x, context).dense()
        assert_same(ours, reference(x, temperature, top_k, top_p, penalty=1.3, context=context))
    # the penalty changes the distribution: without it the comparison would fail
    plain = next_token_distribution(x, 0.7, 0, 0.9).dense()
    assert not np.allclose(plain, reference(x, 0.7, 0, 0.9, penalty=1.3, context=context), atol=1e-3)


def test_sampler_state_does_not_change_the_distribution():
    """A TokenSampler keeps buffers and the candidate margin that worked last step; a sequence
    of very different heads gives what the stateless function gives."""
    s = TokenSampler(0.7, 0, 0.9, rng=np.random.default_rng(0))
    for kind, seed in [("peaked", 1), ("random", 2), ("flat", 3)] * 2 + [("peaked", 4)] * 20 + [("flat", 5)]:
        x = logits_of(kind, seed=seed)
        assert np.array_equal(s.distribution(x, []).dense(), next_token_distribution(x, 0.7, 0, 0.9).dense())


def test_top_p_ties_at_the_boundary():
    """A tie group across the top-p boundary: transformers keeps as many of them as we do (which
    ones depends on torch.sort's unstable order); we keep the lowest ids, like argmax."""
    x = np.full(V, -30.0, dtype=np.float32)
    x[777] = 2.0
    tied = np.array([5, 17, 1000, 50000, 60001, 99999, 120000, 150000, 151000, 152063])
    x[tied] = 0.0
    # p(777) = e^2 / (e^2 + 10) = 0.425, each tied 0.0575: top_p 0.7 keeps 777 and 5 tied
    ref = reference(x, 1.0, 0, 0.7)
    ours = next_token_distribution(x, 1.0, 0, 0.7).dense()
    assert np.count_nonzero(ref) == np.count_nonzero(ours) == 6
    assert np.allclose(np.sort(ours[ours > 0]), np.sort(ref[ref > 0]), rtol=1e-5)
    assert ours[777] == pytest.approx(ref[777], rel=1e-5)
    assert set(np.flatnonzero(ref)) - {777} <= set(tied)
    assert list(np.flatnonzero(ours)) == sorted([777, *tied[:5]])
    # the whole group inside the nucleus: all kept, exactly as transformers
    assert_same(next_token_distribution(x, 1.0, 0, 0.95).dense(), reference(x, 1.0, 0, 0.95))
    # top-k ties with the k-th are all kept, as transformers does
    assert_same(next_token_distribution(x, 1.0, 3, 1.0).dense(), reference(x, 1.0, 3, 1.0))
    assert np.count_nonzero(next_token_distribution(x, 1.0, 3, 1.0).dense()) == 11


def test_masked_logits_and_greedy():
    x = logits_of("peaked")
    masked = np.full_like(x, -np.inf)
    allowed = np.array([3, 40000, 152000])
    masked[allowed] = x[allowed]
    for temperature, top_k, top_p in SETTINGS:
        d = next_token_distribution(masked, temperature, top_k, top_p)
        assert set(d.support()[0]) <= set(allowed)
        assert_same(d.dense(), reference(masked, temperature, top_k, top_p))
    with pytest.raises(InvalidArgumentError):
        next_token_distribution(np.full(10, -np.inf, dtype=np.float32), 0.7)
    # temperature 0: argmax of the processed logits (the first on ties)
    ban = lambda logits, context: np.where(np.arange(logits.size) == int(np.argmax(x)), -np.inf, logits)
    s = TokenSampler(0.0, 50, 0.9, processors=[ban])
    assert s(x, [1, 2]) == int(np.argsort(-x, kind="stable")[1])
    assert TokenSampler(0.0)(np.array([1.0, 3.0, 3.0], dtype=np.float32), []) == 1


# -- draws follow the distribution ----------------------------------------------------------------
def _check_draws(draws: np.ndarray, p: np.ndarray, wrong: list[np.ndarray]) -> None:
    from scipy.stats import chisquare

    n = draws.size
    counts = np.bincount(draws, minlength=p.size)
    assert counts[p == 0].sum() == 0  # nothing outside the support
    support = p > 0
    exp = p[support] * n
    big = exp >= 5
    obs_c = np.append(counts[support][big], counts[support][~big].sum())
    exp_c = np.append(exp[big], exp[~big].sum())
    if exp_c[-1] == 0:
        obs_c, exp_c = obs_c[:-1], exp_c[:-1]
    assert chisquare(obs_c, exp_c * obs_c.sum() / exp_c.sum()).pvalue > 1e-3
    tv = 0.5 * np.abs(counts / n - p).sum()
    assert tv < 0.02, tv
    for q in wrong:  # the test has power: a sampler drawing from q would fail the bound
        assert 0.5 * np.abs(q - p).sum() > 0.06


def test_sampled_tokens_follow_the_distribution():
    x = logits_of("random", size=64, seed=5) * 0.8
    rng = np.random.default_rng(123)
    for temperature, top_k, top_p in [(0.7, 0, 0.9), (0.8, 10, 0.9), (1.0, 0, 1.0)]:
        s = TokenSampler(temperature, top_k, top_p, rng=rng)
        d = s.distribution(x, [])  # what every call of s(x, context) draws from
        draws = np.array([s(x, []) for _ in range(2000)] + [d.sample(rng) for _ in range(18000)])
        p = reference(x, temperature, top_k, top_p)
        wrong = [reference(x, 1.0, 0, 1.0), reference(x, temperature, 0, 0.5)] if top_p < 1 else \
            [reference(x, 0.5, 0, 1.0)]
        _check_draws(draws, p, wrong)


def test_dense_draws_across_blocks():
    """No truncation: a draw picks a block by its mass, then a token inside it."""
    size = 2500  # three blocks of 1024, the last one partial
    x = np.full(size, -8.0, dtype=np.float32)
    strong = np.array([0, 1023, 1024, 1500, 2047, 2048, 2499])
    x[strong] = [1.0, 2.0, 0.5, 1.5, 2.5, 0.0, 1.0]
    s = TokenSampler(1.0, rng=np.random.default_rng(7))
    draws = np.array([s(x, []) for _ in range(20000)])
    p = reference(x, 1.0)
    cells = np.append(strong, -1)  # the weak tokens pooled in one cell
    counts = np.array([np.sum(draws == t) for t in strong] + [np.sum(~np.isin(draws, strong))])
    expect = np.append(p[strong], 1 - p[strong].sum()) * draws.size
    from scipy.stats import chisquare

    assert chisquare(counts, expect * counts.sum() / expect.sum()).pvalue > 1e-3, (cells, counts, expect)
    assert np.all(np.isin(draws, np.arange(size)))


def test_rejection_step_shares_the_distribution():
    """accept_sampled with the sampler's own (sparse) distributions: the emitted token follows the
    target's p, whatever the draft's q (another distribution, another support)."""
    rng = np.random.default_rng(11)
    x_t, x_d = logits_of("random", 80, seed=1), logits_of("random", 80, seed=2)
    p = next_token_distribution(x_t, 0.8, 20, 0.9)
    q = next_token_distribution(x_d, 1.0, 30, 1.0)
    draws = []
    for _ in range(20000):
        d = q.sample(rng)
        k, extra = accept_sampled([d], lambda i: p, [q], rng)
        draws.append(d if k == 1 else extra)
    _check_draws(np.array(draws), p.dense(), [q.dense()])
    # prompt lookup's point-mass proposal
    token = int(p.support()[0][1])
    draws = [token if k == 1 else extra for k, extra in
             (accept_sampled([token], lambda i: p, None, rng) for _ in range(20000))]
    _check_draws(np.array(draws), p.dense(), [np.eye(80)[token]])
    # dense p and q (no truncation) of different widths: the draft's graph pads its vocabulary
    p = next_token_distribution(x_t, 1.0)
    q = next_token_distribution(np.append(x_d, [3.0, 3.0]).astype(np.float32), 1.0)
    draws = []
    for _ in range(20000):
        d = q.sample(rng)
        k, extra = accept_sampled([d], lambda i: p, [q], rng)
        draws.append(d if k == 1 else extra)
    _check_draws(np.array(draws), p.dense(), [q.dense()[:80] / q.dense()[:80].sum()])


def test_same_seed_same_tokens_and_legacy_api():
    x = logits_of("peaked", size=1000)
    a = [TokenSampler(0.9, 0, 0.95, rng=np.random.default_rng(4))(x, []) for _ in range(3)]
    b = [TokenSampler(0.9, 0, 0.95, rng=np.random.default_rng(4))(x, []) for _ in range(3)]
    assert a == b
    assert np.allclose(sampling.distribution(0.7, 50, 0.9)(x), reference(x, 0.7, 50, 0.9), rtol=1e-4, atol=1e-8)
    pick = sampling.sampler(0.7, 0, 0.9, np.random.default_rng(0))
    assert reference(x, 0.7, 0, 0.9)[pick(x)] > 0
    assert sampling.sampler(0, 0, 1.0, np.random.default_rng(0))(x) == int(np.argmax(x))
    assert isinstance(Distribution.from_probs(np.array([0.2, 0.8])).sample(np.random.default_rng(0)), int)


# -- penalties: incremental, through rollbacks ----------------------------------------------------
def _old_repetition(logits, context, penalty):
    seen = np.unique(np.asarray(context, dtype=np.int64))
    out = logits.copy()
    if seen.size:
        vals = out[seen]
        out[seen] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def _old_presence_frequency(logits, generated, presence, frequency):
    if not generated:
        return logits
    tokens, counts = np.unique(np.asarray(generated, dtype=np.int64), return_counts=True)
    out = logits.copy()
    out[tokens] -= counts * frequency + presence
    return out


def _contexts(rng, size, steps=300):
    """A speculative-decoding-like walk: a prompt, then appends, drafts and rollbacks."""
    context = rng.integers(0, size, 40).tolist()
    yield list(context)
    for _ in range(steps):
        r = rng.random()
        if r < 0.5:
            context.append(int(rng.integers(0, size)))
        elif r < 0.7:
            yield context + rng.integers(0, size, int(rng.integers(1, 5))).tolist()  # drafts
            continue
        elif r < 0.85 and len(context) > 45:
            del context[len(context) - int(rng.integers(1, 5)):]  # a rollback
        else:
            cut = len(context) - int(rng.integers(1, 4))  # diverge: replace the tail
            context = context[:max(cut, 41)] + rng.integers(0, size, 3).tolist()
        yield list(context)


def test_incremental_penalties_follow_appends_and_rollbacks():
    rng = np.random.default_rng(2)
    size = 300  # small, so tokens repeat often
    x = rng.standard_normal(size).astype(np.float32) * 3
    rep = sampling.repetition_penalty(1.3)
    pf = sampling.presence_frequency_penalty(0.4, 0.25)
    s = TokenSampler(0.0, repetition_penalty=1.7)
    prompt = None
    for context in _contexts(rng, size):
        prompt = len(context) if prompt is None else prompt
        assert np.array_equal(rep(x, context), _old_repetition(x, context, 1.3))
        assert np.array_equal(pf(x, context), _old_presence_frequency(x, context[prompt:], 0.4, 0.25))
        assert np.array_equal(s.process(x, context), _old_repetition(x, context, 1.7))
        # a narrower draft vocabulary: penalties skip tokens it does not have
        assert np.array_equal(rep(x[:200], context), _old_repetition(x[:200], [t for t in context if t < 200], 1.3))
    assert sampling.repetition_penalty(1.0) is None and sampling.presence_frequency_penalty(0, 0) is None


def test_repetition_penalty_matches_transformers_processor():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(V).astype(np.float32) * 4
    context = rng.integers(0, V, 1500).tolist()
    ref = lp.RepetitionPenaltyLogitsProcessor(1.2)(torch.tensor([context]), torch.tensor(x[None]))[0].numpy()
    assert np.array_equal(sampling.repetition_penalty(1.2)(x, context), ref)
