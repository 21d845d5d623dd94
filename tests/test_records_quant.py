"""Quantization as #1394/#1493 do it: the std clip (intN_stdK) for round to nearest and GPTQ, GPTQ on the tied
embedding, the brotli codec and the byte shuffle, and train.gptq_reserve_seconds taken off the wallclock cap.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest

from core import clock as clock_module
from core import checkpoint as ck
from core.artifact import (
    CODECS, PREFIX_BYTES, build_artifact, encode_artifact, parse_artifact, shuffle_bytes, unshuffle_bytes,
)
from core.bpb import ByteLuts
from core.config import ArtifactConfig, TrainConfig, config_from_dict
from core.errors import UserError
from core.gptq import gptq_applies, gptq_quantize, gptq_targets, output_error, quantize_weights_gptq
from core.loop import Trainer
from core.params import init_weights
from core.quant import compose_scheme, dequantize_weights, get_scheme, quantize_rows_with_step, quantize_weights
from core.runlog import RunLog
from core.schedule import lr_multiplier
from core.shards import shard_name, write_shard
from tests.helpers import StandInBackend

DAMP, BLOCK = ArtifactConfig.gptq_damp, ArtifactConfig.gptq_block  # the defaults live in the config

RNG = np.random.default_rng(0)
W = (RNG.standard_normal((300, 256)) * np.exp(RNG.normal(0, 0.5, (300, 1)))).astype(np.float32)  # uneven rows


# ---- the std clip -------------------------------------------------------------------------------------

def test_the_std_clip_is_k_sample_stds_over_qmax_per_row():
    t = quantize_weights({"w": W}, "int6_std12.85").tensors["w"]
    want_step = (12.85 * W.astype(np.float64).std(axis=1, ddof=1) / 31).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(t.scale, want_step)
    s = want_step.astype(np.float32)[:, None]
    np.testing.assert_array_equal(t.data, np.clip(np.rint(W / s), -31, 31).astype(np.int8))
    assert t.data.min() >= -31 and t.data.max() <= 31
    # 12.85 std devs of a Gaussian row is rarely reached: almost nothing clips, unlike the search's clip
    assert (np.abs(t.data) == 31).mean() < 1e-3


def test_a_larger_k_gives_a_smaller_artifact_and_a_larger_error():
    """The records' rationale: the compressed size falls monotonically as K rises (entropy ~ b - log2 K)."""
    sizes, errors = [], []
    for k in (4, 8, 12.85, 20):
        qw = quantize_weights({"w": W}, f"int6_std{k:g}")
        sizes.append(encode_artifact({}, qw, "brotli", 6)[1].total_bytes)  # 6: a fraction of 11's time
        errors.append(float(np.abs(dequantize_weights(qw)["w"] - W).mean()))
    assert sizes == sorted(sizes, reverse=True) and errors[1:] == sorted(errors[1:]), (sizes, errors)


def test_scheme_names_are_canonical_and_bad_ones_are_one_clear_error():
    assert compose_scheme("int6_std12.850", ["tok_emb.weight=int8_std20.0"]) == "int6_std12.85;tok_emb.weight=int8_std20"
    cfg = config_from_dict({"artifact": {"scheme": "int6_std12.850", "rules": ["tok_emb.weight=int8_std20.0"]}})
    assert cfg.artifact.quant_scheme == "int6_std12.85;tok_emb.weight=int8_std20"
    for bad, match in (("int3_std4", "unknown quantization scheme"), ("int6_std0.01", "0.1..1000"),
                       ("int6_std1e3", "unknown"), ("int6_std", "unknown")):
        with pytest.raises(UserError, match=match):
            config_from_dict({"artifact": {"scheme": bad}})
    with pytest.raises(UserError, match="canonical"):  # an artifact header must spell it canonically
        get_scheme("int6_std12.850")
    with pytest.raises(UserError, match="no fake quantization for the std-clip"):
        config_from_dict({"artifact": {"scheme": "int6_std12.85", "qat": "late"}})


def test_an_artifact_records_the_std_schemes_and_reads_back():
    scheme = "int6_std12.85;tok_emb.weight=int8_std20"
    w = {"blocks.0.mlp.fc.weight": W, "tok_emb.weight": W[:, :250].copy(), "blocks.0.attn_scale": W[0, :8].copy()}
    blob = build_artifact({"s": 1}, w, scheme, "brotli")
    _, qw, info = parse_artifact(blob)
    assert info.scheme == scheme and info.codec_label == "brotli-11"
    emb = w["tok_emb.weight"].astype(np.float64)  # int8 (qmax 127) with its own K under its rule
    want = (20 * emb.std(axis=1, ddof=1) / 127).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(qw.tensors["tok_emb.weight"].scale, want)
    assert np.abs(qw.tensors["blocks.0.mlp.fc.weight"].data).max() <= 31
    assert qw.tensors["blocks.0.attn_scale"].data.dtype == np.float32  # control tensors pass through


# ---- GPTQ with the std clip, and on the embedding -----------------------------------------------------

def correlated_h(cols, tokens=1024, seed=1):
    rng = np.random.default_rng(seed)
    x = 0.3 * rng.normal(size=(tokens, cols)) + rng.normal(size=(tokens, 8)) @ rng.normal(size=(8, cols))
    return x.T @ x


def test_gptq_with_the_std_clip_keeps_its_one_step_and_beats_rounding():
    h = correlated_h(W.shape[1])
    base = get_scheme("int6_std12.85")
    steps = base.candidate_steps(W)
    assert len(steps) == 1  # no search
    r = gptq_quantize(W, h, 31, DAMP, BLOCK, steps=steps)
    np.testing.assert_array_equal(r.step, steps[0])  # every row keeps the std step
    rtn = quantize_rows_with_step(W, steps[0], 31)
    gptq_err = output_error(W.astype(np.float64), r.codes, r.step, h).sum()
    rtn_err = output_error(W.astype(np.float64), rtn, steps[0], h).sum()
    assert gptq_err < 0.5 * rtn_err  # measured ~10x lower on this problem
    again = gptq_quantize(W.copy(), h.copy(), 31, DAMP, BLOCK, steps=base.candidate_steps(W.copy()))
    assert np.array_equal(again.codes, r.codes) and np.array_equal(again.step, r.step)


def test_gptq_takes_the_tied_embedding_only_when_asked():
    emb = (RNG.standard_normal((512, 192)) * 0.02).astype(np.float32)
    weights = {"tok_emb.weight": emb}
    scheme = "int6_std12.85;tok_emb.weight=int8_std20"
    hessians = {"tok_emb.weight": correlated_h(192)}
    assert not gptq_applies(weights, scheme) and gptq_applies(weights, scheme, embedding=True)
    plain = quantize_weights_gptq(weights, scheme, hessians, DAMP, BLOCK)
    assert plain.gptq["tensors"] == []
    np.testing.assert_array_equal(plain.tensors["tok_emb.weight"].data, quantize_weights(weights, scheme)
                                  .tensors["tok_emb.weight"].data)
    qw = quantize_weights_gptq(weights, scheme, hessians, DAMP, BLOCK, embedding=True)
    assert qw.gptq["tensors"] == ["tok_emb.weight"]
    t = qw.tensors["tok_emb.weight"]
    np.testing.assert_array_equal(t.scale, get_scheme("int8_std20").row_steps(emb))  # int8, its own K = 20
    assert not np.array_equal(t.data, plain.tensors["tok_emb.weight"].data)
    assert gptq_targets(weights, scheme, hessians, quantize_weights(weights, scheme), True) == ["tok_emb.weight"]


def test_gptq_embedding_config_is_checked():
    tied = {"artifact": {"scheme": "int6_std12.85", "gptq": True, "gptq_embedding": True}}
    assert config_from_dict(tied).artifact.gptq_embedding
    with pytest.raises(UserError, match="needs artifact.gptq = true"):
        config_from_dict({"artifact": {"scheme": "int6", "gptq_embedding": True}})
    with pytest.raises(UserError, match="needs model.tie_embeddings = true"):
        config_from_dict({**tied, "model": {"tie_embeddings": False}})


# ---- brotli and the byte shuffle ----------------------------------------------------------------------

def test_byte_shuffle_is_planes_and_inverts():
    data = bytes(range(10))
    assert shuffle_bytes(data, 2) == bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9])
    for n in (0, 1, 7, 100, 101):
        raw = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert all(unshuffle_bytes(shuffle_bytes(raw, s), s) == raw for s in range(2, 9))


@pytest.mark.parametrize("codec", list(CODECS))
def test_shuffled_artifacts_are_deterministic_and_keep_the_payload_hash(codec):
    w = {"w": W, "tok_emb.weight": W[:, :250].copy()}
    scheme = "int6_std12.85;tok_emb.weight=int8_std20"
    level = 5 if codec == "brotli" else CODECS[codec].default_level  # brotli 11 takes seconds here
    plain = build_artifact({"s": 1}, w, scheme, codec, level)
    one, info = encode_artifact({"s": 1}, quantize_weights(w, scheme), codec, level, 2)
    assert one == build_artifact({"s": 1}, {k: v.copy() for k, v in w.items()}, scheme, codec, level, 2)
    assert info.codec_label == f"bs2+{codec}-{level}"
    assert one[:PREFIX_BYTES].rstrip(b"\0") != plain[:PREFIX_BYTES] and one[-40:] != plain[-40:]
    assert one[20 + 16 + 8:PREFIX_BYTES] == plain[20 + 16 + 8:PREFIX_BYTES]  # the same payload SHA-256
    _, qw, read = parse_artifact(one)
    assert read.byte_shuffle == 2 and read.codec_label == info.codec_label
    for name in w:
        np.testing.assert_array_equal(dequantize_weights(qw)[name], dequantize_weights(parse_artifact(plain)[1])[name])
    with pytest.raises(UserError, match="byte shuffle stride 9"):
        build_artifact({"s": 1}, w, scheme, codec, None, 9)


def test_brotli_and_the_shuffle_are_config_keys():
    cfg = config_from_dict({"artifact": {"codec": "brotli", "byte_shuffle": 2}})
    assert cfg.artifact.level == 11 and cfg.artifact.byte_shuffle == 2
    for table, match in (({"byte_shuffle": 1}, "artifact.byte_shuffle = 1"), ({"byte_shuffle": True}, "byte_shuffle"),
                         ({"codec": "brotli", "level": 12}, "artifact.level = 12")):
        with pytest.raises(UserError, match=match):
            config_from_dict({"artifact": table})


def test_a_brotli_bomb_stops_at_the_declared_size():
    import struct

    import brotli

    from core.artifact import MAGIC

    bomb = brotli.compress(bytes(64 << 20), quality=1)  # 64 MiB of zeros in a few kilobytes
    for label in (b"brotli-11", b"bs2+brotli-11"):
        blob = struct.pack("<18sH16sQ32s", MAGIC, 1, label, 1000, bytes(32)) + bomb
        with pytest.raises(UserError, match="more than the declared 1000 bytes"):
            parse_artifact(blob, "bomb.art")


# ---- train.gptq_reserve_seconds -----------------------------------------------------------------------

def test_the_reserve_comes_off_the_cap_for_the_lr_schedule():
    reserved = TrainConfig(max_wallclock_seconds=600, gptq_reserve_seconds=12, warmdown_iters=100)
    shorter = TrainConfig(max_wallclock_seconds=588, warmdown_iters=100)
    assert reserved.train_wallclock_seconds == 588 and TrainConfig(max_wallclock_seconds=0,
                                                                   gptq_reserve_seconds=12).train_wallclock_seconds == 0
    for step, ms in ((10, 1000.0), (4000, 560_000.0), (4100, 587_000.0)):
        assert lr_multiplier(step, ms, reserved) == lr_multiplier(step, ms, shorter)
    # 580 s in, at 141 ms/step: within the last 100 steps of 588 s, not yet of 600 s
    assert lr_multiplier(4100, 580_000.0, reserved) < 1.0 == lr_multiplier(4100, 580_000.0, TrainConfig(
        max_wallclock_seconds=600, warmdown_iters=100))
    for bad in ({"gptq_reserve_seconds": -1}, {"max_wallclock_seconds": 10, "gptq_reserve_seconds": 10}):
        with pytest.raises(UserError, match="train.gptq_reserve_seconds"):
            config_from_dict({"train": bad})


class ClockedBackend(StandInBackend):
    """Each training step takes one second of a fake clock."""

    def __init__(self, spec, now):
        super().__init__(init_weights(spec, 0), {k: np.zeros(s, np.float32) for k, s in ck.optimizer_shapes(spec).items()})
        self.now = now

    def train_step(self, micro_batches, lr_scale, momentum):
        self.now[0] += 1.0
        return 3.0

    def eval_loss_sum(self, x, y):
        return 3.0 * x.size


@pytest.mark.parametrize("reserve, steps", [(0, 10), (4, 6)])
def test_training_stops_the_reserve_early(reserve, steps, tmp_path, monkeypatch):
    now = [0.0]
    monkeypatch.setattr(clock_module, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    shard = tmp_path / "data" / shard_name("train", 0)
    write_shard(shard, np.arange(5000) % 64)
    cfg = config_from_dict({
        "model": {"vocab_size": 64, "model_dim": 16, "num_heads": 2, "num_kv_heads": 1, "layer_plan": "2x2"},
        "train": {"iterations": 100, "batch_tokens": 64, "seq_len": 16, "warmup_steps": 0, "val_every": 0,
                  "log_every": 1, "max_wallclock_seconds": 10, "gptq_reserve_seconds": reserve,
                  "compute_dtype": "float32"}})
    log = RunLog(tmp_path / "run", echo=False, progress_bar=False)
    luts = ByteLuts(np.ones(64, np.int16), np.zeros(64, bool), np.zeros(64, bool))
    result = Trainer(cfg, ClockedBackend(cfg.model, now), [shard], np.zeros(100, np.int32), luts, log,
                     out_dir=tmp_path / "run").run()
    log.close()
    assert result["steps"] == steps  # the cap is reached after the step that ends at 10 - reserve seconds
    text = (tmp_path / "run" / "train.log").read_text()
    assert f"stopping_early: wallclock_cap train_time:{steps * 1000}ms step:{steps}/100" in text
    assert all(json.loads(line)["event"] != "nonfinite" for line in (tmp_path / "run" / "metrics.jsonl").open())


# ---- loopgolf quantize --------------------------------------------------------------------------------

def test_quantize_takes_the_records_options(tmp_path, capsys):
    from core.spec import ModelSpec
    from core.weights import save_weights
    from tools.cli import main

    spec = ModelSpec.from_table({"vocab_size": 512, "model_dim": 192, "num_heads": 4, "num_kv_heads": 2,
                                 "layer_plan": "1x2"})
    weights = init_weights(spec, 7)
    path, out = tmp_path / "w.safetensors", tmp_path / "m.art"
    save_weights(path, spec, weights)
    args = ["quantize", str(path), "--out", str(out), "--scheme", "int6_std12.85", "--rule", "tok_emb.weight=int8_std20",
            "--codec", "brotli", "--level", "5"]
    assert main(args + ["--byte-shuffle", "2"]) == 0
    assert out.read_bytes() == build_artifact(spec.to_dict(), weights, "int6_std12.85;tok_emb.weight=int8_std20",
                                              "brotli", 5, 2)
    assert "bs2+brotli-5" in capsys.readouterr().out
    for extra, message in ((["--byte-shuffle", "1"], "--byte-shuffle 1"),
                           (["--gptq-embedding"], "--gptq-embedding needs --gptq")):
        out.unlink(missing_ok=True)
        assert main(args + extra) == 2
        assert message in capsys.readouterr().err and not out.exists()
