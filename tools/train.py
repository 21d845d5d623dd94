"""`loopgolf train`: resolve the config and data, build a backend, run core's loop, export."""

from __future__ import annotations

import time
from pathlib import Path

from core.atomic import atomic_write_text
from core.bpb import build_byte_luts, check_vocab
from core.config import RunConfig, load_config
from core.errors import UserError
from core.loop import Trainer
from core.manifest import resolve_data
from core.params import count_params, init_weights
from core.runlog import RunLog
from core.shards import load_val_tokens
from core.tokenizer import load_tokenizer
from core.weights import load_weights
from tools.backends import build_backend, resolve_backend


def default_out_dir(cfg_path: str) -> Path:
    return Path("runs") / f"{Path(cfg_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_run_config(args) -> RunConfig:
    overrides = list(args.set or [])
    if args.data:
        overrides.append(f'data.path="{args.data}"')
    return load_config(args.config, overrides, small=args.small)


def initial_weights(cfg: RunConfig, init_path: str | None):
    if not init_path:
        return init_weights(cfg.model, cfg.train.seed)
    spec, weights = load_weights(init_path)
    if spec != cfg.model:
        diff = [k for k, v in spec.to_dict().items() if cfg.model.to_dict()[k] != v]
        raise UserError(f"--init {init_path}: its spec differs from the config's [model] in {', '.join(diff)}")
    return weights


def run_train(args) -> int:
    cfg = load_run_config(args)
    backend_name = resolve_backend(args.backend)
    data = resolve_data(cfg.data.path, cfg.data.dataset or None, cfg.data.tokenizer or None)
    sp = load_tokenizer(data.tokenizer_path)
    check_vocab(sp, cfg.model.vocab_size, data.tokenizer_path)
    luts = build_byte_luts(sp, cfg.model.vocab_size)
    val_tokens = load_val_tokens(data.val_files, cfg.train.seq_len)
    if cfg.train.val_max_tokens:
        keep = (min(cfg.train.val_max_tokens, len(val_tokens) - 1) // cfg.train.seq_len) * cfg.train.seq_len
        val_tokens = val_tokens[: keep + 1]

    backend = build_backend(backend_name, cfg.model, initial_weights(cfg, args.init), cfg.train, cfg.optim)
    out_dir = Path(args.out) if args.out else default_out_dir(args.config)
    if backend.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", cfg.to_toml())
    log = RunLog(out_dir, backend.rank, progress_bar=args.progress)
    try:
        unique, effective = count_params(cfg.model)
        t = cfg.train
        log.line(f"loopgolf train: {args.config} -> {out_dir}")
        log.line(f"backend:{backend.name} device:{backend.device} world_size:{backend.world_size}")
        log.line(f"model: {cfg.model.describe()}")
        log.line(f"model_params:{unique} effective_params:{effective}")
        log.line(
            f"train_batch_tokens:{t.batch_tokens} train_seq_len:{t.seq_len} grad_accum_steps:{t.grad_accum_steps} "
            f"iterations:{t.iterations} warmup_steps:{t.warmup_steps} max_wallclock_seconds:{t.max_wallclock_seconds:g}"
        )
        log.line(
            f"data:{data.dataset_dir} train_shards:{len(data.train_files)} val_tokens:{len(val_tokens) - 1} "
            f"tokenizer:{data.tokenizer_path}"
        )
        log.event("start", backend=backend.name, device=backend.device, world_size=backend.world_size,
                  params=unique, effective_params=effective, config=cfg.source, spec=cfg.model.to_dict())
        trainer = Trainer(cfg, backend, data.train_files, val_tokens, luts, log)
        result = trainer.run()
        final = trainer.export(out_dir, result)
        log.line(
            f"done: val_bpb {final['val_bpb']:.4f}, round trip {final['roundtrip_val_bpb']:.4f}, "
            f"{final['total_bytes']:,} of 16,000,000 bytes; run in {out_dir}"
        )
    finally:
        log.close()
    return 0
