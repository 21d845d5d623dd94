"""The Hedge mixer of #895 (credited there to PRs #688 and #745), kept honest: an online, score-first
mixture of the model with count-based experts, reported beside the sliding bpb, never instead of it.

Experts, each a normalised distribution over the vocabulary (V ids), for target y after tokens t2, t1:
  0. neural: the model's softmax of its soft-capped logits, p(y) = exp(-token loss);
  1. unigram: (c[y] + 0.1) / (N + 0.1 V), N the targets counted so far;
  2. bigram: (c[t1, y] + 0.1) / (c[t1] + 0.1 V);
  3. hashed trigram: h = ((t2 * 36313) XOR (t1 * 27191)) mod 65536, (c[h, y] + 0.01) / (c[h] + 0.01 V).
     #895 divides by max(c[h], 1), which leaves an empty bucket's probabilities summing to 0.01 V /
     (1 + 0.01 V) < 1; c[h] (the row's own total) keeps it a distribution (uniform when empty).
#895's fifth "entropy" expert (its NLL := the model's entropy, the same "probability" exp(-H) for every
token) is left out: it is not a distribution, its mass V exp(-H) can far exceed 1, and Hedge then favours
it whenever the model is overconfident, reporting a loss that ignores the true tokens.

Mixture: p(y) = sum_k w_k p_k(y), w = softmax(log_w), log_w starting at [2, 0, 0, 0]. The stream of
targets is processed in order, in blocks of UPDATE_EVERY: each block is scored with the tables and
weights as they stood before it (score-first), then its tokens go into the tables and, once the mixer is
mixing, the Hedge rule log_w -= eta * (mean NLL of each expert over the block) moves the weights. Until
WARMUP_TOKENS targets have been counted the mixer returns the neural NLL (and the weights stay put).
Targets come from the whole scored stream, so t2 and t1 are the true previous tokens (t2 = 0 for the very
first target only; #895 resets t2 to 0 at each window's first position). Tables are never reset.
Memory: the trigram table is 65536 x V int32 (256 MiB at V = 1024), touched lazily.
"""

from __future__ import annotations

import numpy as np

INITIAL_LOG_WEIGHTS = (2.0, 0.0, 0.0, 0.0)
COUNT_ALPHA = 0.1  # unigram and bigram smoothing
TRIGRAM_ALPHA = 0.01
TRIGRAM_BUCKETS = 65536
WARMUP_TOKENS = 10_000
UPDATE_EVERY = 2048  # targets per score-then-update block (#895: a batch of 32 windows of stride 64)


def trigram_bucket(prev2: np.ndarray, prev1: np.ndarray, buckets: int = TRIGRAM_BUCKETS) -> np.ndarray:
    return ((np.asarray(prev2, np.int64) * 36313) ^ (np.asarray(prev1, np.int64) * 27191)) % buckets


def stream_contexts(tokens: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(t2, t1, y) int64 for targets lo..hi-1 of `tokens` (target j is tokens[j + 1])."""
    y = np.asarray(tokens[lo + 1 : hi + 1], np.int64)
    t1 = np.asarray(tokens[lo:hi], np.int64)
    t2 = np.asarray(tokens[max(lo - 1, 0) : hi - 1], np.int64)  # only slices: the stream may be 62M tokens
    if lo == 0:
        t2 = np.concatenate([[0], t2])
    return t2, t1, y


def _logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    m = np.max(a, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(a - m), axis=axis))


class HedgeMixer:
    def __init__(self, vocab_size: int, eta: float = 0.1, warmup_tokens: int = WARMUP_TOKENS,
                 buckets: int = TRIGRAM_BUCKETS, update_every: int = UPDATE_EVERY):
        self.vocab_size, self.eta, self.warmup_tokens = int(vocab_size), float(eta), int(warmup_tokens)
        self.buckets, self.update_every = int(buckets), int(update_every)
        v = self.vocab_size
        self.unigram = np.zeros(v, np.int64)
        self.bigram = np.zeros((v, v), np.int32)
        self.bigram_rows = np.zeros(v, np.int64)
        self.trigram = np.zeros((self.buckets, v), np.int32)
        self.trigram_rows = np.zeros(self.buckets, np.int64)
        self.log_w = np.array(INITIAL_LOG_WEIGHTS, np.float64)
        self.seen = 0  # targets counted into the tables
        self.mixed = 0  # targets scored by the mixture (the rest, in the warmup, by the model alone)

    @property
    def weights(self) -> np.ndarray:
        w = np.exp(self.log_w - self.log_w.max())
        return w / w.sum()

    @property
    def mixing(self) -> bool:
        return self.seen >= self.warmup_tokens

    def _count_ratio(self, t2, t1, y):
        """(numerators, denominators) of the count experts' probabilities, (3, m) each; y may be (m, V)."""
        v, h = self.vocab_size, trigram_bucket(t2, t1, self.buckets)
        t1c, hc = (t1[:, None], h[:, None]) if np.ndim(y) == 2 else (t1, h)
        num = [self.unigram[y] + COUNT_ALPHA, self.bigram[t1c, y] + COUNT_ALPHA, self.trigram[hc, y] + TRIGRAM_ALPHA]
        den = [self.seen + COUNT_ALPHA * v, self.bigram_rows[t1c] + COUNT_ALPHA * v,
               self.trigram_rows[hc] + TRIGRAM_ALPHA * v]
        return num, den

    def count_log_probs(self, t2, t1, y) -> np.ndarray:
        """log p_k(y) of the count experts, (3, m) float64, from the tables as they stand."""
        num, den = self._count_ratio(np.asarray(t2), np.asarray(t1), np.asarray(y))
        return np.log(np.stack([np.asarray(n, np.float64) / d for n, d in zip(num, den)]))

    def count_distributions(self, t2, t1) -> np.ndarray:
        """The count experts' full distributions, (3, m, V) float64 (for checks: m x V memory)."""
        t1 = np.asarray(t1)
        y = np.broadcast_to(np.arange(self.vocab_size), (len(t1), self.vocab_size))
        num, den = self._count_ratio(np.asarray(t2), t1, y)
        return np.stack([np.broadcast_to(np.asarray(n, np.float64) / d, y.shape) for n, d in zip(num, den)])

    def mix_nll(self, neural_nll: np.ndarray, count_lp: np.ndarray) -> np.ndarray:
        """The mixture's NLL of the targets under the current weights (the neural NLL until mixing)."""
        neural_nll = np.asarray(neural_nll, np.float64)
        if not self.mixing:
            return neural_nll
        log_w = self.log_w - _logsumexp(self.log_w, 0)
        return -_logsumexp(log_w[:, None] + np.vstack([-neural_nll[None], count_lp]), 0)

    def mixture(self, neural_log_probs: np.ndarray, t2, t1) -> np.ndarray:
        """The full mixture distribution (m, V) for contexts (t2, t1), given the neural log-probabilities
        over the vocabulary (m, V), under the current tables and weights. Changes nothing."""
        neural = np.exp(np.asarray(neural_log_probs, np.float64))
        if not self.mixing:
            return neural
        w = self.weights
        return w[0] * neural + np.tensordot(w[1:], self.count_distributions(t2, t1), axes=1)

    def score(self, t2, t1, y, neural_nll) -> np.ndarray:
        """Score one block (mixture NLL per target), then count its tokens and update the weights."""
        t2, t1, y = (np.asarray(a, np.int64) for a in (t2, t1, y))
        count_lp = self.count_log_probs(t2, t1, y)
        nll = self.mix_nll(neural_nll, count_lp)
        self.mixed += len(y) if self.mixing else 0
        if self.mixing and len(y):  # the Hedge rule, from this block's (already scored) targets
            expert_nll = np.vstack([np.asarray(neural_nll, np.float64)[None], -count_lp])
            self.log_w = self.log_w - self.eta * expert_nll.mean(axis=1)
        self._count(t2, t1, y)
        return nll

    def _count(self, t2, t1, y) -> None:
        np.add.at(self.unigram, y, 1)
        np.add.at(self.bigram, (t1, y), 1)
        np.add.at(self.bigram_rows, t1, 1)
        h = trigram_bucket(t2, t1, self.buckets)
        np.add.at(self.trigram, (h, y), 1)
        np.add.at(self.trigram_rows, h, 1)
        self.seen += len(y)

    def run_stream(self, tokens: np.ndarray, neural_nll: np.ndarray) -> float:
        """Mix over every target of `tokens` in order (neural_nll[j] is the model's loss on target j);
        returns the float64 sum of the mixture's NLL."""
        n = len(tokens) - 1
        if len(neural_nll) != n:
            raise ValueError(f"{len(neural_nll)} per-token losses for {n} targets")
        total = 0.0
        for lo in range(0, n, self.update_every):
            hi = min(lo + self.update_every, n)
            total += float(self.score(*stream_contexts(tokens, lo, hi), neural_nll[lo:hi]).sum(dtype=np.float64))
        return total
