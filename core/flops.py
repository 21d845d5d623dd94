"""Model FLOPs per token, counted from the spec: the numerator of MFU.

Only matrix products are counted (a multiply-add is 2 FLOPs); norms, RoPE, softcap, residual scales,
the softmax, the per-iteration conditioning options (embeddings, scales, gains, gates: all elementwise)
and the optimizer are not. Per token, with d = model_dim, kv = kv_dim, h = mlp_hidden,
V = vocab_size, T = seq_len, L = EFFECTIVE layers (len(layer_plan): a shared block run 4 times is
counted 4 times, because it does the work 4 times):

    per effective layer
      q      2 d d          x @ Wq^T, Wq (d, d)
      k      2 d kv         x @ Wk^T, Wk (kv, d)
      v      2 d kv         x @ Wv^T
      o      2 d d          y @ Wo^T (attn.proj)
      fc     2 d h          mlp.fc
      proj   2 h d          mlp.proj
      scores 2 d K          q . k over K keys, summed over heads (GQA shares k, not the products)
      values 2 d K          softmax(scores) @ v, the same size
    head     2 d V          the tied (or untied) LM head
    inputs   2 b d          BigramHash's projection (b = bigram_dim; none when b = d or it is off),
             + 2 e kv       and the shared VE's (e = ve_dim, #1110; none when e = kv or ve_layers is off)

With q_rank = r (#167) the q term is the two factors, 2 d r + 2 r d. Partial RoPE, XSA (a projection per
head, O(d) per token), SmearGate and the value embeddings (lookups and scaled adds) are elementwise and
not counted, like the norms.

    forward = L x (layer) + head + inputs;   train = 3 x forward (backward = 2 x forward: the gradient with
    respect to the input and with respect to the weight, each the size of the forward product).

K, the keys a query attends to on average: CAUSAL (the default) counts only the unmasked half, the
mean over positions 1..T of the keys each sees, K = (T + 1) / 2, so scores + values = 2 d (T + 1)
per token per layer. `causal=False` counts the full K = T (what a dense kernel executes; PaLM's
convention). The causal half is the work the model needs; flash kernels skip most of the masked half.

Hand count, upstream's baseline (configs/baseline_9x512.toml: d 512, 8 heads, 4 kv heads so kv 256,
h 1024, V 1024, 9 layers) at T = 1024, causal:
    q 524,288 + k 262,144 + v 262,144 + o 524,288 + fc 1,048,576 + proj 1,048,576 = 3,670,016
    scores + values = 2 x 512 x 1025 = 1,049,600              -> 4,719,616 per layer
    9 layers 42,476,544 + head 2 x 512 x 1024 = 1,048,576     -> forward 43,525,120 FLOPs/token
    train 3 x 43,525,120 = 130,575,360 FLOPs/token
The 6N approximation (N = effective parameters, 17,059,912 for the baseline) gives 102,359,472: it
leaves out attention's T-dependent products (3 x 9 x 1,049,600 = 28,339,200 here) and counts the
embedding table's lookup, which the tied head's product happens to match, plus the small vectors.
"""

from __future__ import annotations

import dataclasses

from core.params import count_params
from core.spec import ModelSpec

LINEAR_TERMS = ("q", "k", "v", "o", "fc", "proj")
ATTENTION_TERMS = ("scores", "values")


@dataclasses.dataclass(frozen=True)
class FlopCount:
    seq_len: int
    causal: bool
    layers: int  # effective layers counted
    per_layer: dict  # term -> forward FLOPs per token in one effective layer
    head: int  # forward FLOPs per token of the LM head
    inputs: int = 0  # forward FLOPs per token before the layers (BigramHash's and the shared VE's projections)

    @property
    def layer(self) -> int:
        return sum(self.per_layer.values())

    @property
    def linear(self) -> int:
        """Forward FLOPs/token of the weight matrix products (layers' linears and the head)."""
        return self.layers * sum(self.per_layer[t] for t in LINEAR_TERMS) + self.head + self.inputs

    @property
    def attention(self) -> int:
        """Forward FLOPs/token of the attention score and value products."""
        return self.layers * sum(self.per_layer[t] for t in ATTENTION_TERMS)

    @property
    def forward(self) -> int:
        return self.layers * self.layer + self.head + self.inputs

    @property
    def train(self) -> int:
        return 3 * self.forward

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "causal": self.causal, "layers": self.layers,
                "per_layer": dict(self.per_layer), "head": self.head, "inputs": self.inputs, "linear": self.linear,
                "attention": self.attention, "forward": self.forward, "train": self.train}


def flops_per_token(spec: ModelSpec, seq_len: int, causal: bool = True) -> FlopCount:
    """Forward and training FLOPs per token for `spec` at `seq_len` (see the module docstring)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    d, kv, h = spec.model_dim, spec.kv_dim, spec.mlp_width
    # 2 d K per product with K = (T+1)/2 keys on average when causal: 2 d (T+1)/2 = d (T+1), exact.
    attn_product = d * (seq_len + 1) if causal else 2 * d * seq_len
    per_layer = {
        "q": 4 * d * spec.q_rank if spec.q_rank else 2 * d * d,
        "k": 2 * d * kv,
        "v": 2 * d * kv,
        "o": 2 * d * d,
        "fc": 2 * d * h,
        "proj": 2 * h * d,
        "scores": attn_product,
        "values": attn_product,
    }
    bigram_proj = spec.bigram_buckets and spec.bigram_dim != d
    ve_proj = spec.ve_layers and spec.ve_dim != kv  # #1110's shared VE, projected once per token
    inputs = (2 * spec.bigram_dim * d if bigram_proj else 0) + (2 * spec.ve_dim * kv if ve_proj else 0)
    return FlopCount(seq_len=seq_len, causal=causal, layers=spec.num_layers, per_layer=per_layer,
                     head=2 * d * spec.vocab_size, inputs=inputs)


def six_n_per_token(spec: ModelSpec) -> int:
    """The 6N approximation of training FLOPs per token, N = effective parameters (shared blocks counted
    once per use in the plan, the embedding table once): no attention products, for comparison."""
    _, effective = count_params(spec)
    return 6 * effective


def largest_matmul(spec: ModelSpec, tokens: int) -> tuple[int, int, int]:
    """(M, K, N) of the forward's largest matrix product over a micro-batch of `tokens` tokens."""
    d = spec.model_dim
    shapes = [(tokens, d, d), (tokens, d, spec.kv_dim), (tokens, d, spec.mlp_width),
              (tokens, spec.mlp_width, d), (tokens, d, spec.vocab_size)]
    return max(shapes, key=lambda s: s[0] * s[1] * s[2])


def probe_size(spec: ModelSpec, tokens: int, multiple: int = 64, lo: int = 256, hi: int = 8192) -> int:
    """Side n of a square matmul with the FLOPs of the largest product, cbrt(M K N), rounded to a
    multiple of `multiple` and kept within [lo, hi]: the peak probe's size."""
    m, k, n = largest_matmul(spec, tokens)
    side = round((m * k * n) ** (1 / 3) / multiple) * multiple
    return int(min(max(side, lo), hi))
