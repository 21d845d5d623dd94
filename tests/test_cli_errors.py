"""Every user mistake is one clear line on stderr and a non-zero exit, never a traceback."""

import shutil

import pytest

from tools.cli import main

DEMO = "configs/demo.toml"
QUICK = ["--small", "--set", "train.iterations=1", "--set", "train.warmup_steps=0", "--backend", "mlx"]


def run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def assert_one_line(code, err, *fragments):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("loopgolf: error: ")
    for f in fragments:
        assert f in err, err


@pytest.fixture()
def data_copy(demo_data, tmp_path):
    return shutil.copytree(demo_data, tmp_path / "data")


def shard(root, split="train"):
    return next((root / "datasets" / "shakespeare_sp1024").glob(f"fineweb_{split}_000000.bin"))


def test_truncated_shard(capsys, data_copy, tmp_path):
    path = shard(data_copy)
    path.write_bytes(path.read_bytes()[:5000])
    code, err = run(capsys, ["train", "--config", DEMO, "--data", str(data_copy), "--out", str(tmp_path / "r"), *QUICK])
    assert_one_line(code, err, str(path))


def test_wrong_magic(capsys, data_copy, tmp_path):
    path = shard(data_copy, "val")
    data = bytearray(path.read_bytes())
    data[0:4] = (12345).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    code, err = run(capsys, ["train", "--config", DEMO, "--data", str(data_copy), "--out", str(tmp_path / "r"), *QUICK])
    assert_one_line(code, err, str(path), "magic")


def test_tokenizer_vocab_mismatch(capsys, demo_data, tmp_path):
    code, err = run(capsys, ["train", "--config", DEMO, "--data", str(demo_data), "--out", str(tmp_path / "r"),
                             *QUICK, "--set", "model.vocab_size=512"])
    assert_one_line(code, err, "vocab", "512")


@pytest.mark.parametrize(
    "model_toml, fragment",
    [
        ("model_dim = 100\nnum_heads = 8", "model.model_dim = 100 is not divisible by model.num_heads = 8"),
        ("num_blocks = 2\nlayer_plan = [0, 1, 2]", "model.layer_plan[2] = 2 is out of range"),
        ("model_dim = 24\nnum_heads = 8\nnum_kv_heads = 4", "head_dim = model_dim/num_heads = 3 is odd"),
        ("model_dimm = 64", "unknown key 'model.model_dimm'; did you mean 'model_dim'?"),
    ],
)
def test_bad_model_configs(capsys, tmp_path, model_toml, fragment):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(f"[model]\n{model_toml}\n")
    for command in (["size", "--config", str(cfg)], ["train", "--config", str(cfg), "--backend", "mlx"]):
        code, err = run(capsys, command)
        assert_one_line(code, err, fragment)


def test_missing_data_directory(capsys, tmp_path):
    code, err = run(capsys, ["train", "--config", DEMO, "--data", str(tmp_path / "nowhere"), *QUICK])
    assert_one_line(code, err, str(tmp_path / "nowhere"), "make_mini_shards --demo --out data")


def test_missing_config_and_bad_toml(capsys, tmp_path):
    code, err = run(capsys, ["size", "--config", str(tmp_path / "none.toml")])
    assert_one_line(code, err, "none.toml", "not found")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    code, err = run(capsys, ["size", "--config", str(bad)])
    assert_one_line(code, err, "bad.toml", "not valid TOML")
    code, err = run(capsys, ["size", "--config", str(tmp_path)])  # a run directory instead of its config.toml
    assert_one_line(code, err, "is a directory", str(tmp_path / "config.toml"))


def test_batch_that_does_not_split_into_sequences(capsys, demo_data, tmp_path):
    code, err = run(capsys, ["train", "--config", DEMO, "--data", str(demo_data), "--out", str(tmp_path / "r"),
                             *QUICK, "--set", "train.batch_tokens=100"])
    assert_one_line(code, err, "train.batch_tokens = 100")


@pytest.mark.slow
def test_size_prints_the_baseline_count(capsys):
    assert main(["size", "--config", "configs/baseline_9x512.toml"]) == 0
    assert "model_params:17059912" in capsys.readouterr().out


def test_writing_over_a_directory_is_a_user_error_and_leaves_nothing(tmp_path):
    from core.atomic import atomic_write_text
    from core.errors import UserError

    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UserError, match="is a directory; expected a file path"):
        atomic_write_text(target, "x")
    assert list(tmp_path.iterdir()) == [target] and not list(target.iterdir())


@pytest.mark.parametrize("argv,code,stream", [(["--help"], 0, "out"), (["train"], 2, "err")], ids=["help", "error"])
def test_the_console_script_prints_help_and_argparse_errors_once(monkeypatch, capsys, argv, code, stream):
    """console_main parses once to decide on the OpenBLAS re-exec, then main parses again: only one may print."""
    from tools.cli import console_main

    monkeypatch.setenv("LOOPGOLF_NO_OPENBLAS", "1")
    monkeypatch.setattr("sys.argv", ["loopgolf", *argv])
    with pytest.raises(SystemExit) as stop:
        console_main()
    assert stop.value.code == code
    printed = getattr(capsys.readouterr(), stream)
    assert printed.count("usage: loopgolf") == 1, printed
