"""Train CodeGen with the paper's recipe, from a CPU minute to a TPU pod.

    python train.py                       # `nano` on the Python standard library, CPU, minutes
    python train.py --size 350M           # the paper's 350M architecture and hyper-parameters
    python train.py --init-from DIR --data my_repo/ --lr 1e-5   # fine-tune released weights
    python train.py --size 16B --mesh 1x16x4 --dry-run          # will it fit? (no allocation)

The recipe (CodeGen §2.2; JAXformer's configs): AdamW with β = (0.9, 0.999), ε = 1e-8,
weight decay 0.1; global-norm clipping at 1.0; linear warmup then cosine decay to lr/10,
then flat; gradient accumulation; fp32 master weights and optimizer state with bf16
compute on accelerators; JAXformer's optional z-loss.

Each step takes K micro-batches of B windows of W = T + 1 tokens, (K, B, W), sums their
gradients in a scan, clips, and applies AdamW: one jitted function. This file is its loop,
logging, evaluation and checkpoints. A checkpoint is a Hugging Face CodeGen directory plus
the optimizer state, step, data position and RNG, written atomically.

An `--out` holding a checkpoint is resumed, with the schedule it was started with unless
flags change it; otherwise the run starts from `--init-from` (into out/NAME-ft by default,
never into the source run) or from scratch. The first line printed says which. Ctrl-C or
SIGTERM finishes the step, checkpoints it and exits; the same command resumes, reproducing
the uninterrupted run's losses step for step (docs/training.md).
"""
import argparse
import contextlib
import dataclasses
import fcntl
import json
import os
import shutil
import signal
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file

import common
import data
import hf
import model
import model_fast
import plan
import tpu

# ----------------------------------------------------------------------------- the recipe


@dataclasses.dataclass(frozen=True)
class Recipe:
    lr: float
    min_lr: float
    warmup: int
    anneal: int           # cosine steps after warmup; flat at min_lr afterwards
    weight_decay: float = 0.1  # CodeGen §2.2 (JAXformer), every size
    clip: float = 1.0          # global gradient norm, every size
    z_loss: float = 0.0
    dtype: str = "float32"     # compute dtype; master weights and optimizer state stay fp32
    remat: bool = False


SCHEDULE = ("lr", "min_lr", "warmup", "anneal", "weight_decay", "clip", "z_loss")  # kept when a run is extended


def lr_at(step, r):
    """JAXformer's schedule: linear warmup from 0, cosine down to min_lr, then constant."""
    warm = r.lr * jnp.clip(step / max(r.warmup, 1), 0.0, 1.0)
    progress = jnp.clip((step - r.warmup) / max(r.anneal, 1), 0.0, 1.0)
    cosine = r.lr - (r.lr - r.min_lr) * (1 - jnp.cos(jnp.pi * progress)) / 2
    return jnp.where(step <= r.warmup, warm, cosine)


def init_state(params):
    """The train state: the parameters, AdamW's two moments (zeros
    like the parameters) and the step counter."""
    return {"params": params,
            "mu": jax.tree.map(jnp.zeros_like, params),
            "nu": jax.tree.map(jnp.zeros_like, params),
            "step": jnp.zeros((), jnp.int32)}


def pick_loss(plain):
    """model.loss_fn (full logits, cross entropy) with --plain, else
    model_fast's chunked twin of it."""
    return model.loss_fn if plain else model_fast.loss_fn


def make_train_step(config, r, plain=False, mesh=None):
    """train_step(state, windows_KBW) -> (state, metrics): K micro
    batches of B windows, their gradients averaged, clipped, one AdamW
    update. On a `mesh` the loss keeps batch rows split over its data
    axes (model.split_batch)."""
    dtype = jnp.dtype(r.dtype)
    loss_fn = pick_loss(plain)

    def objective(params, windows_BW):
        # Differentiate through the cast, so gradients arrive in fp32 for the fp32 master weights.
        return loss_fn(model.cast(params, dtype), windows_BW, config, z_loss=r.z_loss, remat=r.remat,
                       mesh=mesh)

    def train_step(state, windows_KBW):
        params = state["params"]

        def accumulate(grad_sum, micro_batch):
            loss, grads = jax.value_and_grad(objective)(params, micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grads), loss
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(accumulate, zeros, windows_KBW)
        K = windows_KBW.shape[0]
        grads = jax.tree.map(lambda g: g / K, grads)  # each micro-loss is a mean; so is their average

        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, r.clip / (grad_norm + 1e-6)), grads)

        # AdamW, written out. `t` counts updates from 1, so the first update already moves.
        t = state["step"] + 1
        lr = lr_at(t, r)
        b1, b2, eps = 0.9, 0.999, 1e-8
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["mu"], grads)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["nu"], grads)

        def update(p, m, v):
            direction = (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)
            # Decay every leaf with ndim > 1, as JAXformer's mask `x.ndim > 1` does. Because its
            # per-layer weights are stacked on a layer axis (as ours are), that includes every
            # layer's LayerNorm scale/bias and MLP biases; only the final LayerNorm and the head
            # bias escape, despite the helper's name `add_decayed_weights_exclude_ln_and_bias`.
            decay = r.weight_decay * p if p.ndim > 1 else 0.0
            return p - lr * (direction + decay)
        params = jax.tree.map(update, params, mu, nu)
        new_state = {"params": params, "mu": mu, "nu": nu, "step": t}
        return new_state, {"loss": losses.mean(), "grad_norm": grad_norm, "lr": lr}

    return train_step


# ----------------------------------------------------------------------------- checkpoints
# OUT/ckpt-0000100/ = config.json + model.safetensors (a Hugging Face CodeGen directory)
#                     + optimizer.safetensors (AdamW moments) + train_state.json (step, data position, ...)


def _flat(tree, prefix):
    return {prefix + "/".join(k.key for k in path): np.asarray(jax.device_get(a))
            for path, a in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat, like, prefix):
    leaves = [flat[prefix + "/".join(k.key for k in path)]
              for path, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    return jax.tree.unflatten(jax.tree.structure(like), [jnp.asarray(a) for a in leaves])


def save_checkpoint(out, state, config, extra, keep):
    """Write to a temporary directory, then rename: a kill never leaves half a checkpoint."""
    step = int(state["step"])
    final = os.path.join(out, f"ckpt-{step:07d}")
    tmp = os.path.join(out, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_hf(state["params"], config, tmp)
    hf.save_tensors(_flat(state["mu"], "mu/") | _flat(state["nu"], "nu/"), os.path.join(tmp, "optimizer.safetensors"))
    common.write_json(os.path.join(tmp, "train_state.json"),
                      extra | {"step": step})
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out):
    names = sorted(os.listdir(out)) if os.path.isdir(out) else []
    return [os.path.join(out, d) for d in names if d.startswith("ckpt-")]


def load_checkpoint(path, config):
    """(train state, train_state.json) of a checkpoint; a corrupt one is one ValueError line."""
    try:
        ckpt_config, params = hf.load_hf(path)
        if ckpt_config == config:
            with open(os.path.join(path, "train_state.json")) as f:
                extra = json.load(f)
            moments = load_file(os.path.join(path, "optimizer.safetensors"))
            state = {"params": params, "mu": _unflat(moments, params, "mu/"), "nu": _unflat(moments, params, "nu/"),
                     "step": jnp.asarray(extra["step"], jnp.int32)}
            leaves = jax.tree.leaves(params)
            if any(m.shape != p.shape for t in ("mu", "nu") for m, p in zip(jax.tree.leaves(state[t]), leaves)):
                raise ValueError("optimizer.safetensors does not match the weights")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        why = common.first_line(e)
        raise ValueError(f"checkpoint {path} is unreadable ({why}); delete it to resume from the one "
                         f"before, or pick another --out") from None
    if ckpt_config != config:
        raise ValueError(f"checkpoint {path} holds a different model ({ckpt_config}) than requested "
                         f"({config}); pick another --out or the matching --size")
    return state, extra


# ----------------------------------------------------------------------------- the run configuration

def option(default, help, group="run", **flag):
    """A RunConfig field and its flag: `help`, the --help `group`, and
    argparse's `flag` arguments (type, choices, metavar) where the
    default alone does not say them."""
    meta = {"help": help, "group": group, "flag": flag}
    return dataclasses.field(default=default, metadata=meta)


DEFAULT_CLEANING = data.Cleaning()
SCHEDULE_HELP = "schedule (a resumed run keeps its own unless given)"
OTHER_HELP = "evaluation, checkpoints, devices"


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run, built once by parse_args: these defaults
    (--size nano's), then PRESETS[size], then the flags given."""
    size: str = option("nano", "model preset",
                       choices=model.CONFIGS)  # its names, live
    data: str = option(
        "stdlib", "comma-separated sources: 'stdlib', directories, "
        ".jsonl[.gz|.zst] and .parquet files, or a directory "
        "prepared by `python data.py --prepare`")
    out: str | None = option(
        None, "run directory: resumed when it holds a checkpoint "
        "(default: out/SIZE, or out/NAME-ft with --init-from NAME)",
        type=str)
    val_fraction: float = option(
        0.02, "share of documents held out for validation (chosen by "
        "a hash of each document's name, so stable across runs)")
    init_from: str | None = option(
        None, "start from a Hugging Face CodeGen directory or one of "
        "our checkpoints, with a fresh optimizer (ignored when --out "
        "holds a checkpoint to resume)", type=str)
    resume: bool = option(
        False, "require a checkpoint in --out to continue from "
        "(without the flag, a run continues from one when --out "
        "holds it)")
    max_steps: int = option(300, "optimizer steps of the whole run",
                            SCHEDULE_HELP)
    batch_size: int = option(
        8, "sequences per optimizer step (global)", SCHEDULE_HELP)
    grad_accum: int = option(
        1, "micro-batches per step (batch-size must divide)",
        SCHEDULE_HELP)
    seq_len: int = option(
        256, "tokens per sequence (at most n_ctx)", SCHEDULE_HELP)
    lr: float = option(3e-3, "peak learning rate", SCHEDULE_HELP)
    min_lr: float | None = option(
        None, "final learning rate, --lr/10 unless given",
        SCHEDULE_HELP, type=float)
    warmup: int = option(30, "linear warmup steps", SCHEDULE_HELP)
    anneal: int | None = option(
        None, "cosine steps after warmup, then flat at --min-lr "
        "(nano, small: to --max-steps unless given)", SCHEDULE_HELP,
        type=int)
    weight_decay: float = option(
        0.1, "AdamW decoupled weight decay", SCHEDULE_HELP)
    clip: float = option(1.0, "global gradient-norm clip",
                         SCHEDULE_HELP)
    z_loss: float = option(0.0, "weight of JAXformer's z-loss",
                           SCHEDULE_HELP)
    dtype: str = option(
        "auto", "compute dtype; auto = bfloat16 on GPU/TPU, float32 "
        "on CPU", SCHEDULE_HELP,
        choices=["auto", "float32", "bfloat16"])
    remat: bool = option(
        False, "recompute each layer in the backward pass (saves "
        "memory)", SCHEDULE_HELP)
    plain: bool = option(
        False, "train with model.loss_fn, the plain twin of the "
        "default chunked head loss (model_fast.loss_fn): same "
        "losses, slower", OTHER_HELP)
    seed: int = option(0, "parameter init and data order",
                       SCHEDULE_HELP)
    eval_every: int = option(
        100, "steps between validation losses (0: at the end only)",
        OTHER_HELP)
    eval_batches: int = option(
        8, "validation batches per evaluation (0: no validation)",
        OTHER_HELP)
    save_every: int = option(
        200, "steps between checkpoints (0: at the end only); Ctrl-C "
        "and SIGTERM also write one", OTHER_HELP)
    keep: int = option(3, "checkpoints kept", OTHER_HELP)
    mesh: str | None = option(
        None, "DPxFSDPxMP device mesh (default: all devices "
        "data-parallel)", OTHER_HELP, type=str)
    dry_run: bool = option(
        False, "print parameter, FLOP and per-device memory "
        "estimates for --mesh without allocating the model, then "
        "exit (plan.py)", OTHER_HELP)
    topology: str | None = option(
        None, "for --dry-run: compile with XLA:TPU for this TPU "
        "slice, e.g. v4:2x2x1, v5p:4x4x4, v5e:4x4 (needs `pip "
        "install libtpu`, no TPU); default: this machine's devices, "
        "simulated on CPU if fewer than --mesh", OTHER_HELP, type=str)
    device_memory: float | None = option(
        None, "GiB per device, for --dry-run (default: the "
        "--topology chip's HBM)", OTHER_HELP, type=float)
    peak: str | None = option(
        None, "for --dry-run: peak FLOP/s per device, or a datasheet "
        "name ('TPU v4', 'TPU v5p', 'H100', 'A100', ...); default: "
        "this machine's device", OTHER_HELP, type=str)
    plot: str | None = option(
        None, "plot OUT/metrics.jsonl to OUT/loss.png and exit",
        OTHER_HELP, type=str, metavar="OUT")
    # the flags of data.add_cleaning_flags, gathered
    field: str | None = None
    cleaning: "data.Cleaning" = DEFAULT_CLEANING


# Each --size's schedule, over RunConfig's defaults. Paper sizes:
# JAXformer's codegen_*_nl configs (lr, warmup 3000, cosine over 300k
# steps to lr/10, 350k total, ~0.5M/1M tokens per step, z-loss 1e-4;
# the 16B numbers from the paper's blog summary: lr 0.5e-4, 2M
# tokens/step). Laptop presets finish in minutes; their cosine
# (anneal None) runs to --max-steps.
PAPER = dict(warmup=3000, seq_len=2048, z_loss=1e-4)
PRESETS = {
    "nano": dict(lr=3e-3, warmup=30, anneal=None, max_steps=300,
                 batch_size=8, seq_len=256, z_loss=0.0),
    "small": dict(lr=1e-3, warmup=200, anneal=None, max_steps=5000,
                  batch_size=16, seq_len=512, z_loss=0.0),
    "350M": PAPER | dict(lr=3.0e-4, anneal=300_000,
                         max_steps=350_000, batch_size=256),
    "2B": PAPER | dict(lr=1.6e-4, anneal=300_000, max_steps=350_000,
                       batch_size=512),
    "6B": PAPER | dict(lr=1.2e-4, anneal=300_000, max_steps=350_000,
                       batch_size=512),
    "16B": PAPER | dict(lr=0.5e-4, anneal=147_000, max_steps=150_000,
                        batch_size=1024),
}


def preset(size):
    """RunConfig of --size `size` with no other flag given."""
    return dataclasses.replace(RunConfig(), size=size,
                               **PRESETS.get(size, {}))


def tenth(lr):
    """--min-lr's default: --lr/10, to 3 digits."""
    return float(f"{lr / 10:.3g}")


def shown_defaults(run):
    """The defaults --help shows for `run`: min_lr and anneal as a
    run of it would compute them."""
    anneal = run.anneal or run.max_steps - run.warmup
    return dataclasses.replace(run, min_lr=tenth(run.lr),
                               anneal=anneal)


class PresetHelp(argparse.Action):
    """--help showing the defaults of the --size given before it."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0,
                         help="show this message with the defaults "
                         "of the --size given before it, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        size = getattr(namespace, "size", "nano")
        show_defaults(parser, shown_defaults(preset(size)))
        parser.print_help()
        parser.exit()


def show_defaults(parser, run):
    """Set the help's defaults to `run`'s and say which --size."""
    parser.epilog = (f"Defaults shown are those of --size {run.size}"
                     f"; `--size NAME --help` shows another preset's.")
    for action in parser._actions:
        if action.dest in RUN_FIELDS:
            action.default = getattr(run, action.dest)


# The fields that are flags of their own (not field and cleaning)
RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)
              if "group" in f.metadata}


def add_option(group, field):
    """The flag of one RunConfig field."""
    flag = dict(field.metadata["flag"])
    if isinstance(field.default, bool):
        flag["action"] = "store_true"
    else:
        flag.setdefault("type", type(field.default))
    name = common.flag_names([field.name])
    group.add_argument(name, default=field.default,
                       help=field.metadata["help"], **flag)


def build_parser(size="nano"):
    """The command line, one flag per RunConfig field (plus the
    cleaning flags of data.py), its help showing --size's defaults."""
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0],
                              add_help=False)
    p.add_argument("-h", "--help", action=PresetHelp)
    groups = {"run": p}
    for field in RUN_FIELDS.values():
        title = field.metadata["group"]
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        add_option(groups[title], field)
    cleaning = p.add_argument_group("cleaning (data.py)")
    data.add_cleaning_flags(cleaning)
    show_defaults(p, shown_defaults(preset(size)))
    return p


def parse_args(argv=None):
    """(the run's RunConfig, the set of flags given): --size's
    preset, then every flag given on the command line over it."""
    parser = build_parser()
    for action in parser._actions:
        if action.dest in RUN_FIELDS:
            action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    cleaning = argparse.Namespace()
    for name in list(given):
        if name not in RUN_FIELDS:
            setattr(cleaning, name, given.pop(name))
    run = dataclasses.replace(
        preset(given.get("size", "nano")), **given,
        field=cleaning.field,
        cleaning=data.Cleaning.from_args(cleaning))
    return run, set(given)


def make_recipe(run, given, saved=None):
    """The run's Recipe: a flag given on the command line, else what a
    resumed run was started with (`saved`, its checkpoint's recipe),
    else the --size preset's default."""
    r = {}
    for name in SCHEDULE:
        if saved and name not in given:
            r[name] = saved[name]
        else:
            r[name] = getattr(run, name)
    if "lr" in given and "min_lr" not in given:
        r["min_lr"] = r["lr"] / 10
    if r["min_lr"] is None:
        r["min_lr"] = tenth(r["lr"])
    if r["anneal"] is None:
        r["anneal"] = max(run.max_steps - r["warmup"], 1)
    return Recipe(**r, dtype=run.dtype, remat=run.remat)


def size_of_checkpoint(run, given, config):
    """(run, a note or None) for a run that starts from a checkpoint
    of `config`. A --size given must be that model's; without one,
    the recipe's defaults are those of the preset the checkpoint
    matches (the note says which), or --size nano's for an
    architecture of its own."""
    named = None
    for name, known in model.CONFIGS.items():
        if named is None and known == config:
            named = name
    if "size" in given:
        if model.CONFIGS[run.size] != config:
            what = f"a {named} model" if named else (
                f"n_layer={config.n_layer}, n_embd={config.n_embd}")
            raise ValueError(
                f"--size {run.size} is not the model of --init-from "
                f"{run.init_from} ({what}); drop --size to train it "
                f"with its own preset's recipe")
        return run, None
    if named is None or named == run.size:
        return run, None
    flags = {name: getattr(run, name) for name in given}
    run = dataclasses.replace(preset(named), **flags, field=run.field,
                              cleaning=run.cleaning)
    note = (f"--init-from {run.init_from} is a {named} model: "
            f"--size {named}'s recipe")
    return run, note


def default_out(run):
    """out/SIZE; with --init-from, out/NAME-ft, a new directory beside
    the source run's."""
    if not run.init_from:
        return os.path.join("out", run.size)
    source = os.path.abspath(run.init_from)
    # a checkpoint inside a run: name it after the run
    if os.path.basename(source).startswith("ckpt-"):
        source = os.path.dirname(source)
    return os.path.join("out", os.path.basename(source) + "-ft")


def check_out(run):
    """--out is never the run --init-from reads, and can be written."""
    out = os.path.abspath(run.out)
    if run.init_from:
        source = os.path.abspath(run.init_from)
        if os.path.commonpath([out, source]) == out:
            raise ValueError(
                f"--out {run.out} is the run --init-from "
                f"{run.init_from} reads: pick another --out (default: "
                f"{default_out(run)}), or drop --init-from to resume "
                f"that run")
    existing = out
    while not os.path.exists(existing):  # made once every check passed
        existing = os.path.dirname(existing)
    denied = common.write_denied(existing)
    if denied:
        raise ValueError(
            f"cannot write to --out {run.out} ({existing}: "
            f"{denied}); pick another --out")


def check_args(run, recipe, config):
    """Everything a user can get wrong, as one ValueError line each,
    before any compute or write."""
    if run.seq_len > config.n_ctx:
        raise ValueError(f"--seq-len {run.seq_len} is longer than the "
                         f"model's context ({config.n_ctx})")
    common.check_flags(run, ("seq_len", "batch_size", "grad_accum",
                             "max_steps", "keep"), 1)
    common.check_flags(run, ("eval_every", "eval_batches",
                             "save_every"), 0)
    common.check_flags(recipe, SCHEDULE, 0)
    if run.batch_size % run.grad_accum:
        raise ValueError(f"--batch-size {run.batch_size} is not "
                         f"divisible by --grad-accum {run.grad_accum}")
    micro = run.batch_size // run.grad_accum
    if micro % jax.process_count():
        raise ValueError(f"micro-batch {micro} cannot be split over "
                         f"{jax.process_count()} processes")


# ----------------------------------------------------------------------------- helpers of the run

@dataclasses.dataclass(frozen=True)
class Opened:
    """What open_data opened: the train stream, the validation
    batches, a note or None, and the val_fraction the stream uses."""
    stream: data.TokenStream
    val_batches: list
    note: str | None
    val_fraction: float


def open_data(run, micro, state):
    """The run's data (Opened). Validation is left out when none is
    asked for (--eval-batches 0, --val-fraction 0) and when the corpus
    is too small for --val-fraction to hold out a document and keep
    one to train on; the note then says so, and every document trains
    (val_fraction becomes 0 if it held them all; a checkpoint keeps
    both values, so that the same command resumes the same stream)."""
    share = dict(process_index=jax.process_index(),
                 process_count=jax.process_count(), field=run.field,
                 cleaning=run.cleaning, val_fraction=run.val_fraction)
    # with several processes, another's share may differ: no fallback
    alone = jax.process_count() == 1
    note = (f"no validation: {run.data} has too few documents for "
            f"--val-fraction {run.val_fraction} to set one aside; "
            f"every document trains")
    stream_of = partial(data.TokenStream, run.data, micro, run.seq_len,
                        split="train", seed=run.seed, state=state)
    try:
        stream = stream_of(**share)
    except data.EmptySplit:  # every document fell to validation
        if not (run.val_fraction and alone):
            raise
        share["val_fraction"] = 0.0
        return Opened(stream_of(**share), [], note, 0.0)
    if not (run.eval_batches and run.val_fraction):
        return Opened(stream, [], None, run.val_fraction)
    try:
        val = data.eval_batches(run.data, micro, run.seq_len,
                                run.eval_batches, **share)
    except data.EmptySplit:  # none fell to validation: all train
        if not alone:
            raise
        return Opened(stream, [], note, run.val_fraction)
    return Opened(stream, val, None, run.val_fraction)


def lock_run(out, held, create=True):
    """Hold an exclusive OS lock on OUT/train.lock until `held` (an ExitStack) closes, so two
    trainings never write one run directory; the OS drops it when the process ends, by kill -9
    too. The file holds the PID of the run writing there (`claim_run`), for the refusal. With
    create=False, a directory without the file is left as it is (None)."""
    path = os.path.join(out, "train.lock")
    if not create and not os.path.exists(path):
        return None
    f = held.enter_context(open(path, "a+"))
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise ValueError(f"--out {out} is in use by another training run (PID {holder}); wait for it "
                         f"to end, or pick another --out") from None
    return f


def claim_run(lock):
    """Write this process's PID into the held lock file: the run now writes to its directory."""
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()


def fitting_step(compile_step, args, remat, mesh, resident=0):
    """The train step compiled by compile_step(grad_accum, remat) -> plan.plan_train_step's (compiled, seconds,
    bytes per device or XLA:TPU's refusal), or, when it cannot fit one device's memory, a ValueError
    line naming the flags that do: --remat, else the fewest micro-batches that fit (found by
    compiling: a binary search over the divisors of --batch-size), without and then with remat."""
    compiled, _, used = compile_step(args.grad_accum, remat)
    device = mesh.devices.flat[0]
    budget, where = plan.memory_budget(device)
    budget += resident if device.platform == "cpu" else 0   # the state loaded already counts in `used`

    def fits(bytes_used):
        return not isinstance(bytes_used, str) and bytes_used["total"] <= budget
    if fits(used):
        return compiled
    need = "more than that" if isinstance(used, str) else f"{used['total'] / 2 ** 30:,.1f} GiB"
    more = [k for k in range(args.grad_accum + 1, args.batch_size + 1) if args.batch_size % k == 0]
    advice = None
    if not remat and fits(compile_step(args.grad_accum, True)[2]):
        advice = "--remat"
    for try_remat in sorted({remat, True}):
        if advice is None and more and fits(compile_step(more[-1], try_remat)[2]):
            low, high = 0, len(more) - 1                  # more[high] fits
            while low < high:
                middle = (low + high) // 2
                if fits(compile_step(more[middle], try_remat)[2]):
                    high = middle
                else:
                    low = middle + 1
            advice = f"--grad-accum {more[high]}" + (" --remat" if try_remat else "")
    advice = f"{advice} fits" if advice else "no --grad-accum or --remat fits"
    raise ValueError(f"a step of {args.batch_size} x {args.seq_len} tokens needs {need} per device and "
                     f"{device.platform} has {budget / 2 ** 30:,.1f} GiB ({where}): {advice}; else lower "
                     f"--batch-size or --seq-len, or add devices with --mesh (plan with --dry-run)")


def plot(out):
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        raise ValueError(f"--plot {out} has no metrics.jsonl; pass the --out directory of a training run")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [row for _, row in common.read_jsonl(path, "metrics")]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    plt.plot(*zip(*train), label="train", lw=0.8)
    if val:
        plt.plot(*zip(*val), "o-", label="validation")
    plt.xlabel("step")
    plt.ylabel("loss (nats/token)")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(os.path.join(out, "loss.png"), dpi=120)
    print(f"wrote {os.path.join(out, 'loss.png')}")


def catch_stop_signals():
    """SIGINT and SIGTERM append to a list the loop checks after each step (a second one stops
    at once). Returns the list and a function restoring the previous handlers."""
    caught = []

    def handler(signum, frame):
        if caught:
            raise KeyboardInterrupt
        caught.append(signum)
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handler)

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old)
    return caught, restore


# ----------------------------------------------------------------------------- the run, stage by stage

@dataclasses.dataclass
class Session:
    """What the stages of main open, one after another: the run and
    its model; its recipe and where it resumes; the mesh and the
    compiled step; the data. A plain record, filled in order."""
    run: RunConfig
    given: set
    config: model.Config
    init_params: dict | None = None
    size_note: str | None = None
    data_note: str | None = None
    checkpoints: list = dataclasses.field(default_factory=list)
    state: dict | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    recipe: Recipe | None = None
    lock: object = None
    mesh: object = None
    train_step: object = None
    stream: object = None
    val_batches: list = dataclasses.field(default_factory=list)
    asked_val_fraction: float = 0.0


def log(*parts):
    """print on process 0 only, flushed: `| tee` shows each step."""
    if tpu.is_main():
        print(*parts, flush=True)


def start_devices(run):
    """The devices, before anything else touches a JAX backend."""
    if run.dry_run:
        # fewer devices than the mesh: re-runs this command on CPU
        # with enough simulated ones
        plan.ensure_fake_devices(run.mesh, run.topology)
    elif run.topology:
        raise ValueError("--topology only plans a run (nothing runs "
                         "on its devices): add --dry-run")
    else:
        tpu.init_distributed()


def choose_model(run, given):
    """The Session of a run: the model of --size, or the checkpoint's
    that --init-from names; its dtype and --out settled."""
    s = Session(run, given, model.CONFIGS[run.size])
    if run.init_from:
        try:
            s.config, s.init_params = hf.load_hf(run.init_from)
        except (OSError, ValueError) as e:
            raise ValueError(f"--init-from {run.init_from}: {e}") from None
        run, s.size_note = size_of_checkpoint(run, given, s.config)
    if run.dtype == "auto":
        # a dry run describes an accelerator run, even on CPU
        on_cpu = jax.default_backend() == "cpu" and not run.dry_run
        dtype = "float32" if on_cpu else "bfloat16"
        run = dataclasses.replace(run, dtype=dtype)
    s.run = dataclasses.replace(run, out=run.out or default_out(run))
    check_out(s.run)
    return s


def abstract_state(config):
    """The train state's shapes and dtypes; nothing is allocated."""
    def init():
        params = model.init_params(config, jax.random.PRNGKey(0))
        return init_state(params)
    return jax.eval_shape(init)


def micro_batches(run, accum):
    """(K, B, W) int32 shapes of one step in `accum` micro-batches."""
    shape = (accum, run.batch_size // accum, run.seq_len + 1)
    return jax.ShapeDtypeStruct(shape, jnp.int32)


def dry_run(s):
    """plan.py's report of this run's step on --mesh."""
    run = s.run
    recipe = make_recipe(run, s.given)
    check_args(run, recipe, s.config)
    make_step = partial(make_train_step, s.config, recipe, run.plain)
    flops = model.flops_per_token(s.config, run.seq_len)
    return plan.train_dry_run(
        make_step, abstract_state(s.config),
        micro_batches(run, run.grad_accum), s.config, recipe, flops,
        run.mesh, topology=run.topology,
        device_memory_gib=run.device_memory, peak=run.peak)


def open_run(s, held):
    """Resume --out when it holds a checkpoint, else start a new run
    there: its recipe, and every check, before any compute."""
    run = s.run
    if tpu.is_main():  # a run writing there: refused before any work
        s.lock = lock_run(run.out, held, create=False)
    s.checkpoints = list_checkpoints(run.out)
    if run.resume and not s.checkpoints:
        raise ValueError(f"--resume given but --out {run.out} holds "
                         f"no checkpoint")
    if s.checkpoints:
        s.state, s.extra = load_checkpoint(s.checkpoints[-1], s.config)
    s.recipe = make_recipe(run, s.given, s.extra.get("recipe"))
    s.asked_val_fraction = run.val_fraction
    # it trained on every document (open_data)
    if s.extra.get("val_fraction") == [run.val_fraction, 0.0]:
        s.run = dataclasses.replace(run, val_fraction=0.0)
    check_args(s.run, s.recipe, s.config)


def compile_step(s):
    """The mesh, and the train step compiled ahead of time on shapes:
    a step too big for the devices is refused before allocating.
    Then the state: resumed, --init-from's weights, or fresh."""
    run = s.run
    s.mesh = tpu.make_mesh(run.mesh)
    tpu.check_layout(s.config, s.mesh,
                     run.batch_size // run.grad_accum)
    shapes = abstract_state(s.config)

    def compile_for(accum, remat):
        recipe = dataclasses.replace(s.recipe, remat=remat)
        step = make_train_step(s.config, recipe, run.plain, s.mesh)
        windows = micro_batches(run, accum)
        return plan.plan_train_step(step, shapes, windows, s.mesh)
    # on CPU, the state loaded already is in the RAM
    loaded = jax.tree.leaves((s.state, s.init_params))
    resident = sum(a.nbytes for a in loaded)
    s.train_step = fitting_step(compile_for, run, s.recipe.remat,
                                s.mesh, resident)
    if s.state is None and s.init_params is not None:
        s.state = init_state(s.init_params)
    if s.state is None:
        key = jax.random.PRNGKey(run.seed)
        s.state = init_state(model.init_params(s.config, key))


def load_data(s):
    """The train stream and validation batches: each process reads
    its own share of the files."""
    run = s.run
    micro = run.batch_size // run.grad_accum // jax.process_count()
    try:
        opened = open_data(run, micro, s.extra.get("data_state"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {run.data}: {e}") from None
    s.stream = opened.stream
    s.val_batches = opened.val_batches
    s.data_note = opened.note
    s.run = dataclasses.replace(run, val_fraction=opened.val_fraction)


def announce(s, held):
    """Every check has passed: say what this run is, then write to
    --out (its lock, run.json, the metrics its checkpoint covers)."""
    run = s.run
    step = int(s.state["step"])
    if s.checkpoints:
        log(f"resuming {run.out} from {s.checkpoints[-1]} (step "
            f"{step} of {run.max_steps})")
    elif run.init_from:
        log(f"fine-tuning {run.init_from} into a new run in {run.out} "
            f"(fresh optimizer)")
    else:
        log(f"training {run.size} from scratch into {run.out}")
    if s.size_note:
        log(s.size_note)
    r = s.recipe
    if r.warmup >= run.max_steps > step:
        peak = float(lr_at(run.max_steps, r))
        log(f"note: --warmup {r.warmup} is not shorter than the run "
            f"({run.max_steps} steps): the learning rate peaks at "
            f"{peak:.2e}, not --lr {r.lr:g}; give a shorter --warmup")
    log(f"config: {s.config}\nrecipe: {r}")
    log(f"{model.param_count(s.config) / 1e6:.1f}M parameters, mesh "
        f"{dict(s.mesh.shape)}, {run.batch_size} x {run.seq_len} "
        f"tokens per step")
    log(s.stream.describe())
    if s.data_note:
        log(s.data_note)
    if not tpu.is_main():
        return
    os.makedirs(run.out, exist_ok=True)
    claim_run(s.lock or lock_run(run.out, held))
    about = {"config": dataclasses.asdict(s.config),
             "recipe": dataclasses.asdict(r),
             "args": dataclasses.asdict(run)}
    common.write_json(os.path.join(run.out, "run.json"), about)
    # keep the metrics the checkpoint covers: a resumed log reads as
    # one run
    path = metrics_path(run)
    kept = common.resume_jsonl(path, "metrics")
    common.write_jsonl(path, [r for r in kept if r["step"] <= step])


def metrics_path(run):
    return os.path.join(run.out, "metrics.jsonl")


def record(run, row):
    """Append one row to OUT/metrics.jsonl (process 0)."""
    if tpu.is_main():
        with open(metrics_path(run), "a") as f:
            common.append_jsonl(f, [row])


def evaluator(s, params):
    """evaluate(params) -> the mean validation loss, compiled once for
    `params` as laid out on the mesh."""
    dtype = jnp.dtype(s.recipe.dtype)
    params_sh = tpu.param_shardings(params, s.mesh)

    def loss(params, batch):
        loss_fn = pick_loss(s.run.plain)
        return loss_fn(model.cast(params, dtype), batch[0], s.config)
    eval_loss = jax.jit(loss, in_shardings=(
        params_sh, tpu.batch_sharding(s.mesh)))

    def evaluate(params):
        losses = []
        for b in s.val_batches:
            batch = tpu.global_batch(b[None], s.mesh)
            losses.append(float(eval_loss(params, batch)))
        return float(np.mean(losses))
    return evaluate


def validate(s, evaluate, state, step):
    val = evaluate(state["params"])
    log(f"step {step:6d} | val_loss {val:.4f}")
    record(s.run, {"step": step, "val_loss": val})


def checkpoint(s, state):
    """Save the state and where the data stream is (every process
    takes part: shards on other hosts are gathered)."""
    run = s.run
    extra = {"data_state": s.stream.state(), "seed": run.seed,
             "recipe": dataclasses.asdict(s.recipe),
             "val_fraction": [s.asked_val_fraction, run.val_fraction]}
    host_state = tpu.to_host(state)
    path = None
    if tpu.is_main():
        path = save_checkpoint(run.out, host_state, s.config, extra,
                               run.keep)
    log(f"saved {path}")


class Speed:
    """Tokens/s, MFU (or TFLOP/s without a datasheet peak) and ETA of
    each step, for the log line and metrics.jsonl."""

    def __init__(self, run, config):
        self.tokens = run.batch_size * run.seq_len
        per_token = model.flops_per_token(config, run.seq_len)
        self.flops = per_token * self.tokens
        self.max_steps = run.max_steps
        self.peak = plan.peak_flops()  # (FLOP/s per device, source)
        self.seconds = []

    def describe(self):
        if self.peak is None:
            return ("no datasheet peak for this device: achieved "
                    "TFLOP/s per device instead of MFU")
        return (f"MFU is measured against {self.peak[0] / 1e12:.3g} "
                f"TFLOP/s per device ({self.peak[1]})")

    def __call__(self, step, dt):
        """(the log line's tail, the metrics of the step's speed)."""
        self.seconds.append(dt)
        flop_s = self.flops / dt / jax.device_count()
        row = {"tokens_per_s": self.tokens / dt, "ms": dt * 1000}
        if self.peak:
            row["mfu"] = flop_s / self.peak[0]
            rate = f"MFU {100 * row['mfu']:5.2f}%"
        else:
            row["tflops"] = flop_s / 1e12
            rate = f"{row['tflops']:.3g} TFLOP/s"
        mean = sum(self.seconds) / len(self.seconds)
        eta = (self.max_steps - step) * mean
        line = (f"{dt * 1000:6.0f} ms | {row['tokens_per_s']:8.0f} "
                f"tok/s | {rate} | ETA {eta / 60:5.1f} min")
        return line, row


def train_loop(s):
    """The loop: a step, its log line and metrics, validation and
    checkpoints when due; a signal saves the step reached and exits.
    Returns the final state."""
    run = s.run
    state = jax.device_put(s.state, tpu.state_shardings(s.state, s.mesh))
    s.state = None  # the loop's state is the only copy
    evaluate = evaluator(s, state["params"])
    speed = Speed(run, s.config)
    log(speed.describe())
    t_start = time.time()
    step = saved_step = int(state["step"])
    # where the loss starts: about ln(vocabulary)
    if s.val_batches and run.eval_every and step == 0:
        validate(s, evaluate, state, 0)

    def due(every):  # 0: never on the way, only at the end
        return (every and step % every == 0) or step == run.max_steps
    stop, restore_handlers = catch_stop_signals()
    try:
        while step < run.max_steps and not stop:
            local = np.stack([next(s.stream)
                              for _ in range(run.grad_accum)])
            t0 = time.time()
            batch = tpu.global_batch(local, s.mesh)
            state, metrics = s.train_step(state, batch)
            metrics = {k: float(v) for k, v in metrics.items()}
            step += 1
            tail, speed_row = speed(step, time.time() - t0)
            log(f"step {step:6d}/{run.max_steps} | loss "
                f"{metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                f"grad-norm {metrics['grad_norm']:.3f} | {tail}")
            record(run, {"step": step, **metrics, **speed_row})
            if s.val_batches and due(run.eval_every):
                validate(s, evaluate, state, step)
            if due(run.save_every):
                checkpoint(s, state)
                saved_step = step
        if stop:  # a signal: save the step reached, then stop
            if step > saved_step:
                checkpoint(s, state)
            name = signal.Signals(stop[0]).name
            log(f"stopped by {name} at step {step}: run the same "
                f"command to resume")
            raise SystemExit(128 + stop[0])
    except KeyboardInterrupt:  # a second signal: stop at once
        interrupted(run)
    finally:
        restore_handlers()
    minutes = (time.time() - t_start) / 60
    log(f"done: {step} steps in {minutes:.1f} min; checkpoints in "
        f"{run.out}")
    return state


def interrupted(run):
    """Stop at once; the newest checkpoint stays."""
    saved = list_checkpoints(run.out)
    if saved:
        how = f"run the same command to resume from {saved[-1]}"
    else:
        how = ("no checkpoint was written, so the same command starts "
               "over")
    print(f"interrupted: {how}", file=sys.stderr)
    raise SystemExit(130) from None


def main(argv=None):
    """config -> data -> state -> loop -> checkpoint."""
    run, given = parse_args(argv)
    if run.plot:
        return plot(run.plot)
    start_devices(run)
    s = choose_model(run, given)
    if s.run.dry_run:
        return log(dry_run(s))
    # the run directory's lock, released on any exit
    with contextlib.ExitStack() as held:
        open_run(s, held)
        compile_step(s)
        load_data(s)
        announce(s, held)
        train_loop(s)


if __name__ == "__main__":
    common.run_main(main)
