"""Parity tolerances: how far the MLX and PyTorch backends may differ, in one place, each with its reason.

A row of `loopgolf parity` holds when  max|a - b| <= atol + rtol * max(|a|, |b|)  over the tensor: the
scale is the tensor's largest magnitude, so near-zero elements cannot blow up a relative measure. Rows
on a change of the weights (new - old) add one ulp of the weight, an exact rounding bound, not a
tolerance (see tools/parity.py). Two errors grow with the problem and are scaled by tolerance():
RoPE's with the sequence length, Newton-Schulz's with the matrix size.

"Observed" is the worst max-rel-diff of `loopgolf parity` over every shipped config with --small, seeds
0-9, MLX on its reference BLAS and on OpenBLAS, torch on 1 and 2 threads ("small"), and at full size
(baseline_9x512 and ut_3x4: d=512, seq_len 1024, fp32; demo: d=128, seq_len 256, both dtypes; "full").
Each rtol leaves a margin of about 10-100x over the worst of them. Bugs planted in one backend
(tests/test_parity.py) move the rows they touch by 1e-3 to 1 relative: a flipped RoPE sign, a wrong
Newton-Schulz coefficient, a tiled GQA head layout, a wrong norm epsilon, a lossy weight export.

Only parity and the tests read this module; nothing here is needed to train or run a model.
"""

from __future__ import annotations

import dataclasses

EPS32 = 2.0**-23  # fp32's relative spacing (one ulp at 1.0)


@dataclasses.dataclass(frozen=True)
class Tol:
    atol: float
    rtol: float
    reason: str
    per_position: float = 0.0  # tolerance() adds per_position * seq_len * EPS32 to rtol
    per_dim: float = 0.0  # tolerance() adds per_dim * max(rows, cols) to rtol
    kind: str = ""  # filled in by tolerance()

    def bound(self, scale: float) -> float:
        return self.atol + self.rtol * scale


_ULP = "2**-23 = 1.2e-7 relative per fp32 rounding"
_BF16 = ("bf16 keeps 8 significant bits (2**-8 = 3.9e-3 relative per rounding) and the frameworks round at "
         "different points (fused vs unfused kernels, fp32 vs bf16 accumulators)")
_NS = ("Muon orthogonalises: each of the 5 quintic Newton-Schulz steps multiplies the matmul rounding in small "
       "singular directions by up to a = 3.4 (3.4**5 ~ 450), and the matmuls sum over the matrix's side, so "
       "the error is relative to the whole update and grows with the matrix. Observed for newton_schulz "
       "alone, MLX vs torch: 1.3e-5 (64x64), 9e-5 (512x512), 2.2e-4 (1024x512), 1.2e-3 (2048x1024), at "
       "most 6e-7 * max(rows, cols)")

# (kind, compute dtype) -> Tol; dtype "*" serves both.
TOLERANCES: dict[tuple[str, str], Tol] = {
    # ---- per op, on random inputs of the model's shapes --------------------------------------------------
    ("op", "float32"): Tol(0.0, 2e-5, f"one fp32 op on O(1) inputs: only summation order and the rsqrt/exp "
                                      f"kernels differ, a few ulps ({_ULP}). Observed 4.3e-7 small, 1.2e-6 "
                                      f"full (attention over 1024 positions)"),
    ("op", "bfloat16"): Tol(0.0, 1e-1, f"{_BF16}; RMSNorm agrees exactly, attention and the MLP differ by 1-2 "
                                       f"bf16 ulps where they round differently. Observed 7.8e-3 small, 4.4e-3 "
                                       f"full"),
    ("rope", "float32"): Tol(0.0, 1e-5, "MLX's fast RoPE forms its frequencies as base**(-2i/d), torch as "
                                        "1/base**(2i/d), and both round the angle pos * freq in fp32: the angle is "
                                        "off by a few ulps of pos, so the output's error grows linearly with the "
                                        "sequence. Observed (0.06-0.22) * seq_len * 2**-23 for head_dim 8-64, "
                                        "seq_len 64-4096 (4.9e-7 small, 2.8e-5 full)", per_position=3.0),
    ("rope", "bfloat16"): Tol(0.0, 1e-1, f"{_BF16}. Observed 0 small, 5.7e-5 full"),
    # softcap and cross-entropy always run on float32 logits (the model casts before them).
    ("op_fp32", "*"): Tol(0.0, 5e-6, f"tanh and logsumexp in fp32, a few ulps ({_ULP}). Observed 1.3e-7"),
    # ---- the whole model ---------------------------------------------------------------------------------
    ("hidden", "float32"): Tol(0.0, 2e-5, "fp32 through L effective layers: each adds a few ulps of summation-"
                                          "order error and the residual stream carries it on, so it grows with "
                                          "depth (shared blocks run again add theirs again). Observed 5.4e-7 "
                                          "small (12 layers), 7.4e-7 full, 4.3e-7 at 24 layers (3x8)"),
    ("hidden", "bfloat16"): Tol(0.0, 2.5e-1, f"{_BF16}, compounded over L layers: attention's softmax and the "
                                             f"squared ReLU amplify it. Observed 2.3e-2 small, 1.6e-2 full"),
    ("logits", "float32"): Tol(0.0, 2e-5, "as hidden states, then the final norm, the head matmul and the "
                                          "softcap in fp32. Observed 5.4e-7 small, 7.2e-7 full"),
    ("logits", "bfloat16"): Tol(0.0, 1e-1, f"{_BF16}; the final RMSNorm and the softcap shrink the hidden "
                                           f"states' error. Observed 7.4e-3 small, 5.6e-3 full"),
    ("loss", "float32"): Tol(0.0, 2e-5, "a mean of fp32 cross-entropies, which averages the logit errors. "
                                        "Observed 3.8e-7 small, 7.8e-7 full"),
    ("loss", "bfloat16"): Tol(0.0, 5e-3, "bf16 logit errors average out over tokens. Observed 1.9e-4 small, "
                                         "1.2e-5 full"),
    # ---- one backward pass, relative to each tensor's largest gradient -----------------------------------
    ("grad", "float32"): Tol(0.0, 1e-4, "the backward pass runs the L layers in reverse, so the forward's and "
                                        "the backward's errors compound; a shared block sums L/num_blocks "
                                        "contributions; RoPE's position-dependent error reaches c_q, c_k and "
                                        "q_gain. Observed 3.9e-6 small, 8.9e-6 full", per_position=1.0),
    ("grad", "bfloat16"): Tol(0.0, 6e-1, "every backward matmul rounds to 8 bits and small gradient entries are "
                                         "mostly rounding noise: a sanity band (NaN, a wrong sign or scale of a "
                                         "whole tensor). Observed 5.8e-2 small, 1.2e-2 full"),
    # ---- one optimizer step on the SAME numpy gradients: fp32 in both backends whatever the dtype -------
    ("update_adam", "*"): Tol(0.0, 1e-5, "Adam is element-wise fp32 (sqrt, divide, bias corrections from "
                                         "beta**step): an ulp of the update. Observed: the new weights differ by "
                                         "at most the one-ulp rounding floor (2.98e-6 of the update)"),
    ("update_muon", "*"): Tol(0.0, 0.0, f"{_NS}. In parity 4.7e-6 small (dims <= 128), 1.7e-4 full (1024x512). "
                                        "The 'update+row_norm' rows (MuonEq-R: rows normalised before Newton-Schulz, "
                                        "one fp32 norm and divide per row more) share it: observed 1.7e-6 small, "
                                        "3.1e-6 for demo's 256x128, below the plain step's", per_dim=5e-6),
    # ---- one full train_step of each trainer on the same batch -------------------------------------------
    ("step_loss", "float32"): Tol(0.0, 2e-5, "the compiled step's loss, as 'loss'. Observed 3.8e-7 small, "
                                             "7.8e-7 full"),
    ("step_loss", "bfloat16"): Tol(0.0, 5e-3, "as 'loss' in bf16. Observed 1.9e-4 small, 1.2e-5 full"),
    ("after_step_loss", "float32"): Tol(0.0, 3e-4, "the loss of the weights after the step, which differ by the "
                                                   "step's error, including the Adam entries with |g| ~ 0 (see "
                                                   "ADAM_GRAD_FLOOR) moved by up to lr. Observed 2.4e-6 small, "
                                                   "1.1e-5 full"),
    ("after_step_loss", "bfloat16"): Tol(0.0, 3e-2, "as above after a bf16 step, whose Adam entries near g = 0 "
                                                    "flip sign (see NOT_COMPARED). Observed 3.1e-3 small, 1.7e-3 "
                                                    "full"),
    ("step_muon", "float32"): Tol(0.0, 0.0, "as 'update_muon', on gradients that already differ (see 'grad'), "
                                            "through the compiled step. Observed 6.4e-6 small, 1.7e-4 full "
                                            "(1024x512)", per_dim=5e-6),
    ("step_muon", "bfloat16"): Tol(0.0, 1.0, "Muon on bf16 gradients that differ by up to 6%, amplified in small "
                                             "singular directions: a sanity band (NaN, a flipped sign, an LR off "
                                             "by 2x or more). Observed 1.0e-1 small, 3.5e-2 full"),
    ("step_adam", "float32"): Tol(0.0, 1e-4, "Adam through the compiled step, on the elements above "
                                             "ADAM_GRAD_FLOOR. Observed: the one-ulp rounding floor (6e-6)"),
    # ---- the artifact ------------------------------------------------------------------------------------
    ("dequant_logits", "float32"): Tol(0.0, 2e-5, "logits of each backend's own dequantized artifact: as "
                                                  "'logits'. Observed 5.4e-7 small, 1.1e-6 full"),
    ("dequant_logits", "bfloat16"): Tol(0.0, 1e-1, "as 'logits' in bf16. Observed 7.5e-3 small, 5.6e-3 full"),
    # ---- golden trajectory (tests/golden) ----------------------------------------------------------------
    ("golden_loss", "float32"): Tol(2e-4, 0.0, "8 fp32 training steps checked against a file written on another "
                                               "machine: per-step rounding (~1e-7) carried on by the updates. "
                                               "Observed 3.6e-7 between the backends (losses 4.4 -> 1.7); a "
                                               "changed numeric detail moves the trajectory by more: "
                                               "Newton-Schulz c = 2.0 instead of 2.0315 by 7.4e-3, softcap 29 "
                                               "instead of 30 by 1.0e-3"),
}

# train_step Adam rows compare only elements whose gradient (torch's, from the backward pass) is at least
# this fraction of its tensor's largest. Below it the two backends' gradients agree only to their own
# tolerance (fp32: observed 4e-6 of the largest), and Adam's first step lr * g / (|g| + eps) maps that
# noise onto anything up to +-lr (observed: a tied-embedding entry with g = 6e-8 moved by 4.5e-4; with a
# floor of 1e-4 one entry still reached 1.5e-4 relative). Leaves out ~1-2% of entries, counted in the note.
ADAM_GRAD_FLOOR: dict[str, float] = {"float32": 1e-3}

# Rows that parity leaves out, and why.
NOT_COMPARED: dict[tuple[str, str], str] = {
    ("step_adam", "bfloat16"): "Adam's first step is ~lr * sign(g), and bf16 gradient noise (up to 6% of the "
                               "largest entry) flips the sign of small entries, moving them by 2 lr: an element-"
                               "wise bound would be vacuous or flaky. The bf16 step is judged by the loss after "
                               "it, and Adam itself by 'update adam'",
}


def tolerance(kind: str, dtype: str, seq_len: int = 0, dim: int = 0) -> Tol:
    """The tolerance for `kind` in compute `dtype`, its rtol resolved for `seq_len` positions and for a matrix
    whose larger side is `dim`."""
    tol = TOLERANCES.get((kind, dtype)) or TOLERANCES[(kind, "*")]
    rtol = tol.rtol + tol.per_position * seq_len * EPS32 + tol.per_dim * dim
    return dataclasses.replace(tol, rtol=rtol, kind=kind)
