"""`loopgolf data fetch|list` against a stand-in Hub on 127.0.0.1 (tests/hub_server.py), no network.

The repo is upstream's layout with two variants: fineweb10B_sp1024 (the demo's shards and tokenizer under
upstream's names: 1 val shard, 2 train shards of the manifest's shard_size 1,000,000) and fineweb10B_sp320
(a second tokenizer trained on the demo's val text, 1 val and 1 train shard).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.bpb import ByteLuts, count_bytes
from core.errors import UserError
from core.manifest import read_manifest, resolve_data
from core.shards import read_shard, write_shard
from core.tokenizer import encode_documents, load_tokenizer, train_sentencepiece
from tests.hub_server import COMMIT, FakeHub

ROOT = Path(__file__).resolve().parents[1]
REPO = "willdepueoai/parameter-golf"
SP1024 = "datasets/fineweb10B_sp1024"
SP320 = "datasets/fineweb10B_sp320"
VAL = f"{SP1024}/fineweb_val_000000.bin"
TRAIN0, TRAIN1 = f"{SP1024}/fineweb_train_000000.bin", f"{SP1024}/fineweb_train_000001.bin"


# ---------------------------------------------------------------- the synthetic repo


def _stats(train: list[np.ndarray], val: list[np.ndarray], docs_train: int, docs_val: int) -> dict:
    return {"files_train": len(train), "files_val": len(val), "docs_train": docs_train, "docs_val": docs_val,
            "tokens_train": int(sum(a.size for a in train)), "tokens_val": int(sum(a.size for a in val))}


@pytest.fixture(scope="session")
def repo_files(demo_data, tmp_path_factory) -> dict[str, bytes]:
    """{path in the repo: bytes}: datasets/manifest.json, the shards and the tokenizers."""
    work = tmp_path_factory.mktemp("repo")
    demo = read_manifest(demo_data / "manifest.json")
    entry = demo.dataset("shakespeare_sp1024")
    tok = demo.tokenizer(entry.tokenizer_name)
    files: dict[str, bytes] = {}
    shards = {split: sorted((demo_data / entry.path).glob(f"fineweb_{split}_*.bin")) for split in ("val", "train")}
    for f in shards["val"] + shards["train"]:
        files[f"datasets/{SP1024}/{f.name}"] = f.read_bytes()
    for suffix in (".model", ".vocab"):
        source = (demo_data / tok.model_path).with_suffix(suffix)
        files[f"datasets/tokenizers/fineweb_1024_bpe{suffix}"] = source.read_bytes()

    # a second variant: its own tokenizer and shards, from the demo's val documents as text
    sp = load_tokenizer(demo_data / tok.model_path)
    val = np.asarray(read_shard(shards["val"][0]), dtype=np.int64)
    starts = list(np.flatnonzero(val == 1)) + [val.size]
    texts = [sp.decode(val[a + 1:b].tolist()) for a, b in zip(starts[:-1], starts[1:])]
    model = train_sentencepiece(texts, 320, work / "fineweb_320_bpe.model")
    sp320 = load_tokenizer(model)
    docs = encode_documents(sp320, texts)
    parts = {"val": [np.concatenate(docs[:8])], "train": [np.concatenate(docs[8:])]}
    for split, (arr,) in parts.items():
        write_shard(work / f"{split}.bin", arr)
        files[f"datasets/{SP320}/fineweb_{split}_000000.bin"] = (work / f"{split}.bin").read_bytes()
    files["datasets/tokenizers/fineweb_320_bpe.model"] = model.read_bytes()
    files["datasets/tokenizers/fineweb_320_bpe.vocab"] = model.with_suffix(".vocab").read_bytes()

    def tok_entry(vocab):
        return {"name": f"fineweb_{vocab}_bpe", "kind": "sentencepiece_bpe", "vocab_size": vocab, "bos_id": 1,
                "eos_id": 2, "model_path": f"tokenizers/fineweb_{vocab}_bpe.model",
                "vocab_path": f"tokenizers/fineweb_{vocab}_bpe.vocab", "recommended_bigram_vocab_size": 2 * vocab}

    def ds_entry(name, vocab, stats):
        return {"name": name, "tokenizer_name": f"fineweb_{vocab}_bpe", "tokenizer_kind": "sentencepiece_bpe",
                "path": f"datasets/{name}", "train_glob": f"datasets/{name}/fineweb_train_*.bin",
                "val_glob": f"datasets/{name}/fineweb_val_*.bin", "vocab_size": vocab, "bos_id": 1, "eos_id": 2,
                "stats": stats}

    sp1024_stats = {"files_train": entry.stats.files_train, "files_val": entry.stats.files_val,
                    "docs_train": entry.stats.docs_train, "docs_val": entry.stats.docs_val,
                    "tokens_train": entry.stats.tokens_train, "tokens_val": entry.stats.tokens_val}
    manifest = {
        "version": "10B", "num_docs": demo.num_docs, "num_val_docs": demo.num_val_docs, "shuffle_seed": 1337,
        "shard_size": demo.shard_size, "append_eos": False, "docs_meta": {"remote_repo_id": REPO},
        "tokenizers": [tok_entry(1024), tok_entry(320)],
        "datasets": [ds_entry("fineweb10B_sp1024", 1024, sp1024_stats),
                     ds_entry("fineweb10B_sp320", 320, _stats(parts["train"], parts["val"], len(docs) - 8, 8))],
    }
    files["datasets/manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode()
    return files


@pytest.fixture()
def hub(repo_files, monkeypatch):
    from huggingface_hub import constants

    server = FakeHub(REPO, repo_files)
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    for name in ("HF_HUB_OFFLINE", "MATCHED_FINEWEB_REPO_ID", "MATCHED_FINEWEB_REMOTE_ROOT_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    # bounded in time: a stuck request fails in seconds, not huggingface_hub's default 10 s per try
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 5)
    yield server
    server.stop()


@pytest.fixture()
def fetch(tmp_path, capsys):
    """fetch(*args) -> (exit code, stdout, stderr) of `loopgolf data fetch --out tmp/data` with its own cache."""
    from tools.cli import main

    def run(*args, out=None, command="fetch"):
        capsys.readouterr()
        target = ["--out", str(out or tmp_path / "data")]
        code = main(["data", command, *target, "--cache-dir", str(tmp_path / "cache"), *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def repo_path(rel: str) -> str:
    return f"datasets/{rel}"


def assert_same(out: Path, hub: FakeHub, rel: str) -> None:
    assert (out / rel).read_bytes() == hub.files[repo_path(rel)], rel


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".incomplete"))]


# ---------------------------------------------------------------- fetch


def test_full_fetch_lands_in_upstreams_layout_hard_linked_from_the_cache(hub, fetch, tmp_path):
    code, out, err = fetch("--variant", "sp1024")
    assert code == 0, err
    data = tmp_path / "data"
    for rel in (VAL, TRAIN0, TRAIN1, "tokenizers/fineweb_1024_bpe.model", "tokenizers/fineweb_1024_bpe.vocab"):
        assert_same(data, hub, rel)
        assert (data / rel).stat().st_nlink >= 2, f"{rel} is not a hard link into the cache"
    assert not (data / SP320).exists()
    paths = resolve_data(data, "fineweb10B_sp1024")
    assert [p.name for p in paths.train_files] == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    assert paths.tokenizer_path == data / "tokenizers/fineweb_1024_bpe.model" and paths.vocab_size == 1024
    local = read_manifest(data / "manifest.json")
    assert [d.name for d in local.datasets] == ["fineweb10B_sp1024"] and local.version == "10B"
    assert local.extra["docs_meta"] == {"remote_repo_id": REPO}  # upstream's keys we do not model survive
    summary = out.strip().splitlines()[-1]
    total = sum(len(hub.files[repo_path(r)]) for r in (VAL, TRAIN0, TRAIN1)) + sum(
        len(hub.files[f"datasets/tokenizers/fineweb_1024_bpe{s}"]) for s in (".model", ".vocab"))
    assert f"5 files in {data}: 5 downloaded ({total:,} bytes), 0 from the Hub cache, 0 already present" in summary
    # after the manifest, every file is asked for at the manifest's commit: a repo updated mid-fetch cannot mix exports
    assert hub.revisions[:2] == ["main", "main"] and set(hub.revisions[2:]) == {COMMIT}, hub.revisions
    assert sorted(hub.gets()) == sorted(["datasets/manifest.json", *map(repo_path, [VAL, TRAIN0, TRAIN1]),
                                         "datasets/tokenizers/fineweb_1024_bpe.model",
                                         "datasets/tokenizers/fineweb_1024_bpe.vocab"])
    assert not leftovers(tmp_path)


def test_train_shards_1_then_a_second_fetch_downloads_nothing(hub, fetch, tmp_path):
    code, out, err = fetch("--variant", "sp1024", "--train-shards", "1")
    assert code == 0, err
    data = tmp_path / "data"
    assert_same(data, hub, VAL)
    assert_same(data, hub, TRAIN0)
    assert not (data / TRAIN1).exists()
    assert len(resolve_data(data, "fineweb10B_sp1024").train_files) == 1

    hub.clear()
    code, out, err = fetch("--variant", "sp1024", "--train-shards", "1")
    assert code == 0, err
    assert hub.gets() == [], "a second fetch downloaded something"
    assert [m for m, _, _ in hub.requests] == ["HEAD"]  # only the manifest's freshness
    assert "4 files in" in out and "0 downloaded (0 bytes), 0 from the Hub cache, 4 already present" in out, out

    code, _, err = fetch("--variant", "sp1024", "--train-shards", "3")
    assert code == 2 and "--train-shards 3" in err and "has 2 train shards" in err, err


def test_a_connection_dropped_mid_file_is_resumed_with_a_range_request(hub, fetch, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # huggingface_hub keeps what it received in whole chunks (10 MB by default, a twentieth of a real shard);
    # smaller chunks let a 2 MB test shard stand for one
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    cut = 300_000
    hub.drop_after[repo_path(TRAIN0)] = cut
    code, out, err = fetch("--variant", "sp1024", "--train-shards", "1")
    assert code == 0, err
    assert_same(tmp_path / "data", hub, TRAIN0)
    ranges = [r for m, p, r in hub.requests if p == repo_path(TRAIN0) and m == "GET"]
    assert ranges == [None, f"bytes={cut // (64 * 1024) * 64 * 1024}-"], ranges  # the second GET asks for the rest
    assert not leftovers(tmp_path)


def test_a_404_for_a_listed_file_is_one_line_and_the_next_fetch_carries_on(hub, fetch, tmp_path):
    hub.missing.add(repo_path(TRAIN1))
    code, out, err = fetch("--variant", "sp1024")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("loopgolf: error: "), err
    assert f"{REPO}:datasets/{TRAIN1} not found" in err and "the manifest names it" in err, err
    data = tmp_path / "data"
    assert not (data / TRAIN1).exists() and not leftovers(tmp_path)
    assert_same(data, hub, TRAIN0)  # what came before it is complete
    assert not (data / "manifest.json").exists()  # nothing counts the dataset as fetched yet

    hub.missing.clear()
    hub.clear()
    code, out, err = fetch("--variant", "sp1024")
    assert code == 0, err
    assert sorted(p for p in hub.gets()) == ["datasets/" + TRAIN1]
    assert_same(data, hub, TRAIN1)
    assert "1 downloaded" in out and "4 already present" in out, out


def test_a_local_shard_whose_size_disagrees_with_the_manifest_is_refetched(hub, fetch, tmp_path):
    assert fetch("--variant", "sp1024")[0] == 0
    data = tmp_path / "data"
    # a well-formed shard with fewer tokens than the manifest implies (a new file: the cache is intact)
    write_shard(data / TRAIN0, np.asarray(read_shard(data / TRAIN0))[:-10])
    # a truncated shard, cut in place: through the hard link, the cache's copy is cut too
    with open(data / VAL, "r+b") as f:
        f.truncate(5000)
    hub.clear()
    code, out, err = fetch("--variant", "sp1024")
    assert code == 0, err
    assert_same(data, hub, TRAIN0)
    assert_same(data, hub, VAL)
    assert f"{data / TRAIN0}: holds 999990 tokens; the manifest implies 1000000; fetching it again" in out, out
    assert "truncated or corrupt" in out and "the cached copy" in out, out
    assert hub.gets() == [repo_path(VAL)]  # TRAIN0 came back from the cache; the cut VAL had to be downloaded


def test_a_remote_shard_that_disagrees_with_the_manifest_is_refused(hub, fetch, tmp_path):
    good = hub.files[repo_path(TRAIN1)]
    short = bytearray(good[:-20])
    short[8:12] = ((len(short) - 1024) // 2).to_bytes(4, "little")  # a self-consistent, shorter shard
    hub.serve_instead[repo_path(TRAIN1)] = bytes(short)
    code, out, err = fetch("--variant", "sp1024")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "disagrees with its manifest" in err and "fineweb_train_000001.bin" in err, err
    assert not (tmp_path / "data" / TRAIN1).exists() and not leftovers(tmp_path)
    assert [p for p in hub.gets() if p.endswith("000001.bin")] == [repo_path(TRAIN1)] * 2  # downloaded again once


def test_offline_from_the_cache(hub, fetch, tmp_path, monkeypatch):
    assert fetch("--variant", "sp1024", "--train-shards", "1")[0] == 0
    hub.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = fetch("--variant", "sp1024", "--train-shards", "1", out=tmp_path / "elsewhere")
    assert code == 0, err
    assert hub.requests == [], "offline mode talked to the server"
    assert_same(tmp_path / "elsewhere", hub, TRAIN0)
    assert "(offline)" in out and "4 from the Hub cache" in out, out
    code, _, err = fetch("--variant", "sp1024", "--train-shards", "2", out=tmp_path / "elsewhere")
    assert code == 2 and "HF_HUB_OFFLINE=1" in err and "fineweb_train_000001.bin" in err, err
    assert hub.requests == []


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--variant", "sp4096"], "has no dataset fineweb10B_sp4096; it offers fineweb10B_sp1024, fineweb10B_sp320"),
        (["--variant", "bpe"], "--variant 'bpe': expected sp<VOCAB>"),
        (["--train-shards", "-1"], "--train-shards -1"),
        (["--repo-id", "someone/else"], "dataset repo someone/else not found"),
        (["--revision", "v9"], "revision 'v9'"),
        (["--remote-prefix", "nowhere"], f"{REPO}:nowhere/manifest.json not found"),
    ],
)
def test_bad_requests_are_one_line(hub, fetch, tmp_path, args, fragment):
    code, out, err = fetch(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
    assert not (tmp_path / "data" / "manifest.json").exists()


def test_repo_and_prefix_from_upstreams_environment_variables(hub, fetch, tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHED_FINEWEB_REPO_ID", "someone/else")
    code, _, err = fetch("--train-shards", "0")
    assert code == 2 and "someone/else" in err, err
    code, _, err = fetch("--train-shards", "0", "--repo-id", REPO)  # the flag wins
    assert code == 0, err
    monkeypatch.setenv("MATCHED_FINEWEB_REMOTE_ROOT_PREFIX", "export50B")
    code, _, err = fetch("--train-shards", "0", "--repo-id", REPO)
    assert code == 2 and f"{REPO}:export50B/manifest.json" in err, err


# ---------------------------------------------------------------- list, mini shards, configs


def test_list_shows_what_is_offered_and_what_is_on_disk(hub, fetch, tmp_path, demo_data):
    data = tmp_path / "data"
    shutil.copytree(demo_data, data)  # the demo first, then a fetch into the same root keeps it
    assert fetch("--variant", "sp1024", "--train-shards", "1")[0] == 0
    with open(data / TRAIN0, "r+b") as f:  # a corrupt shard does not count
        f.truncate(2000)
    code, out, err = fetch(command="list")
    assert code == 0, err
    rows = {cells[1]: cells for cells in (line.split() for line in out.splitlines()) if len(cells) > 5}
    assert rows["fineweb10B_sp1024"][:6] == ["sp1024", "fineweb10B_sp1024", "1024", "fineweb_1024_bpe", "1/1", "0/2"]
    assert rows["fineweb10B_sp320"][4:6] == ["0/1", "0/1"]
    assert rows["shakespeare_sp1024"][0] == "(local)" and rows["shakespeare_sp1024"][4:6] == ["1/1", "2/2"]
    assert f"{REPO}:datasets/manifest.json @ {COMMIT[:12]}" in out


def test_list_without_the_repo_shows_the_local_datasets_or_says_why(hub, fetch, tmp_path, demo_data):
    code, _, err = fetch("--repo-id", "someone/else", command="list")
    assert code == 2 and "dataset repo someone/else not found" in err, err  # nothing local to show either
    shutil.copytree(demo_data, tmp_path / "data")
    code, out, err = fetch("--repo-id", "someone/else", command="list")
    assert code == 0, err
    assert "someone/else:datasets/manifest.json: unavailable (dataset repo someone/else not found" in out, out
    assert "(local)  shakespeare_sp1024" in out, out


def test_make_mini_shards_cuts_a_laptop_set_from_a_fetch_of_two_variants(hub, fetch, tmp_path, capsys):
    from tools.make_mini_shards import main as mini

    data = tmp_path / "data"
    assert fetch("--variant", "sp1024", "--train-shards", "1")[0] == 0
    assert fetch("--variant", "sp320")[0] == 0
    assert {d.name for d in read_manifest(data / "manifest.json").datasets} == {"fineweb10B_sp1024", "fineweb10B_sp320"}

    common = ["--src", str(data), "--train-tokens", "20000", "--val-tokens", "5000", "--out", str(tmp_path / "mini")]
    assert mini(common) == 2
    err = capsys.readouterr().err
    assert "lists several datasets (fineweb10B_sp1024, fineweb10B_sp320); name one with --dataset NAME" in err, err

    assert mini([*common, "--dataset", "fineweb10B_sp320"]) == 0
    src, small = resolve_data(data, "fineweb10B_sp320"), resolve_data(tmp_path / "mini")
    assert small.tokenizer_path.read_bytes() == src.tokenizer_path.read_bytes() and small.vocab_size == 320
    assert read_manifest(tmp_path / "mini" / "manifest.json").tokenizers[0].name == "fineweb_320_bpe"
    # the bytes behind val_bpb: the mini val split counts exactly what the same prefix of the full one does
    val = np.asarray(read_shard(small.val_files[0]), dtype=np.int64)
    full = np.asarray(read_shard(src.val_files[0]), dtype=np.int64)[: val.size]
    luts_small = ByteLuts.from_sentencepiece(load_tokenizer(small.tokenizer_path))
    luts_full = ByteLuts.from_sentencepiece(load_tokenizer(src.tokenizer_path))
    assert np.array_equal(val, full)
    assert count_bytes(val[:-1], val[1:], luts_small) == count_bytes(full[:-1], full[1:], luts_full) > 0


def test_shipped_configs_find_their_data_after_the_readme_fetch(hub, fetch, tmp_path, demo_data, monkeypatch):
    """README: `loopgolf data fetch --variant sp1024 --train-shards 1`, beside the demo, in ./data."""
    from core.config import load_config

    shutil.copytree(demo_data, tmp_path / "data")
    assert fetch("--variant", "sp1024", "--train-shards", "1")[0] == 0
    monkeypatch.chdir(tmp_path)
    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert len(configs) >= 8
    for path in configs:
        cfg = load_config(path, [])
        if cfg.data.dataset == "fineweb10B_sp8192":  # the records' configs: their variant, named in the error
            assert path.name.startswith("record_") and cfg.model.vocab_size == 8192, path.name
            with pytest.raises(UserError, match="no dataset named 'fineweb10B_sp8192'.*--variant sp8192"):
                resolve_data(cfg.data.path, cfg.data.dataset, cfg.data.tokenizer or None)
            continue
        data = resolve_data(cfg.data.path, cfg.data.dataset or None, cfg.data.tokenizer or None)
        assert data.vocab_size == cfg.model.vocab_size, path.name
        expected = "shakespeare_sp1024" if path.name == "demo.toml" else "fineweb10B_sp1024"
        assert data.dataset_entry.name == expected, path.name


def readme_real_data_commands() -> list[list[str]]:
    """The `loopgolf ...` lines of the README's Real data block, as argument lists (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("\n## Real data\n"):]
    block = section[section.index("```bash\n") + 8:]
    block = block[: block.index("```")]
    return [shlex.split(line, comments=True)[1:] for line in block.splitlines() if line.startswith("loopgolf ")]


def test_readme_real_data_block_fetches_sp1024_and_trains_a_shipped_config():
    commands = readme_real_data_commands()
    assert ["data", "fetch", "--variant", "sp1024", "--train-shards", "1"] in commands
    trains = [c for c in commands if c[0] == "train"]
    assert trains and all(c[1:3] == ["--config", "configs/ut_3x4.toml"] for c in trains), trains


# ---------------------------------------------------------------- the real command, in its own process


@pytest.mark.slow
def test_console_fetch_then_train_as_the_readme_says(hub, tmp_path):
    """From a fresh directory: the README's fetch through the environment alone (HF_ENDPOINT, HF_HOME), then
    its quick training command (cut to 2 steps), then the same fetch offline into an empty data root."""
    env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_OFFLINE", None)
    cli = [sys.executable, "-m", "tools.cli"]
    work = tmp_path / "fresh"
    work.mkdir()
    shutil.copytree(ROOT / "configs", work / "configs")

    def run(*args, extra_env=None):
        proc = subprocess.run([*cli, *args], cwd=work, env={**env, **(extra_env or {})}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    fetch_cmd, quick = (next(c for c in readme_real_data_commands() if c[0] == what and "--profile" not in c)
                        for what in ("data", "train"))
    out = run(*fetch_cmd)
    assert "data fetch: 4 files in data: 4 downloaded" in out, out
    assert any((tmp_path / "hf" / "hub").glob("datasets--willdepueoai--parameter-golf/blobs/*"))
    out = run(*quick, "--backend", "torch", "--set", "train.iterations=2", "--set", "train.warmup_steps=0",
              "--set", "train.val_max_tokens=4096", "--out", "runs/r")
    assert "done: val_bpb" in out, out[-2000:]
    hub.clear()
    shutil.rmtree(work / "data")
    out = run("data", "fetch", "--variant", "sp1024", "--train-shards", "1", extra_env={"HF_HUB_OFFLINE": "1"})
    assert "4 from the Hub cache" in out and hub.requests == [], out
