"""`loopgolf size`: parameter counts for a config, by group, unique and effective."""

from __future__ import annotations

from collections import defaultdict

from core.config import load_config
from core.params import count_params, param_table


def run_size(args) -> int:
    cfg = load_config(args.config, list(args.set or []), small=args.small, small_vocab=True)
    spec = cfg.model
    by_group: dict[str, int] = defaultdict(int)
    for info in param_table(spec):
        by_group[info.group] += info.numel
    unique, effective = count_params(spec)
    print(f"model: {spec.describe()}")
    for group, n in sorted(by_group.items()):
        print(f"  {group:<8} {n:>12,}")
    print(f"params: {unique:,} unique, {effective:,} effective (block tensors counted once per use)")
    print(f"model_params:{unique}")
    return 0
