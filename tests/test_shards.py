from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from core.errors import UserError
from core.manifest import (
    DatasetEntry,
    DatasetStats,
    Manifest,
    TokenizerEntry,
    manifest_from_dict,
    manifest_to_dict,
    read_manifest,
    resolve_data,
    write_manifest,
)
from core.shards import (
    HEADER_BYTES,
    SHARD_MAGIC,
    TokenStream,
    first_val_tokens,
    list_shards,
    load_val_tokens,
    next_batch,
    read_shard,
    shard_name,
    write_shard,
)


def make_shards(tmp_path, sizes, split="train", start=0):
    """Shards whose tokens are consecutive integers, so any slice says where it came from."""
    files, value = [], start
    for i, n in enumerate(sizes):
        path = tmp_path / shard_name(split, i)
        write_shard(path, np.arange(value, value + n))
        files.append(path)
        value += n
    return files


# ---------------------------------------------------------------- format


def test_round_trip_and_header(tmp_path):
    tokens = np.array([0, 1, 2, 1023, 65535, 7], dtype=np.int64)
    path = tmp_path / "fineweb_train_000000.bin"
    assert write_shard(path, tokens) == 6
    got = read_shard(path)
    assert got.dtype == np.uint16 and np.array_equal(got, tokens)
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [SHARD_MAGIC, 1, 6] and not header[3:].any()
    assert path.stat().st_size == HEADER_BYTES + 2 * 6


def test_empty_shard_reads_as_empty(tmp_path):
    write_shard(tmp_path / "e.bin", [])
    assert read_shard(tmp_path / "e.bin").size == 0


@pytest.mark.parametrize("bad", [[-1], [65536], [1.5]])
def test_write_refuses_tokens_outside_uint16(tmp_path, bad):
    with pytest.raises(UserError, match="bad.bin"):
        write_shard(tmp_path / "bad.bin", np.array(bad))
    assert not list(tmp_path.iterdir())  # nothing half-written


def _corrupt(path, kind):
    data = bytearray(path.read_bytes())
    if kind == "truncated":
        data = data[:-2]
    elif kind == "tiny":
        data = data[:100]
    elif kind == "magic":
        data[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif kind == "version":
        data[4:8] = np.array([2], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "kind,expect",
    [("truncated", "expected 1024 + 2*10 = 1044 bytes, found 1042"), ("tiny", "1024-byte header"), ("magic", "magic 20240520"), ("version", "version 1")],
)
def test_corrupt_shards_name_the_file(tmp_path, kind, expect):
    path = make_shards(tmp_path, [10])[0]
    _corrupt(path, kind)
    with pytest.raises(UserError) as err:
        read_shard(path)
    msg = str(err.value)
    assert str(path) in msg and expect in msg and "\n" not in msg


def test_missing_shard(tmp_path):
    with pytest.raises(UserError, match="nope.bin not found"):
        read_shard(tmp_path / "nope.bin")


def test_list_shards_sorted_and_hint(tmp_path):
    make_shards(tmp_path, [3, 3, 3])
    make_shards(tmp_path, [3], split="val")
    assert [p.name for p in list_shards(tmp_path, "train")] == [shard_name("train", i) for i in range(3)]
    with pytest.raises(UserError, match="make_mini_shards --demo --out data"):
        list_shards(tmp_path / "missing", "train")
    with pytest.raises(UserError, match="fineweb_test_"):
        list_shards(tmp_path, "test")


# ---------------------------------------------------------------- streaming


def test_token_stream_crosses_files_and_wraps(tmp_path):
    files = make_shards(tmp_path, [5, 0, 3, 7])  # an empty shard in the middle is skipped
    stream = TokenStream(files)
    every = np.arange(15)
    expect = np.concatenate([every] * 5)
    got = np.concatenate([stream.take(4), stream.take(6), stream.take(0), stream.take(40)])
    assert got.dtype == np.int32
    assert np.array_equal(got, expect[:50])


def test_token_stream_tell_seek_resumes(tmp_path):
    stream = TokenStream(make_shards(tmp_path, [5, 3, 7]))
    stream.take(6)
    state = stream.tell()
    ahead = stream.take(20)
    other = TokenStream(stream.files)
    other.seek(*state)
    assert np.array_equal(other.take(20), ahead)
    with pytest.raises(UserError):
        other.seek(9, 0)


def test_token_stream_validates_every_file_up_front(tmp_path):
    files = make_shards(tmp_path, [5, 5])
    _corrupt(files[1], "magic")
    with pytest.raises(UserError, match=files[1].name):
        TokenStream(files)


def test_next_batch_shapes_and_shift(tmp_path):
    stream = TokenStream(make_shards(tmp_path, [100, 100]))
    x, y = next_batch(stream, global_tokens=32, seq_len=8, grad_accum_steps=2, rank=0, world_size=1)
    assert x.shape == y.shape == (2, 8)
    assert np.array_equal(x.reshape(-1), np.arange(16)) and np.array_equal(y.reshape(-1), np.arange(1, 17))
    x2, _ = next_batch(stream, 32, 8, 2, 0, 1)
    assert x2[0, 0] == 17  # upstream takes span = local+1 tokens, so the next chunk starts one later


def test_next_batch_ranks_are_consecutive_single_rank_chunks(tmp_path):
    files = make_shards(tmp_path, [70, 50, 90])
    seq_len, global_tokens = 8, 64
    single = TokenStream(files)
    halves = [next_batch(single, global_tokens // 2, seq_len, 1, 0, 1) for _ in range(2)]
    for rank in range(2):
        x, y = next_batch(TokenStream(files), global_tokens, seq_len, 1, rank, 2)
        assert np.array_equal(x, halves[rank][0]) and np.array_equal(y, halves[rank][1])


@pytest.mark.parametrize("global_tokens", [60, 4])
def test_next_batch_rejects_bad_batch_tokens(tmp_path, global_tokens):
    stream = TokenStream(make_shards(tmp_path, [100]))
    with pytest.raises(UserError, match="train.batch_tokens"):
        next_batch(stream, global_tokens, seq_len=8, grad_accum_steps=1, rank=0, world_size=2)


def test_load_val_tokens_truncates_like_upstream(tmp_path):
    files = make_shards(tmp_path, [6, 5], split="val")
    got = load_val_tokens(files, seq_len=4)  # N=11 -> ((11-1)//4)*4+1 = 9
    assert got.dtype == np.int32 and np.array_equal(got, np.arange(9))
    assert load_val_tokens(files, seq_len=10).size == 11
    with pytest.raises(UserError, match="seq_len"):
        load_val_tokens(files, seq_len=11)


@pytest.mark.parametrize("max_tokens, kept", [(0, 1024), (1024, 1024), (5000, 1024), (999, 992), (64, 64),
                                              (65, 64), (1, 16)])
def test_first_val_tokens_keeps_whole_windows_and_at_least_one(max_tokens, kept):
    """train.val_max_tokens, quantize --eval and eval --max-tokens all cut here: N targets rounded down to
    whole 16-token windows, never below one window (it once kept none for train, so scored nothing)."""
    tokens = np.arange(1025, dtype=np.int32)  # 1024 targets: 64 windows, as load_val_tokens returns them
    got = first_val_tokens(tokens, max_tokens, 16)
    assert np.array_equal(got, tokens[: kept + 1])


# ---------------------------------------------------------------- manifest and resolve_data


def sample_manifest() -> Manifest:
    tok = TokenizerEntry("t_1024_bpe", vocab_size=1024, model_path="tokenizers/t_1024_bpe.model",
                         vocab_path="tokenizers/t_1024_bpe.vocab", extra={"recommended_bigram_vocab_size": 5120})
    ds = DatasetEntry("t_sp1024", "t_1024_bpe", "datasets/t_sp1024", 1024,
                      DatasetStats(2, 1, 10, 2, 1000, 100), extra={"bos_id": 1})
    return Manifest("10B", 12, 2, 1337, 10**8, False, [tok], [ds], extra={"docs_meta": {"a": 1}})


def test_manifest_round_trip(tmp_path):
    m = sample_manifest()
    write_manifest(tmp_path / "manifest.json", m)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["datasets"][0]["stats"]["tokens_total"] == 1100  # upstream's totals
    assert raw["datasets"][0]["train_glob"] == "datasets/t_sp1024/fineweb_train_*.bin"
    back = read_manifest(tmp_path / "manifest.json")
    assert back == m
    assert manifest_to_dict(manifest_from_dict(raw))["docs_meta"] == {"a": 1}


def test_manifest_errors_name_file_and_key(tmp_path):
    (tmp_path / "manifest.json").write_text('{"datasets": [{"name": "x"}]}')
    with pytest.raises(UserError, match=r"manifest.json: datasets\[0\]: missing key 'path'"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not readable JSON"):
        read_manifest(tmp_path / "manifest.json")


def test_resolve_data_from_root_and_dataset_dir(demo_data):
    paths = resolve_data(demo_data)
    assert paths.dataset_dir == demo_data / "datasets" / "shakespeare_sp1024"
    assert len(paths.train_files) >= 2 and len(paths.val_files) == 1
    assert paths.tokenizer_path == demo_data / "tokenizers" / "shakespeare_1024_bpe.model"
    assert paths.vocab_size == 1024 and paths.manifest is not None
    by_dir = resolve_data(paths.dataset_dir)  # finds ROOT/manifest.json two levels up, as upstream
    assert by_dir.tokenizer_path.resolve() == paths.tokenizer_path.resolve()
    assert by_dir.train_files == paths.train_files
    assert resolve_data(demo_data, dataset="shakespeare_sp1024").dataset_dir == paths.dataset_dir


def test_resolve_data_checks(demo_data, tmp_path):
    with pytest.raises(UserError, match="make_mini_shards --demo --out data"):
        resolve_data(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no dataset named 'nope'; it lists shakespeare_sp1024"):
        resolve_data(demo_data, dataset="nope")

    root = tmp_path / "copy"
    shutil.copytree(demo_data, root)
    other_tok = tmp_path / "other_1024_bpe.model"
    shutil.copy(root / "tokenizers" / "shakespeare_1024_bpe.model", other_tok)
    with pytest.raises(UserError, match="expects shakespeare_1024_bpe.model"):
        resolve_data(root, tokenizer=other_tok)

    dataset_dir = root / "datasets" / "shakespeare_sp1024"
    shutil.copy(dataset_dir / shard_name("train", 0), dataset_dir / shard_name("train", 7))
    with pytest.raises(UserError, match="but its manifest lists files_train="):
        resolve_data(root)

    m = read_manifest(root / "manifest.json")
    m.put_dataset(DatasetEntry("second", None, "datasets/second", 1024))
    write_manifest(root / "manifest.json", m)
    with pytest.raises(UserError, match=r"several datasets \(shakespeare_sp1024, second\)"):
        resolve_data(root)


def test_resolve_bare_dataset_dir_needs_tokenizer(demo_data, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(demo_data / "datasets" / "shakespeare_sp1024", bare)
    with pytest.raises(UserError, match="tokenizer"):
        resolve_data(bare)
    tok = demo_data / "tokenizers" / "shakespeare_1024_bpe.model"
    paths = resolve_data(bare, tokenizer=tok)
    assert paths.manifest is None and paths.vocab_size == 1024 and len(paths.val_files) == 1
