"""Token shards in upstream's format, a wrapping token stream, and upstream's batch slicing.

A shard is a header of 256 little-endian int32 (magic, version, num_tokens, then zeros) followed by
num_tokens little-endian uint16 token ids. Files are named fineweb_{train,val}_{i:06d}.bin.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
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


def read_shard(path: str | os.PathLike, vocab_size: int | None = None) -> np.ndarray:
    """The shard's tokens as a read-only uint16 memmap (validated first). With `vocab_size`, every token id
    must be below it: an id past the embedding crashes MLX (a segfault) and makes torch raise mid-step."""
    num_tokens = read_shard_header(path)
    if num_tokens == 0:  # numpy cannot memmap zero bytes
        return np.zeros(0, dtype=np.uint16)
    tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(num_tokens,))
    if vocab_size is not None:
        check_token_ids(tokens, vocab_size, f"shard {path}")
    return tokens


def check_token_ids(tokens: np.ndarray, vocab_size: int, what: str, offset: int = 0) -> None:
    """One vectorised max over the tokens; UserError naming the first id >= vocab_size and its position
    (`offset`: where `tokens` starts in the shard)."""
    if tokens.size and int(tokens.max()) >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise UserError(f"{what} holds token id {int(tokens[bad])} (at position {offset + bad}), but the vocabulary "
                        f"has {vocab_size} ids: the data does not match the model or the tokenizer")


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

    def __init__(self, files: Sequence[str | os.PathLike], vocab_size: int | None = None):
        if not files:
            raise UserError(f"no shard files given to read; make the demo data with: {DEMO_HINT}")
        self.files = [Path(f) for f in files]
        # Validate every header now: a corrupt shard should fail at start-up, not an hour in.
        self.sizes = [read_shard_header(f) for f in self.files]
        if sum(self.sizes) == 0:
            raise UserError(f"shards {self.files[0]} ... hold no tokens")
        # With vocab_size, every shard's token ids are checked once, before any of its tokens is handed out:
        # the first shard here, each next one in a thread while the one before it is read (one max over a
        # 100M-token shard takes ~50 ms, which the training loop then never waits for).
        self.vocab_size = vocab_size
        self._checks: dict[int, ShardChecks | None] = {}  # shard index -> its check (None: passed)
        self.file_index = 0
        self.pos = 0
        self._tokens = self._map(0)

    def _map(self, index: int) -> np.ndarray:
        if self.vocab_size is not None:
            check = self._checks.get(index, False)
            if check is False:  # not started: check it now
                read_shard(self.files[index], self.vocab_size)
            elif check is not None:
                check.wait(index)
            self._checks[index] = None
            following = (index + 1) % len(self.files)
            if following not in self._checks:
                self._checks[following] = ShardChecks(self.files, self.vocab_size, [following])
        return read_shard(self.files[index])

    def _advance_file(self) -> None:
        self.file_index = (self.file_index + 1) % len(self.files)
        self.pos = 0
        self._tokens = self._map(self.file_index)

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
        self._tokens = self._map(file_index)


class ShardChecks:
    """Token-id checks (read_shard(file, vocab_size)) of files[i] for i in `order`, one after another in a
    thread (numpy's max releases the GIL); wait(i) blocks until shard i's is done and raises what it found."""

    def __init__(self, files: Sequence[Path], vocab_size: int, order: Sequence[int]):
        self._done: dict[int, Exception | None] = {}
        self._ready = threading.Condition()
        threading.Thread(target=self._run, args=(list(files), vocab_size, list(order)), daemon=True).start()

    def _run(self, files: list[Path], vocab_size: int, order: list[int]) -> None:
        for i in order:
            try:
                read_shard(files[i], vocab_size)
                error = None
            except (UserError, OSError) as e:  # reported when the stream reaches the shard
                error = e
            with self._ready:
                self._done[i] = error
                self._ready.notify_all()

    def wait(self, index: int) -> None:
        with self._ready:
            self._ready.wait_for(lambda: index in self._done)
            error = self._done[index]
        if error is not None:
            raise error


class ShuffledStream:
    """The records' training order (#1394/#1493's shuffled-sequence loader), for [data] order = "shuffled".

    Each rank reads its own shards, files[rank::world_size]. Per shard it draws a random phase in
    [0, min(seq_len - 1, n - seq_len - 1)] and a random permutation of the (n - 1 - phase) // seq_len windows of
    seq_len + 1 tokens that start at phase + i * seq_len. Each sequence of a batch comes from a shard drawn with
    probability proportional to the windows it has left, and takes that shard's next window; once every shard
    is used up, all of them are reshuffled. Unlike the records (seeded by the rank alone), the generator is
    PCG64 seeded with (train.seed, rank), so the order follows train.seed.

    Deterministic: the state is (seed, rank, sequences drawn), so `skip(n)` replays n draws without reading a
    token, which resumes a run exactly (the checkpoint records `drawn`).
    """

    def __init__(self, files: Sequence[str | os.PathLike], seq_len: int, seed: int, rank: int = 0,
                 world_size: int = 1, vocab_size: int | None = None):
        if not files:
            raise UserError(f"no shard files given to read; make the demo data with: {DEMO_HINT}")
        all_files = [Path(f) for f in files]
        sizes = [read_shard_header(f) for f in all_files]  # every header now, as TokenStream does
        self.files, self.sizes = all_files[rank::world_size], sizes[rank::world_size]
        if not self.files:
            raise UserError(f"data.order = 'shuffled' gives each rank its own shards, but there are "
                            f"{len(all_files)} train shard(s) for {world_size} ranks; use at most {len(all_files)} ranks")
        self.seq_len = seq_len
        if all((n - 1) // seq_len == 0 for n in self.sizes):
            raise UserError(f"data.order = 'shuffled': no train shard of rank {rank} ({self.files[0].name}, ...) holds "
                            f"{seq_len + 1} tokens, one sequence of train.seq_len = {seq_len} and its target")
        self.rng = np.random.Generator(np.random.PCG64([seed, rank]))
        self.drawn = 0  # sequences taken so far
        self._tokens = [None] * len(self.files)  # memmaps, opened on first use
        # With vocab_size, each shard's token ids are checked before its first window is used; the random draws
        # reach every shard within a few batches, so all of them are checked in a thread from the start.
        self._checks = ShardChecks(self.files, vocab_size, range(len(self.files))) if vocab_size is not None else None
        self._refill()

    def _refill(self) -> None:
        """A new phase and window order for every shard (start-up, and once every shard is used up)."""
        self.starts, self.left = [], []
        for n in self.sizes:
            max_phase = min(self.seq_len - 1, max(0, n - self.seq_len - 1))
            phase = int(self.rng.integers(max_phase + 1)) if max_phase > 0 else 0
            count = max((n - 1 - phase) // self.seq_len, 0)
            self.starts.append((phase + self.rng.permutation(count) * self.seq_len).tolist())
            self.left.append(count)

    def _draw(self) -> tuple[int, int]:
        """(shard, window start) of the next sequence: the shard by the windows it has left (a uniform integer
        below their total, located in the running sums; an empty shard spans nothing), then its next window."""
        total = sum(self.left)
        if total <= 0:
            self._refill()
            total = sum(self.left)
        shard = bisect.bisect_right(list(itertools.accumulate(self.left)), int(self.rng.integers(total)))
        self.left[shard] -= 1
        self.drawn += 1
        return shard, self.starts[shard][self.left[shard]]

    def next_batch(self, seqs: int) -> tuple[np.ndarray, np.ndarray]:
        """`seqs` sequences as int32 (x, y) of shape (seqs, seq_len), y shifted by one."""
        window = np.empty((seqs, self.seq_len + 1), dtype=np.int32)
        for row in range(seqs):
            shard, start = self._draw()
            if self._tokens[shard] is None:
                if self._checks is not None:
                    self._checks.wait(shard)
                self._tokens[shard] = read_shard(self.files[shard])
            window[row] = self._tokens[shard][start : start + self.seq_len + 1]
        return window[:, :-1], window[:, 1:]

    def skip(self, drawn: int) -> None:
        """Continue after `drawn` sequences (a checkpoint's): replays the draws from the start, reading nothing."""
        if drawn < self.drawn:
            raise ValueError(f"cannot rewind a shuffled stream from {self.drawn} to {drawn} sequences")
        while self.drawn < drawn:
            self._draw()


def open_train_stream(cfg, files: Sequence[str | os.PathLike], rank: int, world_size: int):
    """The training stream [data] order asks for: upstream's sequential TokenStream (every rank reads the same
    stream and keeps its slice), or the records' ShuffledStream (each rank its own shards)."""
    if cfg.data.order == "shuffled":
        return ShuffledStream(files, cfg.train.seq_len, cfg.train.seed, rank, world_size, cfg.model.vocab_size)
    return TokenStream(files, cfg.model.vocab_size)


def train_micro_batch(cfg, stream, rank: int, world_size: int) -> tuple[np.ndarray, np.ndarray]:
    """One training micro-batch of this rank, from a stream open_train_stream(cfg, ...) opened."""
    t = cfg.train
    if cfg.data.order == "shuffled":
        return stream.next_batch(rank_tokens(t.batch_tokens, t.seq_len, t.grad_accum_steps, world_size) // t.seq_len)
    return next_batch(stream, t.batch_tokens, t.seq_len, t.grad_accum_steps, rank, world_size)


def rank_tokens(global_tokens: int, seq_len: int, grad_accum_steps: int, world_size: int) -> int:
    """Tokens of one rank's micro-batch: a positive multiple of seq_len, else a UserError."""
    local = global_tokens // (world_size * grad_accum_steps)
    if local <= 0 or local % seq_len != 0:
        raise UserError(
            f"train.batch_tokens={global_tokens} gives {local} tokens per rank per micro-step "
            f"(batch_tokens // (world_size {world_size} * grad_accum_steps {grad_accum_steps})); "
            f"expected a positive multiple of seq_len {seq_len}"
        )
    return local


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
    local = rank_tokens(global_tokens, seq_len, grad_accum_steps, world_size)
    span = local + 1
    chunk = stream.take(span * world_size)
    mine = chunk[rank * span : rank * span + span]
    return mine[:-1].reshape(-1, seq_len), mine[1:].reshape(-1, seq_len)


def load_val_tokens(files: Sequence[str | os.PathLike], seq_len: int, vocab_size: int | None = None) -> np.ndarray:
    """All validation tokens (int32), truncated as upstream to a whole number of seq_len windows + 1; with
    `vocab_size`, every id checked to lie below it."""
    if not files:
        raise UserError(f"no validation shards given; make the demo data with: {DEMO_HINT}")
    tokens = np.concatenate([np.asarray(read_shard(f, vocab_size), dtype=np.int32) for f in files])
    usable = ((tokens.size - 1) // seq_len) * seq_len
    if usable <= 0:
        raise UserError(
            f"validation shards ({Path(files[0]).parent}) hold {tokens.size} tokens; "
            f"expected at least seq_len+1 = {seq_len + 1}"
        )
    return tokens[: usable + 1]


def first_val_tokens(tokens: np.ndarray, max_tokens: int, seq_len: int) -> np.ndarray:
    """The first `max_tokens` targets of `tokens` (load_val_tokens'), rounded down to whole seq_len windows but
    never below one (a window always fits: load_val_tokens checks); 0: all of them. `train.val_max_tokens`
    and `eval --max-tokens` both cut here, so a run and a later eval score the same tokens."""
    if not max_tokens:
        return tokens
    keep = max(min(max_tokens, len(tokens) - 1) // seq_len, 1) * seq_len
    return tokens[: keep + 1]
