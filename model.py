"""CodeGen in plain JAX: config, parameters, forward pass with a KV
cache, and loss. (Checkpoints, ours and the released ones, are read
and written by hf.py.)

CodeGen (Nijkamp et al., ICLR 2023, §2.2) is a GPT-J-style decoder:

    h = wte[tokens]                      # no position embedding
    for each layer:                      # one jax.lax.scan
        x = LayerNorm(h)                 # ONE norm feeds both branches
        h = h + Attention(x) + MLP(x)    # parallel residual
    logits = LayerNorm(h) @ head_w + head_b   # untied, with a bias

Attention rotates the first `rotary_dim` dims of every query/key head
with GPT-J's interleaved rotary embedding and does its softmax in
float32; the MLP is Linear(4D) -> gelu(tanh) -> Linear(D), both with
biases.

Parameters are a plain nested dict of arrays (no framework), weights
as JAX kernels `[in, out]`; per-layer weights are stacked on a
leading layer axis so one `scan` runs them all and a 34-layer model
compiles as fast as a 2-layer one. The KV cache is stacked the same
way, (L, B, H, S, hd), and scanned with the layers.

This file is the plain version of each idea. Faster versions of the
same ideas (a decoding weight layout, in-place cache writes, a
chunked head loss) live in model_fast.py, tested equal to these.

Shapes are written into names (`x_BTD`) with these letters:

    B batch rows        T tokens in the input   W = T + 1 in a window
    S key/value slots   D n_embd                H n_head
    hd head_dim = D/H   r rotary_dim / 2        F d_ff = 4 D
    V vocab_size        L n_layer               K micro-batches
    N = B·T tokens flattened for the head
    C tokens per head chunk, G chunks
    P prompts (each copied num_samples times into B rows)
    M new tokens of a decode output buffer
    X = S + T keys a new token attends to (cache slots, new tokens)
    O, I a weight's output and input dimensions (w_OI is [out, in])
    U vocabulary block width of the fast sampler, Q = V / U blocks
    A candidate tokens drawn per rejection round

One meaning per letter in every file.

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
    x32 = x.astype(jnp.float32)  # statistics in fp32 whatever the dtype
    centred = x32 - x32.mean(-1, keepdims=True)
    var = jnp.square(centred).mean(-1, keepdims=True)
    y = centred * jax.lax.rsqrt(var + eps)
    scale32 = scale.astype(jnp.float32)
    bias32 = bias.astype(jnp.float32)
    return (y * scale32 + bias32).astype(x.dtype)


def _rotary(x_BTHd, sin_BTr, cos_BTr):
    """GPT-J rotary on the first 2r dims: each pair
    (x[2i], x[2i+1]) turns by angle θ_i."""
    R = 2 * sin_BTr.shape[-1]
    rot = x_BTHd[..., :R].astype(jnp.float32)
    even = rot[..., 0::2]                          # (B, T, H, r)
    odd = rot[..., 1::2]
    sin = sin_BTr[:, :, None, :]           # broadcast over heads
    cos = cos_BTr[:, :, None, :]
    turned = jnp.stack([even * cos - odd * sin,
                        odd * cos + even * sin], axis=-1)
    turned = turned.reshape(rot.shape).astype(x_BTHd.dtype)
    return jnp.concatenate([turned, x_BTHd[..., R:]], -1)


def _sin_cos(pos_BT, config):
    """The rotary angles of each token's position: (sin, cos), (B, T, r)."""
    dims = np.arange(0, config.rotary_dim, 2)
    inv_freq = 1.0 / 10000 ** (dims / config.rotary_dim)
    pos = pos_BT[..., None].astype(jnp.float32)
    angles_BTr = pos * inv_freq.astype(np.float32)
    return jnp.sin(angles_BTr), jnp.cos(angles_BTr)


def _scores(q_BHTd, k_BHSd, mask_BTS):
    """fp32 q·k / sqrt(hd), (B, H, T, S); -inf-like where the mask is False."""
    hd = q_BHTd.shape[-1]
    q = q_BHTd.astype(jnp.float32)
    k = k_BHSd.astype(jnp.float32)
    s = jnp.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(hd)
    return jnp.where(mask_BTS[:, None], s, jnp.finfo(jnp.float32).min)


def _attend(q_BHTd, k_BHSd, v_BHSd, mask_BTS):
    """Softmax attention (fp32 softmax): the outputs, (B, T, H, hd)."""
    s_BHTS = _scores(q_BHTd, k_BHSd, mask_BTS)
    probs = jax.nn.softmax(s_BHTS, axis=-1).astype(v_BHSd.dtype)
    return jnp.einsum("bhts,bhsd->bthd", probs, v_BHSd)


def _heads(x_BTD, config):
    """(B, T, D) -> (B, T, H, hd)."""
    B, T, _ = x_BTD.shape
    return x_BTD.reshape(B, T, config.n_head, config.head_dim)


def _qkv_heads(q_BTD, k_BTD, v_BTD, sin, cos, config):
    """Queries, keys, values split into heads, (B, H, T, hd), the
    queries and keys turned by rotary."""
    q = _rotary(_heads(q_BTD, config), sin, cos)
    k = _rotary(_heads(k_BTD, config), sin, cos)
    v = _heads(v_BTD, config)
    q = q.transpose(0, 2, 1, 3)                    # (B, H, T, hd)
    k = k.transpose(0, 2, 1, 3)
    v = v.transpose(0, 2, 1, 3)
    return q, k, v


def _write_cache(k_cache, v_cache, k_BHTd, v_BHTd, start):
    """The caches (B, H, S, hd) with the T new keys and values
    written at slots start ... start + T - 1."""
    at = (0, 0, start, 0)
    k = jax.lax.dynamic_update_slice(
        k_cache, k_BHTd.astype(k_cache.dtype), at)
    v = jax.lax.dynamic_update_slice(
        v_cache, v_BHTd.astype(v_cache.dtype), at)
    return k, v


def _block(x_BTD, p, sin, cos, mask, config, kv=None):
    """One CodeGen layer. Without a cache the T tokens attend to each
    other (mask (B, T, T)). With one, `kv` = (k_BHSd, v_BHSd, start):
    their keys and values are first written into the cache at slot
    `start`, then they attend to its S slots (mask (B, T, S))."""
    B, T, D = x_BTD.shape
    eps = config.layer_norm_epsilon
    h = _layer_norm(x_BTD, p["ln_scale"], p["ln_bias"], eps)

    q, k, v = _qkv_heads(h @ p["wq"], h @ p["wk"], h @ p["wv"],
                         sin, cos, config)
    if kv is not None:
        k_cache, v_cache, start = kv
        k, v = _write_cache(k_cache, v_cache, k, v, start)
    o = _attend(q, k, v, mask)
    attn = o.reshape(B, T, D) @ p["wo"]

    up = jax.nn.gelu(h @ p["w_in"] + p["b_in"], approximate=True)
    mlp = up @ p["w_out"] + p["b_out"]
    return x_BTD + attn + mlp, (k, v)


def split_batch(x_BTD, mesh):
    """On `mesh`, keep activations split by batch rows over the
    data-parallel axes, not by the weights' fsdp split (tpu.py, the
    note under RULES). Without a mesh: x as it is."""
    if mesh is None:
        return x_BTD
    names = ("data", "fsdp")
    axes = tuple(a for a in names if a in mesh.axis_names)
    if not axes:
        return x_BTD
    if x_BTD.shape[0] % math.prod(mesh.shape[a] for a in axes):
        return x_BTD
    spec = jax.sharding.PartitionSpec(axes)
    rows = jax.sharding.NamedSharding(mesh, spec)
    return jax.lax.with_sharding_constraint(x_BTD, rows)


def check_length(T, config):
    """Positions past n_ctx were never trained: refuse, not extrapolate."""
    if T > config.n_ctx:
        raise ValueError(
            f"{T} tokens do not fit the model's context "
            f"(n_ctx {config.n_ctx}); pass fewer")


def init_cache(config, batch, max_len, dtype=jnp.float32):
    """Empty KV cache for `batch` rows of up to `max_len` (S) tokens:
    keys and values (L, B, H, S, hd); `valid`, the slots holding
    real tokens (not left padding); `pos`, each row's next rotary
    position; `length`, the next free slot."""
    L = config.n_layer
    H = config.n_head
    shape = (L, batch, H, max_len, config.head_dim)
    return {"k": jnp.zeros(shape, dtype),
            "v": jnp.zeros(shape, dtype),
            "valid": jnp.zeros((batch, max_len), bool),
            "pos": jnp.zeros(batch, jnp.int32),
            "length": jnp.zeros((), jnp.int32)}


def forward(params, tokens_BT, config, *, valid_BT=None, cache=None,
            mesh=None):
    """Logits (B, T, V) in float32; with a `cache` (init_cache), the
    pair (logits, updated cache). `valid_BT` (False = left padding)
    gives real tokens their unpadded positions (cumsum - 1) and hides
    padded keys. On a `mesh` (tpu.make_mesh), the batch rows stay
    split over its data axes (split_batch)."""
    x_BTD, new_cache = _trunk(params, tokens_BT, config, valid_BT,
                              cache, mesh=mesh)
    logits_BTV = _head(x_BTD, params)
    if cache is None:
        return logits_BTV
    return logits_BTV, new_cache


def _head(x_BTD, params):
    """The head's logits, accumulated in float32."""
    w = params["head_w"]
    f32 = jnp.float32
    logits = jnp.dot(x_BTD, w, preferred_element_type=f32)
    return logits + params["head_b"]


def _positions(seen_B, valid_BT):
    """Each token's rotary position: its row's `seen` plus the real
    tokens before it (left padding takes none)."""
    pos_BT = seen_B[:, None] + jnp.cumsum(valid_BT, axis=1) - 1
    return jnp.maximum(pos_BT, 0)


def _causal_mask(valid_BT):
    """(B, T, T): each token sees itself and the real tokens before
    it, never left padding."""
    T = valid_BT.shape[1]
    causal_TT = jnp.tril(jnp.ones((T, T), bool))
    return causal_TT[None] & valid_BT[:, None, :]


def _trunk(params, tokens_BT, config, valid_BT, cache, remat=False,
           mesh=None):
    """Embedding, the layers (one jax.lax.scan over the stacked
    weights, and over the cache's layers) and the final LayerNorm:
    hidden states (B, T, D) for the head, and the updated cache."""
    B, T = tokens_BT.shape
    check_length(T, config)
    if valid_BT is None:
        valid_BT = jnp.ones((B, T), bool)
    if cache is None:
        seen_B = jnp.zeros(B, jnp.int32)
    else:
        seen_B = cache["pos"]
    sin, cos = _sin_cos(_positions(seen_B, valid_BT), config)
    x = split_batch(params["wte"][tokens_BT], mesh)   # (B, T, D)
    if cache is None:
        mask_BTT = _causal_mask(valid_BT)
        block = partial(_block, sin=sin, cos=cos, mask=mask_BTT,
                        config=config)
        if remat:  # recompute activations in the backward pass
            block = jax.checkpoint(block)

        def layer(x, p):
            return block(x, p)[0], None
        x, _ = jax.lax.scan(layer, x, params["layers"])
    else:
        x, cache = _cached_layers(params, x, sin, cos, valid_BT,
                                  cache, config)
    lnf = (params["lnf_scale"], params["lnf_bias"])
    eps = config.layer_norm_epsilon
    return _layer_norm(x, *lnf, eps), cache


def _cached_layers(params, x_BTD, sin, cos, valid_BT, cache, config):
    """The layers over a KV cache: the T tokens go to slots
    start ... start + T - 1 and see the valid slots up to their own."""
    T = x_BTD.shape[1]
    start = cache["length"]
    valid_BS = jax.lax.dynamic_update_slice(
        cache["valid"], valid_BT, (0, start))
    S = valid_BS.shape[1]
    slot_T = start + jnp.arange(T)
    causal_TS = jnp.arange(S)[None, :] <= slot_T[:, None]
    mask_BTS = causal_TS[None] & valid_BS[:, None, :]
    block = partial(_block, sin=sin, cos=cos, mask=mask_BTS,
                    config=config)

    def layer(x, xs):
        p, k_cache, v_cache = xs
        return block(x, p, kv=(k_cache, v_cache, start))
    xs = (params["layers"], cache["k"], cache["v"])
    x_BTD, (k, v) = jax.lax.scan(layer, x_BTD, xs)
    n_real_B = valid_BT.sum(1, dtype=jnp.int32)
    new_cache = {"k": k, "v": v, "valid": valid_BS,
                 "pos": cache["pos"] + n_real_B,
                 "length": start + T}
    return x_BTD, new_cache


# ----------------------------------------------------------------------------- loss

def cross_entropy(logits_NV, targets_N, z_loss=0.0):
    """Per-token loss, the definition:
    logsumexp(l) - l[target] + z_loss·logsumexp(l)²."""
    lse_N = jax.nn.logsumexp(logits_NV, axis=-1)
    picked = jnp.take_along_axis(logits_NV, targets_N[:, None],
                                 axis=-1)
    return lse_N - picked[:, 0] + z_loss * lse_N ** 2


def loss_fn(params, windows_BW, config, z_loss=0.0, remat=False,
            mesh=None):
    """Mean next-token cross entropy over the W - 1 predictions of each
    W-token window (JAXformer trains all, EOS included) plus the
    optional z-loss z·logsumexp², which keeps the normaliser near 1.
    The full (N, V) logits, then cross_entropy: the plain way.
    model_fast.loss_fn computes the same in chunks, faster. `mesh`
    as forward's."""
    inputs_BT = windows_BW[:, :-1]
    x_BTD, _ = _trunk(params, inputs_BT, config, None, None, remat,
                      mesh)
    logits_BTV = _head(x_BTD, params)
    V = logits_BTV.shape[-1]
    targets_N = windows_BW[:, 1:].reshape(-1)
    per_token_N = cross_entropy(logits_BTV.reshape(-1, V), targets_N,
                                z_loss)
    return per_token_N.mean()
