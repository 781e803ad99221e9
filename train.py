"""Train CodeGen with the paper's recipe, from a CPU minute to a TPU pod.

    python train.py                       # `nano` on the Python standard library, CPU, minutes
    python train.py --size 350M           # the paper's 350M architecture and hyper-parameters
    python train.py --init-from DIR --data my_repo/ --lr 1e-5   # fine-tune released weights
    python train.py --size 16B --mesh 1x16x4 --dry-run          # will it fit? (no allocation)

The recipe (CodeGen §2.2; JAXformer's configs, see architecture.md §2.2): AdamW with
β = (0.9, 0.999), ε = 1e-8, weight decay 0.1; global-norm clipping at 1.0; linear warmup
then cosine decay to lr/10, then flat; gradient accumulation; fp32 master weights and
optimizer state with bf16 compute on accelerators; JAXformer's optional z-loss.

Each step: take a (K, B, T+1) batch of K micro-batches, sum their gradients in a scan,
clip, apply AdamW. One jitted function does it all; this file is its loop, logging,
evaluation and checkpoints. A checkpoint is a Hugging Face CodeGen directory plus the
optimizer state, step, data position and RNG, written atomically, so a run killed at any
moment resumes and reproduces the uninterrupted run's losses step for step.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import data
import model
import tpu

# Per-size defaults. Paper sizes: JAXformer's codegen_*_nl configs (lr, warmup 3000, cosine over
# 300k steps to lr/10, 350k total, ~0.5M/1M tokens per step) and the 16B numbers from the paper's
# blog summary (lr 0.5e-4, 2M tokens/step). The laptop presets are tuned to finish in minutes.
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
    weight_decay: float = 0.1
    clip: float = 1.0
    z_loss: float = 0.0
    dtype: str = "float32"  # compute dtype; master weights and optimizer state stay fp32
    remat: bool = False


def lr_at(step, r):
    """JAXformer's schedule: linear warmup from 0, cosine down to min_lr, then constant."""
    warm = r.lr * jnp.clip(step / max(r.warmup, 1), 0.0, 1.0)
    progress = jnp.clip((step - r.warmup) / max(r.anneal, 1), 0.0, 1.0)
    cosine = r.lr - (r.lr - r.min_lr) * (1 - jnp.cos(jnp.pi * progress)) / 2
    return jnp.where(step <= r.warmup, warm, cosine)


def init_state(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return {"params": params, "mu": zeros(), "nu": zeros(), "step": jnp.zeros((), jnp.int32)}


def make_train_step(config, r):
    dtype = jnp.dtype(r.dtype)

    def objective(params, batch_BT1):
        # Differentiate through the cast, so gradients arrive in fp32 for the fp32 master weights.
        return model.loss_fn(model.cast(params, dtype), batch_BT1, config, z_loss=r.z_loss, remat=r.remat)

    def train_step(state, batch_KBT1):
        params = state["params"]

        def accumulate(grad_sum, micro_batch):
            loss, grads = jax.value_and_grad(objective)(params, micro_batch)
            return jax.tree.map(jnp.add, grad_sum, grads), loss
        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, losses = jax.lax.scan(accumulate, zeros, batch_KBT1)
        K = batch_KBT1.shape[0]
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
    from safetensors.numpy import save_file
    step = int(state["step"])
    final = os.path.join(out, f"ckpt-{step:07d}")
    tmp = os.path.join(out, f".tmp-ckpt-{step:07d}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_hf(state["params"], config, tmp)
    save_file(_flat(state["mu"], "mu/") | _flat(state["nu"], "nu/"), os.path.join(tmp, "optimizer.safetensors"))
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump(extra | {"step": step}, f, indent=1)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(out):
    if not os.path.isdir(out):
        return []
    return [os.path.join(out, d) for d in sorted(os.listdir(out)) if d.startswith("ckpt-")]


def load_checkpoint(path, config):
    from safetensors.numpy import load_file
    try:
        ckpt_config, params = model.load_hf(path)
        if ckpt_config != config:
            raise SystemExit(f"error: checkpoint {path} holds a different model ({ckpt_config}) than requested "
                             f"({config}); pick another --out or the matching --size")
        with open(os.path.join(path, "train_state.json")) as f:
            extra = json.load(f)
        moments = load_file(os.path.join(path, "optimizer.safetensors"))
        state = {"params": params, "mu": _unflat(moments, params, "mu/"), "nu": _unflat(moments, params, "nu/"),
                 "step": jnp.asarray(extra["step"], jnp.int32)}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: checkpoint {path} is unreadable ({e}); delete it or pick another --out")
    return state, extra


# ----------------------------------------------------------------------------- the script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", default="nano", choices=list(model.CONFIGS), help="model preset")
    p.add_argument("--data", default="stdlib", help="comma-separated sources: 'stdlib', a directory, a .jsonl[.gz] "
                   "file, or a directory prepared by `python data.py --prepare`")
    p.add_argument("--out", default=None, help="checkpoint directory (default: out/SIZE)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out for validation "
                   "(chosen by a hash of each document's name, so stable across runs)")
    p.add_argument("--init-from", default=None, help="start from a Hugging Face CodeGen directory or one of our "
                   "checkpoints, with a fresh optimizer")
    p.add_argument("--resume", action="store_true", help="require a checkpoint in --out to continue from "
                   "(without the flag, a run continues from one when --out holds it)")
    g = p.add_argument_group("schedule (defaults per --size, see PRESETS)")
    g.add_argument("--max-steps", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="sequences per optimizer step (global)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch-size must divide)")
    g.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (at most the model's n_ctx)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="final learning rate (default lr/10)")
    g.add_argument("--warmup", type=int, default=None, help="linear warmup steps")
    g.add_argument("--anneal", type=int, default=None, help="cosine steps after warmup (default: to max-steps)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    g.add_argument("--z-loss", type=float, default=None, help="z-loss weight (JAXformer: 1e-4)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="compute dtype; auto = bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--remat", action="store_true", help="recompute each layer in the backward pass (saves memory)")
    g.add_argument("--seed", type=int, default=0, help="parameter init and data order")
    o = p.add_argument_group("evaluation, checkpoints, devices")
    o.add_argument("--eval-every", type=int, default=100)
    o.add_argument("--eval-batches", type=int, default=8)
    o.add_argument("--save-every", type=int, default=200)
    o.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    o.add_argument("--sample-tokens", type=int, default=64, help="tokens sampled at the end (0: none)")
    o.add_argument("--mesh", default=None, help="DPxFSDPxMP device mesh (default: all devices data-parallel)")
    o.add_argument("--dry-run", action="store_true", help="print parameter, FLOP and per-device memory estimates "
                   "for --mesh without allocating the model, then exit")
    o.add_argument("--device-memory", type=float, default=80.0, help="GiB per device, for --dry-run")
    o.add_argument("--peak", default=None, help="for --dry-run: peak FLOP/s per device, or a datasheet name "
                   "('TPU v4', 'TPU v5p', 'H100', 'A100', ...); default: this machine's device")
    o.add_argument("--plot", metavar="OUT", default=None, help="plot OUT/metrics.jsonl to OUT/loss.png and exit")
    args = p.parse_args(argv)

    preset = PRESETS[args.size]
    for name in ("max_steps", "batch_size", "seq_len", "lr", "warmup", "z_loss"):
        if getattr(args, name) is None:
            setattr(args, name, preset[name])
    args.min_lr = args.lr / 10 if args.min_lr is None else args.min_lr
    args.anneal = args.anneal or preset["anneal"] or max(args.max_steps - args.warmup, 1)
    args.out = args.out or os.path.join("out", args.size)
    return args


def check_args(args, config):
    """Everything a user can get wrong, as one line each, before any compute."""
    def fail(msg):
        raise SystemExit(f"error: {msg}")
    if args.seq_len > config.n_ctx:
        fail(f"--seq-len {args.seq_len} is longer than the model's context ({config.n_ctx})")
    if min(args.seq_len, args.batch_size, args.grad_accum, args.max_steps) < 1:
        fail("--seq-len, --batch-size, --grad-accum and --max-steps must be positive")
    if args.batch_size % args.grad_accum:
        fail(f"--batch-size {args.batch_size} is not divisible by --grad-accum {args.grad_accum}")
    micro = args.batch_size // args.grad_accum
    if micro % jax.process_count():
        fail(f"micro-batch {micro} cannot be split over {jax.process_count()} processes")
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, ".write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to --out {args.out}: {e.strerror}")


def plot(out):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("error: --plot needs matplotlib (pip install matplotlib)") from None
    if not os.path.exists(os.path.join(out, "metrics.jsonl")):
        raise SystemExit(f"error: {out} has no metrics.jsonl; pass the --out directory of a training run")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    plt.plot(*zip(*train), label="train", lw=0.8)
    if val:
        plt.plot(*zip(*val), "o-", label="validation")
    plt.xlabel("step"), plt.ylabel("loss (nats/token)"), plt.legend(), plt.grid(alpha=0.3)
    plt.savefig(os.path.join(out, "loss.png"), dpi=120)
    print(f"wrote {os.path.join(out, 'loss.png')}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot:
        return plot(args.plot)
    try:
        if args.dry_run:  # fewer devices than the mesh: re-runs this command on CPU with enough simulated ones
            tpu.ensure_fake_devices(args.mesh)
        else:
            tpu.init_distributed()  # before anything else touches a JAX backend
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.dtype == "auto":  # a dry run describes an accelerator run, even when it compiles on CPU
        args.dtype = "bfloat16" if args.dry_run or jax.default_backend() != "cpu" else "float32"
    log = partial(print, flush=True) if tpu.is_main() else (lambda *a, **k: None)  # flush: `| tee` shows each step

    # ---- the model: a preset, or the architecture of the checkpoint we start from
    init_params = None
    if args.init_from:
        try:
            config, init_params = model.load_hf(args.init_from)
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --init-from {args.init_from}: {e}")
    else:
        config = model.CONFIGS[args.size]
    check_args(args, config)
    recipe = Recipe(lr=args.lr, min_lr=args.min_lr, warmup=args.warmup, anneal=args.anneal,
                    weight_decay=args.weight_decay, clip=args.clip, z_loss=args.z_loss, dtype=args.dtype,
                    remat=args.remat)
    try:
        if args.dry_run:
            return log(tpu.dry_run(config, args.mesh, args.batch_size, args.seq_len, recipe, args.grad_accum,
                                   args.device_memory, peak=args.peak))
        mesh = tpu.make_mesh(args.mesh)
        tpu.check_layout(config, mesh, args.batch_size // args.grad_accum)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    jax.set_mesh(mesh)  # model.forward's activation hint reads the mesh from here
    log(f"config: {config}\nrecipe: {recipe}")
    log(f"{model.param_count(config) / 1e6:.1f}M parameters, mesh {dict(mesh.shape)}, "
        f"{args.batch_size} x {args.seq_len} tokens per step")
    with open(os.path.join(args.out, "run.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(config), "recipe": dataclasses.asdict(recipe), "args": vars(args)},
                  f, indent=1)

    # ---- state: resume from OUT, or start from --init-from / a fresh init
    checkpoints = list_checkpoints(args.out)
    if args.resume and not checkpoints:
        raise SystemExit(f"error: --resume given but {args.out} holds no checkpoint")
    data_state = None
    if checkpoints:
        state, extra = load_checkpoint(checkpoints[-1], config)
        data_state = extra["data_state"]
        log(f"resuming from {checkpoints[-1]} (step {int(state['step'])})")
    else:
        state = init_state(init_params if init_params is not None
                           else model.init_params(config, jax.random.PRNGKey(args.seed)))
    start_step = int(state["step"])

    # ---- data: each process reads its own share of the files
    micro = args.batch_size // args.grad_accum // jax.process_count()
    try:
        share = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                     val_fraction=args.val_fraction)
        train_stream = data.TokenStream(args.data, micro, args.seq_len, split="train", seed=args.seed,
                                        state=data_state, **share)
        val_batches = data.eval_batches(args.data, micro, args.seq_len, args.eval_batches, **share)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: --data {args.data}: {e}")
    log(train_stream.describe())

    # ---- compiled step and evaluation, laid out on the mesh
    state_sh = tpu.state_shardings(state, mesh)
    batch_sh = tpu.batch_sharding(mesh)
    state = jax.device_put(state, state_sh)
    train_step = jax.jit(make_train_step(config, recipe), in_shardings=(state_sh, batch_sh),
                         out_shardings=(state_sh, None), donate_argnums=0)
    compute = jnp.dtype(recipe.dtype)
    eval_loss = jax.jit(lambda p, b: model.loss_fn(model.cast(p, compute), b[0], config),
                        in_shardings=(state_sh["params"], batch_sh))

    def evaluate():
        losses = [eval_loss(state["params"], tpu.global_batch(b[None], mesh)) for b in val_batches]
        return float(np.mean([float(x) for x in losses]))

    # ---- metrics: keep what the checkpoint covers, so a resumed log reads as one run
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if tpu.is_main():
        kept = [line for line in open(metrics_path)] if os.path.exists(metrics_path) else []
        kept = [line for line in kept if json.loads(line)["step"] <= start_step]
        with open(metrics_path, "w") as f:
            f.writelines(kept)

    def record(row):
        if tpu.is_main():
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def checkpoint():
        extra = {"data_state": train_stream.state(), "seed": args.seed, "recipe": dataclasses.asdict(recipe)}
        host_state = tpu.to_host(state)  # every process takes part: shards on other hosts are gathered
        path = save_checkpoint(args.out, host_state, config, extra, args.keep) if tpu.is_main() else None
        log(f"saved {path}")

    tokens_per_step = args.batch_size * args.seq_len
    flops_per_step = model.flops_per_token(config, args.seq_len) * tokens_per_step
    peak, peak_source = tpu.peak_flops()
    log(f"MFU is measured against {peak / 1e12:.2f} TFLOP/s per device ({peak_source})")
    t_start, timed_steps, timed_seconds = time.time(), 0, 0.0
    step = start_step
    while step < args.max_steps:
        local = np.stack([next(train_stream) for _ in range(args.grad_accum)])  # (K, b, T+1)
        t0 = time.time()
        state, metrics = train_step(state, tpu.global_batch(local, mesh))
        metrics = {k: float(v) for k, v in metrics.items()}  # waits for the step
        dt = time.time() - t0
        step += 1
        if step > start_step + 1:  # the first step includes compilation
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + dt
        tok_s = tokens_per_step / dt
        mfu = flops_per_step / dt / (peak * jax.device_count())
        eta = (args.max_steps - step) * (timed_seconds / timed_steps if timed_steps else dt)
        log(f"step {step:6d}/{args.max_steps} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"grad-norm {metrics['grad_norm']:.3f} | {dt * 1000:6.0f} ms | {tok_s:8.0f} tok/s | "
            f"MFU {100 * mfu:5.2f}% | ETA {eta / 60:5.1f} min")
        record({"step": step, "loss": metrics["loss"], "lr": metrics["lr"], "grad_norm": metrics["grad_norm"],
                "tokens_per_s": tok_s, "mfu": mfu, "ms": dt * 1000})
        if step % args.eval_every == 0 or step == args.max_steps:
            val = evaluate()
            log(f"step {step:6d} | val_loss {val:.4f}")
            record({"step": step, "val_loss": val})
        if step % args.save_every == 0 or step == args.max_steps:
            checkpoint()
    log(f"done: {step} steps in {(time.time() - t_start) / 60:.1f} min; checkpoints in {args.out}")

    params = tpu.to_host(state["params"]) if args.sample_tokens else None  # a collective: all processes
    if args.sample_tokens and tpu.is_main():
        import sample
        prompt = "def fibonacci(n):\n"
        text = sample.complete(params, config, [prompt], args.sample_tokens, temperature=0.2, top_p=0.95, seed=0)[0]
        log(f"sample ({args.sample_tokens} tokens, temperature 0.2):\n{prompt}{text}")


if __name__ == "__main__":
    main()
