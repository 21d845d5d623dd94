"""The chunked softcap cross-entropy (backend_torch/fused_loss.py) against the written-out loss of
backend_torch/model.py: same per-token losses and same gradients for h and the head, any chunking."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from backend_torch.fused_loss import softcap_cross_entropy  # noqa: E402
from backend_torch.model import cross_entropy, linear, softcap  # noqa: E402


def _inputs(dtype, tokens=(3, 37), dim=16, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(*tokens, dim, generator=g, dtype=dtype) * 2).requires_grad_(True)  # large logits: the cap bites
    w = torch.randn(vocab, dim, generator=g, dtype=dtype).requires_grad_(True)
    y = torch.randint(0, vocab, tokens, generator=g)
    return h, w, y


def _written_out(h, w, y, cap):
    return cross_entropy(softcap(linear(h, w), cap), y)


@pytest.mark.parametrize("chunk", [1, 7, 64, 4096])  # one token per chunk, ragged last chunk, one chunk
def test_matches_written_out_loss_and_gradients(chunk):
    h, w, y = _inputs(torch.float32)
    weights = torch.rand(y.shape, generator=torch.Generator().manual_seed(1))  # a non-uniform upstream gradient
    ref = _written_out(h, w, y, 30.0)
    gh_ref, gw_ref = torch.autograd.grad((ref * weights).sum(), (h, w))
    out = softcap_cross_entropy(h, w, y, 30.0, chunk=chunk)
    gh, gw = torch.autograd.grad((out * weights).sum(), (h, w))
    # float32 sums in a different order (chunked, and softmax formed from the saved logsumexp): a few ulps
    # of values of order 1-10.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, gh_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-4, atol=1e-6)


def test_gradcheck_float64():
    h, w, y = _inputs(torch.float64, tokens=(2, 5), dim=4, vocab=7)
    assert torch.autograd.gradcheck(lambda a, b: softcap_cross_entropy(a, b, y, 3.0, chunk=3), (h, w))


def test_rejects_bf16():
    h, w, y = _inputs(torch.float32)
    with pytest.raises(TypeError, match="bfloat16"):
        softcap_cross_entropy(h.bfloat16(), w.bfloat16(), y, 30.0)
