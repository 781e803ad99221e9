"""Decoding with narrower weights (sample.prepare's dtypes: bfloat16, and
the int8 matrices of model_fast.quantized): the round trip of int8
quantization, the logits and greedy tokens against float32, the bytes
the weights take, and the one-line errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import WIDE, random_params, run_cli

import hf
import model
import model_fast
import sample

NANO = model.CONFIGS["nano"]


def test_quantize_round_trip_is_within_half_a_step_per_row():
    rng = np.random.default_rng(0)
    w_OI = rng.standard_normal((48, 80)).astype(np.float32)
    w_OI[3] *= 100                                 # rows of any scale
    w_OI[5] = 0                                    # and an all-zero row
    w = model_fast.quantize(w_OI)
    assert w["int8"].dtype == jnp.int8 and w["scale"].shape == (48,)
    err_OI = np.abs(np.asarray(model_fast.dequantize(w)) - w_OI)
    step_O1 = np.abs(w_OI).max(1, keepdims=True) / 127
    assert (err_OI <= step_O1 / 2 + 1e-6 * step_O1).all()
    assert (np.asarray(w["int8"])[5] == 0).all()
    assert np.abs(np.asarray(w["int8"])).max(1).min() == 0
    assert np.abs(np.asarray(w["int8"])[[0, 3]]).max() == 127


def _logits(params, dtype, tokens_BT):
    """Logits of the prompt (a prefill) and of one more token (a decode
    step, one row per sequence), float32 numpy."""
    p = sample.prepare(params, dtype)
    B, T = tokens_BT.shape
    cache = model_fast.init_cache(NANO, B, T, p["wte"].dtype)
    head, cache = model_fast.forward(p, tokens_BT[:, :-1], NANO,
                                     cache=cache)
    last, _ = model_fast.forward(p, tokens_BT[:, -1:], NANO,
                                 cache=cache)
    return np.asarray(jnp.concatenate([head, last], 1), np.float32)


# |logit - float32's| over the position's largest |float32 logit|,
# max and mean; measured on this nano model at most bfloat16 0.0105 /
# 0.0013, int8 0.025 / 0.0031; asserted with room.
BOUNDS = {"bfloat16": (0.03, 0.004), "int8": (0.06, 0.01)}


@pytest.mark.parametrize("B", [1, 2])
def test_narrow_logits_stay_close_to_float32(B):
    params = random_params(NANO)
    tokens_BT = np.random.default_rng(B).integers(0, 50000, (B, 24))
    ref = _logits(params, "float32", tokens_BT)
    top = np.abs(ref).max(-1, keepdims=True)
    for dtype, (max_bound, mean_bound) in BOUNDS.items():
        err = np.abs(_logits(params, dtype, tokens_BT) - ref) / top
        assert err.max() < max_bound, dtype
        assert err.mean() < mean_bound, dtype
        assert err.max() > 0, dtype             # the narrow path ran


def test_narrow_greedy_choices_agree_along_a_long_generation():
    """Fed a 160-token float32 greedy generation, the narrower
    weights pick float32's greedy token at nearly every position (on
    this random model: bfloat16 98.9%, int8 98.3%). A random model's
    choices have thin margins; a trained one agrees more
    (docs/performance.md)."""
    params = random_params(NANO, seed=1)
    prompt = list(range(200, 216))
    new = sample.generate(sample.prepare(params), NANO, [prompt], 160)
    tokens_BT = np.array([prompt + new[0]])
    want_T = _logits(params, "float32", tokens_BT)[0].argmax(-1)
    assert len(want_T) == 176
    for dtype in BOUNDS:
        got_T = _logits(params, dtype, tokens_BT)[0].argmax(-1)
        assert (got_T == want_T).mean() > 0.95, dtype


def _shapes(config, dtype):
    """`config`'s parameters prepared in `dtype`, as shapes only."""
    def prepared():
        params = model.init_params(config, jax.random.key(0))
        return sample.prepare(params, dtype)
    return jax.eval_shape(prepared)


def test_int8_weights_take_a_byte_per_matrix_entry():
    """Each matrix one byte an entry plus a float32 scale per output
    channel; the rest (embedding, norms, biases) float32."""
    shapes = _shapes(NANO, "float32")
    want = 0
    for tree in [shapes, *shapes["layers"]]:
        for name, a in tree.items():
            if name in model_fast.TRANSPOSED_FOR_DECODING:
                want += a.size + 4 * a.shape[0]
            elif name != "layers":
                want += 4 * a.size
    assert model_fast.weight_bytes(_shapes(NANO, "int8")) == want


def test_2B_int8_weights_fit_in_4_GB():
    config = model.CONFIGS["2B"]
    int8 = model_fast.weight_bytes(_shapes(config, "int8"))
    assert int8 < 4e9
    assert int8 < 1.2 * model.param_count(config)


def test_bad_dtype_is_one_line(capsys):
    params = random_params(WIDE)
    with pytest.raises(ValueError, match="dtype must be one of "
                       "float32, bfloat16, int8, got 'int4'") as e:
        sample.prepare(params, "int4")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="fast lane only") as e:
        sample.prepare(params, "int8", plain=True)
    assert "\n" not in str(e.value)
    code, _, err = run_cli(sample.main, ["--dtype", "int4"], capsys)
    assert code == 2 and err.count("\n") == 1 and "int8" in err
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "model"))
    int8 = sample.prepare(params, "int8")
    with pytest.raises(ValueError, match="one device: drop the mesh"):
        sample.generate(int8, WIDE, [[1, 2]], 2, mesh=mesh)


def test_bench_accuracy_measures_each_dtype_against_float32(tmp_path,
                                                            capsys):
    """bench.py --accuracy DIR: float32's perplexity, and for bfloat16
    and int8 their error, argmax agreement and greedy equality."""
    import bench
    hf.save_hf(random_params(WIDE), WIDE, tmp_path)
    got = bench.accuracy(tmp_path, n_batches=1, rows=2, seq_len=32,
                         new_tokens=8)
    assert list(got) == ["float32", "bfloat16", "int8"]
    assert list(got["float32"]) == ["perplexity"]
    for dtype in ("bfloat16", "int8"):
        row = got[dtype]
        assert 0 < row["max_rel_error"] < 0.06
        assert row["mean_rel_error"] < row["max_rel_error"]
        assert row["argmax_agreement"] > 0.9
        assert row["greedy_equal"] in {"0/2", "1/2", "2/2"}
        ratio = row["perplexity"] / got["float32"]["perplexity"]
        assert abs(ratio - 1) < 0.01
    assert "accuracy int8" in capsys.readouterr().out


def test_cli_samples_in_int8_and_says_its_weights_bytes(tmp_path,
                                                         capsys):
    hf.save_hf(random_params(WIDE), WIDE, tmp_path)
    argv = ["--init-from", tmp_path, "--max-new-tokens", 4,
            "--temperature", 0, "--dtype", "int8"]
    code, out, err = run_cli(sample.main, argv, capsys)
    assert code == 0, err
    assert " in int8" in out.splitlines()[-1]
    code, _, err = run_cli(sample.main, [*argv, "--plain"], capsys)
    assert code == 2 and "fast lane only" in err


def test_dry_run_plans_int8_weights(capsys):
    argv = ["--dry-run", "--size", "nano", "--dtype", "int8"]
    code, out, err = run_cli(sample.main, argv, capsys)
    assert code == 0, err
    int8 = model_fast.weight_bytes(_shapes(NANO, "int8"))
    assert f"{int8 / 2 ** 20:.2f} MiB  (int8)" in out
