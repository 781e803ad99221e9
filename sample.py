"""Sampling from CodeGen: `generate` (token ids in, new token ids
out), `complete` (text in, completion text out), `load` / `prepare`
(a checkpoint / parameters made ready to decode), and the sampling
CLI. The paper's multi-turn protocol and its chat: mtpb.py.

How one call works:

  1. Prompts are left-padded to a common length T, rounded up to a
     multiple of 64 (the "bucket"), so prompts of many lengths
     compile only a handful of times. `valid_BT` marks the padding;
     the model gives every real token the position it would have
     without padding and hides padded keys from attention.
  2. Prefill (one jitted call): each prompt goes through the model
     once, filling a KV cache of T + bucket(max_new_tokens) slots;
     its `num_samples` rows then get copies of that cache, so n
     samples of a HumanEval problem pay for one prefill, not n.
  3. Decode (one jitted call): a `jax.lax.while_loop` feeds the last
     token through the cached model, picks the next one and writes
     it into a preallocated buffer, until every row has produced EOS
     or the budget is spent. Rows that are done ride along.
  4. Stop strings (`complete`) are text, so the decode loop then runs
     in chunks of CHUNK tokens; after each chunk the host decodes the
     rows and marks those holding a stop string as done. The text is
     cut just before the first stop string.

On a mesh (`mesh=`, `--mesh DPxFSDPxMP`), parameters are laid out by
tpu.RULES and the decode state by tpu.decode_shardings (KV cache heads
over `model`, rows over the data axes; prompts padded with finished
copies until the rows divide evenly); greedy tokens equal the
one-device run's. `--dry-run [--topology v4:2x2x1]` plans prefill
and decode per device instead (docs/sharding.md).

Picking a token: temperature, then top-k, then top-p (nucleus; ties
at the boundary stay), Hugging Face's order; only the tokenizer's
50,295 real ids, not the head's padding to 51,200. `_pick` below is
the plain way (lax.top_k, sort + cumsum, categorical).

Plain first, fast beside: by default decoding runs the fast twins,
model_fast.py's decoding forward (weights [out, in], per-layer cache
written in place) and sample_fast.py's picker (nothing sorts the
vocabulary; why it is exact: docs/sampling.md). `plain=True`
(`--plain`) runs model.forward with its simple cache and `_pick`
instead: the same greedy tokens and the same sampling law, slower.

The CLI's defaults are the paper's sampling script's (CodeGen
`jaxformer/hf/sample.py`): temperature 0.2, top-p 0.95, 128 new
tokens, seed 42.

    python sample.py --init-from out/nano --prompt "def fib(n):"
    python sample.py --init-from codegen-350M-mono \\
        --prompt-file prompt.py --stop '\\ndef'
    python sample.py --init-from out/nano --plain   # plain lane
"""
import math
import os
import pathlib
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

import common
import data
import hf
import model
import model_fast
import plan
import sample_fast
import tpu

BUCKET = 64         # prompt and output lengths are rounded up to a multiple of this
CHUNK = 32          # decode steps between host-side stop-string checks
IN_PLACE = {"xla_cpu_copy_insertion_use_region_analysis": True}  # else XLA:CPU copies the KV cache each step


def _bucket(n):
    return -(-n // BUCKET) * BUCKET  # round up


# ----------------------------------------------------------------------------- picking a token

def _pick(logits_BV, key, knobs, mode):
    """The next token per row, the plain way; knobs = (temperature,
    top_p), mode = _mode(...). Temperature, then top-k, then top-p
    (Hugging Face's order; ties at either boundary stay). Only the
    tokenizer's real ids: the head pads the vocabulary to 51,200.
    sample_fast.pick picks the same way without sorting V logits."""
    V = logits_BV.shape[-1]
    real_V = jnp.arange(V) < min(V, data.VOCAB_SIZE)
    logits_BV = jnp.where(real_V, logits_BV, -jnp.inf)
    if mode[0] == "greedy":
        return jnp.argmax(logits_BV, axis=-1)
    _, top_k, nucleus = mode
    temperature, top_p = knobs
    x_BV = logits_BV / temperature
    if top_k < V:                              # keep the k largest
        kth_B1 = jax.lax.top_k(x_BV, top_k)[0][:, -1:]
        x_BV = jnp.where(x_BV >= kth_B1, x_BV, -jnp.inf)
    if nucleus:
        x_BV = _nucleus(x_BV, top_p)
    return jax.random.categorical(key, x_BV, axis=-1)


def _nucleus(x_BV, top_p):
    """Top-p: keep the most likely tokens until they hold p of the
    probability; a token stays when the tokens before it in sorted
    order hold less than p."""
    sorted_BV = -jnp.sort(-x_BV, axis=-1)          # descending
    probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
    before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
    kept_BV = before_BV < top_p
    floor_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf),
                       axis=-1, keepdims=True)
    return jnp.where(x_BV >= floor_B1, x_BV, -jnp.inf)


def _knobs(temperature, top_p, plain):
    """The traced part of the sampling settings (a new temperature or
    p does not compile anew); the fast picker takes p split in three."""
    t = jnp.float32(temperature or 1)
    if plain:
        return (t, jnp.float32(top_p))
    return (t, jnp.asarray(sample_fast.split_p(top_p)))


def _mode(temperature, top_k, top_p):
    """The static part of the sampling settings (a new k compiles anew; a new temperature or p does not)."""
    if temperature == 0:
        return ("greedy",)
    return ("sample", top_k or 1 << 30, top_p < 1)


# ----------------------------------------------------------------------------- compiled prefill and decode
# Decode state, all on the device: the KV cache, the output buffer `out_BM` (new tokens,
# EOS after a row is done), `done_B`, and `n`, the number of new tokens so far.
# The random key for new token i is fold_in(key, i), so results do not depend on CHUNK.

def _lane(plain):
    """(forward, init_cache, pick): the plain model and picker, or
    their fast twins (model_fast, sample_fast), the default."""
    if plain:
        return model.forward, model.init_cache, _pick
    return model_fast.forward, model_fast.init_cache, sample_fast.pick


def _repeat_rows(cache, n, plain):
    """Each prompt's cache rows copied n times: prompt p -> rows p·n ...
    p·n + n-1. The plain cache's keys and values have rows on axis 1
    (after the layers), everything else on axis 0."""
    out = {"length": cache["length"]}
    for name in ("valid", "pos"):
        out[name] = jnp.repeat(cache[name], n, axis=0)
    kv_axis = 1 if plain else 0
    for name in ("k", "v"):
        out[name] = jax.tree.map(
            partial(jnp.repeat, repeats=n, axis=kv_axis), cache[name])
    return out


@partial(jax.jit, static_argnames=(
    "config", "new_bucket", "num_samples", "mode", "plain", "mesh"))
def _prefill(params, prompt_PT, valid_PT, key, knobs, *, config,
             new_bucket, num_samples, mode, plain=False, mesh=None):
    """The decode state after each prompt's one prefill and first
    token, its rows copied num_samples times (B = P·num_samples),
    laid out on `mesh` (None: one device)."""
    forward, init_cache, pick = _lane(plain)
    P, T = prompt_PT.shape
    dtype = params["wte"].dtype
    cache = init_cache(config, P, T + new_bucket, dtype)
    # All but the last token only fill the cache: XLA drops their
    # unused head matmul.
    _, cache = forward(params, prompt_PT[:, :-1], config,
                       valid_BT=valid_PT[:, :-1], cache=cache,
                       mesh=mesh)
    # the last token: always real
    logits_P1V, cache = forward(params, prompt_PT[:, -1:], config,
                                cache=cache, mesh=mesh)
    cache = _repeat_rows(cache, num_samples, plain)
    logits_BV = jnp.repeat(logits_P1V[:, 0], num_samples, axis=0)
    tok_B = pick(logits_BV, jax.random.fold_in(key, 0), knobs, mode)
    B = P * num_samples
    out_BM = jnp.full((B, new_bucket), data.EOS, jnp.int32)
    out_BM = out_BM.at[:, 0].set(tok_B)
    return _laid_out({"cache": cache,
                      "out": out_BM,
                      "done": tok_B == data.EOS,
                      "n": jnp.ones((), jnp.int32)}, mesh)


def _laid_out(state, mesh):
    """The decode state split on `mesh` as tpu.decode_shardings
    says."""
    if mesh is None:
        return state
    shardings = tpu.decode_shardings(state, mesh)
    return jax.lax.with_sharding_constraint(state, shardings)


@partial(jax.jit, static_argnames=("config", "mode", "plain", "mesh"),
         donate_argnames=("state",), compiler_options=IN_PLACE)
def _decode(params, state, limit, key, knobs, *, config, mode,
            plain=False, mesh=None):
    """Decode until `n == limit` or every row is done; the state's
    buffers are reused in place."""
    forward, _, pick = _lane(plain)

    def not_finished(s):
        return (s["n"] < limit) & ~jnp.all(s["done"])

    def step(s):
        n = s["n"]
        last_B1 = jax.lax.dynamic_slice_in_dim(s["out"], n - 1, 1,
                                               axis=1)
        logits_B1V, cache = forward(params, last_B1, config,
                                    cache=s["cache"], mesh=mesh)
        token_key = jax.random.fold_in(key, n)
        tok_B = pick(logits_B1V[:, 0], token_key, knobs, mode)
        tok_B = jnp.where(s["done"], data.EOS, tok_B)
        out = jax.lax.dynamic_update_slice_in_dim(
            s["out"], tok_B[:, None], n, axis=1)
        return _laid_out({"cache": cache,
                          "out": out,
                          "done": s["done"] | (tok_B == data.EOS),
                          "n": n + 1}, mesh)

    return jax.lax.while_loop(not_finished, step, state)


# ----------------------------------------------------------------------------- host side

def _check(config, prompts, max_new_tokens, temperature, top_p,
           top_k, num_samples):
    """One-line ValueErrors for every input a caller can get wrong."""
    is_list = isinstance(prompts, (list, tuple))
    if isinstance(prompts, (str, bytes)) or not is_list:
        raise ValueError(
            f"prompts must be a list, got {type(prompts).__name__}: "
            f"wrap one prompt as [prompt]")
    checks = [
        (max_new_tokens < 1,
         f"max_new_tokens must be >= 1, got {max_new_tokens}"),
        (temperature < 0,
         f"temperature must be >= 0 (0 = greedy), got {temperature}"),
        (not 0 < top_p <= 1,
         f"top_p must be in (0, 1], got {top_p}"),
        (top_k < 0,
         f"top_k must be >= 0 (0 = off), got {top_k}"),
        (num_samples < 1,
         f"num_samples must be >= 1, got {num_samples}")]
    for bad, message in checks:
        if bad:
            raise ValueError(message)
    # the last new token is never fed back, so it needs no slot
    room = config.n_ctx + 1 - max_new_tokens
    for i, p in enumerate(prompts):
        _check_prompt(config, i, p, room, max_new_tokens)


def _check_prompt(config, i, p, room, max_new_tokens):
    """One-line ValueErrors for prompt number i."""
    if not isinstance(p, (list, tuple, np.ndarray)):
        raise ValueError(
            f"prompts must be a list of token-id lists; prompt {i} "
            f"is {type(p).__name__}")
    if len(p) == 0:
        raise ValueError(f"prompt {i} is empty; give at least one token")
    if len(p) > room:
        raise ValueError(
            f"prompt {i} has {len(p)} tokens and max_new_tokens is "
            f"{max_new_tokens}, but the context holds {config.n_ctx} "
            f"(+1 for the last new token): keep prompts <= "
            f"{max(room, 0)} tokens or lower max_new_tokens")
    if min(p) < 0 or max(p) >= config.vocab_size:
        raise ValueError(f"prompt {i} has a token id outside "
                         f"[0, {config.vocab_size})")


def _first_stop(text, stop):
    """Index of the earliest occurrence of any stop string in `text`,
    or None."""
    hits = []
    for s in stop:
        i = text.find(s) if s else -1
        if i >= 0:
            hits.append(i)
    return min(hits) if hits else None


def _before_eos(ids):
    ids = list(map(int, ids))
    if data.EOS in ids:
        return ids[:ids.index(data.EOS)]
    return ids


def _layout(params, plain, mesh):
    """The weights as the chosen lane decodes with them: stacked for
    the plain one, model_fast.decoding_layout (a no-op for load()'s
    params) for the fast one."""
    if not plain:
        if mesh is not None and model_fast.is_quantized(params):
            raise ValueError(INT8_ON_MESH)
        return model_fast.decoding_layout(params)
    if mesh is not None:
        raise ValueError("plain decoding runs on one device: drop "
                         "the mesh (--mesh) or plain (--plain)")
    if model_fast.in_decoding_layout(params):
        raise ValueError("plain decoding takes stacked weights "
                         "(hf.load_hf's); load them with plain=True")
    return params


INT8_ON_MESH = ("int8 weights decode on one device: drop the mesh "
                "(--mesh) or pick float32")


def _left_padded(prompts, rows_divide, num_samples):
    """(prompt_PT, valid_PT, padding_B): the prompts left-padded to
    one bucket, plus copies of prompt 0 until the P·num_samples rows
    divide by `rows_divide`; padding_B marks those copies' rows
    (done from the start)."""
    copies = -len(prompts) % (rows_divide
                              // math.gcd(rows_divide, num_samples))
    padded = list(prompts) + [prompts[0]] * copies
    P = len(padded)
    T = _bucket(max(len(p) for p in prompts))
    prompt_PT = np.zeros((P, T), np.int32)
    valid_PT = np.zeros((P, T), bool)
    for i, p in enumerate(padded):                 # left padding
        prompt_PT[i, T - len(p):] = p
        valid_PT[i, T - len(p):] = True
    rows_B = np.arange(P * num_samples)
    padding_B = rows_B >= len(prompts) * num_samples
    return prompt_PT, valid_PT, padding_B


def generate(params, config, prompts, max_new_tokens,
             temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, until=None, mesh=None, plain=False):
    """Sample continuations of token-id prompts: len(prompts) *
    num_samples lists of NEW token ids (all samples of prompt 0, then
    of prompt 1, ...), each ending before EOS. temperature=0 is
    greedy; top_k=0 and top_p=1 are off; the same seed gives the same
    samples. `params` as hf.load_hf gives them or `prepare`d (as
    `load` does: faster to reuse). `until(ids) -> bool`, checked on
    the host every CHUNK tokens, ends a row early (its ids may run up
    to CHUNK tokens past the point it first said True; `complete`
    cuts the text). `mesh`: above. `plain=True` decodes with the
    plain twins (model.forward, `_pick`): the same tokens, slower."""
    _check(config, prompts, max_new_tokens, temperature, top_p, top_k,
           num_samples)
    if not prompts:
        return []
    params = _layout(params, plain, mesh)
    d = 1
    if mesh is not None:
        d = mesh.shape["data"] * mesh.shape["fsdp"]
    prompt_PT, valid_PT, padding_B = _left_padded(prompts, d,
                                                  num_samples)
    if mesh is not None:
        tpu.check_layout(config, mesh, len(padding_B))
        shardings = tpu.param_shardings(params, mesh)
        params = jax.device_put(params, shardings)
        split = len(prompt_PT) % d == 0
        rows = PartitionSpec(tpu.BATCH_AXES if split else None)
        prompt_PT, valid_PT = jax.device_put(
            (prompt_PT, valid_PT), NamedSharding(mesh, rows))

    mode = _mode(temperature, top_k, top_p)
    how = dict(config=config, mode=mode, plain=plain, mesh=mesh)
    args = (jax.random.PRNGKey(seed),
            _knobs(temperature, top_p, plain))
    n_rows = len(prompts) * num_samples
    state = _prefill(params, prompt_PT, valid_PT, *args,
                     new_bucket=_bucket(max_new_tokens),
                     num_samples=num_samples, **how)
    # without `until`, one call does it all
    chunk = CHUNK if until else max_new_tokens
    while True:
        n, done, out = jax.device_get(
            (state["n"], state["done"], state["out"]))
        ended = padding_B.copy()
        if until:
            ended |= _until_rows(until, done, out, n)
        if (ended & ~done).any():
            done = done | ended
            state["done"] = jax.device_put(
                done, state["done"].sharding)
        if n >= max_new_tokens or done.all():
            return [_before_eos(o[:n]) for o in out[:n_rows]]
        limit = jnp.int32(min(n + chunk, max_new_tokens))
        state = _decode(params, state, limit, *args, **how)


def _until_rows(until, done_B, out_BM, n):
    """Which rows not yet done `until` ends, given their n ids."""
    ended = []
    for done, out in zip(done_B, out_BM):
        ended.append(not done and until(_before_eos(out[:n])))
    return np.array(ended)


def _until_stop(stop, tok):
    """An `until` for generate: has the row's text come to hold one
    of the stop strings? None without stop strings."""
    if not stop:
        return None

    def until(ids):
        text = tok.decode(ids, skip_special_tokens=False)
        return _first_stop(text, stop) is not None
    return until


def complete(params, config, texts, max_new_tokens, *, stop=(),
             temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, mesh=None, plain=False):
    """Text in, completion text out (ordered as `generate`), cut
    exactly before the first stop string and before `<|endoftext|>`;
    decoding of a row ends soon after its stop. `stop`: one string or
    a list of them."""
    if isinstance(texts, str):
        raise ValueError("complete() takes a list of texts, got one "
                         "str: pass [text]")
    if isinstance(stop, str):                  # one str is one stop
        stop = [stop]
    stop = list(stop)
    tok = data.get_tokenizer()
    prompts = [tok.encode(t).ids for t in texts]
    rows = generate(params, config, prompts, max_new_tokens,
                    temperature=temperature, top_p=top_p, top_k=top_k,
                    seed=seed, num_samples=num_samples,
                    until=_until_stop(stop, tok), mesh=mesh,
                    plain=plain)
    return [_text_before_stop(ids, stop, tok) for ids in rows]


def _text_before_stop(ids, stop, tok):
    text = tok.decode(ids, skip_special_tokens=False)
    end = _first_stop(text, (*stop, "<|endoftext|>"))
    return text if end is None else text[:end]


def prepare(params, dtype="float32", plain=False):
    """Parameters as decoding wants them, once, instead of on every
    generate call: cast to `dtype` (one of common.DECODE_DTYPES) and,
    unless `plain`, in model_fast.decoding_layout. "int8" is the fast
    lane's model_fast.quantized: int8 matrices, the rest and the
    activations float32."""
    dtypes = common.DECODE_DTYPES
    if dtype not in dtypes:
        raise ValueError(f"dtype must be one of {', '.join(dtypes)}, "
                         f"got {dtype!r}")
    if dtype == "int8" and plain:
        raise ValueError("int8 weights decode in the fast lane only: "
                         "drop plain (--plain) or pick float32")
    if dtype == "int8":
        params = model.cast(params, jnp.float32)
        params = model_fast.decoding_layout(params)
        return model_fast.quantized(params)
    params = model.cast(params, jnp.dtype(dtype))
    if plain:
        return params
    return model_fast.decoding_layout(params)


def load(path, dtype="float32", mesh=None, plain=False):
    """(config, params) ready to decode: the checkpoint at `path`
    (hf.load_hf) `prepare`d (for the plain lane with `plain`); on a
    `mesh`'s devices, each its shards."""
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}; run `python "
                         f"train.py` first or pass --init-from DIR")
    if dtype == "int8" and mesh is not None:
        raise ValueError(INT8_ON_MESH)
    config, params = hf.load_hf(path)
    params = prepare(params, dtype, plain)     # numpy, on the host
    if mesh is None:
        return config, params
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    tpu.check_layout(config, mesh, rows)
    shardings = tpu.param_shardings(params, mesh)
    return config, jax.device_put(params, shardings)


# ----------------------------------------------------------------------------- command line

def read_prompt(path):
    """The text of --prompt-file PATH; '-' reads standard input."""
    try:
        if path == "-":
            return sys.stdin.read()
        return pathlib.Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read --prompt-file: {e.strerror}: {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompt-file {path} is not UTF-8 text (byte {e.start}); give a source file") from None


def build_parser():
    p = common.ArgumentParser(
        description="Sample code from a CodeGen checkpoint.")
    add = p.add_argument
    add("--init-from", default=os.path.join("out", "nano"),
        help="checkpoint directory (Hugging Face CodeGen or "
             "written by train.py)")
    add("--prompt", default="def helloworld():", help="prompt text")
    add("--prompt-file",
        help="read the prompt from this file instead of --prompt "
             "('-': standard input)")
    add("--num-samples", type=int, default=1,
        help="completions per prompt (one prefill for all)")
    add("--max-new-tokens", type=int, default=128,
        help="new tokens per completion")
    add("--temperature", type=float, default=0.2, help="0 = greedy")
    add("--top-p", type=float, default=0.95,
        help="nucleus sampling mass; 1 = off")
    add("--top-k", type=int, default=0,
        help="keep the k most likely tokens; 0 = off")
    add("--seed", type=int, default=42, help="random seed")
    add("--stop", action="append", default=[],
        help=r"stop string, repeatable; \n and \t mean newline and "
             r"tab (e.g. --stop '\ndef')")
    add("--dtype", choices=common.DECODE_DTYPES, default="float32",
        help="weights while decoding (int8: the fast lane's)")
    add("--plain", action="store_true",
        help="decode with the plain model and sampler (model.forward, "
             "sample._pick) instead of their fast twins: same "
             "tokens, slower")
    add("--mesh", help="DPxFSDPxMP mesh of this process's devices "
                       "(tpu.py); None: one device")
    plans = p.add_argument_group("planning (--dry-run)")
    plans.add_argument(
        "--dry-run", action="store_true",
        help="only plan: compile prefill and decode (--num-samples "
             "rows, longest prompt) of --size on --mesh, print the "
             "memory per device; nothing is loaded")
    plans.add_argument("--size", choices=tuple(model.CONFIGS),
                       default="nano", help="model preset")
    plans.add_argument(
        "--topology",
        help="compile with XLA:TPU for this TPU slice, e.g. v4:2x2x1 "
             "(pip install libtpu); None: this machine's devices, "
             "simulated on CPU if fewer")
    plans.add_argument("--device-memory", type=float,
                       help="GiB per device; None: the TPU chip's HBM")
    return p


def check_args(args):
    """The sampling flags' values, before anything is loaded: _check's
    message with the flag's name ("--top-p must be ...")."""
    try:
        _check(model.CONFIGS["nano"], [], args.max_new_tokens,
               args.temperature, args.top_p, args.top_k,
               args.num_samples)
    except ValueError as e:
        name, rest = str(e).split(" ", 1)
        flag = common.flag_names([name])
        raise ValueError(f"{flag} {rest}") from None
    if args.topology and not args.dry_run:
        raise ValueError("--topology only plans (nothing runs on its "
                         "devices): add --dry-run")
    if args.plain and args.mesh:
        raise ValueError("--plain decodes on one device: drop --mesh")


def dry_run(args):
    """plan.py's report of prefill and decode on --mesh. With fewer
    devices than the mesh, ensure_fake_devices re-runs this command
    on CPU with enough simulated ones."""
    plan.ensure_fake_devices(args.mesh, args.topology)
    mode = _mode(args.temperature, args.top_k, args.top_p)
    return plan.sample_dry_run(
        model.CONFIGS[args.size], args.dtype, args.mesh,
        args.topology, args.num_samples, args.max_new_tokens, mode,
        args.device_memory, prepare=prepare, prefill=_prefill,
        decode=_decode.__wrapped__, bucket=_bucket)


def compile_seconds(run):
    """(run()'s result, its seconds, the seconds of them JAX spent
    tracing and compiling)."""
    compiling = []

    def on_event(event, seconds, **_):
        if event.startswith("/jax/core/compile/"):
            compiling.append(seconds)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    try:
        result = run()
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    seconds = time.perf_counter() - t0
    return result, seconds, min(sum(compiling), seconds)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t")
                 for s in args.stop]
    check_args(args)
    if args.dry_run:
        return print(dry_run(args))
    mesh = None
    if args.mesh:
        mesh = tpu.make_mesh(args.mesh, jax.local_devices())
    config, params = load(args.init_from, args.dtype, mesh,
                          args.plain)
    tok = data.get_tokenizer()
    if args.prompt_file:
        args.prompt = read_prompt(args.prompt_file)
    prompt = tok.encode(args.prompt).ids

    def run():
        return generate(
            params, config, [prompt], args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed,
            num_samples=args.num_samples,
            until=_until_stop(args.stop, tok), mesh=mesh,
            plain=args.plain)
    rows, seconds, compiled = compile_seconds(run)
    for i, ids in enumerate(rows):
        print(f"{'-' * 30} sample {i + 1}/{len(rows)}")
        print(args.prompt + _text_before_stop(ids, args.stop, tok))
    # tokens generated, including any past a stop string
    n_new = sum(map(len, rows))
    warm = max(seconds - compiled, 1e-9)
    size = plan.human_size(model_fast.weight_bytes(params)).strip()
    print("-" * 30)
    print(f"prompt tokens {len(prompt)}, new tokens {n_new}, "
          f"{seconds:.2f} s, {n_new / seconds:.1f} tokens/s; without "
          f"the {compiled:.2f} s of compilation {n_new / warm:.1f} "
          f"tokens/s; weights {size} in {args.dtype}")


if __name__ == "__main__":
    common.run_main(main)
