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
import tempfile
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
import tpu

# Every default of the schedule, once per --size (`--help` shows them). Paper sizes: JAXformer's
# codegen_*_nl configs (lr, warmup 3000, cosine over 300k steps to lr/10, 350k total, ~0.5M/1M
# tokens per step, z-loss 1e-4; the 16B numbers from the paper's blog summary: lr 0.5e-4, 2M
# tokens/step). Laptop presets finish in minutes; their cosine (anneal None) runs to --max-steps.
PRESETS = {
    "nano": dict(lr=3e-3, warmup=30, anneal=None, max_steps=300, batch_size=8, seq_len=256, z_loss=0.0),
    "small": dict(lr=1e-3, warmup=200, anneal=None, max_steps=5000, batch_size=16, seq_len=512, z_loss=0.0),
    "350M": dict(lr=3.0e-4, warmup=3000, anneal=300_000, max_steps=350_000, batch_size=256, seq_len=2048, z_loss=1e-4),
    "2B": dict(lr=1.6e-4, warmup=3000, anneal=300_000, max_steps=350_000, batch_size=512, seq_len=2048, z_loss=1e-4),
    "6B": dict(lr=1.2e-4, warmup=3000, anneal=300_000, max_steps=350_000, batch_size=512, seq_len=2048, z_loss=1e-4),
    "16B": dict(lr=0.5e-4, warmup=3000, anneal=147_000, max_steps=150_000, batch_size=1024, seq_len=2048, z_loss=1e-4),
}

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
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "mu": zeros(), "nu": zeros(), "step": jnp.zeros((), jnp.int32)}


def pick_loss(plain):
    """model.loss_fn (full logits, cross entropy) with --plain, else model_fast's chunked twin."""
    return model.loss_fn if plain else model_fast.loss_fn


def make_train_step(config, r, plain=False):
    dtype = jnp.dtype(r.dtype)
    loss_fn = pick_loss(plain)

    def objective(params, windows_BW):
        # Differentiate through the cast, so gradients arrive in fp32 for the fp32 master weights.
        return loss_fn(model.cast(params, dtype), windows_BW, config, z_loss=r.z_loss, remat=r.remat)

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
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(extra | {"step": step}, f, indent=1)
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
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"checkpoint {path} is unreadable ({why}); delete it to resume from the one "
                         f"before, or pick another --out") from None
    if ckpt_config != config:
        raise ValueError(f"checkpoint {path} holds a different model ({ckpt_config}) than requested "
                         f"({config}); pick another --out or the matching --size")
    return state, extra


# ----------------------------------------------------------------------------- the script

def build_parser(size, explicit_only=False):
    """The command line, its defaults those of `--size` (or, with explicit_only, no defaults
    at all: parsing then yields just the flags the user gave)."""
    preset = PRESETS[size]
    p = common.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=f"Defaults shown are those of "
                              f"--size {size}; `--size NAME --help` shows another preset's.")
    p.add_argument("--size", default="nano", choices=list(model.CONFIGS), help="model preset")
    p.add_argument("--data", default="stdlib", help="comma-separated sources: 'stdlib', directories, .jsonl[.gz|.zst] "
                   "and .parquet files, or a directory prepared by `python data.py --prepare`")
    data.add_cleaning_flags(p)  # the paper's filters, dedup, decontamination (on unless switched off)
    p.add_argument("--out", default=None, help="run directory: resumed when it holds a checkpoint (default: "
                   "out/SIZE, or out/NAME-ft with --init-from NAME)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out for validation "
                   "(chosen by a hash of each document's name, so stable across runs)")
    p.add_argument("--init-from", default=None, help="start from a Hugging Face CodeGen directory or one of our "
                   "checkpoints, with a fresh optimizer (ignored when --out holds a checkpoint to resume)")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to continue from "
                   "(without the flag, a run continues from one when --out holds it)")
    g = p.add_argument_group(f"schedule (defaults of --size {size}; a resumed run keeps its own unless given)")
    g.add_argument("--max-steps", type=int, default=preset["max_steps"], help="optimizer steps of the whole run")
    g.add_argument("--batch-size", type=int, default=preset["batch_size"], help="sequences per optimizer step (global)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    g.add_argument("--seq-len", type=int, default=preset["seq_len"], help="tokens per sequence (at most n_ctx)")
    g.add_argument("--lr", type=float, default=preset["lr"], help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=float(f"{preset['lr'] / 10:.3g}"),
                   help="final learning rate, --lr/10 unless given")
    g.add_argument("--warmup", type=int, default=preset["warmup"], help="linear warmup steps")
    g.add_argument("--anneal", type=int, default=preset["anneal"] or preset["max_steps"] - preset["warmup"],
                   help="cosine steps after warmup, then flat at --min-lr" +
                   (" (unless given: to --max-steps)" if preset["anneal"] is None else ""))
    g.add_argument("--weight-decay", type=float, default=Recipe.weight_decay, help="AdamW decoupled weight decay")
    g.add_argument("--clip", type=float, default=Recipe.clip, help="global gradient-norm clip")
    g.add_argument("--z-loss", type=float, default=preset["z_loss"], help="weight of JAXformer's z-loss")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass (saves memory)")
    g.add_argument("--plain", action="store_true", help="train with model.loss_fn, the plain twin of the "
                   "default chunked head loss (model_fast.loss_fn): same losses, slower")
    g.add_argument("--seed", type=int, default=0, help="parameter init and data order")
    o = p.add_argument_group("evaluation, checkpoints, devices")
    o.add_argument("--eval-every", type=int, default=100, help="steps between validation losses (0: at the end only)")
    o.add_argument("--eval-batches", type=int, default=8, help="validation batches per evaluation (0: no validation)")
    o.add_argument("--save-every", type=int, default=200, help="steps between checkpoints (0: at the end only); "
                   "Ctrl-C and SIGTERM also write one")
    o.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    o.add_argument("--sample-tokens", type=int, default=64, help="tokens sampled at the end (0: none)")
    o.add_argument("--mesh", default=None, help="DPxFSDPxMP device mesh (default: all devices data-parallel)")
    o.add_argument("--dry-run", action="store_true", help="print parameter, FLOP and per-device memory estimates "
                   "for --mesh without allocating the model, then exit")
    o.add_argument("--topology", default=None, help="for --dry-run: compile with XLA:TPU for this TPU slice, "
                   "e.g. v4:2x2x1, v5p:4x4x4, v5e:4x4 (needs `pip install libtpu`, no TPU); default: this "
                   "machine's devices, simulated on CPU if fewer than --mesh")
    o.add_argument("--device-memory", type=float, default=None, help="GiB per device, for --dry-run "
                   "(default: the --topology chip's HBM)")
    o.add_argument("--peak", default=None, help="for --dry-run: peak FLOP/s per device, or a datasheet name "
                   "('TPU v4', 'TPU v5p', 'H100', 'A100', ...); default: this machine's device")
    o.add_argument("--plot", metavar="OUT", default=None, help="plot OUT/metrics.jsonl to OUT/loss.png and exit")
    if explicit_only:
        for action in p._actions:
            action.default = argparse.SUPPRESS
    return p


def parse_args(argv=None):
    """(args with the --size preset's defaults, the set of flags given on the command line)."""
    size_only = common.ArgumentParser(add_help=False)
    size_only.add_argument("--size", default="nano", choices=list(model.CONFIGS))
    size = size_only.parse_known_args(argv)[0].size
    args = build_parser(size).parse_args(argv)
    return args, set(vars(build_parser(size, explicit_only=True).parse_args(argv)))


def make_recipe(args, given, saved=None):
    """The run's Recipe: a flag given on the command line, else what a resumed run was started
    with (`saved`, its checkpoint's recipe), else the --size preset's default."""
    r = {k: getattr(args, k) if k in given or not saved else saved[k] for k in SCHEDULE}
    if "lr" in given and "min_lr" not in given:
        r["min_lr"] = r["lr"] / 10
    if not saved and "anneal" not in given and PRESETS[args.size]["anneal"] is None:
        r["anneal"] = max(args.max_steps - r["warmup"], 1)
    return Recipe(**r, dtype=args.dtype, remat=args.remat)


def size_of_checkpoint(args, given, argv, config):
    """(args, given, a note or None) for a run that starts from a checkpoint of `config`. A --size
    given must be that model's; without one, the recipe's defaults are those of the preset the
    checkpoint matches (the note says which), or --size nano's for an architecture of its own."""
    named = next((name for name, preset in model.CONFIGS.items() if preset == config), None)
    if "size" in given:
        if model.CONFIGS[args.size] != config:
            what = f"a {named} model" if named else f"n_layer={config.n_layer}, n_embd={config.n_embd}"
            raise ValueError(f"--size {args.size} is not the model of --init-from {args.init_from} ({what}); "
                             f"drop --size to train it with its own preset's recipe")
        return args, given, None
    if named is None or named == args.size:
        return args, given, None
    args, given = parse_args([*(sys.argv[1:] if argv is None else argv), "--size", named])
    return args, given - {"size"}, f"--init-from {args.init_from} is a {named} model: --size {named}'s recipe"


def default_out(args):
    """out/SIZE; with --init-from, out/NAME-ft, a new directory beside the source run's."""
    if not args.init_from:
        return os.path.join("out", args.size)
    source = os.path.abspath(args.init_from)
    if os.path.basename(source).startswith("ckpt-"):  # a checkpoint inside a run: name it after the run
        source = os.path.dirname(source)
    return os.path.join("out", os.path.basename(source) + "-ft")


def open_data(args, micro, state):
    """(train stream, validation batches, a note or None). Validation is left out when none
    is asked for (--eval-batches 0, --val-fraction 0) and when the corpus is too small for
    --val-fraction to hold out a document and keep one to train on; the note then says so,
    and every document trains (args.val_fraction becomes 0 if it held them all; a checkpoint
    keeps both values, so that the same command resumes the same stream)."""
    share = dict(process_index=jax.process_index(), process_count=jax.process_count(), field=args.field,
                 cleaning=data.Cleaning.from_args(args), val_fraction=args.val_fraction)
    alone = jax.process_count() == 1  # with several, another process's share may differ: no fallback
    note = (f"no validation: {args.data} has too few documents for --val-fraction {args.val_fraction} "
            f"to set one aside; every document trains")
    try:
        stream = data.TokenStream(args.data, micro, args.seq_len, split="train", seed=args.seed, state=state, **share)
    except data.EmptySplit:  # every document fell to validation
        if not (args.val_fraction and alone):
            raise
        args.val_fraction = share["val_fraction"] = 0.0
        stream = data.TokenStream(args.data, micro, args.seq_len, split="train", seed=args.seed, state=state, **share)
        return stream, [], note
    if not (args.eval_batches and args.val_fraction):
        return stream, [], None
    try:
        return stream, data.eval_batches(args.data, micro, args.seq_len, args.eval_batches, **share), None
    except data.EmptySplit:  # no document fell to validation: every one trains already
        if not alone:
            raise
        return stream, [], note


def check_args(args, config):
    """Everything a user can get wrong, as one ValueError line each, before any compute or write."""
    if args.seq_len > config.n_ctx:
        raise ValueError(f"--seq-len {args.seq_len} is longer than the model's context ({config.n_ctx})")
    if min(args.seq_len, args.batch_size, args.grad_accum, args.max_steps, args.keep) < 1:
        raise ValueError("--seq-len, --batch-size, --grad-accum, --max-steps and --keep must be positive")
    if min(args.eval_every, args.eval_batches, args.save_every, args.sample_tokens) < 0:
        raise ValueError("--eval-every, --eval-batches, --save-every and --sample-tokens must be 0 or more")
    if min(args.lr, args.min_lr, args.warmup, args.anneal, args.weight_decay, args.clip, args.z_loss) < 0:
        raise ValueError("--lr, --min-lr, --warmup, --anneal, --weight-decay, --clip and --z-loss must be 0 or more")
    if args.batch_size % args.grad_accum:
        raise ValueError(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    if (args.batch_size // args.grad_accum) % jax.process_count():
        raise ValueError(f"micro-batch {args.batch_size // args.grad_accum} cannot be split over "
                         f"{jax.process_count()} processes")
    existing = os.path.abspath(args.out)
    while not os.path.exists(existing):  # --out is made later, once every check has passed
        existing = os.path.dirname(existing)
    try:
        tempfile.TemporaryFile(dir=existing).close()  # gone when closed
    except OSError as e:
        raise ValueError(f"cannot write to --out {args.out} ({existing}: {e.strerror}); pick another --out") from None


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


def fitting_step(plan, args, remat, mesh, resident=0):
    """The train step compiled by plan(grad_accum, remat) -> tpu.plan_train_step's (compiled, seconds,
    bytes per device or XLA:TPU's refusal), or, when it cannot fit one device's memory, a ValueError
    line naming the flags that do: --remat, else the fewest micro-batches that fit (found by
    compiling: a binary search over the divisors of --batch-size), without and then with remat."""
    compiled, _, used = plan(args.grad_accum, remat)
    device = mesh.devices.flat[0]
    budget, where = tpu.memory_budget(device)
    budget += resident if device.platform == "cpu" else 0   # the state loaded already counts in `used`

    def fits(bytes_used):
        return not isinstance(bytes_used, str) and bytes_used["total"] <= budget
    if fits(used):
        return compiled
    need = "more than that" if isinstance(used, str) else f"{used['total'] / 2 ** 30:,.1f} GiB"
    more = [k for k in range(args.grad_accum + 1, args.batch_size + 1) if args.batch_size % k == 0]
    advice = None
    if not remat and fits(plan(args.grad_accum, True)[2]):
        advice = "--remat"
    for try_remat in sorted({remat, True}):
        if advice is None and more and fits(plan(more[-1], try_remat)[2]):
            low, high = 0, len(more) - 1                  # more[high] fits
            while low < high:
                middle = (low + high) // 2
                if fits(plan(more[middle], try_remat)[2]):
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
    plt.xlabel("step"), plt.ylabel("loss (nats/token)"), plt.legend(), plt.grid(alpha=0.3)
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
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    return caught, lambda: [signal.signal(s, h) for s, h in previous.items()]


def main(argv=None):
    args, given = parse_args(argv)
    with contextlib.ExitStack() as held:  # the run directory's lock, released on any exit
        return run(args, given, held, argv)


def run(args, given, held, argv):
    """The script after parsing: checks, then the training loop."""
    if args.plot:
        return plot(args.plot)
    if args.dry_run:  # fewer devices than the mesh: re-runs this command on CPU with enough simulated ones
        tpu.ensure_fake_devices(args.mesh, args.topology)
    elif args.topology:
        raise ValueError("--topology only plans a run (nothing runs on its devices): add --dry-run")
    else:
        tpu.init_distributed()  # before anything else touches a JAX backend
    log = partial(print, flush=True) if tpu.is_main() else (lambda *a, **k: None)  # flush: `| tee` shows each step

    # ---- the model: a preset, or the architecture of the checkpoint we start from
    config, init_params, size_note = model.CONFIGS[args.size], None, None
    if args.init_from:
        try:
            config, init_params = hf.load_hf(args.init_from)
        except (OSError, ValueError) as e:
            raise ValueError(f"--init-from {args.init_from}: {e}") from None
        args, given, size_note = size_of_checkpoint(args, given, argv, config)
    if args.dtype == "auto":  # a dry run describes an accelerator run, even when it compiles on CPU
        args.dtype = "bfloat16" if args.dry_run or jax.default_backend() != "cpu" else "float32"

    # ---- the run: resume --out when it holds a checkpoint, else start a new one there
    args.out = args.out or default_out(args)
    if args.init_from and os.path.commonpath([os.path.abspath(args.out), os.path.abspath(args.init_from)]) == \
            os.path.abspath(args.out):
        raise ValueError(f"--out {args.out} is the run --init-from {args.init_from} reads: pick another --out "
                         f"(default: {default_out(args)}), or drop --init-from to resume that run")
    lock = None
    if tpu.is_main() and not args.dry_run:  # a run writing there: refused before any work
        lock = lock_run(args.out, held, create=False)
    checkpoints = [] if args.dry_run else list_checkpoints(args.out)
    if args.resume and not checkpoints:
        raise ValueError(f"--resume given but --out {args.out} holds no checkpoint")
    state, extra = load_checkpoint(checkpoints[-1], config) if checkpoints else (None, {})
    recipe = make_recipe(args, given, extra.get("recipe"))
    asked_val_fraction = args.val_fraction
    if extra.get("val_fraction") == [args.val_fraction, 0.0]:  # it trained on every document (open_data)
        args.val_fraction = 0.0
    check_args(args, config)
    shapes = jax.eval_shape(lambda: init_state(model.init_params(config, jax.random.PRNGKey(0))))
    if args.dry_run:
        windows = jax.ShapeDtypeStruct((args.grad_accum, args.batch_size // args.grad_accum, args.seq_len + 1),
                                       jnp.int32)
        return log(tpu.dry_run(make_train_step(config, recipe), shapes, windows, config, recipe,
                               model.flops_per_token(config, args.seq_len), args.mesh, topology=args.topology,
                               device_memory_gib=args.device_memory, peak=args.peak))
    mesh = tpu.make_mesh(args.mesh)
    tpu.check_layout(config, mesh, args.batch_size // args.grad_accum)
    jax.set_mesh(mesh)  # model.forward's activation hint reads the mesh from here
    # ---- compiled ahead of time on shapes: a step too big for the devices is refused before allocating
    def plan(accum, remat):
        step = make_train_step(config, dataclasses.replace(recipe, remat=remat), plain=args.plain)
        micro_batches = jax.ShapeDtypeStruct((accum, args.batch_size // accum, args.seq_len + 1), jnp.int32)
        return tpu.plan_train_step(step, shapes, micro_batches, mesh)
    resident = sum(a.nbytes for a in jax.tree.leaves((state, init_params)))  # on CPU, already in the RAM
    train_step = fitting_step(plan, args, recipe.remat, mesh, resident)
    if state is None:
        state = init_state(init_params if init_params is not None
                           else model.init_params(config, jax.random.PRNGKey(args.seed)))
    start_step = int(state["step"])

    # ---- data: each process reads its own share of the files
    micro = args.batch_size // args.grad_accum // jax.process_count()
    try:
        train_stream, val_batches, data_note = open_data(args, micro, extra.get("data_state"))
    except (OSError, ValueError) as e:
        raise ValueError(f"--data {args.data}: {e}") from None

    # ---- every check has passed: say what this run is, then write to --out
    log(f"resuming {args.out} from {checkpoints[-1]} (step {start_step} of {args.max_steps})" if checkpoints else
        f"fine-tuning {args.init_from} into a new run in {args.out} (fresh optimizer)" if args.init_from else
        f"training {args.size} from scratch into {args.out}")
    if size_note:
        log(size_note)
    if recipe.warmup >= args.max_steps > start_step:
        log(f"note: --warmup {recipe.warmup} is not shorter than the run ({args.max_steps} steps): the learning "
            f"rate peaks at {float(lr_at(args.max_steps, recipe)):.2e}, not --lr {recipe.lr:g}; give a shorter --warmup")
    log(f"config: {config}\nrecipe: {recipe}")
    log(f"{model.param_count(config) / 1e6:.1f}M parameters, mesh {dict(mesh.shape)}, "
        f"{args.batch_size} x {args.seq_len} tokens per step")
    log(train_stream.describe())
    if data_note:
        log(data_note)
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if tpu.is_main():
        os.makedirs(args.out, exist_ok=True)
        claim_run(lock or lock_run(args.out, held))
        with open(os.path.join(args.out, "run.json"), "w") as f:
            json.dump({"config": dataclasses.asdict(config), "recipe": dataclasses.asdict(recipe),
                       "args": vars(args)}, f, indent=1)
        # keep the metrics the checkpoint covers, so a resumed log reads as one run
        kept = common.resume_jsonl(metrics_path, "metrics")
        common.write_jsonl(metrics_path, [row for row in kept if row["step"] <= start_step])

    # ---- compiled step and evaluation, laid out on the mesh
    state_sh = tpu.state_shardings(state, mesh)
    batch_sh = tpu.batch_sharding(mesh)
    state = jax.device_put(state, state_sh)
    eval_loss = jax.jit(lambda p, b: pick_loss(args.plain)(model.cast(p, jnp.dtype(recipe.dtype)), b[0], config),
                        in_shardings=(state_sh["params"], batch_sh))

    def evaluate():
        losses = [eval_loss(state["params"], tpu.global_batch(b[None], mesh)) for b in val_batches]
        return float(np.mean([float(x) for x in losses]))

    def record(row):
        if tpu.is_main():
            with open(metrics_path, "a") as f:
                common.append_jsonl(f, [row])

    def checkpoint():
        extra = {"data_state": train_stream.state(), "seed": args.seed, "recipe": dataclasses.asdict(recipe),
                 "val_fraction": [asked_val_fraction, args.val_fraction]}
        host_state = tpu.to_host(state)  # every process takes part: shards on other hosts are gathered
        path = save_checkpoint(args.out, host_state, config, extra, args.keep) if tpu.is_main() else None
        log(f"saved {path}")

    def every(n):  # 0: never on the way, only at the end
        return (n and step % n == 0) or step == args.max_steps

    tokens_per_step = args.batch_size * args.seq_len
    flops_per_step = model.flops_per_token(config, args.seq_len) * tokens_per_step
    peak = tpu.peak_flops()  # (datasheet FLOP/s per device, its source), or None where unknown (CPU)
    log(f"MFU is measured against {peak[0] / 1e12:.3g} TFLOP/s per device ({peak[1]})" if peak else
        "no datasheet peak for this device: achieved TFLOP/s per device instead of MFU")
    t_start, timed_steps, timed_seconds = time.time(), 0, 0.0
    step = saved_step = start_step
    if val_batches and args.eval_every and start_step == 0:  # where the loss starts: about ln(vocabulary)
        val = evaluate()
        log(f"step {0:6d} | val_loss {val:.4f}")
        record({"step": 0, "val_loss": val})
    stop, restore_handlers = catch_stop_signals()
    try:
        while step < args.max_steps and not stop:
            local = np.stack([next(train_stream) for _ in range(args.grad_accum)])  # (K, B, W) on this process
            t0 = time.time()
            state, metrics = train_step(state, tpu.global_batch(local, mesh))
            metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
            dt = time.time() - t0
            step += 1
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt  # compiled before the loop
            tok_s, flop_s = tokens_per_step / dt, flops_per_step / dt / jax.device_count()
            speed = {"mfu": flop_s / peak[0]} if peak else {"tflops": flop_s / 1e12}
            eta = (args.max_steps - step) * (timed_seconds / timed_steps if timed_steps else dt)
            log(f"step {step:6d}/{args.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
                f"grad-norm {metrics['grad_norm']:.3f} | {dt * 1000:6.0f} ms | {tok_s:8.0f} tok/s | "
                + (f"MFU {100 * speed['mfu']:5.2f}%" if peak else f"{speed['tflops']:.3g} TFLOP/s")
                + f" | ETA {eta / 60:5.1f} min")
            record({"step": step, **metrics, "tokens_per_s": tok_s, "ms": dt * 1000, **speed})
            if val_batches and every(args.eval_every):
                val = evaluate()
                log(f"step {step:6d} | val_loss {val:.4f}")
                record({"step": step, "val_loss": val})
            if every(args.save_every):
                checkpoint()
                saved_step = step
        if stop:  # a signal: save the step reached (unless just saved), then stop
            if step > saved_step:
                checkpoint()
            log(f"stopped by {signal.Signals(stop[0]).name} at step {step}: run the same command to resume")
            raise SystemExit(128 + stop[0])
    except KeyboardInterrupt:  # a second signal: stop at once; the newest checkpoint stays
        saved = list_checkpoints(args.out)
        print("interrupted: " + (f"run the same command to resume from {saved[-1]}" if saved else
                                 "no checkpoint was written, so the same command starts over"), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        restore_handlers()
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoints in {args.out}")

    params = tpu.to_host(state["params"]) if args.sample_tokens else None  # a collective: all processes
    if args.sample_tokens and tpu.is_main():
        import sample
        prompt = "def fibonacci(n):\n"
        text = sample.complete(params, config, [prompt], args.sample_tokens, temperature=0.2, top_p=0.95, seed=0)[0]
        log(f"sample ({args.sample_tokens} tokens, temperature 0.2):\n{prompt}{text}")


if __name__ == "__main__":
    common.run_main(main)
