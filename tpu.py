"""Devices, meshes and shardings: how one CodeGen model is spread over many chips.

CodeGen was trained on TPU-v4 pods with JAXformer, which laid the model out Megatron-style
with pjit/xmap (architecture.md §4). Here the same layout is declared with JAX's own SPMD:
a `jax.sharding.Mesh` of devices with three named axes, a `PartitionSpec` per parameter
saying which axis splits which dimension, and `jax.jit(in_shardings=, out_shardings=)`.
The compiler (GSPMD/Shardy) then inserts every collective; the only sharding code outside
this file is one activation hint in model.forward (see below RULES).

The mesh has three axes, `--mesh DPxFSDPxMP`:

    data   plain data parallelism: replicas of the state (as split by the other two axes),
           each fed its own slice of the batch; gradients are averaged across it.
    fsdp   data parallelism that also splits parameters and optimizer state (ZeRO-3 /
           "fully sharded"): each weight is gathered just before it is used.
    model  tensor parallelism: attention heads, the MLP hidden units and the vocabulary
           are divided among the devices (Megatron column/row parallel, as JAXformer's 'mp').

The batch is split over data x fsdp; see RULES below for the parameters. The same file
also holds the multi-host plumbing (distributed init, global batch assembly), the
accelerators' peak FLOP/s for MFU, and `dry_run`, which compiles a training step for a
mesh on abstract shapes and reports whether it fits, without allocating the model:

    python train.py --size 16B --mesh 1x16x4 --dry-run --device-memory 32
"""
import math
import os
import re
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

AXES = ("data", "fsdp", "model")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both data-parallel axes

# ----------------------------------------------------------------------------- the partition rules
# One entry per parameter of model.py, one mesh axis (or None) per dimension.
#
#   model: Megatron. q/k/v are column parallel (their output columns are heads: column
#          h*hd+d belongs to head h, so a device owning n_head/MP consecutive heads computes
#          their attention with no communication); wo is row parallel (its input rows are
#          those same heads), so attention costs one all-reduce of the output. The MLP is
#          the same: w_in/b_in columns, w_out rows. The vocabulary is split too, for the
#          embedding table (rows) and the head (columns, and its bias).
#   fsdp:  the largest dimension that `model` left whole, always n_embd here.
#   never: the stacked layer axis L (the layer scan walks it) and small vectors (LayerNorm,
#          output biases), which are replicated: splitting them saves nothing.
RULES = {
    "wte":       P("model", "fsdp"),         # (V, D)    vocab rows
    "ln_scale":  P(None, None),              # (L, D)
    "ln_bias":   P(None, None),              # (L, D)
    "wq":        P(None, "fsdp", "model"),   # (L, D, D) column parallel: output = heads
    "wk":        P(None, "fsdp", "model"),   # (L, D, D)
    "wv":        P(None, "fsdp", "model"),   # (L, D, D)
    "wo":        P(None, "model", "fsdp"),   # (L, D, D) row parallel: input = heads
    "w_in":      P(None, "fsdp", "model"),   # (L, D, F) column parallel: output = MLP hidden
    "b_in":      P(None, "model"),           # (L, F)    follows w_in's columns
    "w_out":     P(None, "model", "fsdp"),   # (L, F, D) row parallel: input = MLP hidden
    "b_out":     P(None, None),              # (L, D)    added after the all-reduce
    "lnf_scale": P(None),                    # (D,)
    "lnf_bias":  P(None),                    # (D,)
    "head_w":    P("fsdp", "model"),         # (D, V)    vocab columns
    "head_b":    P("model"),                 # (V,)
}
# Activations need exactly one hint, and it lives in model.forward: the embedding output is
# constrained to be split by batch rows over (data, fsdp) whenever a mesh is set with
# `jax.set_mesh`. Without it the compiler propagates the weights' fsdp split into the
# residual stream and replicates the batch instead (measured: 1.6x the FLOPs per device and
# twice the temporary memory for 16B on 1x16x4); with it, every layer's weights are
# all-gathered inside the layer scan, which is FSDP as intended. Nothing else is needed.


# ----------------------------------------------------------------------------- mesh


def parse_mesh(spec):
    """'DPxFSDPxMP' -> (dp, fsdp, mp)."""
    parts = str(spec).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"mesh {spec!r} must be DPxFSDPxMP, three positive integers such as 2x4x1")
    return tuple(int(p) for p in parts)


def make_mesh(spec, devices=None):
    """Mesh with axes (data, fsdp, model) over `devices` (default: all of them, every
    process's). `spec` None puts every device on 'data'."""
    devices = list(jax.devices() if devices is None else devices)
    shape = (len(devices), 1, 1) if spec is None else parse_mesh(spec)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {spec} has {math.prod(shape)} devices but {len(devices)} are visible; "
                         f"make DPxFSDPxMP multiply to {len(devices)}")
    # jax.make_mesh orders devices along the physical interconnect (the innermost axis,
    # 'model', gets the closest chips). Auto axes: the compiler propagates shardings from
    # the inputs (plus model.py's one hint), rather than every op being annotated.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def check_layout(config, mesh, batch_size):
    """One-line ValueError naming the first dimension that `mesh` cannot divide evenly.
    `batch_size` is the micro-batch (sequences per forward pass); `mesh` only needs `.shape`."""
    dp, fsdp, mp = (mesh.shape[a] for a in AXES)
    for name, value, axis, size in [
        ("n_head", config.n_head, "model", mp),          # heads (and with them the MLP hidden 4D)
        ("vocab_size", config.vocab_size, "model", mp),  # embedding rows, head columns
        ("n_embd", config.n_embd, "fsdp", fsdp),         # fsdp's dimension of every matrix
    ]:
        if value % size:
            raise ValueError(f"{name}={value} is not divisible by the {axis} axis ({size})")
    if batch_size % (dp * fsdp):
        raise ValueError(f"batch {batch_size} not divisible by data*fsdp={dp * fsdp}")
    if jax.process_count() > 1 and jax.local_device_count() % mp:
        raise ValueError(f"the model axis ({mp}) must divide the {jax.local_device_count()} devices of "
                         f"each host: tensor parallelism needs the fast links inside a host")


# ----------------------------------------------------------------------------- shardings


def param_shardings(params, mesh):
    """NamedSharding for every parameter (arrays or ShapeDtypeStructs), from RULES."""
    def rule(path, leaf):
        name = path[-1].key
        if name not in RULES:
            raise ValueError(f"no partition rule for parameter {name!r}; add one to tpu.RULES")
        if len(RULES[name]) != leaf.ndim:
            raise ValueError(f"parameter {name!r} has {leaf.ndim} dims but its rule {RULES[name]} names "
                             f"{len(RULES[name])}")
        return NamedSharding(mesh, RULES[name])
    return jax.tree_util.tree_map_with_path(rule, params)


def state_shardings(state, mesh):
    """Shardings for train.init_state's tree. AdamW's moments are sharded exactly like the
    parameter they belong to (the update is elementwise, so it needs no communication);
    the step counter is replicated."""
    replicated = NamedSharding(mesh, P())
    return {key: param_shardings(sub, mesh) if key in ("params", "mu", "nu")
            else jax.tree.map(lambda _: replicated, sub) for key, sub in state.items()}


def batch_sharding(mesh):
    """(K, B, T+1) batches: micro-batch rows B over (data, fsdp), K and T whole."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def global_batch(local_KbT1, mesh):
    """This process's rows (K, B/processes, T+1) -> the global (K, B, T+1) jax.Array.

    Every process passes only its own share (data.py reads a disjoint part of the files
    per process); no host ever holds the global batch.
    """
    return jax.make_array_from_process_local_data(batch_sharding(mesh), np.asarray(local_KbT1))


def to_host(tree):
    """Numpy copy of a (possibly sharded, possibly multi-host) tree, one leaf at a time,
    for writing checkpoints. Every process must call it (a leaf spread over other hosts
    is fetched with an all-gather); no device ever holds more than its own shard."""
    from jax.experimental import multihost_utils

    def fetch(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(a, tiled=True))
        return np.asarray(jax.device_get(a))
    return jax.tree.map(fetch, tree)


# ----------------------------------------------------------------------------- multi-host


def init_distributed():
    """Connect the processes of a multi-host job, when the environment says it is one.

    Recognised launchers (the variables JAX's own cluster detection reads):
      - any cluster: JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES, JAX_PROCESS_ID
      - SLURM `srun` with several tasks (SLURM_NTASKS > 1, SLURM_STEP_NODELIST, ...)
      - Open MPI `mpirun` (OMPI_COMM_WORLD_SIZE > 1)
      - TPU on GKE with several hosts (TPU_WORKER_HOSTNAMES lists more than one)
    A Cloud TPU VM pod slice started with `gcloud ... ssh --worker=all` needs none of
    these: the TPU runtime connects its hosts by itself. Call before any other JAX call.
    """
    env = os.environ
    launched = ("JAX_COORDINATOR_ADDRESS" in env
                or (int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in env)
                or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
                or "," in env.get("TPU_WORKER_HOSTNAMES", ""))
    if launched and not jax.distributed.is_initialized():
        number = lambda name: int(env[name]) if name in env else None  # None: let JAX detect it
        jax.distributed.initialize(num_processes=number("JAX_NUM_PROCESSES"), process_id=number("JAX_PROCESS_ID"))


def is_main():
    """Only process 0 prints, writes metrics and writes checkpoint files."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- peak FLOP/s
# Dense bf16 peak per JAX device, from the vendors' datasheets. NVIDIA lists tensor-core
# throughput "with sparsity"; the dense figure is half. A TPU v4/v5/v6 JAX device is one
# chip (both TensorCores), so the per-chip figure applies.
DATASHEET_PEAKS = [  # (device_kind contains, FLOP/s, source)
    ("H100 PCIe", 756e12, "NVIDIA H100 Tensor Core GPU datasheet, PCIe: BF16 1,513 TFLOPS with sparsity"),
    ("H100", 989e12, "NVIDIA H100 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity"),
    ("H200", 989e12, "NVIDIA H200 Tensor Core GPU datasheet, SXM: BF16 1,979 TFLOPS with sparsity"),
    ("A100", 312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense"),
    ("TPU v4", 275e12, "Google Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip"),
    ("TPU v5 lite", 197e12, "Google Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
    ("TPU v5e", 197e12, "Google Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
    ("TPU v5p", 459e12, "Google Cloud TPU v5p documentation: 459 TFLOPS bf16 per chip"),
    ("TPU v5", 459e12, "Google Cloud TPU v5p documentation: 459 TFLOPS bf16 per chip"),
    ("TPU v6 lite", 918e12, "Google Cloud TPU v6e documentation: 918 TFLOPS bf16 per chip"),
    ("TPU v6e", 918e12, "Google Cloud TPU v6e documentation: 918 TFLOPS bf16 per chip"),
]
_measured = {}  # device -> (FLOP/s, source): each device is measured once per process


def datasheet_peak(name):
    """(FLOP/s, source) for a device kind such as 'NVIDIA H100 80GB HBM3' or 'TPU v4', or None.
    NVL cards (H100/H200 NVL) run lower clocks than their SXM siblings and are not listed."""
    if "NVL" in name:
        return None
    for pattern, flops, source in DATASHEET_PEAKS:
        # TPU kinds must match whole ('TPU v4 lite' is another chip than 'TPU v4').
        if (name.lower() == pattern.lower()) if pattern.startswith("TPU") else pattern.lower() in name.lower():
            return flops, source
    return None


def peak_flops(device=None):
    """(FLOP/s, where the number comes from) for one device: the datasheet bf16 peak for a
    known accelerator, else a measured large matmul (fp32 on CPU, where bf16 is emulated;
    bf16 elsewhere), measured once per process."""
    device = device or jax.devices()[0]
    known = datasheet_peak(device.device_kind)
    if known:
        return known
    if device not in _measured:
        n, dtype = (2048, jnp.float32) if device.platform == "cpu" else (8192, jnp.bfloat16)
        with jax.set_mesh(None):  # one device, whatever mesh the caller has set
            a = jax.device_put(jnp.ones((n, n), dtype), device)
            matmul = jax.jit(lambda x: x @ x)
            matmul(a).block_until_ready()  # compile and warm up
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                matmul(a).block_until_ready()
                seconds.append(time.perf_counter() - t0)
        _measured[device] = (2 * n ** 3 / statistics.median(seconds),
                             f"measured: median of 3 {n}x{n} {np.dtype(dtype).name} matmuls on {device.device_kind}")
    return _measured[device]


# ----------------------------------------------------------------------------- dry run


def ensure_fake_devices(mesh_spec):
    """Make sure `mesh_spec` has enough devices to compile for: if this machine has fewer,
    re-run this very command (os.execve, same arguments) on CPU with that many simulated
    devices. XLA's --xla_force_host_platform_device_count is read only when the CPU
    backend starts, hence a fresh process. For `--dry-run` only: nothing is allocated."""
    n = math.prod(parse_mesh(mesh_spec)) if mesh_spec else 1
    if jax.device_count() >= n:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    if flag in os.environ.get("XLA_FLAGS", ""):  # we are the re-run and it did not take
        raise ValueError(f"mesh {mesh_spec} needs {n} devices and even {flag} did not provide them")
    others = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{others} {flag}".strip())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _size(n_bytes):
    """Right-aligned human size: GiB for big numbers, MiB/KiB for the small test configs."""
    for unit, scale, smallest in (("GiB", 2 ** 30, 2 ** 30 / 10), ("MiB", 2 ** 20, 2 ** 20)):
        if n_bytes >= smallest:
            return f"{n_bytes / scale:8.2f} {unit}"
    return f"{n_bytes / 2 ** 10:8.1f} KiB"


def _bytes_per_device(tree, shardings):
    """Bytes one device holds of `tree` (shapes only), from each sharding's shard shape."""
    return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def _target_peak(peak):
    """(FLOP/s, source) for dry_run's `peak`: None (this machine's device), FLOP/s per device
    (a number, or a string such as '275e12'), or a datasheet name such as 'TPU v4' or 'H100'."""
    if peak is None:
        return peak_flops(jax.devices()[0])
    try:
        return float(peak), "given"
    except ValueError:
        pass
    found = datasheet_peak(peak)
    if found is None:
        raise ValueError(f"no datasheet peak for {peak!r}; give FLOP/s per device or one of: "
                         f"{', '.join(p for p, _, _ in DATASHEET_PEAKS)}")
    return found


def dry_run(config, mesh_spec, batch_size, seq_len, recipe, grad_accum=1, device_memory_gib=80.0, *,
            peak=None, mfu=0.4):
    """Compile one training step for `mesh_spec` on abstract shapes and report, per device,
    the bytes of parameters, optimizer state and activations (the compiler's temporary
    buffers), whether that fits `device_memory_gib`, and the tokens/s expected at `mfu`
    of `peak` (see _target_peak; default: this machine's device).

    `batch_size` is sequences per optimizer step, in `grad_accum` micro-batches. Needs as
    many devices as the mesh (see ensure_fake_devices); allocates nothing of the model.
    """
    import model
    import train  # imported here, not at the top: train.py imports this file

    shape = (jax.device_count(), 1, 1) if mesh_spec is None else parse_mesh(mesh_spec)
    n_dev = math.prod(shape)
    if jax.device_count() < n_dev:
        raise ValueError(f"mesh {mesh_spec} needs {n_dev} devices, {jax.device_count()} visible; run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} JAX_PLATFORMS=cpu")
    if batch_size % grad_accum:
        raise ValueError(f"batch {batch_size} is not divisible by grad_accum {grad_accum}")
    mesh = make_mesh("x".join(map(str, shape)), jax.devices()[:n_dev])
    micro = batch_size // grad_accum
    check_layout(config, mesh, micro)
    peak_flops_s, peak_source = _target_peak(peak)

    # Shapes only: eval_shape traces init without running it; the shardings ride along.
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    state = jax.eval_shape(train.init_state, jax.eval_shape(partial(model.init_params, config), key))
    state_sh, batch_sh = state_shardings(state, mesh), batch_sharding(mesh)
    state_in = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh)
    batch_in = jax.ShapeDtypeStruct((grad_accum, micro, seq_len + 1), jnp.int32, sharding=batch_sh)
    step = jax.jit(train.make_train_step(config, recipe), in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, None), donate_argnums=0)
    t0 = time.time()
    with jax.set_mesh(mesh):  # the mesh model.forward's activation hint refers to
        compiled = step.lower(state_in, batch_in).compile()
    compile_s = time.time() - t0

    params_b = _bytes_per_device(state["params"], state_sh["params"])
    opt_b = _bytes_per_device((state["mu"], state["nu"]), (state_sh["mu"], state_sh["nu"]))
    batch_b = _bytes_per_device(batch_in, batch_sh)
    mem = compiled.memory_analysis()
    temp_b = mem.temp_size_in_bytes
    # Outputs reuse the donated inputs' buffers; whatever is not aliased is extra.
    extra_out_b = max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0)
    total_b = params_b + opt_b + batch_b + temp_b + extra_out_b
    fits = total_b <= device_memory_gib * 2 ** 30

    n_params, fpt = model.param_count(config), model.flops_per_token(config, seq_len)
    tokens_step = batch_size * seq_len
    tokens_s = mfu * peak_flops_s * n_dev / fpt
    dp, fsdp, mp = shape
    return "\n".join([
        f"dry run: mesh data={dp} x fsdp={fsdp} x model={mp} ({n_dev} {jax.devices()[0].platform} devices), "
        f"compiled in {compile_s:.0f} s",
        f"  model          {n_params:,} parameters (n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"n_head={config.n_head}, vocab={config.vocab_size})",
        f"  FLOPs/token    {fpt:.3e} (6N + 12·L·D·T, T={seq_len})",
        f"  step           {batch_size} x {seq_len} = {tokens_step:,} tokens, {grad_accum} micro-batch(es) of "
        f"{micro}, {micro // (dp * fsdp)} sequence(s) per device; compute {recipe.dtype}, remat {recipe.remat}",
        "  per device:",
        f"    parameters       {_size(params_b)}  (fp32 master weights)",
        f"    optimizer state  {_size(opt_b)}  (AdamW mu and nu, fp32)",
        f"    batch            {_size(batch_b)}",
        f"    activations/temp {_size(temp_b)}  (compiler's temporaries: activations, gradients, gathered weights)",
        f"    outputs          {_size(extra_out_b)}  (not aliased to donated inputs)",
        f"    total            {_size(total_b)}  -> "
        + (f"fits in {device_memory_gib:g} GiB" if fits else f"does NOT fit in {device_memory_gib:g} GiB"),
        *(["  (compiled for CPU: the temp bytes are XLA:CPU's buffer plan; TPU/GPU compilers fuse "
            "differently, so read them as an estimate)"] if jax.devices()[0].platform == "cpu" else []),
        f"  expected       {tokens_s:,.0f} tokens/s ({tokens_step / tokens_s:.3g} s/step) at {mfu:.0%} MFU of "
        f"{peak_flops_s / 1e12:.3g} TFLOP/s per device ({peak_source})",
    ])
