"""The parameter table, init_weights, and weight files."""

import numpy as np
import pytest

from core.errors import UserError
from core.params import GROUPS, count_params, init_weights, param_table
from core.spec import ModelSpec
from core.weights import load_weights, save_weights

LOOPED = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x3"})


def test_baseline_matches_upstream_count():
    assert count_params(ModelSpec())[0] == 17_059_912  # upstream NaiveBaseline log: model_params:17059912


def test_effective_counts_each_use_of_a_block():
    unique, effective = count_params(LOOPED)
    per_block = sum(p.numel for p in param_table(LOOPED) if p.block == 0)
    assert effective - unique == 2 * 2 * per_block  # 2 blocks, each used 3 times: 2 extra uses each


def test_every_parameter_in_exactly_one_group():
    table = param_table(LOOPED)
    assert len({p.name for p in table}) == len(table)
    assert all(p.group in GROUPS for p in table)


def test_init_is_deterministic_and_follows_upstream():
    a, b, c = init_weights(LOOPED, 1), init_weights(LOOPED, 1), init_weights(LOOPED, 2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["blocks.0.attn.c_q.weight"], c["blocks.0.attn.c_q.weight"])
    assert np.all(a["blocks.1.attn.proj.weight"] == 0) and np.all(a["blocks.0.mlp.proj.weight"] == 0)
    bound = 1 / np.sqrt(32)
    assert np.abs(a["blocks.0.mlp.fc.weight"]).max() <= bound
    assert np.abs(a["blocks.0.mlp.fc.weight"]).max() > 0.9 * bound
    assert abs(a["tok_emb.weight"].std() - 0.005) < 0.0005
    assert np.array_equal(a["blocks.0.resid_mix"], np.stack([np.ones(32), np.zeros(32)]))
    assert np.all(a["blocks.0.attn.q_gain"] == 1.5)


def test_a_tensor_init_does_not_depend_on_other_tensors():
    wide = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "3x3"})
    a, b = init_weights(LOOPED, 5), init_weights(wide, 5)
    assert np.array_equal(a["blocks.1.attn.c_k.weight"], b["blocks.1.attn.c_k.weight"])


def test_weight_file_round_trip(tmp_path):
    w = init_weights(LOOPED, 3)
    save_weights(tmp_path / "w.safetensors", LOOPED, w)
    spec, loaded = load_weights(tmp_path / "w.safetensors")
    assert spec == LOOPED
    assert all(np.array_equal(w[k], loaded[k]) for k in w)


def test_weight_file_lists_what_is_missing_extra_or_misshapen(tmp_path):
    w = init_weights(LOOPED, 3)
    del w["skip_weights"]
    w["blocks.9.attn.c_q.weight"] = np.zeros((2, 2), np.float32)
    w["tok_emb.weight"] = np.zeros((10, 32), np.float32)
    with pytest.raises(UserError) as e:
        save_weights(tmp_path / "w.safetensors", LOOPED, w)
    msg = str(e.value)
    assert "missing skip_weights" in msg and "extra blocks.9.attn.c_q.weight" in msg
    assert "wrong shape tok_emb.weight (10, 32) (expected (64, 32))" in msg
    assert not (tmp_path / "w.safetensors").exists()


@pytest.mark.parametrize("mutate", ["truncate", "garbage", "empty", "no_metadata"])
def test_malformed_weight_files_are_refused(tmp_path, mutate):
    path = tmp_path / "w.safetensors"
    save_weights(path, LOOPED, init_weights(LOOPED, 0))
    data = path.read_bytes()
    if mutate == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif mutate == "garbage":
        path.write_bytes(b"\xff" * 64)
    elif mutate == "empty":
        path.write_bytes(b"")
    else:
        from safetensors.numpy import save_file

        save_file({"x": np.zeros(3, np.float32)}, str(path))
    with pytest.raises(UserError) as e:
        load_weights(path)
    assert str(path) in str(e.value)


def test_missing_weight_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_weights(tmp_path / "nope.safetensors")


def test_weight_files_are_byte_identical_for_identical_weights(tmp_path):
    w = init_weights(LOOPED, 3)
    save_weights(tmp_path / "a.safetensors", LOOPED, w)
    save_weights(tmp_path / "b.safetensors", LOOPED, w)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
