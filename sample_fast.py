"""The fast lane of sample.py's token picking: temperature, top-k and
top-p (nucleus) without sorting the vocabulary, exactly. Read
sample.py's `_pick` first, the plain twin (lax.top_k, sort + cumsum,
jax.random.categorical); tests/test_sample_fast.py holds the two
equal (kept sets, per-token probabilities, greedy tokens).

What is faster here, for a step that picks among 51,200 logits:
  - greedy: argmax as two plain reductions (`_argmax`);
  - top-k: lax.top_k over the k blocks of U logits with the largest
    maxima, not all V (`_top_k_floor`);
  - sampling: a block of U by its mass, then a token in it
    (`_draw`), instead of a categorical over V;
  - top-p: rejection sampling from the unsorted distribution, each
    candidate tested against the nucleus by float32 sums with a
    proven error bound, or, when too close to call, by exact sums
    (`_float32_verdict`, `_in_nucleus`). docs/sampling.md has why
    it is exact.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

import data

U = 128             # vocabulary block width of the two-level searches
CANDIDATES = 2      # nucleus draws tested per rejection round

def _argmax(logits_BV):
    """jnp.argmax (the first index of the maximum) as two plain
    reductions: XLA:CPU does not vectorise argmax's paired (value,
    index) reduction."""
    V = logits_BV.shape[-1]
    top_B1 = logits_BV.max(axis=-1, keepdims=True)
    index_V = jnp.arange(V, dtype=jnp.int32)
    at_top_BV = jnp.where(logits_BV == top_B1, index_V, V)
    return jnp.min(at_top_BV, axis=-1)


def _blocks(a_BV, fill):
    """(B, V) -> (B, Q, U), V padded with `fill` to Q·U."""
    B, V = a_BV.shape
    padded = jnp.pad(a_BV, ((0, 0), (0, -V % U)),
                     constant_values=fill)
    return padded.reshape(B, -1, U)


def _top_k_floor(x_BV, k):
    """The k-th largest value of each row, (B, 1). It lies in the k
    blocks of U values with the largest maxima: those maxima are k
    values >= the k-th largest block maximum m, and every value
    outside those blocks is <= m. So lax.top_k runs on k·U values,
    not V."""
    # The k-th is taken as the min of the top k: XLA:CPU turns
    # top_k(...)[:, -1] into a full sort.
    B, V = x_BV.shape
    if 2 * k * U > V:
        return jax.lax.top_k(x_BV, k)[0].min(-1, keepdims=True)
    # unfused input: XLA:CPU's fast TopK
    x_BQU = _blocks(jax.lax.optimization_barrier(x_BV), -jnp.inf)
    _, best_Bk = jax.lax.top_k(x_BQU.max(-1), k)
    # whole blocks: a cheap gather
    x_BkU = x_BQU[jnp.arange(B)[:, None], best_Bk]
    top = jax.lax.top_k(x_BkU.reshape(B, -1), k)[0]
    return top.min(-1, keepdims=True)


def _invert(w_BAn, u_BA):
    """Per (row, draw): the first index whose running sum of w exceeds
    u·sum(w), so index i comes out with probability w_i / sum(w); a
    zero weight never does (rounding that puts u·sum at the very end
    falls back to the last positive weight)."""
    n = w_BAn.shape[-1]
    index = jnp.arange(n, dtype=jnp.int32)
    run = jnp.cumsum(w_BAn, axis=-1)
    past_u = run > u_BA[..., None] * run[..., -1:]
    positive = w_BAn > 0
    first = jnp.min(jnp.where(past_u & positive, index, n), axis=-1)
    last = jnp.max(jnp.where(positive, index, 0), axis=-1)
    return jnp.minimum(first, last)


def _draw(w_BV, u_BA2):
    """A indices per row drawn with probability proportional to
    w_BV >= 0, two uniforms each: a block of U by its mass, then a
    token in it by its weight."""
    B = w_BV.shape[0]
    w_BQU = _blocks(w_BV, 0.0)
    mass_B1Q = w_BQU.sum(-1)[:, None, :]
    block_BA = _invert(mass_B1Q, u_BA2[..., 0])
    w_BAU = w_BQU[jnp.arange(B)[:, None], block_BA]
    return block_BA * U + _invert(w_BAU, u_BA2[..., 1])


# Exact sums in float32 (docs/sampling.md): e = h1 + h2 + h3 + r,
# h1 on a grid of 2^-8, h2 of 2^-17, h3 of 2^-26; over <= 2^16
# tokens their sums fit 24 bits, exact in any order.
GRIDS = (2.0 ** 8, 2.0 ** 17, 2.0 ** 26)


def _parts(e_BV):
    """The four parts of e_BV and their sums over each row, total_B4."""
    limit = "the exact sums hold for at most 65,536 tokens"
    assert e_BV.shape[-1] <= 2 ** 16, limit
    parts = []
    for grid in GRIDS:
        # a multiple of 1/grid within (1+2^-20)/(2·grid)
        h_BV = jnp.floor(e_BV * grid + 0.5) / grid
        parts.append(h_BV)
        e_BV = e_BV - h_BV
    parts.append(e_BV)
    sums = [h.sum(-1) for h in parts]
    return parts, jnp.stack(sums, axis=-1)


def split_p(p):
    """p (a Python float, i.e. float64) as three float32s p1 + p2 +
    p3, p1 and p2 with 12 significant bits, so p1·z and p2·z are
    exact for a float32 z cut into 12-bit halves."""
    out = []
    for _ in range(2):
        m, e = math.frexp(p)
        out.append(math.ldexp(round(m * 4096) / 4096, e))
        p -= out[-1]
    return np.array(out + [p], np.float32)


def _halves(z):
    """z as hi + lo, 12 significant bits each."""
    bits = jax.lax.bitcast_convert_type(z, jnp.int32)
    hi = jax.lax.bitcast_convert_type(bits & -4096, jnp.float32)
    return hi, z - hi


def _below_p(mass_A4, total_4, p3):
    """mass < p · total, both given as their four exact-split sums:
    the sign of mass - p·total summed in float32 pairs (sum + error)
    from exact products."""
    terms = [mass_A4[..., i] for i in range(4)]
    for i in range(4):
        z = total_4[..., i]
        for p in p3[:2]:
            for h in _halves(z):
                terms.append(-p * h)
        terms.append(-p3[2] * z)
    s = terms[0]
    c = jnp.zeros_like(terms[0])
    for t in terms[1:]:
        # two-sum: s + t == s_new + error, exactly
        s_new = s + t
        t_virtual = s_new - s
        c = c + (s - (s_new - t_virtual)) + (t - t_virtual)
        s = s_new
    return s + c < 0


def _scaled(logits_BV, temperature, top_k):
    """Temperature, then top-k (ties with the k-th stay): the logits
    x_BV, -inf where filtered out, and their unnormalised
    probabilities e_BV = exp(x - max) in [0, 1]."""
    x_BV = logits_BV / temperature
    if top_k < x_BV.shape[-1]:
        floor_B1 = _top_k_floor(x_BV, top_k)
        x_BV = jnp.where(x_BV >= floor_B1, x_BV, -jnp.inf)
    top_B1 = x_BV.max(axis=-1, keepdims=True)
    return x_BV, jnp.exp(x_BV - top_B1)


def _in_nucleus(x_BV, parts, total_B4, x_BA, p3):
    """Whether each candidate logit x_BA is in its row's nucleus: the
    tokens with larger logits hold less than p of the mass (p3 =
    split_p(p)), from the exact sums of `_parts`. `pick` needs it
    only for candidates that `_float32_verdict` cannot decide."""
    above_BAV = x_BV[:, None, :] > x_BA[..., None]
    sums = []
    for h in parts:
        sums.append(jnp.where(above_BAV, h[:, None, :], 0.0).sum(-1))
    mass_BA4 = jnp.stack(sums, axis=-1)
    return _below_p(mass_BA4, total_B4[:, None, :], p3)


def _two_level_sum(w_BQU):
    """Float32 sums over the last two axes, (..., Q, U) -> (...): each
    block's U values, then the Q block sums. In whatever order XLA
    adds, every value goes through at most k = (U - 1) + (Q - 1)
    roundings, so the result is within γ = k·u / (1 - k·u) of the
    exact sum of these nonnegative values (u = 2^-24; Higham,
    "Accuracy and Stability of Numerical Algorithms", 2nd ed., §4.2
    and Lemma 3.3)."""
    # The barrier keeps XLA from merging the two reductions into one,
    # whose bound would be k = Q·U - 1.
    block_sums = jax.lax.optimization_barrier(w_BQU.sum(-1))
    return block_sums.sum(-1)


def _float32_verdict(x_BQU, e_BQU, total_B, x_BA, p3):
    """_in_nucleus from plain float32 sums, given the blocked x and e
    (`_blocks`) and total_B = _two_level_sum(e_BQU): (mass < p·total,
    whether that verdict is certain). The sums' errors are provably
    below 4γ·total (docs/sampling.md), so a float32 gap
    `mass - p·total` larger than that has the sign of the exact one."""
    above_BAQU = x_BQU[:, None] > x_BA[..., None, None]
    mass_BA = _two_level_sum(jnp.where(above_BAQU, e_BQU[:, None], 0.0))
    # p3.sum() is within 3u·p of p
    gap_BA = mass_BA - p3.sum() * total_B[:, None]
    k = U + x_BQU.shape[1] - 2
    u = 2.0 ** -24
    margin = np.float32(4 * k * u / (1 - k * u))  # 4γ
    return gap_BA < 0, jnp.abs(gap_BA) > margin * total_B[:, None]


def pick(logits_BV, key, knobs, mode):
    """The next token per row; knobs = (temperature,
    split_p(top_p)), mode = sample._mode(...).

    Top-p is rejection sampling (docs/sampling.md): draw candidates
    from the distribution restricted to logits above `floor`, keep
    the first in the nucleus; a rejected one lies below the nucleus,
    so the floor rises to it. What comes out has probability
    e_c / (nucleus mass) for each nucleus token, and nothing else does.
    """
    V = logits_BV.shape[-1]
    n_real = min(V, data.VOCAB_SIZE)   # the head is padded to 51,200
    real_V = jnp.arange(V) < n_real
    logits_BV = jnp.where(real_V, logits_BV, -jnp.inf)
    if mode[0] == "greedy":
        return _argmax(logits_BV)
    _, top_k, nucleus = mode
    temperature, p3 = knobs
    x_BV, e_BV = _scaled(logits_BV, temperature, top_k)
    B = x_BV.shape[0]
    if not nucleus:
        u_B12 = jax.random.uniform(key, (B, 1, 2))
        return _draw(e_BV, u_B12)[:, 0]
    x_BQU = _blocks(x_BV, -jnp.inf)
    e_BQU = _blocks(e_BV, 0.0)
    total_B = _two_level_sum(e_BQU)

    def round_(s, first=False):      # the first round has no floor yet
        round_key = jax.random.fold_in(key, s["round"])
        u_BA2 = jax.random.uniform(round_key, (B, CANDIDATES, 2))
        if first:
            w_BV = e_BV
        else:
            w_BV = jnp.where(x_BV > s["floor"][:, None], e_BV, 0.0)
        cand_BA = _draw(w_BV, u_BA2)
        x_BA = jnp.take_along_axis(x_BV, cand_BA, axis=1)
        below_BA, sure_BA = _float32_verdict(x_BQU, e_BQU, total_B,
                                             x_BA, p3)

        def exact():
            return _in_nucleus(x_BV, *_parts(e_BV), x_BA, p3)

        def float32():
            return below_BA
        # rare: then the exact test decides
        unsure = jnp.any(~sure_BA & ~s["done"][:, None])
        ok_BA = jax.lax.cond(unsure, exact, float32)
        index_A = jnp.arange(CANDIDATES)
        first_B = jnp.min(jnp.where(ok_BA, index_A, CANDIDATES), axis=-1)
        at_B1 = jnp.minimum(first_B, CANDIDATES - 1)[:, None]
        got_B = jnp.take_along_axis(cand_BA, at_B1, axis=1)[:, 0]
        new = ~s["done"] & (first_B < CANDIDATES)
        done = s["done"] | new
        return {"tok": jnp.where(new, got_B, s["tok"]),
                "done": done,
                "round": s["round"] + 1,
                "floor": jnp.where(done, s["floor"], x_BA.max(-1))}

    def not_done(s):
        return ~jnp.all(s["done"])
    start = {"tok": jnp.zeros(B, jnp.int32),
             "done": jnp.zeros(B, bool),
             "round": jnp.zeros((), jnp.int32),
             "floor": jnp.full(B, -jnp.inf)}
    first_round = round_(start, first=True)
    return jax.lax.while_loop(not_done, round_, first_round)["tok"]
