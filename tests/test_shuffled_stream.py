"""[data] order = "shuffled": the records' (#1394/#1493) shuffled-sequence loader, core.shards.ShuffledStream.

Per rank: its own shards (files[rank::world_size]); per shard a random phase and a random order of the
seq_len + 1 windows at phase + i * seq_len, each used once before any shard is reshuffled; shards drawn in
proportion to the windows they have left; deterministic from train.seed; `skip` (a checkpoint's `drawn`)
resumes exactly, through the training loop too. The default (sequential) order is untouched.
"""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from core import checkpoint as ck
from core.bpb import ByteLuts
from core.config import config_from_dict
from core.errors import UserError
from core.loop import Trainer
from core.params import init_weights
from core.runlog import RunLog
from core.shards import ShuffledStream, TokenStream, open_train_stream, shard_name, train_micro_batch, write_shard
from tests.helpers import StandInBackend

SEQ = 16
# The shards' tokens are position markers up to 29,999 (below), and the loader checks every id against the
# vocabulary: it must hold them.
MODEL = {"vocab_size": 30000, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1, "layer_plan": "2x2"}
TRAIN = {"iterations": 12, "batch_tokens": 4 * SEQ, "seq_len": SEQ, "warmup_steps": 0, "val_every": 0,
         "log_every": 0, "max_wallclock_seconds": 0, "compute_dtype": "float32"}


def make_cfg(order="shuffled", **train):
    return config_from_dict({"model": MODEL, "train": {**TRAIN, **train}, "data": {"order": order}})


@pytest.fixture()
def shards(tmp_path):
    """Three shards of different sizes whose tokens are their own positions (mod 2**16) plus a shard tag, so a
    window names where it came from."""
    files = []
    for i, n in enumerate((300, 517, 1000)):
        files.append(tmp_path / "data" / shard_name("train", i))
        write_shard(files[-1], (np.arange(n) % 10_000) + 10_000 * i)
    return files


def origin(window: np.ndarray) -> tuple[int, int]:
    """(shard, start) of a window of the fixture's shards."""
    return int(window[0]) // 10_000, int(window[0]) % 10_000


def windows(stream: ShuffledStream, n: int) -> list[tuple[int, int]]:
    x, y = stream.next_batch(n)
    assert x.shape == y.shape == (n, SEQ) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    return [origin(np.concatenate([row, y[i, -1:]])) for i, row in enumerate(x)]


def test_one_pass_takes_every_window_of_a_random_phase_once(shards):
    s = ShuffledStream(shards, SEQ, seed=5)
    per_shard = [len(st) for st in s.starts]
    sizes = (300, 517, 1000)
    got = windows(s, sum(per_shard))
    for shard, n in enumerate(sizes):
        starts = sorted(start for sh, start in got if sh == shard)
        phase = starts[0]
        assert 0 <= phase <= min(SEQ - 1, n - SEQ - 1)
        assert starts == [phase + i * SEQ for i in range((n - 1 - phase) // SEQ)]  # each window once, in range
        assert all(start + SEQ + 1 <= n for start in starts)
    assert [sh for sh, _ in got] != sorted(sh for sh, _ in got)  # shards interleave
    assert sum(s.left) == 0
    again = windows(s, 5)  # every shard is used up: all are reshuffled, and the stream goes on
    assert sum(s.left) == sum(len(st) for st in s.starts) - 5 and len(again) == 5


def test_shards_are_drawn_by_the_windows_they_have_left(shards):
    """Early in a pass the big shard (62 windows) is drawn about 62/112 of the time, the small one 18/112."""
    first = [windows(ShuffledStream(shards, SEQ, seed=seed), 1)[0][0] for seed in range(400)]
    share = np.bincount(first, minlength=3) / len(first)
    # P(small) = 18/112 = 0.16, P(big) = 0.55 (+-0.05 is 2.7 standard deviations at 400 draws)
    assert abs(share[0] - 18 / 112) < 0.05 and abs(share[2] - 62 / 112) < 0.05, share


def test_deterministic_from_the_seed_and_ranks_read_their_own_shards(shards):
    a, b, c = (ShuffledStream(shards, SEQ, seed) for seed in (1, 1, 2))
    assert windows(a, 40) == windows(b, 40) != windows(c, 40)
    for rank in range(2):
        s = ShuffledStream(shards, SEQ, seed=1, rank=rank, world_size=2)
        assert s.files == shards[rank::2]
        assert {sh for sh, _ in windows(s, 30)} == ({0, 2} if rank == 0 else {1})


def test_skip_resumes_exactly(shards):
    whole = windows(ShuffledStream(shards, SEQ, seed=3), 150)  # past one pass (112 windows): a reshuffle
    resumed = ShuffledStream(shards, SEQ, seed=3)
    resumed.skip(97)
    assert resumed.drawn == 97 and windows(resumed, 53) == whole[97:]


def test_bad_setups_are_one_clear_error(shards, tmp_path):
    with pytest.raises(UserError, match="3 train shard.*4 ranks"):
        ShuffledStream(shards, SEQ, seed=0, rank=3, world_size=4)
    short = tmp_path / "short" / shard_name("train", 0)
    write_shard(short, np.arange(SEQ))
    with pytest.raises(UserError, match=f"holds {SEQ + 1} tokens"):
        ShuffledStream([short], SEQ, seed=0)
    with pytest.raises(UserError, match="data.order = 'random'"):
        make_cfg(order="random")
    with pytest.raises(UserError, match="batch_tokens"):
        train_micro_batch(make_cfg(batch_tokens=SEQ + 1), ShuffledStream(shards, SEQ, 0), 0, 1)


def test_the_config_opens_the_stream_it_names(shards):
    seq, shuf = make_cfg(order="sequential"), make_cfg()
    assert type(open_train_stream(seq, shards, 0, 1)) is TokenStream
    stream = open_train_stream(shuf, shards, 0, 1)
    x, _ = train_micro_batch(shuf, stream, 0, 1)
    assert isinstance(stream, ShuffledStream) and x.shape == (4, SEQ) and stream.drawn == 4


# ---- through the training loop: a checkpoint resumes the same order ------------------------------------

class RecordingBackend(StandInBackend):
    """Records the first token of every sequence it trains on; `stop_at` sends SIGTERM after that step."""

    def __init__(self, stop_at=None):
        super().__init__(init_weights(make_cfg().model, 0),
                         {k: np.zeros(s, np.float32) for k, s in ck.optimizer_shapes(make_cfg().model).items()})
        self.seen, self.steps, self.stop_at = [], 0, stop_at

    def train_step(self, micro_batches, lr_scale, momentum):
        self.steps += 1
        self.seen += [int(v) for x, _ in micro_batches for v in x[:, 0]]
        if self.steps == self.stop_at:
            signal.raise_signal(signal.SIGTERM)
        return 3.0

    def eval_loss_sum(self, x, y):
        return 3.0 * x.size


def loop(tmp_path, shards, backend, name="run", order="shuffled"):
    log = RunLog(tmp_path / name, echo=False, progress_bar=False)
    luts = ByteLuts(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool))  # one byte per token
    return Trainer(make_cfg(order), backend, shards, np.zeros(100, np.int32), luts, log, out_dir=tmp_path / name)


def test_a_run_resumed_from_a_checkpoint_reads_what_an_uninterrupted_run_reads(tmp_path, shards):
    ref = RecordingBackend()
    loop(tmp_path, shards, ref, name="ref").run()
    assert len(ref.seen) == 12 * 4

    first = RecordingBackend(stop_at=5)
    with pytest.raises(ck.Interrupted) as e:
        loop(tmp_path, shards, first).run()
    meta = json.loads((e.value.checkpoint / ck.META_FILE).read_text())
    assert meta["data"]["drawn"] == 5 * 4 and meta["data"]["train_shards"] == ck.shard_record(shards)
    resumed = RecordingBackend()
    cfg = make_cfg()
    assert ck.resolve_resume(tmp_path / "run", cfg, shards) == e.value.checkpoint
    loop(tmp_path, shards, resumed).run(ck.load_checkpoint(e.value.checkpoint, cfg.model))
    assert first.seen + resumed.seen == ref.seen

    sequential = RecordingBackend()
    loop(tmp_path, shards, sequential, name="seq", order="sequential").run()
    assert sequential.seen[:4] == [0, 16, 32, 48]  # upstream's stream: shard 0 from its start, in order
    assert sequential.seen != ref.seen
    # A resume with the other order is refused: it would read other batches.
    with pytest.raises(UserError, match="data.order"):
        ck.resolve_resume(tmp_path / "run", make_cfg(order="sequential"), shards)
