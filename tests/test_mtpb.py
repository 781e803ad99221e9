"""Tests for mtpb.py and mtpb_check.py: loading, the reference truncation and history assembly,
early stops, the chat, sandboxed scoring under both semantics, reports, prompt perplexity, the
command line with a tiny random checkpoint, the record of what made a samples file, outputs
that cannot be written, and the real MTPB file."""
import dataclasses
import io
import json
import random
import re
import sys
import types
from pathlib import Path

import numpy as np
import pytest

import common
import mtpb
import mtpb_check
from common import write_jsonl

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Two small problems in MTPB's format: the second has no max_gen_length, escaped braces in a
# template, dict outputs, and one output more than it has inputs (like problem 57).
FIXTURE = [
    {"id": "1", "name": "add", "description": "", "category": "math", "max_gen_length": 64,
     "prompts": ['Assign the integer {a} to a variable named "x".', 'Add {b} to "x".', 'Print "x".'],
     "inputs": [{"a": 1, "b": 2}, {"a": 5, "b": -1}, {"a": 0, "b": 0}, {"a": 10, "b": 10}, {"a": -3, "b": 3}],
     "outputs": [3, 4, 0, 20, 0]},
    {"id": "2", "name": "length", "description": "", "category": "dict",
     "prompts": ['Assign the string "{s}" to "s".', 'Print the dictionary {{"n": len(s)}}.'],
     "inputs": [{"s": "abc"}, {"s": ""}, {"s": "hello"}, {"s": "a b"}, {"s": "xy"}],
     "outputs": [{"n": 3}, {"n": 0}, {"n": 5}, {"n": 3}, {"n": 2}, {"n": 99}]},
]


@pytest.fixture(scope="module")
def wide():
    """(config, params): a tiny random model with CodeGen's vocabulary."""
    from conftest import WIDE, random_params
    return WIDE, random_params(WIDE)


@pytest.fixture
def problems_file(tmp_path):
    write_jsonl(path := tmp_path / "problems.jsonl", FIXTURE)
    return path


# ----------------------------------------------------------------------------- loading

def test_loader_fills_templates_zips_outputs_and_defaults_the_budget(problems_file):
    p1, p2 = mtpb.load_problems(problems_file)
    assert (p1.id, p1.category, p1.max_gen_length) == ("1", "math", 64)
    assert p1.cases[0].prompts == ('Assign the integer 1 to a variable named "x".', 'Add 2 to "x".', 'Print "x".')
    assert [c.output for c in p1.cases] == [3, 4, 0, 20, 0]
    assert p2.max_gen_length == 256                                # missing -> the reference default
    assert len(p2.cases) == 5 and p2.cases[-1].output == {"n": 2}  # the 6th output is ignored
    assert p2.cases[0].prompts[1] == 'Print the dictionary {"n": len(s)}.'
    assert [p.id for p in mtpb.load_problems(problems_file, ["2"])] == ["2"]


@pytest.mark.parametrize("mutate, message", [
    (lambda rows: rows[1]["prompts"].append("Use {missing}."), r":2: problem 2: template 'Use \{missing\}.'"),
    (lambda rows: rows[0].pop("inputs"), r":1: problem without inputs"),
    (lambda rows: rows[1].update(outputs=[1]), r":2: problem 2: 5 inputs but only 1 outputs"),
    (lambda rows: rows[1].update(id="1"), r":2: problem 1 appears twice"),
])
def test_loader_errors_name_line_problem_and_template(tmp_path, mutate, message):
    rows = json.loads(json.dumps(FIXTURE))
    mutate(rows)
    write_jsonl(path := tmp_path / "p.jsonl", rows)
    with pytest.raises(ValueError, match=message):
        mtpb.load_problems(path)


def test_loader_reports_bad_json_line_and_unknown_ids(tmp_path, problems_file):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(FIXTURE[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        mtpb.load_problems(bad)
    with pytest.raises(ValueError, match=r"unknown problem id\(s\) 7, 9"):
        mtpb.load_problems(problems_file, ["1", "7", "9"])


# ----------------------------------------------------------------------------- truncation

def test_truncate_reference_self_test_and_rules():
    # mtpb_sample.py test_truncate
    assert mtpb.truncate('\nif len_a > len_b:\n    result = a\nelse:\n    result = b\n\n\n\n#') == \
        '\nif len_a > len_b:\n    result = a\nelse:\n    result = b'
    assert mtpb.truncate("print(1)\nx = 2\nprint(x)\ny") == "print(1)\nx = 2\n"              # 2nd ^print
    assert mtpb.truncate("def f():\n    pass\ndef g():\n    pass") == "def f():\n    pass\n"  # 2nd ^def
    assert mtpb.truncate("x = 1  # inline\ny = 2\n# next\nz") == "x = 1  # inline\ny = 2\n"  # ^# only
    assert mtpb.truncate("x = 1<|endoftext|>junk") == "x = 1"
    assert mtpb.truncate("def f():\n    '''doc'''\n'''\nx") == "def f():\n    '''doc'''\n"
    assert mtpb.truncate("x = 1\n\n\ny = 2") == "x = 1"
    assert mtpb.truncate("# a comment first") == ""
    assert mtpb.truncate("    print(1)\nprint(2)\nprint(3)") == "    print(1)\nprint(2)\n"   # indented: not ^print
    assert mtpb.truncate("a = 1\n    # indented comments stay\nb = 2") == "a = 1\n    # indented comments stay\nb = 2"
    assert mtpb.truncate('a = 1\n"""doc"""') == "a = 1\n"


def _cut_like_complete(text, stop):
    """sample.complete's cut: before the earliest stop string or <|endoftext|>."""
    hits = [i for i in (text.find(s) for s in (*stop, "<|endoftext|>")) if i >= 0]
    return text[:min(hits)] if hits else text


def test_early_stops_never_change_the_truncation():
    fragments = ["x = 1", "print(x)", "def f():", "    return 1", "#", " # c", "'''", '"""', "\n", "\n", "\n",
                 "\n", "<|endoftext|>", "pass", "print"]
    rng = random.Random(0)
    for _ in range(5000):
        full = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 14)))
        assert mtpb.truncate(_cut_like_complete(full, mtpb.STOPS)) == mtpb.truncate(full), repr(full)
    # why "\n#" is not among the stops: the cut drops a newline that the truncation keeps
    full = "x = 1\n\n# next turn"
    assert mtpb.truncate(full) == "x = 1\n\n" != mtpb.truncate(_cut_like_complete(full, ("\n#",)))


# ----------------------------------------------------------------------------- generation

def scripted_complete(calls, rambling=("\n# the model goes on\nprint('junk')\n", "\n\n\n\ny = 0\n",
                                       "\n<|endoftext|>x")):
    """A stand-in for sample.complete writing the right code for the fixture's turns, followed by
    rambling that the truncation must remove; sample s of a first turn is tagged `# s{s}`."""
    def complete(texts, max_new_tokens, *, stop, num_samples, seed):
        calls.append(dict(texts=list(texts), max_new_tokens=max_new_tokens, stop=stop,
                          num_samples=num_samples, seed=seed))
        out = []
        for t, text in enumerate(texts):
            prompt = text.splitlines()[-1]
            code = []
            for line in text[text.rindex("np\n\n") + 4:].splitlines():  # single-turn: several prompts
                if m := re.match(r'# Assign the integer (-?\d+)', line):
                    code.append(f"x = {m[1]}")
                elif m := re.match(r'# Add (-?\d+)', line):
                    code.append(f"x = x + {m[1]}")
                elif line == '# Print "x".':
                    code.append("x")  # the last expression: the scorer's AST rewrite prints it
                elif m := re.match(r'# Assign the string "(.*)" to', line):
                    code.append(f"s = {m[1]!r}")
                elif line.startswith("# Print the dictionary"):
                    code.append('print({"n": len(s)})')
                elif not line.startswith("#"):
                    code = []  # code of earlier turns, already written
            assert prompt.startswith("# ") and code
            for s in range(num_samples):
                tag = f"  # s{s}" if num_samples > 1 else ""
                out.append("\n".join(code) + tag + rambling[(t + s) % len(rambling)])
        return out
    return complete


def test_multi_turn_history_matches_the_reference_assembly(problems_file):
    p1 = mtpb.load_problems(problems_file)[0]
    calls = []
    records = mtpb.generate_problem(p1, scripted_complete(calls), n=2, seed=16)
    assert len(calls) == 3 and len(records) == 10
    first = calls[0]
    assert first["num_samples"] == 2 and first["max_new_tokens"] == 64 and first["stop"] == mtpb.STOPS
    assert first["texts"] == [mtpb.PREFIX + f"# {c.prompts[0]}\n" for c in p1.cases]  # one history per case
    assert all(c["num_samples"] == 1 and len(c["texts"]) == 10 for c in calls[1:])
    r = records[3]                                                           # case 1, sample 1
    assert (r["id"], r["case"], r["sample"], r["mode"], r["input"], r["gold_output"]) == \
        ("1", 1, 1, "multi", {"a": 5, "b": -1}, 4)
    pieces = r["prompts_completions"]
    assert pieces[:2] == [mtpb.PREFIX, '# Assign the integer 5 to a variable named "x".\n']
    # each piece of code = truncate(completion) + "\n\n": rambling after <|endoftext|>, a column-0
    # comment, or a blank-line pair is cut, keeping what the reference keeps before it
    assert pieces[2::2] == ["x = 5  # s1\n\n\n", "x = x + -1\n\n\n", "x\n\n\n"]
    assert records[0]["prompts_completions"][2] == "x = 1  # s0\n\n\n"
    assert records[1]["prompts_completions"][2] == "x = 1  # s1\n\n"
    assert r["completions"] == "".join(pieces) and len(pieces) == 7
    # each turn saw exactly the history the reference builds
    assert calls[1]["texts"][3] == "".join(pieces[:4]) and calls[2]["texts"][3] == "".join(pieces[:6])


def test_single_turn_puts_all_prompts_first_with_the_summed_budget(problems_file):
    p1 = mtpb.load_problems(problems_file)[0]
    calls = []
    records = mtpb.generate_problem(p1, scripted_complete(calls), n=1, single_turn=True)
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == 3 * 64
    prompt = "".join(f"# {p}\n" for p in p1.cases[0].prompts)
    assert calls[0]["texts"][0] == mtpb.PREFIX + prompt
    assert records[0]["prompts_completions"][:2] == [mtpb.PREFIX, prompt]
    assert records[0]["completions"] == mtpb.PREFIX + prompt + "x = 1\nx = x + 2\nx\n\n\n"
    assert records[0]["mode"] == "single"


def test_generation_streams_and_resumes(tmp_path, problems_file):
    problems = mtpb.load_problems(problems_file)
    out = tmp_path / "samples.jsonl"
    calls = []
    mtpb.generate(problems, scripted_complete(calls), out, n=1)
    full = out.read_text()
    assert len(full.splitlines()) == 10 and len(calls) == 3 + 2
    mtpb.generate(problems, scripted_complete(calls), out, n=1)           # nothing left to do
    assert len(calls) == 5 and out.read_text() == full
    lines = full.splitlines(keepends=True)
    out.write_text("".join(lines[:7]) + lines[7][:20])                     # killed mid-write
    mtpb.generate(problems, scripted_complete(calls), out, n=1)
    assert len(calls) == 5 + 2                                            # only problem 2 again
    assert sorted(out.read_text().splitlines()) == sorted(full.splitlines())
    with pytest.raises(ValueError, match="holds 'multi' samples"):
        mtpb.generate(problems, scripted_complete(calls), out, n=1, single_turn=True)


# ----------------------------------------------------------------------------- chat

def test_chat_turns_undo_save_and_unknown_commands(tmp_path):
    seen = []

    def write_turn(program):  # a stand-in model: code, then a new column-0 comment to cut away
        seen.append(program)
        return f"x{len(seen)} = {len(seen)}\n# the model rambles on\njunk = 0"

    said = []
    lines = ["make x1", "", "make x2", ":undo", "make x3", ":bogus", f":save {tmp_path / 'prog.py'}", ":save",
             ":show", ":quit", "never read"]
    final = mtpb.chat(write_turn, iter(lines), say=said.append)
    assert seen[0] == mtpb.PREFIX + "# make x1\n"
    assert seen[1] == mtpb.PREFIX + "# make x1\nx1 = 1\n\n\n# make x2\n"   # truncate keeps the "\n"
    expected = mtpb.PREFIX + "# make x1\nx1 = 1\n\n\n# make x3\nx3 = 3\n\n\n"
    assert final == expected and (tmp_path / "prog.py").read_text() == expected
    assert said[0] == "# make x1\nx1 = 1\n\n"
    assert "dropped: # make x2" in said[2] and "unknown command :bogus" in said[4]
    assert said[5].startswith("(saved 12 lines") and "usage: :save FILE" in said[6]
    assert said[-1] == expected.rstrip("\n") and len(seen) == 3


def test_chat_is_the_benchmark_protocol(problems_file):
    """Fed a problem's turns, the chat builds the program generate_problem builds with the same model."""
    problem, complete = mtpb.load_problems(problems_file)[0], scripted_complete([])
    program = mtpb.chat(lambda history: complete([history], 64, stop=mtpb.STOPS, num_samples=1, seed=0)[0],
                        iter(problem.cases[0].prompts), say=lambda text: None)
    assert program == mtpb.generate_problem(problem, complete, n=1)[0]["completions"]


def test_chat_run_executes_the_program_in_the_sandbox():
    said = []
    mtpb.chat(lambda program: 'print("hi from turn")\n', iter(["say hi", ":run"]), say=said.append)
    assert "--- stdout\nhi from turn" in said and said[-1].startswith("(passed")


# ----------------------------------------------------------------------------- scoring rules (in process)

def test_print_last_statement_is_the_reference_rewrite():
    f = "def f(a):\n    return a ** 2\n"
    assert mtpb_check.print_last_statement(f + "f(2)") == f + "print(f(2))"            # mtpb_exec.py's own tests
    assert mtpb_check.print_last_statement(f + "print(f(2))") == f + "print(f(2))"
    assert mtpb_check.print_last_statement("df.groupby('gender')['alco'].value_counts()") == \
        "print(df.groupby('gender')['alco'].value_counts())"
    assert mtpb_check.print_last_statement("x = 2\ny = x + 1") == "x = 2\ny = print(x + 1)"
    loop = "for i in range(3):\n    i"
    assert mtpb_check.print_last_statement(loop) == loop                                  # no .value: kept
    assert mtpb_check.print_last_statement("x = (") == "x = ("                            # does not parse
    assert mtpb_check.print_last_statement("printf(x)") == "printf(x)"                    # name starts with print


def test_equivalence_default_and_reference():
    eq, ref = mtpb_check.equivalent, mtpb_check.reference_equivalent
    assert eq(np.int64(3), 3) and eq(np.float32(0.5), 0.5) and eq(np.bool_(True), True)
    assert eq(np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]]) and eq([(1, 2), (3, 4)], [[1, 2], [3, 4]])
    assert eq(0.1 + 0.2, 0.3) and eq([0.1 + 0.2], [0.3]) and not eq(0.31, 0.3)
    assert eq("True", True) and not eq(1, True) and not eq(True, 1)
    assert eq("5", 5) and eq(5, "5") and eq(2.0, 2) and not eq(2.5, 2)
    assert eq({"a": [1, 2]}, {"a": [1, 2]}) and not eq({"a": 1}, {"a": 2}) and not eq({"a": 1}, {"b": 1})
    assert eq(None, None) and eq("None", None) and not eq(0, None)
    assert not eq("ab", ["a", "b"]) and not eq({1, 2}, [1, 2]) and not eq([1, 2], "[1, 2]")
    # the reference: casts into the gold's type, dict and None unsupported
    assert ref("ab", ["a", "b"]) and ref("5", 5) and ref(2.7, 2) and ref(np.int64(3), 3)
    assert ref("True", True) and not ref(1, True)
    assert ref([(1, 2)], [[1, 2]]) and not ref([0.1 + 0.2], [0.3])
    for value, gold in (({"a": 1}, {"a": 1}), (None, None), (1, None)):
        with pytest.raises((ValueError, TypeError)):
            ref(value, gold)


# ----------------------------------------------------------------------------- scoring in the sandbox

CRAFTED = [  # (name, program, gold, passes by default, passes under --reference-semantics)
    ("wrong", "x = 3\nprint(x + 1)", 3, False, False),
    ("raise after print", "x = 3\nprint(x)\nraise ValueError('late')", 3, False, True),
    ("hang after print", "x = 3\nprint(x)\nwhile True:\n    pass", 3, False, True),
    ("nothing printed", "x = 3\nimport os", 3, False, False),
    ("assignment rewrite", "x = 2\ny = x + 3", 5, True, True),
    ("str vs list", "print('ab')", ["a", "b"], False, True),
    ("none", "print(None)", None, True, False),
    ("exit", "import sys\nprint(3)\nsys.exit(0)", 3, False, False),
]


def _run_cli(capsys, *argv):
    common.run_main(mtpb.main, [str(a) for a in argv])
    return capsys.readouterr().out


def test_scoring_both_semantics_through_the_cli(tmp_path, problems_file, capsys):
    records = [r for p in mtpb.load_problems(problems_file) for r in mtpb.generate_problem(p, scripted_complete([]), 1)]
    records += [{"id": "9", "input": {"name": name}, "gold_output": gold, "completions": program, "category": "crafted"}
                for name, program, gold, _, _ in CRAFTED]
    write_jsonl(samples := tmp_path / "s.jsonl", records)

    out = _run_cli(capsys, "--samples", samples, "--timeout", 3, "--workers", 2, "--problems", problems_file)
    results = [json.loads(line) for line in (tmp_path / "s_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results[:10]] == [True] * 10            # hand-written programs, dicts included
    assert {r["input"]["name"]: r["passed"] for r in results[10:]} == {n: d for n, _, _, d, _ in CRAFTED}
    by_name = {r["input"]["name"]: r["result"] for r in results[10:]}
    assert by_name["hang after print"] == "timed out"
    assert "AssertionError: printed 4, expected 3" in by_name["wrong"]
    assert "fixed semantics" in out and re.search(r"dict\s+1\s+100.00", out) and re.search(r"overall\s+3\s+", out)

    assert "running 18 programs" in out and "ran 18/18 programs" in out and "programs/s" in out
    out = _run_cli(capsys, "--samples", samples, "--timeout", 3, "--workers", 2)   # verdicts reused
    assert "running" not in out and "ran " not in out

    out = _run_cli(capsys, "--samples", samples, "--timeout", 3, "--workers", 2, "--reference-semantics")
    results = [json.loads(line) for line in (tmp_path / "s_results.jsonl").read_text().splitlines()]
    assert [r["passed"] for r in results[:10]] == [True] * 5 + [False] * 5   # dict outputs never pass
    assert {r["input"]["name"]: r["passed"] for r in results[10:]} == {n: ref for n, _, _, _, ref in CRAFTED}
    assert all(r["semantics"] == "reference" for r in results) and "reference semantics" in out


def test_missing_library_or_dataset_is_skipped_not_failed(monkeypatch):
    monkeypatch.setitem(mtpb_check.LIBRARIES, "frobnicate", "frobnicate_not_installed")
    program = "import frobnicate_not_installed\nprint(1)"
    rows = [{"id": "6", "input": {}, "gold_output": 1, "completions": program,
             "prompts_completions": [mtpb.PREFIX, "# Import the frobnicate library.\n", program]},
            {"id": "38", "input": {}, "gold_output": 1, "completions": "# Read ./datasets/train.csv\nprint(1)"}]
    results = mtpb.score(rows)   # nothing reaches the sandbox
    assert [r["result"] for r in results] == ["skipped: missing frobnicate_not_installed",
                                              "skipped: missing file ./datasets/train.csv"]
    summary = mtpb_check.summarize(results)
    assert summary["6"]["scored"] == 0 and "missing frobnicate" in mtpb_check.format_report(summary, "t")


# ----------------------------------------------------------------------------- reports

def _results(pid, category, passed, total, mode="multi"):
    return [{"id": pid, "category": category, "mode": mode, "passed": i < passed,
             "result": "passed" if i < passed else "failed: x"} for i in range(total)]


def test_report_rates_per_problem_category_overall_and_compare(tmp_path, capsys):
    multi = _results("1", "math", 5, 5) + _results("2", "math", 1, 5) + _results("3", "string", 0, 5)
    single = [dict(r, mode="single") for r in
              _results("1", "math", 2, 5) + _results("2", "math", 0, 5) + _results("3", "string", 1, 5)]
    text = mtpb_check.format_report(mtpb_check.summarize(multi), "t")
    assert re.search(r"\b2 math\s+1/5\s+20.00", text)
    assert re.search(r"math\s+2\s+60.00", text) and re.search(r"overall\s+3\s+40.00", text)
    write_jsonl(a := tmp_path / "a_results.jsonl", multi)
    write_jsonl(b := tmp_path / "b_results.jsonl", single)
    out = _run_cli(capsys, "--compare", a, b)
    assert re.search(r"overall\s+3\s+40.00\s+20.00", out) and "multi" in out and "single" in out
    assert "multi is higher: 2, single is higher: 1" in out and "16.98" in out
    with pytest.raises(SystemExit) as e:
        common.run_main(mtpb.main, ["--compare", str(tmp_path / "c.jsonl"), str(b)])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- perplexity

class ByteTokenizer:
    """One token per character: enough to check which positions are scored."""
    def encode(self, text):
        return types.SimpleNamespace(ids=[1 + ord(c) % 100 for c in text])


def test_prompt_perplexity_equals_direct_log_softmax(wide):
    import jax
    import model
    import model_fast
    config, params = wide
    forward = jax.jit(lambda ids: model.forward(params, ids, config))
    tok = ByteTokenizer()
    records = [{"id": "1", "mode": "multi", "prompts_completions": [mtpb.PREFIX, "# Assign 1.\n", "x = 1\n\n",
                                                                    "# Print x.\n", "print(x)\n\n"]},
               {"id": "1", "mode": "multi", "prompts_completions": [mtpb.PREFIX, "# Assign 1.\n", "x = 12345\n\n",
                                                                    "# Print x.\n", "x\n\n"]},
               {"id": "2", "mode": "multi", "prompts_completions": [mtpb.PREFIX, "# Only one turn.\n", "pass\n\n"]}]

    def direct(sequences):  # the whole sequence at once, log_softmax in numpy, prompt positions only
        rows = [[i for p in pieces for i in tok.encode(p).ids] for pieces in sequences]
        # right-padded to n_ctx: one shape, one compilation; causal, so no real position's logits change
        every_logits, nll, count = forward(np.array([ids + [0] * (config.n_ctx - len(ids)) for ids in rows])), 0.0, 0
        for pieces, ids, logits in zip(sequences, rows, every_logits):
            prompt = [k % 2 == 1 for k, p in enumerate(pieces) for _ in tok.encode(p).ids]
            shifted = np.asarray(logits[:len(ids)], np.float64) - np.asarray(logits[:len(ids)]).max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            for t in range(1, len(ids)):
                if prompt[t]:
                    nll, count = nll - logp[t - 1, ids[t]], count + 1
        return np.exp(nll / count)

    got = mtpb.perplexities(records, params, config, tok, batch_size=2)
    split = mtpb.perplexities(records, model_fast.decoding_layout(params), config, tok, batch_size=3)  # as sample.load gives
    assert split["1"] == pytest.approx(got["1"], rel=1e-5) and split["2"] == pytest.approx(got["2"], rel=1e-5)
    multi_1 = direct([r["prompts_completions"][:-1] for r in records[:2]])
    single_1 = direct([[mtpb.PREFIX, "# Assign 1.\n# Print x.\n"]] * 2)
    assert got["1"]["multi"] == pytest.approx(multi_1, rel=1e-5)
    assert got["1"]["single"] == pytest.approx(single_1, rel=1e-5)
    assert got["1"]["multi"] != pytest.approx(got["1"]["single"], rel=1e-3)  # the code in between matters
    assert got["2"]["multi"] == pytest.approx(got["2"]["single"], rel=1e-5)  # one turn: the same text
    summary = mtpb_check.summarize(_results("1", "math", 1, 2) + _results("2", "math", 2, 2))
    text = mtpb.format_perplexity(got, summary, "multi")
    assert "Pearson r" in text and re.search(r"mean multi-turn prompt perplexity over 2 problems", text)


# ----------------------------------------------------------------------------- the real benchmark file

def test_the_real_mtpb_file_loads_and_every_prompt_fills():
    path = DATA / "mtpb.jsonl"
    if not path.exists():
        pytest.skip(f"{path} not present (copy codegen1/benchmark/mtpb.jsonl from salesforce/CodeGen)")
    problems = mtpb.load_problems(path)
    assert len(problems) == 115 and sum(len(p.cases[0].prompts) for p in problems) == 514
    assert all(len(p.cases) == 5 and len({len(c.prompts) for c in p.cases}) == 1 for p in problems)
    by_id = {p.id: p for p in problems}
    assert [c.output for c in by_id["57"].cases] == [1, 5, 1, 2, 10010]
    assert {by_id[str(i)].max_gen_length for i in range(39, 46)} == {256}
    assert by_id["18"].max_gen_length == 512
    assert mtpb.PREFIX + mtpb.wrap(by_id["1"].cases[0].prompts[0]) == \
        '# Import libraries.\n\nimport numpy as np\n\n# Assign the string "abcde" to a variable named "my_string".\n'
    counts = {}
    for p in problems:
        counts[p.category] = counts.get(p.category, 0) + 1
    assert counts == {"array": 23, "data science": 23, "math": 22, "string": 21, "algorithm": 21, "dict": 3, "class": 2}


def test_cli_errors_are_one_line_exit_2_and_leave_no_file(tmp_path, problems_file, checkpoint, capsys):
    corrupt = checkpoint(128)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    (bad := tmp_path / "bad.jsonl").write_text('{"id": 1, "input": {}, "gold_output": 1, "completions": "x"}\n{\n')
    (empty := tmp_path / "empty.jsonl").write_text("")
    before = sorted(tmp_path.parent.rglob("*"))
    for argv, message in ((["--init-from", corrupt, "--problems", problems_file], str(corrupt)),
                          (["--init-from", tmp_path / "nothing", "--problems", problems_file], "no checkpoint at"),
                          (["--init-from", corrupt, "--problems", problems_file, "--top-p", 0], "--top-p 0"),
                          (["--samples", tmp_path / "none.jsonl"], "error: cannot read samples file"),
                          (["--samples", bad], "bad.jsonl:2: not valid JSON"),
                          (["--problems", problems_file, "--ids", "1,99", "--init-from", tmp_path],
                           "unknown problem id(s) 99"),
                          (["--problems", problems_file], "give --init-from DIR and --problems FILE"),
                          (["--samples", bad, "--n", "0"], "--n 0 is out of range"),
                          (["--samples", bad, "--out", bad], "--out names the results file"),
                          (["--samples", empty], "empty.jsonl: no samples"),
                          (["--chat"], "--chat needs the model"),
                          (["--samples", bad, "--perplexity"], "--perplexity needs the model"),
                          (["--compare", bad, bad], "has not been scored yet")):
        with pytest.raises(SystemExit) as e:
            common.run_main(mtpb.main, [str(a) for a in argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and err.count("\n") == 1, err
    assert sorted(tmp_path.parent.rglob("*")) == before                # no samples, no results


# ----------------------------------------------------------------------------- with a model

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, wide):
    """checkpoint(n_ctx): the `wide` model with a context of n_ctx tokens (the weights do not
    depend on it), saved in a fresh directory."""
    import hf

    def save(n_ctx):
        path = tmp_path_factory.mktemp("ckpt")
        hf.save_hf(wide[1], dataclasses.replace(wide[0], n_ctx=n_ctx), path)
        return path
    return save


def test_generate_and_score_in_a_short_context_writes_beside_the_checkpoint(checkpoint, problems_file, tmp_path,
                                                                            monkeypatch, capsys):
    ckpt = checkpoint(64)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    first = _run_cli(capsys, "--init-from", ckpt, "--problems", problems_file, "--ids", "1", "--temperature", 0)
    assert "note: the model's 64-token context cuts turns short of their 64-token budget" in first
    assert "generated 5/5 programs" in first and "programs/s" in first and "MTPB multi-turn" in first
    records = [json.loads(line) for line in (ckpt / "mtpb_multi.jsonl").read_text().splitlines()]
    assert [(r["id"], r["case"]) for r in records] == [("1", c) for c in range(5)]
    assert all(len(r["prompts_completions"]) == 7 for r in records)
    assert len((ckpt / "mtpb_multi_results.jsonl").read_text().splitlines()) == 5
    assert list(cwd.iterdir()) == []                                   # nothing in the current directory
    again = _run_cli(capsys, "--init-from", ckpt, "--problems", problems_file, "--ids", "1", "--temperature", 0)
    assert "5 rows there already, 0 to make" in again and "generated" not in again


def test_cli_chat_from_piped_stdin(checkpoint, capsys, monkeypatch, tmp_path):
    ckpt = checkpoint(128)
    long_line = "x " * 65                                              # ~66 tokens: one turn fits, two do not
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"count to three\n:save {tmp_path / 'p.py'}\n:undo\n"
                                                  f"{long_line}\n{long_line}\n:show\n"))
    out = _run_cli(capsys, "--init-from", ckpt, "--chat", "--temperature", 0)
    program = (tmp_path / "p.py").read_text()
    assert out.startswith("note: the model's 128-token context cuts turns short of their 256-token budget\n"
                          "# count to three\n") and "> " not in out     # no prompt decoration when piped
    assert program.startswith(mtpb.PREFIX + "# count to three\n") and program.endswith("\n\n")
    assert "(turn not added: the program fills the 128-token context" in out
    assert out.count(f"# {long_line.strip()}") == 2                    # turn 1 as written, then in :show


# ----------------------------------------------------------------------------- what made a samples file

def _fake_sample_complete(calls, fail_on=None):
    """sample.complete answering every text with a program made of its seed and flags; raises
    KeyboardInterrupt (a Ctrl-C) on the first text that holds `fail_on`."""
    def complete(params, config, texts, max_new_tokens, *, seed=0, num_samples=1, top_k=0, **kw):
        calls.append(seed)
        if fail_on is not None and any(fail_on in t for t in texts):
            raise KeyboardInterrupt
        return [f"x = {seed % 1000 + j}  # k {top_k}\nprint(x)" for _ in texts for j in range(num_samples)]
    return complete


def _cli(capsys, *argv):
    from conftest import run_cli
    return run_cli(mtpb.main, argv, capsys)


def test_mtpb_runs_with_another_n_problem_set_or_flag_are_refused(checkpoint, problems_file, monkeypatch, capsys):
    import sample
    monkeypatch.setattr(sample, "complete", _fake_sample_complete([]))
    ckpt = checkpoint(128)
    smoke = ["--init-from", ckpt, "--problems", problems_file, "--workers", 2, "--timeout", 3]
    code, out, _ = _cli(capsys, *smoke, "--ids", "1", "--n", 2)
    assert code == 0 and "generated 10/10 programs" in out
    made_by = json.loads((ckpt / "mtpb_multi_made_by.json").read_text())
    assert made_by["step"] is None and made_by["n"] == 2 and made_by["problems"] == 1  # a Hugging Face dir
    before = (ckpt / "mtpb_multi.jsonl").read_text()
    for flags, message in ((["--n", 1], "problems 1 -> 2; problems_sha256 "),         # the full run after a smoke run
                           (["--ids", "2", "--n", 2], "problems_sha256 "),
                           (["--ids", "1", "--n", 1], "n 2 -> 1"),
                           (["--ids", "1", "--n", 2, "--top-k", 0, "--temperature", 0.8],
                            "temperature 0.2 -> 0.8; top_k 50 -> 0")):
        code, out, err = _cli(capsys, *smoke, *flags)
        assert code == 2 and err.count("\n") == 1 and f"mtpb_multi.jsonl was made otherwise: {message}" in err, err
        assert "generated" not in out and (ckpt / "mtpb_multi.jsonl").read_text() == before
    code, out, _ = _cli(capsys, *smoke, "--ids", "1", "--n", 2, "--single-turn")   # another file: its own settings
    assert code == 0 and (ckpt / "mtpb_single_made_by.json").exists()


def test_mtpb_resumed_run_writes_the_rows_of_an_uninterrupted_one(checkpoint, problems_file, tmp_path, monkeypatch,
                                                                   capsys):
    import sample
    ckpt = checkpoint(128)
    run = ["--init-from", ckpt, "--problems", problems_file, "--workers", 2, "--timeout", 3, "--n", 2]
    monkeypatch.setattr(sample, "complete", _fake_sample_complete([]))
    assert _cli(capsys, *run, "--out", tmp_path / "once.jsonl")[0] == 0
    monkeypatch.setattr(sample, "complete", _fake_sample_complete([], fail_on='"s".'))   # in problem 2
    assert _cli(capsys, *run, "--out", tmp_path / "twice.jsonl")[0] == 130
    assert len((tmp_path / "twice.jsonl").read_text().splitlines()) == 10                # problem 1 kept
    monkeypatch.setattr(sample, "complete", _fake_sample_complete([]))
    code, out, _ = _cli(capsys, *run, "--out", tmp_path / "twice.jsonl")
    assert code == 0 and "10 rows there already, 10 to make" in out
    assert (tmp_path / "twice.jsonl").read_text() == (tmp_path / "once.jsonl").read_text()
    assert (tmp_path / "twice_results.jsonl").read_text() == (tmp_path / "once_results.jsonl").read_text()


def test_mtpb_outputs_that_cannot_be_written_are_refused_first(checkpoint, problems_file, tmp_path, monkeypatch,
                                                                 capsys):
    import subprocess
    import sample
    from test_humaneval import _read_only
    monkeypatch.setattr(sample, "load", None)                          # a call would be a TypeError
    (tmp_path / "file").write_text("")
    code, _, err = _cli(capsys, "--init-from", checkpoint(128), "--problems", problems_file,
                        "--out", tmp_path / "file" / "s.jsonl")
    assert code == 2 and err.startswith(f"error: cannot write {tmp_path / 'file' / 's.jsonl'} (")

    records = [r for p in mtpb.load_problems(problems_file) for r in mtpb.generate_problem(p, scripted_complete([]), 1)]
    (folder := tmp_path / "ro").mkdir()
    write_jsonl(samples := folder / "s.jsonl", records)
    script = "import sys, common, mtpb; common.run_main(mtpb.main, sys.argv[1:])"
    run = subprocess.run(_read_only(folder) + [sys.executable, "-c", script, "--samples", str(samples)],
                         cwd=Path(mtpb.__file__).parent, capture_output=True, text=True, timeout=300)
    folder.chmod(0o755)
    assert run.returncode == 2 and run.stderr.startswith(f"error: cannot write {folder / 's_results.jsonl'} ("), \
        run.stderr
    assert "running" not in run.stdout and sorted(folder.iterdir()) == [samples]
    code, out, _ = _cli(capsys, "--samples", samples, "--out", tmp_path / "r.jsonl", "--workers", 2, "--timeout", 3)
    assert code == 0 and f"-> {tmp_path / 'r.jsonl'}" in out
    assert [json.loads(line)["passed"] for line in (tmp_path / "r.jsonl").read_text().splitlines()] == [True] * 10
