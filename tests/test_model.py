"""model.py against Hugging Face's CodeGenForCausalLM (the ground truth), plus the
properties a decoder must have: causality, cached decoding == full forward, the
loss against its definition. Only the parity tests need torch and transformers;
the fast twins are tested in test_model_fast.py, the checkpoint files in test_hf.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_params, random_tokens

import hf
import model

# Jitted: one compilation per shape, shared by the tests below. Called eagerly, JAX compiles every
# operation of the forward and backward passes on its own, which costs many times more.
forward = jax.jit(model.forward, static_argnums=2)
loss = jax.jit(model.loss_fn, static_argnums=2, static_argnames=("z_loss", "remat"))
grad = jax.jit(jax.grad(model.loss_fn), static_argnums=2, static_argnames=("z_loss", "remat"))


# ----------------------------------------------------------------------------- configs and counts

def test_presets_match_the_paper():
    sizes = {n: (c.n_layer, c.n_embd, c.n_head, c.rotary_dim, c.n_ctx, c.vocab_size) for n, c in model.CONFIGS.items()}
    assert sizes["350M"] == (20, 1024, 16, 32, 2048, 51200)
    assert sizes["2B"] == (32, 2560, 32, 64, 2048, 51200)
    assert sizes["6B"] == (33, 4096, 16, 64, 2048, 51200)
    assert sizes["16B"] == (34, 6144, 24, 64, 2048, 51200)
    # the paper's Table 1, counted from the released tensor shapes
    assert model.param_count(model.CONFIGS["350M"]) == 356_712_448
    assert model.param_count(model.CONFIGS["16B"]) == 16_032_155_648
    for c in model.CONFIGS.values():
        assert c.n_head % 4 == 0


@pytest.mark.parametrize("kwargs, why", [
    (dict(n_layer=2, n_embd=100, n_head=8, rotary_dim=4), "divisible by n_head"),
    (dict(n_layer=2, n_embd=96, n_head=6, rotary_dim=4), "divisible by 4"),
    (dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=5), "rotary_dim"),
    (dict(n_layer=2, n_embd=64, n_head=4, rotary_dim=32), "rotary_dim"),
    (dict(n_layer=0, n_embd=64, n_head=4, rotary_dim=4), "positive"),
])
def test_impossible_configs_fail_with_a_reason(kwargs, why):
    with pytest.raises(ValueError, match=why) as e:
        model.Config(**kwargs)
    assert "\n" not in str(e.value)


def test_param_count_matches_the_tree():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    assert sum(a.size for a in jax.tree.leaves(params)) == model.param_count(TINY)
    assert model.flops_per_token(TINY, 32) == 6 * (model.param_count(TINY) - 256 * 32) + 12 * 2 * 32 * 32


# ----------------------------------------------------------------------------- model properties

def test_cached_decoding_equals_full_forward():
    params = random_params(TINY)
    tokens = random_tokens((2, 12), 1)
    full = forward(params, tokens, TINY)
    cache = model.init_cache(TINY, 2, 16)
    assert cache["k"].shape == (TINY.n_layer, 2, TINY.n_head, 16,
                                TINY.head_dim)
    # prefill 5, then one token at a time
    logits, cache = forward(params, tokens[:, :5], TINY, cache=cache)
    steps = [logits]
    for t in range(5, 12):
        logits, cache = forward(params, tokens[:, t:t + 1], TINY,
                                cache=cache)
        steps.append(logits)
    np.testing.assert_allclose(np.concatenate(steps, 1), full,
                               atol=1e-5, rtol=1e-5)
    assert int(cache["length"]) == 12


def test_model_py_never_imports_its_fast_twin():
    """model.py is read first and stands alone: model_fast imports
    it, never the other way (not even inside a function)."""
    import pathlib
    import re
    source = pathlib.Path(model.__file__).read_text()
    assert not re.search(r"^\s*(import|from)\s+model_fast\b", source,
                         re.MULTILINE)
    assert re.search(r"^import model$", pathlib.Path(
        model.__file__).with_name("model_fast.py").read_text(),
        re.MULTILINE)


def test_left_padding_gives_the_same_logits_as_the_unpadded_row():
    params = random_params(TINY)
    row = jnp.array([[5, 9, 2, 7, 1]])
    alone = forward(params, row, TINY)
    padded = jnp.array([[0, 0, 0, 5, 9, 2, 7, 1]])
    valid = jnp.arange(8)[None] >= 3
    out = forward(params, padded, TINY, valid_BT=valid)
    np.testing.assert_allclose(out[:, 3:], alone, atol=1e-5, rtol=1e-5)
    # and through the cache: left-padded prefill, then decode
    cache = model.init_cache(TINY, 1, 10)
    logits, cache = forward(params, padded[:, :6], TINY, valid_BT=valid[:, :6], cache=cache)
    nxt, _ = forward(params, padded[:, 6:7], TINY, cache=cache)
    np.testing.assert_allclose(logits[:, 3:], alone[:, :3], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(nxt[:, 0], alone[:, 3], atol=1e-5, rtol=1e-5)


def test_causality_future_tokens_never_change_earlier_logits():
    params = random_params(TINY)
    tokens = random_tokens((1, 10), 2)
    changed = tokens.at[0, 6].set((tokens[0, 6] + 1) % TINY.vocab_size)
    a, b = forward(params, tokens, TINY), forward(params, changed, TINY)
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_remat_and_bf16_agree_with_fp32():
    params = random_params(TINY)
    batch = random_tokens((2, 9), 3)
    fp32 = loss(params, batch, TINY)
    g = grad(params, batch, TINY)
    g_remat = grad(params, batch, TINY, remat=True)
    for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
        np.testing.assert_allclose(x, y, atol=1e-6)
    bf16 = loss(model.cast(params, jnp.bfloat16), batch, TINY)
    assert abs(float(bf16) - float(fp32)) < 0.05
    # loss is the mean cross entropy of the next token
    logits = forward(params, batch[:, :-1], TINY)
    manual = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1).mean()
    np.testing.assert_allclose(fp32, manual, rtol=1e-6)
    z = loss(params, batch, TINY, z_loss=1e-4)
    np.testing.assert_allclose(z - fp32, 1e-4 * jnp.mean(jax.nn.logsumexp(logits, -1) ** 2), atol=2e-6)  # fp32 ulps


def test_forward_refuses_more_tokens_than_the_context():
    params = random_params(TINY)
    assert forward(params, jnp.zeros((1, TINY.n_ctx), jnp.int32), TINY).shape == (1, TINY.n_ctx, 256)  # n_ctx fits
    with pytest.raises(ValueError, match=f"129 tokens do not fit the model's context \\(n_ctx {TINY.n_ctx}\\)"):
        model.forward(params, jnp.zeros((1, TINY.n_ctx + 1), jnp.int32), TINY)
    with pytest.raises(ValueError, match="n_ctx"):
        model.loss_fn(params, jnp.zeros((1, TINY.n_ctx + 2), jnp.int32), TINY)


def test_cross_entropy_is_the_textbook_formula():
    params = random_params(TINY)
    batch = random_tokens((1, 10), 4)
    logits = forward(params, batch[:, :-1], TINY)[0]
    targets = batch[0, 1:]
    logp = jax.nn.log_softmax(logits)[jnp.arange(9), targets]
    lse = jax.nn.logsumexp(logits, -1)
    textbook = -logp + 1e-2 * lse ** 2
    got = model.cross_entropy(logits, targets, 1e-2)
    np.testing.assert_allclose(got, textbook, rtol=1e-5)


# ----------------------------------------------------------------------------- parity with transformers

def reference_model(config, seed=0):
    """transformers' CodeGenForCausalLM with random weights, norms and biases perturbed
    away from 1 and 0; skips the test when torch or transformers is absent."""
    torch = pytest.importorskip("torch", reason="torch (CPU) is the parity reference; "
                                "pip install -r requirements-test.txt")
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    hf_config = transformers.CodeGenConfig(**hf.config_to_hf(config))
    torch.manual_seed(seed)
    m = transformers.CodeGenForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


def reference_logits(m, tokens):
    """The logits of a reference_model, float32 numpy."""
    import torch
    with torch.no_grad():
        return m(torch.tensor(np.asarray(tokens))).logits.float().numpy()


def test_logits_match_transformers():
    m = reference_model(TINY)
    state = {name: t.numpy() for name, t in m.state_dict().items()}
    params = hf.from_hf_state(state, TINY)
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))
    ours = np.asarray(forward(params, jnp.asarray(tokens), TINY))
    assert np.abs(ours - reference_logits(m, tokens)).max() <= 1e-4
