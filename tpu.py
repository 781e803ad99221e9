"""Devices, meshes and shardings: how one CodeGen model is spread over many chips.

CodeGen was trained on TPU-v4 pods with JAXformer, which laid the model out Megatron-style
with pjit/xmap (the original JAXformer repository). Here the same layout is declared with JAX's own SPMD:
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

The batch is split over data x fsdp; RULES below give the parameters, decode_specs the
decode state of sampling (its KV cache split by heads). The file also holds the multi-host
plumbing (distributed init, global batch assembly, the share of an evaluation each process
samples), the accelerators' datasheets (peak FLOP/s, TPU HBM), and the planning of a run
before renting the hardware: `compile_plan` compiles any jitted step ahead of time on
abstract shapes for a mesh and returns what one device needs (memory_analysis); train.py's
`dry_run` below and sample.dry_run report it. The devices are simulated CPU ones (XLA:CPU's
buffer plan, an estimate) or, with libtpu (`pip install libtpu`, no TPU needed), those of
a TPU slice, compiled for by XLA:TPU itself, which is what the chips would allocate:

    python train.py --size 16B --mesh 1x16x4 --dry-run                     # simulated CPU devices
    python train.py --size 350M --mesh 1x4x1 --dry-run --topology v5p:2x2x1  # XLA:TPU

On a machine without a TPU chip, importing this file keeps JAX's backend search from
loading libtpu (`skip_absent_tpu`), so CPU and GPU runs print none of its errors; the
topology path loads it on its own, as a compiler.
"""
import importlib.util
import json
import math
import os
import re
import sys
import time

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import common
import model_fast



def skip_absent_tpu():
    """Leave the TPU out of JAX's backend search where no TPU chip is attached.

    With libtpu installed, JAX's first backend call loads it to look for a TPU, and on
    a CPU or GPU machine libtpu prints errors about TPU workers it cannot find. JAX's
    own test for TPU chips (their PCI ids) decides here; the search then skips the TPU
    and finds the GPU or CPU as before. JAX_PLATFORMS (or JAX_FORCE_TPU_INIT) given by
    the user is left alone. Runs when this file is imported, before any backend starts.
    """
    from jax.extend import backend
    try:
        from jax._src import hardware_utils  # JAX's own test, as jax._src.cloud_tpu_init uses it
    except ImportError:                      # another JAX layout: leave its search as it is
        return
    if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    if hardware_utils.num_available_tpu_chips_and_device_id()[0] == 0:
        backend.register_backend_factory("tpu", lambda: None, priority=300)


skip_absent_tpu()

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
    """NamedSharding for every parameter (arrays or ShapeDtypeStructs), from RULES. Layer weights
    may be stacked (L, ...) or in model_fast.decoding_layout (as sample.load returns them): there a
    per-layer weight takes its rule without the L axis, and a matrix stored [out, in] reversed."""
    decoding = model_fast.in_decoding_layout(params)

    def rule(path, leaf):
        name, spec = path[-1].key, RULES.get(path[-1].key)
        if spec is None:
            raise ValueError(f"no partition rule for parameter {name!r}; add one to tpu.RULES")
        if len(path) > 1 and isinstance(path[-2], jax.tree_util.SequenceKey):
            spec = P(*spec[1:])                                   # one layer of the list: no L axis
        spec = P(*spec[::-1]) if decoding and name in model_fast.TRANSPOSED_FOR_DECODING else spec  # [out, in]
        if len(spec) != leaf.ndim:
            raise ValueError(f"parameter {name!r} has {leaf.ndim} dims but its rule {spec} names {len(spec)}")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(rule, params)


def decode_specs(state):
    """PartitionSpecs for sampling's decode state (sample.py): every array is split by rows (its
    first dimension) over the data axes, like a batch, and the KV cache's k and v (B, H, S, hd)
    also by heads over 'model': each device keeps the keys and values of the heads whose q/k/v
    columns it computes (RULES), so attention needs no communication. Scalars are replicated."""
    def spec(path, a):
        if a.ndim == 0:
            return P()
        if any(getattr(k, "key", None) in ("k", "v") for k in path):
            return P(BATCH_AXES, "model", None, None)
        return P(BATCH_AXES, *[None] * (a.ndim - 1))
    return jax.tree_util.tree_map_with_path(spec, state)


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
    """Connect the processes of a multi-host job, when the environment says it is one. Launchers
    (the variables JAX's cluster detection reads): any cluster (JAX_COORDINATOR_ADDRESS=host:port,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID), SLURM `srun` with several tasks, Open MPI `mpirun`, TPU on
    GKE with several hosts (TPU_WORKER_HOSTNAMES). A Cloud TPU VM pod slice (`gcloud ... ssh
    --worker=all`) needs none: its runtime connects the hosts. Call before any other JAX call."""
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


def process_share():
    """common.generate_jsonl's `share` in a multi-host job (None in one process): each process
    samples its own batches on a mesh of its own devices, and process 0 writes the file."""
    return None if jax.process_count() == 1 else common.Share(jax.process_index(), jax.process_count(), allgather)


def allgather(obj):
    """[obj of process 0, obj of process 1, ...] on every process: a JSON-able value sent as bytes
    through multihost_utils.process_allgather (the sizes first, then the bytes padded to the largest)."""
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size]))).ravel()
    padded = np.zeros(sizes.max(), np.uint8)
    padded[:data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes()) for row, n in zip(everyone, sizes)]


# ----------------------------------------------------------------------------- accelerator datasheets
# Dense bf16 peak per chip, from the vendors' datasheets. NVIDIA lists tensor-core throughput
# "with sparsity"; the dense figure is half. A TPU v4/v5p chip has two TensorCores, which JAX
# shows as one device (megacore), so a device is a chip and the per-chip figures apply.
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
# HBM per chip, from the same Google Cloud TPU pages (v5p: 95 GiB; "TPU v5" is v5p's device kind).
TPU_HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v6 lite": 32}


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
    """(FLOP/s, source): the datasheet bf16 peak of `device` (default: the first), or None
    where there is none (CPUs, unlisted accelerators). MFU is only meaningful against a
    fixed peak; a CPU has none worth the name (bench.py measures one for its own use)."""
    return datasheet_peak((device or jax.devices()[0]).device_kind)


# ----------------------------------------------------------------------------- TPU topologies

def topology_devices(name):
    """The devices of a TPU slice named like 'v4:2x2x1', 'v5p:4x4x4' or 'v5e:4x4', to compile
    for with the real XLA:TPU compiler on any machine: libtpu (pip) holds the compiler, no TPU
    is needed, and nothing can run on these devices. Chips with two TensorCores (v4, v5p) come
    as one device each (megacore), as JAX shows them on a TPU VM."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for TPU topology {name} needs the TPU compiler: pip install libtpu")
    from jax.experimental import topologies
    # Compile only: one host of its own (without these, libtpu looks for a TPU VM's metadata
    # and prints warnings), and no claim on libtpu's lock file, which a real TPU's user holds.
    for var, value in (("TPU_HOST_BOUNDS", "1,1,1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(var, value)
    try:
        try:
            return topologies.get_topology_desc(topology_name=name, platform="tpu", chip_config_name="megacore").devices
        except jax.errors.JaxRuntimeError as e:
            if "NOT_FOUND" not in str(e):  # one TensorCore per chip (v5e, v6e): no megacore config
                raise
            return topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(f"TPU topology {name!r}: {str(e).splitlines()[0]}; names look like v4:2x2x1, "
                         f"v5p:4x4x4, v5e:4x4") from None


def describe_devices(devices):
    """(words, HBM bytes per device or None, (peak FLOP/s, source) per device or None).
    A TPU device is a chip unless several devices share a chip's coordinates: then each is
    one TensorCore, with its share of the chip's HBM and peak."""
    d, n = devices[0], len(devices)
    if d.platform != "tpu":
        return f"{n} {d.platform} devices ({d.device_kind})", None, peak_flops(d)
    per_chip = sum(x.coords == d.coords for x in devices)
    cores = getattr(d, "num_cores", 1)
    if per_chip > 1:
        words = f"{n} {d.device_kind} devices, each one TensorCore ({per_chip} per chip)"
    else:
        words = f"{n} {d.device_kind} devices, each one chip" + (f" ({cores} TensorCores, megacore)" if cores > 1 else "")
    hbm = TPU_HBM_GIB.get(d.device_kind)
    peak = datasheet_peak(d.device_kind)
    return (words, hbm * 2 ** 30 / per_chip if hbm else None,
            (peak[0] / per_chip, peak[1] + (f", shared by {per_chip} TensorCores" if per_chip > 1 else "")) if peak else None)


# ----------------------------------------------------------------------------- compiling ahead of time

def compile_plan(fn, args, mesh, *, out_shardings=None, donate_argnums=()):
    """Compile `fn` ahead of time for `mesh` and say what one device needs to run it.

    `args` are jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves (nothing is allocated);
    the mesh may be simulated CPU devices or a TPU topology's. Returns (compiled, seconds, bytes),
    bytes per device from the compiler's memory_analysis(): 'arguments', 'temp', 'outputs' not
    aliased to donated arguments, 'code', and their 'total'. Any jitted step: training, decoding.
    Where XLA:TPU refuses a program that cannot fit the chip's HBM (CompileTimeHbmOom), compiled
    is None and bytes its one-line reason.
    """
    in_shardings = jax.tree.map(lambda a: a.sharding, args)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate_argnums)
    t0 = time.time()
    try:
        with jax.set_mesh(mesh):  # the mesh model.forward's activation hint refers to
            compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # XLA:TPU refuses a program that cannot fit the HBM
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return None, time.time() - t0, str(e).splitlines()[0].split(": ", 1)[-1]
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    used = {"arguments": mem.argument_size_in_bytes, "temp": mem.temp_size_in_bytes,
            "outputs": max(mem.output_size_in_bytes - mem.alias_size_in_bytes, 0),
            "code": mem.generated_code_size_in_bytes}
    return compiled, seconds, used | {"total": sum(used.values())}


def ensure_fake_devices(mesh_spec, topology=None):
    """Give a dry run devices to compile for: with a TPU `topology`, libtpu's, and JAX stays on
    CPU (no TPU search). Else, if this machine has fewer devices than `mesh_spec`, re-run this
    very command (os.execve) on CPU with that many simulated ones: XLA reads its
    --xla_force_host_platform_device_count only when the CPU backend starts. Call first."""
    if topology:
        jax.config.update("jax_platforms", "cpu")
        return
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


def plan_mesh(mesh_spec, topology=None):
    """(mesh, words, HBM bytes per device or None, (peak, source) or None) for planning a step:
    the devices of TPU `topology` (XLA:TPU via libtpu) or this machine's (see ensure_fake_devices)."""
    devices = topology_devices(topology) if topology else jax.devices()
    shape = (len(devices), 1, 1) if mesh_spec is None else parse_mesh(mesh_spec)
    n_dev = math.prod(shape)
    if topology and n_dev != len(devices):
        raise ValueError(f"mesh {mesh_spec} has {n_dev} devices but TPU topology {topology} has {len(devices)}; "
                         f"make DPxFSDPxMP multiply to {len(devices)}")
    if len(devices) < n_dev:
        raise ValueError(f"mesh {mesh_spec} needs {n_dev} devices, {len(devices)} visible; run with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={n_dev} JAX_PLATFORMS=cpu")
    words, hbm_b, peak = describe_devices(devices[:n_dev])
    words += f" (TPU topology {topology})" if topology else ""
    return make_mesh("x".join(map(str, shape)), devices[:n_dev]), words, hbm_b, peak


def memory_lines(used, hbm_b, platform, arguments, temp):
    """Report lines for compile_plan's bytes against `hbm_b`; `arguments`, `temp`: what those hold."""
    if isinstance(used, str):
        return [f"    total            does NOT fit: XLA:{platform.upper()} refuses to compile it ({used})"]
    verdict = ("give --device-memory GiB to compare" if hbm_b is None else
               f"{'fits in' if used['total'] <= hbm_b else 'does NOT fit in'} {hbm_b / 2 ** 30:g} GiB "
               f"({used['total'] / hbm_b:.0%})")
    return [f"    arguments        {human_size(used['arguments'])}  ({arguments})",
            f"    activations/temp {human_size(used['temp'])}  (compiler's temporaries: {temp})",
            f"    outputs          {human_size(used['outputs'])}  (not aliased to donated inputs)",
            f"    program          {human_size(used['code'])}  (generated code)",
            f"    total            {human_size(used['total'])}  -> {verdict}"] + (
        ["  (compiled for CPU: the temp bytes are XLA:CPU's buffer plan, an estimate of a TPU's or "
         "GPU's; --topology v4:2x2x1 and the like compile with XLA:TPU itself)"] if platform == "cpu" else [])


# ----------------------------------------------------------------------------- the training dry run

def human_size(n_bytes):
    """Right-aligned human size: GiB for big numbers, MiB/KiB for the small test configs."""
    for unit, scale, smallest in (("GiB", 2 ** 30, 2 ** 30 / 10), ("MiB", 2 ** 20, 2 ** 20)):
        if n_bytes >= smallest:
            return f"{n_bytes / scale:8.2f} {unit}"
    return f"{n_bytes / 2 ** 10:8.1f} KiB"


def bytes_per_device(tree, shardings=None):
    """Bytes one device holds of `tree` (shapes only), from each sharding's shard shape (by
    default the leaves' own: ShapeDtypeStructs made with sharding=)."""
    shardings = [x.sharding for x in jax.tree.leaves(tree)] if shardings is None else jax.tree.leaves(shardings)
    return sum(math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, sh in zip(jax.tree.leaves(tree), shardings))


def _target_peak(peak, devices_peak):
    """(FLOP/s, source) or None for dry_run's `peak`: None (the devices' own datasheet peak),
    FLOP/s per device (a number, or a string such as '275e12'), or a datasheet name ('TPU v4')."""
    if peak is None:
        return devices_peak
    try:
        return float(peak), "given"
    except ValueError:
        pass
    found = datasheet_peak(peak)
    if found is None:
        raise ValueError(f"no datasheet peak for {peak!r}; give FLOP/s per device or one of: "
                         f"{', '.join(p for p, _, _ in DATASHEET_PEAKS)}")
    return found


def plan_train_step(step, state, windows, mesh):
    """compile_plan of a train step(state, windows) -> (state, metrics) laid out on `mesh` as
    training lays it out (state_shardings, batch_sharding, the state donated). `state` and
    `windows` need only shapes and dtypes. The compiled step runs the training loop itself."""
    state_sh = state_shardings(state, mesh)
    state_in = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), state, state_sh)
    windows_in = jax.ShapeDtypeStruct(windows.shape, windows.dtype, sharding=batch_sharding(mesh))
    return compile_plan(step, (state_in, windows_in), mesh, out_shardings=(state_sh, None), donate_argnums=0)


def memory_budget(device):
    """(bytes a program may use on `device`, where they come from): an accelerator's own
    limit (memory_stats), or for a CPU the machine's available RAM (/proc/meminfo)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"], f"{device.device_kind} memory"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def dry_run(step, state, windows, config, recipe, flops_per_token, mesh_spec, *, topology=None,
            device_memory_gib=None, peak=None, mfu=0.4):
    """Compile a training step for a mesh on abstract shapes and report, per device, what it
    needs against the device's memory, and the tokens/s expected at `mfu` of the peak.
    train.py builds `step(state, windows) -> (state, metrics)`, the abstract train state
    (params, AdamW mu and nu, step) and (K, B, W) int32 `windows`; `recipe` gives dtype and
    remat. Devices as plan_mesh; `device_memory_gib` defaults to the TPU chip's HBM; `peak` as
    _target_peak."""
    mesh, words, hbm_b, devices_peak = plan_mesh(mesh_spec, topology)
    K, micro, W = windows.shape
    check_layout(config, mesh, micro)
    hbm_b = device_memory_gib * 2 ** 30 if device_memory_gib else hbm_b
    target = _target_peak(peak, devices_peak)

    _, seconds, used = plan_train_step(step, state, windows, mesh)
    state_sh, windows_sh = state_shardings(state, mesh), batch_sharding(mesh)
    windows_in = jax.ShapeDtypeStruct(windows.shape, windows.dtype, sharding=windows_sh)

    platform = mesh.devices.flat[0].platform
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    tokens_step = K * micro * (W - 1)
    dp, fsdp, mp = (mesh.shape[a] for a in AXES)
    n_dev = dp * fsdp * mp
    lines = [
        f"dry run: mesh data={dp} x fsdp={fsdp} x model={mp} on {words}"
        + f"; compiled by XLA:{platform.upper()} in {seconds:.0f} s",
        f"  model          {n_params:,} parameters (n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"n_head={config.n_head}, vocab={config.vocab_size})",
        f"  FLOPs/token    {flops_per_token:.3e} (6N + 12·L·D·T, T={W - 1})",
        f"  step           {K * micro} x {W - 1} = {tokens_step:,} tokens, {K} micro-batch(es) of "
        f"{micro}, {micro // (dp * fsdp)} sequence(s) per device; compute {recipe.dtype}, remat {recipe.remat}",
        "  per device:",
        f"    parameters       {human_size(bytes_per_device(state['params'], state_sh['params']))}"
        "  (fp32 master weights)",
        f"    optimizer state  {human_size(2 * bytes_per_device(state['mu'], state_sh['mu']))}"
        "  (AdamW mu and nu, fp32)",
        f"    batch            {human_size(bytes_per_device(windows_in, windows_sh))}",
    ]
    lines += memory_lines(used, hbm_b, platform, "the three above as the compiler lays them out",
                          "activations, gradients, gathered weights")
    if target is None:
        lines.append("  expected       give --peak (FLOP/s per device or a datasheet name) for tokens/s")
    else:
        tokens_s = mfu * target[0] * n_dev / flops_per_token
        lines.append(f"  expected       {tokens_s:,.0f} tokens/s ({tokens_step / tokens_s:.3g} s/step) at {mfu:.0%} "
                     f"MFU of {target[0] / 1e12:.3g} TFLOP/s per device ({target[1]})")
    return "\n".join(lines)
