from __future__ import annotations

import math

import numpy as np
import pytest

from core.bpb import ByteLuts, bpb_from_sums, build_byte_luts, check_vocab, count_bytes
from core.errors import UserError
from core.shards import read_shard
from core.tokenizer import encode_documents, load_tokenizer, train_sentencepiece

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Numbers: 12345 and 2024-05-20, prices $9.99 and £7.",
    "Unicode: naïve café, Ærøskøbing, 東京, emoji 🙂 — dashes – and ﬁ ligatures, ½.",
    "  Leading spaces,   runs of   spaces,\ttabs\nand\n\nnewlines.  ",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
] * 4

SAMPLES = CORPUS[:5] + [
    "unseen words: zyxwvut qqq ǅ ß 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "x",
    "   ",
    "a\u00a0b\u2003c",  # no-break and em spaces, which NFKC turns into plain spaces
]


@pytest.fixture(scope="module")
def tiny_sp(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tiny_320_bpe.model"
    train_sentencepiece(CORPUS, 320, path)
    return load_tokenizer(path)


def normalized_bytes(sp, text: str) -> int:
    """Bytes of the text as the tokenizer sees it (NFKC, whitespace runs collapsed, ends stripped)."""
    return len(sp.decode(sp.encode(text)).encode("utf-8"))


def test_training_is_deterministic(tmp_path):
    a, b = tmp_path / "a" / "t.model", tmp_path / "b" / "t.model"
    train_sentencepiece(CORPUS, 320, a)
    train_sentencepiece(iter(CORPUS), 320, b)
    assert a.read_bytes() == b.read_bytes()
    assert a.with_suffix(".vocab").read_bytes() == b.with_suffix(".vocab").read_bytes()


def test_upstream_special_ids(tiny_sp):
    assert [tiny_sp.pad_id(), tiny_sp.bos_id(), tiny_sp.eos_id(), tiny_sp.unk_id()] == [0, 1, 2, 3]
    assert all(tiny_sp.is_byte(i) for i in range(4, 260))
    assert tiny_sp.vocab_size() <= 320


def test_luts_by_hand(tiny_sp):
    luts = build_byte_luts(tiny_sp, 512)
    assert luts.base_bytes.shape == (512,) and luts.base_bytes.dtype == np.int16
    for i in range(4):  # pad, bos, eos (control) and unk: no bytes, boundary
        assert luts.base_bytes[i] == 0 and luts.is_boundary[i] and not luts.has_leading_space[i]
    for i in range(4, 260):
        assert luts.base_bytes[i] == 1 and not luts.is_boundary[i]
    for i in range(260, tiny_sp.vocab_size()):
        piece = tiny_sp.id_to_piece(i)
        stripped = piece[1:] if piece.startswith("▁") else piece
        assert luts.base_bytes[i] == len(stripped.encode()) and luts.has_leading_space[i] == piece.startswith("▁")
        assert not luts.is_boundary[i]
    assert luts.is_boundary[tiny_sp.vocab_size():].all() and not luts.base_bytes[tiny_sp.vocab_size():].any()


def test_count_bytes_on_a_handmade_table():
    # ids: 0 boundary, 1 "▁ab" (2 bytes + space), 2 "é" (2 bytes), 3 byte token
    luts = ByteLuts(
        base_bytes=np.array([0, 2, 2, 1], dtype=np.int16),
        has_leading_space=np.array([False, True, False, False]),
        is_boundary=np.array([True, False, False, False]),
    )
    # "ab" after BOS: the ▁ is not counted; " ab" after "é": it is.
    assert count_bytes([0, 1, 2], [1, 2, 1], luts) == 2 + 2 + 3
    assert count_bytes(np.array([[0, 3]]), np.array([[3, 3]]), luts) == 2.0


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_bytes_of_a_document_equal_its_normalized_utf8(tiny_sp, index):
    text = SAMPLES[index]
    ids = encode_documents(tiny_sp, [text])[0]
    assert ids[0] == 1
    luts = ByteLuts.from_sentencepiece(tiny_sp)
    assert count_bytes(ids[:-1], ids[1:], luts) == normalized_bytes(tiny_sp, text)


def test_bytes_of_demo_val_equal_decoded_text(demo_data):
    """On real data with the 1024 vocab: the tables count exactly the bytes of every val document."""
    sp = load_tokenizer(demo_data / "tokenizers" / "shakespeare_1024_bpe.model")
    tokens = np.asarray(read_shard(next((demo_data / "datasets" / "shakespeare_sp1024").glob("fineweb_val_*.bin"))), dtype=np.int64)
    luts = ByteLuts.from_sentencepiece(sp, 1024)
    starts = list(np.flatnonzero(tokens == 1)) + [tokens.size]
    expected = sum(len(sp.decode(tokens[a + 1 : b].tolist()).encode()) for a, b in zip(starts, starts[1:]))
    assert count_bytes(tokens[:-1], tokens[1:], luts) == expected
    assert 2.0 < expected / tokens.size < 3.5  # bytes per token of a 1024-piece BPE on English


def test_bpb_from_sums():
    loss, bpb = bpb_from_sums(100 * math.log(2), 100, 50)
    assert loss == pytest.approx(math.log(2)) and bpb == pytest.approx(2.0)
    with pytest.raises(ValueError):
        bpb_from_sums(1.0, 0, 1)


def test_check_vocab(tiny_sp):
    check_vocab(tiny_sp, 1024, "t.model")
    check_vocab(tiny_sp, tiny_sp.vocab_size(), "t.model")
    with pytest.raises(UserError, match=f"tokenizer t.model has vocab {tiny_sp.vocab_size()} but model.vocab_size is 64"):
        check_vocab(tiny_sp, 64, "t.model")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="missing.model not found"):
        load_tokenizer(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="junk.model: not a readable SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
