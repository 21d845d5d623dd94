"""--profile, --dry-run and --nproc: resolving a run without training it (no GPU needed)."""

import os

import pytest

from core.config import BUILTIN_PROFILES, config_from_dict
from core.errors import UserError
from tools.cli import main

BASE = {"model": {"model_dim": 64, "num_heads": 4, "num_kv_heads": 2, "layer_plan": "2x2"},
        "train": {"batch_tokens": 8192, "seq_len": 256}}


def test_profile_tables_apply_only_when_named_and_set_wins():
    raw = {**BASE, "profile": {"h100": {"train": {"batch_tokens": 262144}}, "laptop": {"train": {"iterations": 7}}}}
    plain = config_from_dict(raw)
    assert (plain.train.batch_tokens, plain.train.seq_len) == (8192, 256)
    h100 = config_from_dict(raw, profile="h100")
    assert h100.train.batch_tokens == 262144  # the config's profile over the built-in one
    assert h100.train.seq_len == BUILTIN_PROFILES["h100"]["train"]["seq_len"] == 1024
    assert (h100.data.path, h100.data.dataset) == ("data", "fineweb10B_sp1024")
    assert h100.train.max_wallclock_seconds == 600
    assert h100.model == plain.model and "profile h100" in h100.source
    defaults = {"train": {"grad_accum_steps": 4, "batch_tokens": 1}}  # machine defaults lose to the config's profile
    assert config_from_dict(raw, profile="h100", profile_defaults=defaults).train.grad_accum_steps == 4
    assert config_from_dict(raw, profile="h100", profile_defaults=defaults).train.batch_tokens == 262144
    assert config_from_dict(raw, ["train.batch_tokens=131072"], profile="h100").train.batch_tokens == 131072
    assert config_from_dict(raw, profile="laptop").train.iterations == 7


def test_profile_refuses_model_changes_and_unknown_names():
    with pytest.raises(UserError, match="cannot change the model spec"):
        config_from_dict({**BASE, "profile": {"h100": {"model": {"model_dim": 128}}}})
    with pytest.raises(UserError, match=r"profile\.h100\.trian"):
        config_from_dict({**BASE, "profile": {"h100": {"trian": {"iterations": 1}}}})
    with pytest.raises(UserError, match="no built-in one"):
        config_from_dict(BASE, profile="a100")


def dry(capsys, *args):
    code = main(["train", "--dry-run", *args])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_dry_run_h100_on_eight_ranks(capsys):
    code, out = dry(capsys, "--config", "configs/baseline_9x512.toml", "--profile", "h100", "--nproc", "8")
    assert code == 0, out
    assert "backend: torch  world_size: 8  grad_accum_steps: 1" in out
    assert "524,288 in all, 65,536 per rank, 65,536 per micro-batch (64 sequences of 1024)" in out
    assert "17,059,912 unique, 17,059,912 effective" in out
    assert "memory per GPU" in out and "activations" in out and "optimizer" in out


def test_dry_run_h100_on_one_rank_accumulates(capsys):
    code, out = dry(capsys, "--config", "configs/ut_3x4.toml", "--profile", "h100", "--nproc", "1")
    assert code == 0, out
    assert "world_size: 1  grad_accum_steps: 8" in out  # upstream's grad_accum = 8 // world_size
    assert "524,288 per rank, 65,536 per micro-batch" in out


def test_dry_run_refuses_a_batch_that_does_not_split(capsys):
    code, out = dry(capsys, "--config", "configs/demo.toml", "--backend", "torch", "--nproc", "3")
    assert code == 2 and "does not split into whole sequences" in out


def test_nproc_needs_torch(capsys):
    code, out = dry(capsys, "--config", "configs/demo.toml", "--backend", "mlx", "--nproc", "2")
    assert code == 2 and "--backend torch" in out


def test_h100_profile_without_gpus(capsys, tmp_path):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the no-GPU messages do not apply")
    code, out = dry(capsys, "--config", "configs/baseline_9x512.toml", "--profile", "h100")
    assert code == 0 and "planned for 8" in out
    code = main(["train", "--config", "configs/baseline_9x512.toml", "--profile", "h100", "--out", str(tmp_path / "r")])
    assert code == 2 and "no CUDA GPU is visible" in capsys.readouterr().err


def test_strip_nproc():
    from backend_torch.launch import strip_nproc

    argv = ["train", "--nproc", "2", "--config", "c.toml", "--nproc=4", "--set", "train.iterations=3"]
    assert strip_nproc(argv) == ["train", "--config", "c.toml", "--set", "train.iterations=3"]


def test_launch_shares_the_cores_with_its_ranks_and_leaves_the_environment_as_it_was(monkeypatch):
    """The ranks get OMP_NUM_THREADS = cores // nproc; this process does not keep it (a later in-process run
    would otherwise skip its own thread setting while its subprocesses ran with one thread: CI saw the two
    disagree in the last bit)."""
    import torch.distributed.run

    from backend_torch.launch import launch

    seen = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(torch.distributed.run, "main", lambda args: seen.append(os.environ.get("OMP_NUM_THREADS")))
    assert launch(2, ["train", "--nproc", "2"]) == 0
    assert seen and int(seen[0]) >= 1 and "OMP_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice goes through and stays
    assert launch(2, ["train"]) == 0 and seen[-1] == "3" and os.environ["OMP_NUM_THREADS"] == "3"
