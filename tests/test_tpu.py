"""Tests for tpu.py: meshes, partition rules, sharded training/sampling/checkpoints, a CPU
run that never loads libtpu, and the processes of a multi-host evaluation sharing one
samples file (threads stand for the processes). Dry runs are tests/test_plan.py's.

The multi-device checks run in ONE subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8): JAX reads that flag only when its CPU
backend starts, and one start-up plus a handful of compiles is most of the time. The
subprocess prints a JSON summary that the tests below check value by value.

    python -m pytest tests/test_tpu.py -q
"""
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

import common
import hf
import model
import model_fast
import tpu

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
    step = train.make_train_step(config, recipe, mesh=mesh)
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
                                 new_bucket=64, num_samples=2, mode=("greedy",), mesh=mesh)
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


def test_single_process_needs_no_distributed_init(monkeypatch):
    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    tpu.init_distributed()
    assert not jax.distributed.is_initialized() and tpu.is_main()


needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu not installed (pip install libtpu): no TPU compiler")


@needs_libtpu
def test_a_cpu_run_never_loads_libtpu(tmp_path):
    """JAX_PLATFORMS unset, libtpu installed, no TPU chip: the quick start's `python sample.py`
    prints no libtpu line (libtpu's 'unexpected worker hostname' errors) and runs on CPU."""
    from conftest import WIDE, random_params
    hf.save_hf(random_params(WIDE), WIDE, tmp_path)
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
