"""Code bytes are the exported train_gpt.py's: what `loopgolf export` writes for the config, nothing else."""

from pathlib import Path

from core.config import load_config
from tools.cli import main
from tools.script import build_script, submission_code_bytes

DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.toml"


def test_size_counts_the_packed_script_for_the_config(capsys):
    cfg = load_config(DEMO)
    assert main(["size", "--config", str(DEMO)]) == 0
    out = capsys.readouterr().out
    lzma_bytes = len(build_script(cfg, "lzma").encode())
    assert f"code: {lzma_bytes:,} B (train_gpt.py, lzma; brotli {len(build_script(cfg, 'brotli').encode()):,} B, " \
           f"plain {len(build_script(cfg, 'none').encode()):,} B)" in out
    assert submission_code_bytes(cfg) == lzma_bytes


def test_a_feature_switched_off_costs_no_code_bytes():
    """The exported script leaves out what the config does not use: GPTQ on adds its solver."""
    base = load_config(DEMO)
    with_gptq = load_config(DEMO, ["artifact.gptq=true", 'artifact.scheme="int6"'])
    plain_off, plain_on = build_script(base, "none"), build_script(with_gptq, "none")
    assert "cholesky" not in plain_off and "cholesky" in plain_on
    assert "parallel_block_list" not in plain_off  # model.parallel_blocks off: its branch and property go
    assert "ttt_optimizer" not in plain_off and "TTTOptimizer" not in plain_off  # eval.ttt off: no TTT code
    assert len(plain_on) > len(plain_off) + 2000
