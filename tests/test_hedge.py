"""The Hedge mixer (core/hedge.py): a distribution over the vocabulary at every position, score-first,
the Hedge rule by hand, and the neural expert as the backends' full softmax."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.hedge import COUNT_ALPHA, INITIAL_LOG_WEIGHTS, TRIGRAM_ALPHA, HedgeMixer, stream_contexts, trigram_bucket
from tests.helpers import TINY, perturbed, spec_for, trainer

BUCKETS = 97  # small hashed-trigram tables for the tests (the hash and the smoothing are the same)
VOCAB = TINY["vocab_size"]


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.slow
@settings(max_examples=40, deadline=None)
@given(vocab=st.integers(2, 40), n=st.integers(1, 300), warmup=st.integers(0, 60), block=st.integers(1, 50),
       seed=st.integers(0, 2**31 - 1), eta=st.floats(0.01, 2.0))
def test_the_mixture_is_a_distribution_at_every_position(vocab, n, warmup, block, seed, eta):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, n + 1)
    logits = rng.normal(0, 3, (n, vocab))
    neural_lp = log_softmax(logits)
    mixer = HedgeMixer(vocab, eta=eta, warmup_tokens=warmup, buckets=BUCKETS, update_every=block)
    for lo in range(0, n, block):  # the full distribution at each block, before the block is scored
        hi = min(lo + block, n)
        t2, t1, y = stream_contexts(tokens, lo, hi)
        mix = mixer.mixture(neural_lp[lo:hi], t2, t1)
        assert np.all(mix >= 0)
        np.testing.assert_allclose(mix.sum(-1), 1.0, rtol=0, atol=1e-12)  # float64 sums of V terms
        for dist in mixer.count_distributions(t2, t1):  # each expert on its own, too
            np.testing.assert_allclose(dist.sum(-1), 1.0, rtol=0, atol=1e-12)
        nll = mixer.score(t2, t1, y, -neural_lp[np.arange(lo, hi), y])
        # The score is the same distribution's probability of the target.
        np.testing.assert_allclose(np.exp(-nll), mix[np.arange(hi - lo), y], rtol=1e-12)


def counts_from_prefix(tokens, m, vocab):
    """The tables an honest mixer holds after scoring targets 0..m-1, counted independently."""
    uni, bi, tri = np.zeros(vocab, int), np.zeros((vocab, vocab), int), np.zeros((BUCKETS, vocab), int)
    for j in range(m):
        y, t1, t2 = tokens[j + 1], tokens[j], tokens[j - 1] if j else 0
        uni[y] += 1
        bi[t1, y] += 1
        tri[int(trigram_bucket(np.array([t2]), np.array([t1]), BUCKETS)[0]), y] += 1
    return uni, bi, tri


def test_tables_never_hold_a_token_before_it_is_scored():
    vocab, block = 12, 7
    tokens = np.random.default_rng(5).integers(0, vocab, 120)
    scored_so_far = []

    class Watched(HedgeMixer):
        def score(self, t2, t1, y, neural_nll):
            lo = sum(scored_so_far)
            uni, bi, tri = counts_from_prefix(tokens, lo, vocab)
            # Exactly the targets before this block, nothing of this block's.
            assert self.seen == lo
            assert np.array_equal(self.unigram, uni) and np.array_equal(self.bigram, bi)
            assert np.array_equal(self.trigram, tri)
            assert np.array_equal(self.bigram_rows, bi.sum(1)) and np.array_equal(self.trigram_rows, tri.sum(1))
            scored_so_far.append(len(y))
            return super().score(t2, t1, y, neural_nll)

    mixer = Watched(vocab, warmup_tokens=20, buckets=BUCKETS, update_every=block)
    mixer.run_stream(tokens, np.full(len(tokens) - 1, math.log(vocab)))
    assert sum(scored_so_far) == len(tokens) - 1 and len(scored_so_far) == math.ceil((len(tokens) - 1) / block)
    assert np.array_equal(mixer.unigram, counts_from_prefix(tokens, len(tokens) - 1, vocab)[0])


def test_a_token_seen_for_the_first_time_gets_only_the_smoothing_mass():
    vocab = 10
    mixer = HedgeMixer(vocab, warmup_tokens=0, buckets=BUCKETS, update_every=4)
    mixer.score([0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], np.ones(4))
    # Targets 9 (never seen) and 5 (seen once, after 3 4) in context (3, 4), and 1 (never a target) after an
    # unseen context: uniform bigram and trigram rows.
    lp = np.exp(mixer.count_log_probs([3, 3, 0], [4, 4, 7], [9, 5, 1]))
    v = vocab
    expected = [[COUNT_ALPHA / (4 + COUNT_ALPHA * v), (1 + COUNT_ALPHA) / (4 + COUNT_ALPHA * v),
                 COUNT_ALPHA / (4 + COUNT_ALPHA * v)],
                [COUNT_ALPHA / (1 + COUNT_ALPHA * v), (1 + COUNT_ALPHA) / (1 + COUNT_ALPHA * v), 1 / v],
                [TRIGRAM_ALPHA / (1 + TRIGRAM_ALPHA * v), (1 + TRIGRAM_ALPHA) / (1 + TRIGRAM_ALPHA * v), 1 / v]]
    np.testing.assert_allclose(lp, expected, rtol=1e-12)


def test_the_hedge_rule_by_hand():
    vocab, eta = 5, 0.3
    mixer = HedgeMixer(vocab, eta=eta, warmup_tokens=3, buckets=BUCKETS, update_every=3)
    neural = np.array([1.0, 2.0, 0.5])
    # Warmup: the neural NLL comes back unchanged and the weights stay at their start.
    assert np.array_equal(mixer.score([0, 1, 2], [1, 2, 3], [2, 3, 4], neural), neural)
    assert mixer.log_w.tolist() == list(INITIAL_LOG_WEIGHTS)
    t2, t1, y = np.array([3, 4, 0]), np.array([4, 0, 1]), np.array([0, 1, 2])
    count_lp = mixer.count_log_probs(t2, t1, y)
    w = np.exp(INITIAL_LOG_WEIGHTS) / np.exp(INITIAL_LOG_WEIGHTS).sum()
    probs = np.vstack([np.exp(-neural), np.exp(count_lp)])
    expected_nll = -np.log(w @ probs)
    expected_log_w = np.array(INITIAL_LOG_WEIGHTS) - eta * np.vstack([neural, -count_lp]).mean(1)
    np.testing.assert_allclose(mixer.score(t2, t1, y, neural), expected_nll, rtol=1e-12)
    np.testing.assert_allclose(mixer.log_w, expected_log_w, rtol=1e-12)
    assert mixer.mixed == 3  # the warmup block was the model's alone; only the second was mixed


def test_the_mixer_learns_a_repetitive_stream():
    vocab = 16
    tokens = np.tile(np.array([3, 1, 4, 1, 5, 9, 2, 6]), 200)  # each token follows from the one or two before
    uniform = np.full(len(tokens) - 1, math.log(vocab))  # a neural expert that knows nothing
    mixer = HedgeMixer(vocab, warmup_tokens=64, buckets=BUCKETS, update_every=32)
    mixed = mixer.run_stream(tokens, uniform) / (len(tokens) - 1)
    assert mixed < 0.25 * math.log(vocab)
    assert mixer.weights[0] < 1e-3  # Hedge has moved the weight off the expert that knows nothing


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_the_neural_expert_is_the_backends_full_softmax(backend):
    """eval_log_probs is a distribution whose target entries are eval_token_losses; mixed with the count
    experts it still sums to 1, and the target-only path the eval uses scores the same mixture."""
    model = trainer(backend, spec_for("2x2"), perturbed(spec_for("2x2")))
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, VOCAB, 2 * 16 + 1)
    x, y = tokens[:-1].reshape(2, 16), tokens[1:].reshape(2, 16)
    lp = model.eval_log_probs(x)
    losses = model.eval_token_losses(x, y)
    assert lp.shape == (2, 16, VOCAB) and lp.dtype == np.float32 and losses.dtype == np.float32
    # fp32 log-softmax: exp sums to 1 within a few ulps per term
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, atol=1e-5)
    # the same logits reduced two ways (log_softmax vs logsumexp - z[y]) in fp32
    np.testing.assert_allclose(-np.take_along_axis(lp, y[..., None], -1)[..., 0], losses, rtol=1e-5, atol=1e-6)
    mixer = HedgeMixer(VOCAB, warmup_tokens=0, buckets=BUCKETS, update_every=16)
    mixer.score(*stream_contexts(tokens, 0, 16), losses[0])
    t2, t1, yy = stream_contexts(tokens, 16, 32)
    mix = mixer.mixture(lp[1], t2, t1)
    np.testing.assert_allclose(mix.sum(-1), 1.0, atol=1e-5)
    nll = mixer.mix_nll(losses[1], mixer.count_log_probs(t2, t1, yy))
    np.testing.assert_allclose(np.exp(-nll), mix[np.arange(16), yy], rtol=1e-5)
