"""`loopgolf bench`: FLOPs arithmetic against a hand count, the JSON's shape, and the --vs-upstream path
with a fake upstream script (a test double of the external program's log lines). Never timings."""

import json
import sys
import textwrap

import pytest

from core.config import load_config
from core.flops import flops_per_token, probe_size, six_n_per_token
from core.spec import ModelSpec
from tools.bench_upstream import parse_train_lines, steady_state
from tools.cli import main as loopgolf

FAST = ["--small", "--steps", "2", "--warmup", "1", "--probe-seconds", "0.05"]


# ------------------------------------------------------------------------------------------------
# FLOPs per token


def test_baseline_flops_match_hand_count():
    spec = load_config("configs/baseline_9x512.toml").model
    T = 1024
    d, heads, kv_heads, mlp_mult, V, L = 512, 8, 4, 2, 1024, 9
    kv = kv_heads * (d // heads)  # 256
    h = mlp_mult * d  # 1024
    linears = 2 * d * d + 2 * d * kv + 2 * d * kv + 2 * d * d + 2 * d * h + 2 * h * d
    assert linears == 3_670_016
    keys = (T + 1) / 2  # causal: query t attends to t keys, mean over t = 1..T
    attn = 2 * (2 * d * keys)  # scores q.k and values p@v, summed over all query heads
    assert attn == 1_049_600
    head = 2 * d * V
    forward = L * (linears + attn) + head
    assert forward == 43_525_120

    fl = flops_per_token(spec, T)
    assert fl.forward == forward
    assert fl.train == 3 * forward == 130_575_360
    assert fl.head == head
    assert fl.per_layer["q"] == 2 * d * d and fl.per_layer["k"] == 2 * d * kv and fl.per_layer["fc"] == 2 * d * h
    assert fl.linear + fl.attention == fl.forward
    assert fl.attention == L * attn

    full = flops_per_token(spec, T, causal=False)  # every key, masked or not
    assert full.forward == L * (linears + 2 * (2 * d * T)) + head
    # 6N with N = 17,059,912 (upstream's logged model_params for this baseline).
    assert six_n_per_token(spec) == 6 * 17_059_912


def test_looped_plan_counts_every_effective_layer():
    spec = ModelSpec.from_table({"model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "layer_plan": "3x4"})
    flat12 = ModelSpec.from_table({"model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "num_layers": 12})
    assert flops_per_token(spec, 1024).forward == flops_per_token(flat12, 1024).forward
    d = 512
    assert flops_per_token(spec, 1024).forward == 12 * (3_670_016 + d * 1025 * 2) + 2 * d * 1024
    # 6N follows effective parameters too: the shared blocks are counted once per use.
    assert six_n_per_token(spec) == six_n_per_token(flat12)


def test_probe_size_is_the_cube_root_of_the_largest_product():
    spec = load_config("configs/baseline_9x512.toml").model
    # 65,536 tokens per micro-batch: fc and head are (65536 x 512) @ (512 x 1024); cbrt = 3,251 -> 3,264.
    assert probe_size(spec, 65536) == 3264
    assert probe_size(spec, 8) == 256  # cbrt(8 x 512 x 1024) = 161, clamped below


# ------------------------------------------------------------------------------------------------
# the JSON of a short run


def _check_shape(r, backend):
    assert r["backend"] == backend
    assert r["steps"] == 2 and len(r["step_ms"]["all"]) == 2
    for key in ("tokens_per_s", "achieved_flops_per_s", "mfu", "mfu_6n", "peak_memory_bytes"):
        assert r[key] > 0, key
    for key in ("median", "mean", "min", "max"):
        assert r["step_ms"][key] > 0
    assert r["flops_per_token"]["train"] == 3 * r["flops_per_token"]["forward"] > 0
    assert r["flops_per_token"]["six_n"] > 0
    assert r["peak"]["flops_per_s"] > 0 and r["peak"]["n"] >= 256 and r["peak"]["dtype"] == r["dtype"]
    assert r["eval"]["tokens_per_s"] > 0 and r["eval"]["tokens"] > 0
    assert r["loader"]["tokens_per_s"] > 0 and r["loader"]["ratio_to_train"] > 0
    assert isinstance(r["loader"]["ok"], bool)
    assert r["peak_memory_source"]
    assert r["versions"]["python"]
    # arithmetic between the fields, not timings
    assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_token"]["train"] * r["tokens_per_s"])
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"] / r["peak"]["flops_per_s"])
    assert r["tokens_per_s"] == pytest.approx(r["batch_tokens"] / (r["step_ms"]["median"] / 1000))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_bench_json_shape_synthetic(backend, tmp_path, capsys):
    pytest.importorskip(backend)
    out = tmp_path / "bench.json"
    # torch: the config's data does not resolve, so it falls back; mlx: asked for with --synthetic.
    data = ["--set", f'data.path="{tmp_path / "nowhere"}"'] if backend == "torch" else ["--synthetic"]
    rc = loopgolf(["bench", "--config", "configs/demo.toml", "--backend", backend, *FAST, *data, "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    _check_shape(r, backend)
    assert r["data"]["source"] == "synthetic"
    printed = capsys.readouterr().out
    assert "synthetic uniform random tokens" in printed
    assert ("did not resolve" if backend == "torch" else "(--synthetic)") in printed
    assert "| backend |" in printed and f"| {backend} |" in printed


def test_bench_on_real_shards(demo_data, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rc = loopgolf(["bench", "--config", "configs/demo.toml", "--backend", "torch", *FAST, "--data", str(demo_data),
               "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    _check_shape(r, "torch")
    assert r["data"]["source"] == "shards"


# ------------------------------------------------------------------------------------------------
# --vs-upstream with a fake upstream script

UPSTREAM_LOG = """\
logs/x.txt
compute_dtype:mlx.float32 compile:True
warmup_step:1/1
step:1/3 train_loss:6.9400 train_time:512ms step_avg:512.00ms tok_s:1000
step:2/3 train_loss:6.8000 train_time:612ms step_avg:306.00ms tok_s:5120
step:3/3 train_loss:6.7000 train_time:714ms step_avg:238.00ms tok_s:5019
step:3/3 val_loss:6.6000 val_bpb:3.1000 train_time:714ms step_avg:238.00ms
"""


def test_parse_and_steady_state():
    recs = parse_train_lines(UPSTREAM_LOG)
    assert [r["step"] for r in recs] == [1, 2, 3]  # the val line is not a training line
    assert recs[0]["train_time_ms"] == 512 and recs[2]["train_loss"] == 6.7
    st = steady_state(recs, skip=1)  # from step 1: differences 100 and 102
    assert st["median_ms"] == pytest.approx(101.0)
    assert st["mean_ms"] == pytest.approx((714 - 512) / 2)
    assert st["steps"] == 2
    st0 = steady_state(recs, skip=0)  # from time 0: 512, 100, 102
    assert st0["median_ms"] == pytest.approx(102.0)


FAKE_UPSTREAM = """\
import json, os, sys, time
env = {k: v for k, v in os.environ.items()}
with open(ENV_LOG, "a") as f:
    f.write(json.dumps({"env": env, "cwd": os.getcwd()}) + "\\n")
n = int(os.environ["ITERATIONS"])
print("logs/fake.txt")
print("compute_dtype:" + DTYPE + " compile:True")
for i in range(int(os.environ["WARMUP_STEPS"])):
    print(f"warmup_step:{i + 1}/{os.environ['WARMUP_STEPS']}")
for step in range(1, n + 1):
    t = 500 + 250 * (step - 1)  # step 1 is slow; then exactly 250 ms per step
    print(f"step:{step}/{n} train_loss:{7 - step / 10:.4f} train_time:{t}ms step_avg:{t / step:.2f}ms")
sys.stdout.flush()
time.sleep(120)  # upstream's final validation and quantization: bench must not wait for it
"""


def _fake(tmp_path, dtype):
    env_log = tmp_path / "env_seen.jsonl"
    script = tmp_path / "fake_upstream.py"
    script.write_text(f"ENV_LOG = {str(env_log)!r}\nDTYPE = {dtype!r}\n" + textwrap.dedent(FAKE_UPSTREAM))
    return script, env_log


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_vs_upstream_with_fake_script(backend, demo_data, tmp_path, capsys):
    pytest.importorskip(backend)
    script, env_log = _fake(tmp_path, "mlx.float32" if backend == "mlx" else "torch.float32")
    out = tmp_path / "bench.json"
    rc = loopgolf(["bench", "--config", "configs/demo.toml", "--backend", backend, *FAST, "--data", str(demo_data),
               "--set", "model.layer_plan=flat", "--set", "model.num_layers=3",
               "--vs-upstream", str(script), "--rounds", "2", "--upstream-env", "EXTRA_KNOB=7",
               "--json", str(out)])
    assert rc == 0, capsys.readouterr()
    r = json.loads(out.read_text())
    up = r["upstream"]

    seen = [json.loads(line) for line in env_log.read_text().splitlines()]
    assert len(seen) == 2  # two alternating rounds
    env = seen[0]["env"]
    spec = r["spec"]
    assert env["DATA_PATH"] == str((demo_data / "datasets" / "shakespeare_sp1024").resolve())
    assert env["TOKENIZER_PATH"] == str((demo_data / "tokenizers" / "shakespeare_1024_bpe.model").resolve())
    assert env["NUM_LAYERS"] == "3" and env["MODEL_DIM"] == str(spec["model_dim"])
    assert env["VOCAB_SIZE"] == "1024" and env["NUM_HEADS"] == "4" and env["NUM_KV_HEADS"] == "2"
    assert env["MLP_MULT"] == "2"
    assert env["TRAIN_BATCH_TOKENS"] == str(r["batch_tokens"]) and env["TRAIN_SEQ_LEN"] == "64"
    assert env["ITERATIONS"] == "3" and env["WARMUP_STEPS"] == "1"  # 2 steady steps + the skipped first
    assert env["VAL_LOSS_EVERY"] == "0" and env["TRAIN_LOG_EVERY"] == "1" and env["MAX_WALLCLOCK_SECONDS"] == "0"
    assert env["EXTRA_KNOB"] == "7"
    assert "RANK" not in env and "WORLD_SIZE" not in env
    if backend == "mlx":
        assert env["GRAD_ACCUM_STEPS"] == str(r["grad_accum_steps"])
        assert env["MLX_MAX_MICROBATCH_TOKENS"] == str(r["batch_tokens"] // r["grad_accum_steps"])
    else:
        assert r["grad_accum_steps"] == 8  # upstream train_gpt.py on one process: 8 micro-batches
        assert "GRAD_ACCUM_STEPS" not in env
    assert seen[0]["cwd"] != str(tmp_path)  # upstream writes logs/ into a scratch directory

    # the arithmetic: 250 ms/step after the first, ratio = upstream ms / loopgolf ms
    assert len(up["rounds"]) == 2
    for rd in up["rounds"]:
        assert rd["upstream_ms"] == pytest.approx(250.0)
        assert rd["ratio"] == pytest.approx(250.0 / rd["loopgolf_ms"])
        assert rd["upstream_steps"] == 2
    assert up["tokens_per_s"] == pytest.approx(r["batch_tokens"] / 0.25)
    assert up["loopgolf_tokens_per_s"] == pytest.approx(r["batch_tokens"] / (up["loopgolf_ms"] / 1000))
    assert up["ratio"] == pytest.approx(up["loopgolf_tokens_per_s"] / up["tokens_per_s"])
    assert up["same_dtype"] is True
    assert "loopgolf is" in capsys.readouterr().out


def test_vs_upstream_refuses_a_looped_plan(tmp_path, capsys):
    script, env_log = _fake(tmp_path, "mlx.float32")
    rc = loopgolf(["bench", "--config", "configs/demo.toml", "--backend", "torch", "--small", "--vs-upstream", str(script)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "flat plans only" in err and "0 1 0 1 0 1" in err
    assert not env_log.exists()


def test_vs_upstream_refuses_options_upstream_lacks(tmp_path, capsys):
    script, env_log = _fake(tmp_path, "mlx.float32")
    rc = loopgolf(["bench", "--config", "configs/baseline_9x512.toml", "--backend", "torch", "--small",
               "--set", "model.norm_eps=1e-5", "--vs-upstream", str(script)])
    assert rc == 2
    assert "model.norm_eps" in capsys.readouterr().err
    assert not env_log.exists()


@pytest.mark.slow
def test_vs_upstream_reports_a_failing_script(demo_data, tmp_path, capsys):
    pytest.importorskip("mlx")
    script = tmp_path / "broken.py"
    script.write_text("import sys\nprint('RuntimeError: CUDA is required')\nsys.exit(1)\n")
    rc = loopgolf(["bench", "--config", "configs/demo.toml", "--backend", "mlx", "--small", "--steps", "1", "--warmup", "0",
               "--probe-seconds", "0.05", "--data", str(demo_data), "--set", "model.layer_plan=flat",
               "--set", "model.num_layers=2", "--vs-upstream", str(script)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "CUDA is required" in err and "before logging step" in err


def test_bench_is_importable_without_backends():
    # tools/bench.py imports neither mlx nor torch at module level (the lead wires it into `loopgolf --help`).
    import subprocess

    code = ("import sys; import tools.bench; "
            "assert 'torch' not in sys.modules and 'mlx' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
