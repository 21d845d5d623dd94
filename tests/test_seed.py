"""What train.seed changes: the initial weights and noisy QAT's noise; not the data order."""

import numpy as np
import pytest

from core import quant
from core.config import config_from_dict
from core.params import init_weights, param_table
from core.shards import TokenStream, shard_name, write_shard

MODEL = {"vocab_size": 64, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1, "layer_plan": "2x2"}
TRAIN = {"batch_tokens": 64, "seq_len": 16, "warmup_steps": 0, "compute_dtype": "float32"}


def _cfg(seed: int):
    return config_from_dict({"model": MODEL, "train": {**TRAIN, "seed": seed}})


def test_the_seed_draws_the_initial_weights():
    spec = _cfg(1).model
    a, b, c = init_weights(spec, 1), init_weights(spec, 1), init_weights(spec, 2)
    drawn = {i.name for i in param_table(spec) if i.init in ("normal", "uniform_fan_in")}
    assert len(drawn) >= 9 and all(np.array_equal(a[k], b[k]) for k in a)
    # Drawn tensors change with the seed; constants (zeros, ones, resid_mix) do not.
    assert {k for k in a if not np.array_equal(a[k], c[k])} == drawn


def test_the_data_order_does_not_depend_on_the_seed(tmp_path):
    files = [tmp_path / shard_name("train", i) for i in range(2)]
    for i, f in enumerate(files):
        write_shard(f, np.random.default_rng(i).integers(0, 64, 300))
    # TokenStream takes no seed: every run reads the shards in order from their first token.
    first = [TokenStream(files).take(100) for _ in range(2)]
    np.testing.assert_array_equal(first[0], first[1])
    np.testing.assert_array_equal(first[0], np.fromfile(files[0], dtype="<u2", offset=1024)[:100])


@pytest.mark.slow  # builds and steps two trainers per backend (about 5 s each)
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_noisy_qat_follows_the_seed(backend, monkeypatch):
    """Before the fix the noise came from the framework's unseeded (MLX: time-seeded) generator."""
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(quant, "KEEP_FLOAT_MAX_NUMEL", 256)  # so this tiny model's matrices are quantized
    from tools.backends import build_backend

    rng = np.random.default_rng(0)
    x = rng.integers(0, 64, (4, 16)).astype(np.int64)
    y = rng.integers(0, 64, (4, 16)).astype(np.int64)

    def after_steps(seed: int) -> dict:
        cfg = _cfg(seed)
        b = build_backend(backend, cfg.model, init_weights(cfg.model, 7), cfg.train, cfg.optim)  # same init
        b.set_qat("int4", noise=True)
        for _ in range(2):
            b.train_step([(x, y)], 1.0, 0.95)
        return b.get_weights()

    a, again, other = after_steps(1), after_steps(1), after_steps(2)
    assert all(np.array_equal(a[k], again[k]) for k in a)
    assert any(not np.array_equal(a[k], other[k]) for k in a)
