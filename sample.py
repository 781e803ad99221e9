"""Sampling from CodeGen: `generate` (token ids in, new token ids out), `complete` (text
in, completion text out), `load` / `prepare` (a checkpoint / parameters made ready to
decode), and the sampling CLI. The paper's multi-turn protocol and its chat: mtpb.py.

How one call works:

  1. Prompts are left-padded to a common length T, rounded up to a multiple of 64 (the
     "bucket"), so prompts of many lengths compile only a handful of times. `valid_BT`
     marks the padding; model.forward gives every real token the position it would have
     without padding and hides padded keys from attention.
  2. Prefill (one jitted call): each prompt goes through the model once, filling a KV
     cache of T + bucket(max_new_tokens) slots; its `num_samples` rows then get copies of
     that cache, so n samples of a HumanEval problem pay for one prefill, not n.
  3. Decode (one jitted call): a `jax.lax.while_loop` feeds the last token through the
     cached model, picks the next one and writes it into a preallocated buffer, until
     every row has produced EOS or the budget is spent. Rows that are done ride along.
  4. Stop strings (`complete`) are text, so the decode loop then runs in chunks of CHUNK
     tokens; after each chunk the host decodes the rows and marks those holding a stop
     string as done. The text is cut just before the first stop string.

On a mesh (`mesh=`, `--mesh DPxFSDPxMP`), parameters are laid out by tpu.RULES and the decode
state by tpu.decode_specs (KV cache heads over `model`, rows over the data axes; prompts padded
with finished copies until the rows divide evenly); greedy tokens equal the one-device run's.
`--dry-run [--topology v4:2x2x1]` plans prefill and decode per device instead (docs/sharding.md).

Picking a token: temperature, then top-k, then top-p (nucleus; ties at the boundary
stay), Hugging Face's order; only the tokenizer's 50,295 real ids, not the head's padding
to 51,200. Nothing sorts the vocabulary; how, and why it is exact: docs/sampling.md.

The CLI's defaults are the paper's sampling script's (CodeGen `jaxformer/hf/sample.py`):
temperature 0.2, top-p 0.95, 128 new tokens, seed 42.

    python sample.py --init-from out/nano --prompt "def fib(n):" --num-samples 4
    python sample.py --init-from codegen-350M-mono --prompt-file prompt.py --stop '\ndef'
"""
import contextlib
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
import plan
import tpu

BUCKET = 64         # prompt and output lengths are rounded up to a multiple of this
CHUNK = 32          # decode steps between host-side stop-string checks
W = 128             # vocabulary block width of the two-level searches in `_pick`
CANDIDATES = 2      # nucleus draws tested per rejection round
IN_PLACE = {"xla_cpu_copy_insertion_use_region_analysis": True}  # else XLA:CPU copies the KV cache each step


def _bucket(n):
    return -(-n // BUCKET) * BUCKET  # round up


# ----------------------------------------------------------------------------- picking a token


def _argmax(logits_BV):
    """jnp.argmax (the first index of the maximum) as two plain reductions: XLA:CPU does
    not vectorise argmax's paired (value, index) reduction."""
    top_B1 = logits_BV.max(axis=-1, keepdims=True)
    index_V = jnp.arange(logits_BV.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(logits_BV == top_B1, index_V, logits_BV.shape[-1]), axis=-1)


def _blocks(a_BV, fill):
    """(B, V) -> (B, N, W), V padded with `fill` to N·W."""
    return jnp.pad(a_BV, ((0, 0), (0, -a_BV.shape[-1] % W)), constant_values=fill).reshape(a_BV.shape[0], -1, W)


def _top_k_floor(x_BV, k):
    """The k-th largest value of each row, (B, 1). It lies in the k blocks of W values with
    the largest maxima: those maxima are k values >= the k-th largest block maximum m, and
    every value outside those blocks is <= m. So lax.top_k runs on k·W values, not V."""
    # The k-th is taken as the min of the top k: XLA:CPU turns top_k(...)[:, -1] into a full sort.
    if 2 * k * W > x_BV.shape[-1]:
        return jax.lax.top_k(x_BV, k)[0].min(-1, keepdims=True)
    x_BNW = _blocks(jax.lax.optimization_barrier(x_BV), -jnp.inf)  # unfused input: XLA:CPU's fast TopK
    _, best_Bk = jax.lax.top_k(x_BNW.max(-1), k)
    x_BkW = x_BNW[jnp.arange(x_BV.shape[0])[:, None], best_Bk]      # whole blocks: a cheap gather
    return jax.lax.top_k(x_BkW.reshape(x_BV.shape[0], -1), k)[0].min(-1, keepdims=True)


def _invert(w_BCn, u_BC):
    """Per (row, draw): the first index whose running sum of w exceeds u·sum(w), so index
    i comes out with probability w_i / sum(w); a zero weight never does (rounding that
    puts u·sum at the very end falls back to the last positive weight)."""
    n = w_BCn.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    run = jnp.cumsum(w_BCn, axis=-1)
    first = jnp.min(jnp.where((run > u_BC[..., None] * run[..., -1:]) & (w_BCn > 0), index, n), axis=-1)
    return jnp.minimum(first, jnp.max(jnp.where(w_BCn > 0, index, 0), axis=-1))


def _draw(w_BV, u_BC2):
    """C indices per row drawn with probability proportional to w_BV >= 0, two uniforms
    each: a block of W by its mass, then a token in it by its weight."""
    w_BNW = _blocks(w_BV, 0.0)
    block_BC = _invert(w_BNW.sum(-1)[:, None, :], u_BC2[..., 0])
    w_BCW = w_BNW[jnp.arange(w_BV.shape[0])[:, None], block_BC]
    return block_BC * W + _invert(w_BCW, u_BC2[..., 1])


# Exact sums in float32 (docs/sampling.md): e = h1 + h2 + h3 + r, h1 on a grid of 2^-8, h2
# of 2^-17, h3 of 2^-26; over <= 2^16 tokens their sums fit 24 bits, exact in any order.
GRIDS = (2.0 ** 8, 2.0 ** 17, 2.0 ** 26)


def _parts(e_BV):
    """The four parts of e_BV and their sums over each row, total_B4."""
    assert e_BV.shape[-1] <= 2 ** 16, "the exact sums hold for at most 65,536 tokens"
    parts = []
    for grid in GRIDS:
        h_BV = jnp.floor(e_BV * grid + 0.5) / grid                # a multiple of 1/grid within (1+2^-20)/(2·grid)
        parts.append(h_BV)
        e_BV = e_BV - h_BV
    parts.append(e_BV)
    return parts, jnp.stack([h.sum(-1) for h in parts], axis=-1)


def _split_p(p):
    """p (a Python float, i.e. float64) as three float32s p1 + p2 + p3, p1 and p2 with 12
    significant bits, so p1·z and p2·z are exact for a float32 z cut into 12-bit halves."""
    out = []
    for _ in range(2):
        m, e = math.frexp(p)
        out.append(math.ldexp(round(m * 4096) / 4096, e))
        p -= out[-1]
    return np.array(out + [p], np.float32)


def _below_p(mass_C4, total_4, p3):
    """mass < p · total, both given as their four exact-split sums: the sign of
    mass - p·total summed in float32 pairs (sum + error) from exact products."""
    def halves(z):
        hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(z, jnp.int32) & -4096, jnp.float32)
        return hi, z - hi                                       # 12 significant bits each
    terms = [mass_C4[..., i] for i in range(4)]
    for i in range(4):
        z = total_4[..., i]
        terms += [-p * h for p in p3[:2] for h in halves(z)] + [-p3[2] * z]
    s, c = terms[0], jnp.zeros_like(terms[0])
    for t in terms[1:]:                                        # two-sum: s + t == s_new + error, exactly
        s_new = s + t
        t_virtual = s_new - s
        s, c = s_new, c + (s - (s_new - t_virtual)) + (t - t_virtual)
    return s + c < 0


def _scaled(logits_BV, temperature, top_k):
    """Temperature, then top-k (ties with the k-th stay): the logits x_BV, -inf where
    filtered out, and their unnormalised probabilities e_BV = exp(x - max) in [0, 1]."""
    x_BV = logits_BV / temperature
    if top_k < x_BV.shape[-1]:
        x_BV = jnp.where(x_BV >= _top_k_floor(x_BV, top_k), x_BV, -jnp.inf)
    return x_BV, jnp.exp(x_BV - x_BV.max(axis=-1, keepdims=True))


def _in_nucleus(x_BV, parts, total_B4, x_BC, p3):
    """Whether each candidate logit x_BC is in its row's nucleus: the tokens with larger
    logits hold less than p of the mass (p3 = _split_p(p)), from the exact sums of `_parts`.
    `_pick` needs it only for candidates that `_float32_verdict` cannot decide."""
    above_BCV = x_BV[:, None, :] > x_BC[..., None]
    mass_BC4 = jnp.stack([jnp.where(above_BCV, h[:, None, :], 0.0).sum(-1) for h in parts], axis=-1)
    return _below_p(mass_BC4, total_B4[:, None, :], p3)


def _two_level_sum(w_BNW):
    """Float32 sums over the last two axes, (..., N, W) -> (...): each block's W values, then
    the N block sums. In whatever order XLA adds, every value goes through at most
    k = (W - 1) + (N - 1) roundings, so the result is within γ = k·u / (1 - k·u) of the exact
    sum of these nonnegative values (u = 2^-24; Higham, "Accuracy and Stability of Numerical
    Algorithms", 2nd ed., §4.2 and Lemma 3.3)."""
    # The barrier keeps XLA from merging the two reductions into one, whose bound would be k = N·W - 1.
    return jax.lax.optimization_barrier(w_BNW.sum(-1)).sum(-1)


def _float32_verdict(x_BNW, e_BNW, total_B, x_BC, p3):
    """_in_nucleus from plain float32 sums, given the blocked x and e (`_blocks`) and
    total_B = _two_level_sum(e_BNW): (mass < p·total, whether that verdict is certain). The
    sums' errors are provably below 4γ·total (docs/sampling.md), so a float32 gap
    `mass - p·total` larger than that has the sign of the exact one."""
    mass_BC = _two_level_sum(jnp.where(x_BNW[:, None] > x_BC[..., None, None], e_BNW[:, None], 0.0))
    gap_BC = mass_BC - p3.sum() * total_B[:, None]                # p3.sum() is within 3u·p of p
    k = W + x_BNW.shape[1] - 2
    margin = np.float32(4 * k * 2.0 ** -24 / (1 - k * 2.0 ** -24))  # 4γ
    return gap_BC < 0, jnp.abs(gap_BC) > margin * total_B[:, None]


def _pick(logits_BV, key, knobs, mode):
    """The next token per row; knobs = (temperature, _split_p(top_p)), mode = _mode(...).

    Top-p is rejection sampling (docs/sampling.md): draw candidates from the distribution
    restricted to logits above `floor`, keep the first in the nucleus; a rejected one lies
    below the nucleus, so the floor rises to it. What comes out has probability
    e_c / (nucleus mass) for each nucleus token, and nothing else does.
    """
    n_real = min(logits_BV.shape[-1], data.VOCAB_SIZE)              # the model pads its head to 51,200
    logits_BV = jnp.where(jnp.arange(logits_BV.shape[-1]) < n_real, logits_BV, -jnp.inf)
    if mode[0] == "greedy":
        return _argmax(logits_BV)
    _, top_k, nucleus = mode
    temperature, p3 = knobs
    x_BV, e_BV = _scaled(logits_BV, temperature, top_k)
    B = x_BV.shape[0]
    if not nucleus:
        return _draw(e_BV, jax.random.uniform(key, (B, 1, 2)))[:, 0]
    x_BNW, e_BNW = _blocks(x_BV, -jnp.inf), _blocks(e_BV, 0.0)
    total_B = _two_level_sum(e_BNW)

    def round_(s, first=False):                                    # the first round has no floor yet
        u_BC2 = jax.random.uniform(jax.random.fold_in(key, s["round"]), (B, CANDIDATES, 2))
        cand_BC = _draw(e_BV if first else jnp.where(x_BV > s["floor"][:, None], e_BV, 0.0), u_BC2)
        x_BC = jnp.take_along_axis(x_BV, cand_BC, axis=1)
        below_BC, sure_BC = _float32_verdict(x_BNW, e_BNW, total_B, x_BC, p3)
        ok_BC = jax.lax.cond(jnp.any(~sure_BC & ~s["done"][:, None]),  # rare: then the exact test decides
                             lambda: _in_nucleus(x_BV, *_parts(e_BV), x_BC, p3), lambda: below_BC)
        first_B = jnp.min(jnp.where(ok_BC, jnp.arange(CANDIDATES), CANDIDATES), axis=-1)
        got_B = jnp.take_along_axis(cand_BC, jnp.minimum(first_B, CANDIDATES - 1)[:, None], axis=1)[:, 0]
        new = ~s["done"] & (first_B < CANDIDATES)
        return {"tok": jnp.where(new, got_B, s["tok"]), "done": s["done"] | new, "round": s["round"] + 1,
                "floor": jnp.where(s["done"] | new, s["floor"], x_BC.max(-1))}

    start = {"tok": jnp.zeros(B, jnp.int32), "done": jnp.zeros(B, bool), "round": jnp.zeros((), jnp.int32),
             "floor": jnp.full(B, -jnp.inf)}
    return jax.lax.while_loop(lambda s: ~jnp.all(s["done"]), round_, round_(start, first=True))["tok"]


def _mode(temperature, top_k, top_p):
    """The static part of the sampling settings (a new k compiles anew; a new temperature or p does not)."""
    if temperature == 0:
        return ("greedy",)
    return ("sample", top_k or 1 << 30, top_p < 1)


# ----------------------------------------------------------------------------- compiled prefill and decode
# Decode state, all on the device: the KV cache, the output buffer `out_BN` (new tokens,
# EOS after a row is done), `done_B`, and `n`, the number of new tokens so far.
# The random key for new token i is fold_in(key, i), so results do not depend on CHUNK.

@partial(jax.jit, static_argnames=("config", "new_bucket", "num_samples", "mode"))
def _prefill(params, prompt_PT, valid_PT, key, knobs, *, config, new_bucket, num_samples, mode):
    P, T = prompt_PT.shape
    cache = model.init_cache(config, P, T + new_bucket, params["wte"].dtype)
    # All but the last token only fill the cache: XLA drops their unused head matmul.
    _, cache = model.forward(params, prompt_PT[:, :-1], config, valid_BT=valid_PT[:, :-1], cache=cache)
    logits_P1V, cache = model.forward(params, prompt_PT[:, -1:], config, cache=cache)  # last token: always real
    rows = partial(jnp.repeat, repeats=num_samples, axis=0)        # prompt p -> rows p·n ... p·n + n-1
    cache = {name: a if name == "length" else jax.tree.map(rows, a) for name, a in cache.items()}
    tok_B = _pick(rows(logits_P1V[:, 0]), jax.random.fold_in(key, 0), knobs, mode)
    out_BN = jnp.full((P * num_samples, new_bucket), data.EOS, jnp.int32).at[:, 0].set(tok_B)
    return _laid_out({"cache": cache, "out": out_BN, "done": tok_B == data.EOS, "n": jnp.ones((), jnp.int32)})


def _laid_out(state):
    """Under generate's mesh (jax.set_mesh), the decode state split as tpu.decode_specs says."""
    meshed = jax.sharding.get_abstract_mesh().axis_names
    return jax.lax.with_sharding_constraint(state, tpu.decode_specs(state)) if meshed else state


@partial(jax.jit, static_argnames=("config", "mode"), donate_argnames=("state",), compiler_options=IN_PLACE)
def _decode(params, state, limit, key, knobs, *, config, mode):
    """Decode until `n == limit` or every row is done; the state's buffers are reused in place."""
    def not_finished(s):
        return (s["n"] < limit) & ~jnp.all(s["done"])

    def step(s):
        last_B1 = jax.lax.dynamic_slice_in_dim(s["out"], s["n"] - 1, 1, axis=1)
        logits_B1V, cache = model.forward(params, last_B1, config, cache=s["cache"])
        tok_B = _pick(logits_B1V[:, 0], jax.random.fold_in(key, s["n"]), knobs, mode)
        tok_B = jnp.where(s["done"], data.EOS, tok_B)
        out = jax.lax.dynamic_update_slice_in_dim(s["out"], tok_B[:, None], s["n"], axis=1)
        return _laid_out({"cache": cache, "out": out, "done": s["done"] | (tok_B == data.EOS), "n": s["n"] + 1})

    return jax.lax.while_loop(not_finished, step, state)


# ----------------------------------------------------------------------------- host side

def _check(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples):
    """One-line ValueErrors for every input a caller can get wrong."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list, got {type(prompts).__name__}: wrap one prompt as [prompt]")
    for bad, message in ((max_new_tokens < 1, f"max_new_tokens must be >= 1, got {max_new_tokens}"),
                         (temperature < 0, f"temperature must be >= 0 (0 = greedy), got {temperature}"),
                         (not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
                         (top_k < 0, f"top_k must be >= 0 (0 = off), got {top_k}"),
                         (num_samples < 1, f"num_samples must be >= 1, got {num_samples}")):
        if bad:
            raise ValueError(message)
    room = config.n_ctx + 1 - max_new_tokens     # the last new token is never fed back, so it needs no slot
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple, np.ndarray)):
            raise ValueError(f"prompts must be a list of token-id lists; prompt {i} is {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if len(p) > room:
            raise ValueError(f"prompt {i} has {len(p)} tokens and max_new_tokens is {max_new_tokens}, but the "
                             f"context holds {config.n_ctx} (+1 for the last new token): keep prompts <= "
                             f"{max(room, 0)} tokens or lower max_new_tokens")
        if min(p) < 0 or max(p) >= config.vocab_size:
            raise ValueError(f"prompt {i} has a token id outside [0, {config.vocab_size})")


def _first_stop(text, stop):
    """Index of the earliest occurrence of any stop string in `text`, or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def _before_eos(ids):
    ids = list(map(int, ids))
    return ids[:ids.index(data.EOS)] if data.EOS in ids else ids


def generate(params, config, prompts, max_new_tokens, temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, until=None, mesh=None):
    """Sample continuations of token-id prompts: len(prompts) * num_samples lists of NEW
    token ids (all samples of prompt 0, then of prompt 1, ...), each ending before EOS.
    temperature=0 is greedy; top_k=0 and top_p=1 are off; the same seed gives the same
    samples. `params` as hf.load_hf gives them or `prepare`d (as `load` does: faster to reuse).
    `until(ids) -> bool`, checked on the host every CHUNK tokens, ends a row early (its ids may run
    up to CHUNK tokens past the point it first said True; `complete` cuts the text). `mesh`: above."""
    _check(config, prompts, max_new_tokens, temperature, top_p, top_k, num_samples)
    if not prompts:
        return []
    params = model.decoding_layout(params)                         # a no-op for load()'s params
    d = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    padded = list(prompts) + [prompts[0]] * (-len(prompts) % (d // math.gcd(d, num_samples)))  # rows % d == 0
    T = _bucket(max(len(p) for p in prompts))
    prompt_PT, valid_PT = np.zeros((len(padded), T), np.int32), np.zeros((len(padded), T), bool)
    for i, p in enumerate(padded):                                 # left padding
        prompt_PT[i, T - len(p):], valid_PT[i, T - len(p):] = p, True
    padding_B = np.arange(len(padded) * num_samples) >= len(prompts) * num_samples   # done from the start
    if mesh is not None:
        tpu.check_layout(config, mesh, len(padding_B))
        params = jax.device_put(params, tpu.param_shardings(params, mesh))
        rows = PartitionSpec(tpu.BATCH_AXES if len(padded) % d == 0 else None)
        prompt_PT, valid_PT = jax.device_put((prompt_PT, valid_PT), NamedSharding(mesh, rows))

    how = dict(config=config, mode=_mode(temperature, top_k, top_p))
    args = (jax.random.PRNGKey(seed), (jnp.float32(temperature or 1), jnp.asarray(_split_p(top_p))))
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        state = _prefill(params, prompt_PT, valid_PT, *args, new_bucket=_bucket(max_new_tokens),
                         num_samples=num_samples, **how)
        chunk = CHUNK if until else max_new_tokens                 # no check: one call does it all
        while True:
            n, done, out = jax.device_get((state["n"], state["done"], state["out"]))
            ended = padding_B.copy()
            if until:
                ended |= np.array([not e and until(_before_eos(o[:n])) for e, o in zip(done, out)])
            if (ended & ~done).any():
                done = done | ended
                state["done"] = jax.device_put(done, state["done"].sharding)
            if n >= max_new_tokens or done.all():
                return [_before_eos(o[:n]) for o in out[:len(prompts) * num_samples]]
            state = _decode(params, state, jnp.int32(min(n + chunk, max_new_tokens)), *args, **how)


def _until_stop(stop, tok):
    """An `until` for generate: has the row's text come to hold one of the stop strings?"""
    return (lambda ids: _first_stop(tok.decode(ids, skip_special_tokens=False), stop) is not None) if stop else None


def complete(params, config, texts, max_new_tokens, *, stop=(), temperature=0.0, top_p=1.0, top_k=0, seed=0,
             num_samples=1, mesh=None):
    """Text in, completion text out (ordered as `generate`), cut exactly before the first
    stop string and before `<|endoftext|>`; decoding of a row ends soon after its stop.
    `stop`: one string or a list of them."""
    if isinstance(texts, str):
        raise ValueError("complete() takes a list of texts, got one str: pass [text]")
    stop = [stop] if isinstance(stop, str) else list(stop)   # one str is one stop string
    tok = data.get_tokenizer()
    rows = generate(params, config, [tok.encode(t).ids for t in texts], max_new_tokens, temperature=temperature,
                    top_p=top_p, top_k=top_k, seed=seed, num_samples=num_samples, until=_until_stop(stop, tok),
                    mesh=mesh)
    return [_text_before_stop(ids, stop, tok) for ids in rows]


def _text_before_stop(ids, stop, tok):
    text = tok.decode(ids, skip_special_tokens=False)
    end = _first_stop(text, (*stop, "<|endoftext|>"))
    return text if end is None else text[:end]


def prepare(params, dtype="float32"):
    """Parameters as decoding wants them: cast to `dtype` and in model.decoding_layout,
    once, instead of on every generate call."""
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    return model.decoding_layout(model.cast(params, jnp.dtype(dtype)))


def load(path, dtype="float32", mesh=None):
    """(config, params) ready to decode: the checkpoint at `path` (hf.load_hf) `prepare`d;
    on a `mesh`'s devices, each its shards."""
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}; run `python train.py` first or pass --init-from DIR")
    config, params = hf.load_hf(path)
    params = prepare(params, dtype)                                # numpy, on the host
    if mesh is not None:
        tpu.check_layout(config, mesh, mesh.shape["data"] * mesh.shape["fsdp"])
    return config, params if mesh is None else jax.device_put(params, tpu.param_shardings(params, mesh))


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


def main(argv=None):
    p = common.ArgumentParser(description="Sample code from a CodeGen checkpoint.")
    p.add_argument("--init-from", default=os.path.join("out", "nano"),
                   help="checkpoint directory (Hugging Face CodeGen or written by train.py)")
    p.add_argument("--prompt", default="def helloworld():", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from this file instead of --prompt ('-': standard input)")
    p.add_argument("--num-samples", type=int, default=1, help="completions per prompt (one prefill for all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per completion")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass; 1 = off")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--stop", action="append", default=[],
                   help=r"stop string, repeatable; \n and \t mean newline and tab (e.g. --stop '\ndef')")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights while decoding")
    p.add_argument("--mesh", help="DPxFSDPxMP mesh of this process's devices (tpu.py); None: one device")
    p.add_argument("--dry-run", action="store_true", help="only plan: compile prefill and decode (--num-samples rows, "
                   "longest prompt) of --size on --mesh, print the memory per device; nothing is loaded")
    p.add_argument("--size", choices=tuple(model.CONFIGS), default="nano", help="for --dry-run: model preset")
    p.add_argument("--topology", help="for --dry-run: compile with XLA:TPU for this TPU slice, e.g. v4:2x2x1 "
                   "(pip install libtpu); None: this machine's devices, simulated on CPU if fewer")
    p.add_argument("--device-memory", type=float, help="GiB per device, for --dry-run; None: the TPU chip's HBM")
    args = p.parse_args(argv)
    args.stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    try:                                                           # flag values, before loading anything
        _check(model.CONFIGS["nano"], [], args.max_new_tokens, args.temperature, args.top_p, args.top_k,
               args.num_samples)
    except ValueError as e:                                        # "top_p must be ..." -> "--top-p must be ..."
        name, rest = str(e).split(" ", 1)
        raise ValueError(f"{common.flag_names([name])} {rest}") from None
    if args.dry_run:  # fewer devices than the mesh: re-runs this command on CPU with enough simulated ones
        plan.ensure_fake_devices(args.mesh, args.topology)
        steps = dict(prepare=prepare, prefill=_prefill, decode=_decode.__wrapped__, bucket=_bucket)
        return print(plan.sample_dry_run(model.CONFIGS[args.size], args.dtype, args.mesh, args.topology,
                                         args.num_samples, args.max_new_tokens,
                                         _mode(args.temperature, args.top_k, args.top_p), args.device_memory, **steps))
    if args.topology:
        raise ValueError("--topology only plans (nothing runs on its devices): add --dry-run")
    mesh = tpu.make_mesh(args.mesh, jax.local_devices()) if args.mesh else None
    config, params = load(args.init_from, args.dtype, mesh)
    how = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    tok = data.get_tokenizer()

    if args.prompt_file:
        args.prompt = read_prompt(args.prompt_file)
    prompt = tok.encode(args.prompt).ids
    compiling = []                                                 # seconds JAX spends tracing and compiling

    def on_event(event, seconds, **_):
        if event.startswith("/jax/core/compile/"):
            compiling.append(seconds)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    t0 = time.perf_counter()
    try:
        rows = generate(params, config, [prompt], args.max_new_tokens, seed=args.seed, num_samples=args.num_samples,
                        until=_until_stop(args.stop, tok), mesh=mesh, **how)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_event)
    seconds = time.perf_counter() - t0
    for i, ids in enumerate(rows):
        print(f"{'-' * 30} sample {i + 1}/{len(rows)}")
        print(args.prompt + _text_before_stop(ids, args.stop, tok))
    n_new = sum(map(len, rows))  # tokens generated, including any past a stop string
    compiled = min(sum(compiling), seconds)
    print(f"{'-' * 30}\nprompt tokens {len(prompt)}, new tokens {n_new}, {seconds:.2f} s, {n_new / seconds:.1f} "
          f"tokens/s; without the {compiled:.2f} s of compilation {n_new / max(seconds - compiled, 1e-9):.1f} tokens/s")


if __name__ == "__main__":
    common.run_main(main)
