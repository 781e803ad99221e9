"""Plan a run before renting the hardware: will it fit, and how fast.

A dry run compiles the real jitted step (training, or sampling's prefill
and decode) ahead of time on abstract shapes for a mesh, allocating
nothing, and reports what one device needs against its memory
(the compiler's memory_analysis) and, for training, the tokens/s
expected at a given MFU of the accelerator's datasheet peak.

The devices compiled for are either simulated CPU ones (XLA:CPU's buffer
plan, an estimate) or, with libtpu (`pip install libtpu`, no TPU
needed), those of a TPU slice, compiled for by XLA:TPU itself, which is
what the chips would allocate:

    python train.py --size 16B --mesh 1x16x4 --dry-run
    python train.py --size 350M --mesh 1x4x1 --dry-run --topology v5p:2x2x1
    python sample.py --size 16B --mesh 1x1x4 --dry-run --topology v4:2x2x1

The file also holds the accelerators' datasheets (dense bf16 peak
FLOP/s, TPU HBM per chip) that MFU and the plans are measured against.
The steps themselves come from train.py and sample.py, which pass them
in: this file sits below both (it imports tpu.py and model.py only).
"""
import importlib.util
import math
import os
import re
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import common
import model
import tpu

# ------------------------------------------------------------ datasheets
# Dense bf16 peak per chip, from the vendors' datasheets. NVIDIA lists
# tensor-core throughput "with sparsity"; the dense figure is half. A
# TPU v4/v5p chip has two TensorCores, which JAX shows as one device
# (megacore), so a device is a chip and the per-chip figures apply.
NVIDIA = "NVIDIA {} Tensor Core GPU datasheet"
SPARSE = ": BF16 1,979 TFLOPS with sparsity"
GOOGLE = "Google Cloud TPU {} documentation: {} TFLOPS bf16 per chip"
DATASHEET_PEAKS = [  # (device_kind contains, FLOP/s, source)
    ("H100 PCIe", 756e12, NVIDIA.format("H100")
     + ", PCIe: BF16 1,513 TFLOPS with sparsity"),
    ("H100", 989e12, NVIDIA.format("H100") + ", SXM" + SPARSE),
    ("H200", 989e12, NVIDIA.format("H200") + ", SXM" + SPARSE),
    ("A100", 312e12,
     NVIDIA.format("A100") + ": BF16 312 TFLOPS dense"),
    ("TPU v4", 275e12, GOOGLE.format("v4", 275)),
    ("TPU v5 lite", 197e12, GOOGLE.format("v5e", 197)),
    ("TPU v5e", 197e12, GOOGLE.format("v5e", 197)),
    ("TPU v5p", 459e12, GOOGLE.format("v5p", 459)),
    ("TPU v5", 459e12, GOOGLE.format("v5p", 459)),
    ("TPU v6 lite", 918e12, GOOGLE.format("v6e", 918)),
    ("TPU v6e", 918e12, GOOGLE.format("v6e", 918)),
]
# HBM per chip, from the same Google Cloud TPU pages (v5p: 95 GiB;
# "TPU v5" is v5p's device kind).
TPU_HBM_GIB = {
    "TPU v4": 32,
    "TPU v5 lite": 16,
    "TPU v5": 95,
    "TPU v6 lite": 32,
}


def _kind_matches(name, pattern):
    """TPU kinds match whole ('TPU v4 lite' is another chip than
    'TPU v4'); GPU patterns are contained in the device kind."""
    if pattern.startswith("TPU"):
        return name.lower() == pattern.lower()
    return pattern.lower() in name.lower()


def datasheet_peak(name):
    """(FLOP/s, source) for a device kind such as 'NVIDIA H100 80GB
    HBM3' or 'TPU v4', or None. NVL cards (H100/H200 NVL) run lower
    clocks than their SXM siblings and are not listed."""
    if "NVL" in name:
        return None
    for pattern, flops, source in DATASHEET_PEAKS:
        if _kind_matches(name, pattern):
            return flops, source
    return None


def peak_flops(device=None):
    """(FLOP/s, source): the datasheet bf16 peak of `device` (default:
    the first), or None where there is none (CPUs, unlisted
    accelerators). MFU is only meaningful against a fixed peak; a CPU
    has none worth the name (bench.py measures one for its own use)."""
    device = device or jax.devices()[0]
    return datasheet_peak(device.device_kind)


# ------------------------------------------------------------ TPU slices
# Compile only: one host of its own (without these, libtpu looks for a
# TPU VM's metadata and prints warnings), and no claim on libtpu's lock
# file, which a real TPU's user holds.
COMPILE_ONLY_ENV = {
    "TPU_HOST_BOUNDS": "1,1,1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


def _topology(name):
    """libtpu's devices of slice `name`, a chip each where it can."""
    from jax.experimental import topologies
    try:
        desc = topologies.get_topology_desc(
            topology_name=name, platform="tpu",
            chip_config_name="megacore")
    except jax.errors.JaxRuntimeError as e:
        # one TensorCore per chip (v5e, v6e): no megacore config
        if "NOT_FOUND" not in str(e):
            raise
        desc = topologies.get_topology_desc(
            topology_name=name, platform="tpu")
    return desc.devices


def topology_devices(name):
    """The devices of a TPU slice named like 'v4:2x2x1', 'v5p:4x4x4'
    or 'v5e:4x4', to compile for with the real XLA:TPU compiler on any
    machine: libtpu (pip) holds the compiler, no TPU is needed, and
    nothing can run on these devices. Chips with two TensorCores (v4,
    v5p) come as one device each (megacore), as on a TPU VM."""
    if importlib.util.find_spec("libtpu") is None:
        raise ValueError(f"compiling for TPU topology {name} needs "
                         f"the TPU compiler: pip install libtpu")
    for var, value in COMPILE_ONLY_ENV.items():
        os.environ.setdefault(var, value)
    try:
        return _topology(name)
    except jax.errors.JaxRuntimeError as e:
        raise ValueError(
            f"TPU topology {name!r}: {common.first_line(e)}; names look "
            f"like v4:2x2x1, v5p:4x4x4, v5e:4x4") from None


def describe_devices(devices):
    """(words, HBM bytes per device or None, (peak FLOP/s, source)
    per device or None). A TPU device is a chip unless several devices
    share a chip's coordinates: then each is one TensorCore, with its
    share of the chip's HBM and peak."""
    d = devices[0]
    n = len(devices)
    if d.platform != "tpu":
        words = f"{n} {d.platform} devices ({d.device_kind})"
        return words, None, peak_flops(d)
    per_chip = sum(x.coords == d.coords for x in devices)
    cores = getattr(d, "num_cores", 1)
    words = f"{n} {d.device_kind} devices, each one "
    if per_chip > 1:
        words += f"TensorCore ({per_chip} per chip)"
    elif cores > 1:
        words += f"chip ({cores} TensorCores, megacore)"
    else:
        words += "chip"
    hbm = TPU_HBM_GIB.get(d.device_kind)
    hbm_b = hbm * 2 ** 30 / per_chip if hbm else None
    peak = datasheet_peak(d.device_kind)
    if peak and per_chip > 1:
        shared = f", shared by {per_chip} TensorCores"
        peak = (peak[0] / per_chip, peak[1] + shared)
    return words, hbm_b, peak


# ------------------------------------------------------------ compiling

def compile_plan(fn, args, mesh, *, out_shardings=None,
                 donate_argnums=()):
    """Compile `fn` ahead of time for `mesh`; say what a device needs.

    `args` are jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves
    (nothing is allocated); the mesh may be simulated CPU devices or a
    TPU topology's. Returns (compiled, seconds, bytes), bytes per
    device from the compiler's memory_analysis(): 'arguments', 'temp',
    'outputs' not aliased to donated arguments, 'code', and their
    'total'. Where XLA:TPU refuses a program that cannot fit the
    chip's HBM (CompileTimeHbmOom), compiled is None and bytes its
    one-line reason.
    """
    in_shardings = jax.tree.map(lambda a: a.sharding, args)
    jitted = jax.jit(fn, in_shardings=in_shardings,
                     out_shardings=out_shardings,
                     donate_argnums=donate_argnums)
    t0 = time.time()
    try:
        compiled = jitted.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        why = common.first_line(e).split(": ", 1)[-1]
        return None, time.time() - t0, why
    seconds = time.time() - t0
    mem = compiled.memory_analysis()
    aliased = mem.output_size_in_bytes - mem.alias_size_in_bytes
    used = {
        "arguments": mem.argument_size_in_bytes,
        "temp": mem.temp_size_in_bytes,
        "outputs": max(aliased, 0),
        "code": mem.generated_code_size_in_bytes,
    }
    used["total"] = sum(used.values())
    return compiled, seconds, used


def ensure_fake_devices(mesh_spec, topology=None):
    """Give a dry run devices to compile for: with a TPU `topology`,
    libtpu's, and JAX stays on CPU (no TPU search). Else, if this
    machine has fewer devices than `mesh_spec`, re-run this very
    command (os.execve) on CPU with that many simulated ones: XLA
    reads --xla_force_host_platform_device_count only when the CPU
    backend starts. Call first."""
    if topology:
        jax.config.update("jax_platforms", "cpu")
        return
    n = 1
    if mesh_spec:
        n = math.prod(tpu.parse_mesh(mesh_spec))
    if jax.device_count() >= n:
        return
    flag = f"--xla_force_host_platform_device_count={n}"
    xla_flags = os.environ.get("XLA_FLAGS", "")
    if flag in xla_flags:  # we are the re-run and it did not take
        raise ValueError(f"mesh {mesh_spec} needs {n} devices and "
                         f"even {flag} did not provide them")
    others = re.sub(r"--xla_force_host_platform_device_count=\d+",
                    "", xla_flags)
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{others} {flag}".strip())
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *sys.orig_argv[1:]]
    os.execve(sys.executable, argv, env)


def plan_mesh(mesh_spec, topology=None):
    """(mesh, words, HBM bytes per device or None, (peak, source) or
    None) for planning a step: the devices of TPU `topology` (XLA:TPU
    via libtpu) or this machine's (see ensure_fake_devices)."""
    if topology:
        devices = topology_devices(topology)
    else:
        devices = jax.devices()
    if mesh_spec is None:
        shape = (len(devices), 1, 1)
    else:
        shape = tpu.parse_mesh(mesh_spec)
    n_dev = math.prod(shape)
    if topology and n_dev != len(devices):
        raise ValueError(
            f"mesh {mesh_spec} has {n_dev} devices but TPU topology "
            f"{topology} has {len(devices)}; make DPxFSDPxMP "
            f"multiply to {len(devices)}")
    if len(devices) < n_dev:
        raise ValueError(
            f"mesh {mesh_spec} needs {n_dev} devices, "
            f"{len(devices)} visible; run with XLA_FLAGS="
            f"--xla_force_host_platform_device_count={n_dev} "
            f"JAX_PLATFORMS=cpu")
    words, hbm_b, peak = describe_devices(devices[:n_dev])
    if topology:
        words += f" (TPU topology {topology})"
    spec = "x".join(map(str, shape))
    mesh = tpu.make_mesh(spec, devices[:n_dev])
    return mesh, words, hbm_b, peak


def device_memory(gib, hbm_b):
    """Bytes per device to plan against: `gib` given, else `hbm_b`."""
    return gib * 2 ** 30 if gib else hbm_b


# ------------------------------------------------------------ the report

def human_size(n_bytes):
    """Right-aligned human size: GiB for big numbers, MiB/KiB for
    the small test configs."""
    if n_bytes >= 2 ** 30 / 10:
        return f"{n_bytes / 2 ** 30:8.2f} GiB"
    if n_bytes >= 2 ** 20:
        return f"{n_bytes / 2 ** 20:8.2f} MiB"
    return f"{n_bytes / 2 ** 10:8.1f} KiB"


def bytes_per_device(tree, shardings=None):
    """Bytes one device holds of `tree` (shapes only), from each
    sharding's shard shape (by default the leaves' own:
    ShapeDtypeStructs made with sharding=)."""
    leaves = jax.tree.leaves(tree)
    if shardings is None:
        shardings = [x.sharding for x in leaves]
    else:
        shardings = jax.tree.leaves(shardings)
    total = 0
    for x, sharding in zip(leaves, shardings):
        shard = math.prod(sharding.shard_shape(x.shape))
        total += shard * np.dtype(x.dtype).itemsize
    return total


def _verdict(total, hbm_b):
    """Whether `total` bytes fit `hbm_b`, in words."""
    if hbm_b is None:
        return "give --device-memory GiB to compare"
    fits = "fits in" if total <= hbm_b else "does NOT fit in"
    return f"{fits} {hbm_b / 2 ** 30:g} GiB ({total / hbm_b:.0%})"


def memory_lines(used, hbm_b, platform, arguments, temp):
    """Report lines for compile_plan's bytes against `hbm_b`;
    `arguments`, `temp`: what those hold."""
    if isinstance(used, str):
        return [f"    total            does NOT fit: "
                f"XLA:{platform.upper()} refuses to compile it "
                f"({used})"]
    size = {k: human_size(v) for k, v in used.items()}
    verdict = _verdict(used["total"], hbm_b)
    lines = [
        f"    arguments        {size['arguments']}  ({arguments})",
        f"    activations/temp {size['temp']}  "
        f"(compiler's temporaries: {temp})",
        f"    outputs          {size['outputs']}  "
        f"(not aliased to donated inputs)",
        f"    program          {size['code']}  (generated code)",
        f"    total            {size['total']}  -> {verdict}",
    ]
    if platform == "cpu":
        lines.append(
            "  (compiled for CPU: the temp bytes are XLA:CPU's "
            "buffer plan, an estimate of a TPU's or GPU's; "
            "--topology v4:2x2x1 and the like compile with XLA:TPU "
            "itself)")
    return lines


def _target_peak(peak, devices_peak):
    """(FLOP/s, source) or None for a dry run's `peak`: None (the
    devices' own datasheet peak), FLOP/s per device (a number, or a
    string such as '275e12'), or a datasheet name ('TPU v4')."""
    if peak is None:
        return devices_peak
    try:
        return float(peak), "given"
    except ValueError:
        pass
    found = datasheet_peak(peak)
    if found is None:
        names = ", ".join(p for p, _, _ in DATASHEET_PEAKS)
        raise ValueError(f"no datasheet peak for {peak!r}; give "
                         f"FLOP/s per device or one of: {names}")
    return found


# ------------------------------------------------------------ training

def plan_train_step(step, state, windows, mesh):
    """compile_plan of a train step(state, windows) -> (state,
    metrics) laid out on `mesh` as training lays it out
    (state_shardings, batch_sharding, the state donated). `state` and
    `windows` need only shapes and dtypes. The compiled step runs the
    training loop itself."""
    state_sh = tpu.state_shardings(state, mesh)
    state_in = jax.tree.map(_placed, state, state_sh)
    windows_in = _placed(windows, tpu.batch_sharding(mesh))
    return compile_plan(step, (state_in, windows_in), mesh,
                        out_shardings=(state_sh, None),
                        donate_argnums=0)


def _placed(x, sharding):
    """An abstract array of x's shape and dtype, laid out by sharding."""
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def memory_budget(device):
    """(bytes a program may use on `device`, where they come from): an
    accelerator's own limit (memory_stats), or for a CPU the
    machine's available RAM (/proc/meminfo)."""
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
        return stats["bytes_limit"], f"{device.device_kind} memory"
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        kib = int(fields["MemAvailable"].split()[0])
        return kib * 1024, "available RAM"
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES")
        return pages * os.sysconf("SC_PAGE_SIZE"), "free RAM"


def _expected_line(target, mfu, n_dev, flops_per_token, tokens):
    """The report's tokens/s at `mfu` of `target` (FLOP/s, source)."""
    if target is None:
        return ("  expected       give --peak (FLOP/s per device "
                "or a datasheet name) for tokens/s")
    tokens_s = mfu * target[0] * n_dev / flops_per_token
    return (f"  expected       {tokens_s:,.0f} tokens/s "
            f"({tokens / tokens_s:.3g} s/step) at {mfu:.0%} MFU of "
            f"{target[0] / 1e12:.3g} TFLOP/s per device "
            f"({target[1]})")


def train_dry_run(make_step, state, windows, config, recipe,
                  flops_per_token, mesh_spec, *, topology=None,
                  device_memory_gib=None, peak=None, mfu=0.4):
    """Compile a training step for a mesh on abstract shapes and report,
    per device, what it needs against the device's memory, and the
    tokens/s expected at `mfu` of the peak. train.py gives
    `make_step(mesh)`, the step(state, windows) -> (state, metrics)
    that trains on that mesh (the mesh is built here), the abstract
    train state (params, AdamW mu and nu, step) and (K, B, W) int32
    `windows`; `recipe` gives dtype and remat. Devices as plan_mesh;
    `device_memory_gib` defaults to the TPU chip's HBM; `peak` as
    _target_peak."""
    mesh, words, hbm_b, devices_peak = plan_mesh(mesh_spec, topology)
    K, micro, W = windows.shape
    tpu.check_layout(config, mesh, micro)
    hbm_b = device_memory(device_memory_gib, hbm_b)
    target = _target_peak(peak, devices_peak)
    step = make_step(mesh)
    _, seconds, used = plan_train_step(step, state, windows, mesh)
    state_sh = tpu.state_shardings(state, mesh)
    windows_in = _placed(windows, tpu.batch_sharding(mesh))
    params_b = bytes_per_device(state["params"], state_sh["params"])
    moments_b = 2 * bytes_per_device(state["mu"], state_sh["mu"])
    platform = mesh.devices.flat[0].platform
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    tokens = K * micro * (W - 1)
    dp, fsdp, mp = (mesh.shape[a] for a in tpu.AXES)
    lines = [
        f"dry run: mesh data={dp} x fsdp={fsdp} x model={mp} on "
        f"{words}; compiled by XLA:{platform.upper()} in "
        f"{seconds:.0f} s",
        f"  model          {n_params:,} parameters "
        f"(n_layer={config.n_layer}, n_embd={config.n_embd}, "
        f"n_head={config.n_head}, vocab={config.vocab_size})",
        f"  FLOPs/token    {flops_per_token:.3e} "
        f"(6N + 12·L·D·T, T={W - 1})",
        f"  step           {K * micro} x {W - 1} = {tokens:,} tokens, "
        f"{K} micro-batch(es) of {micro}, "
        f"{micro // (dp * fsdp)} sequence(s) per device; "
        f"compute {recipe.dtype}, remat {recipe.remat}",
        "  per device:",
        f"    parameters       {human_size(params_b)}"
        "  (fp32 master weights)",
        f"    optimizer state  {human_size(moments_b)}"
        "  (AdamW mu and nu, fp32)",
        f"    batch            "
        f"{human_size(bytes_per_device(windows_in))}",
    ]
    lines += memory_lines(
        used, hbm_b, platform,
        "the three above as the compiler lays them out",
        "activations, gradients, gathered weights")
    lines.append(_expected_line(target, mfu, dp * fsdp * mp,
                                flops_per_token, tokens))
    return "\n".join(lines)


# ------------------------------------------------------------ sampling

def _on(mesh, a, spec):
    """An abstract array like `a`, laid out on `mesh` by `spec`."""
    return _placed(a, NamedSharding(mesh, spec))


def _sampling_args(mesh, config, dtype, rows, T, prepare):
    """Abstract (params, prompt, valid, key, limit, knobs) of the
    sampler, laid out as sample.generate lays them out."""
    def init():
        key = jax.random.key(0)
        return prepare(model.init_params(config, key), dtype)
    params = jax.eval_shape(init)
    shardings = tpu.param_shardings(params, mesh)
    params = jax.tree.map(lambda a, s: _on(mesh, a, s.spec),
                          params, shardings)
    rows_spec = P(tpu.BATCH_AXES)
    prompt = _on(mesh, jax.ShapeDtypeStruct((rows, T), jnp.int32),
                 rows_spec)
    valid = _on(mesh, jax.ShapeDtypeStruct((rows, T), bool),
                rows_spec)
    key = _on(mesh, jax.ShapeDtypeStruct((2,), jnp.uint32), P())
    limit = _on(mesh, jax.ShapeDtypeStruct((), jnp.int32), P())
    knob = _on(mesh, jax.ShapeDtypeStruct((), jnp.float32), P())
    knob3 = _on(mesh, jax.ShapeDtypeStruct((3,), jnp.float32), P())
    return params, prompt, valid, key, limit, (knob, knob3)


def sample_dry_run(config, dtype, mesh_spec, topology, rows,
                   max_new_tokens, mode, device_memory_gib=None, *,
                   prepare, prefill, decode, bucket):
    """Compile prefill and decode for `rows` prompts as long as
    max_new_tokens allows (generate's largest KV cache) on abstract
    shapes for a mesh (plan_mesh), and report what one device needs.
    sample.py passes its steps: prepare(params, dtype), the unjitted
    prefill and decode, and bucket(n), its length rounding."""
    mesh, words, hbm_b, _ = plan_mesh(mesh_spec, topology)
    hbm_b = device_memory(device_memory_gib, hbm_b)
    platform = mesh.devices.flat[0].platform
    tpu.check_layout(config, mesh, rows)
    T = bucket(config.n_ctx + 1 - max_new_tokens)
    new_bucket = bucket(max_new_tokens)
    int8 = dtype == "int8"
    if int8 and mesh.size > 1:
        raise ValueError("int8 weights decode on one device: drop "
                         "--mesh and --topology or pick float32")
    params, prompt, valid, key, limit, knobs = _sampling_args(
        mesh, config, "float32" if int8 else dtype, rows, T, prepare)
    if int8:       # tpu.RULES splits matrices, not int8 + scales
        params = jax.eval_shape(partial(prepare, dtype=dtype), params)
        params = jax.tree.map(lambda a: _on(mesh, a, P()), params)
    prefill = partial(prefill, config=config, new_bucket=new_bucket,
                      num_samples=1, mode=mode, mesh=mesh)
    decode = partial(decode, config=config, mode=mode, mesh=mesh)
    state = jax.eval_shape(prefill, params, prompt, valid, key, knobs)
    state = jax.tree.map(_placed, state,
                         tpu.decode_shardings(state, mesh))
    shape = "x".join(str(mesh.shape[a]) for a in tpu.AXES)
    cache_b = bytes_per_device(state["cache"])
    lines = [
        f"dry run: sampling {config.n_layer} layers of "
        f"{config.n_embd} in {dtype}, mesh {shape} on {words}",
        f"  {rows} rows of {T + new_bucket} tokens ({T}-token "
        f"prompts, {new_bucket} new), {mode[0]}; per device:",
        f"    parameters       "
        f"{human_size(bytes_per_device(params))}  ({dtype})",
        f"    KV cache         {human_size(cache_b)}"
        f"  (heads over model)",
    ]
    steps = [
        ("prefill", prefill, (params, prompt, valid, key, knobs), ()),
        ("decode", decode, (params, state, limit, key, knobs), (1,)),
    ]
    for name, fn, args, donate in steps:
        _, seconds, used = compile_plan(fn, args, mesh,
                                        donate_argnums=donate)
        temp = "activations, logits"
        if name == "prefill":
            temp += ", the new KV cache"
        lines.append(f"  {name}: compiled by XLA:{platform.upper()} "
                     f"in {seconds:.0f} s")
        lines += memory_lines(
            used, hbm_b, platform,
            "parameters and prompts or decode state", temp)
    return "\n".join(lines)
