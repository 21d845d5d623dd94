"""Convert weights between loopgolf's files and upstream's (openai/parameter-golf train_gpt.py and
train_gpt_mlx.py), reading nothing that could execute code.

Formats, by file name (an input with another name, by its first bytes):
  .safetensors  loopgolf weights (core.weights); without the spec metadata, the spec is inferred
  .npz          np.load(allow_pickle=False): upstream MLX's `*_mlx_model.npz` (mx.savez; bfloat16 arrives
                as raw 2-byte '|V2' items) or ours (float32 + the spec as uint8 JSON under NPZ_SPEC_KEY)
  .pt/.pth      torch.load(weights_only=True) only: upstream's `final_model.pt` (bf16 embedding, fp32
                linears) or ours (float32 + the spec string under PT_SPEC_KEY)
  .ptz          upstream's int8 artifact, zlib of torch.save (train_gpt.py) or of a numpy pickle
                (train_gpt_mlx.py, tools.pickle_safe); dequantized; read only
  .art          loopgolf's artifact: dequantized on read, quantized (int8, zlib) on write

Every tensor is float32 on the way out. Upstream files carry no spec: it is inferred from the shapes
(a flat plan), or given. Everything that differs between upstream and loopgolf lives here: names in
`sanitize`; train_gpt_mlx.py's RoPE direction and RMSNorm eps in `flip_rope_halves` and MLX_NORM_EPS; the
seeds' own layouts (#1110, #470, #319, #895 state_dicts, #167's MLX npz) in tools/seed_layouts.py, the one
place their names are mapped.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import zipfile
from pathlib import Path

import numpy as np

from core.atomic import atomic_path, atomic_write_bytes
from core.errors import UserError
from core.params import param_table
from tools import seed_layouts
from tools.pickle_safe import MAX_INFLATED_BYTES, first_line, need_torch, read_upstream_ptz, tensors_to_numpy, torch_load
from core.spec import FLOAT32_EPS, ModelSpec
from core.weights import SPEC_KEY, check_weights, load_weights, save_weights
from core.weights import read_header as read_safetensors_header  # one-line errors for a bad header

NPZ_SPEC_KEY = PT_SPEC_KEY = "__loopgolf_spec__"
FORMATS = {".safetensors": "safetensors", ".npz": "npz", ".pt": "pt", ".pth": "pt", ".ptz": "ptz", ".art": "art"}
DESCRIBE = {
    "safetensors": "loopgolf safetensors (.safetensors)",
    "npz": "numpy npz, upstream MLX or loopgolf (.npz)",
    "pt": "torch state_dict, upstream or loopgolf (.pt/.pth)",
    "ptz": "upstream int8+zlib artifact, torch or MLX (.ptz, read only)",
    "art": "loopgolf artifact (.art)",
}
KNOWN = "; ".join(DESCRIBE.values())
WRITABLE = ("safetensors", "npz", "pt", "art")
# Prefixes a state_dict picks up from its wrappers (DDP: "module.", torch.compile: "_orig_mod.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers, not parameters: upstream registers Rotary's inv_freq non-persistent, but a variant may save it.
BUFFER_SUFFIXES = (".rotary.inv_freq", ".rotary._cos_cached", ".rotary._sin_cached")
# Upstream names that differ from loopgolf's. Today none do: the baseline tensors share their names.
UPSTREAM_TO_LOOPGOLF: dict[str, str] = {}
# train_gpt_mlx.py's rms_norm default eps; train_gpt.py (and loopgolf's default) use float32's eps.
MLX_NORM_EPS = 1e-6


@dataclasses.dataclass
class Loaded:
    weights: dict[str, np.ndarray]  # loopgolf names, float32
    spec: ModelSpec | None  # the spec the file carries, if any
    fmt: str
    notes: list[str] = dataclasses.field(default_factory=list)
    convention: str | None = None  # an upstream file's script: "torch" (train_gpt.py) or "mlx"; None: ours


def sanitize(names, notes: list[str] | None = None) -> dict[str, str | None]:
    """Map upstream names to loopgolf's: {source name: loopgolf name, or None to drop it}."""
    out: dict[str, str | None] = {}
    for name in names:
        new = name
        while new.startswith(WRAPPER_PREFIXES):
            new = new.split(".", 1)[1]
        new = UPSTREAM_TO_LOOPGOLF.get(new, new)
        out[name] = None if new.endswith(BUFFER_SUFFIXES) else new
        if out[name] is None and notes is not None:
            notes.append(f"dropped buffer {name}")
    return out


def _renamed(tensors: dict[str, np.ndarray], source: str, notes: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for old, new in sanitize(tensors, notes).items():
        if new in out:
            raise UserError(f"{source}: two tensors map to the name {new!r} (one is {old!r})")
        if new is not None:
            out[new] = tensors[old].astype(np.float32) if tensors[old].dtype.kind == "f" else tensors[old]
    return out


# ---- format detection ----------------------------------------------------------------------------------

def output_format(path: str | os.PathLike) -> str:
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt not in WRITABLE:
        raise UserError(f"{path}: cannot tell which format to write from the name; use one of "
                        f"{', '.join(s for s, f in FORMATS.items() if f in WRITABLE)} ({KNOWN})")
    return fmt


def input_format(path: str | os.PathLike) -> str:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt:
        return fmt
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"LOOPGOLF-ARTIFACT"):
        return "art"
    if head.startswith(b"PK\x03\x04") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:  # torch.save's zip holds <name>/data.pkl, an npz only .npy files
            return "pt" if any(n.endswith("data.pkl") for n in z.namelist()) else "npz"
    if head[:1] == b"\x78" and int.from_bytes(head[:2], "big") % 31 == 0:
        return "ptz"
    if len(head) > 9 and head[8:9] == b"{":
        return "safetensors"
    raise UserError(f"{path}: unknown weight format (from its name and first bytes); known: {KNOWN}")


# ---- readers --------------------------------------------------------------------------------------------

def _spec_json(text, source: str) -> ModelSpec:
    if isinstance(text, np.ndarray):
        text = text.tobytes().decode("utf-8", errors="replace")
    if not isinstance(text, str):
        raise UserError(f"{source}: '{PT_SPEC_KEY}' should hold the spec as JSON text")
    return ModelSpec.from_json(text, source=source)


def _read_safetensors(path: Path) -> Loaded:
    metadata = read_safetensors_header(path).get("__metadata__")
    if isinstance(metadata, dict) and SPEC_KEY in metadata:
        spec, weights = load_weights(path)
        return Loaded(weights, spec, "safetensors")
    from safetensors.numpy import load

    try:
        tensors = load(path.read_bytes())
    except Exception as e:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
    notes = ["no loopgolf spec in the metadata"]
    return Loaded(_renamed(tensors, str(path), notes), None, "safetensors", notes, "torch")


def _bf16_bits_to_f32(arr: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(arr).view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _read_npz(path: Path) -> Loaded:
    tensors: dict[str, np.ndarray] = {}
    notes: list[str] = []
    spec = None
    try:
        with np.load(path, allow_pickle=False) as f:
            if sum(i.file_size for i in f.zip.infolist()) > MAX_INFLATED_BYTES:
                raise UserError(f"{path}: the archive inflates to more than {MAX_INFLATED_BYTES:,} bytes")
            for key in f.files:
                arr = f[key]
                if key == NPZ_SPEC_KEY:
                    spec = _spec_json(arr, str(path))
                elif arr.dtype == np.dtype("V2"):  # mx.savez writes bfloat16 as raw 2-byte void items
                    tensors[key] = _bf16_bits_to_f32(arr)
                    notes.append(f"{key}: bfloat16 -> float32")
                elif arr.dtype.kind in "biuf":
                    tensors[key] = arr
                else:
                    raise UserError(f"{path}: array {key!r} has dtype {arr.dtype}, expected numbers")
    except UserError:
        raise
    except Exception as e:  # BadZipFile, truncated members, bad .npy headers, object arrays, ...
        if isinstance(e, ValueError) and "pickle" in str(e):
            raise UserError(f"{path}: holds pickled objects (or is not an .npz); only numeric arrays are read, "
                            "never unpickled") from None
        raise UserError(f"{path}: not a readable .npz of numeric arrays ({first_line(e)})") from None
    return Loaded(_renamed(tensors, str(path), notes), spec, "npz", notes, None if spec else "mlx")


def _read_pt(path: Path) -> Loaded:
    torch = need_torch(path)
    obj = torch_load(torch, path, str(path))
    if not isinstance(obj, dict):
        raise UserError(f"{path}: holds a {type(obj).__name__}, expected a state_dict (a dict of tensors)")
    spec = _spec_json(obj.pop(PT_SPEC_KEY), str(path)) if PT_SPEC_KEY in obj else None
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: expected a flat state_dict of tensors; not tensors: {', '.join(bad[:5])}")
    notes = [f"{k}: {str(v.dtype).removeprefix('torch.')} -> float32" for k, v in obj.items()
             if v.is_floating_point() and v.dtype != torch.float32]
    return Loaded(_renamed(tensors_to_numpy(torch, obj), str(path), notes), spec, "pt", notes, None if spec else "torch")


def _read_ptz(path: Path) -> Loaded:
    weights, kind = read_upstream_ptz(path)
    notes = [f"int8 container from {kind}, dequantized as upstream loads it, to float32"]
    return Loaded(_renamed(weights, str(path), notes), None, "ptz", notes, "mlx" if "mlx" in kind else "torch")


def _read_art(path: Path) -> Loaded:
    from core.artifact import read_artifact

    spec_json, weights, info = read_artifact(path)
    spec = ModelSpec.from_table(spec_json, where=f"{path} spec")
    return Loaded(weights, spec, "art", [f"loopgolf artifact ({info.scheme}, {info.codec_label}), dequantized"])


READERS = {"safetensors": _read_safetensors, "npz": _read_npz, "pt": _read_pt, "ptz": _read_ptz, "art": _read_art}


def read_weights_file(path: str | os.PathLike) -> Loaded:
    """Any supported file -> float32 tensors under loopgolf's names (+ the spec it carries, if any)."""
    path = Path(path)
    return READERS[input_format(path)](path)


# ---- the spec -------------------------------------------------------------------------------------------

def infer_spec(weights: dict[str, np.ndarray], source: str, norm_eps: float = FLOAT32_EPS,
               layout_table: dict | None = None) -> ModelSpec:
    """A flat spec from upstream tensor shapes: vocab and width from tok_emb, blocks from the indices,
    heads from q_gain, kv heads from c_k, mlp_mult from fc, untied when lm_head is present; a seed layout's
    plan and options (`layout_table`, tools.seed_layouts.spec_table) on top."""
    def shape(name: str, ndim: int) -> tuple[int, ...]:
        if name not in weights:
            raise UserError(f"{source}: no tensor {name!r}, so the spec cannot be inferred; give --spec-from")
        if weights[name].ndim != ndim:
            raise UserError(f"{source}: {name} has shape {list(weights[name].shape)}, expected {ndim}-D")
        return tuple(weights[name].shape)

    vocab, dim = shape("tok_emb.weight", 2)
    blocks = sorted({int(n.split(".")[1]) for n in weights if n.startswith("blocks.") and n.split(".")[1].isdigit()})
    if not blocks or blocks != list(range(len(blocks))):
        raise UserError(f"{source}: block indices {blocks} should be 0..N-1")
    (heads,) = shape("blocks.0.attn.q_gain", 1)
    if not heads or dim % heads:
        raise UserError(f"{source}: q_gain has {heads} heads, which do not divide model_dim {dim}")
    kv_rows, hidden = shape("blocks.0.attn.c_k.weight", 2)[0], shape("blocks.0.mlp.fc.weight", 2)[0]
    if kv_rows % (dim // heads):
        raise UserError(f"{source}: c_k has {kv_rows} rows: expected a multiple of head_dim {dim // heads}")
    table = {"norm_eps": norm_eps, "vocab_size": vocab, "model_dim": dim, "num_heads": heads, "num_kv_heads": kv_rows // (dim // heads),
             **({"mlp_mult": hidden // dim} if hidden % dim == 0 else {"mlp_hidden": hidden}), "num_blocks": len(blocks), "layer_plan": list(range(len(blocks))),
             "tie_embeddings": "lm_head.weight" not in weights, **(layout_table or {})}
    return ModelSpec.from_table(table, where=f"{source} (inferred)")


def apply_overrides(spec: ModelSpec, overrides: dict) -> ModelSpec:
    """Model keys over `spec`. A new layer_plan (or depth) keeps num_blocks, the file's fact; num_layers
    alone means that many effective layers cycling the blocks (block i % num_blocks at layer i)."""
    if not overrides:
        return spec
    table = spec.to_dict()
    plan = {k: overrides[k] for k in ("layer_plan", "depth") if k in overrides}
    if plan or "num_layers" in overrides:
        table.pop("num_layers")
        table.pop("layer_plan")
    if not plan and "num_layers" in overrides:
        n, blocks = overrides["num_layers"], overrides.get("num_blocks", spec.num_blocks)
        if isinstance(n, int) and isinstance(blocks, int) and n > 0 and blocks > 0:
            table["layer_plan"] = [i % blocks for i in range(n)]
    table.update(overrides)
    return ModelSpec.from_table(table, where="model")


def _naming(source, fn, *args):
    """fn(*args), with any UserError it raises naming `source`."""
    try:
        return fn(*args)
    except UserError as e:
        raise UserError(str(e) if str(source) in str(e) else f"{source}: {e}") from None


def spec_from_file(path: str | os.PathLike) -> ModelSpec:
    """--spec-from: a run config TOML ([model] table) or any weight file that carries a spec."""
    if Path(path).suffix.lower() == ".toml":
        return _naming(path, ModelSpec.from_toml, path)
    loaded = read_weights_file(path)
    if loaded.spec is None:
        raise UserError(f"{path}: carries no loopgolf spec; --spec-from takes a config TOML or a loopgolf weight file")
    return loaded.spec


def resolve_spec(loaded: Loaded, source: str, given: ModelSpec | None = None, given_from: str = "",
                 overrides: dict | None = None) -> tuple[ModelSpec, str]:
    """(spec, how it was found). An explicit spec or override wins over the file's, with a note. A seed's own
    layout (tools.seed_layouts) implies its plan and options, and its tensors are mapped to loopgolf's names
    for the spec found (loaded.weights is replaced)."""
    layout = seed_layouts.detect(loaded.weights) if loaded.spec is None else None
    if given is not None:
        spec, how = given, f"from {given_from}"
    elif loaded.spec is not None:
        spec, how = loaded.spec, f"from {source}"
    else:
        eps = MLX_NORM_EPS if loaded.convention == "mlx" else FLOAT32_EPS
        extra = _naming(source, seed_layouts.spec_table, layout, loaded.weights, source) if layout else None
        spec = _naming(source, infer_spec, seed_layouts.block_view(layout, loaded.weights), source, eps, extra)
        how = f"inferred from the tensor shapes{f' of a {layout.name}' if layout else ''}"
    if overrides:
        spec = _naming("--layer-plan/--num-layers/--set", apply_overrides, spec, overrides)
        how = f"{how}, with {', '.join(sorted(overrides))} set"
    if loaded.spec is not None and spec != loaded.spec:
        mine, theirs = spec.to_dict(), loaded.spec.to_dict()
        how += f" (the file's own spec differs in {', '.join(k for k in sorted(mine) if mine[k] != theirs[k])})"
    if loaded.convention == "mlx" and spec.norm_eps != MLX_NORM_EPS:
        how += f" (note: train_gpt_mlx.py ran its RMSNorm with eps {MLX_NORM_EPS:g}, this spec has {spec.norm_eps:g})"
    if layout:
        loaded.weights = _naming(source, seed_layouts.to_loopgolf, layout, loaded.weights, spec, loaded.notes)
        loaded.notes.insert(0, f"{layout.name}: mapped to loopgolf's names (tools/seed_layouts.py)")
    unknown = sorted(set(loaded.weights) - {p.name for p in param_table(spec)})
    rows = loaded.weights["skip_weights"].shape[0] if "skip_weights" in loaded.weights else spec.num_skip_weights
    hint = (f"; skip_weights has {rows} rows, i.e. {2 * rows} or {2 * rows + 1} effective layers: give "
            "--layer-plan, --num-layers or --spec-from") if rows != spec.num_skip_weights else ""
    if unknown:
        raise UserError(f"{source}: tensors loopgolf has no place for: {', '.join(unknown[:8])}"
                        f"{' ...' if len(unknown) > 8 else ''} (an upstream variant with other modules?){hint}")
    try:
        check_weights(spec, loaded.weights, source)
    except UserError as e:
        raise UserError(f"{e}{hint}") from None
    return spec, how


def flip_rope_halves(weights: dict[str, np.ndarray], spec: ModelSpec) -> dict[str, np.ndarray]:
    """train_gpt_mlx.py's nn.RoPE turns (x1, x2) by +angle, train_gpt.py (and loopgolf) by -angle. With
    S negating the second half of a head, R(-a) = S R(a) S, and S commutes with the per-head RMSNorm and
    q_gain, so negating the second-half rows of every q and k head in c_q and c_k turns one model into the
    other exactly (its own inverse, so it converts either way). v and everything else are untouched."""
    out = dict(weights)
    for b in range(spec.num_blocks):
        for name, heads in (("c_q", spec.num_heads), ("c_k", spec.num_kv_heads)):
            key = f"blocks.{b}.attn.{name}.weight"
            w = out[key].reshape(heads, spec.head_dim, -1).copy()
            w[:, spec.head_dim // 2:] *= -1
            out[key] = w.reshape(heads * spec.head_dim, -1)
    return out


# ---- writers and the conversion -------------------------------------------------------------------------

def write_weights_file(path: str | os.PathLike, spec: ModelSpec, weights: dict[str, np.ndarray]) -> str:
    """Write `weights` in the format `path` names, atomically. Returns the format."""
    fmt = output_format(path)
    check_weights(spec, weights, str(path))
    arrays = {k: np.ascontiguousarray(weights[k], dtype=np.float32) for k in sorted(weights)}
    if fmt == "safetensors":
        save_weights(path, spec, arrays)
    elif fmt == "npz":
        arrays[NPZ_SPEC_KEY] = np.frombuffer(spec.to_json().encode("utf-8"), dtype=np.uint8)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    elif fmt == "pt":
        torch = need_torch(path)
        buf = io.BytesIO()
        torch.save({**{k: torch.from_numpy(v.copy()) for k, v in arrays.items()}, PT_SPEC_KEY: spec.to_json()}, buf)
        atomic_write_bytes(path, buf.getvalue())
    else:
        from core.artifact import write_artifact

        write_artifact(path, spec.to_dict(), arrays)
    return fmt


ConvertResult = collections.namedtuple("ConvertResult", "src_format dst_format spec spec_how num_tensors out_bytes notes")


def convert(src: str | os.PathLike, dst: str | os.PathLike, spec_from: str | os.PathLike | None = None,
            overrides: dict | None = None, upstream: str = "auto") -> ConvertResult:
    """`upstream`: whose conventions a file without a loopgolf spec follows, "torch" (train_gpt.py) or
    "mlx" (train_gpt_mlx.py, converted by flip_rope_halves); "auto" guesses from the format."""
    if Path(src).resolve() == Path(dst).resolve():
        raise UserError(f"{dst}: the output would overwrite the input; give another name")
    if upstream not in ("auto", "torch", "mlx"):
        raise UserError(f"--upstream {upstream!r}: expected auto, torch or mlx")
    output_format(dst)  # a bad output name fails before any reading
    given = spec_from_file(spec_from) if spec_from else None
    loaded = read_weights_file(src)
    if upstream != "auto":
        if loaded.convention is None:
            raise UserError(f"{src}: carries a loopgolf spec, so it follows loopgolf's conventions; drop --upstream")
        loaded.convention = upstream
    spec, how = resolve_spec(loaded, str(src), given, str(spec_from or ""), overrides)
    if loaded.convention == "mlx":
        loaded.weights = flip_rope_halves(loaded.weights, spec)
        loaded.notes.append("train_gpt_mlx.py conventions: negated the second half of each q/k head's rows "
                            f"(its RoPE turns the other way); its RMSNorm eps is {MLX_NORM_EPS:g}")
    fmt = write_weights_file(dst, spec, loaded.weights)
    return ConvertResult(loaded.fmt, fmt, spec, how, len(loaded.weights), os.path.getsize(dst), loaded.notes)
