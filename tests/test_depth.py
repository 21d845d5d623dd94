"""Progressive depth, stages named by plan (issue 17 item 1) and eval-time extra loops (issue 5, items 6-7; core.depth).

Schedules parse or fail with one clear error; the loop switches depth at the right step by step count and by
(fake) wallclock, logging `depth` events; a backend at depth n computes exactly the model of the truncated
spec on the leading rows of every table; resume across a switch is bit-exact; real MLX and torch runs show
the switches and end at full depth; the extra-loop hidden states agree between MLX and torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)
import core.clock
from core import checkpoint as ck
from core import loop as core_loop
from core.config import config_from_dict
from core.depth import (DepthSchedule, depth_schedule, depth_variant, parse_stages, plan_rows, truncate_weights,
                        truncated_spec, variant_weights)
from core.errors import UserError
from core.params import init_weights
from core.spec import ModelSpec
from tests.helpers import LOGIT_ATOL, StandInBackend, perturbed

ROOT = Path(__file__).resolve().parent.parent
TINY = {"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2}
# Every option that reads a per-layer or per-loop table, so a wrong row under truncation shows.
OPTIONS = {"iter_embeds": True, "loop_embeds": True, "per_layer_scales": True, "iter_scales": True,
           "layer_gains": True, "loop_gates": True, "cross_repeat_skips": True}


def cfg_for(model: dict | None = None, **train):
    train = {"iterations": 8, "seq_len": 16, "batch_tokens": 64, "val_batch_tokens": 256, "val_every": 0,
             "warmup_steps": 1, "warmdown_iters": 2, "max_wallclock_seconds": 0, "log_every": 1,
             "compute_dtype": "float32", **train}
    return config_from_dict({"model": {**TINY, "layer_plan": "2x3", **(model or {})}, "train": train})


# ---- the schedule ----------------------------------------------------------------------------------------

def test_parse_stages_reads_895s_schedule():
    assert parse_stages("0.3:2,0.5:3,0.75:4,1.0:5") == ((0.3, 2), (0.5, 3), (0.75, 4), (1.0, 5))
    assert parse_stages(" 1:3 ") == ((1.0, 3),)


@pytest.mark.parametrize("text, message", [
    ("0.3-2,1.0:3", "has no ':'"), ("0.3:x,1.0:3", "cannot read"), ("0:1,1.0:3", "not in (0, 1]"),
    ("0.5:0,1.0:3", "must be 1 or more"), ("0.5:2,0.4:3,1.0:4", "fractions must rise"),
    ("0.5:3,1.0:2", "loops must rise"), ("0.5:2,0.9:3", "last fraction must be 1.0"), ("", "cannot read"),
])
def test_parse_stages_errors_name_the_key(text, message):
    with pytest.raises(UserError, match="train.depth_schedule") as e:
        parse_stages(text)
    assert message in str(e.value)


def test_schedule_checked_against_the_config():
    with pytest.raises(UserError, match="fractions must rise"):  # format: when the config is read
        cfg_for(depth_schedule="0.5:1,0.5:2,1.0:3")
    with pytest.raises(UserError, match="expected 'wallclock' or 'step'"):
        cfg_for(depth_schedule_by="time")
    with pytest.raises(UserError, match="cyclic layer plan"):
        depth_schedule(cfg_for({"layer_plan": "0 1 2 1 2 3"}, depth_schedule="0.5:1,1.0:2"))
    with pytest.raises(UserError, match="needs a plan that loops"):  # a flat plan: one loop, nothing to drop
        depth_schedule(cfg_for({"layer_plan": "flat", "num_layers": 3}, depth_schedule="1.0:1",
                               depth_schedule_by="step"))
    with pytest.raises(UserError, match="last entry must train all 3 loops"):
        depth_schedule(cfg_for(depth_schedule="0.5:1,1.0:2", depth_schedule_by="step"))
    with pytest.raises(UserError, match="needs train.max_wallclock_seconds > 0"):
        depth_schedule(cfg_for(depth_schedule="0.5:1,1.0:3"))
    s = depth_schedule(cfg_for(depth_schedule="0.5:1,1.0:3", depth_schedule_by="step"))
    assert s == DepthSchedule(((0.5, 1), (1.0, 3)), 2, "step") and s.layer_counts == (2, 6)
    assert depth_schedule(cfg_for()) is None


def test_switch_points():
    s = DepthSchedule(((0.3, 2), (0.5, 3), (0.75, 4), (1.0, 5)), 3, "step")
    steps = [s.layers_at(s.fraction(step, 100, 0, 0)) for step in range(100)]
    assert [steps.count(n) for n in (6, 9, 12, 15)] == [30, 20, 25, 25]
    assert s.layers_at(1.7) == 15  # past the end (a wallclock overshoot): full depth
    w = DepthSchedule(s.stages, 3, "wallclock")
    assert [w.layers_at(w.fraction(0, 100, ms, 10_000)) for ms in (0, 2999, 3000, 7499, 7500)] == [6, 6, 9, 12, 15]


def test_truncated_spec_and_weights_take_the_leading_rows():
    spec = ModelSpec.from_table({**TINY, "layer_plan": "2x3", **OPTIONS})
    one = truncated_spec(spec, 2)
    assert one.layer_plan == (0, 1) and not one.cross_repeat_skips  # one loop: no previous repeat to skip from
    w = perturbed(spec, scale=0.1, init_seed=1)
    t = truncate_weights(spec, w, 4)
    assert t["iter_embeds"].shape == (4, 32) and t["loop_gates"].shape == (2,)
    assert t["cross_repeat_scales"].shape == (2, 1, 32) and t["skip_weights"].shape == (2, 32)
    np.testing.assert_array_equal(t["layer_resid_mixes"], w["layer_resid_mixes"][:4])


# ---- stages named by plan (the records' loop switch-on, #1394/#1493) --------------------------------------

RECORD_A = "0 1 2 3 4 5 4 5 4 5 6 7 8 9 10"  # #1394: layers 4-5 three times
RECORD_B = "0 1 2 3 4 5 3 4 5 3 4 5 6 7 8 9 10"  # #1493: layers 3-5 three times
FLAT_11 = tuple(range(11))
# Every per-effective-layer table (and VE, VRL and the skip gates), none per loop: a flat stage maps them all.
PLAN_OPTIONS = {"iter_embeds": True, "per_layer_scales": True, "iter_scales": True, "layer_gains": True,
                "value_embeds": 1, "value_residual": True, "ve_layers": "9,10,13", "ve_dim": 8, "skip_gates": True}


def test_parse_stages_reads_plans():
    assert parse_stages("0.5:flat,1.0:full") == ((0.5, "flat"), (1.0, "full"))
    assert parse_stages("0.35:0 1 2 3, 0.7:2x2 ,1.0:3") == ((0.35, (0, 1, 2, 3)), (0.7, (0, 1, 0, 1)), (1.0, 3))


def test_plan_rows_take_the_first_match():
    """The records' flat stage: physical layers 6-10 read the rows they have once looping is on."""
    assert plan_rows(FLAT_11, tuple(map(int, RECORD_A.split()))) == (0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14)
    assert plan_rows(FLAT_11, tuple(map(int, RECORD_B.split()))) == (0, 1, 2, 3, 4, 5, 12, 13, 14, 15, 16)
    assert plan_rows((0, 2, 1), (0, 1, 2)) is None and plan_rows((0, 1), (0, 1, 0, 1)) == (0, 1)


def test_a_flat_stage_maps_every_table_onto_the_final_plan():
    cfg = cfg_for({"layer_plan": RECORD_A, **PLAN_OPTIONS}, depth_schedule="0.5:flat,1.0:full",
                  depth_schedule_by="step")
    schedule = depth_schedule(cfg)
    assert schedule.layer_counts == (11, 15)
    assert [schedule.layers_at(f) for f in (0.0, 0.49, 0.5, 1.2)] == [11, 11, 15, 15]
    spec, text = cfg.model, cfg.train.depth_schedule
    stage = depth_variant(spec, 11, text)
    rows = (0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14)
    assert stage.spec.layer_plan == FLAT_11
    assert stage.spec.ve_layers == "6,9"  # final layers 10 and 13 (9 is block 5's third pass)
    assert stage.spec.num_skip_weights == 5 and spec.num_skip_weights == 7  # the records: 5 of the 7 pairs
    mapped = dict(stage.rows)
    for name in ("iter_embeds", "value_scales", "layer_resid_mixes", "iter_scales", "layer_in_gains"):
        assert mapped[name] == rows, name
    assert mapped["vrl_alphas"] == tuple(m - 1 for m in rows[1:]) and mapped["ve_layer_scales"] == (1, 2)
    assert mapped["skip_weights"] == mapped["skip_gates"] == (0, 1, 2, 3, 4)  # innermost pairs first
    w = perturbed(spec, scale=0.1, init_seed=1)
    sw = variant_weights(spec, w, 11, text)
    np.testing.assert_array_equal(sw["layer_mlp_scales"], w["layer_mlp_scales"][list(rows)])
    np.testing.assert_array_equal(sw["ve_layer_scales"], w["ve_layer_scales"][[1, 2]])
    assert sw["blocks.4.attn.c_q.weight"] is w["blocks.4.attn.c_q.weight"]  # blocks: the same tensors
    assert depth_variant(spec, 15, text).spec == spec and not depth_variant(spec, 15, text).rows
    # A stage that is a leading part of the plan is today's truncated model, whatever its notation.
    cyclic = cfg_for(OPTIONS, depth_schedule="0.3:flat,0.6:0 1 0 1,1.0:full", depth_schedule_by="step")
    assert depth_schedule(cyclic).layer_counts == (2, 4, 6)
    for layers in (2, 4):
        assert depth_variant(cyclic.model, layers, cyclic.train.depth_schedule) == depth_variant(cyclic.model, layers)
        assert depth_variant(cyclic.model, layers).spec == truncated_spec(cyclic.model, layers)


@pytest.mark.parametrize("plan, model, text, message", [
    (RECORD_A, {}, "0.5:flat,1.0:3", "a loop count needs a cyclic layer plan"),
    (RECORD_A, {}, "0.5:0 2 1,1.0:full", "0 2 1 is not a subsequence of model.layer_plan"),
    (RECORD_A, {}, "0.3:flat,0.6:0 1 2 3 4 5 6 7 8 9,1.0:full", "drops layers the stage before it"),
    (RECORD_A, {}, "0.5:flat,1.0:flat", "the last entry must be model.layer_plan"),
    (RECORD_A, {}, "0.5:0 1 x,1.0:full", "cannot read '0.5:0 1 x'"),
    (RECORD_A, {}, "0.5:0 1 2 3 4 5 10,1.0:full", "never uses block(s) [6, 7, 8, 9]"),
    (RECORD_A, {"loop_gates": True}, "0.5:flat,1.0:full", "model.loop_gates = true keeps a table per loop"),
    (RECORD_A, {"loop_embeds": True}, "0.5:flat,1.0:full", "model.loop_embeds = true"),
    (RECORD_A, {"cross_repeat_skips": True}, "0.5:flat,1.0:full", "model.cross_repeat_skips = true"),
    ("2x3", {}, "0.5:4,1.0:full", "4 loops is more than the 3"),
])
def test_bad_plan_stages_are_one_line_naming_the_key(plan, model, text, message):
    with pytest.raises(UserError, match="train.depth_schedule") as e:
        cfg_for({"layer_plan": plan, **model}, depth_schedule=text, depth_schedule_by="step")
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_a_plan_stage_computes_the_mapped_model():
    """At a stage named by plan, both backends give the loss of the stage's own model on its mapped rows
    (core.depth.variant_weights), and one step moves only the rows it reads: the gather carries the gradient."""
    import torch
    from backend_torch import model as tm

    cfg = cfg_for({"layer_plan": "0 1 2 1 2 3", **PLAN_OPTIONS, "ve_layers": "3,5"},
                  depth_schedule="0.5:flat,1.0:full", depth_schedule_by="step")
    spec, text = cfg.model, cfg.train.depth_schedule
    w = perturbed(spec, scale=0.1, init_seed=1)
    x = np.random.default_rng(3).integers(0, 64, (2, 16))
    y = np.roll(x, -1, axis=1)
    stage = depth_variant(spec, 4, text)
    assert dict(stage.rows)["iter_embeds"] == (0, 1, 2, 5)
    sw = {k: torch.tensor(v) for k, v in variant_weights(spec, w, 4, text).items()}
    ref = float(tm.token_losses(stage.spec, sw, torch.tensor(x), torch.tensor(y)).sum())
    after = {}
    for name, b in backends(spec, w, cfg).items():
        full = b.eval_loss_sum(x, y)
        b.set_depth(4)
        # Same operations on the same numbers as the reference model (torch); MLX within fp32 noise of it.
        assert b.eval_loss_sum(x, y) == pytest.approx(ref, rel=1e-6 if name == "torch" else 1e-5), name
        assert abs(b.eval_loss_sum(x, y) - full) > 1e-2  # the stage is not the full model
        b.train_step([(x, y)], 1.0, 0.9)
        after[name] = b.get_weights()
        for table in ("iter_embeds", "layer_mlp_scales", "layer_out_gains"):
            moved = [not np.array_equal(after[name][table][i], w[table][i]) for i in range(6)]
            assert moved == [True, True, True, False, False, True], (name, table)
    if "mlx" in after:
        for k, v in after["torch"].items():
            np.testing.assert_allclose(after["mlx"][k], v, rtol=0, atol=1e-4, err_msg=k)


# ---- the loop, with a fake backend and a fake clock -------------------------------------------------------

class FakeClockBackend(StandInBackend):
    """Records the depth of every training step; each step advances the loop's clock by one second."""
    device = "cpu (float32)"

    def __init__(self, spec, clock):
        super().__init__(init_weights(spec, 0))
        self.spec, self.clock, self.layers, self.seen = spec, clock, spec.num_layers, []

    def set_depth(self, layers):
        self.layers = layers

    def train_step(self, micro_batches, lr_scale, momentum):
        self.clock[0] += 1.0
        self.seen.append(self.layers)
        return 1.0

    def eval_loss_sum(self, x, y):
        return float(x.size)


def run_fake(tmp_path, demo_data, monkeypatch, model=None, **train):
    from core.bpb import ByteLuts
    from core.manifest import resolve_data
    from core.runlog import RunLog

    clock = [0.0]
    monkeypatch.setattr(core.clock, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))  # the train clock
    cfg = cfg_for({"vocab_size": 1024, **(model or {})}, **train)
    backend = FakeClockBackend(cfg.model, clock)
    luts = ByteLuts(np.ones(1024, np.int16), np.zeros(1024, bool), np.zeros(1024, bool))
    log = RunLog(tmp_path, echo=False, progress_bar=False)
    trainer = core_loop.Trainer(cfg, backend, resolve_data(demo_data).train_files, np.zeros(65, np.int32), luts,
                                log, out_dir=tmp_path)
    result = trainer.run()
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return backend, trainer, result, events


@pytest.mark.parametrize("by, train", [
    ("step", {"iterations": 8}),
    # 1 s per step against a 10 s cap: the fraction before step s is s/10; the cap stops it after step 10.
    ("wallclock", {"iterations": 100, "max_wallclock_seconds": 10}),
])
def test_the_loop_switches_depth_on_schedule(by, train, tmp_path, demo_data, monkeypatch):
    backend, trainer, result, events = run_fake(tmp_path, demo_data, monkeypatch, depth_schedule="0.25:1,0.5:2,1.0:3",
                                                depth_schedule_by=by, **train)
    want = {"step": [2, 2, 4, 4, 6, 6, 6, 6], "wallclock": [2, 2, 2, 4, 4, 6, 6, 6, 6, 6]}[by]
    assert backend.seen[-len(want):] == want and result["steps"] == len(want)
    assert backend.seen[:-len(want)] == [6, 2, 4]  # priming: a step at full depth, then one at each other depth
    switches = [(e["step"], e["layers"]) for e in events if e["event"] == "depth"]
    assert switches == ([(0, 2), (2, 4), (4, 6)] if by == "step" else [(0, 2), (3, 4), (5, 6)])
    assert trainer.at_full_depth and backend.layers == 6
    log = (tmp_path / "train.log").read_text()
    assert f"depth: step:{switches[1][0]} layers:4/6\n" in log


@pytest.mark.parametrize("by, train", [("step", {"iterations": 8}),
                                       ("wallclock", {"iterations": 100, "max_wallclock_seconds": 8})])
def test_the_loop_switches_to_a_looped_plan(by, train, tmp_path, demo_data, monkeypatch):
    """Flat (4 layers), then the plan that loops the middle blocks (6) from half the steps or of the (fake,
    1 s a step) wallclock; the warmup primes the flat stage too."""
    backend, trainer, result, events = run_fake(tmp_path, demo_data, monkeypatch, {"layer_plan": "0 1 2 1 2 3"},
                                                depth_schedule="0.5:flat,1.0:full", depth_schedule_by=by, **train)
    assert backend.seen == [6, 4] + [4] * 4 + [6] * 4
    assert [(e["step"], e["layers"]) for e in events if e["event"] == "depth"] == [(0, 4), (4, 6)]
    assert trainer.at_full_depth and "warmup_depth: layers:4" in (tmp_path / "train.log").read_text()


# ---- real backends --------------------------------------------------------------------------------------

def backends(spec, weights, cfg):
    from backend_torch.trainer import TorchBackend

    out = {"torch": TorchBackend(spec, weights, cfg.train, cfg.optim, device="cpu")}
    if pytest.importorskip("mlx.core"):
        from backend_mlx.trainer import MLXBackend

        out["mlx"] = MLXBackend(spec, weights, cfg.train, cfg.optim)
    return out


@pytest.mark.slow
def test_set_depth_computes_the_truncated_model():
    """At depth n a backend gives the loss of a model built from truncated_spec(n) with the leading rows of
    every table, and it differs from full depth (so the switch is not a no-op); MLX and torch agree."""
    from backend_mlx import model as mm
    from backend_torch import model as tm
    import mlx.core as mx
    import torch

    cfg = cfg_for(OPTIONS)
    spec, w = cfg.model, perturbed(cfg.model, scale=0.1, init_seed=1)
    x = np.random.default_rng(3).integers(0, 64, (2, 16))
    y = np.roll(x, -1, axis=1)
    runs = backends(spec, w, cfg)
    got = {}
    for name, b in runs.items():
        for layers in (2, 4, 6):
            b.set_depth(layers)
            got[name, layers] = b.eval_loss_sum(x, y)
    for layers in (2, 4):
        s, tw = truncated_spec(spec, layers), truncate_weights(spec, w, layers)
        ref_t = float(tm.token_losses(s, {k: torch.tensor(v) for k, v in tw.items()}, torch.tensor(x),
                                      torch.tensor(y)).sum())
        ref_m = float(mm.token_losses(s, {k: mx.array(v) for k, v in tw.items()}, mx.array(x), mx.array(y)).sum())
        # Same operations on the same numbers; rtol covers a different memory layout of the sliced rows.
        assert got["torch", layers] == pytest.approx(ref_t, rel=1e-6)
        assert got["mlx", layers] == pytest.approx(ref_m, rel=1e-6)
        # fp32 noise on this sum is ~1e-5; dropping a loop moves it by ~0.1 here (weights noised by 0.1).
        assert abs(got["torch", layers] - got["torch", 6]) > 1e-2
    for key in got:
        # Summed over 32 tokens: 32 x the per-logit fp32 band (a loose but meaningful bound on a sum near 130).
        assert got[key] == pytest.approx(got["torch", key[1]], abs=32 * LOGIT_ATOL * 10)


@pytest.mark.slow
def test_one_loop_trains_without_cross_repeat_gradients():
    """At one loop cross_repeat_scales is not read at all: torch gets no grad for it (a zero one is used) and
    Adam leaves it exactly where it was; the per-layer rows past the depth stay put too."""
    cfg = cfg_for(OPTIONS)
    w = perturbed(cfg.model, scale=0.1, init_seed=1)
    x = np.random.default_rng(4).integers(0, 64, (4, 16))
    for name, b in backends(cfg.model, w, cfg).items():
        b.set_depth(2)
        b.train_step([(x, np.roll(x, -1, axis=1))], 1.0, 0.9)
        after = b.get_weights()
        np.testing.assert_array_equal(after["cross_repeat_scales"], w["cross_repeat_scales"], err_msg=name)
        np.testing.assert_array_equal(after["iter_embeds"][2:], w["iter_embeds"][2:], err_msg=name)
        assert not np.array_equal(after["iter_embeds"][:2], w["iter_embeds"][:2]), name


# Loop counts; and stages named by plan, the 4-layer one mapped onto rows 0 1 3 5 of the final plan.
@pytest.mark.parametrize("model, schedule", [
    ({}, "0.25:1,0.5:2,1.0:3"),
    pytest.param({"layer_plan": "0 1 1 0 0 1", "iter_embeds": True}, "0.25:0 1,0.5:0 1 0 1,1.0:full", id="plans"),
])
def test_resume_across_a_switch_is_bit_exact(model, schedule, tmp_path, demo_data):
    """A torch run checkpointed at step 3 (4 layers, the switch to 6 due at step 4) and resumed in a fresh
    trainer ends with the weights and val loss of the uninterrupted run."""
    from backend_torch.trainer import TorchBackend
    from core.bpb import build_byte_luts
    from core.manifest import resolve_data
    from core.runlog import RunLog
    from core.shards import load_val_tokens
    from core.tokenizer import load_tokenizer

    cfg = cfg_for({"vocab_size": 1024, **model}, depth_schedule=schedule, depth_schedule_by="step",
                  checkpoint_every=3, keep_checkpoints=0)
    data = resolve_data(demo_data)
    luts = build_byte_luts(load_tokenizer(data.tokenizer_path), 1024)
    val = load_val_tokens(data.val_files, 16)[:513]

    def trainer(out):
        backend = TorchBackend(cfg.model, init_weights(cfg.model, 0), cfg.train, cfg.optim, device="cpu")
        log = RunLog(out, echo=False, progress_bar=False)
        return core_loop.Trainer(cfg, backend, data.train_files, val, luts, log, out_dir=out)

    ref = trainer(tmp_path / "ref")
    ref_result = ref.run()
    saved = ck.load_checkpoint(tmp_path / "ref" / ck.DIR_NAME / "step_000003", cfg.model)
    assert saved.layers == 4 and saved.meta["schedule"]["layers"] == 4
    resumed = trainer(tmp_path / "resumed")
    result = resumed.run(saved)
    assert result["val_loss"] == ref_result["val_loss"]
    for k, v in ref.backend.get_weights().items():
        np.testing.assert_array_equal(resumed.backend.get_weights()[k], v, err_msg=k)
    events = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["layers"]) for e in events if e["event"] == "depth"] == [(3, 4), (4, 6)]


@pytest.mark.slow
def test_flat_then_looped_trains_alike_in_both_backends(tmp_path, demo_data):
    """The records' switch-on in miniature on the demo shards: 4 flat layers, then the plan that loops blocks
    1-2, from half the steps. MLX logs torch's losses step for step (fp32 noise), and a torch run without the
    priming steps (which train both stages) logs exactly torch's: the warmup's effect is undone."""
    from backend_mlx.trainer import MLXBackend
    from backend_torch.trainer import TorchBackend
    from core.bpb import build_byte_luts
    from core.manifest import resolve_data
    from core.runlog import RunLog
    from core.shards import load_val_tokens
    from core.tokenizer import load_tokenizer

    pytest.importorskip("mlx.core")
    model = {"vocab_size": 1024, "layer_plan": "0 1 2 1 2 3", "iter_embeds": True, "per_layer_scales": True,
             "skip_gates": True}
    data = resolve_data(demo_data)
    luts = build_byte_luts(load_tokenizer(data.tokenizer_path), 1024)
    val = load_val_tokens(data.val_files, 16)[:513]

    def losses(backend_class, out, warmup_steps=1):
        cfg = cfg_for(model, depth_schedule="0.5:flat,1.0:full", depth_schedule_by="step", warmup_steps=warmup_steps)
        kw = {"device": "cpu"} if backend_class is TorchBackend else {}
        backend = backend_class(cfg.model, perturbed(cfg.model, scale=0.05, init_seed=2), cfg.train, cfg.optim, **kw)
        log = RunLog(out, echo=False, progress_bar=False)
        core_loop.Trainer(cfg, backend, data.train_files, val, luts, log, out_dir=out).run()
        events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [(e["step"], e["layers"]) for e in events if e["event"] == "depth"] == [(0, 4), (4, 6)]
        return [e["train_loss"] for e in events if e["event"] == "train"]

    torch_losses = losses(TorchBackend, tmp_path / "torch")
    assert len(torch_losses) == 8
    assert "warmup_depth: layers:4" in (tmp_path / "torch" / "train.log").read_text()
    assert losses(TorchBackend, tmp_path / "cold", warmup_steps=0) == torch_losses
    # fp32 on both sides, Muon's Newton-Schulz amplifies the last bits a little over 8 steps.
    np.testing.assert_allclose(losses(MLXBackend, tmp_path / "mlx"), torch_losses, rtol=1e-5)


# #895's block and input variants on top: value embeddings read per-layer rows, XSA its last N layers; #1110's
# VE, VRL (the extra loops take v0 from the trained loops' layer 0) and ln_scale.
@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"value_embeds": 2, "xsa_last_n": 2, "unet_skips": False},
                                   {"ve_layers": "1,4", "ve_dim": 8, "value_residual": True, "ln_scale": True}],
                         ids=["per-layer", "895-variants", "1110-parts"])
def test_extra_loop_states_mlx_equals_torch(extra):
    """The hidden state at the end of each of 5 loops (3 trained, 2 extra reusing the last loop's rows), with
    every per-layer option on: the trained loops equal the model's own layer outputs, and MLX equals torch."""
    mx = pytest.importorskip("mlx.core")
    import torch
    from backend_mlx import depth_eval as md
    from backend_torch import depth_eval as td
    from backend_torch import model as tm

    spec = ModelSpec.from_table({**TINY, "layer_plan": "2x3", **OPTIONS, **extra})
    w = perturbed(spec, scale=0.1, init_seed=1)
    x = np.random.default_rng(5).integers(0, 64, (2, 16))
    pt = {k: torch.tensor(v) for k, v in w.items()}
    t_states = td.loop_states(spec, pt, torch.tensor(x), 5)
    m_states = md.loop_states(spec, {k: mx.array(v) for k, v in w.items()}, mx.array(x), 5)
    collect = []
    tm.hidden_states(spec, pt, torch.tensor(x), collect=collect)
    for i, layer in enumerate(spec.loop_ends):
        torch.testing.assert_close(t_states[i], collect[layer], rtol=0, atol=0)
    assert len(t_states) == len(m_states) == 5
    for i, (a, b) in enumerate(zip(t_states, m_states)):
        # fp32 rounding is relative to the state, which grows loop by loop (to ~33 here, ~47 with VRL adding
        # layer 0's values): LOGIT_ATOL per unit of its largest entry (observed at most 5e-7 of it).
        scale = max(1.0, float(a.abs().max()))
        np.testing.assert_allclose(np.array(b), a.numpy(), rtol=0, atol=LOGIT_ATOL * scale, err_msg=f"loop {i + 1}")
    # The extra loops move the state (else "extra loops" would silently be a copy of the last one).
    assert float((t_states[4] - t_states[3]).abs().max()) > 1e-3


def test_eval_loop_flags_are_checked():
    from core.depth import check_loops

    spec = ModelSpec.from_table({**TINY, "layer_plan": "2x3"})
    assert check_loops(spec, 5, None, None) == (5, None)
    assert check_loops(spec, None, 1e-3, None) == (6, 1e-3)  # default --max-loops: 2R
    for args, message in [((2, None, None), "at least the 3 loops"), ((5, 1e-3, None), "not both"),
                          ((None, None, 5), "--max-loops needs --converge"), ((None, -1.0, None), "positive")]:
        with pytest.raises(UserError, match=message):
            check_loops(spec, *args)
    with pytest.raises(UserError, match="cyclic layer plan"):
        check_loops(ModelSpec.from_table({**TINY, "layer_plan": "0 1 2 1 2 3"}), 3, None, None)


# ---- real runs through the CLI ---------------------------------------------------------------------------

LOOPGOLF = Path(sys.executable).with_name("loopgolf")
PROGRAM = [str(LOOPGOLF)] if LOOPGOLF.exists() else [sys.executable, "-m", "tools.cli"]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_progressive_run_switches_and_exports_at_full_depth(backend, demo_data, tmp_path):
    """A 12-step demo run with 1, 2 then 3 loops by step: metrics.jsonl shows the switches, the final
    validation runs at full depth, and the exported weights evaluated with 3 loops by `loopgolf eval --loops`
    give that same val loss."""
    pytest.importorskip("mlx.core" if backend == "mlx" else "torch")
    out = tmp_path / "run"
    cmd = [*PROGRAM, "train", "--config", "configs/demo.toml", "--backend", backend, "--data", str(demo_data),
           "--out", str(out), "--small", "--set", "model.model_dim=32", "--set", "train.seq_len=32",
           "--set", "train.iterations=12", "--set", "train.val_every=0", "--set", "train.val_max_tokens=2048",
           "--set", "train.max_wallclock_seconds=0", "--set", "train.warmup_steps=1",
           "--set", "train.compute_dtype='float32'", "--set", "train.depth_schedule='0.25:1,0.5:2,1.0:3'",
           "--set", "train.depth_schedule_by='step'"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(e["step"], e["layers"]) for e in events if e["event"] == "depth"] == [(0, 2), (3, 4), (6, 6)]
    (val,) = [e for e in events if e["event"] == "val"]
    assert val["step"] == 12 and val["layers"] == 6
    js = tmp_path / "loops.json"
    proc = subprocess.run([*PROGRAM, "eval", "--weights", str(out / "model.safetensors"), "--data",
                           str(demo_data), "--backend", backend, "--seq-len", "32", "--max-tokens", "2048",
                           "--dtype", "float32", "--loops", "4", "--json", str(js)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    loops = json.loads(js.read_text())["depth"]["loops"]
    assert [r["layers"] for r in loops] == [2, 4, 6, 8] and [r["extra"] for r in loops] == [False] * 3 + [True]
    # Same tokens and model; the loss sums are batched differently (float64 totals of fp32 batch sums).
    assert loops[2]["val_loss"] == pytest.approx(val["val_loss"], rel=1e-6)
    assert "loop:4 layers:8 delta:" in proc.stdout
