"""Full Hessian GPTQ (#1110; Frantar et al.) for the per-row intN schemes, in numpy.

For a linear y = x W^T with W (out, in) and the Hessian H = sum x^T x (in, in) of its inputs on training
batches, GPTQ quantizes W one column at a time and spreads each column's rounding error over the columns
not yet quantized, weighted by H^-1, so that ||X (Q - W)^T|| (the error in the layer's output) stays small
rather than ||Q - W||. The output is the same per-row int8 codes + fp16 steps the intN schemes store, so
dequantization, the artifact format and the size tools are unchanged.

- Act-order: columns in order of descending diag(H), the most used inputs first (stable sort).
- Dead columns (diag(H) == 0: the input was always 0 on the calibration batches) get a unit diagonal and
  no off-diagonal terms, so they are rounded to nearest and exchange no error with the others (reference
  GPTQ zeroes such weights instead; keeping them costs nothing and is safer if the input is not always 0).
- Damping: `damp` x mean(diag H) is added to the diagonal (artifact.gptq_damp, 1% by default: #1110's
  value); if the Cholesky still fails it is raised tenfold, up to 6 times. `damp` and `block` have no
  defaults here: they are ArtifactConfig's.
- The upper Cholesky factor U of H^-1 (H^-1 = U^T U) drives the updates; lazy batch updates: errors are
  applied inside a block of `block` columns at once per column, and to the later columns once per block.
- The per-row step: each candidate of the tensor's scheme sets an fp16 step per row (the clip search's
  `CLIP_SEARCH_PERCENTILES`; the std-clip schemes intN_stdK have one, K * std(row) / qmax, as #1394), GPTQ runs with it, and each row keeps the candidate with the lowest output
  error (w - q s) H (w - q s)^T on the undamped H. The search is on the GPTQ output error, not on the
  weights' RTN error, because GPTQ moves the weights: the clip that rounds W best is not the one whose
  GPTQ result best preserves the layer's output. Round-to-nearest with each candidate step (the clip
  search's own codes among them) competes too, so every row's output error is at most RTN's.
- Deterministic: float64 throughout, stable sorts, first candidate on ties.

Which tensors: 2-D float tensors quantized (more than 65,536 elements) by an intN per-row scheme (int4..int7,
int8_search, intN_stdK) that have a Hessian. Upstream "int8" keeps its exact rule (use int8_search or int8_stdK
for 8-bit GPTQ), "fp16" and passthrough tensors are not quantized at all. The tied embedding (`LOOKUP_TABLES`)
is left to its scheme unless asked for (`embedding`, artifact.gptq_embedding, as #1394): its rows are also
looked up directly, which GPTQ's output objective ignores, and its Hessian is that of the head's input (the
final norm's output), as the records take it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from core.quant import (
    CLIP_SEARCH_PERCENTILES, KEEP_FLOAT_MAX_NUMEL, ROLE_QUANTIZED, IntNPerRow, QuantizedTensor, QuantizedWeights,
    base_scheme, fp16_step, is_control_name, quantize_rows_with_step, quantize_weights, scheme_for_tensor,
)
from core.shards import open_train_stream, train_micro_batch

LOOKUP_TABLES = ("tok_emb.weight",)
_DAMP_RETRIES = 6


@dataclass(frozen=True)
class GPTQResult:
    codes: np.ndarray  # int8 (out, in)
    step: np.ndarray  # float16 (out,)
    damp: float  # the damping fraction the Cholesky needed (>= the one asked for)


def gptq_scheme_qmax(scheme: str) -> int | None:
    """qmax of a base scheme GPTQ applies to, else None."""
    s = base_scheme(scheme)
    return s.qmax if isinstance(s, IntNPerRow) else None


def upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """(U, damping used) with U upper triangular and U^T U = (H + damp * mean(diag H) * I)^-1."""
    mean_diag = float(np.mean(np.diag(h))) if h.size else 1.0
    mean_diag = mean_diag if mean_diag > 0 else 1.0
    eye = np.eye(h.shape[0])
    frac = damp
    for _ in range(_DAMP_RETRIES):
        try:
            lower = np.linalg.cholesky(h + frac * mean_diag * eye)
            lower_inv = np.linalg.inv(lower)
            hinv = lower_inv.T @ lower_inv
            return np.linalg.cholesky((hinv + hinv.T) / 2).T, frac
        except np.linalg.LinAlgError:
            frac = max(frac, 1e-4) * 10
    raise np.linalg.LinAlgError(f"the Hessian stays singular with damping up to {frac / 10:g} of its mean diagonal")


def gptq_codes(w: np.ndarray, u: np.ndarray, step: np.ndarray, qmax: int, block: int) -> np.ndarray:
    """GPTQ codes of w (rows, n), columns already in act order, with U from upper_cholesky_of_inverse and
    a float64 step per row."""
    work = np.array(w.T, dtype=np.float64, order="C")  # (n, rows): one column of w is one contiguous row
    codes = np.empty(work.shape, dtype=np.int8)
    s = step.astype(np.float64)
    n = work.shape[0]
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        wb = work[b0:b1]  # a view: the block is updated in place
        errs = np.empty_like(wb)
        ub = u[b0:b1, b0:b1]
        for j in range(b1 - b0):
            q = np.clip(np.rint(wb[j] / s), -qmax, qmax)
            codes[b0 + j] = q
            err = (wb[j] - q * s) / ub[j, j]
            wb[j + 1:] -= np.outer(ub[j, j + 1:], err)
            errs[j] = err
        work[b1:] -= u[b0:b1, b1:].T @ errs  # the lazy update of every later column, once per block
    return np.ascontiguousarray(codes.T)


def output_error(w: np.ndarray, codes: np.ndarray, step: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per row, (q s - w) H (q s - w)^T: the squared output error summed over the calibration inputs."""
    diff = codes.astype(np.float64) * step.astype(np.float64)[:, None] - w
    return np.einsum("ij,ij->i", diff @ h, diff)


def gptq_quantize(w: np.ndarray, h: np.ndarray, qmax: int, damp: float, block: int,
                  percentiles: Iterable[float] = CLIP_SEARCH_PERCENTILES,
                  steps: list[np.ndarray] | None = None) -> GPTQResult:
    """Per-row intN codes and fp16 steps for w (out, in) given H (in, in) (see the module docstring). `steps`:
    the candidate fp16 steps per row (a scheme's candidate_steps); None: the clip search's `percentiles`."""
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    w = w32.astype(np.float64)
    h = np.array(h, dtype=np.float64)
    rows, n = w.shape
    if h.shape != (n, n):
        raise ValueError(f"Hessian shape {h.shape} does not match a weight of {n} input columns")
    if block < 1 or damp < 0:
        raise ValueError(f"block {block} must be positive and damp {damp} non-negative")
    h = (h + h.T) / 2
    objective = h.copy()  # the output error is measured on the undamped, unmodified Hessian
    dead = np.flatnonzero(np.diag(h) <= 0)
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    order = np.argsort(-np.diag(h), kind="stable")
    u, used = upper_cholesky_of_inverse(h[np.ix_(order, order)], damp)

    if steps is None:
        percentiles = tuple(float(p) for p in percentiles)
        # (rows,) each, computed exactly as the clip search computes them, so its codes are among the candidates
        steps = [fp16_step(c, qmax) for c in np.quantile(np.abs(w32), percentiles, axis=1)]
    steps = list(steps)
    # All candidates in one GPTQ pass: rows are independent, so stacking them only widens each update.
    stacked = gptq_codes(np.tile(w[:, order], (len(steps), 1)), u, np.concatenate(steps), qmax, block)
    inverse = np.argsort(order)
    candidates = [stacked[i * rows:(i + 1) * rows][:, inverse] for i in range(len(steps))]
    candidates += [quantize_rows_with_step(w32, s, qmax) for s in steps]  # round to nearest
    steps = steps + steps

    best_codes, best_step = candidates[0].copy(), steps[0].copy()
    best_err = output_error(w, best_codes, best_step, objective)
    for codes, step in zip(candidates[1:], steps[1:]):
        err = output_error(w, codes, step, objective)
        better = err < best_err
        best_codes[better], best_step[better], best_err[better] = codes[better], step[better], err[better]
    return GPTQResult(best_codes, best_step, used)


def gptq_targets(weights: Mapping[str, np.ndarray], scheme: str, hessians: Mapping[str, np.ndarray],
                 quantized: QuantizedWeights, embedding: bool = False) -> list[str]:
    """The tensor names GPTQ replaces (see the module docstring), sorted; `embedding`: the tied embedding too."""
    return [name for name in sorted(hessians)
            if name in quantized.tensors and (embedding or name not in LOOKUP_TABLES)
            and quantized.tensors[name].role == ROLE_QUANTIZED and weights[name].ndim == 2
            and gptq_scheme_qmax(scheme_for_tensor(scheme, name)) is not None]


def gptq_applies(weights: Mapping[str, np.ndarray], scheme: str, embedding: bool = False) -> bool:
    """Whether any tensor can be a GPTQ target (by shape, name and scheme, without quantizing): at a small
    width every matrix may be under the passthrough size, and Hessians would be collected for nothing."""
    return any((embedding or name not in LOOKUP_TABLES) and w.ndim == 2 and w.size > KEEP_FLOAT_MAX_NUMEL
               and not is_control_name(name) and gptq_scheme_qmax(scheme_for_tensor(scheme, name)) is not None
               for name, w in weights.items())


NO_TARGETS = ("tensors of at most {:,} elements are never GPTQ'd, the tied embedding only with "
              "artifact.gptq_embedding".format(KEEP_FLOAT_MAX_NUMEL))


def quantize_weights_gptq(weights: Mapping[str, np.ndarray], scheme: str, hessians: Mapping[str, np.ndarray],
                          damp: float, block: int,
                          record: Mapping | None = None, embedding: bool = False) -> QuantizedWeights:
    """quantize_weights(weights, scheme), then GPTQ for every eligible tensor that has a Hessian (`embedding`:
    the tied embedding too). The result carries what the artifact header records: {"damp", "block", "tensors",
    **record} (record: e.g. the calibration batches and tokens)."""
    quantized = quantize_weights(weights, scheme)
    tensors = dict(quantized.tensors)
    targets = gptq_targets(weights, scheme, hessians, quantized, embedding)
    for name in targets:
        base = base_scheme(scheme_for_tensor(scheme, name))
        w32 = np.ascontiguousarray(weights[name], dtype=np.float32)
        result = gptq_quantize(w32, hessians[name], base.qmax, damp, block, steps=base.candidate_steps(w32))
        tensors[name] = QuantizedTensor(ROLE_QUANTIZED, result.codes, result.step)
    info = {"damp": damp, "block": block, "tensors": targets, **(record or {})}
    return QuantizedWeights(quantized.scheme, tensors, gptq=info)


def collect_training_hessians(backend, train_files, cfg, batches: int) -> tuple[dict[str, np.ndarray], dict]:
    """(Hessians summed over ranks, the header's calibration record) from `batches` batches of
    train.batch_tokens read by a fresh training stream ([data] order, from its start), each rank taking its
    batches as in training. Training data only: sensitivity measured on validation data breaks the rules (#167)."""
    train = cfg.train
    stream = open_train_stream(cfg, train_files, backend.rank, backend.world_size)
    micro = (train_micro_batch(cfg, stream, backend.rank, backend.world_size)
             for _ in range(batches * train.grad_accum_steps))
    hessians = backend.hessians(micro)
    return hessians, {"calibration": {"batches": batches, "tokens": batches * train.batch_tokens,
                                      "seq_len": train.seq_len}}
