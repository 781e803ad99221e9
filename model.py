"""CodeGen in plain JAX: config, parameters, forward pass with a KV cache, and loss.
(Checkpoints, ours and the released ones, are read and written by hf.py.)

CodeGen (Nijkamp et al., ICLR 2023, §2.2) is a GPT-J-style decoder:

    h = wte[tokens]                                  # no position embedding
    for each layer:                                  # a jax.lax.scan; unrolled when decoding
        x = LayerNorm(h)                             # ONE norm feeds both branches
        h = h + Attention(x) + MLP(x)                # parallel residual
    logits = LayerNorm(h) @ head_w + head_b          # untied head, with a bias

Attention rotates the first `rotary_dim` dims of every query/key head with GPT-J's
interleaved rotary embedding and does its softmax in float32; the MLP is
Linear(4D) -> gelu(tanh) -> Linear(D), both with biases.

Parameters are a plain nested dict of arrays (no framework), weights as JAX kernels
`[in, out]`; per-layer weights are stacked on a leading layer axis so one `scan` runs them
all and a 34-layer model compiles as fast as a 2-layer one. Decoding takes them laid out
its own way (`decoding_layout`: split per layer, matrices `[out, in]`).

Shapes are written into names (`x_BTD`) with these letters:

    B batch rows          T tokens in the input     W = T + 1 tokens in a training window
    S key/value slots     D n_embd                  H n_head        hd head_dim = D / H
    r rotary_dim / 2      F d_ff = 4 D              V vocab_size    L n_layer
    N = B·T tokens flattened for the head    C tokens per head chunk, G chunks    K micro-batches

    python -c "import model; print(model.param_count(model.CONFIGS['350M']))"
"""
import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# ----------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class Config:
    n_layer: int
    n_embd: int
    n_head: int
    rotary_dim: int           # leading dims of each q/k head that get rotary; the rest pass through
    n_ctx: int = 2048         # longest sequence (HF: n_positions)
    vocab_size: int = 51200   # 50,295 tokenizer ids padded to a multiple of the TPU core count
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        def bad(why):
            raise ValueError(f"impossible Config({self.n_layer=}, {self.n_embd=}, {self.n_head=}, "
                             f"{self.rotary_dim=}, {self.n_ctx=}): {why}")
        if min(self.n_layer, self.n_embd, self.n_head, self.n_ctx, self.vocab_size) <= 0:
            bad("every size must be positive")
        if self.n_embd % self.n_head:
            bad("n_embd must be divisible by n_head")
        if self.n_head % MP_NUM:
            bad(f"n_head must be divisible by {MP_NUM} (the released qkv layout has {MP_NUM} blocks)")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            bad(f"rotary_dim must be even and in (0, head_dim={self.head_dim}]")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def d_ff(self):
        return 4 * self.n_embd  # HF n_inner is null in every released config


MP_NUM = 4  # model-parallel blocks baked into the released qkv_proj (TPU-v4: 4 cores per host)
CONFIGS = {
    # Laptop presets: the 51,200-wide head dominates their compute, so they stay shallow.
    "nano": Config(n_layer=4, n_embd=128, n_head=4, rotary_dim=16, n_ctx=256),
    "small": Config(n_layer=8, n_embd=512, n_head=8, rotary_dim=32, n_ctx=1024),
    # The paper's four sizes (its Table 1; the released config.json files and JAXformer configs).
    "350M": Config(n_layer=20, n_embd=1024, n_head=16, rotary_dim=32),
    "2B": Config(n_layer=32, n_embd=2560, n_head=32, rotary_dim=64),
    "6B": Config(n_layer=33, n_embd=4096, n_head=16, rotary_dim=64),
    "16B": Config(n_layer=34, n_embd=6144, n_head=24, rotary_dim=64),
}


def param_count(config, embedding=True):
    """Number of parameters; `embedding=False` drops the input table (a gather, no FLOPs)."""
    D, F, V, L = config.n_embd, config.d_ff, config.vocab_size, config.n_layer
    per_layer = 2 * D + 4 * D * D + (D * F + F) + (F * D + D)  # ln, q/k/v/o, fc_in, fc_out
    return (V * D if embedding else 0) + L * per_layer + 2 * D + (D * V + V)


def flops_per_token(config, seq_len):
    """Training FLOPs per token (forward + backward): 6 per weight plus attention scores, whose
    term 12·L·D·T counts QKᵀ and AV over the whole window (PaLM's convention: no causal discount)."""
    return 6 * param_count(config, embedding=False) + 12 * config.n_layer * config.n_embd * seq_len


# ----------------------------------------------------------------------------- parameters

def init_params(config, key):
    """JAXformer's pre-training init: truncated normal with std 1/sqrt(fan_in); the two
    projections back into the residual stream are scaled by 2/n_layer; biases 0, norms 1."""
    D, F, V, L = config.n_embd, config.d_ff, config.vocab_size, config.n_layer
    keys = iter(jax.random.split(key, 8))

    def normal(shape, std):  # Haiku's TruncatedNormal: cut at 2σ, rescaled to keep σ
        return jax.random.truncated_normal(next(keys), -2.0, 2.0, shape) * (std / 0.87962566)

    out_std = (2.0 / L) / math.sqrt(D)  # JAXformer init_scale / sqrt(model dim), for wo and w_out alike
    return {"wte": normal((V, D), 1 / math.sqrt(V)),
            "layers": {"ln_scale": jnp.ones((L, D)), "ln_bias": jnp.zeros((L, D)),
                       **{w: normal((L, D, D), 1 / math.sqrt(D)) for w in ("wq", "wk", "wv")},
                       "wo": normal((L, D, D), out_std), "w_in": normal((L, D, F), 1 / math.sqrt(D)),
                       "b_in": jnp.zeros((L, F)), "w_out": normal((L, F, D), out_std), "b_out": jnp.zeros((L, D))},
            "lnf_scale": jnp.ones(D), "lnf_bias": jnp.zeros(D),
            "head_w": normal((D, V), 1 / math.sqrt(D)), "head_b": jnp.zeros(V)}


def cast(params, dtype):
    """Compute dtype = the params' dtype; cast a copy (fp32 master weights stay untouched)."""
    return jax.tree.map(lambda a: a.astype(dtype), params)


# ----------------------------------------------------------------------------- forward

def _layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)  # statistics in fp32 whatever the compute dtype
    centred = x32 - x32.mean(-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.square(centred).mean(-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def _rotary(x_BTHd, sin_BTr, cos_BTr):
    """GPT-J rotary on the first 2r dims: each pair (x[2i], x[2i+1]) turns by angle θ_i."""
    R = 2 * sin_BTr.shape[-1]
    rot = x_BTHd[..., :R].astype(jnp.float32)
    even, odd = rot[..., 0::2], rot[..., 1::2]                      # (B, T, H, r)
    sin, cos = sin_BTr[:, :, None, :], cos_BTr[:, :, None, :]        # broadcast over heads
    turned = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return jnp.concatenate([turned.reshape(rot.shape).astype(x_BTHd.dtype), x_BTHd[..., R:]], -1)


def _block(x_BTD, p, sin, cos, mask_BTT, config, past_kv):
    """One CodeGen layer. `past_kv` is None (plain forward) or (k_cache, v_cache, cache_valid_BS,
    start): the T tokens attend to the cache as it was (its valid slots, all earlier; nothing if
    it is fresh, `start` the Python 0 of init_cache) and to each other; then their keys/values
    are written into it at slot `start`."""
    (B, T, D), H, hd = x_BTD.shape, config.n_head, config.head_dim
    mm = jnp.matmul if past_kv is None else _times                 # decoding: weights [out, in]
    h = _layer_norm(x_BTD, p["ln_scale"], p["ln_bias"], config.layer_norm_epsilon)

    q = _rotary(mm(h, p["wq"]).reshape(B, T, H, hd), sin, cos).transpose(0, 2, 1, 3)   # (B, H, T, hd)
    k = _rotary(mm(h, p["wk"]).reshape(B, T, H, hd), sin, cos).transpose(0, 2, 1, 3)
    v = mm(h, p["wv"]).reshape(B, T, H, hd).transpose(0, 2, 1, 3)

    def scores(keys, mask):  # fp32 q·k / sqrt(hd), hidden where mask (B, T|1, keys) is False
        s = jnp.einsum("bhtd,bhsd->bhts", q.astype(jnp.float32), keys.astype(jnp.float32)) / math.sqrt(hd)
        return jnp.where(mask[:, None], s, jnp.finfo(jnp.float32).min)
    k_cache, v_cache, cache_valid_BS, start = past_kv or (None,) * 4              # caches (B, H, S, hd)
    if k_cache is None or isinstance(start, int):                                # no cache, or a fresh one
        probs = jax.nn.softmax(scores(k, mask_BTT), axis=-1).astype(v.dtype)       # (B, H, T, T), fp32 softmax
        o = jnp.einsum("bhts,bhsd->bthd", probs, v)
    else:
        S = k_cache.shape[2]
        probs = jax.nn.softmax(jnp.concatenate([scores(k_cache, cache_valid_BS[:, None]), scores(k, mask_BTT)], -1),
                               axis=-1).astype(v.dtype)                          # (B, H, T, S + T)
        o = jnp.einsum("bhts,bhsd->bthd", probs[..., :S], v_cache) + jnp.einsum("bhts,bhsd->bthd", probs[..., S:], v)
    if k_cache is not None:
        k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, start, 0))
        v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start, 0))
    attn = mm(o.reshape(B, T, D), p["wo"])

    mlp = mm(jax.nn.gelu(mm(h, p["w_in"]) + p["b_in"], approximate=True), p["w_out"]) + p["b_out"]
    return x_BTD + attn + mlp, (k, v)


def _split_batch(x_BTD):
    """Under tpu.py's mesh (`jax.set_mesh`), keep activations split by batch rows over the
    data-parallel axes, not by the weights' fsdp split (tpu.py, the note under RULES)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names)
    if not axes or x_BTD.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x_BTD
    return jax.lax.with_sharding_constraint(x_BTD, jax.sharding.PartitionSpec(axes))


def init_cache(config, batch, max_len, dtype=jnp.float32):
    """Empty KV cache for `batch` rows of up to `max_len` tokens. `valid`: slots holding real tokens
    (not left padding); `pos`: each row's next rotary position; `length`: the next free slot, here
    the Python 0, so the forward that fills it knows while tracing that it holds nothing to attend to."""
    empty = [jnp.zeros((batch, config.n_head, max_len, config.head_dim), dtype) for _ in range(2 * config.n_layer)]
    # Behind a barrier: seeing these zeros as constants, XLA:TPU planned twice the prefill's temporaries
    return jax.lax.optimization_barrier({"k": empty[::2], "v": empty[1::2], "valid": jnp.zeros((batch, max_len), bool),
                                         "pos": jnp.zeros(batch, jnp.int32)}) | {"length": 0}


def forward(params, tokens_BT, config, *, valid_BT=None, cache=None):
    """Logits (B, T, V) in float32; with a `cache`, (logits, updated cache). `valid_BT` (False = left
    padding) gives real tokens their unpadded positions (cumsum - 1) and hides padded keys.
    With a cache the weights are used in `decoding_layout` (sample.prepare's params are in it)."""
    params = params if cache is None else decoding_layout(params)
    x_BTD, new_cache = _trunk(params, tokens_BT, config, valid_BT, cache)
    if cache is None:
        return jnp.dot(x_BTD, params["head_w"], preferred_element_type=jnp.float32) + params["head_b"]
    return _times(x_BTD, params["head_w"], jnp.float32) + params["head_b"], new_cache


def _trunk(params, tokens_BT, config, valid_BT, cache, remat=False):
    """Embedding, the layers and the final LayerNorm: hidden states (B, T, D) for the head."""
    B, T = tokens_BT.shape
    if T > config.n_ctx:  # positions past n_ctx were never trained: refuse rather than extrapolate
        raise ValueError(f"{T} tokens do not fit the model's context (n_ctx {config.n_ctx}); pass fewer")
    valid_BT = jnp.ones((B, T), bool) if valid_BT is None else valid_BT
    seen = jnp.zeros(B, jnp.int32) if cache is None else cache["pos"]
    pos_BT = jnp.maximum(seen[:, None] + jnp.cumsum(valid_BT, axis=1) - 1, 0)
    mask_BTT = jnp.tril(jnp.ones((T, T), bool))[None] & valid_BT[:, None, :]   # causal, padding hidden
    inv_freq = 1.0 / 10000 ** (np.arange(0, config.rotary_dim, 2) / config.rotary_dim)
    angles_BTr = pos_BT[..., None].astype(jnp.float32) * inv_freq.astype(np.float32)
    block = partial(_block, sin=jnp.sin(angles_BTr), cos=jnp.cos(angles_BTr), mask_BTT=mask_BTT, config=config)
    block = jax.checkpoint(block) if remat else block  # remat: recompute activations in the backward pass
    x = _split_batch(params["wte"][tokens_BT])                     # (B, T, D)
    if cache is None:
        x, _ = jax.lax.scan(lambda x, p: (block(x, p, past_kv=None)[0], None), x, params["layers"])
    else:
        # Decoding is memory-bound: layers unrolled, each with its own cache buffers updated in place
        # (docs/training.md); the weights come split per layer (`decoding_layout`).
        kv, start = [], cache["length"]
        for i, p in enumerate(params["layers"]):
            x, kv_i = block(x, p, past_kv=(cache["k"][i], cache["v"][i], cache["valid"], start))
            kv.append(kv_i)
        cache = {"k": [k for k, _ in kv], "v": [v for _, v in kv],
                 "valid": jax.lax.dynamic_update_slice(cache["valid"], valid_BT, (0, start)),
                 "pos": seen + valid_BT.sum(1, dtype=jnp.int32), "length": jnp.asarray(start + T, jnp.int32)}
    return _layer_norm(x, params["lnf_scale"], params["lnf_bias"], config.layer_norm_epsilon), cache


# A decode step multiplies each weight by a few rows, which XLA:CPU does 2-3x faster as w·xᵀ with w
# stored [out, in] than as x·w with w [in, out] (docs/training.md, "Decoding", has the measurements).
TRANSPOSED_FOR_DECODING = ("wq", "wk", "wv", "wo", "w_in", "w_out", "head_w")


def in_decoding_layout(params):
    """Whether `params` are decoding_layout's output (their layers a per-layer list), not stacked."""
    return isinstance(params.get("layers"), list)


def decoding_layout(params):
    """`params` as a cached forward uses them: the stacked (L, ...) layer weights split into L
    per-layer dicts (see `_trunk`) and the matrices above stored [out, in]; a no-op on its output."""
    if in_decoding_layout(params):
        return params

    def flip(tree):  # .copy(): numpy's transpose is a strided view; make it a contiguous array
        return {k: a.T.copy() if k in TRANSPOSED_FOR_DECODING else a for k, a in tree.items()}
    each = [jax.tree.map(lambda a: a[i], params["layers"]) for i in range(len(params["layers"]["wq"]))]
    return flip({**params, "layers": [flip(layer) for layer in each]})


def _times(x, w_OI, dtype=None):
    """x @ w_OI.T for a weight in decoding_layout, written w·xᵀ: the product XLA:CPU runs fastest."""
    return jnp.moveaxis(jnp.einsum("oi,...i->o...", w_OI, x, preferred_element_type=dtype), 0, -1)


def loss_fn(params, windows_BW, config, z_loss=0.0, remat=False):
    """Mean next-token cross entropy over the T predictions of each W-token window (JAXformer
    trains all, EOS included) plus its optional z-loss z·logsumexp², keeping the normaliser near 1."""
    x_BTD, _ = _trunk(params, windows_BW[:, :-1], config, None, None, remat)
    x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
    return head_loss(x_ND, params["head_w"], params["head_b"], windows_BW[:, 1:].reshape(-1), z_loss)


def cross_entropy(logits_NV, targets_N, z_loss=0.0):
    """Per-token loss, the definition: logsumexp(l) - l[target] + z_loss·logsumexp(l)²."""
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    target_N = jnp.take_along_axis(logits_NV, targets_N[:, None], axis=-1)[:, 0]
    return lse_N - target_N + z_loss * lse_N ** 2


# The head's (N x V) logits outweigh the rest of a small model, so `head_loss` walks the tokens
# C at a time and, differentiated, computes each chunk's loss *and* gradient in one pass while
# its logits are in cache (docs/training.md). On CPU: 128 x 51,200 floats = 26 MB, cache-sized.
HEAD_CHUNK = {"cpu": 128}


def _chunks(x_ND, targets_N):
    """Tokens in G chunks of C, the last padded with rows of weight 0 (the rest 1/N)."""
    N, D = x_ND.shape
    C = min(HEAD_CHUNK.get(jax.default_backend(), 4096), N)
    pad = -N % C
    weight_GC = ((jnp.arange(N + pad) < N) / N).reshape(-1, C).astype(jnp.float32)
    x_GCD, y_GC = jnp.pad(x_ND, ((0, pad), (0, 0))).reshape(-1, C, D), jnp.pad(targets_N, (0, pad)).reshape(-1, C)
    return x_GCD, y_GC, weight_GC


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def head_loss(x_ND, w_DV, b_V, targets_N, z_loss):
    """mean over N of cross_entropy(x @ w + b, targets), one chunk of logits at a time."""
    def chunk(x_CD, y_C, weight_C):
        logits_CV = jnp.dot(x_CD, w_DV, preferred_element_type=jnp.float32) + b_V
        return jnp.sum(weight_C * cross_entropy(logits_CV, y_C, z_loss))
    return jax.lax.map(lambda xs: chunk(*xs), _chunks(x_ND, targets_N)).sum()


def _head_loss_and_grads(x_ND, w_DV, b_V, targets_N, z_loss):
    """head_loss and its gradients with respect to x, w and b, in one pass over the chunks."""
    x_GCD, y_GC, weight_GC = _chunks(x_ND, targets_N)
    xT_GDC = jnp.swapaxes(x_GCD, 1, 2)  # transposed once, not as a matmul operand in the loop (2x slower on CPU)

    def chunk(carry, xs):
        loss_sum, dw_DV, db_V = carry
        x_CD, xT_DC, y_C, weight_C = xs
        logits_CV = jnp.dot(x_CD, w_DV, preferred_element_type=jnp.float32) + b_V
        top_C = logits_CV.max(axis=-1)
        e_CV = jnp.exp(logits_CV - top_C[:, None])  # computed once, for both the sum and the gradient
        sum_C = e_CV.sum(axis=-1)
        lse_C = top_C + jnp.log(sum_C)
        target_C = jnp.take_along_axis(logits_CV, y_C[:, None], axis=-1)[:, 0]
        loss_sum += jnp.sum(weight_C * (lse_C - target_C + z_loss * lse_C ** 2))
        # d(loss of a token)/d(its logits) = softmax · (1 + 2·z·lse) − onehot(target); the weights
        # (1/N, 0 for padding) scale the small operands, not this big array (docs/training.md).
        is_target_CV = jnp.arange(logits_CV.shape[1])[None, :] == y_C[:, None]
        d_CV = e_CV * ((1 + 2 * z_loss * lse_C) / sum_C)[:, None] - is_target_CV
        dx_CD = jnp.dot(d_CV.astype(w_DV.dtype), w_DV.T, preferred_element_type=jnp.float32) * weight_C[:, None]
        dw_DV += jnp.dot((xT_DC * weight_C).astype(x_CD.dtype), d_CV.astype(x_CD.dtype),
                         preferred_element_type=jnp.float32)
        return (loss_sum, dw_DV, db_V + jnp.dot(weight_C, d_CV)), dx_CD.astype(x_ND.dtype)

    zeros = (jnp.zeros((), jnp.float32), jnp.zeros(w_DV.shape, jnp.float32), jnp.zeros(b_V.shape, jnp.float32))
    (loss_sum, dw_DV, db_V), dx_GCD = jax.lax.scan(chunk, zeros, (x_GCD, xT_GDC, y_GC, weight_GC))
    dx_ND = dx_GCD.reshape(-1, x_ND.shape[1])[:x_ND.shape[0]]
    return loss_sum, (dx_ND, dw_DV.astype(w_DV.dtype), db_V.astype(b_V.dtype))


def _head_loss_bwd(z_loss, grads, g):
    """The backward pass only scales the gradients the forward pass already computed."""
    dx, dw, db = grads
    return (g * dx).astype(dx.dtype), (g * dw).astype(dw.dtype), (g * db).astype(db.dtype), None


head_loss.defvjp(_head_loss_and_grads, _head_loss_bwd)
