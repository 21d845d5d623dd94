"""Eval-time extra loops and convergence mode (core.depth): the flags of `loopgolf eval`.

    loopgolf eval --weights W --data DIR --loops N
    loopgolf eval --weights W --data DIR --converge 1e-3 [--max-loops M]

--loops N runs N loops in all (at least the R the model was trained with); --converge EPS runs up to M loops
(default 2R) and reports the first loop past R whose relative change of the residual stream,
rms(x_k - x_{k-1}) / rms(x_{k-1}) over the whole validation set, is below EPS. Both report every loop's
delta and the val_loss/val_bpb of the final norm and head applied at its end.
"""

from __future__ import annotations

import argparse

from core.depth import check_loops, evaluate_loops, format_rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("eval-time loops (a cyclic 'KxR' plan)")
    group.add_argument("--loops", type=int, metavar="N",
                       help="evaluate with N loops in all (the trained R plus N-R extra, reusing the last loop's rows)")
    group.add_argument("--converge", type=float, metavar="EPS",
                       help="loop until the relative change of the hidden state rms(x-x_prev)/rms(x_prev) < EPS")
    group.add_argument("--max-loops", type=int, metavar="M", help="with --converge: at most M loops in all (default 2R)")


def wants_depth_eval(args) -> bool:
    return any(getattr(args, flag, None) is not None for flag in ("loops", "converge", "max_loops"))


def run_depth_eval(args, backend, val_tokens, luts, seq_len: int, batch_tokens: int, log=print) -> dict:
    """Run the loops on `backend` (a built MLX or torch trainer holding the weights) over every sequence of
    `val_tokens`; print a line per loop with `log`; return the result (core.depth.LoopEval.to_dict())."""
    total, eps = check_loops(backend.spec, args.loops, args.converge, getattr(args, "max_loops", None))
    if backend.name == "mlx":
        from backend_mlx.depth_eval import loop_stats
    else:
        from backend_torch.depth_eval import loop_stats
    result = evaluate_loops(backend, lambda x, y, n: loop_stats(backend, x, y, n), val_tokens, seq_len,
                            batch_tokens, luts, total, eps)
    if backend.rank == 0:
        for line in format_rows(result):
            log(line)
    return result.to_dict()
