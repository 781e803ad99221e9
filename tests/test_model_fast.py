"""model_fast.py held equal to its plain twins in model.py: the
decoding forward (its weight layout, per-layer in-place cache, fresh-
cache shortcut) gives model.forward's logits, and the chunked head
loss gives model.loss_fn's loss and gradients."""
import shutil
import sysconfig

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, WIDE, random_params, random_tokens, run_cli

import common
import model
import model_fast
import train

forward = jax.jit(model.forward, static_argnums=2)


def test_decoding_layout_splits_layers_and_stores_out_in():
    params = random_params(TINY)
    split = model_fast.decoding_layout(params)
    assert model_fast.decoding_layout(split) is split
    assert len(split["layers"]) == TINY.n_layer
    np.testing.assert_array_equal(split["layers"][1]["w_in"],
                                  params["layers"]["w_in"][1].T)
    np.testing.assert_array_equal(split["head_w"], params["head_w"].T)


@pytest.mark.parametrize("layout", ["stacked", "decoding"])
def test_fast_decoding_equals_the_plain_forward(layout):
    """Left-padded prefill, then several one-token steps: the fast
    forward's logits are the plain forward's, step by step."""
    params = random_params(TINY)
    weights = params
    if layout == "decoding":
        weights = model_fast.decoding_layout(params)
    tokens = random_tokens((2, 11), 1)
    valid = jnp.ones((2, 11), bool).at[1, :3].set(False)  # row 1: pad 3
    plain_cache = model.init_cache(TINY, 2, 16)
    fast_cache = model_fast.init_cache(TINY, 2, 16)
    want, plain_cache = forward(params, tokens[:, :6], TINY,
                                valid_BT=valid[:, :6],
                                cache=plain_cache)
    got, fast_cache = model_fast.forward(weights, tokens[:, :6], TINY,
                                         valid_BT=valid[:, :6],
                                         cache=fast_cache)
    np.testing.assert_allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got[1, 3:], want[1, 3:], atol=1e-5,
                               rtol=1e-5)
    step = jax.jit(model_fast.forward, static_argnums=2)
    for t in range(6, 11):
        want, plain_cache = forward(params, tokens[:, t:t + 1], TINY,
                                    cache=plain_cache)
        got, fast_cache = step(weights, tokens[:, t:t + 1], TINY,
                               cache=fast_cache)
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    assert int(fast_cache["length"]) == int(plain_cache["length"]) == 11
    np.testing.assert_array_equal(fast_cache["pos"], plain_cache["pos"])
    np.testing.assert_array_equal(fast_cache["pos"], [11, 8])


def test_a_fresh_cache_is_not_attended_to():
    """Filling init_cache's fresh cache (the prefill) scores the T
    tokens against each other only, not also against the S empty
    slots; once it holds tokens, a step scores S + T keys. (The Python
    0 that marks a fresh cache must be seen while tracing:
    model_fast.forward, not a jit of it.)"""
    raw = random_params(TINY)
    H = TINY.n_head
    params = model_fast.decoding_layout(raw)
    tokens = random_tokens((2, 6), 3)

    def score_shapes(cache, T):
        def run():
            return model_fast.forward(params, tokens[:, :T], TINY,
                                      cache=cache)
        jaxpr = jax.make_jaxpr(run)()
        shapes = {tuple(v.aval.shape) for eqn in jaxpr.jaxpr.eqns
                  for v in eqn.outvars}
        return shapes & {(2, H, T, n) for n in (T, 16, 16 + T)}
    fresh = model_fast.init_cache(TINY, 2, 16)
    assert score_shapes(fresh, 5) == {(2, H, 5, 5)}
    logits, filled = model_fast.forward(params, tokens[:, :5], TINY,
                                        cache=fresh)
    np.testing.assert_allclose(logits, forward(raw, tokens[:, :5], TINY),
                               atol=1e-5, rtol=1e-5)
    assert score_shapes(filled, 1) == {(2, H, 1, 1), (2, H, 1, 16),
                                       (2, H, 1, 17)}


@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_plain_ones(monkeypatch,
                                                         z_loss):
    """model_fast.loss_fn computes loss and gradient chunk by chunk; it
    must equal model.loss_fn (full logits, cross_entropy), including a
    last chunk padded with dead rows (9 tokens in chunks of 4), both
    differentiated and not (evaluation takes the undifferentiated
    chunked path)."""
    monkeypatch.setitem(model_fast.HEAD_CHUNK, jax.default_backend(), 4)
    params = random_params(TINY)
    batch = random_tokens((1, 10), 4)

    def plain(p):
        return model.loss_fn(p, batch, TINY, z_loss=z_loss)

    def fused(p):  # traced here: HEAD_CHUNK 4
        return model_fast.loss_fn(p, batch, TINY, z_loss=z_loss)
    want, want_g = jax.jit(jax.value_and_grad(plain))(params)
    got, got_g = jax.jit(jax.value_and_grad(fused))(params)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(fused)(params), want, rtol=1e-6)
    for x, y in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(x, y, atol=1e-6)


# ----------------------------------------------------------------------------- the --plain switch of train.py

def test_plain_and_fast_train_steps_take_the_same_path():
    """train.make_train_step(plain=True) (model.loss_fn) and the
    default (model_fast.loss_fn): the same losses over a few steps."""
    recipe = train.Recipe(lr=1e-2, min_lr=1e-3, warmup=1, anneal=100,
                          weight_decay=0.1, clip=1.0, z_loss=1e-4,
                          dtype="float32", remat=False)
    batch = jnp.tile(jnp.arange(17) % 7, (1, 4, 1))
    params = random_params(TINY)
    runs = []
    for plain in (True, False):
        state = train.init_state(params)
        step = jax.jit(train.make_train_step(TINY, recipe, plain=plain))
        losses = np.zeros(4)
        for i in range(4):
            state, m = step(state, batch)
            losses[i] = m["loss"]
        runs.append(losses)
    np.testing.assert_allclose(runs[0], runs[1], rtol=1e-5)
    assert runs[0][-1] < runs[0][0]


def test_train_py_plain_runs_end_to_end(tmp_path, capsys, monkeypatch):
    """`python train.py --plain` trains, and logs the default's losses."""
    monkeypatch.setitem(model.CONFIGS, "tiny", WIDE)
    monkeypatch.setitem(train.PRESETS, "tiny", train.PRESETS["nano"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("textwrap.py", "bisect.py", "heapq.py", "shlex.py"):
        shutil.copy(f"{stdlib}/{name}", corpus / name)
    losses = {}
    for mode in ("plain", "fast"):
        out = tmp_path / mode
        argv = ["--size", "tiny", "--data", corpus, "--out", out,
                "--seq-len", "32", "--batch-size", "4",
                "--max-steps", "3", "--eval-batches", "0",
                "--save-every", "0"]
        if mode == "plain":
            argv.append("--plain")
        code, _, err = run_cli(train.main, argv, capsys)
        assert code == 0, err
        rows = common.read_jsonl(out / "metrics.jsonl")
        losses[mode] = [r["loss"] for _, r in rows if "loss" in r]
    assert len(losses["plain"]) == 3
    np.testing.assert_allclose(losses["plain"], losses["fast"],
                               rtol=1e-4)
