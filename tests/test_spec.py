"""ModelSpec: plans and shorthands, validation (one clear error per bad value), canonical JSON."""

import json
from pathlib import Path

import pytest

from core.config import load_config
from core.errors import UserError
from core.spec import ModelSpec

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


@pytest.mark.parametrize(
    "table, plan, blocks",
    [
        ({"layer_plan": "3x4"}, [0, 1, 2] * 4, 3),
        ({"depth": "5x3"}, [0, 1, 2, 3, 4] * 3, 5),
        ({"layer_plan": "flat", "num_layers": 9}, list(range(9)), 9),
        ({"num_layers": 9}, list(range(9)), 9),
        ({"layer_plan": "0 1 2 3 4 5 4 5 6 7 8"}, [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8], 9),
        ({"layer_plan": [0] * 9}, [0] * 9, 1),
    ],
)
def test_plans_and_shorthands(table, plan, blocks):
    spec = ModelSpec.from_table(table)
    assert list(spec.layer_plan) == plan
    assert spec.num_blocks == blocks
    assert spec.num_layers == len(plan)


@pytest.mark.parametrize(
    "table, fragment",
    [
        ({"model_dim": 500}, "model.model_dim = 500 is not divisible by model.num_heads = 8"),
        ({"model_dim": 24, "num_heads": 8, "num_kv_heads": 4}, "head_dim = model_dim/num_heads = 3 is odd"),
        ({"num_heads": 8, "num_kv_heads": 3}, "not divisible by model.num_kv_heads = 3"),
        ({"num_blocks": 2, "layer_plan": [0, 1, 2]}, "model.layer_plan[2] = 2 is out of range for model.num_blocks = 2"),
        ({"num_blocks": 3, "layer_plan": [0, 1, 0]}, "never uses block(s) [2]"),
        ({"num_layers": 4, "layer_plan": "3x2"}, "has 6 layers but model.num_layers = 4"),
        ({"modle_dim": 512}, "unknown key 'model.modle_dim'; did you mean 'model_dim'?"),
        ({"num_heads": True}, "'model.num_heads' = True: expected an integer"),
        ({"rope_base": "big"}, "'model.rope_base' = 'big': expected a number"),
        ({"vocab_size": 70000}, "at most 65536"),
        ({"logit_softcap": 0}, "model.logit_softcap = 0.0: expected a positive number"),
        ({"layer_plan": "3y4"}, "expected 'KxR'"),
        # Text int() refuses (a traceback before core.spec_text): a non-ASCII digit, 4300+ digits.
        ({"layer_plan": "0 \u00b2"}, "expected 'KxR'"),
        ({"layer_plan": "0 " + "9" * 5000}, "model.layer_plan: a block index of 5,000 digits; at most 4,096 blocks"),
        ({"layer_plan": "9" * 5000 + "x2"}, "'KxR' with K x R at most 4,096"),
        ({"ve_layers": "\u00b2"}, "model.ve_layers = '\u00b2': expected effective layer indices"),
        ({"depth": "3x4", "layer_plan": "3x4"}, "either model.depth or model.layer_plan"),
    ],
)
def test_bad_values_are_one_clear_error(table, fragment):
    with pytest.raises(UserError) as e:
        ModelSpec.from_table(table)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_canonical_json_round_trip():
    spec = ModelSpec.from_table({"layer_plan": "3x4", "model_dim": 256})
    text = spec.to_json()
    assert list(json.loads(text)) == sorted(json.loads(text))
    assert ModelSpec.from_json(text) == spec
    assert ModelSpec.from_json(text).to_json() == text


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("small", [False, True])
def test_shipped_configs_load(path, small):
    cfg = load_config(path, small=small)
    if small:
        full = load_config(path)
        assert cfg.model.layer_plan == full.model.layer_plan  # --small keeps the topology
        assert cfg.model.model_dim < full.model.model_dim or full.model.model_dim <= 64
    assert "[model]" in cfg.to_toml()


def test_overrides_and_unknown_tables(tmp_path):
    cfg_path = tmp_path / "c.toml"
    cfg_path.write_text('[model]\nlayer_plan = "3x4"\n')
    cfg = load_config(cfg_path, ["train.iterations=7", "model.layer_plan='2x2'", "data.path=somewhere"])
    assert cfg.train.iterations == 7 and cfg.model.layer_plan == (0, 1, 0, 1) and cfg.data.path == "somewhere"
    with pytest.raises(UserError, match=r"unknown key 'train.iteratons'; did you mean 'iterations'"):
        load_config(cfg_path, ["train.iteratons=7"])
    cfg_path.write_text("[trian]\niterations = 3\n")
    with pytest.raises(UserError, match=r"unknown table \[trian\]; did you mean \[train\]"):
        load_config(cfg_path)


def test_resolved_config_reloads_identically(tmp_path):
    cfg = load_config(CONFIGS[0])
    out = tmp_path / "resolved.toml"
    out.write_text(cfg.to_toml())
    again = load_config(out)
    assert again.model == cfg.model and again.train == cfg.train and again.optim == cfg.optim
