"""A submission's main(): upstream train_gpt.py's behaviour over loopgolf's loop and torch backend.

`loopgolf export` bundles this module, with everything it imports from core and backend_torch, into one
train_gpt.py and writes the resolved config into CONFIG. Run it as upstream's script, inside its folder:
`torchrun --standalone --nproc_per_node=8 train_gpt.py` (NCCL on CUDA), or `python train_gpt.py` for one
process (gloo on a CPU with torchrun). ENV_KNOBS are upstream's environment variables; each overrides one
[train] or [optim] key. The model spec and the artifact settings are fixed by the export.
"""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import torch

from backend_torch.trainer import TorchBackend
from core.atomic import atomic_write_text
from core.config import config_from_tables
from core.errors import UserError
from core.loop import Trainer
from core.manifest import resolve_data
from core.params import init_weights
from core.run import ENV_KNOBS, load_eval_data, log_header
from core.runlog import RunLog

CONFIG: dict = {}  # the resolved run config, one dict per table; written in by `loopgolf export`
PROFILE = ""  # the profile the config was resolved with; "h100" takes grad_accum_steps = 8 // world size

def resolve_config(raw: dict, env: dict):
    """The run config: the exported tables (resolved and checked at export), then the environment's knobs."""
    overrides = {key: env[name] for name, key in ENV_KNOBS.items() if name in env}
    world = int(env.get("WORLD_SIZE", 1))
    if PROFILE == "h100" and "GRAD_ACCUM_STEPS" not in env and 8 % world == 0:
        overrides["train.grad_accum_steps"] = str(8 // world)  # upstream: 65,536 tokens per micro-batch
    return config_from_tables(raw, overrides, source="train_gpt.py")


def run(script: Path, env: dict) -> int:
    cfg = resolve_config(CONFIG, env)
    data_path = env.get("DATA_PATH") or cfg.data.path
    dataset = None if env.get("DATA_PATH") else cfg.data.dataset or None
    data = resolve_data(data_path, dataset, env.get("TOKENIZER_PATH") or cfg.data.tokenizer or None)
    luts, val_tokens = load_eval_data(cfg, data)
    torch.manual_seed(cfg.train.seed)  # as `loopgolf train` does: noisy QAT's draws follow the seed
    backend = TorchBackend(cfg.model, init_weights(cfg.model, cfg.train.seed), cfg.train, cfg.optim)
    here = script.resolve().parent
    run_id = env.get("RUN_ID") or uuid.uuid4().hex[:8]
    out_dir = Path(env["OUT_DIR"]) if env.get("OUT_DIR") else here / "logs" / run_id
    if backend.rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.toml", cfg.to_toml())
    log = RunLog(out_dir, backend.rank, progress_bar=False)
    try:
        log_header(log, cfg, backend, data, val_tokens, f"train_gpt.py run_id:{run_id} -> {out_dir}")
        trainer = Trainer(cfg, backend, data.train_files, val_tokens, luts, log, out_dir=out_dir, checkpoints=False)
        final = trainer.export(out_dir, trainer.run(), os.path.getsize(script))
        log.line(f"done: val_bpb {final['val_bpb']:.4f}, round trip {final['roundtrip_val_bpb']:.4f}, "
                 f"{final['total_bytes']:,} of 16,000,000 bytes")
    finally:
        log.close()
        backend.close()
    return 0


def main(script: str) -> int:
    try:
        return run(Path(script), dict(os.environ))
    except UserError as e:
        print(f"train_gpt.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main(__file__))
