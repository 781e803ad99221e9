"""Tests for plan.py: the dry runs of training and of sampling (on 8 simulated CPU
devices, and compiled by XLA:TPU for TPU slices when libtpu is installed), the
accelerators' datasheets, the re-run with simulated devices, and the command lines
`train.py --dry-run` and `sample.py --dry-run`.

The TPU checks need libtpu (pip; no TPU) and skip without it; they compile tiny
models (~1-2 min in all).

    python -m pytest tests/test_plan.py -q
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from conftest import TINY

import model
import plan

ROOT = Path(__file__).resolve().parents[1]
EIGHT_WAY = dict(  # heads, MLP and vocabulary divide 8 ways
    n_layer=2, n_embd=64, n_head=8, rotary_dim=4, n_ctx=128,
    vocab_size=256)

EIGHT_DEVICES = r"""
import json, sys
from functools import partial
import plan
plan.ensure_fake_devices("2x2x2")  # re-runs this script on 8 CPU devices
import jax, numpy as np
import model, train

config = model.Config(**json.loads(sys.argv[1]))
recipe = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=1, anneal=10,
                      weight_decay=0.1, clip=1.0, z_loss=0.0,
                      dtype="float32", remat=False)
make_step = partial(train.make_train_step, config, recipe, False)
key = jax.random.PRNGKey(0)
abstract = jax.eval_shape(
    lambda: train.init_state(model.init_params(config, key)))
# (K, B, W): 2 micro-batches of 8 windows of 16 + 1
windows = jax.ShapeDtypeStruct((2, 8, 17), np.int32)
flops = model.flops_per_token(config, 16)


def report(**kw):
    return plan.train_dry_run(make_step, abstract, windows, config,
                              recipe, flops, "2x2x2", **kw)


out = {
    "dry_run_fits": report(device_memory_gib=1.0, peak=100e12),
    "dry_run_too_big": report(device_memory_gib=1e-4, peak="TPU v4"),
    "dry_run_unknown": report(),  # CPU: no HBM, no datasheet peak
}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight_dry_runs():
    """The training dry runs of EIGHT_DEVICES, which gets its devices
    as `train.py --dry-run` does (plan.ensure_fake_devices)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_backend_optimization_level=0")
    run = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, json.dumps(EIGHT_WAY)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


def sampling_steps():
    """What sample.py passes to plan.sample_dry_run."""
    import sample
    return dict(prepare=sample.prepare, prefill=sample._prefill,
                decode=sample._decode.__wrapped__, bucket=sample._bucket)


def one_line(report):
    """A report with its line breaks and runs of spaces as one space."""
    return " ".join(report.split())


def test_dry_run_report(eight_dry_runs):
    fits = one_line(eight_dry_runs["dry_run_fits"])
    too_big = one_line(eight_dry_runs["dry_run_too_big"])
    unknown = one_line(eight_dry_runs["dry_run_unknown"])
    assert model.param_count(model.Config(**EIGHT_WAY)) == 132_352 and "132,352 parameters" in fits
    assert "on 8 cpu devices" in fits and "compiled by XLA:CPU" in fits
    # 2x2x2: matrices split 4 ways (fsdp x model), b_in and head_b 2 ways, norms and b_out whole:
    # 4096 + 256 + 8192 + 16384 + 256 + 128 + 128 + 4096 + 128 = 33,664 floats = 131.5 KiB.
    assert "parameters 131.5 KiB" in fits and "optimizer state 263.0 KiB" in fits
    # XLA:CPU lays the arguments out unpadded: params + mu + nu (3 x 134,656 B), the batch's
    # (2, 2, 17) int32 share (272 B) and the step counter (4 B) = 404,244 B.
    assert "batch 0.3 KiB" in fits and f"arguments {404_244 / 1024:.1f} KiB" in fits
    assert "fits in 1 GiB" in fits and "does NOT fit in 0.0001 GiB" in too_big
    # 40% of 8 devices x 100 TFLOP/s over 720,384 FLOPs/token (6N + 12·L·D·T at T=16)
    assert f"{model.flops_per_token(model.Config(**EIGHT_WAY), 16):.3e}" == "7.204e+05"
    assert f"{0.4 * 8 * 100e12 / 720384:,.0f} tokens/s" in fits
    assert "275 TFLOP/s per device (Google Cloud TPU v4" in too_big
    assert "give --device-memory GiB to compare" in unknown and "give --peak" in unknown  # nothing made up


# ----------------------------------------------------------------------------- XLA:TPU via libtpu
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install libtpu): no TPU compiler")


def _bytes(report, label):
    """A size line of a dry-run report, in bytes (as printed: 2 decimals of MiB/GiB, 1 of KiB)."""
    value, unit = re.search(rf"{label}\s+([\d.]+) (KiB|MiB|GiB)", report).groups()
    return float(value) * {"KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30}[unit]


V4_SLICE = ("on 4 TPU v4 devices, each one chip (2 TensorCores, "
            "megacore) (TPU topology v4:2x2x1)")


def tiny_on_tpu(windows, topology):
    """The conftest TINY model's bf16 train step planned for `windows`
    (K, B, W) on a TPU `topology`, fsdp over its 4 chips (1x4x1)."""
    import train
    recipe = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=1, anneal=10,
                          weight_decay=0.1, clip=1.0, z_loss=0.0,
                          dtype="bfloat16", remat=False)
    key = jax.random.PRNGKey(0)
    state = jax.eval_shape(
        lambda: train.init_state(model.init_params(TINY, key)))
    make_step = partial(train.make_train_step, TINY, recipe, False)
    windows = jax.ShapeDtypeStruct(windows, jnp.int32)
    flops = model.flops_per_token(TINY, 128)
    return plan.train_dry_run(make_step, state, windows, TINY, recipe,
                              flops, "1x4x1", topology=topology)


@pytest.fixture(scope="module")
def on_tpu():
    """TINY's train step compiled by XLA:TPU for a TPU v4 2x2x1 slice (4
    chips) at 8 and at 128 windows of 128 tokens per chip."""
    return {B: tiny_on_tpu((1, B, 129), "v4:2x2x1") for B in (32, 512)}


@needs_libtpu
def test_topology_compiles_with_xla_tpu(on_tpu):
    report = one_line(on_tpu[32])
    # v4 chips have two TensorCores; JAX on a TPU VM shows each chip as one device (megacore)
    assert V4_SLICE in report
    assert "compiled by XLA:TPU" in report and "fits in 32 GiB" in report
    assert "275 TFLOP/s per device (Google Cloud TPU v4" in report


@needs_libtpu
def test_topology_bytes_grow_with_the_batch(on_tpu):
    small, big = on_tpu[32], on_tpu[512]
    for label in ("parameters", "optimizer state"):  # the state does not depend on the batch
        assert _bytes(small, label) == _bytes(big, label) > 0
    # fsdp=4: 8 -> 128 windows of 129 int32 per chip, 61,920 more bytes of batch; the
    # compiler's arguments grow by about that (its layout pads differently at each size).
    extra = 120 * 129 * 4
    assert _bytes(big, "batch") - _bytes(small, "batch") == pytest.approx(extra, abs=60)
    assert 0.5 * extra < _bytes(big, "arguments") - _bytes(small, "arguments") < 2.1 * extra
    # The backward pass needs every layer's attention probabilities of every window: for the
    # 120 extra windows at least L x H x T x T in bf16, 120 x 2 x 4 x 128^2 x 2 B = 30 MiB more.
    assert _bytes(big, "activations/temp") - _bytes(small, "activations/temp") > 120 * 2 * 4 * 128 ** 2 * 2
    assert _bytes(big, "total") - _bytes(small, "total") > 120 * 2 * 4 * 128 ** 2 * 2


@pytest.fixture(scope="module")
def decode_on_tpu():
    """The TINY model's prefill and decode compiled by XLA:TPU for a v4 2x2x1 slice, heads and
    vocabulary over its 4 chips (1x1x4), for 4 and for 64 rows of 97-token prompts + 32 new."""
    return {rows: plan.sample_dry_run(TINY, "float32", "1x1x4", "v4:2x2x1", rows, 32, ("greedy",),
                                      **sampling_steps()) for rows in (4, 64)}


@needs_libtpu
def test_decode_step_compiles_with_xla_tpu(decode_on_tpu):
    report = one_line(decode_on_tpu[4])
    expected = ["mesh 1x1x4 " + V4_SLICE,
                "4 rows of 192 tokens (128-token prompts, 64 new)"]
    assert [e for e in expected if e not in report] == []
    assert report.count("compiled by XLA:TPU") == 2 and report.count("fits in 32 GiB") == 2


@needs_libtpu
def test_decode_bytes_grow_with_the_rows(decode_on_tpu):
    small, big = decode_on_tpu[4], decode_on_tpu[64]
    assert _bytes(small, "parameters") == _bytes(big, "parameters") > 0
    # K and V of 2 layers, 192 slots of 4 heads x 8 dims in fp32, the heads split 4 ways (24 KiB a row),
    # plus each row's whole `valid` mask (192 bools) and position (int32): reported to 3 digits
    per_row = 2 * 2 * 192 * 8 * 4 + 192 + 4
    assert _bytes(small, "KV cache") == pytest.approx(4 * per_row, rel=0.005)
    assert _bytes(big, "KV cache") == pytest.approx(64 * per_row, rel=0.005)
    decode = [report.split("decode:")[1] for report in (small, big)]
    assert _bytes(decode[1], "arguments") - _bytes(decode[0], "arguments") >= 60 * per_row  # the cache is an argument
    assert _bytes(decode[1], "total") > _bytes(decode[0], "total") + 60 * per_row


@needs_libtpu
def test_topology_too_big_is_refused_and_reported():
    # XLA:TPU will not compile a program whose buffers exceed the chip's HBM: the dry run says
    # so in its report. 16,384 windows per v5e chip need ~29 GiB of activations; a chip has 16.
    report = tiny_on_tpu((1, 65536, 129), "v5e:2x2")
    assert re.search(r"total +does NOT fit: XLA:TPU refuses to compile it \(.*HBM.*\)", report)


@needs_libtpu
def test_topology_devices_chips_or_tensorcores():
    from jax.experimental import topologies
    words, hbm, peak = plan.describe_devices(plan.topology_devices("v5p:2x2x1"))
    assert words == "4 TPU v5 devices, each one chip (2 TensorCores, megacore)" and hbm == 95 * 2 ** 30
    assert peak[0] == 459e12
    words, hbm, peak = plan.describe_devices(plan.topology_devices("v5e:4x4"))
    assert words == "16 TPU v5 lite devices, each one chip" and hbm == 16 * 2 ** 30 and peak[0] == 197e12
    # libtpu's default v4 layout: each TensorCore its own device, with half the chip
    per_core = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices
    words, hbm, peak = plan.describe_devices(per_core)
    assert words == "8 TPU v4 devices, each one TensorCore (2 per chip)"
    assert hbm == 16 * 2 ** 30 and peak[0] == 275e12 / 2


@needs_libtpu
def test_bad_topology_name_one_line_error():
    with pytest.raises(ValueError) as e:
        plan.topology_devices("v9:2x2")
    assert str(e.value).startswith("TPU topology 'v9:2x2': ") and "names look like v4:2x2x1" in str(e.value)
    assert "\n" not in str(e.value)


def test_topology_without_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
    with pytest.raises(ValueError) as e:
        plan.topology_devices("v4:2x2x1")
    assert str(e.value) == "compiling for TPU topology v4:2x2x1 needs the TPU compiler: pip install libtpu"


def test_peak_flops():
    assert plan.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert plan.datasheet_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert plan.datasheet_peak("NVIDIA A100-SXM4-40GB")[0] == 312e12
    assert plan.datasheet_peak("TPU v4")[0] == 275e12
    assert plan.datasheet_peak("TPU v5 lite")[0] == 197e12
    assert plan.datasheet_peak("TPU v4 lite") is None  # a different chip, not in the table
    assert plan.datasheet_peak("NVIDIA H100 NVL") is None  # lower clocks than SXM: no guess
    assert plan.peak_flops(SimpleNamespace(device_kind="TPU v5")) == plan.datasheet_peak("TPU v5p")
    assert plan.peak_flops() is None  # CPU: no datasheet peak, so no MFU can exceed 100%


def test_ensure_fake_devices_reexecs_with_enough_cpu_devices():
    code = "import jax, plan; plan.ensure_fake_devices('2x2x1'); print(jax.device_count(), jax.default_backend())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["4", "cpu"]


def test_plan_imports_neither_train_nor_sample():
    """plan.py sits below the scripts: the steps are passed in."""
    code = ("import sys, plan; "
            "print(sorted({'train', 'sample'} & set(sys.modules)))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["[]"]


@pytest.mark.parametrize("script, expected", [
    ("train.py", "dry run: mesh data=2 x fsdp=1 x model=1 on 2 cpu"),
    ("sample.py", "dry run: sampling 4 layers of 128 in float32, "
                  "mesh 2x1x1 on 2 cpu"),
])
def test_dry_run_command_lines(script, expected):
    """`--dry-run --mesh 2x1x1` on a 1-device machine re-runs itself
    with 2 simulated CPU devices and prints the plan."""
    argv = [sys.executable, script, "--dry-run", "--mesh", "2x1x1"]
    if script == "train.py":
        argv += ["--batch-size", "2", "--seq-len", "32"]
    else:
        argv += ["--num-samples", "2", "--max-new-tokens", "8"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(argv, cwd=ROOT, capture_output=True,
                         env=dict(env, JAX_PLATFORMS="cpu"),
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expected in " ".join(run.stdout.split()), run.stdout
    assert "per device:" in run.stdout
