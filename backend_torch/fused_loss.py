"""The head product, logit softcap and cross-entropy as one token-chunked autograd function, for eager CPU.

Written out op by op (backend_torch/model.py: linear, softcap, logsumexp, gather), the loss makes several
passes over (tokens x vocab) float32 tensors in the forward pass and as many again in the backward pass, and
keeps them alive in between: on a CPU that is 15-18% of a demo step, spent on memory traffic (docs/benchmarks.md).
Here each chunk of tokens makes its logits, loss and, in the backward pass, recomputes them and forms the
gradient in one go, so the working set stays in cache and nothing logits-sized outlives its chunk. The
backward pass redoes the head product (2 * d * vocab FLOPs per token, a few percent of a step).

Gradient, with t = tanh(z / cap) and the softcapped logits c = cap * t:
    dL/dz = g * (softmax(c) - onehot(y)) * (1 - t^2)
torch.compile (CUDA) fuses the written-out form itself; this function is for eager float32 only.
"""

from __future__ import annotations

import torch

from backend_torch.model import head, hidden_states

CHUNK_TOKENS = 1024  # 1024 tokens x vocab 1024 x 4 B = 4 MiB of logits per chunk: within L2/L3 here


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.tanh(h @ w.T / cap)
    return t, t * cap


class _SoftcapCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float, chunk: int) -> torch.Tensor:
        losses = torch.empty(h.size(0), dtype=h.dtype, device=h.device)
        lses = torch.empty_like(losses)
        for s in range(0, h.size(0), chunk):
            _, c = _chunk_logits(h[s:s + chunk], w, cap)
            lse = torch.logsumexp(c, dim=-1)
            lses[s:s + chunk] = lse
            losses[s:s + chunk] = lse - c.gather(1, y[s:s + chunk, None])[:, 0]
        ctx.save_for_backward(h, w, y, lses)
        ctx.cap, ctx.chunk = cap, chunk
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        h, w, y, lses = ctx.saved_tensors
        cap, chunk = ctx.cap, ctx.chunk
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for s in range(0, h.size(0), chunk):
            hs = h[s:s + chunk]
            t, c = _chunk_logits(hs, w, cap)
            g = torch.exp_(c.sub_(lses[s:s + chunk, None]))  # softmax, in place of the logits
            g.scatter_add_(1, y[s:s + chunk, None], torch.full_like(g[:, :1], -1.0))
            g.mul_(grad_losses[s:s + chunk, None]).mul_(t.mul_(t).neg_().add_(1.0))
            if grad_h is not None:
                grad_h[s:s + chunk] = g @ w
            if grad_w is not None:
                grad_w.addmm_(g.T, hs)
        return grad_h, grad_w, None, None, None


def softcap_cross_entropy(h: torch.Tensor, w: torch.Tensor, y: torch.Tensor, cap: float,
                          chunk: int = CHUNK_TOKENS) -> torch.Tensor:
    """Per-token cross-entropy in nats of softcap(h @ w.T) against y: h (..., d) float32, w (vocab, d),
    y (...) integer ids. Returns (...) in h's dtype. Equals model.cross_entropy(softcap(linear(h, w)), y)."""
    if h.dtype not in (torch.float32, torch.float64) or w.dtype != h.dtype:
        # float64 is for gradcheck; bf16 goes through the written-out loss (compiled on CUDA)
        raise TypeError(f"softcap_cross_entropy takes float32 (or float64) h and w, not {h.dtype} and {w.dtype}")
    shape = h.shape[:-1]
    out = _SoftcapCrossEntropy.apply(h.reshape(-1, h.size(-1)), w, y.reshape(-1).long(), float(cap), int(chunk))
    return out.reshape(shape)


def fused_token_losses(spec, p: dict, x: torch.Tensor, y: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """model.token_losses with the head, softcap and cross-entropy fused: per-token nats, float32 (batch, seq)."""
    return softcap_cross_entropy(hidden_states(spec, p, x, dtype), head(spec, p), y, spec.logit_softcap)
