"""Run configs: a TOML file with [model], [train], [optim], [data], [artifact], [eval] and [average] tables.

Defaults are upstream train_gpt.py's. `--set section.key=value` overrides any key; `--small` shrinks a
config for a quick check while keeping its topology (plan, options, schedules).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from core.artifact import BYTE_SHUFFLE_STRIDES, CODECS
from core.depth import SCHEDULE_BY, depth_schedule, parse_stages
from core.errors import UserError
from core.gptq import gptq_scheme_qmax
from core.quant import STD_SCHEME, compose_scheme
from core.spec import ModelSpec
from core.tables import dataclass_from_table, read_toml, tomllib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    iterations: int = 20000
    batch_tokens: int = 524288  # tokens per optimizer step, all ranks and micro-batches together
    seq_len: int = 1024
    grad_accum_steps: int = 1  # micro-batches per step on each rank
    val_every: int = 1000  # 0: validate only at the end
    val_batch_tokens: int = 524288
    val_max_tokens: int = 0  # 0: the whole val split; else its first N tokens (quick checks only)
    log_every: int = 200
    warmup_steps: int = 20  # priming steps (compile, allocator), then weights and optimizer are restored
    warmdown_iters: int = 1200
    warmdown_start_step: int = 0  # >0: step-based warmdown from this step (PR #470); else wallclock-based
    # >0: linear warmdown to 0 over this last fraction of the training clock (of train.iterations with no cap),
    # #1394/#1493's WARMDOWN_FRAC (0.667, 0.72); it replaces warmdown_iters' estimate from the average step time.
    warmdown_fraction: float = 0.0
    max_wallclock_seconds: float = 600.0  # 0: no cap
    seed: int = 1337
    compute_dtype: str = "auto"  # "auto" (bf16 on GPU/Metal, fp32 on CPU), "float32", "bfloat16"
    # torch: torch.compile the loss and the optimizer update. "auto": on CUDA only (on a CPU the compile, a
    # minute or more, outweighs a short run's gain per step: docs/benchmarks.md); "on"/"off" force it. MLX
    # always compiles its step.
    compile: str = "auto"
    checkpoint_every: int = 0  # >0: write RUN_DIR/checkpoints/step_N every N steps (0: only on SIGTERM/SIGINT)
    keep_checkpoints: int = 2  # the newest K checkpoints are kept (0: all)
    # Progressive depth (core.depth): "f:r,..." trains r loops of a "KxR" plan while the fraction is below f,
    # e.g. "0.3:2,0.5:3,0.75:4,1.0:5" (#895); a stage may name a plan instead, e.g. "0.5:flat,1.0:full" (the
    # records' loop switch-on); "" trains at full depth throughout.
    depth_schedule: str = ""
    depth_schedule_by: str = "wallclock"  # fraction of max_wallclock_seconds ("wallclock") or of iterations ("step")
    # Seconds of max_wallclock_seconds kept for GPTQ's Hessians (#1394/#1493: 12 of 600): training stops, and
    # wallclock schedules (warmdown, depth) run, on max_wallclock_seconds - gptq_reserve_seconds. No cap: no effect.
    gptq_reserve_seconds: float = 0.0

    @property
    def train_wallclock_seconds(self) -> float:
        """The training clock's cap: max_wallclock_seconds less the GPTQ reserve (0: no cap)."""
        if self.max_wallclock_seconds <= 0:
            return 0.0
        return self.max_wallclock_seconds - self.gptq_reserve_seconds

    def __post_init__(self):
        for key in ("iterations", "batch_tokens", "seq_len", "grad_accum_steps", "val_batch_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} = {getattr(self, key)}: expected a positive integer")
        for key in ("val_every", "val_max_tokens", "log_every", "warmup_steps", "warmdown_iters", "warmdown_start_step",
                    "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} = {getattr(self, key)}: expected 0 or more")
        if not 0 <= self.warmdown_fraction <= 1:
            raise UserError(f"train.warmdown_fraction = {self.warmdown_fraction}: expected 0 (off) or a fraction in (0, 1]")
        if self.warmdown_fraction > 0 and self.warmdown_start_step > 0:
            raise UserError("train.warmdown_fraction and train.warmdown_start_step are both set; choose one warmdown")
        if self.max_wallclock_seconds < 0:
            raise UserError(f"train.max_wallclock_seconds = {self.max_wallclock_seconds}: expected 0 or more")
        if self.gptq_reserve_seconds < 0 or (self.max_wallclock_seconds > 0
                                             and self.gptq_reserve_seconds >= self.max_wallclock_seconds):
            raise UserError(f"train.gptq_reserve_seconds = {self.gptq_reserve_seconds}: expected 0 or more and less "
                            f"than train.max_wallclock_seconds = {self.max_wallclock_seconds:g}")
        if self.compute_dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"train.compute_dtype = {self.compute_dtype!r}: expected 'auto', 'float32' or 'bfloat16'")
        if self.compile not in ("auto", "on", "off"):
            raise UserError(f"train.compile = {self.compile!r}: expected 'auto', 'on' or 'off'")
        if self.depth_schedule_by not in SCHEDULE_BY:
            raise UserError(f"train.depth_schedule_by = {self.depth_schedule_by!r}: expected 'wallclock' or 'step'")
        if self.depth_schedule:
            parse_stages(self.depth_schedule)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    matrix_lr: float = 0.04  # Muon, block matrices
    scalar_lr: float = 0.04  # Adam, block vectors/scalars and skip weights
    tied_embed_lr: float = 0.05
    embed_lr: float = 0.6  # untied embedding
    head_lr: float = 0.008  # untied head
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    muon_momentum: float = 0.95
    muon_momentum_warmup_start: float = 0.85
    muon_momentum_warmup_steps: int = 500
    muon_backend_steps: int = 5
    grad_clip_norm: float = 0.0  # 0: off
    # Decoupled weight decay per optimizer group (0: off), with the group's scheduled lr: p *= 1 - lr * wd
    # before the step (#1110, #895, AdamW), or after it with weight_decay_after_step (#470).
    matrix_weight_decay: float = 0.0  # Muon matrices (#895, #470, #1110: 0.04)
    scalar_weight_decay: float = 0.0  # Adam scalar group (#1110: 0.04)
    embed_weight_decay: float = 0.0  # embedding group: tok_emb and the tables trained with it (#1110: 0.04)
    head_weight_decay: float = 0.0  # untied lm_head
    weight_decay_exempt: list[str] = ()  # fnmatch patterns of parameter names that never decay (#1110: its gains)
    weight_decay_after_step: bool = False  # #470: p = (p - lr * u) * (1 - lr * wd) instead of p * (1 - lr * wd) - lr * u
    # MuonEq-R (#1394/#1493, from #1217): each row of the Nesterov update divided by its L2 norm (at least 1e-7)
    # before Newton-Schulz.
    muon_row_normalize: bool = False

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise UserError(f"optim.{f.name} = {value}: expected 0 or more")
        if not 0 < self.beta1 < 1 or not 0 < self.beta2 < 1:
            raise UserError("optim.beta1 and optim.beta2 must lie strictly between 0 and 1")
        object.__setattr__(self, "weight_decay_exempt", tuple(self.weight_decay_exempt))
        for pattern in self.weight_decay_exempt:
            if not isinstance(pattern, str) or not pattern.strip():
                raise UserError(f"optim.weight_decay_exempt = {list(self.weight_decay_exempt)}: expected parameter "
                                "name patterns (fnmatch), e.g. ['layer_*_gains']")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    path: str = "data"  # a data root holding manifest.json, or a dataset directory of shards
    dataset: str = ""  # the manifest's dataset name; "" picks the only one
    tokenizer: str = ""  # "" takes it from the manifest
    # Training order: "sequential" (upstream's stream: shards in order, every rank slicing one chunk) or
    # "shuffled" (#1394/#1493's loader, core.shards.ShuffledStream: each rank its own shards, random phase and
    # window order per shard, shards drawn by the windows they have left; seeded by train.seed).
    order: str = "sequential"

    def __post_init__(self):
        if self.order not in ("sequential", "shuffled"):
            raise UserError(f"data.order = {self.order!r}: expected 'sequential' or 'shuffled'")


@dataclasses.dataclass(frozen=True)
class ArtifactConfig:
    """[artifact]: how the final weights are quantized and compressed (core/quant.py, core/artifact.py).

    scheme: the default quantization scheme: "int8" (upstream's rule, exactly), "int4".."int7" and
        "int8_search" (per-row intN with #895's clip-percentile search), "fp16" (no quantization).
    rules: ordered "PATTERN=SCHEME" strings; a tensor takes the scheme of the first fnmatch pattern that
        matches its full name, else `scheme`. E.g. attention int7, MLP int5, the embedding upstream int8:
            rules = ["*.attn.*=int7", "*.mlp.*=int5", "tok_emb.weight=int8"]
        (or "tok_emb.weight=fp16" to keep it in fp16). Scalars and tensors of 65,536 elements or fewer
        pass through under every scheme (fp16; control tensors fp32).
    codec, level: "zlib" (default level 9), "zstd" (22, single-threaded), "lzma" (9) or "brotli" (11, as
        #1394/#1493); no level means the codec's default. The artifact records the codec with its level and
        the scheme with its rules.
    byte_shuffle: 0 (off) or a stride 2..8: the payload is split into byte planes (every stride-th byte from
        offsets 0, 1, ...) before compression, as the records do with stride 2 before brotli; the label
        records it ("bs2+brotli-11").
    gptq: full Hessian GPTQ (core/gptq.py, #1110) for the tensors an intN per-row scheme quantizes (int4..int7,
        int8_search, intN_stdK), with Hessians collected on `gptq_batches` fresh training batches (never
        validation data); upstream int8 and fp16 tensors are stored as without it. gptq_damp: damping, a
        fraction of the Hessian's mean diagonal; gptq_block: columns per lazy batch update. The header records
        the settings. gptq_embedding: GPTQ the tied embedding too (#1394: int8, its own std clip, e.g. the
        rule "tok_emb.weight=int8_std20"), with the Hessian of the head's input. train.gptq_reserve_seconds
        keeps time for the Hessians inside the wallclock cap.
    qat: quantization-aware training against this scheme (rules included): "off", "start" (from the first step)
        or "late" (from the first step whose LR scale is below qat_lr_threshold, as #1110 at 0.15). The
        trained forward then uses the weights as the artifact will hold them (straight-through gradient;
        round to nearest: GPTQ's solve needs Hessians, so with gptq QAT fakes the plain rounding), and
        validation scores that forward.
    qat_noise: #363's noisy QAT: while QAT is on, training adds uniform noise of +/- half a step (row
        absmax / qmax) to each quantized tensor instead of rounding it; validation still rounds.
    """

    scheme: str = "int8"
    codec: str = "zlib"
    level: int | None = None
    rules: list[str] = ()
    gptq: bool = False
    gptq_batches: int = 16  # batches of train.batch_tokens (#1110 used 256 of its own)
    gptq_damp: float = 0.01
    gptq_block: int = 128
    qat: str = "off"
    qat_lr_threshold: float = 0.15
    qat_noise: bool = False
    byte_shuffle: int = 0
    gptq_embedding: bool = False

    def __post_init__(self):
        compose_scheme(self.scheme, self.rules, where="artifact")  # one clear error for a bad scheme or rule
        if self.codec not in CODECS:
            raise UserError(f"artifact.codec = {self.codec!r}: expected one of {', '.join(CODECS)}")
        c = CODECS[self.codec]
        if self.level is None:
            object.__setattr__(self, "level", c.default_level)
        elif self.level not in c.levels:
            raise UserError(f"artifact.level = {self.level}: codec {self.codec} takes "
                            f"{c.levels.start}..{c.levels.stop - 1}")
        object.__setattr__(self, "rules", tuple(self.rules))
        if self.qat not in ("off", "start", "late"):
            raise UserError(f"artifact.qat = {self.qat!r}: expected 'off', 'start' or 'late'")
        if not 0 < self.qat_lr_threshold <= 1:
            raise UserError(f"artifact.qat_lr_threshold = {self.qat_lr_threshold}: expected a number in (0, 1]")
        for key in ("gptq_batches", "gptq_block"):
            if getattr(self, key) < 1:
                raise UserError(f"artifact.{key} = {getattr(self, key)}: expected a positive integer")
        if not 0 <= self.gptq_damp < 1:
            raise UserError(f"artifact.gptq_damp = {self.gptq_damp}: expected a fraction in [0, 1), e.g. 0.01")
        schemes = self.quant_scheme.split(";")[0], *(r.split("=")[1] for r in self.quant_scheme.split(";")[1:])
        if self.gptq:
            if all(gptq_scheme_qmax(s) is None for s in schemes):
                raise UserError(f"artifact.gptq = true, but no scheme here is one GPTQ applies to (int4..int7, "
                                f"int8_search, intN_stdK): scheme = {self.scheme!r}, rules = {list(self.rules)}")
        if self.gptq_embedding and not self.gptq:
            raise UserError("artifact.gptq_embedding = true needs artifact.gptq = true")
        if self.qat != "off" and any(STD_SCHEME.fullmatch(s) for s in schemes):
            raise UserError(f"artifact.qat = {self.qat!r} has no fake quantization for the std-clip schemes "
                            f"(intN_stdK) in {self.quant_scheme!r} yet; use a search scheme (int4..int7, "
                            "int8_search) for QAT, or artifact.qat = 'off'")
        if isinstance(self.byte_shuffle, bool) or self.byte_shuffle not in (0, *BYTE_SHUFFLE_STRIDES):
            raise UserError(f"artifact.byte_shuffle = {self.byte_shuffle!r}: expected 0 (off) or a stride "
                            f"{BYTE_SHUFFLE_STRIDES.start}..{BYTE_SHUFFLE_STRIDES.stop - 1} (the records use 2)")

    @property
    def quant_scheme(self) -> str:
        """The scheme name to quantize with and record in the artifact: `scheme` plus its rules."""
        return compose_scheme(self.scheme, self.rules)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """[eval]: how the final model is scored beyond upstream's standard non-overlapping eval."""

    stride: int = 0  # >0: also run sliding-window eval with this stride (tokens scored per window, <= seq_len)
    seq_len: int = 0  # window length of the sliding eval (may differ from training's); 0: train.seq_len
    batch_seqs: int = 32  # windows per forward batch
    hedge: bool = False  # also report the Hedge mixer's bpb (#895, without its entropy expert), never instead
    hedge_eta: float = 0.1  # the Hedge rule's learning rate (#895)
    # Score-first test-time training (#1493, core/ttt.py): reported beside the sliding bpb; needs stride > 0.
    ttt: bool = False
    ttt_chunk_tokens: int = 32768  # targets per chunk: each is scored, then trained on
    ttt_epochs: int = 3  # passes over each chunk
    ttt_lr: float = 0.005  # SGD learning rate at the first chunk, cosine to 0 at the last
    ttt_momentum: float = 0.9
    ttt_grad_clip: float = 1.0  # global gradient norm; 0: no clipping
    ttt_batch_seqs: int = 32  # training sequences per rank per step

    def __post_init__(self):
        for key in ("stride", "seq_len"):
            if getattr(self, key) < 0:
                raise UserError(f"eval.{key} = {getattr(self, key)}: expected 0 or more")
        if self.batch_seqs < 1:
            raise UserError(f"eval.batch_seqs = {self.batch_seqs}: expected a positive integer")
        if not 0 < self.hedge_eta < float("inf"):  # nan fails too
            raise UserError(f"eval.hedge_eta = {self.hedge_eta}: expected a positive number")
        if self.hedge and self.stride <= 0:
            raise UserError("eval.hedge = true needs eval.stride > 0: the mixer runs over the sliding windows "
                            "(eval.stride = eval.seq_len gives the standard non-overlapping ones)")
        for key in ("ttt_chunk_tokens", "ttt_epochs", "ttt_batch_seqs"):
            if getattr(self, key) < 1:
                raise UserError(f"eval.{key} = {getattr(self, key)}: expected a positive integer")
        for key in ("ttt_lr", "ttt_grad_clip"):
            if not getattr(self, key) >= 0:
                raise UserError(f"eval.{key} = {getattr(self, key)}: expected 0 or more")
        if not 0 <= self.ttt_momentum < 1:
            raise UserError(f"eval.ttt_momentum = {self.ttt_momentum}: expected a number in [0, 1)")
        if self.ttt and self.stride <= 0:
            raise UserError("eval.ttt = true needs eval.stride > 0: each chunk is scored by the sliding windows "
                            "(the record: eval.stride = 64)")


@dataclasses.dataclass(frozen=True)
class AverageConfig:
    """[average]: weight averaging during training; the averaged weights are exported and evaluated."""

    ema_decay: float = 0.0  # >0: EMA of the full state with this decay per step (e.g. 0.997)
    swa_every: int = 0  # >0: an SWA snapshot every K steps once the LR scale falls below swa_lr_threshold
    swa_lr_threshold: float = 0.4

    def __post_init__(self):
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"average.ema_decay = {self.ema_decay}: expected 0 (off) or a number in (0, 1)")
        if self.swa_every < 0:
            raise UserError(f"average.swa_every = {self.swa_every}: expected 0 (off) or more")
        if not 0 < self.swa_lr_threshold <= 1:
            raise UserError(f"average.swa_lr_threshold = {self.swa_lr_threshold}: expected a number in (0, 1]")
        if self.ema_decay > 0 and self.swa_every > 0:
            raise UserError("[average]: ema_decay and swa_every are both set; choose one averaging method")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelSpec
    train: TrainConfig
    optim: OptimConfig
    data: DataConfig
    artifact: ArtifactConfig
    eval: EvalConfig = EvalConfig()
    average: AverageConfig = AverageConfig()
    source: str = ""

    def __post_init__(self):
        if self.optim.weight_decay_exempt:
            from core.schedule import weight_decays  # core.schedule imports this module

            weight_decays(self.model, self.optim)  # a pattern that matches no parameter is an error at load
        if self.artifact.gptq_embedding and not self.model.tie_embeddings:
            raise UserError("artifact.gptq_embedding = true needs model.tie_embeddings = true: GPTQ takes the "
                            "embedding's Hessian from its use as the head")
        window = self.eval.seq_len or self.train.seq_len
        if self.eval.stride > window:
            raise UserError(f"eval.stride = {self.eval.stride} is longer than the sliding window (eval.seq_len, or "
                            f"train.seq_len when 0: {window}); the targets between windows would go unscored")
        if self.eval.ttt and self.eval.ttt_chunk_tokens < window:
            raise UserError(f"eval.ttt_chunk_tokens = {self.eval.ttt_chunk_tokens} is shorter than the sliding window "
                            f"(eval.seq_len, or train.seq_len when 0: {window}): a chunk must hold a training sequence")

    def to_toml(self) -> str:
        """The resolved config, written into every run directory."""
        lines = [f"# resolved from {self.source}" if self.source else "# resolved config"]
        for section in SECTIONS:
            value = getattr(self, section)
            table = value.to_dict() if section == "model" else dataclasses.asdict(value)
            lines.append(f"\n[{section}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        return "\n".join(lines) + "\n"


SECTIONS = {"model": None, "train": TrainConfig, "optim": OptimConfig, "data": DataConfig, "artifact": ArtifactConfig,
            "eval": EvalConfig, "average": AverageConfig}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def parse_override(text: str) -> tuple[str, str, Any]:
    """'train.iterations=50' -> ('train', 'iterations', 50). The value is read as TOML, else a string."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. train.iterations=50")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except (tomllib.TOMLDecodeError, ValueError, RecursionError):  # ValueError: an integer of 4300+ digits
        value = raw.strip()
    return parts[0], parts[1], value


def load_config(path: str | Path, overrides: list[str] = (), small: bool = False, small_vocab: bool = False,
                profile: str | None = None, profile_defaults: dict | None = None) -> RunConfig:
    raw = read_toml(path)
    return config_from_dict(raw, overrides, small, source=str(path), small_vocab=small_vocab, profile=profile,
                            profile_defaults=profile_defaults)


def config_from_dict(raw: dict, overrides=(), small: bool = False, source: str = "", small_vocab: bool = False,
                     profile: str | None = None, profile_defaults: dict | None = None) -> RunConfig:
    raw = apply_profile(raw, profile, profile_defaults)
    if profile:
        source = f"{source} (profile {profile})"
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for section in raw:
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, list(SECTIONS), n=1)
            hint = f"; did you mean [{close[0]}]?" if close else f"; known tables: {', '.join(SECTIONS)}"
            raise UserError(f"unknown table [{section}]{hint}")
    if small:  # before the overrides, so an explicit --set wins over --small
        raw = shrink(raw, vocab=small_vocab)
    for text in overrides:
        section, key, value = parse_override(text)
        if section not in SECTIONS:
            raise UserError(f"--set {text!r}: unknown table '{section}' (known: {', '.join(SECTIONS)})")
        table = raw.setdefault(section, {})
        if section == "model" and key in ("depth", "layer_plan"):
            table.pop("depth", None), table.pop("layer_plan", None)
            table.pop("num_layers", None), table.pop("num_blocks", None)
        table[key] = value
    model = ModelSpec.from_table(raw.get("model", {}), where="model")
    sections = {name: dataclass_from_table(cls, raw.get(name, {}), name) for name, cls in SECTIONS.items() if cls}
    cfg = RunConfig(model=model, source=source, **sections)

    depth_schedule(cfg)  # a schedule that doesn't fit the plan fails at load, before any run directory exists
    return cfg


def config_from_tables(tables: dict, overrides: dict[str, str] | None = None, source: str = "") -> RunConfig:
    """A resolved config's own tables (ModelSpec.to_dict and each section's fields, as an exported train_gpt.py
    carries them) back into the RunConfig, with {"section.key": text} overrides of its number and string keys
    (the script's environment knobs), each read as its field's type. No profiles, shrink or table checks: the
    tables were resolved and checked at export; each section's own checks still run."""
    tables = {name: dict(table) for name, table in tables.items()}
    for dotted, text in (overrides or {}).items():
        section, key = dotted.split(".")
        kind = type(tables[section][key])
        try:
            tables[section][key] = kind(text) if kind in (int, float, str) else None
        except ValueError:
            tables[section][key] = None
        if tables[section][key] is None:
            raise UserError(f"{dotted} = {text!r}: expected {'an integer' if kind is int else 'a number'}")
    model = ModelSpec(**tables["model"])
    sections = {name: cls(**tables[name]) for name, cls in SECTIONS.items() if cls}
    return RunConfig(model=model, source=source, **sections)


# Built-in profiles: run settings for a machine, applied with --profile NAME even when the config has no
# [profile.NAME] tables. A config's own [profile.NAME.<table>] tables apply on top of these.
# h100: upstream's record run, whose batch, sequence and cap are TrainConfig's defaults (one place for them),
# on the full FineWeb download.
BUILTIN_PROFILES = {
    "h100": {
        "train": {key: getattr(TrainConfig, key) for key in ("batch_tokens", "seq_len", "max_wallclock_seconds")},
        "data": {"path": DataConfig.path, "dataset": "fineweb10B_sp1024"},
    },
}


def apply_profile(raw: dict, name: str | None, defaults: dict | None = None) -> dict:
    """Remove the [profile.*] tables from `raw`; with a name, merge that profile's tables over the others.

    Order, later wins: the config's tables, the built-in profile, `defaults` (the caller's machine-dependent
    values), the config's [profile.NAME.*] tables. A profile never changes [model]: the spec is the experiment.
    """
    raw = dict(raw)
    profiles = raw.pop("profile", {})
    if not isinstance(profiles, dict):
        raise UserError("'profile' must be a table of [profile.NAME] tables")
    for pname, tables in profiles.items():
        if not isinstance(tables, dict):
            raise UserError(f"'profile.{pname}' must be a table, e.g. [profile.{pname}.train]")
        for section, table in tables.items():
            if section == "model":
                raise UserError(f"[profile.{pname}.model]: a profile cannot change the model spec; "
                                "put model changes in their own config")
            if section not in SECTIONS or not isinstance(table, dict):
                raise UserError(f"[profile.{pname}.{section}]: expected one of "
                                f"{', '.join(s for s in SECTIONS if s != 'model')} tables")
    if not name:
        return raw
    if name not in profiles and name not in BUILTIN_PROFILES:
        known = sorted(set(profiles) | set(BUILTIN_PROFILES))
        raise UserError(f"--profile {name!r}: no [profile.{name}] in the config and no built-in one "
                        f"(known: {', '.join(known)})")
    for layer in (BUILTIN_PROFILES.get(name, {}), defaults or {}, profiles.get(name, {})):
        for section, table in layer.items():
            if section == "model":
                raise UserError(f"profile {name!r}: a profile cannot change the model spec")
            raw[section] = {**raw.get(section, {}), **table}
    return raw


SMALL_HEAD_DIM = 8
SMALL_SEQ_LEN = 64
SMALL_VOCAB = 128


def shrink(raw: dict, vocab: bool = False) -> dict:
    """--small: the same topology (plan, options, schedules) at a width and sequence length that run in
    seconds on a CPU. The vocabulary shrinks only when asked (no tokenizer fixes it, as in parity/size)."""
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    model = raw.setdefault("model", {})
    heads = model.get("num_heads", ModelSpec.num_heads)
    dim = model.get("model_dim", ModelSpec.model_dim)
    model["model_dim"] = heads * SMALL_HEAD_DIM
    # Options sized by the width follow it: partial RoPE still rotates part of each (8-dim) head, low-rank
    # Q keeps its rank/width ratio (values of the wrong type are left for the spec to report).
    if type(model.get("rope_dims")) is int and model["rope_dims"] > 0:
        model["rope_dims"] = SMALL_HEAD_DIM // 2
    if type(model.get("q_rank")) is int and model["q_rank"] > 0 and type(dim) is int and dim > 0:
        model["q_rank"] = max(1, model["q_rank"] * model["model_dim"] // dim)
    if vocab:
        model["vocab_size"] = SMALL_VOCAB
    train = raw.setdefault("train", {})
    seq = min(train.get("seq_len", TrainConfig.seq_len), SMALL_SEQ_LEN)
    accum = train.get("grad_accum_steps", 1)
    train["seq_len"] = seq
    train["batch_tokens"] = 8 * seq * accum
    train["val_batch_tokens"] = 32 * seq
    ev = raw.get("eval")
    ints = isinstance(ev, dict) and all(type(ev.get(k, 0)) is int for k in ("seq_len", "stride"))
    if ints and (ev.get("seq_len") or ev.get("stride")):  # sliding windows shrink with training's (bad values: later)
        ev["seq_len"] = min(ev.get("seq_len") or seq, seq)
        ev["stride"] = min(ev.get("stride", 0), ev["seq_len"])
    return raw
