"""sample.py: cached generation against transformers' greedy generate() and against an
uncached loop of full forwards; the top-k/top-p kept sets against a float64 reference and
the sampled frequencies against the filtered distribution; seeds, chunking, one prefill per
prompt, stop strings, EOS, input checks and the CLI.

Shapes are shared between tests on purpose (batch, 64-token prompt bucket, 64-token
output bucket), so the whole file compiles only a handful of programs."""
import re
import subprocess
import sys
from functools import cache, partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, WIDE, random_params

import common
import data
import hf
import model
import sample
import sample_fast

PROMPTS = [[5, 9, 2, 7, 1, 33, 200], [17, 3]]
NEW = 40


@cache
def tiny():
    return random_params(TINY)


@cache
def wide():
    return random_params(WIDE, seed=1)


@cache
def greedy_alone():
    """Each prompt generated on its own (batch 1)."""
    return [sample.generate(tiny(), TINY, [p], NEW)[0] for p in PROMPTS]


# ----------------------------------------------------------------------------- greedy decoding


def test_greedy_matches_transformers(tmp_path):
    torch = pytest.importorskip("torch", reason="torch (CPU) is the parity reference")
    transformers = pytest.importorskip("transformers", reason="transformers is the parity reference")
    hf.save_hf(tiny(), TINY, tmp_path)
    reference = transformers.CodeGenForCausalLM.from_pretrained(tmp_path).eval()
    for prompt, ours in zip(PROMPTS, greedy_alone()):
        x = torch.tensor([prompt])
        with torch.no_grad():  # EOS (50256) is outside this vocabulary, so neither side stops early
            theirs = reference.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                 pad_token_id=0)[0, len(prompt):].tolist()
        assert len(ours) == NEW and ours == theirs


def test_cached_generation_equals_uncached_argmax_loop():
    forward = jax.jit(lambda p, t: model.forward(p, t, TINY))
    for prompt, ours in zip(PROMPTS, greedy_alone()):
        buf = np.zeros((1, len(prompt) + NEW), np.int32)  # one shape: later slots do not affect earlier logits
        buf[0, :len(prompt)] = prompt
        for t in range(len(prompt), len(prompt) + NEW):
            buf[0, t] = int(jnp.argmax(forward(tiny(), buf)[0, t - 1]))
        assert buf[0, len(prompt):].tolist() == ours


def test_left_padded_batch_rows_equal_the_prompts_run_alone():
    assert sample.generate(tiny(), TINY, PROMPTS, NEW) == greedy_alone()
    # prompt-major ordering of num_samples; greedy samples of one prompt are identical
    assert sample.generate(tiny(), TINY, PROMPTS[::-1], NEW) == greedy_alone()[::-1]


def test_argmax_is_jnp_argmax_ties_included():
    rng = np.random.default_rng(0)
    logits = rng.integers(-3, 3, (64, 200)).astype(np.float32)  # many ties: the first index must win
    logits[5] = -np.inf
    logits[6, [7, 150]] = np.inf
    np.testing.assert_array_equal(sample_fast._argmax(jnp.asarray(logits)), np.argmax(logits, axis=-1))


def test_top_k_1_is_greedy():
    out = sample.generate(tiny(), TINY, PROMPTS[1:], NEW, temperature=0.8, top_k=1, seed=3, num_samples=2)
    assert out == greedy_alone()[1:] * 2


def test_seeds_reproduce_and_differ():
    go = lambda seed: sample.generate(tiny(), TINY, PROMPTS[1:], NEW, temperature=1.0, top_p=0.9, seed=seed,
                                      num_samples=2)
    a, b, c = go(0), go(0), go(1)
    assert a == b
    assert a != c
    assert a[0] != a[1]  # the two samples of one prompt are different draws
    assert all(len(row) == NEW and max(row) < TINY.vocab_size for row in a + c)


def test_samples_do_not_depend_on_chunking(monkeypatch):
    kw = dict(temperature=1.0, top_p=0.9, top_k=50, seed=4, num_samples=2)
    whole = sample.generate(tiny(), TINY, PROMPTS, NEW, **kw)            # one decode call
    monkeypatch.setattr(sample, "CHUNK", 8)
    assert sample.generate(tiny(), TINY, PROMPTS, NEW, until=lambda ids: False, **kw) == whole   # five calls


def test_samples_of_a_prompt_share_one_prefill(monkeypatch):
    expected = [g for g in greedy_alone() for _ in range(3)]          # computed before the spy counts
    rows, real = [], sample._prefill

    def spy(params, prompt_PT, *args, **kwargs):
        rows.append(prompt_PT.shape[0])
        return real(params, prompt_PT, *args, **kwargs)
    monkeypatch.setattr(sample, "_prefill", spy)
    assert sample.generate(tiny(), TINY, PROMPTS, NEW, num_samples=3) == expected
    assert rows == [len(PROMPTS)]                                       # 2 prefill rows for 6 samples


def test_decode_writes_the_kv_cache_in_place():
    """The compiled decode loop holds no copy of a (B, H, S, hd) cache buffer, for one row (where
    XLA:CPU copies each buffer several times a step without sample.IN_PLACE) and for two."""
    params, knobs = sample.prepare(tiny()), (jnp.float32(1), jnp.asarray(sample_fast.split_p(1.0)))
    for B in (1, 2):
        prompt_BT = np.ones((B, 64), np.int32)
        state = sample._prefill(params, prompt_BT, prompt_BT > 0, jax.random.PRNGKey(0), knobs, config=TINY,
                                new_bucket=64, num_samples=1, mode=("greedy",))
        assert state["cache"]["k"][0].shape == (B, TINY.n_head, 128, TINY.head_dim)
        hlo = sample._decode.lower(params, state, jnp.int32(64), jax.random.PRNGKey(0), knobs, config=TINY,
                                   mode=("greedy",)).compile().as_text()
        cache_shape = f"f32[{B},{TINY.n_head},128,{TINY.head_dim}]"
        assert [line for line in hlo.splitlines() if " copy(" in line and cache_shape in line] == []


# ----------------------------------------------------------------------------- token filters


def reference_kept(x32, top_k, top_p):
    """The kept set in float64 with a full sort: top-k (ties with the k-th stay), then the
    smallest most-likely set whose probability reaches top_p (ties at its boundary stay)."""
    x = x32.astype(np.float64)
    if top_k:
        x = np.where(x >= np.sort(x)[::-1][top_k - 1], x, -np.inf)
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-x, kind="stable")
    before = np.concatenate([[0.0], np.cumsum(p[order])[:-1]])        # mass ranked above each token
    floor = x[order][before < top_p].min() if top_p < 1 else -np.inf
    return (x >= floor) & np.isfinite(x)


pick = jax.jit(sample_fast.pick, static_argnames="mode")  # one token per row, as the decode loop picks it


@partial(jax.jit, static_argnums=2)
def verdicts_of(x_BV, x_BA, top_k, p3):
    """sample's verdicts for candidate logits x_BA, after temperature (x_BV) and top-k: the
    exact test's, the float32 test's, and whether the float32 test says it is certain."""
    x_BV, e_BV = sample_fast._scaled(x_BV, 1.0, top_k)
    x_BA = jnp.where(x_BA >= jnp.min(jnp.where(jnp.isfinite(x_BV), x_BV, jnp.inf), -1, keepdims=True), x_BA, -jnp.inf)
    exact = sample_fast._in_nucleus(x_BV, *sample_fast._parts(e_BV), x_BA, p3)
    x_BQU, e_BQU = sample_fast._blocks(x_BV, -jnp.inf), sample_fast._blocks(e_BV, 0.0)
    fast, sure = sample_fast._float32_verdict(x_BQU, e_BQU, sample_fast._two_level_sum(e_BQU), x_BA, p3)
    return exact & jnp.isfinite(x_BA), fast & jnp.isfinite(x_BA), sure


def check_verdicts(x_BV, x_BA, top_k, top_p, expected_BA):
    """Both tests give the expected verdicts (the float32 one wherever it says it is certain);
    returns how often it is certain."""
    exact, fast, sure = map(np.asarray, verdicts_of(jnp.asarray(x_BV), jnp.asarray(x_BA), top_k or 1 << 30,
                                                    jnp.asarray(sample_fast.split_p(top_p))))
    np.testing.assert_array_equal(exact, expected_BA)
    np.testing.assert_array_equal(fast[sure], np.asarray(expected_BA)[sure])
    return sure.mean()


def logits_of(kind, rows, V, seed):
    rng = np.random.default_rng(seed)
    if kind == "random":
        return rng.standard_normal((rows, V)) * 3
    if kind == "flat":
        return rng.standard_normal((rows, V)) * 0.01
    if kind == "peaked":
        x = rng.standard_normal((rows, V))
        x[:, rng.integers(0, V, 5)] += 12
        return x
    return rng.integers(0, 4, (rows, V)).astype(float)                 # "tied": four distinct values


@pytest.mark.parametrize("kind", ["random", "flat", "peaked", "tied"])
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 0.95), (0.7, 0, 0.5), (0.2, 0, 0.95),
                                                       (1.3, 4, 0.9), (0.8, 40, 0.999), (1.0, 0, 0.3)])
def test_kept_set_is_the_float64_nucleus(kind, temperature, top_k, top_p):
    x = (logits_of(kind, 4, 1024, seed=len(kind)).astype(np.float32) / np.float32(temperature))
    certain = check_verdicts(x, x, top_k, top_p, [reference_kept(row, top_k, top_p) for row in x])
    assert certain > 0.99                                              # the exact test is the rare fallback


def test_kept_set_of_flat_full_vocabulary_rows_is_exact():
    """Flat rows of 51,200 are where float32 running sums miss the boundary: check the
    last kept value and the value just below it, for 64 rows."""
    x = logits_of("flat", 64, 51200, seed=9).astype(np.float32)
    edges = []
    for row in x:
        keep = reference_kept(row, 0, 0.95)
        edges.append([row[keep].min(), row[~keep].max()])
    certain = check_verdicts(x, np.asarray(edges, np.float32), 0, 0.95, [[True, False]] * len(x))
    assert certain < 1                                                 # here the fallback decides some


def test_top_k_floor_is_the_kth_largest_ties_included():
    x = logits_of("tied", 8, 51200, seed=1).astype(np.float32)
    x[:, 5000:] -= 10                                                  # the top values sit in a few blocks
    x[0, 3] = 20
    for k in (1, 4, 40, 300):
        floor = np.asarray(jax.jit(sample_fast._top_k_floor, static_argnums=1)(jnp.asarray(x), k))[:, 0]
        np.testing.assert_array_equal(floor, np.sort(x, axis=1)[:, ::-1][:, k - 1])


def chi2_pvalue(counts, probs):
    if (counts[probs == 0] > 0).any():
        return 0.0
    expected = counts.sum() * probs[probs > 0]
    stat = ((counts[probs > 0] - expected) ** 2 / expected).sum()
    return scipy_stats().chi2.sf(stat, (probs > 0).sum() - 1)


def scipy_stats():
    return pytest.importorskip("scipy.stats", reason="scipy (a jax dependency) has the chi-square law")


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 0, 0.7), (1.0, 20, 0.9), (1.5, 30, 1.0), (1.0, 0, 1.0)])
def test_sampled_first_tokens_follow_the_filtered_distribution(temperature, top_k, top_p):
    logits = np.asarray(model.forward(tiny(), jnp.asarray([PROMPTS[0]]), TINY))[0, -1]
    n = 20000
    toks = pick(jnp.tile(jnp.asarray(logits), (n, 1)), jax.random.PRNGKey(0),
                (jnp.float32(temperature), jnp.asarray(sample_fast.split_p(top_p))), mode=sample._mode(temperature, top_k, top_p))
    counts = np.bincount(np.asarray(toks), minlength=TINY.vocab_size)
    x = logits / np.float32(temperature)
    kept = reference_kept(x, top_k, top_p)

    def law(keep):
        probs = np.where(keep, np.exp(x.astype(np.float64) - x.max()), 0.0)
        return probs / probs.sum()
    assert chi2_pvalue(counts, law(kept)) > 1e-4
    # a nucleus one token too large or too small is rejected by the same test
    order = np.argsort(-x)
    for wrong in (kept.sum() - 1, kept.sum() + 1):
        if 0 < wrong < TINY.vocab_size:
            assert chi2_pvalue(counts, law(np.isin(np.arange(TINY.vocab_size), order[:wrong]))) < 1e-6


def test_padded_head_ids_are_never_picked():
    logits = np.zeros((64, 51200), np.float32)
    logits[:, data.VOCAB_SIZE:] = 1e4
    for t, k, p in [(0, 0, 1.0), (1.0, 0, 1.0), (1.0, 40, 1.0), (1.0, 0, 0.5), (2.0, 50000, 0.99)]:
        toks = pick(jnp.asarray(logits), jax.random.PRNGKey(1), (jnp.float32(t or 1), jnp.asarray(sample_fast.split_p(p))),
                    mode=sample._mode(t, k, p))
        assert int(toks.max()) < data.VOCAB_SIZE


# ----------------------------------------------------------------------------- text: EOS, stop strings


PROMPT_TEXT = "def fib(n):\n"


@cache
def wide_greedy():
    ids = data.get_tokenizer().encode(PROMPT_TEXT).ids
    return ids, sample.generate(wide(), WIDE, [ids], NEW)[0]


def test_generation_stops_at_eos_and_never_picks_padded_ids():
    prompt, ids = wide_greedy()
    assert len(ids) == NEW and max(ids) < data.VOCAB_SIZE
    # A copy of token X's head column, slightly ahead, turns every greedy X into EOS.
    x = ids[5]
    p = dict(wide(), head_w=wide()["head_w"].at[:, data.EOS].set(wide()["head_w"][:, x]),
             head_b=wide()["head_b"].at[data.EOS].set(wide()["head_b"][x] + 1e-3))
    assert sample.generate(p, WIDE, [prompt], NEW) == [ids[:ids.index(x)]]   # EOS not included
    # An id past the tokenizer's 50,295 with a huge logit is still never picked.
    p = dict(wide(), head_b=wide()["head_b"].at[50300].set(1e4))
    assert sample.generate(p, WIDE, [prompt], NEW) == [ids]


def test_stop_string_split_across_two_tokens(monkeypatch):
    tok = data.get_tokenizer()
    prompt, ids = wide_greedy()
    text = tok.decode(ids, skip_special_tokens=False)
    # Find token i whose last character + the next token's first character is a string
    # that first occurs exactly there: a stop string that begins inside token i.
    for i in range(3, NEW - 1):
        head, nxt = tok.decode(ids[:i + 1]), tok.decode(ids[:i + 2])
        if len(nxt) > len(head) > 0 and text.startswith(nxt) and head.isascii() and nxt.isascii():
            stop = head[-1] + nxt[len(head)]
            if text.find(stop) == len(head) - 1:
                break
    else:
        pytest.skip("this random model's text has no suitable token boundary")
    assert sample.complete(wide(), WIDE, [PROMPT_TEXT], NEW, stop=["never there", stop]) == [text[:len(head) - 1]]
    # decoding stops early: rows are checked every CHUNK tokens, not run to max_new_tokens
    monkeypatch.setattr(sample, "CHUNK", 4)
    raw = sample.generate(wide(), WIDE, [prompt], NEW, until=lambda row: stop in tok.decode(row))[0]
    assert raw == ids[:len(raw)] and i + 2 <= len(raw) <= i + 2 + 4


def test_one_str_is_one_stop_string():
    """stop="xy" is the string "xy", not the stop strings "x" and "y" (as transformers' stop_strings)."""
    text = data.get_tokenizer().decode(wide_greedy()[1], skip_special_tokens=False)
    k = next(k for k in range(1, len(text) - 3) if text.find(text[k:k + 3]) == k and text[k] in text[:k])
    assert sample.complete(wide(), WIDE, [PROMPT_TEXT], NEW, stop=text[k:k + 3]) == [text[:k]]


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompts=[[1, 2]], max_new_tokens=128), "prompt 0 has 2 tokens and max_new_tokens is 128, but the "
                                                 "context holds 128"),
    (dict(prompts=[1, 2]), "list of token-id lists"),
    (dict(prompts="def f():"), "prompts must be a list, got str"),
    (dict(prompts=[[1], []]), "prompt 1 is empty"),
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(num_samples=0), "num_samples must be >= 1"),
    (dict(prompts=[[1, 256]]), "outside"),
])
def test_bad_input_is_a_one_line_value_error(kwargs, message):
    args = dict(prompts=[[1, 2]], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message) as e:
        sample.generate(tiny(), TINY, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_hf(wide(), WIDE, path)
    return path


def test_cli_prints_completions_and_throughput(checkpoint, capsys):
    sample.main(["--init-from", str(checkpoint), "--prompt", PROMPT_TEXT, "--temperature", "0",
                 "--max-new-tokens", str(NEW)])
    out = capsys.readouterr().out
    tok = data.get_tokenizer()
    assert PROMPT_TEXT + tok.decode(wide_greedy()[1]) in out and "sample 1/1" in out
    assert f"prompt tokens {len(wide_greedy()[0])}, new tokens {NEW}," in out and "tokens/s" in out
    seconds, rate, compiling, compiled_rate = re.search(
        r", ([\d.]+) s, ([\d.]+) tokens/s; without the ([\d.]+) s of compilation ([\d.]+) tokens/s", out).groups()
    assert float(compiled_rate) >= float(rate) > 0 and 0 <= float(compiling) <= float(seconds)


def test_cli_reads_the_prompt_from_stdin_with_prompt_file_dash(checkpoint, capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT_TEXT))
    sample.main(["--init-from", str(checkpoint), "--prompt-file", "-", "--temperature", "0",
                 "--max-new-tokens", str(NEW)])
    tok = data.get_tokenizer()
    assert PROMPT_TEXT + tok.decode(wide_greedy()[1]) in capsys.readouterr().out


def test_cli_errors_are_one_line_with_status_2(tmp_path, checkpoint, capsys):
    ok = ["--init-from", str(checkpoint)]
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(256)))
    for argv, message in [(["--init-from", str(tmp_path / "nothing")], "run `python train.py` first or pass --init-from"),
                          (ok + ["--prompt", "x " * 100], "prompt 0 has"),
                          (ok + ["--top-p", "2"], "--top-p must be in"),
                          (ok + ["--num-samples", "0"], "--num-samples must be >= 1"),
                          (ok + ["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                          (ok + ["--top-k", "-1"], "--top-k must be >= 0"),
                          (ok + ["--prompt-file", str(binary)], f"--prompt-file {binary} is not UTF-8 text"),
                          (ok + ["--temperature", "hot"], "invalid float value"),
                          (ok + ["--dtype", "float16"], "invalid choice"),
                          (ok + ["--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file"),
                          (["--init-from", str(tmp_path)], "no config.json")]:
        with pytest.raises(SystemExit) as e:
            common.run_main(sample.main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_prompt_plus_new_tokens_may_reach_n_ctx_plus_one():
    prompt = [7, 8]                                      # 2 + 127 = n_ctx + 1: the last token is never fed back
    assert len(sample.generate(tiny(), TINY, [prompt], TINY.n_ctx - 1)[0]) == TINY.n_ctx - 1


def test_complete_wants_a_list_of_texts():
    with pytest.raises(ValueError, match="takes a list of texts, got one str") as e:
        sample.complete(wide(), WIDE, "def f():", 8)
    assert "\n" not in str(e.value)


def test_load_casts_and_splits_the_layers_once(checkpoint):
    config, params = sample.load(str(checkpoint))
    assert config == WIDE and isinstance(params["layers"], list) and len(params["layers"]) == WIDE.n_layer
    prompt, ids = wide_greedy()
    assert sample.generate(params, config, [prompt], NEW) == [ids]   # same tokens as the stacked weights
    assert sample.load(str(checkpoint), "bfloat16")[1]["wte"].dtype == jnp.bfloat16


def test_cli_help_runs_as_a_script():
    out = subprocess.run([sys.executable, "sample.py", "--help"], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--stop" in out.stdout and "(default: 0.95)" in out.stdout
