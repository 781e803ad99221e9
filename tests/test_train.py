"""train.py: the recipe against its formulas, accumulation, exact resume (SIGKILL included),
HF-loadable checkpoints, --init-from, and one-line errors for bad input."""
import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = model.Config(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_ctx=64, vocab_size=96)


def recipe(**kw):
    return train.Recipe(**{"lr": 1e-2, "min_lr": 1e-3, "warmup": 10, "anneal": 100} | kw)


# ----------------------------------------------------------------------------- the recipe

def test_schedule_warmup_peak_cosine_and_flat():
    r = recipe()
    lr = lambda s: float(train.lr_at(jnp.asarray(s, jnp.float32), r))
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(5e-3)
    assert lr(10) == pytest.approx(1e-2)                     # peak at the end of warmup
    assert lr(60) == pytest.approx(1e-3 + 9e-3 * 0.5)        # half-way down the cosine
    assert lr(110) == pytest.approx(1e-3) and lr(10_000) == pytest.approx(1e-3)  # then flat


def test_adamw_step_matches_the_formulas():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    batch = jax.random.randint(jax.random.PRNGKey(1), (1, 2, 9), 0, TINY.vocab_size)
    r = recipe(clip=1e9)
    step = jax.jit(train.make_train_step(TINY, r))
    state, metrics = step(train.init_state(params), batch)
    state, metrics = step(state, batch)  # second step: bias corrections differ from 1 - b
    grad = jax.jit(jax.grad(model.loss_fn), static_argnums=2)
    g1 = grad(params, batch[0], TINY)
    p1 = jax.tree.map(lambda p, g: p - float(train.lr_at(1, r)) * (
        (0.1 * g / 0.1) / (jnp.sqrt(0.001 * g * g / 0.001) + 1e-8) + (0.1 * p if p.ndim > 1 else 0)), params, g1)
    g2 = grad(p1, batch[0], TINY)
    for p, a, b, m_prev in zip(jax.tree.leaves(p1), jax.tree.leaves(g1), jax.tree.leaves(g2),
                               jax.tree.leaves(state["params"])):
        m = (0.9 * 0.1 * a + 0.1 * b) / (1 - 0.9 ** 2)
        v = (0.999 * 0.001 * a * a + 0.001 * b * b) / (1 - 0.999 ** 2)
        want = p - float(train.lr_at(2, r)) * (m / (jnp.sqrt(v) + 1e-8) + (0.1 * p if p.ndim > 1 else 0))
        np.testing.assert_allclose(m_prev, want, atol=2e-6)
    assert int(state["step"]) == 2


def test_clipping_caps_the_update_and_reports_the_raw_norm():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    batch = jax.random.randint(jax.random.PRNGKey(1), (1, 2, 9), 0, TINY.vocab_size)
    _, m = jax.jit(train.make_train_step(TINY, recipe(clip=1e-3)))(train.init_state(params), batch)
    g = jax.grad(model.loss_fn)(params, batch[0], TINY)
    norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g)))
    assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)


def test_accumulated_micro_batches_equal_one_large_batch():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    big = jax.random.randint(jax.random.PRNGKey(2), (1, 8, 17), 0, TINY.vocab_size)
    step = jax.jit(train.make_train_step(TINY, recipe()))
    a, ma = step(train.init_state(params), big)
    b, mb = step(train.init_state(params), big.reshape(4, 2, 17))  # 4 micro-batches of 2
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), abs=1e-5)
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_allclose(x, y, atol=1e-5)


def test_loss_falls_on_a_tiny_model():
    params = model.init_params(TINY, jax.random.PRNGKey(0))
    batch = jnp.tile(jnp.arange(17) % 7, (1, 4, 1))  # a repeating pattern it can learn
    step = jax.jit(train.make_train_step(TINY, recipe(warmup=1)))
    state = train.init_state(params)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.3 * losses[0]


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small corpus of real Python files copied from the standard library."""
    import sysconfig
    root = tmp_path_factory.mktemp("corpus")
    stdlib = sysconfig.get_paths()["stdlib"]
    for name in ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py", "heapq.py",
                 "keyword.py", "numbers.py", "opcode.py", "queue.py", "random.py", "sched.py", "shlex.py",
                 "string.py", "textwrap.py", "this.py", "token.py", "tty.py", "uu.py"):
        if os.path.exists(os.path.join(stdlib, name)):
            (root / name).write_bytes(open(os.path.join(stdlib, name), "rb").read())
    return str(root)


def run_train(out, corpus, *extra, check=True):
    cmd = [sys.executable, "train.py", "--data", corpus, "--out", str(out), "--seq-len", "32", "--batch-size", "4",
           "--eval-every", "4", "--eval-batches", "2", "--sample-tokens", "0", "--val-fraction", "0.2", *extra]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=check, timeout=600,
                          env=os.environ | {"JAX_PLATFORMS": "cpu"})


def losses(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, corpus):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(whole, corpus, "--max-steps", "8", "--save-every", "3")
    assert sorted(os.listdir(whole)) == ["ckpt-0000003", "ckpt-0000006", "ckpt-0000008", "metrics.jsonl", "run.json"]

    # kill -9 the second run once it has written step 5 (past its step-3 checkpoint), then resume
    proc = subprocess.Popen([sys.executable, "train.py", "--data", corpus, "--out", str(broken), "--seq-len", "32",
                             "--batch-size", "4", "--eval-every", "4", "--eval-batches", "2", "--sample-tokens", "0", "--val-fraction", "0.2",
                             "--max-steps", "8", "--save-every", "3"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
    for line in proc.stdout:  # bounded by the run itself: it ends at step 8 if never killed
        if line.startswith("step      5/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    # a checkpoint torn mid-write must be ignored: fake one
    (broken / ".tmp-ckpt-0000006-123").mkdir()
    out = run_train(broken, corpus, "--max-steps", "8", "--save-every", "3").stdout
    assert "resuming from" in out and "ckpt-0000003" in out

    (train_a, val_a), (train_b, val_b) = losses(whole), losses(broken)
    assert sorted(train_a) == sorted(train_b) == list(range(1, 9))
    for s in train_a:
        assert abs(train_a[s] - train_b[s]) <= 1e-6, s
    assert val_a.keys() == val_b.keys() and all(abs(val_a[s] - val_b[s]) <= 1e-6 for s in val_a)


def test_checkpoint_loads_in_transformers_and_init_from_starts_at_its_loss(tmp_path, corpus):
    torch = pytest.importorskip("torch", reason="torch (CPU) is the reference")
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    first = tmp_path / "first"
    run_train(first, corpus, "--max-steps", "4", "--save-every", "4")
    ckpt = first / "ckpt-0000004"
    config, params = model.load_hf(first)  # a train.py output directory loads its newest checkpoint
    m = transformers.CodeGenForCausalLM.from_pretrained(ckpt).eval()
    tokens = np.arange(20)[None] * 37 % 50000
    with torch.no_grad():
        theirs = m(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model.forward(params, jnp.asarray(tokens), config)) - theirs).max() <= 1e-4

    # --init-from: fresh optimizer, the same weights: its first val_loss equals the source's last one
    second = tmp_path / "second"
    run_train(second, corpus, "--init-from", str(ckpt), "--max-steps", "1", "--eval-every", "1", "--lr", "0")
    assert losses(second)[1][1] == pytest.approx(losses(first)[1][4], abs=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--batch-size", "5", "--grad-accum", "2"], "not divisible by --grad-accum"),
    (["--out", "/proc/nope"], "cannot write to --out"),
    (["--init-from", "/nonexistent-dir"], "--init-from"),
    (["--data", "/nonexistent-dir"], "--data"),
    (["--mesh", "3x1x1"], "error:"),
])
def test_bad_input_is_one_line_before_any_compute(tmp_path, corpus, flags, message):
    args = ["--data", corpus, "--out", str(tmp_path / "o"), "--val-fraction", "0.2", *flags]
    r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert r.returncode != 0
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0], r.stderr
    assert "| loss" not in r.stdout  # no training step ran


def test_corrupt_or_mismatched_checkpoint_is_one_line(tmp_path, corpus):
    out = tmp_path / "o"
    bad = out / "ckpt-0000002"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{}")
    r = run_train(out, corpus, "--max-steps", "3", check=False)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "unreadable" in r.stderr
    other = model.Config(n_layer=1, n_embd=32, n_head=4, rotary_dim=4, n_ctx=64)
    model.save_hf(model.init_params(other, jax.random.PRNGKey(0)), other, bad)
    r = run_train(out, corpus, "--max-steps", "3", check=False)
    assert r.returncode != 0 and "different model" in r.stderr
