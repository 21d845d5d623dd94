"""Hostile inputs and faults, command by command: each case makes one bad input (or fault), runs the command,
and asserts what the README's "Reliability" section promises: one line naming the file or key, the exit
code, and nothing temporary or half-written left behind (and, for a refusal, nothing changed at all).

To add a case, add one entry to CASES: `make` builds the bad input under the test's directory and returns
the command line; `expect` holds fragments of the one error line ({tmp} and {data} stand for those
directories). Cases that train or run a subprocess are marked slow. tests/test_fuzz_parsers.py fuzzes the
file readers themselves.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from core import rundir
from core.artifact import MAGIC, _PREFIX
from core.errors import UserError
from core.shards import read_shard, write_shard

ROOT = Path(__file__).resolve().parents[1]
DATASET = "datasets/shakespeare_sp1024"
TRAIN = ["train", "--config", "configs/demo.toml", "--small", "--backend", "torch", "--set", "train.iterations=1",
         "--set", "train.warmup_steps=0", "--set", "train.val_max_tokens=1024"]
TEMPORARY = (".tmp", ".del", rundir.LOCK_NAME)  # what a finished or failed command must not leave behind


class Ctx:
    """The test's directory, with helpers that make bad inputs in it."""

    def __init__(self, tmp: Path, demo: Path):
        self.tmp, self.demo, self._data = tmp, demo, None

    @property
    def data(self) -> Path:
        """A private copy of the demo data root, made on first use (the demo data is shared and read-only)."""
        if self._data is None:
            self._data = Path(shutil.copytree(self.demo, self.tmp / "data"))
        return self._data

    def shard(self, split: str, index: int = 0) -> Path:
        return self.data / DATASET / f"fineweb_{split}_{index:06d}.bin"

    def file(self, name: str, content: bytes | str) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def train(self, *argv: str, out: str = "run") -> list[str]:
        return [*TRAIN, "--data", str(self.data), "--out", str(self.tmp / out), *argv]

    def export(self, out: Path, *argv: str) -> list[str]:
        """make_mini_shards on a small text (fast: no Shakespeare to read, a 300-piece tokenizer to train)."""
        docs = "".join(json.dumps({"text": f"Document {i}: a small corpus of words, and more words."}) + "\n"
                       for i in range(100))
        return ["--text", str(self.file("docs.jsonl", docs)), "--vocab-size", "300", "--out", str(out), *argv]

    def names(self) -> dict:
        return {"tmp": self.tmp, "data": self.tmp / "data"}


@dataclass(frozen=True)
class Case:
    make: Callable[[Ctx], list[str]]  # builds the bad input; returns the command's arguments
    expect: tuple[str, ...]  # fragments of the one error line
    code: int = 2
    tool: str = "loopgolf"  # or "make_mini_shards"
    changes: bool = False  # the command may leave files (a run that started); still no temporary ones
    fault: Callable[[pytest.MonkeyPatch, Ctx], None] | None = None  # an injected OS fault or interrupt
    peak_mib: int | None = None  # the most memory (Python allocations) the command may take
    slow: bool = False


# ---- bad inputs ----------------------------------------------------------------------------------------

def put_token(path: Path, position: int, token: int) -> None:
    tokens = np.array(read_shard(path))
    tokens[position] = token
    write_shard(path, tokens)


def bad_token(split: str, index: int = 0, position: int = 100):
    def make(c: Ctx) -> list[str]:
        put_token(c.shard(split, index), position, 5000)
        return c.train()
    return make


def late_bad_token(c: Ctx) -> list[str]:
    """A bad id in the second train shard, reached after the first step: found when that shard is mapped."""
    first = np.array(read_shard(c.shard("train", 0)))
    write_shard(c.shard("train", 0), first[:600])
    second = np.array(read_shard(c.shard("train", 1)))[:5000]
    second[10] = 4096
    write_shard(c.shard("train", 1), second)
    return c.train("--set", "train.iterations=3")


def zstd_rle_bomb(inflated: int) -> bytes:
    """A zstd frame with no content size whose RLE blocks (4 bytes per 128 KiB) inflate to `inflated` bytes."""
    frame = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")  # magic; no content size, no checksum; a 128 KiB window
    blocks = -(-inflated // (1 << 17))
    for i in range(blocks):
        size = min(1 << 17, inflated - i * (1 << 17))
        frame += ((i == blocks - 1) | 1 << 1 | size << 3).to_bytes(3, "little") + b"\0"
    return bytes(frame)


def bomb(codec: str):
    """An artifact whose prefix declares a 1 MiB payload but whose stream inflates far past it."""
    import lzma

    body = {"zstd": lambda: zstd_rle_bomb(2 << 30),  # 65 KB -> 2 GiB, the bomb
            "zlib": lambda: zlib.compress(bytes(16 << 20), 9),
            "lzma": lambda: lzma.compress(bytes(16 << 20), format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE),
            "brotli": lambda: __import__("brotli").compress(bytes(64 << 20), quality=1)}[codec]()
    level = {"zstd": 22, "zlib": 9, "lzma": 9, "brotli": 11}[codec]

    def make(c: Ctx) -> list[str]:
        art = c.file("bomb.art", _PREFIX.pack(MAGIC, 1, f"{codec}-{level}".encode(), 1 << 20, bytes(32)) + body)
        return ["eval", "--artifact", str(art), "--data", str(c.demo)]
    return make


def manifest_vocab(c: Ctx) -> list[str]:
    path = c.data / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["datasets"][0]["vocab_size"] = 512
    path.write_text(json.dumps(manifest))
    return c.train()


def small_tokenizer(c: Ctx) -> Path:
    from core.tokenizer import train_sentencepiece

    docs = [f"line {i} of a tiny corpus, with words and more words" for i in range(200)]  # any text will do
    return train_sentencepiece(docs, 300, c.tmp / "other" / "shakespeare_1024_bpe.model")


def swapped_tokenizer(c: Ctx) -> list[str]:
    """The tokenizer file replaced by one of another vocabulary (same name): the manifest's size catches it."""
    shutil.copy(small_tokenizer(c), c.data / "tokenizers" / "shakespeare_1024_bpe.model")
    return c.train()


def bare_dataset_small_tokenizer(c: Ctx) -> list[str]:
    """No manifest to compare with: the val shards' ids, past the tokenizer's vocabulary, catch it."""
    bare = Path(shutil.copytree(c.demo / DATASET, c.tmp / "bare" / Path(DATASET).name))
    return [*TRAIN, "--data", str(bare), "--set", f'data.tokenizer="{small_tokenizer(c)}"', "--out", str(c.tmp / "run")]


def locked_by_this_process(c: Ctx) -> list[str]:
    c.lock = rundir.acquire(c.tmp / "run")  # a live owner: this test process (released after the command)
    return c.train()


def earlier_run(c: Ctx, names=("config.toml", "train.log", "metrics.jsonl")) -> Path:
    """What a run killed before its first checkpoint leaves (or just the files named)."""
    for name in names:
        c.file(f"run/{name}", '{"event": "start"}\n' if name == "metrics.jsonl" else "x\n")
    return c.tmp / "run"


def over_earlier_run(c: Ctx) -> list[str]:
    earlier_run(c)
    return c.train()


def force_deletes_init(c: Ctx) -> list[str]:
    return c.train("--force", "--init", str(earlier_run(c, ["model.safetensors"]) / "model.safetensors"))


def checkpoints_is_a_file(c: Ctx) -> list[str]:
    c.file("run/checkpoints", "x")
    return c.train("--resume")


def out_under_a_file(c: Ctx) -> list[str]:
    c.file("file", "x")
    return c.train(out="file/run")


def nested_manifest(c: Ctx) -> list[str]:
    (c.data / "manifest.json").write_text("[" * 100000)
    return c.train()


def weights(c: Ctx, nan: bool = False) -> Path:
    from core.config import load_config
    from core.params import init_weights
    from core.weights import save_weights

    spec = load_config(ROOT / "configs/demo.toml", small=True).model
    w = init_weights(spec, 0)
    if nan:
        w["blocks.0.mlp.fc.weight"][3, 4] = np.nan
    path = c.tmp / "w" / ("nan.safetensors" if nan else "ok.safetensors")
    save_weights(path, spec, w)
    return path


def fsync_enospc(monkeypatch, c: Ctx) -> None:
    """A full disk, as fsync reports it (delayed allocation): every atomic write and checkpoint fsyncs."""
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", full)


def read_only(under: str):
    """EROFS for every file created under tmp/`under`, as on a read-only mount (chmod cannot stop root)."""
    def fault(monkeypatch, c: Ctx) -> None:
        real, target = os.open, str(c.tmp / under)

        def refuse(path, flags, *args, **kwargs):
            if str(path).startswith(target) and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real(path, flags, *args, **kwargs)
        monkeypatch.setattr(os, "open", refuse)
    return fault


def interrupt_at_shard(n: int):
    """Ctrl-C while make_mini_shards writes its n-th shard."""
    def fault(monkeypatch, c: Ctx) -> None:
        import tools.make_mini_shards as mms

        real, calls = mms.write_shard, []

        def write(path, tokens):
            calls.append(path)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(path, tokens)
        monkeypatch.setattr(mms, "write_shard", write)
    return fault


SLOW = {"slow": True}
ONE_MIB = "inflates to more than the declared 1048576 bytes"

CASES: dict[str, Case] = {
    # 1. token ids past the vocabulary (MLX died with a segfault, torch with an IndexError)
    "train shard id >= vocab (torch)": Case(bad_token("train"), ("fineweb_train_000000.bin", "token id 5000", "1024")),
    "train shard id >= vocab (mlx)": Case(lambda c: [*bad_token("train")(c), "--backend", "mlx"],
                                          ("fineweb_train_000000.bin", "token id 5000")),
    "val shard id >= vocab": Case(bad_token("val"), ("fineweb_val_000000.bin", "token id 5000")),
    "id >= vocab in a later shard": Case(late_bad_token, ("fineweb_train_000001.bin", "token id 4096"),
                                         changes=True, **SLOW),
    # 2. decompression bombs: the cap holds for every codec, whatever the stream's header says
    "zstd bomb, no content size": Case(bomb("zstd"), ("{tmp}/bomb.art", ONE_MIB), peak_mib=160),
    "zlib bomb": Case(bomb("zlib"), ("{tmp}/bomb.art", ONE_MIB)),
    "lzma bomb": Case(bomb("lzma"), ("{tmp}/bomb.art", ONE_MIB)),
    "brotli bomb": Case(bomb("brotli"), ("{tmp}/bomb.art", ONE_MIB), peak_mib=160),
    # 3. a tokenizer that does not match the shards
    "manifest vocab differs from the tokenizer": Case(manifest_vocab, ("records vocab_size 512", "vocab 1024")),
    "tokenizer file swapped for a smaller one": Case(swapped_tokenizer, ("has vocab 300", "records vocab_size 1024")),
    "no manifest, smaller tokenizer": Case(bare_dataset_small_tokenizer, ("fineweb_val_000000.bin", "300 ids")),
    # 4. one run per directory (two real runs: test_two_runs_into_one_directory_and_a_killed_owner)
    "run directory in use": Case(locked_by_this_process, ("{tmp}/run is in use by another run", f"pid {os.getpid()}")),
    # 5. OS errors: one line naming the path and the error
    "--out under a regular file": Case(out_under_a_file, ("{tmp}/file/run", "Not a directory")),
    "full disk (train)": Case(lambda c: c.train(), ("{tmp}/run/config.toml", "No space left on device"),
                              fault=fsync_enospc),
    "read-only --out (train)": Case(lambda c: c.train(), ("{tmp}/run", "Read-only file system"),
                                    fault=read_only("run")),
    "full disk (make_mini_shards)": Case(lambda c: c.export(c.tmp / "out"),
                                         ("{tmp}/out/tokenizers/text_300_bpe.model", "No space left on device"),
                                         tool="make_mini_shards", fault=fsync_enospc),
    "--out under a regular file (make_mini_shards)": Case(lambda c: c.export(c.file("file", "x") / "out"),
                                                          ("{tmp}/file/out", "Not a directory"),
                                                          tool="make_mini_shards"),
    "read-only --out (quantize)": Case(lambda c: ["quantize", str(weights(c)), "--out", str(c.tmp / "ro" / "q.art")],
                                       ("{tmp}/ro/q.art", "Read-only file system"), fault=read_only("ro")),
    # 6. impossible sizes, refused before anything is allocated (and without a hang: test_impossible_plan_...)
    "model_dim 1e9": Case(lambda c: c.train("--set", "model.model_dim=1000000000"),
                          ("parameters", "model_dim 1,000,000,000", "TiB")),
    "layer_plan 1x100000000 --dry-run": Case(lambda c: [*c.train("--set", "model.layer_plan=1x100000000"), "--dry-run"],
                                             ("model.layer_plan = '1x100000000'", "100,000,000", "at most 4,096")),
    "num_blocks 1e9": Case(lambda c: ["size", "--config", str(c.file("b.toml", "[model]\nnum_blocks = 1000000000\n"))],
                           ("model.num_blocks = 1,000,000,000",)),
    "value_embeds 1e8": Case(lambda c: c.train("--set", "model.value_embeds=100000000"), ("model.value_embeds",)),
    "ve_layers index of 5000 digits": Case(lambda c: c.train("--set", "model.ve_layers=" + "9" * 5000),
                                           ("model.ve_layers", "expected effective layer indices")),
    # 7. malformed files
    "config not UTF-8": Case(lambda c: ["size", "--config", str(c.file("bad.toml", b"[model]\nx = 1 # \xff\xfe\n"))],
                             ("{tmp}/bad.toml", "not UTF-8")),
    "manifest nested 100000 deep": Case(nested_manifest, ("{data}/manifest.json", "nested too deeply")),
    "config integer of 5000 digits": Case(
        lambda c: ["size", "--config", str(c.file("big.toml", "[train]\niterations = " + "9" * 5000 + "\n"))],
        ("{tmp}/big.toml", "not valid TOML")),
    # 8. Ctrl-C in make_mini_shards: it stops, says so, and leaves OUT as it was (a real SIGINT: below)
    "Ctrl-C in make_mini_shards (new OUT)": Case(lambda c: c.export(c.tmp / "out", "--shard-tokens", "100"),
                                                 ("interrupted",), code=130, tool="make_mini_shards",
                                                 fault=interrupt_at_shard(2)),
    "Ctrl-C in make_mini_shards (over a dataset)": Case(
        lambda c: c.export(c.data, "--name", "shakespeare_sp1024", "--shard-tokens", "100"), ("interrupted",),
        code=130, tool="make_mini_shards", fault=interrupt_at_shard(3)),
    # 9. numbers that cannot be right
    "matrix_lr nan": Case(lambda c: c.train("--set", "optim.matrix_lr=nan"), ("optim.matrix_lr", "finite")),
    "scalar_lr inf": Case(lambda c: c.train("--set", "optim.scalar_lr=inf"), ("optim.scalar_lr", "finite")),
    "iterations 10**29": Case(lambda c: c.train("--set", "train.iterations=1" + "0" * 29),
                              ("train.iterations", "97 bits", "at most 64 bits")),
    "--init weights with NaN": Case(lambda c: c.train("--init", str(weights(c, nan=True))),
                                    ("{tmp}/w/nan.safetensors", "blocks.0.mlp.fc.weight", "NaN or inf")),
    # 10. a new run never mixes with an earlier run's files
    "new run over a killed run's files": Case(over_earlier_run, ("{tmp}/run holds an earlier run's files", "--force")),
    "--force with --resume": Case(lambda c: c.train("--force", "--resume"), ("--force", "--resume")),
    "--force would delete the --init file": Case(force_deletes_init, ("--force would delete", "model.safetensors")),
    # 11. smaller ones
    "quantize NaN weights": Case(lambda c: ["quantize", str(weights(c, nan=True)), "--out", str(c.tmp / "q.art")],
                                 ("{tmp}/w/nan.safetensors", "NaN or inf")),
    "--resume when checkpoints is a file": Case(checkpoints_is_a_file, ("{tmp}/run/checkpoints is not a directory",)),
}


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root but the temporary ones, with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")
            if p.is_file() and not is_temporary(p)}


def is_temporary(p: Path) -> bool:
    return p.name.endswith(TEMPORARY) or p.name.startswith(".make_mini_shards-")


def temporary(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if is_temporary(p)]


def run_tool(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    if tool == "loopgolf":
        from tools.cli import main
    else:
        from tools.make_mini_shards import main
    code = main(argv)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] * c.slow) for n, c in CASES.items()])
def test_hostile_input(name, tmp_path, demo_data, monkeypatch, capsys):
    case = CASES[name]
    ctx = Ctx(tmp_path, demo_data)
    monkeypatch.chdir(ROOT)
    argv = case.make(ctx)
    if "mlx" in argv:
        pytest.importorskip("mlx.core")
    before = files(tmp_path)
    if case.fault:
        case.fault(monkeypatch, ctx)
    if case.peak_mib:
        tracemalloc.start()
    try:
        code, err = run_tool(case.tool, argv, capsys)
    finally:
        peak = tracemalloc.get_traced_memory()[1] if case.peak_mib else 0
        tracemalloc.stop()
        monkeypatch.undo()  # the fault ends with the command, before the checks read files
        if getattr(ctx, "lock", None):
            ctx.lock.release()
    lines = err.splitlines()
    assert code == case.code and len(lines) == 1, err
    assert lines[0].startswith(("loopgolf: ", "make_mini_shards: ")), err
    for fragment in case.expect:
        assert fragment.format(**ctx.names()) in lines[0], err
    assert not temporary(tmp_path), temporary(tmp_path)
    if not case.changes:
        assert files(tmp_path) == before
    if case.peak_mib:
        assert peak < case.peak_mib << 20, f"{peak / 2**20:.0f} MiB"


# ---- the streams' token-id checks, on their own -----------------------------------------------------------

def test_both_streams_refuse_a_shard_before_handing_out_any_of_its_tokens(tmp_path):
    from core.shards import ShuffledStream, TokenStream

    good, bad = np.arange(1000) % 1000, np.arange(1000) % 1000
    bad[500] = 2000
    files = [tmp_path / "fineweb_train_000000.bin", tmp_path / "fineweb_train_000001.bin"]
    write_shard(files[0], good)
    write_shard(files[1], bad)
    stream = TokenStream(files, vocab_size=1024)
    assert stream.take(1000).max() < 1024  # all of the good shard
    with pytest.raises(UserError, match="fineweb_train_000001.bin holds token id 2000 .at position 500."):
        stream.take(1)
    shuffled, seen = ShuffledStream(files, seq_len=16, seed=0, vocab_size=1024), []
    with pytest.raises(UserError, match="fineweb_train_000001.bin holds token id 2000"):
        for _ in range(200):
            seen.append(shuffled.next_batch(4)[0])
    assert all(x.max() < 1024 for x in seen)  # windows of the good shard only (if any), then the refusal


# ---- the run directory lock, on its own ---------------------------------------------------------------

def test_lock_of_a_dead_process_is_taken_over_and_a_foreign_host_is_refused(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    lock = run / rundir.LOCK_NAME
    for owner in ({"pid": dead.pid, "host": os.uname().nodename}, {"pid": os.getpid(), "host": os.uname().nodename,
                                                                     "boot_id": "an earlier boot"}, "not json"):
        lock.write_text(json.dumps(owner) if isinstance(owner, dict) else owner)
        held = rundir.acquire(run)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        held.release()
        assert not lock.exists()
    lock.write_text(json.dumps({"pid": 1, "host": "another-host.example", "since": "yesterday"}))
    with pytest.raises(UserError, match=f"locked by a run on host another-host.example .* rm {lock}"):
        rundir.acquire(run)
    assert json.loads(lock.read_text())["host"] == "another-host.example"  # left for its owner


# ---- end to end, in processes of their own --------------------------------------------------------------

def loopgolf(*argv: str, **kwargs) -> subprocess.Popen:
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen([sys.executable, "-m", "tools.cli", *argv], cwd=ROOT, text=True, **kwargs)


def wait_for(predicate, seconds: float = 120.0) -> None:
    end = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_two_runs_into_one_directory_and_a_killed_owner(demo_data, tmp_path):
    """The second run is refused at once while the first holds the directory; after the first is killed
    (SIGKILL: its lock stays), a new run needs --force, takes the stale lock and starts the directory afresh."""
    run = tmp_path / "run"
    argv = [*TRAIN, "--data", str(demo_data), "--out", str(run)]
    first = loopgolf(*argv, "--set", "train.iterations=100000", stdout=subprocess.DEVNULL)
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file())
        second = loopgolf(*argv)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2 and f"is in use by another run (pid {first.pid}" in err, err
    finally:
        first.kill()
        first.communicate()
    assert (run / rundir.LOCK_NAME).is_file()
    third = loopgolf(*argv)
    assert third.communicate(timeout=120)[1].count("\n") == 1 and third.returncode == 2  # an earlier run's files
    fourth = loopgolf(*argv, "--force")
    out, err = fourth.communicate(timeout=300)
    assert fourth.returncode == 0, err
    events = [json.loads(line)["event"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 1 and events[-1] == "final"
    assert not temporary(tmp_path)


@pytest.mark.slow
def test_impossible_plan_is_refused_quickly_not_after_a_hang(tmp_path):
    proc = loopgolf(*TRAIN, "--out", str(tmp_path / "run"), "--set", "model.layer_plan=1x100000000")
    _, err = proc.communicate(timeout=60)  # it hung before (no exit after 60 s)
    assert proc.returncode == 2 and "at most 4,096" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_write_failing_partway_is_one_line(demo_data, tmp_path):
    """A real write() failure mid-run (a file-size limit: EFBIG, what a full disk's ENOSPC also is to the
    code): one line naming the file, exit 2, and the atomic writes leave no temporary file."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))  # the weights are ~370 KB

    proc = loopgolf(*TRAIN, "--data", str(demo_data), "--out", str(tmp_path / "run"), preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and err.count("\n") == 1, err
    assert f"cannot write {tmp_path / 'run'}" in err and "File too large" in err, err
    assert not temporary(tmp_path)


@pytest.mark.slow
def test_ctrl_c_in_make_mini_shards(tmp_path):
    """A real SIGINT while shards are written: exit 130, one line, and no partial dataset in OUT."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "tools.make_mini_shards", "--demo", "--out", str(out),
                             "--shard-tokens", "2000"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    for line in proc.stdout:
        if "wrote" in line:
            proc.send_signal(signal.SIGINT)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and err.count("\n") == 1 and "interrupted" in err, err
    assert [p for p in out.rglob("*") if p.is_file()] == []
