"""Devices, meshes and shardings: one CodeGen model over many chips.

CodeGen was trained on TPU-v4 pods with JAXformer, which laid the model
out Megatron-style with pjit/xmap (the original JAXformer repository).
Here the same layout is declared with JAX's own SPMD: a
`jax.sharding.Mesh` of devices with three named axes, a `PartitionSpec`
per parameter saying which axis splits which dimension, and
`jax.jit(in_shardings=, out_shardings=)`. The compiler (GSPMD/Shardy)
then inserts every collective; the only sharding code outside this
file is one activation hint, model.split_batch (see below RULES).

The mesh has three axes, `--mesh DPxFSDPxMP`:

    data   plain data parallelism: replicas of the state (as split by
           the other two axes), each fed its own slice of the batch;
           gradients are averaged across it.
    fsdp   data parallelism that also splits parameters and optimizer
           state (ZeRO-3 / "fully sharded"): each weight is gathered
           just before it is used.
    model  tensor parallelism: attention heads, the MLP hidden units
           and the vocabulary are divided among the devices (Megatron
           column/row parallel, as JAXformer's 'mp').

The batch is split over data x fsdp; RULES below give the parameters,
decode_shardings the decode state of sampling (its KV cache split by
heads). The file also holds the multi-host plumbing (distributed init,
global batch assembly, the share of an evaluation each process
samples). Planning a run before renting the hardware (dry runs,
datasheets) is plan.py.

On a machine without a TPU chip, importing this file keeps JAX's
backend search from loading libtpu (`skip_absent_tpu`), so CPU and GPU
runs print none of its errors; plan.py's topology path loads it on its
own, as a compiler.
"""
import json
import math
import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import common
import model_fast


def skip_absent_tpu():
    """Leave the TPU out of JAX's backend search where no TPU chip is
    attached.

    With libtpu installed, JAX's first backend call loads it to look
    for a TPU, and on a CPU or GPU machine libtpu prints errors about
    TPU workers it cannot find. JAX's own test for TPU chips (their PCI
    ids) decides here; the search then skips the TPU and finds the GPU
    or CPU as before. JAX_PLATFORMS (or JAX_FORCE_TPU_INIT) given by
    the user is left alone. Runs when this file is imported, before
    any backend starts.
    """
    from jax.extend import backend
    try:
        # JAX's own test, as jax._src.cloud_tpu_init uses it
        from jax._src import hardware_utils
    except ImportError:  # another JAX layout: leave its search alone
        return
    if jax.config.jax_platforms or "JAX_FORCE_TPU_INIT" in os.environ:
        return
    chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    if chips == 0:
        backend.register_backend_factory("tpu", lambda: None,
                                         priority=300)


skip_absent_tpu()

AXES = ("data", "fsdp", "model")
# the batch dimension is split over both data-parallel axes
BATCH_AXES = ("data", "fsdp")

# ------------------------------------------------------------ the rules
# One entry per parameter of model.py, one mesh axis (or None) per
# dimension.
#
#   model: Megatron. q/k/v are column parallel (their output columns
#          are heads: column h*hd+d belongs to head h, so a device
#          owning n_head/MP consecutive heads computes their attention
#          with no communication); wo is row parallel (its input rows
#          are those same heads), so attention costs one all-reduce of
#          the output. The MLP is the same: w_in/b_in columns, w_out
#          rows. The vocabulary is split too, for the embedding table
#          (rows) and the head (columns, and its bias).
#   fsdp:  the largest dimension that `model` left whole, always
#          n_embd here.
#   never: the stacked layer axis L (the layer scan walks it) and small
#          vectors (LayerNorm, output biases), which are replicated:
#          splitting them saves nothing.
RULES = {
    "wte":       P("model", "fsdp"),        # (V, D)    vocab rows
    "ln_scale":  P(None, None),             # (L, D)
    "ln_bias":   P(None, None),             # (L, D)
    # (L, D, D) column parallel: output = heads
    "wq":        P(None, "fsdp", "model"),
    "wk":        P(None, "fsdp", "model"),  # (L, D, D)
    "wv":        P(None, "fsdp", "model"),  # (L, D, D)
    # (L, D, D) row parallel: input = heads
    "wo":        P(None, "model", "fsdp"),
    # (L, D, F) column parallel: output = MLP hidden
    "w_in":      P(None, "fsdp", "model"),
    "b_in":      P(None, "model"),          # (L, F) follows w_in
    # (L, F, D) row parallel: input = MLP hidden
    "w_out":     P(None, "model", "fsdp"),
    "b_out":     P(None, None),             # (L, D) after all-reduce
    "lnf_scale": P(None),                   # (D,)
    "lnf_bias":  P(None),                   # (D,)
    "head_w":    P("fsdp", "model"),        # (D, V)    vocab columns
    "head_b":    P("model"),                # (V,)
}
# Activations need exactly one hint, model.split_batch: the embedding
# output is constrained to be split by batch rows over (data, fsdp)
# when the train step or the sampler passes its mesh to the model's
# forward or loss_fn (`mesh=`). Without it the
# compiler propagates the weights' fsdp split into the residual stream
# and replicates the batch instead (more FLOPs per device and more
# temporary memory, docs/sharding.md); with it,
# every layer's weights are all-gathered inside the layer scan, which
# is FSDP as intended. Nothing else is needed.


# ------------------------------------------------------------ mesh

def parse_mesh(spec):
    """'DPxFSDPxMP' -> (dp, fsdp, mp)."""
    parts = str(spec).lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0
                                  for p in parts):
        raise ValueError(f"mesh {spec!r} must be DPxFSDPxMP, three "
                         f"positive integers such as 2x4x1")
    return tuple(int(p) for p in parts)


def make_mesh(spec, devices=None):
    """Mesh with axes (data, fsdp, model) over `devices` (default: all
    of them, every process's). `spec` None puts every device on
    'data'."""
    if devices is None:
        devices = jax.devices()
    devices = list(devices)
    if spec is None:
        shape = (len(devices), 1, 1)
    else:
        shape = parse_mesh(spec)
    n = math.prod(shape)
    if n != len(devices):
        raise ValueError(f"mesh {spec} has {n} devices but "
                         f"{len(devices)} are visible; make DPxFSDPxMP "
                         f"multiply to {len(devices)}")
    # jax.make_mesh orders devices along the physical interconnect (the
    # innermost axis, 'model', gets the closest chips). Auto axes: the
    # compiler propagates shardings from the inputs (plus model.py's
    # one hint), rather than every op being annotated.
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def check_layout(config, mesh, batch_size):
    """One-line ValueError naming the first dimension that `mesh`
    cannot divide evenly. `batch_size` is the micro-batch (sequences
    per forward pass); `mesh` only needs `.shape`."""
    dp, fsdp, mp = (mesh.shape[a] for a in AXES)
    splits = [
        # heads (and with them the MLP hidden 4D)
        ("n_head", config.n_head, "model", mp),
        # embedding rows, head columns
        ("vocab_size", config.vocab_size, "model", mp),
        # fsdp's dimension of every matrix
        ("n_embd", config.n_embd, "fsdp", fsdp),
    ]
    for name, value, axis, size in splits:
        if value % size:
            raise ValueError(f"{name}={value} is not divisible by the "
                             f"{axis} axis ({size})")
    if batch_size % (dp * fsdp):
        raise ValueError(f"batch {batch_size} not divisible by "
                         f"data*fsdp={dp * fsdp}")
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % mp:
        raise ValueError(f"the model axis ({mp}) must divide the "
                         f"{local} devices of each host: tensor "
                         f"parallelism needs the fast links inside a "
                         f"host")


# ------------------------------------------------------------ shardings

def param_shardings(params, mesh):
    """NamedSharding for every parameter (arrays or ShapeDtypeStructs),
    from RULES. Layer weights may be stacked (L, ...) or in
    model_fast.decoding_layout (as sample.load returns them): there a
    per-layer weight takes its rule without the L axis, and a matrix
    stored [out, in] reversed."""
    decoding = model_fast.in_decoding_layout(params)

    def rule(path, leaf):
        name = path[-1].key
        spec = RULES.get(name)
        if spec is None:
            raise ValueError(f"no partition rule for parameter "
                             f"{name!r}; add one to tpu.RULES")
        one_layer = len(path) > 1 and isinstance(
            path[-2], jax.tree_util.SequenceKey)
        if one_layer:  # one layer of the list: no L axis
            spec = P(*spec[1:])
        if decoding and name in model_fast.TRANSPOSED_FOR_DECODING:
            spec = P(*spec[::-1])  # stored [out, in]
        if len(spec) != leaf.ndim:
            raise ValueError(f"parameter {name!r} has {leaf.ndim} dims "
                             f"but its rule {spec} names {len(spec)}")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(rule, params)


def decode_shardings(state, mesh):
    """Shardings on `mesh` for sampling's decode state (sample.py): every
    array is split by rows (its first dimension) over the data axes,
    like a batch, and the KV cache's k and v (B, H, S, hd) also by
    heads over 'model': each device keeps the keys and values of the
    heads whose q/k/v columns it computes (RULES), so attention needs
    no communication. Scalars are replicated."""
    def spec(path, a):
        if a.ndim == 0:
            return P()
        if any(getattr(k, "key", None) in ("k", "v") for k in path):
            return P(BATCH_AXES, "model", None, None)
        return P(BATCH_AXES, *[None] * (a.ndim - 1))

    def sharding(path, a):
        return NamedSharding(mesh, spec(path, a))
    return jax.tree_util.tree_map_with_path(sharding, state)


def state_shardings(state, mesh):
    """Shardings for train.init_state's tree. AdamW's moments are
    sharded exactly like the parameter they belong to (the update is
    elementwise, so it needs no communication); the step counter is
    replicated."""
    replicated = NamedSharding(mesh, P())
    shardings = {}
    for key, sub in state.items():
        if key in ("params", "mu", "nu"):
            shardings[key] = param_shardings(sub, mesh)
        else:
            shardings[key] = jax.tree.map(lambda _: replicated, sub)
    return shardings


def batch_sharding(mesh):
    """(K, B, T+1) batches: micro-batch rows B over (data, fsdp), K and
    T whole."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None))


def global_batch(local_KbT1, mesh):
    """This process's rows (K, B/processes, T+1) -> the global
    (K, B, T+1) jax.Array.

    Every process passes only its own share (data.py reads a disjoint
    part of the files per process); no host ever holds the global
    batch.
    """
    return jax.make_array_from_process_local_data(
        batch_sharding(mesh), np.asarray(local_KbT1))


def to_host(tree):
    """Numpy copy of a (possibly sharded, possibly multi-host) tree, one
    leaf at a time, for writing checkpoints. Every process must call it
    (a leaf spread over other hosts is fetched with an all-gather); no
    device ever holds more than its own shard."""
    from jax.experimental import multihost_utils

    def fetch(a):
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            gathered = multihost_utils.process_allgather(a, tiled=True)
            return np.asarray(gathered)
        return np.asarray(jax.device_get(a))
    return jax.tree.map(fetch, tree)


# ------------------------------------------------------------ multi-host

def launched_by_a_cluster(env):
    """Whether the environment says this is one process of several:
    any cluster (JAX_COORDINATOR_ADDRESS), SLURM `srun` with several
    tasks, Open MPI `mpirun`, TPU on GKE with several hosts."""
    slurm = (int(env.get("SLURM_NTASKS", "1")) > 1
             and "SLURM_STEP_NODELIST" in env)
    return ("JAX_COORDINATOR_ADDRESS" in env or slurm
            or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "," in env.get("TPU_WORKER_HOSTNAMES", ""))


def init_distributed():
    """Connect the processes of a multi-host job, when the environment
    says it is one (launched_by_a_cluster: the variables JAX's cluster
    detection reads, e.g. JAX_COORDINATOR_ADDRESS=host:port,
    JAX_NUM_PROCESSES, JAX_PROCESS_ID). A Cloud TPU VM pod slice
    (`gcloud ... ssh --worker=all`) needs none: its runtime connects
    the hosts. Call before any other JAX call."""
    env = os.environ
    if not launched_by_a_cluster(env):
        return
    if jax.distributed.is_initialized():
        return

    def number(name):  # None: let JAX detect it
        return int(env[name]) if name in env else None
    jax.distributed.initialize(
        num_processes=number("JAX_NUM_PROCESSES"),
        process_id=number("JAX_PROCESS_ID"))


def is_main():
    """Only process 0 prints, writes metrics and writes checkpoints."""
    return jax.process_index() == 0


def process_share():
    """common.generate_jsonl's `share` in a multi-host job (None in one
    process): each process samples its own batches on a mesh of its
    own devices, and process 0 writes the file."""
    if jax.process_count() == 1:
        return None
    return common.Share(jax.process_index(), jax.process_count(),
                        allgather)


def allgather(obj):
    """[obj of process 0, obj of process 1, ...] on every process: a
    JSON-able value sent as bytes through
    multihost_utils.process_allgather (the sizes first, then the bytes
    padded to the largest)."""
    from jax.experimental import multihost_utils
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size]))
    sizes = np.asarray(sizes).ravel()
    padded = np.zeros(sizes.max(), np.uint8)
    padded[:data.size] = data
    everyone = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(row[:n].tobytes())
            for row, n in zip(everyone, sizes)]
