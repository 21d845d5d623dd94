from __future__ import annotations

import json

import numpy as np
import pytest

from core.manifest import read_manifest, resolve_data
from core.shards import read_shard, shard_name, write_shard
from core.tokenizer import load_tokenizer
from tools.make_mini_shards import main, play_documents, split_documents, write_split

DEMO_TOKENIZER = "tokenizers/shakespeare_1024_bpe.model"


def documents_of(files) -> list[tuple[int, ...]]:
    """Token sequences between BOS markers (a document may straddle shards)."""
    tokens = np.concatenate([np.asarray(read_shard(f)) for f in files])
    starts = list(np.flatnonzero(tokens == 1)) + [tokens.size]
    return [tuple(tokens[a:b].tolist()) for a, b in zip(starts, starts[1:])]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("make_mini_shards: error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------- demo


def test_demo_end_to_end(demo_data):
    paths = resolve_data(demo_data)
    m = read_manifest(demo_data / "manifest.json")
    (ds,) = m.datasets
    (tok,) = m.tokenizers
    assert ds.name == "shakespeare_sp1024" and tok.name == "shakespeare_1024_bpe" and ds.tokenizer_name == tok.name
    assert load_tokenizer(demo_data / tok.model_path).vocab_size() == 1024 == ds.vocab_size == tok.vocab_size
    assert (demo_data / tok.vocab_path).is_file()
    s = ds.stats
    assert s.files_train == len(paths.train_files) >= 2 and s.files_val == len(paths.val_files) == 1
    assert sum(read_shard(f).size for f in paths.train_files) == s.tokens_train
    assert sum(read_shard(f).size for f in paths.val_files) == s.tokens_val
    train_docs, val_docs = documents_of(paths.train_files), documents_of(paths.val_files)
    assert (len(train_docs), len(val_docs)) == (s.docs_train, s.docs_val)
    assert m.num_docs == s.docs_train + s.docs_val and m.num_val_docs == s.docs_val
    assert 0.03 < s.docs_val / m.num_docs < 0.07
    assert not set(train_docs) & set(val_docs)  # whole documents held out
    assert all(2 not in d for d in train_docs[:50])  # no EOS, as upstream


def test_play_documents_strip_markdown():
    md = (
        "# Some Play\n\n## ACT I\n\n### SCENE I. A heath.\n\n_Thunder. Enter three Witches_\n\n"
        "**FIRST WITCH**  \nWhen shall we three meet again  \nIn thunder, lightning, or in rain?\n\n"
        "__\\[Aside]_  \nFair is foul\\--and foul is fair.\n\n### SCENE II. A camp.\n\n**DUNCAN**  \nWhat bloody man?\n"
    )
    docs = play_documents(md)
    assert docs == [
        "Some Play\nACT I\nSCENE I. A heath.\n\nThunder. Enter three Witches\n\nFIRST WITCH\n"
        "When shall we three meet again\nIn thunder, lightning, or in rain?\n\n[Aside]\nFair is foul--and foul is fair.",
        "Some Play\nACT I\nSCENE II. A camp.\n\nDUNCAN\nWhat bloody man?",
    ]


def test_split_documents_whole_and_deterministic():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.05, 1337)
    assert len(val) == 5 and sorted(train + val) == sorted(docs)
    assert split_documents(docs, 0.05, 1337) == (train, val)
    assert split_documents(docs, 0.05, 7) != (train, val)


def test_write_split_straddles_shards_and_removes_stale(tmp_path):
    write_shard(tmp_path / shard_name("train", 5), [1, 2])  # left over from an earlier export
    docs = [np.array([1, 5, 6, 7]), np.array([1, 8]), np.array([1, 9, 10])]
    assert write_split(tmp_path, "train", docs, 4) == (3, 3, 9)
    assert [read_shard(tmp_path / shard_name("train", i)).tolist() for i in range(3)] == [[1, 5, 6, 7], [1, 8, 1, 9], [10]]
    assert not (tmp_path / shard_name("train", 5)).exists()


# ---------------------------------------------------------------- --src


def test_src_subset(demo_data, tmp_path, capsys):
    out = tmp_path / "mini"
    rc = main(["--src", str(demo_data), "--train-tokens", "1000", "--val-tokens", "500", "--train-shards", "2", "--out", str(out)])
    assert rc == 0
    src, mini = resolve_data(demo_data), resolve_data(out)
    assert mini.dataset_dir.name == "shakespeare_sp1024" and mini.vocab_size == 1024
    for i in range(2):
        assert np.array_equal(read_shard(mini.train_files[i]), read_shard(src.train_files[i])[:1000])
    assert np.array_equal(read_shard(mini.val_files[0]), read_shard(src.val_files[0])[:500])
    assert mini.tokenizer_path.read_bytes() == src.tokenizer_path.read_bytes()
    s = mini.dataset_entry.stats
    assert (s.files_train, s.tokens_train, s.files_val, s.tokens_val) == (2, 2000, 1, 500)
    assert s.docs_val == int((read_shard(mini.val_files[0]) == 1).sum()) >= 1
    assert "not comparable" in capsys.readouterr().out


def test_src_dataset_dir_with_tokenizer_and_multiple_val_shards(demo_data, tmp_path):
    src = tmp_path / "bare"
    src.mkdir()
    write_shard(src / shard_name("train", 0), np.arange(1, 300) % 1024)
    write_shard(src / shard_name("val", 0), np.arange(300))
    write_shard(src / shard_name("val", 1), np.arange(300, 600))
    tok = demo_data / DEMO_TOKENIZER
    rc = main(["--src", str(src), "--tokenizer", str(tok), "--train-tokens", "100", "--val-tokens", "450",
               "--out", str(tmp_path / "out"), "--name", "mini"])
    assert rc == 0
    mini = resolve_data(tmp_path / "out", dataset="mini")
    assert np.array_equal(read_shard(mini.val_files[0]), np.arange(450))
    assert read_shard(mini.train_files[0]).size == 100


def test_src_errors(demo_data, tmp_path, capsys):
    assert main(["--src", str(demo_data), "--train-shards", "9", "--out", str(tmp_path)]) == 2
    assert "--train-shards 9" in one_error_line(capsys)
    assert main(["--src", str(demo_data), "--out", str(demo_data)]) == 2
    assert "would overwrite the source shards" in one_error_line(capsys)
    assert main(["--src", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "make_mini_shards --demo --out data" in one_error_line(capsys)


# ---------------------------------------------------------------- --text


@pytest.fixture
def text_files(tmp_path):
    lines = [
        "Call me Ishmael. Some years ago, never mind how long precisely, having little money in my purse.",
        "It was the best of times, it was the worst of times, it was the age of wisdom.",
        "In a hole in the ground there lived a hobbit. Not a nasty, dirty, wet hole, 1937.",
        "Happy families are all alike; every unhappy family is unhappy in its own way.",
    ]
    txt = []
    for i, line in enumerate(lines):
        path = tmp_path / f"doc{i}.txt"
        path.write_text((line + "\n") * 5, encoding="utf-8")
        txt.append(path)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"{l} Number {i}.", "id": i}) + "\n" for i, l in enumerate(lines * 4)))
    return txt, jsonl


def test_text_trains_tokenizer(text_files, tmp_path):
    txt, jsonl = text_files
    out = tmp_path / "out"
    rc = main(["--text", *map(str, txt), str(jsonl), "--vocab-size", "300", "--val-fraction", "0.1", "--out", str(out)])
    assert rc == 0
    paths = resolve_data(out)
    m = paths.manifest
    assert paths.dataset_dir.name == "text_sp300" and m.tokenizers[0].name == "text_300_bpe"
    assert m.num_docs == 4 + 16 and m.num_val_docs == 2
    assert len(documents_of(paths.train_files)) == 18 and len(documents_of(paths.val_files)) == 2


def test_text_with_given_tokenizer(demo_data, text_files, tmp_path):
    _, jsonl = text_files
    out = tmp_path / "out"
    rc = main(["--text", str(jsonl), "--tokenizer", str(demo_data / DEMO_TOKENIZER), "--name", "novels", "--out", str(out)])
    assert rc == 0
    paths = resolve_data(out)
    assert paths.dataset_dir.name == "novels" and paths.tokenizer_path.name == "shakespeare_1024_bpe.model"
    assert paths.tokenizer_path.read_bytes() == (demo_data / DEMO_TOKENIZER).read_bytes()


def test_text_bad_jsonl_line_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"txt": "wrong key"}\n')
    assert main(["--text", str(bad), "--vocab-size", "300", "--out", str(tmp_path / "o")]) == 2
    assert f"{bad}:3: expected a JSON object" in one_error_line(capsys)


@pytest.mark.parametrize(
    "argv,expect",
    [
        (["--out", "x"], "one of the arguments --demo --src --text is required"),
        (["--text", "a.txt", "--out", "x"], "--text needs --vocab-size"),
        (["--demo", "--out", "x", "--vocab-size", "0"], "expected a positive integer"),
        (["--demo", "--out", "x", "--vocab-size", "500", "--tokenizer", "t.model"], "not both"),
        (["--text", "missing.txt", "--vocab-size", "300", "--out", "x"], "missing.txt not found"),
    ],
)
def test_cli_errors_are_one_line(argv, expect, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert expect in one_error_line(capsys)
    assert not (tmp_path / "x").exists()
