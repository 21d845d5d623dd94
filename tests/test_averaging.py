"""[average]: EMA and SWA arithmetic against hand computations, the SWA snapshot rule, and a resumed run that
continues the average exactly (== : checkpoints store the state bit for bit, see core/averaging.py)."""

import json
import shutil

import numpy as np
import pytest

from core.averaging import WeightAverager, ema_update
from core.config import AverageConfig
from core.params import init_weights
from core.spec import ModelSpec
from core.weights import load_weights

SPEC = ModelSpec.from_table({"vocab_size": 128, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x2"})


def make_trainer(backend: str):
    from core.config import OptimConfig, TrainConfig

    weights = init_weights(SPEC, 0)
    if backend == "mlx":
        pytest.importorskip("mlx.core")
        from backend_mlx.trainer import MLXBackend

        return MLXBackend(SPEC, weights, TrainConfig(compute_dtype="float32"), OptimConfig())
    pytest.importorskip("torch")
    from backend_torch.trainer import TorchBackend

    return TorchBackend(SPEC, weights, TrainConfig(compute_dtype="float32"), OptimConfig(), device="cpu")


def filled(value: float) -> dict[str, np.ndarray]:
    return {k: np.full(v.shape, value, np.float32) for k, v in init_weights(SPEC, 0).items()}


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_ema_on_the_device_against_a_hand_computation(backend):
    trainer = make_trainer(backend)
    trainer.set_weights(filled(1.0))
    trainer.set_average(None)  # e0 = the current weights = 1
    for w in (3.0, 5.0):
        trainer.set_weights(filled(w))
        trainer.average_update(0.75)
    # e1 = 0.75*1 + 0.25*3 = 1.5; e2 = 0.75*1.5 + 0.25*5 = 2.375 (all exact in float32)
    for name, v in trainer.get_average().items():
        np.testing.assert_array_equal(v, np.full(v.shape, 2.375, np.float32), err_msg=name)
    assert ema_update({"a": np.float64(1.5)}, {"a": np.float64(5.0)}, 0.75)["a"] == 2.375
    trainer.set_average(filled(4.0))  # a checkpoint's state replaces it
    trainer.average_update(0.5)
    assert all(np.all(v == 4.5) for v in trainer.get_average().values())  # 0.5*4 + 0.5*5


class NumpyBackend:
    """Just enough of a backend for WeightAverager's SWA: weights that read as the step number."""

    def __init__(self):
        self.step = 0

    def get_weights(self):
        return {"w": np.full((2, 3), float(self.step), np.float32), "b": np.array([self.step, -self.step], np.float32)}


def run_swa(steps: int, full_depth_from: int, every: int = 2, threshold: float = 0.5):
    backend = NumpyBackend()
    avg = WeightAverager(AverageConfig(swa_every=every, swa_lr_threshold=threshold), backend)
    taken = []
    for step in range(1, steps + 1):
        backend.step = step
        if avg.after_step(step, 1.0 - step / 10, step >= full_depth_from):  # lr scale 1 - step/10
            taken.append(step)
    return taken, avg.finish(steps), avg.count


def test_swa_snapshot_rule_and_mean_against_a_hand_computation():
    # Every 2 steps with lr scale < 0.5 (steps 6 and 8; step 4 has 0.6), and only at full depth (from step 7):
    # step 8 alone, plus the final weights of step 9: the mean of 8 and 9 = 8.5.
    taken, mean, count = run_swa(9, full_depth_from=7)
    assert taken == [8] and count == 2
    np.testing.assert_array_equal(mean["w"], np.full((2, 3), 8.5, np.float32))
    np.testing.assert_array_equal(mean["b"], np.float32([8.5, -8.5]))
    # At full depth throughout and ending on a snapshot step: 6 and 8, the final weights (8) not counted twice.
    taken, mean, count = run_swa(8, full_depth_from=0)
    assert taken == [6, 8] and count == 2 and np.all(mean["w"] == 7.0)
    # No snapshot at all (the LR never fell below the threshold): the final weights alone.
    taken, mean, count = run_swa(3, full_depth_from=0)
    assert taken == [] and count == 1 and np.all(mean["w"] == 3.0)


def test_averager_state_round_trips_and_refuses_another_method():
    backend = NumpyBackend()
    avg = WeightAverager(AverageConfig(swa_every=1, swa_lr_threshold=1.0), backend)
    for step in (1, 2):
        backend.step = step
        avg.after_step(step, 0.5, True)
    tensors, record = avg.state()
    assert record == {"kind": "swa", "count": 2, "last_snapshot": 2} and tensors["average.w"].dtype == np.float64
    again = WeightAverager(AverageConfig(swa_every=1, swa_lr_threshold=1.0), backend, (tensors, record))
    backend.step = 3
    np.testing.assert_array_equal(again.finish(3)["w"], np.full((2, 3), 2.0, np.float32))  # (1 + 2 + 3) / 3
    from core.errors import UserError

    with pytest.raises(UserError, match="averaging state is 'swa'"):
        WeightAverager(AverageConfig(ema_decay=0.9), backend, (tensors, record))


# ---- a run, and the same run interrupted and resumed ----------------------------------------------------

RUN = [
    "--set", "model.model_dim=32", "--set", "model.num_heads=4", "--set", "model.num_kv_heads=2",
    "--set", "model.layer_plan='2x2'", "--set", "train.seq_len=32", "--set", "train.batch_tokens=1024",
    "--set", "train.val_every=0", "--set", "train.val_max_tokens=4096", "--set", "train.warmup_steps=1",
    "--set", "train.warmdown_iters=8", "--set", "train.log_every=0", "--set", "train.compute_dtype='float32'",
    "--set", "train.iterations=12", "--set", "train.max_wallclock_seconds=0", "--set", "train.checkpoint_every=4",
    "--set", "train.keep_checkpoints=0",
]


def train(demo_data, out, *extra):
    from tools.cli import main

    assert main(["train", "--config", "configs/demo.toml", "--backend", "torch", "--data", str(demo_data),
                 "--out", str(out), *RUN, *extra]) == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if e["event"] == "final"][-1]


@pytest.mark.slow
@pytest.mark.parametrize("average", [["--set", "average.ema_decay=0.8"],
                                     ["--set", "average.swa_every=2", "--set", "average.swa_lr_threshold=0.7"]])
def test_a_resumed_run_ends_with_the_same_averaged_weights(demo_data, tmp_path, average):
    pytest.importorskip("torch")
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    final = train(demo_data, whole, *average)
    kind = "ema" if "average.ema_decay=0.8" in average else "swa"
    assert final["averaging"] == kind and final["val_bpb"] != final["val_bpb_before_averaging"]
    # EMA: 12 steps; SWA: steps 8, 10, 12 have lr scale < 0.7 (5/8, 3/8, 1/8; step 6's is 7/8), 12 is the final.
    assert final["average_count"] == (12 if kind == "ema" else 3)
    meta = json.loads((whole / "checkpoints" / "step_000008" / "checkpoint.json").read_text())
    assert meta["average"] == ({"kind": "ema", "count": 8} if kind == "ema" else
                               {"kind": "swa", "count": 1, "last_snapshot": 8})
    # "Interrupted" after step 8: a run directory holding only that checkpoint, continued with --resume.
    shutil.copytree(whole / "checkpoints" / "step_000008", resumed / "checkpoints" / "step_000008")
    final_resumed = train(demo_data, resumed, *average, "--resume")
    _, w_whole = load_weights(whole / "model.safetensors")
    _, w_resumed = load_weights(resumed / "model.safetensors")
    for name in w_whole:
        np.testing.assert_array_equal(w_resumed[name], w_whole[name], err_msg=name)
    assert final_resumed["val_bpb"] == final["val_bpb"] and final_resumed["average_count"] == final["average_count"]
