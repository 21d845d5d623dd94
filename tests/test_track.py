"""Optional tracking (`--log-to`, tools/track.py): what reaches TensorBoard and wandb, and that it is never
required (a missing library is one line before training; a tracker that breaks mid-run is dropped)."""

import importlib.util
import json
import struct
import time
from pathlib import Path

import pytest

from core.runlog import RunLog
from tools.cli import main

RECORDS = [{"event": "start", "params": 10}, {"event": "train", "step": 1, "train_loss": 6.5, "tok_s": 1000.0},
           {"event": "val", "step": 2, "val_loss": 6.0, "val_bpb": 3.25},
           {"event": "final", "steps": 2, "val_bpb": 3.25, "roundtrip_val_bpb": 3.5, "total_bytes": 123,
            "backend": "mlx"}]


def scalars_in(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every TensorBoard event file under logdir: TFRecord framing (length, crc, data, crc) of
    Event protos, parsed with tensorboardX's own message classes."""
    from tensorboardX.proto.event_pb2 import Event

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                if v.HasField("simple_value"):
                    out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def _log_all(tracker, tmp_path):
    log = RunLog(tmp_path / "run", echo=False)
    log.add_sink(tracker)
    for r in RECORDS:
        log.event(r["event"], **{k: v for k, v in r.items() if k != "event"})
    log.close()
    return log


@pytest.mark.slow  # tensorboardX imports torch when it is installed: seconds
@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")
def test_tensorboard_gets_train_val_and_final_numbers(tmp_path):
    from tools.track import TensorBoardTracker

    _log_all(TensorBoardTracker(tmp_path / "run", "run", {"train": {"seed": 1}}), tmp_path)
    scalars = scalars_in(tmp_path / "run" / "tensorboard")
    assert scalars["train/loss"] == [(1, 6.5)] and scalars["train/tok_s"] == [(1, 1000.0)]
    assert scalars["val/loss"] == [(2, 6.0)] and scalars["val/bpb"] == [(2, 3.25)]
    assert scalars["final/roundtrip_val_bpb"] == [(2, 3.5)] and scalars["final/total_bytes"] == [(2, 123.0)]
    assert "final/backend" not in scalars and "start/params" not in scalars


@pytest.mark.slow  # wandb's import and its offline service: about 2 s
@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_holds_the_numbers(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_RUN_GROUP", "sweep/variant")
    from tools.track import WandbTracker

    (tmp_path / "run").mkdir()
    tracker = WandbTracker(tmp_path / "run", "run-s1", {"train": {"seed": 1}})
    assert tracker.run.group == "sweep/variant" and tracker.run.name == "run-s1"
    _log_all(tracker, tmp_path)
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    # wandb's service process finishes writing its log after finish() returns (measured: 7 bytes at the
    # return, 1.7 kB two seconds later), so wait for the final summary to land.
    deadline = time.time() + 30
    while b"final/roundtrip_val_bpb" not in files[0].read_bytes() and time.time() < deadline:
        time.sleep(0.1)
    blob = files[0].read_bytes()  # wandb's binary log: the keys and JSON values appear as written
    for key in (b"train/loss", b"val/bpb", b"final/roundtrip_val_bpb"):
        assert key in blob
    assert b"3.25" in blob and b"6.5" in blob


def test_a_missing_tracker_library_is_one_line_before_training(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert main(["train", "--config", "configs/demo.toml", "--out", str(tmp_path / "r"), "--log-to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err == "loopgolf: error: --log-to wandb: wandb is not installed; pip install 'loopgolf[track]'\n"
    assert not (tmp_path / "r").exists()


def test_a_tracker_that_breaks_is_dropped_and_the_run_goes_on(tmp_path, capsys):
    class Broken:
        name = "broken"
        calls = 0

        def event(self, record):
            Broken.calls += 1
            raise ConnectionError("server went away")

        def close(self):
            pass

    _log_all(Broken(), tmp_path)
    assert Broken.calls == 1
    assert [json.loads(x)["event"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == \
        ["start", "train", "val", "final"]
    assert "tracking: broken failed (ConnectionError: server went away); continuing without it" in \
        (tmp_path / "run" / "train.log").read_text()


def test_only_rank_0_tracks(tmp_path):
    log = RunLog(tmp_path, rank=1)
    log.add_sink(object())
    assert log.sinks == []


@pytest.mark.slow  # one tiny training run
@pytest.mark.skipif(importlib.util.find_spec("tensorboardX") is None, reason="tensorboardX not installed")
def test_train_log_to_tensorboard_end_to_end(demo_data, tmp_path, monkeypatch):
    pytest.importorskip("torch")  # tensorboardX imports torch anyway, so train with it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = tmp_path / "run"
    assert main(["train", "--config", "configs/demo.toml", "--data", str(demo_data), "--out", str(run), "--small",
                 "--backend", "torch", "--no-progress",
                 "--log-to", "tensorboard", "--set", "train.iterations=3", "--set", "train.val_every=2",
                 "--set", "train.val_max_tokens=512", "--set", "train.warmup_steps=0", "--set", "train.log_every=1"]) == 0
    final = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"final"' in x][-1]
    scalars = scalars_in(run / "tensorboard")
    assert [s for s, _ in scalars["val/bpb"]] == [0, 2, 3] and [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert scalars["final/roundtrip_val_bpb"] == [(3, pytest.approx(final["roundtrip_val_bpb"], rel=1e-6))]
    assert f"tracking: tensorboard in {run / 'tensorboard'}" in (run / "train.log").read_text()
