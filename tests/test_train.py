"""train.py: the recipe against its formulas, accumulation, exact resume (after kill -9, Ctrl-C
and SIGTERM), HF-loadable checkpoints, --init-from into a new run, a resumed run's schedule,
--help defaults per preset, and one-line errors that leave the disk as it was.

The script runs in this process (`common.run_main(train.main, argv)`), on a `--size tiny` preset
this file registers; only the runs that are signalled or killed are processes. Tests that start
from a finished run share one (`finished`) and copy it when they change it.

Run: python -m pytest -q tests/test_train.py"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, WIDE, random_params, random_tokens, run_cli

import common
import hf
import model
import plan
import train
import tpu

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIZE = "tiny"  # a --size preset of WIDE's shape (real text needs the real vocabulary) for the script tests


grad = jax.jit(jax.grad(model.loss_fn), static_argnums=2)  # compiled once, for the recipe tests


def recipe(**kw):
    return train.Recipe(**{"lr": 1e-2, "min_lr": 1e-3, "warmup": 10, "anneal": 100, "weight_decay": 0.1,
                           "clip": 1.0, "z_loss": 0.0, "dtype": "float32", "remat": False} | kw)


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
    batch = random_tokens((1, 2, 9), 1)
    r = recipe(clip=1e9)
    step = jax.jit(train.make_train_step(TINY, r))
    state, metrics = step(train.init_state(params), batch)
    state, metrics = step(state, batch)  # second step: bias corrections differ from 1 - b
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
    batch = random_tokens((1, 2, 9), 1)
    _, m = jax.jit(train.make_train_step(TINY, recipe(clip=1e-3)))(train.init_state(params), batch)
    g = grad(params, batch[0], TINY)
    norm = np.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g)))
    assert float(m["grad_norm"]) == pytest.approx(norm, rel=1e-5)


def test_accumulated_micro_batches_equal_one_large_batch():
    params = random_params(TINY)
    big = random_tokens((1, 8, 17), 2)
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


# ----------------------------------------------------------------------------- the command line

def test_help_shows_the_chosen_presets_real_defaults_and_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--size", "350M", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--max-steps", 350000), ("--batch-size", 256), ("--seq-len", 2048), ("--lr", 0.0003),
                          ("--min-lr", 3e-05), ("--warmup", 3000), ("--anneal", 300000), ("--z-loss", 0.0001)]:
        help_text = out.split(f"{flag} {flag[2:].upper().replace('-', '_')}")[-1]
        assert re.search(r"\(default: ([^)]*)\)", help_text)[1] == str(default), (flag, help_text)
    for action in train.build_parser("nano")._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    assert train.parse_args(["--lr", "1e-3"])[1] == {"lr"}  # the flags the user gave, for resuming
    assert "(default: None)" not in out and "--init-from NAME) (default" not in out  # each default once


def test_one_run_configuration_built_once_from_preset_and_flags():
    """parse_args: --size's preset over RunConfig's defaults, then the flags given; one frozen
    RunConfig, and the set of flags given (which a resumed run's saved recipe yields to)."""
    run, given = train.parse_args(["--size", "350M", "--lr", "1e-3", "--no-dedup", "--field", "code"])
    assert isinstance(run, train.RunConfig) and given == {"size", "lr"}
    assert (run.lr, run.batch_size, run.seq_len, run.warmup, run.z_loss) == (1e-3, 256, 2048, 3000, 1e-4)
    assert run.field == "code" and run.cleaning == train.data.Cleaning(dedup=False)
    assert run == dataclasses.replace(train.preset("350M"), lr=1e-3, field="code", cleaning=run.cleaning)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.lr = 1.0
    r = train.make_recipe(run, given)                   # --lr given: --min-lr follows it, anneal the preset's
    assert (r.lr, r.min_lr, r.anneal) == (1e-3, pytest.approx(1e-4), 300_000)
    nano = train.make_recipe(*train.parse_args(["--max-steps", "50"]))
    assert (nano.min_lr, nano.anneal) == (3e-4, 50 - 30)  # nano's cosine runs to --max-steps
    saved = dataclasses.asdict(r)                       # a resumed run keeps its recipe unless given
    assert train.make_recipe(*train.parse_args(["--warmup", "7"]), saved=saved).lr == 1e-3
    assert train.make_recipe(*train.parse_args(["--warmup", "7"]), saved=saved).warmup == 7
    for field in dataclasses.fields(train.RunConfig):   # every field documented
        assert field.name in ("field", "cleaning") or len(field.metadata["help"]) > 10, field.name


def test_flag_range_checks_are_one_helper():
    values = SimpleNamespace(seq_len=8, keep=0, limit=None)
    with pytest.raises(ValueError, match="^--seq-len and --keep must be positive$"):
        common.check_flags(values, ("seq_len", "keep"), 1)
    with pytest.raises(ValueError, match="^--keep must be 0 or more$"):
        common.check_flags(SimpleNamespace(keep=-1), ("keep",), 0)
    common.check_flags(values, ("seq_len", "limit"), 1)  # None: a flag left out passes


# ----------------------------------------------------------------------------- the script, in-process

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


@pytest.fixture(scope="module", autouse=True)
def tiny_preset():
    """--size tiny: WIDE with the nano schedule, for in-process runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(model.CONFIGS, TINY_SIZE, WIDE)
        patch.setitem(train.PRESETS, TINY_SIZE, train.PRESETS["nano"])
        yield


def flags(out, corpus, *extra):
    return ["--size", TINY_SIZE, "--data", corpus, "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--eval-every", "4", "--eval-batches", "2", "--val-fraction", "0.2", *extra]


def run(argv, capsys):
    """train.py in this process: (exit status, stdout lines, stderr lines)."""
    code, out, err = run_cli(train.main, argv, capsys)
    return code, out.splitlines(), err.splitlines()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, corpus, tiny_preset):
    """A finished 4-step run with a checkpoint after every step (the last 3 kept) and a val_loss
    at step 4. Tests read it, or copy it before they change it."""
    out = tmp_path_factory.mktemp("finished") / "nano"
    common.run_main(train.main, flags(out, corpus, "--max-steps", "4", "--save-every", "1"))
    assert train.list_checkpoints(out) == [str(out / f"ckpt-{s:07d}") for s in (2, 3, 4)]
    return out


def copy_of(finished, where):
    shutil.copytree(finished, where)
    return where


def metrics(out):
    return [row for _, row in common.read_jsonl(os.path.join(out, "metrics.jsonl"))]


def losses(out):
    rows = metrics(out)
    return {r["step"]: r["loss"] for r in rows if "loss" in r}, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def snapshot(root):
    """Every file under root with its bytes: what "nothing changed on disk" compares."""
    return {os.path.join(d, f): open(os.path.join(d, f), "rb").read() for d, _, fs in os.walk(root) for f in fs}


def test_every_and_batches_zero_mean_at_the_end_and_never(tmp_path, corpus, capsys):
    code, out, _ = run(flags(tmp_path / "a", corpus, "--max-steps", "3", "--eval-every", "0", "--save-every", "0"), capsys)
    assert code == 0 and out[0] == f"training {TINY_SIZE} from scratch into {tmp_path / 'a'}"
    assert jax.sharding.get_abstract_mesh().empty  # main sets no mesh for the process
    assert [r["step"] for r in metrics(tmp_path / "a") if "val_loss" in r] == [3]
    assert train.list_checkpoints(tmp_path / "a") == [str(tmp_path / "a" / "ckpt-0000003")]
    code, out, _ = run(flags(tmp_path / "b", corpus, "--max-steps", "2", "--eval-batches", "0"), capsys)
    assert code == 0 and not any("val_loss" in r for r in metrics(tmp_path / "b")) and "nan" not in " ".join(out)


def small_repo(root, names):
    """A directory of a few real Python files (copies of one stdlib module)."""
    import sysconfig
    source = open(os.path.join(sysconfig.get_paths()["stdlib"], "textwrap.py")).read()
    root.mkdir()
    for name in names:
        (root / name).write_text(source)
    return str(root)


def test_a_repo_of_any_size_trains_without_validation_when_none_is_held_out(tmp_path, capsys):
    """3 files hold out none at --val-fraction 0.02: one line says so and every file trains;
    --eval-batches 0 and --val-fraction 0 build no val stream at all."""
    repo = small_repo(tmp_path / "repo", ["a.py", "b.py", "c.py"])
    base = ["--val-fraction", "0.02", "--max-steps", "2", "--eval-every", "1"]
    code, out, err = run(flags(tmp_path / "o", repo, *base), capsys)
    assert code == 0, err
    assert [line for line in out if line.startswith("no validation")] == [
        f"no validation: {repo} has too few documents for --val-fraction 0.02 to set one aside; every "
        f"document trains"]
    assert [r["step"] for r in metrics(tmp_path / "o")] == [1, 2]       # no val_loss rows
    for extra in (["--eval-batches", "0"], ["--val-fraction", "0"]):
        code, out, err = run(flags(tmp_path / extra[0], repo, *base, *extra), capsys)
        assert code == 0 and not any(line.startswith("no validation") for line in out), err


def test_a_one_file_repo_that_falls_to_validation_trains_on_it_and_resumes(tmp_path, capsys):
    import data
    names = (f"m{i}.py" for i in range(100))               # a name whose file hashes into val at 0.9
    for i, name in enumerate(names):
        repo = small_repo(tmp_path / f"repo{i}", [name])
        try:
            data.TokenStream(repo, 4, 32, split="train", val_fraction=0.9)
        except data.EmptySplit:
            break
    argv = flags(tmp_path / "o", repo, "--val-fraction", "0.9", "--max-steps", "2")
    code, out, err = run(argv, capsys)
    assert code == 0 and any(line.startswith("no validation") for line in out), err
    code, out, err = run(argv[:-1] + ["3"], capsys)                   # resumes: same split, same stream
    assert code == 0 and out[0].startswith("resuming"), err
    assert [r["step"] for r in metrics(tmp_path / "o")] == [1, 2, 3]


def test_validation_starts_at_step_0_and_a_warmup_longer_than_the_run_is_told(tmp_path, corpus, capsys):
    code, out, err = run(flags(tmp_path, corpus, "--max-steps", "2", "--eval-every", "2", "--warmup", "30"), capsys)
    assert code == 0, err
    val = {r["step"]: r["val_loss"] for r in metrics(tmp_path) if "val_loss" in r}
    assert sorted(val) == [0, 2] and abs(val[0] - np.log(WIDE.vocab_size)) < 1    # a fresh model: about ln V
    assert f"step      0 | val_loss {val[0]:.4f}" in out
    peak = train.PRESETS["nano"]["lr"] * 2 / 30
    assert (f"note: --warmup 30 is not shorter than the run (2 steps): the learning rate peaks at {peak:.2e}, "
            f"not --lr {train.PRESETS['nano']['lr']:g}; give a shorter --warmup") in out


def test_without_a_datasheet_peak_it_prints_tflops_not_mfu(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.setattr(plan, "peak_flops", lambda device=None: None)
    code, out, _ = run(flags(tmp_path, corpus, "--max-steps", "1"), capsys)
    steps = [line for line in out if line.startswith("step ") and "/" in line]
    assert code == 0 and "MFU" not in steps[0] and " TFLOP/s | ETA" in steps[0]
    flops_per_step = model.flops_per_token(WIDE, 32) * 4 * 32  # --batch-size 4, --seq-len 32
    rows = [r for r in metrics(tmp_path) if "loss" in r]
    assert rows and all("mfu" not in r for r in rows)
    assert all(r["tflops"] == pytest.approx(flops_per_step / (r["ms"] / 1e3) / 1e12, rel=1e-6) for r in rows)
    monkeypatch.setattr(plan, "peak_flops", lambda device=None: (1e15, "a datasheet"))
    code, out, _ = run(flags(tmp_path, corpus, "--max-steps", "2"), capsys)
    steps = [line for line in out if line.startswith("step ") and "/" in line]
    last = metrics(tmp_path)[-2]
    assert last["step"] == 2 and last["mfu"] == pytest.approx(flops_per_step / (last["ms"] / 1e3) / 1e15, rel=1e-6)
    assert code == 0 and f"MFU {100 * last['mfu']:5.2f}% | ETA" in steps[0] and "TFLOP/s" not in steps[0]


def test_extending_a_finished_run_keeps_its_schedule(tmp_path, corpus, capsys):
    assert run(flags(tmp_path, corpus, "--max-steps", "4", "--warmup", "2"), capsys)[0] == 0
    first = {r["step"]: r["lr"] for r in metrics(tmp_path) if "lr" in r}
    code, out, _ = run(flags(tmp_path, corpus, "--max-steps", "8", "--warmup", "2"), capsys)
    assert code == 0 and out[0].startswith(f"resuming {tmp_path} from {tmp_path / 'ckpt-0000004'} (step 4 of 8")
    lrs = {r["step"]: r["lr"] for r in metrics(tmp_path) if "lr" in r}
    assert sorted(lrs) == list(range(1, 9)) and all(lrs[s] == first[s] for s in first)
    min_lr = train.PRESETS["nano"]["lr"] / 10
    assert all(lrs[s] == pytest.approx(min_lr) for s in range(5, 9))  # the cosine ended at step 4; flat after
    # a flag given on the command line does change it
    assert run(flags(tmp_path, corpus, "--max-steps", "9", "--min-lr", "1e-4"), capsys)[0] == 0
    assert metrics(tmp_path)[-2]["lr"] == pytest.approx(1e-4)


def test_init_from_fine_tunes_into_a_new_run_and_never_into_its_source(tmp_path, corpus, finished, capsys,
                                                                       monkeypatch):
    source = copy_of(finished, tmp_path / "nano")
    before = snapshot(source)
    monkeypatch.chdir(tmp_path)
    argv = [a for a in flags(source, corpus, "--max-steps", "1") if a not in ("--out", str(source))]
    code, out, _ = run(argv + ["--init-from", str(source)], capsys)
    fine_tuned = os.path.join("out", "nano-ft")
    assert code == 0 and out[0] == f"fine-tuning {source} into a new run in {fine_tuned} (fresh optimizer)"
    assert train.list_checkpoints(fine_tuned) == [os.path.join(fine_tuned, "ckpt-0000001")]
    # the same command again resumes the fine-tuning run
    code, out, _ = run(argv + ["--init-from", str(source), "--max-steps", "2"], capsys)
    assert code == 0 and out[0].startswith(f"resuming {fine_tuned} from")
    # into the source itself (or a checkpoint inside it): refused, one line, nothing written
    for init in (source, source / "ckpt-0000004"):
        code, out, err = run(flags(source, corpus, "--max-steps", "5", "--init-from", str(init)), capsys)
        assert code == 2 and out == [] and len(err) == 1 and "is the run --init-from" in err[0]
    assert snapshot(source) == before


def test_init_from_takes_the_recipe_of_its_size_and_refuses_another(tmp_path, corpus, finished, capsys,
                                                                      monkeypatch):
    """finished is a --size tiny run: without --size its recipe is tiny's (a distinct lr here), said
    in one line; --size nano (another model) is refused, one line, nothing written."""
    monkeypatch.setitem(train.PRESETS, TINY_SIZE, train.PRESETS["nano"] | {"lr": 1e-4})
    argv = flags(tmp_path / "o", corpus, "--max-steps", "1", "--init-from", finished)[2:]  # no --size
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert out[1] == f"--init-from {finished} is a {TINY_SIZE} model: --size {TINY_SIZE}'s recipe"
    recipe_of_run = json.load(open(tmp_path / "o" / "run.json"))["recipe"]
    assert recipe_of_run["lr"] == 1e-4 and recipe_of_run["min_lr"] == pytest.approx(1e-5)
    code, out, err = run(["--size", "nano", *argv[:-2]] + ["--out", tmp_path / "p", "--init-from", finished], capsys)
    assert code == 2 and out == [] and not (tmp_path / "p").exists()
    assert err == [f"error: --size nano is not the model of --init-from {finished} (a {TINY_SIZE} model); drop "
                   f"--size to train it with its own preset's recipe"]


@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "100000"], "longer than the model's context"),
    (["--batch-size", "5", "--grad-accum", "2"], "not divisible by --grad-accum"),
    (["--eval-every", "-1"], "0 or more"),
    (["--keep", "0"], "must be positive"),
    (["--out", "/proc/nope"], "cannot write to --out"),
    (["--init-from", "/nonexistent-dir"], "--init-from"),
    (["--data", "/nonexistent-dir"], "--data"),
    (["--mesh", "3x1x1"], "mesh"),
    (["--lr", "fast"], "--lr"),
    (["--lr", "-1"], "--lr, --min-lr, --warmup, --anneal, --weight-decay, --clip and --z-loss must be 0 or more"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, corpus, capsys, extra, message):
    code, out, err = run(flags(tmp_path / "o", corpus, *extra), capsys)
    assert code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("error: "), err
    assert out == [] and not (tmp_path / "o").exists()


def test_a_step_too_big_for_the_device_is_refused_before_allocating(tmp_path, corpus, capsys, monkeypatch):
    """The step is compiled ahead of time and its bytes compared with the device's memory (here a
    pretend 1 GiB less than a 64-sequence step needs): one line, the --grad-accum that fits (checked
    by compiling it), exit 2, nothing written."""
    argv = flags(tmp_path / "o", corpus, "--batch-size", "64", "--seq-len", "128", "--max-steps", "1")
    wanted = {}

    def plan_train_step(step, state, windows, mesh):
        compiled, seconds, used = real(step, state, windows, mesh)
        wanted[windows.shape[0]] = used["total"]
        return compiled, seconds, used
    real = plan.plan_train_step
    monkeypatch.setattr(plan, "plan_train_step", plan_train_step)
    monkeypatch.setattr(plan, "memory_budget", lambda device: (wanted[1] * 0.7, "pretend RAM"))
    code, out, err = run(argv, capsys)
    assert code == 2 and out == [] and len(err) == 1 and not (tmp_path / "o").exists(), err
    accum = int(re.search(r"--grad-accum (\d+) fits", err[0])[1])
    assert accum > 1 and wanted[accum] <= wanted[1] * 0.7 < wanted[1]
    assert err[0].startswith(f"error: a step of 64 x 128 tokens needs {wanted[1] / 2 ** 30:,.1f} GiB per device and "
                             f"cpu has {wanted[1] * 0.7 / 2 ** 30:,.1f} GiB (pretend RAM): --grad-accum {accum} fits")
    code, out, err = run(argv + ["--grad-accum", accum], capsys)   # and it does
    assert code == 0, err


def test_plot_draws_the_loss_curves_of_a_run(tmp_path, finished, capsys):
    pytest.importorskip("matplotlib", reason="--plot draws with matplotlib (requirements-test.txt)")
    out = copy_of(finished, tmp_path / "o")
    code, stdout, err = run(["--plot", out], capsys)
    assert code == 0 and stdout == [f"wrote {out / 'loss.png'}"], err
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_refused_resume_changes_nothing_on_disk(tmp_path, finished, capsys):
    out = copy_of(finished, tmp_path / "o")
    before = snapshot(out)
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.py").write_text("def f():\n    return 1\n" * 50)
    code, _, err = run(flags(out, str(other), "--max-steps", "5", "--val-fraction", "0"), capsys)  # another corpus
    assert code == 2 and len(err) == 1 and "--data" in err[0]
    assert snapshot(out) == before


def test_corrupt_or_mismatched_checkpoint_is_one_line_and_changes_nothing(tmp_path, corpus, finished, capsys):
    """The newest checkpoint is refused, naming it; the run never falls back to an older one."""
    out = copy_of(finished, tmp_path / "o")
    newest = out / "ckpt-0000004"
    weights = (newest / "model.safetensors").read_bytes()
    cases = [("model.safetensors", weights[:len(weights) // 2], "truncated or corrupt"),
             ("config.json", json.dumps(hf.config_to_hf(WIDE) | {"n_layer": None}), "n_layer"),
             ("config.json", json.dumps(hf.config_to_hf(WIDE) | {"n_head": "4"}), "n_head"),
             ("optimizer.safetensors", b"junk", "unreadable"),
             ("train_state.json", "{", "unreadable")]
    for name, content, message in cases:
        good = (newest / name).read_bytes()
        (newest / name).write_bytes(content.encode() if isinstance(content, str) else content)
        before = snapshot(out)
        code, stdout, err = run(flags(out, corpus, "--max-steps", "5"), capsys)
        assert code == 2 and len(err) == 1 and message in err[0] and "ckpt-0000004" in err[0], err
        assert stdout == [] and snapshot(out) == before
        (newest / name).write_bytes(good)
    other = model.Config(n_layer=2, n_embd=32, n_head=4, rotary_dim=4, n_ctx=128)
    hf.save_hf(random_params(other), other, newest)  # a checkpoint of another shape
    code, _, err = run(flags(out, corpus, "--max-steps", "5"), capsys)
    assert code == 2 and len(err) == 1 and "different model" in err[0] and "ckpt-0000004" in err[0], err


# ----------------------------------------------------------------------------- the script, as a process

@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
    """WIDE's random weights as a HF directory: subprocess runs --init-from it (the script
    cannot see this file's --size tiny preset)."""
    path = tmp_path_factory.mktemp("tiny")
    hf.save_hf(random_params(WIDE), WIDE, path)
    return str(path)


def script_flags(out, corpus, tiny_init, *extra):
    """The one command of this section: 8 steps from WIDE's weights, no --size."""
    return flags(out, corpus, "--init-from", tiny_init, "--max-steps", "8", *extra)[2:]


def start(out, corpus, tiny_init, *extra):
    """`python train.py` as a process, to be signalled; its stdout piped, its stderr (data notes) to a file."""
    cmd = [sys.executable, "train.py", *script_flags(out, corpus, tiny_init, *extra)]
    with open(f"{out}.stderr", "a") as err:
        return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True,
                                env=os.environ | {"JAX_PLATFORMS": "cpu"})


def signal_at(proc, step, signum):
    """Send `signum` once the process has printed `step`, then collect its output."""
    seen = []
    for line in proc.stdout:  # bounded by the run itself: it ends at step 8 if never signalled
        seen.append(line)
        if line.startswith(f"step {step:6d}/"):
            proc.send_signal(signum)
            break
    rest = proc.communicate(timeout=300)[0]
    return proc.returncode, "".join(seen) + rest


@pytest.fixture(scope="module")
def whole(tmp_path_factory, corpus, tiny_init):
    """The uninterrupted run, in this process: the same computation as the script's."""
    out = tmp_path_factory.mktemp("whole")
    common.run_main(train.main, script_flags(out, corpus, tiny_init, "--save-every", "3"))
    return losses(out)


def assert_same_run(a, b):
    (train_a, val_a), (train_b, val_b) = a, b
    assert sorted(train_a) == sorted(train_b) == list(range(1, 9))
    assert all(abs(train_a[s] - train_b[s]) <= 1e-6 for s in train_a), (train_a, train_b)
    assert val_a.keys() == val_b.keys() and all(abs(val_a[s] - val_b[s]) <= 1e-6 for s in val_a)


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tmp_path, corpus, tiny_init, whole, capsys):
    """The killed run is a process; the same command, run here, resumes it."""
    code, _ = signal_at(start(tmp_path, corpus, tiny_init, "--save-every", "3"), 5, signal.SIGKILL)
    assert code == -signal.SIGKILL
    (tmp_path / ".tmp-ckpt-0000006-123").mkdir()  # a checkpoint torn mid-write must be ignored
    code, out, err = run(script_flags(tmp_path, corpus, tiny_init, "--save-every", "3"), capsys)
    assert code == 0 and out[0] == f"resuming {tmp_path} from {tmp_path / 'ckpt-0000003'} (step 3 of 8)", (out, err)
    assert_same_run(whole, losses(tmp_path))


def test_ctrl_c_and_sigterm_save_the_step_and_resume_exactly(tmp_path, corpus, tiny_init, whole, capsys):
    """No periodic checkpoints: only the signals write them. SIGINT during step 2 or 3, then
    the same command resumes, then SIGTERM a few steps later, then it runs to the end."""
    steps = []
    for at, signum in ((2, signal.SIGINT), (5, signal.SIGTERM)):
        code, output = signal_at(start(tmp_path, corpus, tiny_init, "--save-every", "0"), at, signum)
        last = output.strip().splitlines()[-1]
        assert code == 128 + signum and last.startswith(f"stopped by {signal.Signals(signum).name} at step "), output
        assert "Traceback" not in open(f"{tmp_path}.stderr").read()
        step = int(last.split("at step ")[1].split(":")[0])
        assert step >= at and train.list_checkpoints(tmp_path)[-1].endswith(f"ckpt-{step:07d}")
        if steps:
            assert output.startswith(f"resuming {tmp_path} from {tmp_path / f'ckpt-{steps[-1]:07d}'}"), output
        steps.append(step)
    code, out, _ = run(script_flags(tmp_path, corpus, tiny_init, "--save-every", "0"), capsys)
    newest = tmp_path / f"ckpt-{steps[-1]:07d}"
    assert code == 0 and out[0] == f"resuming {tmp_path} from {newest} (step {steps[-1]} of 8)"
    assert_same_run(whole, losses(tmp_path))


def test_a_second_ctrl_c_before_any_checkpoint_says_the_run_starts_over(tmp_path, corpus, capsys, monkeypatch):
    """The second signal's KeyboardInterrupt, raised here in step 2 (as the handler raises it), with
    no checkpoint yet: one line that does not promise a resume; with one, it names it."""
    steps = []

    def global_batch(local, mesh):
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return batch(local, mesh)
    batch = tpu.global_batch
    monkeypatch.setattr(tpu, "global_batch", global_batch)
    argv = flags(tmp_path, corpus, "--max-steps", "3", "--eval-batches", "0")   # the steps' batches only
    code, out, err = run(argv + ["--save-every", "0"], capsys)
    assert code == 130 and train.list_checkpoints(tmp_path) == []
    assert err == ["interrupted: no checkpoint was written, so the same command starts over"]
    steps.clear()
    code, out, err = run(argv + ["--save-every", "1"], capsys)
    assert code == 130 and err == [f"interrupted: run the same command to resume from {tmp_path / 'ckpt-0000001'}"]


def test_a_second_run_into_the_same_out_is_refused_naming_the_first(tmp_path, corpus, tiny_init):
    """Two real processes: the second exits 2 at once with one line naming the first's PID and
    writes nothing; once the first is killed with SIGKILL, the lock is free again."""
    endless = ("--save-every", "0", "--max-steps", "1000000")  # the first runs until it is killed
    first = start(tmp_path, corpus, tiny_init, *endless)
    for line in first.stdout:
        if line.startswith("step      1/"):
            break
    cmd = [sys.executable, "train.py", *script_flags(tmp_path, corpus, tiny_init, *endless)]
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=os.environ | {"JAX_PLATFORMS": "cpu"})
    first.kill()
    first.communicate(timeout=300)
    assert second.returncode == 2 and second.stdout == "", second.stderr
    assert second.stderr.splitlines() == [f"error: --out {tmp_path} is in use by another training run "
                                          f"(PID {first.pid}); wait for it to end, or pick another --out"]
    steps = [r["step"] for r in metrics(tmp_path) if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))             # one run's rows, none interleaved
    with contextlib.ExitStack() as held:
        assert train.lock_run(tmp_path, held) is not None      # free after the kill


def test_checkpoint_loads_in_transformers_and_init_from_starts_at_its_loss(tmp_path, corpus, finished, capsys):
    torch = pytest.importorskip("torch", reason="torch (CPU) is the reference")
    transformers = pytest.importorskip("transformers", reason="transformers is the reference")
    first = finished
    ckpt = first / "ckpt-0000004"
    config, params = hf.load_hf(first)  # a train.py output directory loads its newest checkpoint
    m = transformers.CodeGenForCausalLM.from_pretrained(ckpt).eval()
    tokens = np.arange(20)[None] * 37 % WIDE.vocab_size
    with torch.no_grad():
        theirs = m(torch.tensor(tokens)).logits.numpy()
    assert np.abs(np.asarray(model.forward(params, jnp.asarray(tokens), config)) - theirs).max() <= 1e-4

    # --init-from: fresh optimizer, the same weights: its first val_loss equals the source's last one
    second = tmp_path / "second"
    assert run(flags(second, corpus, "--init-from", str(ckpt), "--max-steps", "1", "--eval-every", "1",
                     "--lr", "0"), capsys)[0] == 0
    assert losses(second)[1][1] == pytest.approx(losses(first)[1][4], abs=1e-5)
