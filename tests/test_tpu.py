"""Tests for tpu.py: meshes, partition rules, sharded training/sampling/checkpoints, dry runs
of training and of sampling, compiling for a TPU slice with XLA:TPU, and the processes of a
multi-host evaluation sharing one samples file (threads stand for the processes).

The multi-device checks run in ONE subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): JAX reads that flag only when its CPU
backend starts, and one start-up plus a handful of compiles is most of the time. The
subprocess prints a JSON summary that the tests below check value by value. The TPU checks
need libtpu (pip; no TPU) and skip without it; they compile tiny models (~1-2 min in all).

    python -m pytest tests/test_tpu.py -q
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import common
import hf
import model
import model_fast
import tpu
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
EIGHT_WAY = dict(  # heads, MLP and vocabulary divide 8 ways
    n_layer=2, n_embd=64, n_head=8, rotary_dim=4, n_ctx=128, vocab_size=256)
MESHES = ["8x1x1", "1x8x1", "1x1x8", "2x2x2"]
SAMPLE_MESHES = ["8x1x1", "1x1x8", "2x2x2"]  # data only (rows padded), model only, all three axes

EIGHT_DEVICES = r"""
import json, sys, tempfile
import jax, numpy as np
import hf, model, sample, tpu, train

EIGHT_WAY, MESHES, SAMPLE_MESHES = json.loads(sys.argv[1])
config = model.Config(**EIGHT_WAY)
# lr 1e-4: Adam's first step moves every weight by about lr * sign(g), so reduction-order
# noise in tiny gradients shows up at ~lr/100; at 1e-4 that stays well inside 1e-5.
recipe = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=1, anneal=10, weight_decay=0.1, clip=1.0, z_loss=0.0,
                      dtype="float32", remat=False)
params = jax.device_get(jax.jit(model.init_params, static_argnums=0)(config, jax.random.PRNGKey(0)))
state = jax.device_get(train.init_state(params))
batch = np.random.default_rng(0).integers(0, config.vocab_size, (2, 16, 33), dtype=np.int32)  # (K, B, T+1)
step = train.make_train_step(config, recipe)

single = jax.jit(step).lower(state, batch).compile()  # one device: the reference
ref_state, ref_metrics = jax.device_get(single(state, batch))
prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [3] * 20]  # left-padded to 64; 3 x 2 rows, padded on 8x1x1
per_layer = sample.prepare(params)                 # as sample.load returns them
ref_tokens = sample.generate(params, config, prompts, 8, num_samples=2)
sampled = dict(num_samples=2, temperature=0.8, top_p=0.9, top_k=50, seed=3)
ref_sampled = sample.generate(params, config, prompts, 8, **sampled)

out = {"meshes": {}}
for spec in MESHES:
    mesh = tpu.make_mesh(spec)
    state_sh, batch_sh = tpu.state_shardings(state, mesh), tpu.batch_sharding(mesh)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(state, state_sh)
        global_batch = tpu.global_batch(batch, mesh)
        compiled = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                           donate_argnums=0).lower(sharded, global_batch).compile()
        shards = {"/".join(p.key for p in path): list(a.addressable_shards[0].data.shape)
                  for path, a in jax.tree_util.tree_leaves_with_path(sharded)}
        new_state, metrics = compiled(sharded, global_batch)
        host = tpu.to_host(new_state)
        r = {
            "shards": shards,
            "out_shards": {"mu/layers/w_in": list(new_state["mu"]["layers"]["w_in"].addressable_shards[0].data.shape)},
            "batch_shard": list(global_batch.addressable_shards[0].data.shape),
            "loss_diff": abs(float(metrics["loss"]) - float(ref_metrics["loss"])),
            "grad_norm_diff": abs(float(metrics["grad_norm"]) - float(ref_metrics["grad_norm"])),
            "state_diff": max(float(np.max(np.abs(a - b))) for a, b in
                              zip(jax.tree.leaves(host), jax.tree.leaves(ref_state))),
            "flops": compiled.cost_analysis()["flops"],  # per device, as the compiler counts them
        }
        if spec in SAMPLE_MESHES:  # sampling and checkpoints: on the meshes that split the most
            r["generate_equal"] = sample.generate(per_layer, config, prompts, 8, num_samples=2,
                                                  mesh=mesh) == ref_tokens
            if spec == "8x1x1":  # the same seed, the same samples, whatever the rows' padding
                got = sample.generate(params, config, prompts, 8, mesh=mesh, **sampled)
                r["sampled_equal"] = got == ref_sampled
            if spec == "2x2x2":  # the decode state as generate lays it out: 4 prompts of 2 rows
                placed = jax.device_put(per_layer, tpu.param_shardings(per_layer, mesh))
                rows = jax.NamedSharding(mesh, jax.P(tpu.BATCH_AXES))
                prompt_PT = jax.device_put(np.ones((4, 64), np.int32), rows)
                st = sample._prefill(placed, prompt_PT, prompt_PT > 0, jax.random.PRNGKey(0), None, config=config,
                                     new_bucket=64, num_samples=2, mode=("greedy",))
                shard = lambda a: list(a.addressable_shards[0].data.shape)
                r["decode_shards"] = {"params/layers/0/wq": shard(placed["layers"][0]["wq"]),
                                      "cache/k": shard(st["cache"]["k"][0]),
                                      "cache/valid": shard(st["cache"]["valid"]), "out": shard(st["out"])}
            with tempfile.TemporaryDirectory() as tmp:  # save straight from the sharded arrays
                hf.save_hf(new_state["params"], config, tmp)
                loaded_config, loaded = hf.load_hf(tmp)
            r["checkpoint_equal"] = loaded_config == config and all(
                np.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(host["params"])))
    out["meshes"][spec] = r

abstract = jax.eval_shape(lambda: state)  # the dry run sees shapes only
windows = jax.ShapeDtypeStruct((2, 8, 17), np.int32)  # (K, B, W): 2 micro-batches of 8 windows of 16 + 1
plan = lambda **kw: tpu.dry_run(step, abstract, windows, config, recipe, model.flops_per_token(config, 16),
                                "2x2x2", **kw)
out["dry_run_fits"] = plan(device_memory_gib=1.0, peak=100e12)
out["dry_run_too_big"] = plan(device_memory_gib=1e-4, peak="TPU v4")
out["dry_run_unknown"] = plan()  # CPU: no HBM, no datasheet peak
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def eight():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               # -O0 for XLA:CPU's code generator: the compiles, not the tiny steps, are the cost
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    args = json.dumps([EIGHT_WAY, MESHES, SAMPLE_MESHES])
    run = subprocess.run([sys.executable, "-c", EIGHT_DEVICES, args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_step_equals_single_device(eight, spec):
    r = eight["meshes"][spec]
    assert r["loss_diff"] < 1e-5
    assert r["grad_norm_diff"] < 1e-5
    assert r["state_diff"] < 1e-5  # params, AdamW mu and nu, step


def test_parameters_are_really_split(eight):
    # Per-device shard shapes: L=2, D=64, F=256, V=256; heads/MLP/vocab over 'model',
    # n_embd over 'fsdp', the layer axis never split, LayerNorms and b_out replicated.
    expected = {
        "8x1x1": {"wte": [256, 64], "layers/wq": [2, 64, 64], "layers/w_out": [2, 256, 64], "head_b": [256]},
        "1x8x1": {"wte": [256, 8], "layers/wq": [2, 8, 64], "layers/wo": [2, 64, 8], "layers/w_in": [2, 8, 256],
                  "layers/w_out": [2, 256, 8], "head_w": [8, 256], "head_b": [256], "layers/b_in": [2, 256]},
        "1x1x8": {"wte": [32, 64], "layers/wq": [2, 64, 8], "layers/wo": [2, 8, 64], "layers/w_in": [2, 64, 32],
                  "layers/b_in": [2, 32], "layers/w_out": [2, 32, 64], "head_w": [64, 32], "head_b": [32]},
        "2x2x2": {"wte": [128, 32], "layers/wk": [2, 32, 32], "layers/w_in": [2, 32, 128],
                  "layers/w_out": [2, 128, 32], "head_w": [32, 128]},
    }
    for spec, shapes in expected.items():
        shards = eight["meshes"][spec]["shards"]
        for name, shape in shapes.items():
            assert shards["params/" + name] == shape, (spec, name)
            assert shards["mu/" + name] == shape and shards["nu/" + name] == shape, (spec, name)
        for name in ("layers/ln_scale", "layers/b_out", "lnf_scale"):
            assert shards["params/" + name] == ([64] if name == "lnf_scale" else [2, 64])
        assert shards["step"] == []
    assert eight["meshes"]["2x2x2"]["out_shards"]["mu/layers/w_in"] == [2, 32, 128]  # out_shardings kept
    # (K, B, T+1) = (2, 16, 33): B split over data*fsdp
    assert {s: eight["meshes"][s]["batch_shard"] for s in MESHES} == {
        "8x1x1": [2, 2, 33], "1x8x1": [2, 2, 33], "1x1x8": [2, 16, 33], "2x2x2": [2, 4, 33]}


def test_fsdp_splits_the_batch_not_the_activations(eight):
    # 1x8x1 must cost each device what plain data parallelism (8x1x1) does: gather each
    # weight, keep activations split by rows. If the compiler spreads the weights' fsdp
    # split into the activations instead, it replicates work: ~1.3x here (the hint in
    # model.forward, see the note under tpu.RULES, prevents that).
    assert eight["meshes"]["1x8x1"]["flops"] < 1.1 * eight["meshes"]["8x1x1"]["flops"]


def test_sharded_generate_equals_unsharded(eight):
    # greedy, 3 left-padded prompts x num_samples 2, per-layer params placed by generate(mesh=)
    assert {s: eight["meshes"][s]["generate_equal"] for s in SAMPLE_MESHES} == dict.fromkeys(SAMPLE_MESHES, True)
    assert eight["meshes"]["8x1x1"]["sampled_equal"]  # 6 rows padded to 8: the real rows' draws are unchanged


def test_decode_state_is_split_by_heads_and_rows(eight):
    # 2x2x2: a per-layer wq (D, D) = (64, 64) split fsdp x model; 8 rows over data*fsdp = 4;
    # the cache's 8 heads over model = 2; 64 prompt + 64 new slots and head_dim 8 whole.
    assert eight["meshes"]["2x2x2"]["decode_shards"] == {
        "params/layers/0/wq": [32, 32], "cache/k": [2, 4, 128, 8], "cache/valid": [2, 128], "out": [2, 64]}


def test_sharded_checkpoint_round_trips(eight):
    assert all(eight["meshes"][s]["checkpoint_equal"] for s in SAMPLE_MESHES)


def test_dry_run_report(eight):
    fits, too_big, unknown = (" ".join(eight[k].split()) for k in ("dry_run_fits", "dry_run_too_big", "dry_run_unknown"))
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


@pytest.fixture(scope="module")
def on_tpu():
    """The conftest TINY model's train step compiled by XLA:TPU for a TPU v4 2x2x1 slice (4
    chips, fsdp over all four) at 8 and at 128 windows of 128 tokens per chip."""
    import train
    recipe = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=1, anneal=10, weight_decay=0.1, clip=1.0, z_loss=0.0,
                          dtype="bfloat16", remat=False)
    state = jax.eval_shape(lambda: train.init_state(model.init_params(TINY, jax.random.PRNGKey(0))))
    step = train.make_train_step(TINY, recipe)
    return {B: tpu.dry_run(step, state, jax.ShapeDtypeStruct((1, B, 129), jnp.int32), TINY, recipe,
                           model.flops_per_token(TINY, 128), "1x4x1", topology="v4:2x2x1") for B in (32, 512)}


@needs_libtpu
def test_topology_compiles_with_xla_tpu(on_tpu):
    report = " ".join(on_tpu[32].split())
    # v4 chips have two TensorCores; JAX on a TPU VM shows each chip as one device (megacore)
    assert "on 4 TPU v4 devices, each one chip (2 TensorCores, megacore) (TPU topology v4:2x2x1)" in report
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
    import sample
    return {rows: sample.dry_run(TINY, "float32", "1x1x4", "v4:2x2x1", rows, 32, ("greedy",)) for rows in (4, 64)}


@needs_libtpu
def test_decode_step_compiles_with_xla_tpu(decode_on_tpu):
    report = " ".join(decode_on_tpu[4].split())
    assert "mesh 1x1x4 on 4 TPU v4 devices, each one chip (2 TensorCores, megacore) (TPU topology v4:2x2x1)" in report
    assert "4 rows of 192 tokens (128-token prompts, 64 new)" in report
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
    import train
    recipe = train.Recipe(lr=1e-4, min_lr=1e-5, warmup=1, anneal=10, weight_decay=0.1, clip=1.0, z_loss=0.0,
                          dtype="bfloat16", remat=False)
    state = jax.eval_shape(lambda: train.init_state(model.init_params(TINY, jax.random.PRNGKey(0))))
    report = tpu.dry_run(train.make_train_step(TINY, recipe), state, jax.ShapeDtypeStruct((1, 65536, 129), jnp.int32),
                         TINY, recipe, model.flops_per_token(TINY, 128), "1x4x1", topology="v5e:2x2")
    assert re.search(r"total +does NOT fit: XLA:TPU refuses to compile it \(.*HBM.*\)", report)


@needs_libtpu
def test_topology_devices_chips_or_tensorcores():
    from jax.experimental import topologies
    words, hbm, peak = tpu.describe_devices(tpu.topology_devices("v5p:2x2x1"))
    assert words == "4 TPU v5 devices, each one chip (2 TensorCores, megacore)" and hbm == 95 * 2 ** 30
    assert peak[0] == 459e12
    words, hbm, peak = tpu.describe_devices(tpu.topology_devices("v5e:4x4"))
    assert words == "16 TPU v5 lite devices, each one chip" and hbm == 16 * 2 ** 30 and peak[0] == 197e12
    # libtpu's default v4 layout: each TensorCore its own device, with half the chip
    per_core = topologies.get_topology_desc(topology_name="v4:2x2x1", platform="tpu").devices
    words, hbm, peak = tpu.describe_devices(per_core)
    assert words == "8 TPU v4 devices, each one TensorCore (2 per chip)"
    assert hbm == 16 * 2 ** 30 and peak[0] == 275e12 / 2


@needs_libtpu
def test_bad_topology_name_one_line_error():
    with pytest.raises(ValueError) as e:
        tpu.topology_devices("v9:2x2")
    assert str(e.value).startswith("TPU topology 'v9:2x2': ") and "names look like v4:2x2x1" in str(e.value)
    assert "\n" not in str(e.value)


def test_topology_without_libtpu_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
    with pytest.raises(ValueError) as e:
        tpu.topology_devices("v4:2x2x1")
    assert str(e.value) == "compiling for TPU topology v4:2x2x1 needs the TPU compiler: pip install libtpu"


# ----------------------------------------------------------------------------- single-process checks


@pytest.mark.parametrize("spec, message", [
    ("2x2", "mesh '2x2' must be DPxFSDPxMP, three positive integers such as 2x4x1"),
    ("2xax1", "mesh '2xax1' must be DPxFSDPxMP"),
    ("0x1x1", "mesh '0x1x1' must be DPxFSDPxMP"),
    ("2x1x1", "mesh 2x1x1 has 2 devices but 1 are visible; make DPxFSDPxMP multiply to 1"),
])
def test_bad_mesh_one_line_error(spec, message):
    with pytest.raises(ValueError) as e:
        tpu.make_mesh(spec, jax.devices()[:1])
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_default_mesh_is_all_data_parallel():
    mesh = tpu.make_mesh(None)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "model": 1}


@pytest.mark.parametrize("config, shape, batch, message", [
    (dict(EIGHT_WAY, n_head=4), (1, 1, 8), 8, "n_head=4 is not divisible by the model axis (8)"),
    (dict(EIGHT_WAY, vocab_size=100), (1, 1, 8), 8, "vocab_size=100 is not divisible by the model axis (8)"),
    (dict(EIGHT_WAY, n_embd=36, n_head=4), (1, 8, 1), 8, "n_embd=36 is not divisible by the fsdp axis (8)"),
    (EIGHT_WAY, (2, 2, 1), 6, "batch 6 not divisible by data*fsdp=4"),
])
def test_layout_errors_name_the_dimension(config, shape, batch, message):
    mesh = AbstractMesh(shape, tpu.AXES)
    with pytest.raises(ValueError, match=re.escape(message)):
        tpu.check_layout(model.Config(**config), mesh, batch)
    tpu.check_layout(model.Config(**EIGHT_WAY), AbstractMesh((2, 2, 2), tpu.AXES), 8)  # a good layout passes


def test_every_parameter_has_a_rule():
    params = jax.eval_shape(lambda k: model.init_params(model.CONFIGS["16B"], k), jax.random.PRNGKey(0))
    specs = jax.tree.map(lambda s: s.spec, tpu.param_shardings(params, tpu.make_mesh(None)))
    assert all(spec[0] is None for spec in specs["layers"].values())  # the layer axis is never split
    decoding = jax.eval_shape(lambda k: model_fast.decoding_layout(model.init_params(model.CONFIGS["16B"], k)),
                              jax.random.PRNGKey(0))
    flipped = jax.tree.map(lambda s: s.spec, tpu.param_shardings(decoding, tpu.make_mesh(None)))
    assert flipped["layers"][3]["w_in"] == P("model", "fsdp") and flipped["head_w"] == P("model", "fsdp")
    assert flipped["layers"][3]["b_in"] == P("model") and flipped["wte"] == specs["wte"]  # not matrices
    with pytest.raises(ValueError, match="no partition rule for parameter 'w_gate'"):
        tpu.param_shardings({"w_gate": params["wte"]}, tpu.make_mesh(None))


def test_peak_flops():
    assert tpu.datasheet_peak("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert tpu.datasheet_peak("NVIDIA H100 PCIe")[0] == 756e12
    assert tpu.datasheet_peak("NVIDIA A100-SXM4-40GB")[0] == 312e12
    assert tpu.datasheet_peak("TPU v4")[0] == 275e12
    assert tpu.datasheet_peak("TPU v5 lite")[0] == 197e12
    assert tpu.datasheet_peak("TPU v4 lite") is None  # a different chip, not in the table
    assert tpu.datasheet_peak("NVIDIA H100 NVL") is None  # lower clocks than SXM: no guess
    assert tpu.peak_flops(SimpleNamespace(device_kind="TPU v5")) == tpu.datasheet_peak("TPU v5p")
    assert tpu.peak_flops() is None  # CPU: no datasheet peak, so no MFU can exceed 100%


def test_single_process_needs_no_distributed_init(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    tpu.init_distributed()
    assert not jax.distributed.is_initialized() and tpu.is_main()


def test_ensure_fake_devices_reexecs_with_enough_cpu_devices():
    code = "import jax, tpu; tpu.ensure_fake_devices('2x2x1'); print(jax.device_count(), jax.default_backend())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(env, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split() == ["4", "cpu"]


@needs_libtpu
def test_a_cpu_run_never_loads_libtpu(tmp_path):
    """JAX_PLATFORMS unset, libtpu installed, no TPU chip: the quick start's `python sample.py`
    prints no libtpu line (libtpu's 'unexpected worker hostname' errors) and runs on CPU."""
    from conftest import WIDE, random_params
    model.save_hf(random_params(WIDE), WIDE, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    run = subprocess.run([sys.executable, "sample.py", "--init-from", tmp_path, "--max-new-tokens", "2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "new tokens 2" in run.stdout, run.stderr[-2000:]
    assert not re.search("libtpu|TPU|E0000", run.stderr), run.stderr


# ----------------------------------------------------------------------------- multi-host evaluation


def _threads_as_processes(count, job):
    """Run job(share) on `count` threads that stand for the processes of a multi-host job, each
    with a common.Share whose allgather is an exchange through a barrier, as tpu.allgather is
    through JAX's collectives. Returns the jobs' results (or what they raised) in process order;
    a process left waiting for the others breaks the barrier after 30 s instead of hanging."""
    import threading
    slots, barrier, results = [None] * count, threading.Barrier(count, timeout=30), [None] * count

    def allgather_for(i):
        def allgather(obj):
            slots[i] = json.loads(json.dumps(obj))   # what crosses processes is JSON
            barrier.wait()
            everyone = list(slots)
            barrier.wait()                           # nobody overwrites a slot before all have read
            return everyone
        return allgather

    def run(i):
        try:
            results[i] = job(common.Share(i, count, allgather_for(i)))
        except Exception as e:
            results[i] = e
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_processes_share_the_samples_and_process_0_writes_them(tmp_path, capsys):
    # 7 problems x 2 temperatures x 3 samples in batches of 2, as humaneval.generate asks for them.
    wanted = [(f"p{i}", t) for t in (0.2, 0.8) for i in range(7) for _ in range(3)]
    made_by = {}

    def produce_on(who):
        def produce(keys, first):
            made_by[first] = who
            return [{"task_id": t, "temperature": temp, "completion": f"seed {first + j}"}
                    for j, (t, temp) in enumerate(keys)]
        return produce
    key = lambda row: (row["task_id"], row["temperature"])  # noqa: E731
    one = tmp_path / "one.jsonl"
    common.generate_jsonl(one, wanted, key, produce_on(None), 2, group=lambda k: k[1])
    three = tmp_path / "three.jsonl"
    _threads_as_processes(3, lambda share: common.generate_jsonl(
        three, wanted, key, produce_on(share.index), 2, group=lambda k: k[1], share=share))
    assert three.read_text() == one.read_text()  # the same rows, seeds and order as one process
    assert sorted(set(made_by.values())) == [0, 1, 2]  # every process sampled a share...
    assert len(made_by) == 22 and all(made_by[f] == j % 3 for j, f in enumerate(sorted(made_by)))  # ...batch j on j % 3

    # Resumable: a file cut mid-line keeps its whole rows, the processes make only the rest.
    text = one.read_text()
    three.write_text(text[:text.index("\n", len(text) // 2) + 10])
    made_by.clear()
    _threads_as_processes(2, lambda share: common.generate_jsonl(
        three, wanted, key, produce_on(share.index), 2, group=lambda k: k[1], share=share))
    rows = [json.loads(line) for line in three.read_text().splitlines()]
    assert len(rows) == len(wanted) and sorted(map(key, rows)) == sorted(wanted)
    assert 0 < len(made_by) < 22 and set(made_by.values()) == {0, 1}
    capsys.readouterr()


def test_a_process_that_fails_stops_every_process(tmp_path, capsys):
    """One process raising (its sampling, or process 0 reading a corrupt file) makes every process
    raise, none waiting for it in a collective; rounds finished before it stay in the file."""
    wanted = [(f"p{i}", 0.2) for i in range(12)]
    key = lambda row: (row["task_id"], row["temperature"])  # noqa: E731

    def produce_on(who):
        def produce(keys, first):
            if who == 1 and first >= 6:          # process 1's second batch: the second round
                raise ValueError("out of memory\nmore detail")
            return [{"task_id": t, "temperature": temp} for t, temp in keys]
        return produce
    out = tmp_path / "s.jsonl"
    got = _threads_as_processes(3, lambda share: common.generate_jsonl(
        out, wanted, key, produce_on(share.index), 2, share=share))
    assert [type(e) for e in got] == [ValueError] * 3
    assert str(got[1]) == "out of memory\nmore detail"  # its own error, whole
    assert str(got[0]) == str(got[2]) == "process 1 of 3 failed: out of memory"
    assert [key(json.loads(line)) for line in out.read_text().splitlines()] == wanted[:6]  # round 1 kept

    out.write_text('{"task_id": "p0", "temperature": 0.2}\nnot json\n{"task_id": "p1"}\n')
    before = out.read_text()
    got = _threads_as_processes(2, lambda share: common.generate_jsonl(
        out, wanted, key, produce_on(None), 2, share=share))
    assert [type(e) for e in got] == [ValueError] * 2 and str(got[1]).startswith("process 0 of 2 failed: ")
    assert str(got[1]).removeprefix("process 0 of 2 failed: ") == str(got[0]).splitlines()[0]
    assert out.read_text() == before
    capsys.readouterr()


def test_one_process_has_no_share():
    assert tpu.process_share() is None
