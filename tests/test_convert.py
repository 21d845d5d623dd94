"""loopgolf convert: round trips between our formats, upstream's files as upstream writes them, and inputs
that must be refused (pickles that name os.system, torch files with objects, truncated or garbage files)."""

from __future__ import annotations

import argparse
import collections
import dataclasses
import io
import json
import pickle
import struct
import zlib

import numpy as np
import pytest

from core.artifact import read_artifact, write_artifact
from tools.formats import MLX_NORM_EPS, convert, flip_rope_halves, read_weights_file, write_weights_file
from core.errors import UserError
from core.params import param_table
from tools.pickle_safe import as_recorded, dequantize_upstream, load_pickle
from core.quant import ROLE_QUANTIZED, Int8CleanPerRow, dequantize_weights, is_control_name, quantize_weights
from core.spec import ModelSpec
from core.weights import load_weights, save_weights
from tools.convert import add_parser, run_convert

try:
    import torch
except ImportError:  # torch is an optional extra: its formats' tests skip, the rest run
    torch = None
try:
    import mlx.core as mx
except ImportError:
    mx = None
needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")
needs_mlx = pytest.mark.skipif(mx is None, reason="needs mlx")

TINY = ModelSpec(vocab_size=64, model_dim=32, num_heads=4, num_kv_heads=2, num_layers=3, num_blocks=3,
                 layer_plan=(0, 1, 2))
LOOPED = ModelSpec.from_table({"vocab_size": 64, "model_dim": 32, "num_heads": 4, "num_kv_heads": 2, "depth": "2x2"})
# Big enough that tok_emb and the MLP matrices (131,072 elements) are quantized; c_q (65,536) passes through.
QUANT = ModelSpec(vocab_size=512, model_dim=256, num_heads=4, num_kv_heads=2, num_layers=2, num_blocks=2,
                  layer_plan=(0, 1))
TOKENS = np.arange(2 * 12).reshape(2, 12) * 7 % 64


def random_weights(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {p.name: (rng.standard_normal(p.shape) * 0.2).astype(np.float32) for p in param_table(spec)}


def bf16(w: np.ndarray) -> np.ndarray:
    """Round to bfloat16 and back (checked against torch in test_bf16_rounding_matches_torch)."""
    return as_recorded(np.asarray(w, np.float32), "bfloat16")


def logits(spec, weights):
    """MLX logits, or None without MLX (then logit checks compare None with None)."""
    if mx is None:
        return None
    from backend_mlx import forward_logits

    return forward_logits(spec, weights, TOKENS)


def safetensors_parts(path):
    """(header JSON, tensor bytes). Not the raw bytes: the safetensors library writes the metadata keys in
    a random order (a Rust HashMap), so two saves of the same weights can differ in the header."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def cli(*argv) -> int:
    sub = argparse.ArgumentParser(prog="loopgolf").add_subparsers(dest="command")
    add_parser(sub)
    return run_convert(sub.choices["convert"].parse_args([str(a) for a in argv]))


# ---- upstream's files, written the way train_gpt.py / train_gpt_mlx.py write them --------------------

def upstream_state_dict(weights, prefix=""):
    """torch.save(base_model.state_dict()): tok_emb bf16 (the model is .bfloat16()), the rest fp32."""
    return collections.OrderedDict(
        (prefix + k, torch.from_numpy(v.copy()).to(torch.bfloat16 if k == "tok_emb.weight" else torch.float32))
        for k, v in weights.items())


def upstream_container(weights, orig_dtypes):
    """quantize_state_dict_int8's dict (numpy leaves), built with core.quant's int8 rule."""
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": {}, "scales": {}, "dtypes": {}, "passthrough": {}}
    qmeta, passthrough_orig = {}, {}
    for name, w in weights.items():
        t = Int8CleanPerRow().quantize_tensor(name, w)
        if t.role == ROLE_QUANTIZED:
            obj["quantized"][name], obj["scales"][name], obj["dtypes"][name] = t.data, t.scale, orig_dtypes[name]
            if t.scale.ndim > 0:
                qmeta[name] = {"scheme": "per_row", "axis": 0}
        else:
            obj["passthrough"][name] = t.data
            if not is_control_name(name):
                passthrough_orig[name] = orig_dtypes[name]
    obj["qmeta"], obj["passthrough_orig_dtypes"] = qmeta, passthrough_orig
    return obj


def torch_ptz_bytes(obj) -> bytes:
    def tensors(v):
        return {k: tensors(x) for k, x in v.items()} if isinstance(v, dict) else (
            torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v)
    buf = io.BytesIO()
    torch.save(tensors(obj), buf)
    return zlib.compress(buf.getvalue(), level=9)


def mlx_ptz_bytes(obj) -> bytes:
    return zlib.compress(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), level=9)


@pytest.fixture(scope="module")
def quant_case():
    """QUANT weights as the upstream model holds them (bf16 embedding) and what upstream's loader makes of
    its artifact: q * scale, cast back to the recorded dtype (so the embedding is rounded to bf16 again)."""
    w = random_weights(QUANT, 3)
    w["tok_emb.weight"] = bf16(w["tok_emb.weight"])
    dtypes = {k: "bfloat16" if k == "tok_emb.weight" else "float32" for k in w}
    expected = dequantize_weights(quantize_weights(w))
    assert not np.array_equal(expected["tok_emb.weight"], bf16(expected["tok_emb.weight"]))
    return upstream_container(w, dtypes), {**expected, "tok_emb.weight": bf16(expected["tok_emb.weight"])}


# ---- round trips through our formats ------------------------------------------------------------------

@pytest.mark.parametrize("mid", ["npz", pytest.param("pt", marks=needs_torch), pytest.param("pth", marks=needs_torch)])
@pytest.mark.parametrize("spec", [TINY, LOOPED], ids=["flat", "looped"])
def test_round_trip_is_byte_identical(tmp_path, spec, mid):
    w = random_weights(spec)
    save_weights(tmp_path / "a.safetensors", spec, w)
    assert cli(tmp_path / "a.safetensors", tmp_path / f"b.{mid}") == 0
    mid_read = read_weights_file(tmp_path / f"b.{mid}")
    assert mid_read.spec == spec and set(mid_read.weights) == set(w)
    assert cli(tmp_path / f"b.{mid}", tmp_path / "c.safetensors") == 0
    assert safetensors_parts(tmp_path / "a.safetensors") == safetensors_parts(tmp_path / "c.safetensors")
    spec2, w2 = load_weights(tmp_path / "c.safetensors")
    np.testing.assert_array_equal(logits(spec, w), logits(spec2, w2))


@needs_torch
def test_bf16_rounding_matches_torch():
    x = (np.random.default_rng(0).standard_normal(100_000) * np.logspace(-30, 30, 100_000)).astype(np.float32)
    np.testing.assert_array_equal(bf16(x), torch.from_numpy(x).bfloat16().float().numpy())


def test_artifact_to_safetensors_is_its_dequantization(tmp_path):
    w = random_weights(QUANT, 1)
    write_artifact(tmp_path / "m.art", QUANT.to_dict(), w)
    convert(tmp_path / "m.art", tmp_path / "m.safetensors")
    spec_json, deq, _ = read_artifact(tmp_path / "m.art")
    spec, got = load_weights(tmp_path / "m.safetensors")
    assert spec == QUANT and spec.to_dict() == spec_json
    for k in deq:
        np.testing.assert_array_equal(got[k], deq[k])
    # Writing an artifact quantizes exactly as the trainer does: the same bytes.
    convert(tmp_path / "m.safetensors", tmp_path / "again.art")
    write_artifact(tmp_path / "direct.art", QUANT.to_dict(), got)
    assert (tmp_path / "again.art").read_bytes() == (tmp_path / "direct.art").read_bytes()


# ---- upstream inputs ----------------------------------------------------------------------------------

@needs_torch
@pytest.mark.parametrize("tied", [True, False])
def test_upstream_torch_state_dict(tmp_path, tied):
    spec = dataclasses.replace(TINY, tie_embeddings=tied)
    w = random_weights(spec, 2)
    sd = upstream_state_dict(w, prefix="" if tied else "_orig_mod.")  # as torch.compile's wrapper names them
    if not tied:
        sd["_orig_mod.blocks.0.attn.rotary.inv_freq"] = torch.ones(4)  # a variant that saves the buffer
    torch.save(sd, tmp_path / "final_model.pt")
    r = convert(tmp_path / "final_model.pt", tmp_path / "m.safetensors")
    assert r.spec == spec and "inferred" in r.spec_how and any("inv_freq" in n for n in r.notes) != tied
    got_spec, got = load_weights(tmp_path / "m.safetensors")
    expected = {**w, "tok_emb.weight": bf16(w["tok_emb.weight"])}
    assert set(got) == set(expected)
    for k in w:
        np.testing.assert_array_equal(got[k], expected[k])
    np.testing.assert_array_equal(logits(got_spec, got), logits(spec, expected))


def mlx_rope_logits(spec, weights, monkeypatch):
    """Logits of the model as train_gpt_mlx.py runs it: nn.RoPE turns by +angle (mx.fast.rope scale +1),
    where loopgolf, like train_gpt.py, turns by -angle."""
    import backend_mlx.model as model

    with monkeypatch.context() as m:
        m.setattr(model, "rotary", lambda x, s: mx.fast.rope(x, s.head_dim, traditional=False, base=s.rope_base,
                                                               scale=1.0, offset=0))
        return logits(spec, weights)


@needs_mlx
def test_upstream_mlx_npz_with_bf16(tmp_path, monkeypatch):
    w = random_weights(TINY, 4)
    flat = {k: mx.array(v).astype(mx.bfloat16 if k == "tok_emb.weight" else mx.float32) for k, v in w.items()}
    mx.savez(str(tmp_path / "run_mlx_model.npz"), **flat)
    r = convert(tmp_path / "run_mlx_model.npz", tmp_path / "m.safetensors")
    spec, got = load_weights(tmp_path / "m.safetensors")
    assert spec == dataclasses.replace(TINY, norm_eps=MLX_NORM_EPS) and any("RoPE" in n for n in r.notes)
    as_saved = {k: np.array(v.astype(mx.float32)) for k, v in flat.items()}
    np.testing.assert_array_equal(as_saved["tok_emb.weight"], bf16(w["tok_emb.weight"]))
    expected = flip_rope_halves(as_saved, TINY)
    for k in w:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
    q = got["blocks.1.attn.c_q.weight"].reshape(4, 8, 32)  # 4 heads of 8 dims: rows 4..7 of each negated
    np.testing.assert_array_equal(q[:, :4], as_saved["blocks.1.attn.c_q.weight"].reshape(4, 8, 32)[:, :4])
    np.testing.assert_array_equal(q[:, 4:], -as_saved["blocks.1.attn.c_q.weight"].reshape(4, 8, 32)[:, 4:])
    # The converted model computes what the MLX script computed with the weights it saved.
    np.testing.assert_array_equal(logits(spec, got), mlx_rope_logits(spec, as_saved, monkeypatch))
    assert np.abs(logits(spec, as_saved) - logits(spec, got)).max() > 1e-3  # without the flip it differs
    convert(tmp_path / "run_mlx_model.npz", tmp_path / "t.safetensors", upstream="torch")
    spec_t, got_t = load_weights(tmp_path / "t.safetensors")
    assert spec_t == TINY and all(np.array_equal(got_t[k], as_saved[k]) for k in w)


@pytest.mark.parametrize("writer", [pytest.param(torch_ptz_bytes, marks=needs_torch), mlx_ptz_bytes],
                         ids=["torch", "mlx-pickle"])
def test_upstream_int8_artifact(tmp_path, quant_case, writer):
    container, expected = quant_case
    assert {"tok_emb.weight", "blocks.0.mlp.fc.weight"} <= set(container["quantized"])
    assert "blocks.0.attn.c_q.weight" in container["passthrough"]
    (tmp_path / "final_model.int8.ptz").write_bytes(writer(container))
    r = convert(tmp_path / "final_model.int8.ptz", tmp_path / "m.safetensors")
    if writer is mlx_ptz_bytes:  # train_gpt_mlx.py's conventions (see test_upstream_mlx_npz_with_bf16)
        expected = flip_rope_halves(expected, QUANT)
    assert r.spec == dataclasses.replace(QUANT, norm_eps=MLX_NORM_EPS if writer is mlx_ptz_bytes else QUANT.norm_eps)
    got = load_weights(tmp_path / "m.safetensors")[1]
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k], err_msg=k)


def test_per_tensor_scales_dequantize_as_upstream():
    w = {"x.weight": np.random.default_rng(5).standard_normal((3, 150, 150)).astype(np.float32)}
    container = upstream_container(w, {"x.weight": "float32"})
    assert container["scales"]["x.weight"].shape == () and not container["qmeta"]
    expected = dequantize_weights(quantize_weights(w))["x.weight"]
    for raw in (mlx_ptz_bytes(container), pickle.dumps(container, protocol=2)):
        obj = load_pickle(zlib.decompress(raw) if raw[:1] == b"\x78" else raw, "x")
        np.testing.assert_array_equal(dequantize_upstream(obj, "x")["x.weight"], expected)


# ---- the spec of an upstream file ---------------------------------------------------------------------

def test_looped_upstream_needs_a_plan(tmp_path):
    from safetensors.numpy import save_file

    w = random_weights(LOOPED)
    save_file(w, str(tmp_path / "ut.safetensors"))  # no loopgolf metadata: upstream-like, spec inferred
    with pytest.raises(UserError, match="skip_weights has 2 rows, i.e. 4 or 5 effective layers"):
        convert(tmp_path / "ut.safetensors", tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()
    for flags in (["--layer-plan", "2x2"], ["--num-layers", "4"], ["--layer-plan", "0 1 0 1"]):
        assert cli(tmp_path / "ut.safetensors", tmp_path / "m.npz", *flags) == 0
        assert read_weights_file(tmp_path / "m.npz").spec == LOOPED
    save_weights(tmp_path / "ref.safetensors", LOOPED, w)
    (tmp_path / "ut.toml").write_text('[model]\nvocab_size = 64\nmodel_dim = 32\nnum_heads = 4\nnum_kv_heads = 2\n'
                                      'depth = "2x2"\n')
    for ref in ("ref.safetensors", "ut.toml"):
        assert cli(tmp_path / "ut.safetensors", tmp_path / "m.npz", "--spec-from", tmp_path / ref) == 0
        assert read_weights_file(tmp_path / "m.npz").spec == LOOPED
    assert cli(tmp_path / "ut.safetensors", tmp_path / "m.npz", "--num-layers", "4", "--set", "model.rope_base=500") == 0
    assert read_weights_file(tmp_path / "m.npz").spec.rope_base == 500.0
    r = convert(tmp_path / "ref.safetensors", tmp_path / "m.npz", overrides={"layer_plan": "0 1 1 0"})
    assert "the file's own spec differs in layer_plan" in r.spec_how


def test_unknown_tensors_are_named(tmp_path):
    from safetensors.numpy import save_file

    save_file({**random_weights(TINY), "bigram.table": np.zeros((4, 4), np.float32)}, str(tmp_path / "variant.safetensors"))
    with pytest.raises(UserError, match="variant.safetensors: tensors loopgolf has no place for: bigram.table"):
        convert(tmp_path / "variant.safetensors", tmp_path / "m.npz")


# ---- refusals -----------------------------------------------------------------------------------------

def evil_pickle(module: str, name: str, arg: str) -> bytes:
    """Protocol 2 by hand: GLOBAL module.name, one string argument, REDUCE (a call), STOP."""
    a = arg.encode()
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(a)) + a + b"\x85R."


@pytest.mark.parametrize("target", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                    ("numpy", "load"), ("subprocess", "getoutput")])
def test_ptz_pickle_naming_other_globals_is_refused(tmp_path, target):
    marker = tmp_path / "pwned"
    arg = f"open({str(marker)!r}, 'w')" if target[1] == "eval" else f"touch {marker}"
    (tmp_path / "evil.ptz").write_bytes(zlib.compress(evil_pickle(*target, arg)))
    with pytest.raises(UserError, match=rf"evil.ptz: unpickling refuses global {'.'.join(target)}: upstream"):
        convert(tmp_path / "evil.ptz", tmp_path / "m.safetensors")
    assert not marker.exists()


def test_the_evil_payload_is_live_under_plain_pickle(tmp_path):
    """So the refusal above means something: plain pickle runs it."""
    marker = tmp_path / "ran"
    pickle.loads(evil_pickle("os", "system", f"touch {marker}"))
    assert marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@needs_torch
def test_pt_with_objects_is_refused_by_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"tok_emb.weight": torch.ones(2), "x": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match=r"evil.pt: torch.load\(weights_only=True\) refused it"):
        convert(tmp_path / "evil.pt", tmp_path / "m.safetensors")
    assert not marker.exists()
    buf = io.BytesIO()
    torch.save({"quantized": {"x": _Evil(marker)}}, buf)  # the same inside a torch-style .ptz
    (tmp_path / "evil.ptz").write_bytes(zlib.compress(buf.getvalue()))
    with pytest.raises(UserError, match=r"evil.ptz: torch.load\(weights_only=True\) refused it"):
        convert(tmp_path / "evil.ptz", tmp_path / "m.safetensors")
    assert not marker.exists()
    torch.save({"tok_emb.weight": torch.ones(2), "step": 3}, tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"ckpt.pt: expected a flat state_dict of tensors; not tensors: 'step'"):
        convert(tmp_path / "ckpt.pt", tmp_path / "m.safetensors")


def test_mutated_pickles_give_user_errors_only(quant_case):
    """Random byte damage to an upstream MLX pickle: every outcome is a clean load or one UserError."""
    raw = pickle.dumps(upstream_container(random_weights(TINY, 1), collections.defaultdict(lambda: "float32")),
                       protocol=pickle.HIGHEST_PROTOCOL)
    rng = np.random.default_rng(11)
    for _ in range(300):
        b = bytearray(raw)
        for pos in rng.integers(0, len(b), rng.integers(1, 4)):
            b[pos] = rng.integers(0, 256)
        try:
            dequantize_upstream(load_pickle(bytes(b), "f"), "f")
        except UserError:
            pass
    huge = b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"x."  # BYTEARRAY8 of a terabyte
    with pytest.raises(UserError, match="not a readable pickle"):
        load_pickle(huge, "f")


def test_npz_with_object_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "obj.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(UserError, match=r"obj.npz: holds pickled objects .* never unpickled"):
        convert(tmp_path / "obj.npz", tmp_path / "m.safetensors")


@pytest.fixture(scope="module")
def valid_files(tmp_path_factory, quant_case):
    d = tmp_path_factory.mktemp("valid")
    w = random_weights(TINY)
    for name in ("m.safetensors", "m.npz", "m.art") + (("m.pt",) if torch else ()):
        write_weights_file(d / name, TINY, w)
    if torch:
        (d / "torch.ptz").write_bytes(torch_ptz_bytes(quant_case[0]))
    (d / "mlx.ptz").write_bytes(mlx_ptz_bytes(quant_case[0]))
    (d / "pickle-cut.ptz").write_bytes(zlib.compress(zlib.decompress(mlx_ptz_bytes(quant_case[0]))[:5000]))
    return d


@pytest.mark.parametrize("name", ["m.safetensors", "m.npz", pytest.param("m.pt", marks=needs_torch), "m.art",
                                  pytest.param("torch.ptz", marks=needs_torch), "mlx.ptz"])
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_files_give_one_line_naming_the_file(tmp_path, valid_files, name, damage):
    data = (valid_files / name).read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"",
           "garbage": np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()}[damage]
    (tmp_path / name).write_bytes(bad)
    with pytest.raises(UserError) as e:
        convert(tmp_path / name, tmp_path / "out.safetensors")
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_names_and_paths(tmp_path, valid_files):
    with pytest.raises(UserError, match="pickle-cut.ptz: not a readable pickle"):  # good zlib, cut pickle
        convert(valid_files / "pickle-cut.ptz", tmp_path / "out.safetensors")
    (tmp_path / "weights.bin").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match=r"weights.bin: unknown weight format .*known: loopgolf safetensors"):
        convert(tmp_path / "weights.bin", tmp_path / "m.safetensors")
    with pytest.raises(UserError, match=r"m.ptz: cannot tell which format to write .*\.safetensors, \.npz"):
        convert(valid_files / "m.npz", tmp_path / "m.ptz")
    with pytest.raises(UserError, match="would overwrite the input"):
        convert(valid_files / "m.npz", valid_files / "m.npz")
    with pytest.raises(UserError, match="missing.pt: file not found"):
        convert(tmp_path / "missing.pt", tmp_path / "m.safetensors")
    for name in ("m.npz", "m.art", "m.safetensors", "mlx.ptz") + (("m.pt",) if torch else ()):
        (tmp_path / "renamed").write_bytes((valid_files / name).read_bytes())  # told apart by its bytes
        assert read_weights_file(tmp_path / "renamed").fmt == name.split(".")[1]


def test_cli_usage(capsys, valid_files, tmp_path):
    sub = argparse.ArgumentParser(prog="loopgolf").add_subparsers(dest="command")
    usage = add_parser(sub).format_help()
    assert "loopgolf convert [-h] [--spec-from CONFIG_OR_WEIGHTS]" in usage and "upstream int8+zlib" in usage
    assert cli(valid_files / "mlx.ptz", tmp_path / "m.safetensors") == 0
    out = capsys.readouterr().out
    assert "from a numpy pickle (train_gpt_mlx.py), dequantized" in out and "spec inferred from the tensor shapes" in out
    assert "negated the second half of each q/k head's rows" in out


@needs_torch  # to write the files
def test_torch_files_without_torch_say_so(tmp_path, valid_files, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch", None)  # `import torch` now raises ImportError
    for name in ("m.pt", "torch.ptz"):
        with pytest.raises(UserError, match=f"{name}: reading or writing torch files needs PyTorch"):
            convert(valid_files / name, tmp_path / "m.safetensors")
    convert(valid_files / "mlx.ptz", tmp_path / "m.safetensors")  # the MLX artifact needs no torch
