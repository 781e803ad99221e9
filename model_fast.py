"""The fast lanes of model.py, each held equal to its plain twin by
tests/test_model_fast.py. Read model.py first: this file reuses its
layer norm, rotary embedding and attention, and changes only how the
work is laid out.

Decoding (sample.py's default; `forward`, `init_cache`):
  - weights in `decoding_layout`: the stacked layers split into a list,
    unrolled, and the matrices stored [out, in], multiplied as w·xᵀ
    (`_times`), the product XLA:CPU runs fastest for a few rows;
  - each layer's cache its own buffer, written in place;
  - a fresh cache (`init_cache`'s `length` is the Python 0) is not
    attended to at all: the prefill scores its T tokens against each
    other only.
  - optionally (`quantized`, sample.py's --dtype int8) the matrices
    in int8 with a scale per output channel, multiplied int8 x int8
    with each row of activations quantized on the fly; the
    activations stay float32.

Training (train.py's default; `loss_fn`): `head_loss` walks the tokens
C at a time and computes each chunk's loss and gradient in one pass
while its logits are in cache, instead of the full (N, V) logits.

docs/training.md has the measurements behind each choice.
"""
from functools import partial

import jax
import jax.numpy as jnp

import model

# ----------------------------------------------------------------------------- decoding layout

# A decode step multiplies each weight by a few rows, which XLA:CPU
# does faster as w·xᵀ with w stored [out, in] than as x·w with w
# [in, out] (docs/model.md, "The fast twin"; docs/performance.md).
TRANSPOSED_FOR_DECODING = ("wq", "wk", "wv", "wo", "w_in", "w_out",
                           "head_w")


def in_decoding_layout(params):
    """Whether `params` are decoding_layout's output (their layers a
    per-layer list), not stacked."""
    return isinstance(params.get("layers"), list)


def _flip(tree):
    """The matrices of one dict stored [out, in]; .copy(): numpy's
    transpose is a strided view, made a contiguous array."""
    out = {}
    for name, a in tree.items():
        if name in TRANSPOSED_FOR_DECODING:
            out[name] = a.T.copy()
        else:
            out[name] = a
    return out


def decoding_layout(params):
    """`params` as the decoding forward uses them: the stacked (L, ...)
    layer weights split into L per-layer dicts and the matrices above
    stored [out, in]; a no-op on its own output."""
    if in_decoding_layout(params):
        return params
    stacked = params["layers"]
    L = len(stacked["wq"])
    layers = []
    for i in range(L):
        layer = jax.tree.map(lambda a: a[i], stacked)  # noqa: B023
        layers.append(_flip(layer))
    return _flip({**params, "layers": layers})


def _times(x, w_OI, dtype=None):
    """x @ w_OI.T for a weight in decoding_layout, written w·xᵀ: the
    product XLA:CPU runs fastest; an int8 weight (`quantize`'s) by
    `_int8_times`. XLA:CPU multiplies a single row by an int8 or
    bfloat16 matrix with a slow kernel and two rows with its fast
    one, so one row gets a row of zeros beside it."""
    if x.size == x.shape[-1] and _narrow(w_OI):
        x2 = jnp.concatenate([x, jnp.zeros_like(x)])
        return _times(x2, w_OI, dtype)[:1]
    if _is_int8(w_OI):
        return _int8_times(x, w_OI)
    y = jnp.einsum("oi,...i->o...", w_OI, x,
                   preferred_element_type=dtype)
    return jnp.moveaxis(y, 0, -1)


def _narrow(w_OI):
    """Whether a weight is stored narrower than float32."""
    return _is_int8(w_OI) or w_OI.dtype != jnp.float32


def _is_int8(w_OI):
    """Whether a weight is quantize's {"int8", "scale"}."""
    return isinstance(w_OI, dict)


# ----------------------------------------------------------------------------- int8 weights
# A decode step reads every weight once per token, so it is bound by
# the bytes the weights take: int8 takes a quarter of float32's.
# `quantized` stores each matrix of decoding_layout as int8 with one
# float32 scale per output channel (per row of w_OI); the product
# quantizes each row of activations the same way on the fly, sums
# int8 x int8 in int32 and applies both scales to the result: the
# vector-wise quantization of LLM.int8() (Dettmers et al., 2022),
# as CTranslate2's int8 does. The embedding stays float32: a step
# reads one of its rows per sequence, and it sets the activations'
# (and the KV cache's) dtype. docs/sampling.md.

def _symmetric(a, axis):
    """(int8 q, float32 scale) with a ≈ q · scale: along `axis`, the
    largest |a| maps to 127 (an all-zero slice keeps scale 1)."""
    top = jnp.max(jnp.abs(a), axis=axis, keepdims=True)
    scale = jnp.where(top > 0, top / 127, 1.0)
    q = jnp.round(a / scale).astype(jnp.int8)
    return q, scale


def quantize(w_OI):
    """A float matrix stored [out, in] as {"int8": q_OI, "scale":
    s_O}: w ≈ q · s[:, None], per output channel."""
    q_OI, scale_O1 = _symmetric(jnp.asarray(w_OI, jnp.float32), 1)
    return {"int8": q_OI, "scale": scale_O1[:, 0]}


def dequantize(w):
    """quantize's float32 matrix back: q · s[:, None]."""
    return w["int8"].astype(jnp.float32) * w["scale"][:, None]


def quantized(params):
    """float32 params in decoding_layout with every matrix of
    TRANSPOSED_FOR_DECODING (the layers' and the head's) quantized;
    the rest, and with it the activations, stays float32."""
    def matrices(tree):
        out = dict(tree)
        for name in TRANSPOSED_FOR_DECODING:
            if name in tree:
                out[name] = quantize(tree[name])
        return out
    layers = [matrices(p) for p in params["layers"]]
    return matrices({**params, "layers": layers})


def is_quantized(params):
    """Whether `params` are quantized's (their head is int8)."""
    return _is_int8(params["head_w"])


def _int8_times(x, w):
    """x @ dequantize(w).T, float32: x's rows quantized per row, the
    product int8 x int8 summed in int32, then both scales."""
    x_NI = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    q_NI, scale_N1 = _symmetric(x_NI, 1)
    y_NO = jax.lax.dot_general(
        q_NI, w["int8"], (((1,), (1,)), ((), ())),
        preferred_element_type=jnp.int32)
    y_NO = y_NO.astype(jnp.float32) * scale_N1 * w["scale"]
    return y_NO.reshape(*x.shape[:-1], -1)


def weight_bytes(params):
    """Bytes the weights take (what decoding keeps resident); arrays
    or their shapes (jax.eval_shape's)."""
    total = 0
    for a in jax.tree.leaves(params):
        total += a.size * jnp.dtype(a.dtype).itemsize
    return total


# ----------------------------------------------------------------------------- decoding forward

def init_cache(config, batch, max_len, dtype=jnp.float32):
    """Empty KV cache: per layer, keys and values (B, H, S, hd) of
    their own; `valid`, `pos` as model.init_cache; `length`, here the
    Python 0, so the forward that fills it knows while tracing that
    it holds nothing to attend to."""
    H = config.n_head
    shape = (batch, H, max_len, config.head_dim)
    k = [jnp.zeros(shape, dtype) for _ in range(config.n_layer)]
    v = [jnp.zeros(shape, dtype) for _ in range(config.n_layer)]
    state = {"k": k, "v": v,
             "valid": jnp.zeros((batch, max_len), bool),
             "pos": jnp.zeros(batch, jnp.int32)}
    # Behind a barrier: seeing these zeros as constants, XLA:TPU
    # planned twice the prefill's temporaries.
    return jax.lax.optimization_barrier(state) | {"length": 0}


def _block(x_BTD, p, sin, cos, mask_BTT, config, past_kv):
    """model._block for decoding: weights [out, in]; past_kv =
    (k_cache, v_cache, cache_valid_BS, start). The T tokens attend to
    the cache as it was (its valid slots, all earlier; nothing if it
    is fresh, `start` the Python 0) and to each other; then their
    keys/values are written into it at slot `start`."""
    B, T, D = x_BTD.shape
    eps = config.layer_norm_epsilon
    h = model._layer_norm(x_BTD, p["ln_scale"], p["ln_bias"], eps)

    q_BTD = _times(h, p["wq"])
    k_BTD = _times(h, p["wk"])
    v_BTD = _times(h, p["wv"])
    q, k, v = model._qkv_heads(q_BTD, k_BTD, v_BTD, sin, cos, config)

    k_cache, v_cache, cache_valid_BS, start = past_kv
    if isinstance(start, int):                     # a fresh cache
        o = model._attend(q, k, v, mask_BTT)
    else:
        o = _attend_cached(q, k, v, mask_BTT, k_cache, v_cache,
                           cache_valid_BS)
    k, v = model._write_cache(k_cache, v_cache, k, v, start)
    attn = _times(o.reshape(B, T, D), p["wo"])

    up = _times(h, p["w_in"]) + p["b_in"]
    up = jax.nn.gelu(up, approximate=True)
    mlp = _times(up, p["w_out"]) + p["b_out"]
    return x_BTD + attn + mlp, (k, v)


def _attend_cached(q, k, v, mask_BTT, k_cache, v_cache, valid_BS):
    """Attention to the S cache slots as they were and to the T new
    tokens, without writing the new ones into the cache first: one
    softmax over S + T scores, (B, T, H, hd)."""
    S = k_cache.shape[2]
    old = model._scores(q, k_cache, valid_BS[:, None])
    new = model._scores(q, k, mask_BTT)
    s_BHTX = jnp.concatenate([old, new], -1)       # X = S + T
    probs = jax.nn.softmax(s_BHTX, axis=-1).astype(v.dtype)
    o_old = jnp.einsum("bhts,bhsd->bthd", probs[..., :S], v_cache)
    o_new = jnp.einsum("bhts,bhsd->bthd", probs[..., S:], v)
    return o_old + o_new


def forward(params, tokens_BT, config, *, cache, valid_BT=None,
            mesh=None):
    """model.forward with a cache (init_cache's), the decoding way:
    (logits (B, T, V) float32, updated cache). `params` in either
    layout (sample.prepare's are already in decoding_layout)."""
    params = decoding_layout(params)
    x_BTD, cache = _trunk(params, tokens_BT, config, valid_BT, cache,
                          mesh)
    w = params["head_w"]
    logits = _times(x_BTD, w, jnp.float32) + params["head_b"]
    return logits, cache


def _trunk(params, tokens_BT, config, valid_BT, cache, mesh):
    """model._trunk for decoding: the layers unrolled, each with its
    own cache buffers updated in place (docs/model.md)."""
    B, T = tokens_BT.shape
    model.check_length(T, config)
    if valid_BT is None:
        valid_BT = jnp.ones((B, T), bool)
    seen_B = cache["pos"]
    pos_BT = model._positions(seen_B, valid_BT)
    sin, cos = model._sin_cos(pos_BT, config)
    mask_BTT = model._causal_mask(valid_BT)
    block = partial(_block, sin=sin, cos=cos, mask_BTT=mask_BTT,
                    config=config)
    x = model.split_batch(params["wte"][tokens_BT], mesh)  # (B,T,D)
    start = cache["length"]
    new_k = []
    new_v = []
    for i, p in enumerate(params["layers"]):
        past = (cache["k"][i], cache["v"][i], cache["valid"], start)
        x, (k, v) = block(x, p, past_kv=past)
        new_k.append(k)
        new_v.append(v)
    valid_BS = jax.lax.dynamic_update_slice(
        cache["valid"], valid_BT, (0, start))
    n_real_B = valid_BT.sum(1, dtype=jnp.int32)
    cache = {"k": new_k, "v": new_v, "valid": valid_BS,
             "pos": seen_B + n_real_B,
             "length": jnp.asarray(start + T, jnp.int32)}
    lnf = (params["lnf_scale"], params["lnf_bias"])
    eps = config.layer_norm_epsilon
    return model._layer_norm(x, *lnf, eps), cache


# ----------------------------------------------------------------------------- chunked head loss

def loss_fn(params, windows_BW, config, z_loss=0.0, remat=False,
            mesh=None):
    """model.loss_fn with the head's loss computed by head_loss."""
    inputs_BT = windows_BW[:, :-1]
    x_BTD, _ = model._trunk(params, inputs_BT, config, None, None,
                            remat, mesh)
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    targets_N = windows_BW[:, 1:].reshape(-1)
    return head_loss(x_ND, params["head_w"], params["head_b"],
                     targets_N, z_loss)


# The head's (N x V) logits outweigh the rest of a small model, so
# `head_loss` walks the tokens C at a time and, differentiated,
# computes each chunk's loss *and* gradient in one pass while its
# logits are in cache (docs/training.md). On CPU: 128 x 51,200
# floats = 26 MB, cache-sized.
HEAD_CHUNK = {"cpu": 128}


def _chunks(x_ND, targets_N):
    """Tokens in G chunks of C, the last padded with rows of weight 0
    (the rest 1/N)."""
    N, D = x_ND.shape
    C = min(HEAD_CHUNK.get(jax.default_backend(), 4096), N)
    pad = -N % C
    real = jnp.arange(N + pad) < N
    weight_GC = (real / N).reshape(-1, C).astype(jnp.float32)
    x_GCD = jnp.pad(x_ND, ((0, pad), (0, 0))).reshape(-1, C, D)
    y_GC = jnp.pad(targets_N, (0, pad)).reshape(-1, C)
    return x_GCD, y_GC, weight_GC


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_loss(x_ND, w_DV, b_V, targets_N, z_loss):
    """mean over N of model.cross_entropy(x @ w + b, targets), one
    chunk of logits at a time."""
    def chunk(xs):
        x_CD, y_C, weight_C = xs
        logits_CV = jnp.dot(x_CD, w_DV,
                            preferred_element_type=jnp.float32) + b_V
        loss_C = model.cross_entropy(logits_CV, y_C, z_loss)
        return jnp.sum(weight_C * loss_C)
    return jax.lax.map(chunk, _chunks(x_ND, targets_N)).sum()


def _head_loss_and_grads(x_ND, w_DV, b_V, targets_N, z_loss):
    """head_loss and its gradients with respect to x, w and b, in one
    pass over the chunks."""
    x_GCD, y_GC, weight_GC = _chunks(x_ND, targets_N)
    # Transposed once, not as a matmul operand in the loop (2x
    # slower on CPU).
    xT_GDC = jnp.swapaxes(x_GCD, 1, 2)
    f32 = jnp.float32

    def chunk(carry, xs):
        loss_sum, dw_DV, db_V = carry
        x_CD, xT_DC, y_C, weight_C = xs
        logits_CV = jnp.dot(x_CD, w_DV, preferred_element_type=f32)
        logits_CV = logits_CV + b_V
        top_C = logits_CV.max(axis=-1)
        # computed once, for both the sum and the gradient
        e_CV = jnp.exp(logits_CV - top_C[:, None])
        sum_C = e_CV.sum(axis=-1)
        lse_C = top_C + jnp.log(sum_C)
        target_C = jnp.take_along_axis(logits_CV, y_C[:, None],
                                       axis=-1)[:, 0]
        loss_C = lse_C - target_C + z_loss * lse_C ** 2
        loss_sum += jnp.sum(weight_C * loss_C)
        # d(loss of a token)/d(its logits) =
        # softmax · (1 + 2·z·lse) − onehot(target); the weights (1/N,
        # 0 for padding) scale the small operands, not this big array
        # (docs/training.md).
        V = logits_CV.shape[1]
        is_target_CV = jnp.arange(V)[None, :] == y_C[:, None]
        scale_C = (1 + 2 * z_loss * lse_C) / sum_C
        d_CV = e_CV * scale_C[:, None] - is_target_CV
        dx_CD = jnp.dot(d_CV.astype(w_DV.dtype), w_DV.T,
                        preferred_element_type=f32)
        dx_CD = dx_CD * weight_C[:, None]
        xw_DC = (xT_DC * weight_C).astype(x_CD.dtype)
        dw_DV += jnp.dot(xw_DC, d_CV.astype(x_CD.dtype),
                         preferred_element_type=f32)
        db_V = db_V + jnp.dot(weight_C, d_CV)
        return (loss_sum, dw_DV, db_V), dx_CD.astype(x_ND.dtype)

    zeros = (jnp.zeros((), f32),
             jnp.zeros(w_DV.shape, f32),
             jnp.zeros(b_V.shape, f32))
    xs = (x_GCD, xT_GDC, y_GC, weight_GC)
    sums, dx_GCD = jax.lax.scan(chunk, zeros, xs)
    loss_sum, dw_DV, db_V = sums
    N, D = x_ND.shape
    dx_ND = dx_GCD.reshape(-1, D)[:N]
    grads = (dx_ND, dw_DV.astype(w_DV.dtype), db_V.astype(b_V.dtype))
    return loss_sum, grads


def _head_loss_bwd(z_loss, grads, g):
    """The backward pass only scales the gradients the forward pass
    already computed."""
    dx, dw, db = grads
    return ((g * dx).astype(dx.dtype),
            (g * dw).astype(dw.dtype),
            (g * db).astype(db.dtype),
            None)


head_loss.defvjp(_head_loss_and_grads, _head_loss_bwd)
