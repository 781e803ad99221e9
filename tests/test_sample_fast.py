"""sample_fast.py's picker and the fast decoding lane held equal to
their plain twins in sample.py (`_pick`, `generate(plain=True)`):
greedy tokens identical, the same kept sets under temperature, top-k
and top-p, and sampled frequencies that follow the same law; and
`python sample.py --plain` end to end. (The exactness of the fast
top-p against a float64 nucleus: test_sample.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, WIDE, random_params, run_cli

import hf
import sample
import sample_fast

PROMPTS = [[5, 9, 2, 7, 1, 33, 200], [17, 3]]


PICKERS = {True: jax.jit(sample._pick, static_argnames="mode"),
           False: jax.jit(sample_fast.pick, static_argnames="mode")}


def pick(logits_BV, key, temperature, top_p, mode, plain):
    """One token per row by the plain or the fast picker."""
    knobs = sample._knobs(temperature, top_p, plain)
    return PICKERS[plain](logits_BV, key, knobs, mode=mode)


def test_plain_and_fast_decoding_give_the_same_greedy_tokens():
    params = random_params(TINY)
    fast = sample.generate(params, TINY, PROMPTS, 20)
    plain = sample.generate(params, TINY, PROMPTS, 20, plain=True)
    assert plain == fast
    assert all(len(row) == 20 for row in plain)


def kept_sets(x_BV, top_k, top_p, plain):
    """The tokens a picker can return: the support of many draws
    from one row of logits, at temperature 1."""
    n = 4000
    rows = jnp.repeat(jnp.asarray(x_BV[:1]), n, axis=0)
    mode = sample._mode(1.0, top_k, top_p)
    toks = pick(rows, jax.random.PRNGKey(0), 1.0, top_p, mode, plain)
    return np.bincount(np.asarray(toks), minlength=x_BV.shape[-1])


@pytest.mark.parametrize("top_k, top_p", [(0, 0.5), (5, 1.0),
                                          (8, 0.9), (0, 0.95)])
def test_plain_and_fast_pickers_sample_the_same_law(top_k, top_p):
    """On a tiny vocabulary of well-separated logits: both pickers'
    draws have the same support and follow the same filtered
    distribution (chi-square of each against the law, and of the two
    against each other)."""
    stats = pytest.importorskip("scipy.stats", reason="scipy has the "
                                "chi-square law")
    rng = np.random.default_rng(0)
    x = np.sort(rng.standard_normal(32))[::-1] * 2
    x = (x + np.arange(32) * 1e-3).astype(np.float32)[None]
    plain = kept_sets(x, top_k, top_p, True)
    fast = kept_sets(x, top_k, top_p, False)
    np.testing.assert_array_equal(plain > 0, fast > 0)
    keep = np.ones(32, bool)
    if top_k:
        keep[top_k:] = False
    probs = np.where(keep, np.exp(x[0] - x[0].max()), 0.0)
    probs /= probs.sum()
    before = np.cumsum(probs) - probs
    keep &= before < top_p
    law = np.where(keep, probs, 0.0)
    law /= law.sum()
    for counts in (plain, fast):
        assert (counts[~keep] == 0).all()
        expected = counts.sum() * law[keep]
        stat = ((counts[keep] - expected) ** 2 / expected).sum()
        assert stats.chi2.sf(stat, keep.sum() - 1) > 1e-4
    if keep.sum() > 1:
        table = np.stack([plain[keep], fast[keep]])
        assert stats.chi2_contingency(table).pvalue > 1e-4


def test_plain_picker_never_picks_padded_head_ids():
    logits = np.zeros((8, 51200), np.float32)
    logits[:, 50295:] = 1e4
    for t, k, p in [(0, 0, 1.0), (1.0, 40, 1.0), (1.0, 0, 0.5)]:
        mode = sample._mode(t, k, p)
        toks = pick(jnp.asarray(logits), jax.random.PRNGKey(1),
                    t or 1.0, p, mode, True)
        assert int(toks.max()) < 50295


def test_plain_refuses_the_decoding_layout_and_a_mesh():
    params = sample.prepare(random_params(TINY))
    with pytest.raises(ValueError, match="plain=True"):
        sample.generate(params, TINY, PROMPTS, 4, plain=True)


def test_sample_py_plain_runs_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    hf.save_hf(random_params(WIDE, seed=1), WIDE, str(ckpt))
    outs = []
    for extra in (["--plain"], []):
        argv = ["--init-from", ckpt, "--prompt", "def f(x):",
                "--max-new-tokens", "8", "--temperature", "0",
                *extra]
        code, out, err = run_cli(sample.main, argv, capsys)
        assert code == 0, err
        outs.append(out.split("prompt tokens")[0])
    assert outs[0] == outs[1]
    assert "def f(x):" in outs[0]
