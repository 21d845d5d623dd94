"""Token shards in upstream's format, a wrapping token stream, and upstream's batch slicing.

A shard is a header of 256 little-endian int32 (magic, version, num_tokens, then zeros) followed by
num_tokens little-endian uint16 token ids. Files are named fineweb_{train,val}_{i:06d}.bin.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from core.atomic import atomic_path
from core.errors import UserError

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
MAX_SHARD_TOKENS = 2**31 - 1  # num_tokens is an int32 in the header
DEMO_HINT = "make_mini_shards --demo --out data"


def shard_name(split: str, index: int) -> str:
    return f"fineweb_{split}_{index:06d}.bin"


def write_shard(path: str | os.PathLike, tokens) -> int:
    """Write `tokens` as one shard, atomically. Returns the number of tokens written."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise UserError(f"{path}: tokens must be a 1-D sequence, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size > MAX_SHARD_TOKENS:
        raise UserError(f"{path}: {arr.size} tokens do not fit one shard (at most {MAX_SHARD_TOKENS})")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**16):
        raise UserError(
            f"{path}: token ids must be in [0, 65535] to fit uint16, found {int(arr.min())}..{int(arr.max())}"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0], header[1], header[2] = SHARD_MAGIC, SHARD_VERSION, arr.size
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header.tobytes())
            f.write(arr.astype("<u2", copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())
    return int(arr.size)


def shard_problem(path: str | os.PathLike) -> tuple[int, str | None]:
    """(num_tokens, None) for a valid shard file, else (0, why it is not one): magic, version, size."""
    path = Path(path)
    size = path.stat().st_size
    if size < HEADER_BYTES:
        return 0, f"expected at least a {HEADER_BYTES}-byte header, found a {size}-byte file"
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    if int(header[0]) != SHARD_MAGIC:
        return 0, f"expected magic {SHARD_MAGIC}, found {int(header[0])} (not a token shard)"
    if int(header[1]) != SHARD_VERSION:
        return 0, f"expected version {SHARD_VERSION}, found {int(header[1])}"
    num_tokens = int(header[2])
    expected = HEADER_BYTES + 2 * num_tokens
    if num_tokens < 0 or size != expected:
        return 0, (
            f"header says {num_tokens} tokens, so expected {HEADER_BYTES} + 2*{num_tokens} = {expected} "
            f"bytes, found {size} (truncated or corrupt)"
        )
    return num_tokens, None


def read_shard_header(path: str | os.PathLike) -> int:
    """Validate a shard's header and size; return its token count."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"shard {path} not found")
    num_tokens, problem = shard_problem(path)
    if problem:
        raise UserError(f"shard {path}: {problem}")
    return num_tokens


def read_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (validated first)."""
    num_tokens = read_shard_header(path)
    if num_tokens == 0:  # numpy cannot memmap zero bytes
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))


def list_shards(dataset_dir: str | os.PathLike, split: str) -> list[Path]:
    """Sorted fineweb_{split}_*.bin files in dataset_dir; an error when there are none."""
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise UserError(f"data directory {dataset_dir} not found; make the demo data with: {DEMO_HINT}")
    files = sorted(dataset_dir.glob(f"fineweb_{split}_*.bin"))
    if not files:
        raise UserError(
            f"no fineweb_{split}_*.bin shards in {dataset_dir}; make the demo data with: {DEMO_HINT}"
        )
    return files


class TokenStream:
    """Reads the shards in order, one after another, and wraps around to the first at the end.

    Mirrors upstream's TokenStream: no shuffling, so every rank that builds the same stream sees the
    same tokens, and a run is reproducible from (file index, position).
    """

    def __init__(self, files: Sequence[str | os.PathLike]):
        if not files:
            raise UserError(f"no shard files given to read; make the demo data with: {DEMO_HINT}")
        self.files = [Path(f) for f in files]
        # Validate every header now: a corrupt shard should fail at start-up, not an hour in.
        self.sizes = [read_shard_header(f) for f in self.files]
        if sum(self.sizes) == 0:
            raise UserError(f"shards {self.files[0]} ... hold no tokens")
        self.file_index = 0
        self.pos = 0
        self._tokens = read_shard(self.files[0])

    def _advance_file(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.files)
        self.pos = 0
        self._tokens = read_shard(self.files[self.file_index])

    def take(self, n: int) -> np.ndarray:
        """The next n tokens as int32, crossing file boundaries and wrapping as needed."""
        if n < 0:
            raise ValueError(f"take(n) needs n >= 0, got {n}")
        out = np.empty(n, dtype=np.int32)
        filled = 0
        while filled < n:
            available = len(self._tokens) - self.pos
            if available <= 0:
                self._advance_file()
                continue
            k = min(n - filled, available)
            out[filled : filled + k] = self._tokens[self.pos : self.pos + k]
            filled += k
            self.pos += k
        return out

    def tell(self) -> tuple[int, int]:
        """(file index, position in that file): enough to resume the stream exactly."""
        return self.file_index, self.pos

    def seek(self, file_index: int, pos: int) -> None:
        if not (0 <= file_index < len(self.files)) or not (0 <= pos <= self.sizes[file_index]):
            raise UserError(
                f"cannot resume token stream at file {file_index} position {pos}: "
                f"there are {len(self.files)} shards (is this the same data as the checkpoint's?)"
            )
        self.file_index, self.pos = file_index, pos
        self._tokens = read_shard(self.files[file_index])


def next_batch(
    stream: TokenStream,
    global_tokens: int,
    seq_len: int,
    grad_accum_steps: int,
    rank: int,
    world_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One micro-batch for this rank, sliced exactly like upstream's DistributedTokenLoader.

    Every rank takes the same chunk of (local+1)*world_size tokens from its own stream and keeps its
    slice, so the streams stay in lockstep without communication. Returns int32 (x, y) of shape
    (local // seq_len, seq_len), y shifted by one.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    local = global_tokens // (world_size * grad_accum_steps)
    if local <= 0 or local % seq_len != 0:
        raise UserError(
            f"train.batch_tokens={global_tokens} gives {local} tokens per rank per micro-step "
            f"(batch_tokens // (world_size {world_size} * grad_accum_steps {grad_accum_steps})); "
            f"expected a positive multiple of seq_len {seq_len}"
        )
    span = local + 1
    chunk = stream.take(span * world_size)
    mine = chunk[rank * span : rank * span + span]
    return mine[:-1].reshape(-1, seq_len), mine[1:].reshape(-1, seq_len)


def load_val_tokens(files: Sequence[str | os.PathLike], seq_len: int) -> np.ndarray:
    """All validation tokens (int32), truncated as upstream to a whole number of seq_len windows + 1."""
    if not files:
        raise UserError(f"no validation shards given; make the demo data with: {DEMO_HINT}")
    tokens = np.concatenate([np.asarray(read_shard(f), dtype=np.int32) for f in files])
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise UserError(
            f"validation shards ({Path(files[0]).parent}) hold {tokens.size} tokens; "
            f"expected at least seq_len+1 = {seq_len + 1}"
        )
    return tokens[: usable + 1]
