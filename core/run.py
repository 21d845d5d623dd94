"""What every training entry point does around core.loop: the evaluation data, and the run's header lines.

Shared by `loopgolf train` (tools/train.py) and an exported submission's main (backend_torch/submission.py).
"""

from __future__ import annotations

import numpy as np

from core.bpb import ByteLuts, build_byte_luts, check_vocab
from core.config import RunConfig
from core.manifest import DataPaths
from core.params import count_params
from core.shards import first_val_tokens, load_val_tokens
from core.tokenizer import load_tokenizer

# Upstream's environment knobs and the config keys they set.
ENV_KNOBS = {
    "ITERATIONS": "train.iterations",
    "MAX_WALLCLOCK_SECONDS": "train.max_wallclock_seconds",
    "VAL_LOSS_EVERY": "train.val_every",
    "TRAIN_LOG_EVERY": "train.log_every",
    "TRAIN_BATCH_TOKENS": "train.batch_tokens",
    "TRAIN_SEQ_LEN": "train.seq_len",
    "VAL_BATCH_SIZE": "train.val_batch_tokens",
    "WARMUP_STEPS": "train.warmup_steps",
    "WARMDOWN_ITERS": "train.warmdown_iters",
    "WARMDOWN_FRAC": "train.warmdown_fraction",  # #1394/#1493's knob
    "GRAD_ACCUM_STEPS": "train.grad_accum_steps",
    "SEED": "train.seed",
    "MATRIX_LR": "optim.matrix_lr",
    "SCALAR_LR": "optim.scalar_lr",
    "TIED_EMBED_LR": "optim.tied_embed_lr",
    "EMBED_LR": "optim.embed_lr",
    "HEAD_LR": "optim.head_lr",
    "MUON_MOMENTUM": "optim.muon_momentum",
    "MUON_BACKEND_STEPS": "optim.muon_backend_steps",
    "GRAD_CLIP_NORM": "optim.grad_clip_norm",
    "GPTQ_RESERVE_SECONDS": "train.gptq_reserve_seconds",  # #1394/#1493's knob (12 there)
    "TTT_LR": "eval.ttt_lr",  # #1493's knobs (its TTT_ENABLED is eval.ttt, fixed by the export: folded)
    "TTT_EPOCHS": "eval.ttt_epochs",
}


def load_eval_data(cfg: RunConfig, data: DataPaths, vocab_size: int | None = None) -> tuple[ByteLuts, np.ndarray]:
    """(byte tables, validation tokens): the tokenizer checked against the vocabulary (`vocab_size`, by default
    the config's model's), the val split cut to whole sequences and to train.val_max_tokens when set."""
    vocab_size = vocab_size or cfg.model.vocab_size
    sp = load_tokenizer(data.tokenizer_path)
    check_vocab(sp, vocab_size, data.tokenizer_path)
    luts = build_byte_luts(sp, vocab_size)
    val_tokens = load_val_tokens(data.val_files, cfg.train.seq_len, vocab_size)
    return luts, first_val_tokens(val_tokens, cfg.train.val_max_tokens, cfg.train.seq_len)


def log_header(log, cfg: RunConfig, backend, data: DataPaths, val_tokens: np.ndarray, title: str) -> None:
    """The lines and `start` event every run opens with (upstream's, plus the spec in words)."""
    unique, effective = count_params(cfg.model)
    t = cfg.train
    log.line(title)
    log.line(f"backend:{backend.name} device:{backend.device} world_size:{backend.world_size}")
    log.line(f"model: {cfg.model.describe()}")
    log.line(f"model_params:{unique} effective_params:{effective}")
    log.line(
        f"train_batch_tokens:{t.batch_tokens} train_seq_len:{t.seq_len} grad_accum_steps:{t.grad_accum_steps} "
        f"iterations:{t.iterations} warmup_steps:{t.warmup_steps} max_wallclock_seconds:{t.max_wallclock_seconds:g}"
        + (f" gptq_reserve_seconds:{t.gptq_reserve_seconds:g}" if t.gptq_reserve_seconds else "")
    )
    log.line(
        f"data:{data.dataset_dir} train_shards:{len(data.train_files)} val_tokens:{len(val_tokens) - 1} "
        f"tokenizer:{data.tokenizer_path}"
    )
    log.event("start", backend=backend.name, device=backend.device, world_size=backend.world_size,
              params=unique, effective_params=effective, config=cfg.source, spec=cfg.model.to_dict())
