"""`loopgolf parity` and the golden trajectory: MLX and PyTorch compute the same model, on the CPU.

- every shipped config passes `parity --small` in fp32, and one passes the bf16 band;
- bugs planted in ONE backend (monkeypatched) fail parity, and the report names the first divergence;
- both backends' exported weights give byte-identical artifacts (payload and compressed, every codec);
- the golden trajectory (tests/golden) holds in both backends.

Tolerances: core/tolerances.py (see its docstring for how they were measured).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import backend_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch's OpenMP starts)

pytest.importorskip("mlx.core")
torch = pytest.importorskip("torch")

from core.config import load_config  # noqa: E402
from core.spec import ModelSpec  # noqa: E402
from core.tolerances import NOT_COMPARED, TOLERANCES, tolerance  # noqa: E402
from tools import parity  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.toml"))
SEED = 1337


def small(name: str, *overrides: str):
    return load_config(ROOT / "configs" / name, list(overrides), small=True, small_vocab=True)


def failing(rows):
    return [r.check for r in rows if not r.ok]


@pytest.fixture(scope="module")
def demo_cfg():
    return small("demo.toml")  # the smallest shipped config: planted bugs run on it


# ---- every config, fp32 and bf16 -----------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_small_parity(name):
    cfg = small(name)
    rows = parity.parity_rows(cfg, "float32", SEED)
    assert not failing(rows), "\n" + parity.format_report(rows)
    checks = [r.check for r in rows]
    # One row per effective layer (naming its block), per parameter's gradient, and the artifact's hashes.
    assert [c for c in checks if c.startswith("layer ")] == [
        f"layer {i} (block {b})" for i, b in enumerate(cfg.model.layer_plan)]
    from core.params import param_table

    assert [c[5:] for c in checks if c.startswith("grad ")] == [i.name for i in param_table(cfg.model)]
    for prefix in ("op rms_norm", "op rope", "op attention (", "op mlp", "op softcap", "op cross_entropy",
                   "logits", "loss", "update muon", "update adam", "train_step loss", "train_step muon",
                   "train_step adam", "artifact payload sha256", "artifact sha256", "dequantized logits"):
        assert any(c.startswith(prefix) for c in checks), prefix


@pytest.mark.slow
def test_bf16_passes_its_band():
    rows = parity.parity_rows(small("ut_3x4.toml"), "bfloat16", SEED)
    assert not failing(rows), "\n" + parity.format_report(rows)
    by_check = {r.check: r for r in rows}
    # The forward really ran in bf16 (fp32 logits agree to ~5e-7), within the bf16 band, not at its edge.
    assert 1e-4 < by_check["logits"].max_rel < 0.5 * tolerance("logits", "bfloat16").rtol
    # The optimizer updates take the same fp32 gradients in both dtypes, so they keep fp32's tolerance.
    assert by_check["update muon (matrix)"].max_rel < 1e-4
    assert not any(c.startswith("train_step adam") for c in by_check)  # NOT_COMPARED in bf16


# ---- planted bugs ---------------------------------------------------------------------------------------

def _flipped_rotary(x, spec):
    """torch RoPE rotated by +angle instead of upstream's -angle."""
    half = spec.head_dim // 2
    inv_freq = 1.0 / spec.rope_base ** (torch.arange(0, spec.head_dim, 2, dtype=torch.float32) / spec.head_dim)
    angles = torch.outer(torch.arange(x.size(-2), dtype=torch.float32), inv_freq)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def _plant_rope(monkeypatch):
    from backend_torch import model as tm

    monkeypatch.setattr(tm, "rotary", _flipped_rotary)


def _plant_ns_coefficient(monkeypatch):
    from backend_mlx import optim as mo

    a, b, _ = mo.NS_COEFFS
    monkeypatch.setattr(mo, "NS_COEFFS", (a, b, 2.0))  # upstream's c is 2.0315


def _plant_row_norm_axis(monkeypatch):
    """MLX's MuonEq-R normalises columns instead of rows."""
    import mlx.core as mx

    from backend_mlx import optim as mo

    monkeypatch.setattr(mo, "normalize_rows",
                        lambda g, eps=1e-7: g / mx.maximum(mx.sqrt(mx.sum(g * g, axis=0, keepdims=True)), eps))


def _plant_gqa_layout(monkeypatch):
    """torch shares kv heads as a tile (kv0 kv1 kv0 kv1) instead of in groups (kv0 kv0 kv1 kv1)."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def tiled(q, k, v, is_causal=False, scale=None, enable_gqa=False):
        rep = q.size(1) // k.size(1)
        return real(q, k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1), is_causal=is_causal, scale=scale)

    monkeypatch.setattr(F, "scaled_dot_product_attention", tiled)


def _plant_norm_eps(monkeypatch):
    from backend_mlx import model as mm

    real = mm.rms_norm
    monkeypatch.setattr(mm, "rms_norm", lambda x, eps: real(x, 1e-5))


def _plant_lossy_export(monkeypatch):
    """torch exports its weights through bf16: the numbers a run saves would not be the numbers it trained."""
    from backend_torch.trainer import TorchBackend

    monkeypatch.setattr(TorchBackend, "get_weights", lambda self: {
        k: v.detach().to(torch.bfloat16).float().numpy() for k, v in self.params.items()})


PLANTED = {
    # bug: (plant, the first row that must fail)
    "rope_sign_torch": (_plant_rope, "op rope"),
    "ns_coefficient_mlx": (_plant_ns_coefficient, "update muon (matrix)"),
    "row_norm_axis_mlx": (_plant_row_norm_axis, "update+row_norm muon (matrix)"),
    "gqa_layout_torch": (_plant_gqa_layout, "op attention (GQA 4q/2kv)"),
    "norm_eps_mlx": (_plant_norm_eps, "op rms_norm"),
    "lossy_export_torch": (_plant_lossy_export, "weights loaded, exported back to numpy"),
}


@pytest.mark.slow
@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_fails_and_names_the_first_divergence(bug, monkeypatch, demo_cfg):
    plant, first = PLANTED[bug]
    plant(monkeypatch)
    rows = parity.parity_rows(demo_cfg, "float32", SEED)
    bad = parity.first_divergence(rows)
    assert bad is not None, "\n" + parity.format_report(rows)
    assert bad.check == first, "\n" + parity.format_report(rows)
    report = parity.format_report(rows)
    assert f"first divergence: {first}" in report
    if bug == "lossy_export_torch":
        assert {"artifact payload sha256 (uncompressed)", "artifact sha256 (int8, zlib)"} <= set(failing(rows))
    if bug == "ns_coefficient_mlx":  # forward and backward are untouched: only the Muon rows move
        assert all(r.ok for r in rows if r.check.startswith(("op ", "layer ", "logits", "grad ")))
        from core.params import MATRIX, param_table

        widest = max(max(i.shape) for i in param_table(demo_cfg.model) if i.group == MATRIX)
        assert bad.max_rel > 100 * tolerance("update_muon", "float32", dim=widest).rtol


@pytest.mark.slow
def test_cli_prints_the_table_and_exits_1_on_a_planted_bug(monkeypatch, capsys):
    assert parity.main(["--config", str(ROOT / "configs/demo.toml"), "--small", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert parity.HEADER in out and "parity: all" in out and "first divergence" not in out
    _plant_rope(monkeypatch)
    assert parity.main(["--config", str(ROOT / "configs/demo.toml"), "--small", "--seed", "3"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("first divergence: "))
    assert line.startswith("first divergence: op rope ") and line.rstrip().endswith("FAIL")


def test_cli_bad_input_is_one_line_exit_2(capsys, tmp_path):
    assert parity.main(["--config", str(tmp_path / "missing.toml"), "--small"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("loopgolf: error: ") and "missing.toml" in err
    assert parity.main(["--config", str(ROOT / "configs/demo.toml"), "--small", "--set", "model.nmu_heads=4"]) == 2
    assert "did you mean 'num_heads'" in capsys.readouterr().err


# ---- the artifact ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_artifact_sha256_identical_across_backends(tmp_path):
    """Weights loaded into each backend's trainer and exported back give the same artifact bytes, payload and
    compressed, for every codec. The vocabulary is widened so the tied embedding (> 65,536 values) takes
    the int8 path (quantile clip, fp16 scales), not only the fp16 passthrough."""
    from backend_mlx.trainer import MLXBackend
    from backend_torch.trainer import TorchBackend
    from core import artifact
    from core.quant import ROLE_QUANTIZED, quantize_weights

    cfg = small("demo.toml", "model.vocab_size=4096")
    spec = cfg.model
    weights = parity.save_and_load(spec, parity.perturbed_weights(spec, SEED), tmp_path / "w.safetensors")
    exported = {
        "mlx": MLXBackend(spec, weights, cfg.train, cfg.optim).get_weights(),
        "torch": TorchBackend(spec, weights, cfg.train, cfg.optim, device="cpu").get_weights(),
    }
    assert any(t.role == ROLE_QUANTIZED for t in quantize_weights(exported["torch"]).tensors.values())
    spec_json = spec.to_dict()
    payloads = {k: artifact.payload_bytes(spec_json, w) for k, w in exported.items()}
    assert payloads["mlx"] == payloads["torch"]
    for codec in artifact.CODECS:
        blobs = {k: artifact.build_artifact(spec_json, w, codec=codec) for k, w in exported.items()}
        assert blobs["mlx"] == blobs["torch"], codec
    # And through the full parity run: both hash rows hold and show the digest of these very bytes.
    rows = {r.check: r for r in parity.parity_rows(cfg, "float32", SEED)}
    for check, data in (("artifact payload sha256 (uncompressed)", payloads["mlx"]),
                        ("artifact sha256 (int8, zlib)", artifact.build_artifact(spec_json, exported["mlx"]))):
        assert rows[check].ok, rows[check].format()
        assert rows[check].note.startswith(hashlib.sha256(data).hexdigest()[:16])


# ---- the golden trajectory ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_golden_trajectory(backend):
    """8 fp32 steps from the committed seed checkpoint: a change that moves the numerics must regenerate
    tests/golden on purpose (python -m tests.golden.regenerate)."""
    from tests.golden import regenerate as golden

    weights, record = golden.load_golden()
    assert record["steps"] == golden.STEPS == len(record["losses"])
    losses = np.array(golden.run_trajectory(backend, weights))
    want = np.array(record["losses"])
    assert losses[-1] < losses[0] - 1.0  # it learns, so the steps exercise real updates
    tol = tolerance("golden_loss", "float32")
    worst = np.abs(losses - want).max()
    assert worst <= tol.atol, (f"{backend} left the golden trajectory by {worst:.3e} (> {tol.atol}):\n got  {losses}\n"
                               f" want {want}\nif the change is meant, run python -m tests.golden.regenerate")


def test_golden_trajectory_catches_a_numerics_change(monkeypatch):
    """The golden tolerance is tight enough to see a small change of the maths (Newton-Schulz's c)."""
    from backend_mlx import optim as mo
    from tests.golden import regenerate as golden

    a, b, _ = mo.NS_COEFFS
    monkeypatch.setattr(mo, "NS_COEFFS", (a, b, 2.0))
    weights, record = golden.load_golden()
    moved = np.abs(np.array(golden.run_trajectory("mlx", weights)) - record["losses"]).max()
    assert moved > 10 * tolerance("golden_loss", "float32").atol


def test_golden_files_are_small_and_consistent():
    from tests.golden import regenerate as golden

    assert golden.SEED_FILE.stat().st_size < 100_000
    record = json.loads(golden.LOSSES_FILE.read_text())
    # The same model: keys added to the spec since the record was written take their (off) defaults.
    assert ModelSpec.from_table(record["config"]["model"]) == golden.golden_config().model
    assert record["data_seed"] == golden.DATA_SEED


# ---- the tolerance table --------------------------------------------------------------------------------

def test_every_tolerance_has_a_reason_for_both_dtypes():
    kinds = {k for k, _ in TOLERANCES} | {k for k, _ in NOT_COMPARED}
    for kind in kinds - {"golden_loss"}:
        for dtype in parity.DTYPES:
            if (kind, dtype) in NOT_COMPARED:
                continue
            tol = tolerance(kind, dtype)
            assert tol.kind == kind and len(tol.reason) > 30 and tol.rtol >= 0 and tol.atol >= 0
            assert "bserved" in tol.reason, (kind, dtype)  # each number says what was measured
