"""MTPB, the Multi-Turn Programming Benchmark (CodeGen paper §3, arXiv 2203.13474): multi-turn
and single-turn program synthesis, sandboxed scoring, and prompt perplexity.

Each of the 115 problems is a list of natural-language turns ("Assign the string "{A}" to a
variable named "my_string".", ...) with 5 test inputs. For every test input separately the
model writes a program turn by turn, exactly like the reference sampler
(salesforce/CodeGen `codegen1/benchmark/mtpb_sample.py`):

    history = "# Import libraries.\n\nimport numpy as np\n\n"
    for each turn:  history += "# {turn prompt}\n";  history += truncate(model(history)) + "\n\n"

The program passes when the first positional argument of its last `print` call equals the gold
output (`codegen1/benchmark/mtpb_exec.py`). The pass rate of a problem is passed / (n × 5).
`--single-turn` is the paper's baseline: all turn prompts at once, one generation.

By default the scorer fixes the reference scorer's bugs (a program that raises or times out
after printing the right value passed; dict and None outputs could never pass; "ab" matched
['a', 'b']); `--reference-semantics` reproduces its rules for comparing with published numbers.
Every program runs in its own sandboxed interpreter (sandbox.py).

    python mtpb.py --init-from DIR --problems ../shared/data/mtpb.jsonl            # generate + score
    python mtpb.py --init-from DIR --problems ../shared/data/mtpb.jsonl --single-turn
    python mtpb.py --samples mtpb_multi.jsonl [--reference-semantics]             # score a samples file
    python mtpb.py --compare mtpb_multi_results.jsonl mtpb_single_results.jsonl   # the paper's table
    python mtpb.py --init-from DIR --samples mtpb_multi.jsonl --perplexity         # prompt perplexity
"""
import argparse
import ast
import builtins
import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import io
import json
import math
import os
import re
import reprlib
import signal
import sys
import time
import zlib
from pathlib import Path

import sandbox
from common import read_jsonl, write_jsonl
from sample import MTPB_PREFIX, truncate

# ----------------------------------------------------------------------------- problems

PREFIX = MTPB_PREFIX         # mtpb_sample.py: once at the top of every program
DEFAULT_MAX_GEN_LENGTH = 256  # mtpb_sample.py default; problems 39-45 lack the field


def wrap(prompt):
    """A turn's prompt becomes one comment line (mtpb_sample.py `wrap`)."""
    return f"# {prompt}\n"


@dataclasses.dataclass(frozen=True)
class Case:
    input: dict
    output: object        # the gold output, as loaded from JSON
    prompts: tuple        # the turn prompts filled with this input


@dataclasses.dataclass(frozen=True)
class Problem:
    id: str
    category: str
    max_gen_length: int   # new-token budget of every turn
    cases: tuple          # of Case; one independently written program per case


def load_problems(path, ids=None):
    """Problems of an MTPB jsonl, sorted by id, every template filled for every test input.

    Like the reference, inputs and outputs are zipped: problem 57's 6th output has no input
    and is ignored. A ValueError (one line, with the line number) for anything malformed.
    """
    problems = {}
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        for key, kind, what in (("id", (str, int), "string"), ("prompts", list, "list"), ("inputs", list, "list"),
                                ("outputs", list, "list"), ("category", str, "string")):
            if not isinstance(row.get(key), kind):
                raise ValueError(f"{where}: field {key!r} is missing or not a {what}")
        pid = str(row["id"])
        if pid in problems:
            raise ValueError(f"{where}: problem {pid} appears twice")
        if not row["prompts"] or not all(isinstance(p, str) for p in row["prompts"]):
            raise ValueError(f"{where}: problem {pid}: 'prompts' must be a non-empty list of strings")
        if not row["inputs"] or not all(isinstance(i, dict) for i in row["inputs"]):
            raise ValueError(f"{where}: problem {pid}: 'inputs' must be a non-empty list of objects "
                             f"(template values)")
        if len(row["outputs"]) < len(row["inputs"]):
            raise ValueError(f"{where}: problem {pid}: {len(row['inputs'])} inputs but only "
                             f"{len(row['outputs'])} outputs")
        budget = row.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"{where}: problem {pid}: max_gen_length must be a positive integer")
        cases = []
        for inp, out in zip(row["inputs"], row["outputs"]):
            filled = []
            for template in row["prompts"]:
                try:
                    filled.append(template.format(**inp))  # str.format like the reference: lists as reprs
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"{where}: problem {pid}: template {template!r} cannot be filled from "
                                     f"input {inp!r} ({type(e).__name__}: {e})") from None
            cases.append(Case(inp, out, tuple(filled)))
        problems[pid] = Problem(pid, row["category"], budget, tuple(cases))
    if ids is not None:
        unknown = [i for i in ids if i not in problems]
        if unknown:
            raise ValueError(f"unknown problem id(s) {', '.join(unknown)} (not in {path})")
        problems = {i: problems[i] for i in ids}
    return sorted(problems.values(), key=lambda p: int(p.id) if p.id.isdigit() else p.id)


def parse_ids(text):
    """'1,2,5' -> ['1', '2', '5']."""
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not ids:
        raise ValueError(f"--ids {text!r} names no problem; give ids like 1,2,5")
    return ids


# ----------------------------------------------------------------------------- truncation

# `truncate` (the reference's cut of one turn's completion) and the prefix live in sample.py,
# which the chat shares with this benchmark.

# Stop strings for early stopping. `sample.complete` cuts the text *before* the first stop string
# (and before <|endoftext|>), so a stop is exact, truncate(full) == truncate(stopped), only if the
# truncation itself would cut where the stop string begins. "\n\n\n" is the one terminal with that
# property. "\n#" is not: truncate keeps that "\n" ("x = 1\n\n# next" -> "x = 1\n\n") and it cannot
# be put back without knowing whether a stop or the end of text ended the completion.
STOPS = ("\n\n\n",)


# ----------------------------------------------------------------------------- generation


def _turn_seed(seed, problem_id, turn):
    """A fixed sampling seed per (run seed, problem, turn), so a resumed run repeats itself."""
    return zlib.crc32(f"{seed}/{problem_id}/{turn}".encode())


def generate_problem(problem, complete, n, single_turn=False, seed=16):
    """The n × 5 programs of one problem as samples records, all rows advanced together.

    `complete(texts, max_new_tokens, *, stop, num_samples, seed) -> list[str]` returns, prompt-major,
    `num_samples` completions per text (sample.complete with the model bound). Row r writes the
    program of test case r // n, sample r % n; on the first turn the n rows of a case share one
    history, which is prefilled once.
    """
    mode = "single" if single_turn else "multi"
    if single_turn:  # all turns as consecutive comment lines, one generation with all the budgets
        turns = [["".join(wrap(p) for p in case.prompts)] for case in problem.cases]
        budget = problem.max_gen_length * len(problem.cases[0].prompts)
    else:
        turns = [[wrap(p) for p in case.prompts] for case in problem.cases]
        budget = problem.max_gen_length
    rows = [[PREFIX] for _ in range(len(problem.cases) * n)]   # pieces: prefix, prompt, code, prompt, code, ...
    for t in range(len(turns[0])):
        for r, pieces in enumerate(rows):
            pieces.append(turns[r // n][t])
        histories = ["".join(pieces) for pieces in rows]
        first = t == 0
        completions = complete(histories[::n] if first else histories, budget, stop=STOPS,
                               num_samples=n if first else 1, seed=_turn_seed(seed, problem.id, t))
        if len(completions) != len(rows):
            raise RuntimeError(f"complete() returned {len(completions)} completions for {len(rows)} rows")
        for pieces, completion in zip(rows, completions):
            pieces.append(truncate(completion) + "\n\n")
    return [{"id": problem.id, "input": problem.cases[r // n].input, "gold_output": problem.cases[r // n].output,
             "completions": "".join(pieces), "prompts_completions": pieces, "mode": mode,
             "case": r // n, "sample": r % n, "category": problem.category}
            for r, pieces in enumerate(rows)]


def _drop_torn_tail(path):
    """A kill while appending can leave half a line; cut the file back to its last full line."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[:data.rfind(b"\n") + 1])
        print(f"{path}: dropped an incomplete last line (interrupted write)")


def _duration(seconds):
    return f"{seconds / 3600:.1f}h" if seconds >= 5400 else f"{seconds / 60:.1f}m" if seconds >= 90 else f"{seconds:.0f}s"


def generate(problems, complete, out_path, n=1, single_turn=False, seed=16):
    """Append the samples of every problem not yet complete in `out_path` (resumable), one
    problem at a time, printing throughput and ETA."""
    out_path, mode = Path(out_path), ("single" if single_turn else "multi")
    have = set()
    if out_path.exists():
        _drop_torn_tail(out_path)
        for lineno, r in read_jsonl(out_path, "samples file"):
            if r.get("mode") != mode:
                raise ValueError(f"{out_path}:{lineno}: holds {r.get('mode')!r} samples and this run makes "
                                 f"{mode!r} ones; pass another --out")
            have.add((str(r.get("id")), r.get("case"), r.get("sample")))
    todo = [p for p in problems
            if any((p.id, k, s) not in have for k in range(len(p.cases)) for s in range(n))]
    print(f"{len(problems) - len(todo)} of {len(problems)} problems already in {out_path}; "
          f"generating {len(todo)} ({mode}-turn, n={n})")
    start, programs = time.time(), 0
    with out_path.open("a", encoding="utf-8") as f:
        for i, problem in enumerate(todo, 1):
            records = [r for r in generate_problem(problem, complete, n, single_turn, seed)
                       if (r["id"], r["case"], r["sample"]) not in have]
            f.write("".join(json.dumps(r) + "\n" for r in records))
            f.flush()
            programs += len(records)
            elapsed = time.time() - start
            print(f"problem {problem.id} ({i}/{len(todo)}): {programs / elapsed:.2f} programs/s, "
                  f"ETA {_duration(elapsed / i * (len(todo) - i))}", flush=True)


# ----------------------------------------------------------------------------- scoring, child side
# The functions of this section run inside the sandboxed interpreter: `checker_program` pastes
# their source into the program it hands to the sandbox, with the imports of _CHILD_HEADER.

FLOAT_TOLERANCE = 1e-6  # mtpb_exec.py check_equivalence: abs(o1 - o2) < 1e-6


def print_last_statement(code):
    """The reference's AST rewrite (mtpb_exec.py `rewrite_ast_with_print`): unless the last
    top-level statement is a call of a name starting with `print`, wrap that statement's `.value`
    in print(...). It acts on any statement with a `.value`: `y = x + 1` becomes `y = print(x + 1)`.
    Code whose last statement has no `.value` (for, if, import) or does not parse is kept as is."""
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        try:
            if last.value.func.id.startswith("print"):
                return code
        except AttributeError:
            pass
        last.value = ast.Call(func=ast.Name(id="print", ctx=ast.Load()), args=[last.value], keywords=[])
        return ast.unparse(ast.fix_missing_locations(tree))
    except Exception:  # the reference prints the error and runs the code unchanged
        return code


def to_plain(x):
    """numpy scalars and arrays, pandas Series and tuples as Python scalars and lists, recursively."""
    np = sys.modules.get("numpy")  # no numpy loaded: no numpy values to convert
    if str(type(x)) == "<class 'pandas.core.series.Series'>":
        x = x.to_numpy()
    if np is not None and isinstance(x, (np.ndarray, np.generic)):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        return {(k.item() if np is not None and isinstance(k, np.generic) else k): to_plain(v) for k, v in x.items()}
    return x


def same(value, gold):
    """Structural equality with gold (a JSON value): same kinds all the way down, numbers within
    FLOAT_TOLERANCE, bools only equal to bools."""
    if gold is None or isinstance(gold, (bool, str)):
        return type(value) is type(gold) and value == gold
    if isinstance(gold, (int, float)):
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and abs(value - gold) < FLOAT_TOLERANCE)
    if isinstance(gold, list):
        return (isinstance(value, list) and len(value) == len(gold)
                and all(same(v, g) for v, g in zip(value, gold)))
    if isinstance(gold, dict):
        return (isinstance(value, dict) and value.keys() == gold.keys()
                and all(same(value[k], gold[k]) for k in gold))
    return False


def equivalent(value, gold):
    """The default rule: numpy/pandas/tuples converted as the reference does, then `same`. Between
    top-level scalars the printed text decides, as in the reference's casts (True vs "True",
    5 vs "5", None vs "None", 2.5 vs "2.5"); nothing is ever cast into a container ("ab" is not
    ['a', 'b']), and dict and None compare like any other value."""
    value = to_plain(value)
    if same(value, gold):
        return True
    scalars = (type(None), bool, int, float, str)
    if not (isinstance(gold, scalars) and isinstance(value, scalars)):
        return False
    if isinstance(gold, (int, float)) and not isinstance(gold, bool) and isinstance(value, str):
        try:
            return abs(float(value) - gold) < FLOAT_TOLERANCE
        except ValueError:
            return False
    return str(value) == str(gold)


def reference_equivalent(o1, o2):
    """mtpb_exec.py `check_equivalence(o1=printed, o2=gold)`, rule for rule: a few numpy types
    become Python ones, a list of tuples a list of lists; on a type mismatch a bool gold compares
    as text and anything else is cast `type(gold)(printed)` ("ab" -> ['a', 'b']); dict and None
    are unsupported types and raise ValueError."""
    np = sys.modules.get("numpy")
    if str(type(o1)) == "<class 'pandas.core.series.Series'>":
        o1, o2 = o1.to_numpy(), np.array(o2)
    elif type(o1) == list:
        if len(o1) > 0 and type(o1[0]) == tuple:
            o1 = [list(t) for t in o1]
    elif np is not None and type(o1) in (np.uint8, np.int16, np.int32, np.int64):
        o1 = int(o1)
    elif np is not None and type(o1) in (np.float16, np.float32, np.float64):
        o1 = float(o1)
    elif np is not None and type(o1) == np.bool_:
        o1 = bool(o1)
    elif np is not None and type(o1) == np.ndarray:
        o1 = o1.tolist()
    if type(o1) != type(o2):
        if type(o2) == bool:
            o1, o2 = str(o1), str(o2)
        else:
            o1 = type(o2)(o1)
    if type(o1) in (str, int, set, list, bool, tuple):
        return o1 == o2
    if type(o1) == float:
        return abs(o1 - o2) < FLOAT_TOLERANCE
    if np is not None and type(o1) == np.ndarray:
        return np.allclose(o1, o2)
    raise ValueError(f"Unsupported type {type(o1)}")


def check_program(program, gold, reference_semantics, time_limit):
    """Run `program` with a print hook and raise AssertionError unless its last printed value
    matches `gold`; the sandbox's verdict 'passed' then means the program passed.

    Default: any exception (the program's included) fails. Reference semantics (mtpb_exec.py
    `do_exec`): the program's exceptions are swallowed, and an in-process alarm after `time_limit`
    seconds raises one, so a crash or a hang after the right print still passes."""
    printed = []  # the positional arguments of every print call (the reference's print_stack)
    real_print = builtins.print

    def print(*args, **kwargs):  # the program's `print`, put in its globals like the reference's hook
        printed.append(args)
        return real_print(*args, **kwargs)

    class Discard(io.TextIOBase):  # the reference captured stdout; nothing reads it
        def write(self, s):
            return len(s)

    code = print_last_statement(program)
    env = {"__name__": "__main__", "print": print}
    with contextlib.redirect_stdout(Discard()):
        if reference_semantics:
            def alarm(signum, frame):
                raise TimeoutError("Timed out!")  # an Exception, as the reference's TimeoutException
            signal.signal(signal.SIGALRM, alarm)
            signal.setitimer(signal.ITIMER_REAL, time_limit)
            try:
                exec(code, env)
            except Exception:
                pass
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        else:
            exec(code, env)
    if not printed:
        raise AssertionError("the program printed nothing")
    if not printed[-1]:
        raise AssertionError("the last print call had no argument")
    value = printed[-1][0]
    match = reference_equivalent(value, gold) if reference_semantics else equivalent(value, gold)
    if not match:
        raise AssertionError(f"printed {reprlib.repr(value)}, expected {reprlib.repr(gold)}")


# ----------------------------------------------------------------------------- scoring, parent side

_CHILD_HEADER = """\
import ast, builtins, contextlib, io, json, os, random, reprlib, signal, sys
# Many programs run side by side: one BLAS thread each. Seeded so random problems (20, 23) repeat.
os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
random.seed(0)
try:
    import numpy
    numpy.random.seed(0)
except ImportError:
    pass
"""
_CHILD_FUNCTIONS = (print_last_statement, to_plain, same, equivalent, reference_equivalent, check_program)
REFERENCE_GRACE = 3.0  # s the sandbox waits beyond the in-process alarm of --reference-semantics


@functools.cache
def _child_source():
    return "\n\n".join([_CHILD_HEADER, f"FLOAT_TOLERANCE = {FLOAT_TOLERANCE!r}"]
                       + [inspect.getsource(f) for f in _CHILD_FUNCTIONS])


def checker_program(program, gold, reference_semantics=False, time_limit=10.0):
    """The source the sandbox runs for one sample: the child functions, then one check."""
    return (f"{_child_source()}\n\ncheck_program({program!r}, json.loads({json.dumps(gold)!r}), "
            f"{bool(reference_semantics)}, {float(time_limit)!r})\n")


# Prompt words naming a third-party library -> module (eval.md §5: problems 6, 14, 38, 46).
LIBRARIES = {"pandas": "pandas", "sklearn": "sklearn"}
_DATASET = re.compile(r"\./datasets/[\w.-]+")  # CSVs of problems 38 and 46, shipped nowhere


@functools.cache
def _installed(module):
    return importlib.util.find_spec(module) is not None


def missing_requirement(record):
    """'missing pandas' (etc.) when the record's prompts need what this machine cannot give the
    program, else None. The prompts are the odd pieces of `prompts_completions`; records without
    them are judged by their whole program text."""
    pieces = record.get("prompts_completions")
    text = "".join(pieces[1::2]) if isinstance(pieces, list) else record["completions"]
    for word, module in LIBRARIES.items():
        if re.search(rf"\b{word}\b", text) and not _installed(module):
            return f"missing {module}"
    found = _DATASET.search(text)
    return f"missing file {found.group()}" if found else None


def read_samples(path):
    """Records of a samples file (CodeGen reference format: id, input, gold_output, completions)."""
    records = []
    for lineno, r in read_jsonl(path, "samples file"):
        lacking = [k for k in ("id", "input", "gold_output", "completions") if k not in r]
        if lacking:
            raise ValueError(f"{path}:{lineno}: record lacks {', '.join(lacking)}")
        if not isinstance(r["completions"], str):
            raise ValueError(f"{path}:{lineno}: 'completions' must be the program as one string")
        records.append({**r, "id": str(r["id"])})
    return records


def results_path(samples_path):
    """FILE.jsonl -> FILE_results.jsonl beside it."""
    p = Path(samples_path)
    return p.with_name((p.stem if p.suffix == ".jsonl" else p.name) + "_results.jsonl")


def score(records, reference_semantics=False, timeout=10.0, workers=None, memory_mb=2048, cache=None):
    """Records with `passed` (bool), `result` ('passed', 'failed: <reason>', 'timed out',
    'skipped: missing X') and `semantics` added. Identical (program, gold) pairs run once;
    `cache` maps such a pair to a result already known."""
    semantics = "reference" if reference_semantics else "fixed"
    verdicts, jobs = dict(cache or {}), {}
    keys = [(r["completions"], json.dumps(r["gold_output"], sort_keys=True)) for r in records]
    skips = [missing_requirement(r) for r in records]
    for r, key, skip in zip(records, keys, skips):
        if skip is None and key not in verdicts and key not in jobs:
            jobs[key] = checker_program(r["completions"], r["gold_output"], reference_semantics, timeout)
    if jobs:
        print(f"running {len(jobs)} programs ({len(records)} samples, {semantics} semantics)", flush=True)
        start = time.time()

        def progress(done, total):
            if done % 50 == 0 or done == total:
                rate = done / max(time.time() - start, 1e-9)
                print(f"  {done}/{total} programs, {rate:.1f}/s, ETA {_duration((total - done) / rate)}", flush=True)

        limit = timeout + REFERENCE_GRACE if reference_semantics else timeout
        runs = sandbox.run_many(list(jobs.values()), timeout=limit, workers=workers, memory_mb=memory_mb,
                                progress=progress)
        for key, run in zip(jobs, runs):
            verdicts[key] = run.status if run.status in ("passed", "timed out") else f"{run.status}: {run.reason}"
    out = []
    for r, key, skip in zip(records, keys, skips):
        result = f"skipped: {skip}" if skip else verdicts[key]
        out.append({**r, "passed": result == "passed", "result": result, "semantics": semantics})
    return out


# ----------------------------------------------------------------------------- report


def summarize(results, categories=None):
    """{problem id: {'category', 'passed', 'scored', 'skipped'}} from results records; the
    category comes from the record, else from `categories` (id -> category)."""
    per = {}
    for r in results:
        pid = str(r["id"])
        cat = r.get("category") or (categories or {}).get(pid, "?")
        p = per.setdefault(pid, {"category": cat, "passed": 0, "scored": 0, "skipped": None})
        if str(r.get("result", "")).startswith("skipped"):
            p["skipped"] = r["result"]
        else:
            p["scored"] += 1
            p["passed"] += bool(r["passed"])
    return dict(sorted(per.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]))


def _rates(summary):
    """{row label: (passed, scored, problems)} per category and 'overall' (passes / scored programs,
    the reference's aggregate)."""
    rows = {}
    for p in summary.values():
        if p["scored"]:
            for label in (p["category"], "overall"):
                a, b, c = rows.get(label, (0, 0, 0))
                rows[label] = (a + p["passed"], b + p["scored"], c + 1)
    return dict(sorted(rows.items(), key=lambda kv: (kv[0] == "overall", kv[0])))


def _pct(passed, scored):
    return f"{100 * passed / scored:6.2f}" if scored else "   n/a"


def format_report(summary, title):
    lines = [title, f"{'problem':>8} {'category':<13} {'passed':>9} {'rate %':>7}"]
    for pid, p in summary.items():
        if p["scored"]:
            lines.append(f"{pid:>8} {p['category']:<13} {p['passed']:>4}/{p['scored']:<4} {_pct(p['passed'], p['scored'])}")
        else:
            lines.append(f"{pid:>8} {p['category']:<13} {p['skipped']}")
    lines.append(f"\n{'category':<13} {'problems':>8} {'rate %':>7}")
    for label, (passed, scored, count) in _rates(summary).items():
        lines.append(f"{label:<13} {count:>8} {_pct(passed, scored)}")
    skipped = {pid: p["skipped"] for pid, p in summary.items() if not p["scored"]}
    if skipped:
        lines.append("not scored: " + "; ".join(f"{pid} ({why})" for pid, why in skipped.items()))
    return "\n".join(lines)


PAPER = "paper, CodeGen-Mono multi vs single turn: 350M 16.98 vs 5.75; 16.1B 47.34 vs 38.74"


def format_compare(a, b, label_a, label_b):
    """Two runs side by side per category and overall, over the problems both scored."""
    both = [pid for pid in a if pid in b and a[pid]["scored"] and b[pid]["scored"]]
    ra, rb = _rates({p: a[p] for p in both}), _rates({p: b[p] for p in both})
    wins_a = sum(a[p]["passed"] / a[p]["scored"] > b[p]["passed"] / b[p]["scored"] for p in both)
    wins_b = sum(a[p]["passed"] / a[p]["scored"] < b[p]["passed"] / b[p]["scored"] for p in both)
    lines = [f"MTPB pass rate % over {len(both)} problems scored in both", f"{'category':<13} {'problems':>8} "
             f"{label_a:>12} {label_b:>12}"]
    for label in ra:
        lines.append(f"{label:<13} {ra[label][2]:>8} {_pct(*ra[label][:2]):>12} {_pct(*rb[label][:2]):>12}")
    lines.append(f"problems where {label_a} is higher: {wins_a}, {label_b} is higher: {wins_b}")
    lines.append(PAPER)
    return "\n".join(lines)


def _load_results(path):
    """Results records of FILE_results.jsonl, or of the results beside samples file FILE."""
    p = Path(path)
    if not p.name.endswith("_results.jsonl"):
        p = results_path(p)
        if not p.exists():
            raise ValueError(f"{path} has not been scored yet ({p} is missing); run --samples {path} first")
    rows = list(read_jsonl(p, "results file"))
    for lineno, r in rows:
        if "id" not in r or "passed" not in r:
            raise ValueError(f"{p}:{lineno}: a results record needs 'id' and 'passed'")
    return [r for _, r in rows]


# ----------------------------------------------------------------------------- prompt perplexity


def _token_nll(params, tokens_BT, config):
    import jax
    import jax.numpy as jnp
    import model
    logits = model.forward(params, tokens_BT, config)                         # (B, T, V) float32
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)                        # predicts tokens 1..T-1
    return -jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1)[..., 0]  # (B, T-1)


def prompt_nll(sequences, params, config, tokenizer, batch_size=4):
    """(summed NLL, count) of the prompt tokens of each sequence, or None when too long.

    A sequence is a list of text pieces prefix, prompt, code, prompt, ...: the odd ones are
    prompts. Pieces are tokenized separately and their ids concatenated, so exactly the prompt
    pieces' tokens are scored, each conditioned on every token before it."""
    import jax
    import numpy as np
    encoded = []
    for pieces in sequences:
        ids, is_prompt = [], []
        for i, piece in enumerate(pieces):
            piece_ids = tokenizer.encode(piece).ids
            ids += piece_ids
            is_prompt += [i % 2 == 1] * len(piece_ids)
        encoded.append((ids, is_prompt))
    fits = [i for i, (ids, _) in enumerate(encoded) if 1 < len(ids) <= config.n_ctx]
    fits.sort(key=lambda i: len(encoded[i][0]))  # similar lengths share a batch: less padding
    nll_fn = jax.jit(functools.partial(_token_nll, config=config))
    out = [None] * len(sequences)
    for start in range(0, len(fits), batch_size):
        batch = fits[start:start + batch_size]
        T = min(config.n_ctx, -(-max(len(encoded[i][0]) for i in batch) // 64) * 64)  # few distinct shapes
        tokens_BT = np.zeros((batch_size, T), np.int32)       # right padding: causal, so harmless
        weight_BT = np.zeros((batch_size, T), np.float64)
        for b, i in enumerate(batch):
            ids, is_prompt = encoded[i]
            tokens_BT[b, :len(ids)] = ids
            weight_BT[b, :len(ids)] = is_prompt
        nll_BT1 = np.asarray(nll_fn(params, tokens_BT), np.float64)
        for b, i in enumerate(batch):
            out[i] = (float((nll_BT1[b] * weight_BT[b, 1:]).sum()), int(weight_BT[b, 1:].sum()))
    return out


def perplexities(records, params, config, tokenizer, batch_size=4):
    """{problem id: {'multi': ppl or None, 'single': ppl, 'skipped': count}}.

    Multi-turn format: the record's own pieces up to its last prompt, so each turn's prompt is
    conditioned on the earlier prompts and on the code this model wrote for them (the paper's
    RQ4 setup; multi-turn records only). Single-turn format: the prefix, then all prompts as one
    piece. A problem's perplexity is exp(mean NLL) over the prompt tokens of all its records."""
    sequences, owners = [], []
    for r in records:
        pieces = r.get("prompts_completions")
        if not isinstance(pieces, list) or len(pieces) < 2:
            raise ValueError(f"problem {r['id']}: record has no 'prompts_completions'; perplexity needs them")
        if r.get("mode", "multi") == "multi":
            sequences.append(pieces[:-1] if len(pieces) % 2 else pieces)
            owners.append((r["id"], "multi"))
        sequences.append([pieces[0], "".join(pieces[1::2])])
        owners.append((r["id"], "single"))
    totals = {}
    for (pid, fmt), got in zip(owners, prompt_nll(sequences, params, config, tokenizer, batch_size)):
        t = totals.setdefault(pid, {"multi": [0.0, 0], "single": [0.0, 0], "skipped": 0})
        if got is None:
            t["skipped"] += 1
        else:
            t[fmt][0] += got[0]
            t[fmt][1] += got[1]
    return {pid: {"multi": math.exp(t["multi"][0] / t["multi"][1]) if t["multi"][1] else None,
                  "single": math.exp(t["single"][0] / t["single"][1]) if t["single"][1] else None,
                  "skipped": t["skipped"]}
            for pid, t in totals.items()}


def _pearson(xs, ys):
    n = len(xs)
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else None


def format_perplexity(ppl, summary, mode):
    """Per-problem table, means over problems, and the correlation of the `mode` format's
    perplexity with the pass rate (paper RQ4: lower prompt perplexity, higher pass rate)."""
    def fmt(v):
        return f"{v:9.3f}" if v is not None else f"{'-':>9}"

    lines = [f"{'problem':>8} {'category':<13} {'ppl multi':>9} {'ppl single':>10} {'pass %':>7}"]
    xs, ys = [], []
    for pid, p in ppl.items():
        s = summary.get(pid)
        rate = s["passed"] / s["scored"] if s and s["scored"] else None
        lines.append(f"{pid:>8} {(s or {}).get('category', '?'):<13} {fmt(p['multi'])} {fmt(p['single']):>10} "
                     + (f"{100 * rate:7.2f}" if rate is not None else f"{'-':>7}"))
        if rate is not None and p[mode] is not None:
            xs.append(p[mode])
            ys.append(rate)
    for f in ("multi", "single"):
        values = [p[f] for p in ppl.values() if p[f] is not None]
        if values:
            lines.append(f"mean {f}-turn prompt perplexity over {len(values)} problems: {sum(values) / len(values):.3f}")
    r = _pearson(xs, ys)
    lines.append(f"Pearson r ({mode}-turn perplexity, pass rate) over {len(xs)} problems: "
                 + (f"{r:+.3f}" if r is not None else "n/a (too few problems or no spread)"))
    lines.append("paper, CodeGen-Mono 16.1B: mean prompt perplexity 8.05 multi-turn vs 10.25 single-turn")
    too_long = sum(p["skipped"] for p in ppl.values())
    if too_long:
        lines.append(f"{too_long} sequences longer than the context were left out")
    return "\n".join(lines)


def plot_perplexity(ppl, summary, mode, path):
    """Scatter of pass rate against prompt perplexity as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = [(p[mode], 100 * summary[pid]["passed"] / summary[pid]["scored"]) for pid, p in ppl.items()
              if p[mode] is not None and pid in summary and summary[pid]["scored"]]
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([x for x, _ in points], [y for _, y in points], s=12)
    ax.set_xscale("log")
    ax.set_xlabel(f"{mode}-turn prompt perplexity")
    ax.set_ylabel("pass rate %")
    ax.set_title("MTPB: pass rate vs prompt perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command line


def _model_complete(params, config, args):
    """sample.complete with the model and the sampling flags bound, in generate_problem's shape.
    Rows whose history already fills the context get an empty completion (the reference asserts
    and stops); near the end every row of a batch gets the room left by its longest history."""
    import data
    import model
    import sample
    tokenizer = data.get_tokenizer()
    # Split per layer once, not in every call (see sample.generate). A call would hold both
    # copies anyway; the stacked one stays for --perplexity.
    params = model.unstack_layers(params)

    def complete(texts, max_new_tokens, *, stop, num_samples, seed):
        lengths = [len(tokenizer.encode(t).ids) for t in texts]
        fits = [i for i, n in enumerate(lengths) if n < config.n_ctx]
        out = [""] * (len(texts) * num_samples)
        if fits:
            room = config.n_ctx - max(lengths[i] for i in fits)
            got = sample.complete(params, config, [texts[i] for i in fits], min(max_new_tokens, room), stop=stop,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=seed,
                                  num_samples=num_samples)
            for j, i in enumerate(fits):
                out[i * num_samples:(i + 1) * num_samples] = got[j * num_samples:(j + 1) * num_samples]
        return out
    return complete


def main(argv=None):
    ap = argparse.ArgumentParser(description="MTPB: multi-turn / single-turn program synthesis, scoring, "
                                             "prompt perplexity (CodeGen paper §3).",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--init-from", metavar="DIR", help="model: a Hugging Face CodeGen directory or a nanocodegen "
                                                        "checkpoint (to generate, and for --perplexity)")
    ap.add_argument("--problems", metavar="FILE", help="MTPB problems jsonl, e.g. ../shared/data/mtpb.jsonl "
                                                        "(salesforce/CodeGen codegen1/benchmark/mtpb.jsonl, BSD-3)")
    ap.add_argument("--ids", help="comma-separated problem ids, e.g. 1,2,5; all when not given")
    ap.add_argument("--out", help="samples jsonl to write, resumable; when not given: mtpb_multi.jsonl "
                                  "(mtpb_single.jsonl with --single-turn)")
    ap.add_argument("--single-turn", action="store_true", help="all turn prompts at once, one generation "
                                                               "with the sum of the turn budgets")
    ap.add_argument("--n", type=int, default=1, help="programs per test case")
    ap.add_argument("--temperature", type=float, default=0.2, help="mtpb_sample.py --t")
    ap.add_argument("--top-p", type=float, default=0.95, help="mtpb_sample.py --p")
    ap.add_argument("--top-k", type=int, default=50, help="HF generate's default, which the reference kept")
    ap.add_argument("--seed", type=int, default=16, help="mtpb_sample.py --seed")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype (the reference ran float32 unless --fp16)")
    ap.add_argument("--samples", metavar="FILE", help="score this samples file (reference format: id, input, "
                                                       "gold_output, completions) instead of generating")
    ap.add_argument("--reference-semantics", action="store_true",
                    help="score with mtpb_exec.py's rules, bugs included, to compare with published numbers")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per program (the reference: 20)")
    ap.add_argument("--workers", type=int, default=os.cpu_count(), help="programs run in parallel")
    ap.add_argument("--memory-mb", type=int, default=2048, help="memory limit per program")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="print two scored runs side by side "
                                                                     "(results files, or samples files scored)")
    ap.add_argument("--perplexity", action="store_true", help="prompt perplexity per problem, multi- vs "
                                                              "single-turn format, vs pass rate (needs --init-from)")
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per forward pass for --perplexity")
    args = ap.parse_args(argv)
    try:
        run(args)
    except ValueError as e:  # every error a user can cause: one line, exit code 2
        ap.exit(2, f"error: {e}\n")
    except KeyboardInterrupt:
        ap.exit(130, "interrupted: run the same command again to resume\n")


def run(args):
    for flag, value, ok in (("--n", args.n, args.n >= 1), ("--temperature", args.temperature, args.temperature >= 0),
                            ("--top-p", args.top_p, 0 < args.top_p <= 1), ("--top-k", args.top_k, args.top_k >= 0),
                            ("--timeout", args.timeout, args.timeout > 0), ("--workers", args.workers, args.workers >= 1),
                            ("--memory-mb", args.memory_mb, args.memory_mb >= 64),
                            ("--batch-size", args.batch_size, args.batch_size >= 1)):
        if not ok:
            raise ValueError(f"{flag} {value} is out of range (see --help)")
    if args.compare:
        runs = [_load_results(p) for p in args.compare]
        labels = [next((r["mode"] for r in rs if "mode" in r), Path(p).name) for rs, p in zip(runs, args.compare)]
        if labels[0] == labels[1]:
            labels = [Path(p).name for p in args.compare]
        print(format_compare(summarize(runs[0]), summarize(runs[1]), *labels))
        return
    ids = parse_ids(args.ids) if args.ids else None
    problems = load_problems(args.problems, ids) if args.problems else None
    params = config = None
    if args.init_from and (args.perplexity or not args.samples):
        import jax.numpy as jnp
        import model
        try:
            config, params = model.load_hf(args.init_from)
        except OSError as e:
            raise ValueError(f"cannot load {args.init_from}: {e}") from None
        if args.dtype == "bfloat16":
            params = model.cast(params, jnp.bfloat16)

    if args.samples:
        samples_path = Path(args.samples)
    else:
        if not (args.init_from and problems):
            raise ValueError("give --init-from DIR and --problems FILE to generate, or --samples FILE to score "
                             "(or --compare A B)")
        samples_path = Path(args.out or f"mtpb_{'single' if args.single_turn else 'multi'}.jsonl")
        generate(problems, _model_complete(params, config, args), samples_path, args.n, args.single_turn, args.seed)

    records = read_samples(samples_path)
    if ids is not None:
        unknown = sorted(set(ids) - {r["id"] for r in records})
        if unknown:
            raise ValueError(f"problem id(s) {', '.join(unknown)} not in {samples_path}")
        records = [r for r in records if r["id"] in ids]
    semantics = "reference" if args.reference_semantics else "fixed"
    out_path = results_path(samples_path)
    cache = {}
    if out_path.exists():  # reuse the verdicts of an earlier scoring with the same rules
        for _, r in read_jsonl(out_path, "results file"):
            if r.get("semantics") == semantics and "completions" in r and \
                    not str(r.get("result")).startswith(("skipped", "error")):  # sandbox trouble: run again
                cache[(r["completions"], json.dumps(r.get("gold_output"), sort_keys=True))] = r["result"]
    results = score(records, args.reference_semantics, args.timeout, args.workers, args.memory_mb, cache)
    write_jsonl(out_path, results)
    categories = {p.id: p.category for p in problems or ()}
    summary = summarize(results, categories)
    mode = next((r["mode"] for r in records if "mode" in r), "multi")
    print(format_report(summary, f"MTPB {mode}-turn, {semantics} semantics: {samples_path} "
                                 f"({len(records)} programs) -> {out_path}"))

    if args.perplexity:
        if params is None:
            raise ValueError("--perplexity needs the model: add --init-from DIR")
        import data
        ppl = perplexities(records, params, config, data.get_tokenizer(), args.batch_size)
        print(format_perplexity(ppl, summary, mode))
        png = samples_path.with_name(samples_path.stem + "_perplexity.png")
        print(f"plot: {png}" if plot_perplexity(ppl, summary, mode, png) else "(install matplotlib for a plot)")


if __name__ == "__main__":
    main()
