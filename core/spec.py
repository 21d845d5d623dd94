"""ModelSpec: the backend-neutral description of a looped transformer.

Depth is explicit: `num_blocks` unique blocks and a `layer_plan`, the block index run at each effective
layer. Upstream's flat 9-layer baseline is the plan 0..8; a Universal Transformer of 3 blocks looped 4
times is `layer_plan = "3x4"`. Every numeric choice the two frameworks could make differently (norm
epsilon, softcap, RoPE base) is a field here, so both backends compute the same function.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

from core.errors import UserError
from core.tables import check_known_keys, coerce

# torch's F.rms_norm default for float32 (eps=None -> finfo(float32).eps), which upstream train_gpt.py uses.
FLOAT32_EPS = 1.1920928955078125e-07
MAX_VOCAB = 65536  # shards store token ids as uint16


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    vocab_size: int = 1024
    model_dim: int = 512
    num_heads: int = 8
    num_kv_heads: int = 4
    mlp_mult: int = 2
    num_layers: int = 9  # effective layers: len(layer_plan)
    num_blocks: int = 9  # unique blocks
    layer_plan: tuple[int, ...] = tuple(range(9))
    tie_embeddings: bool = True
    tied_embed_init_std: float = 0.005
    rope_base: float = 10000.0
    logit_softcap: float = 30.0
    qk_gain_init: float = 1.5
    norm_eps: float = FLOAT32_EPS

    def __post_init__(self):
        object.__setattr__(self, "layer_plan", tuple(int(i) for i in self.layer_plan))
        for name in ("vocab_size", "model_dim", "num_heads", "num_kv_heads", "mlp_mult", "num_layers", "num_blocks"):
            if getattr(self, name) < 1:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected a positive integer")
        for name in ("tied_embed_init_std", "rope_base", "logit_softcap", "norm_eps"):
            if not getattr(self, name) > 0:
                raise UserError(f"model.{name} = {getattr(self, name)}: expected a positive number")
        if self.vocab_size > MAX_VOCAB:
            raise UserError(f"model.vocab_size = {self.vocab_size}: at most {MAX_VOCAB} (shards store uint16 ids)")
        if self.model_dim % self.num_heads:
            raise UserError(
                f"model.model_dim = {self.model_dim} is not divisible by model.num_heads = {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads = {self.num_heads} is not divisible by model.num_kv_heads = {self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise UserError(
                f"head_dim = model_dim/num_heads = {self.head_dim} is odd; RoPE needs an even head_dim"
            )
        if len(self.layer_plan) != self.num_layers:
            raise UserError(
                f"model.layer_plan has {len(self.layer_plan)} layers but model.num_layers = {self.num_layers}"
            )
        for layer, block in enumerate(self.layer_plan):
            if not 0 <= block < self.num_blocks:
                raise UserError(
                    f"model.layer_plan[{layer}] = {block} is out of range for model.num_blocks = {self.num_blocks}"
                    f" (expected 0..{self.num_blocks - 1})"
                )
        unused = sorted(set(range(self.num_blocks)) - set(self.layer_plan))
        if unused:
            raise UserError(f"model.layer_plan never uses block(s) {unused}: they would never train")

    # Derived shapes, named once so both backends agree.
    @property
    def head_dim(self) -> int:
        return self.model_dim // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return self.mlp_mult * self.model_dim

    @property
    def num_encoder_layers(self) -> int:
        """U-Net: the first L//2 effective layers push skips, the rest pop them."""
        return self.num_layers // 2

    @property
    def num_skip_weights(self) -> int:
        return min(self.num_encoder_layers, self.num_layers - self.num_encoder_layers)

    # Serialisation.
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layer_plan"] = list(self.layer_plan)
        return d

    def to_json(self) -> str:
        """Canonical form: sorted keys, no whitespace. Stored in weight files and artifacts."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, source: str = "spec") -> "ModelSpec":
        try:
            table = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{source}: the model spec is not valid JSON ({e.msg})") from None
        return cls.from_table(table, where="model")

    @classmethod
    def from_table(cls, table: dict, where: str = "model") -> "ModelSpec":
        """Build from a TOML/JSON `[model]` table, expanding the depth shorthands."""
        if not isinstance(table, dict):
            raise UserError(f"'{where}' must be a table")
        table = dict(table)
        known = [f.name for f in dataclasses.fields(cls)] + ["depth"]
        check_known_keys(table, known, where)
        if "depth" in table:
            if "layer_plan" in table:
                raise UserError(f"give either {where}.depth or {where}.layer_plan, not both")
            table["layer_plan"] = table.pop("depth")
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == "layer_plan":
                continue
            annotation = {"int": int, "float": float, "bool": bool}[hints[key]]
            values[key] = coerce(value, annotation, f"{where}.{key}")
        if "layer_plan" in table:
            plan, blocks = parse_layer_plan(table["layer_plan"], values.get("num_layers"), f"{where}.layer_plan")
            values["layer_plan"] = plan
            values.setdefault("num_blocks", blocks)
            values.setdefault("num_layers", len(plan))
        elif "num_layers" in values or "num_blocks" in values:
            # Flat model: one block per layer, as upstream's NUM_LAYERS.
            n = values.get("num_layers", values.get("num_blocks"))
            values.setdefault("num_layers", n)
            values.setdefault("num_blocks", n)
            values["layer_plan"] = tuple(range(values["num_blocks"]))[: values["num_layers"]]
        return cls(**values)

    @classmethod
    def from_toml(cls, path: str | Path) -> "ModelSpec":
        from core.config import read_toml

        return cls.from_table(read_toml(path).get("model", {}), where="model")

    def describe(self) -> str:
        plan = " ".join(str(b) for b in self.layer_plan)
        return (
            f"{self.num_blocks} unique block(s) over {self.num_layers} effective layers [{plan}], "
            f"d={self.model_dim}, heads {self.num_heads}/{self.num_kv_heads} kv, mlp {self.mlp_mult}x, vocab {self.vocab_size}"
        )


_CYCLE = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*$")


def parse_layer_plan(value: Any, num_layers: int | None, key: str) -> tuple[tuple[int, ...], int]:
    """Expand a plan and return (plan, num_blocks implied by it).

    Accepted: a list of block indices; a string of them ("0 1 2 3 4 5 4 5 6 7 8"); "KxR" for K blocks
    cycled R times (0 1 .. K-1 repeated R times); "flat" for one block per layer (needs num_layers).
    """
    if isinstance(value, str):
        text = value.strip()
        m = _CYCLE.match(text)
        if m:
            k, r = int(m.group(1)), int(m.group(2))
            if k < 1 or r < 1:
                raise UserError(f"{key} = {value!r}: 'KxR' needs K >= 1 blocks and R >= 1 repeats")
            return tuple(list(range(k)) * r), k
        if text == "flat":
            if num_layers is None:
                raise UserError(f"{key} = 'flat' needs model.num_layers")
            return tuple(range(num_layers)), num_layers
        parts = text.replace(",", " ").split()
        if not parts or not all(p.isdigit() for p in parts):
            raise UserError(
                f"{key} = {value!r}: expected 'KxR' (e.g. '3x4'), 'flat', or block indices like '0 1 2 0 1 2'"
            )
        plan = tuple(int(p) for p in parts)
    else:
        plan = coerce(value, list[int], key)
        if not plan:
            raise UserError(f"{key} is empty: expected at least one layer")
        if any(b < 0 for b in plan):
            raise UserError(f"{key} has a negative block index: {list(plan)}")
    return plan, max(plan) + 1
