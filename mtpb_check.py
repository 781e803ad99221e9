"""How MTPB programs are judged and counted (CodeGen paper §3; the
reference scorer is salesforce/CodeGen `codegen1/benchmark/mtpb_exec.py`):
the checker that runs inside the sandbox, and the pass rates per problem,
per category and overall.

The sandbox runs this file's text twice (see `program_for`). As the
program, with `main('<case as JSON>')` appended: it runs the generated
program with a print hook and keeps the first argument of its last print
call as plain data (`last_printed`). As the check, in a process of its own
that alone knows the gold output, with `judge(...)` appended: it asks the
program's process for that value and raises AssertionError unless it
matches, so the sandbox's verdict 'passed' means the program passed and
nothing the program does can say otherwise. The rules, default and
reference (--reference-semantics), are in docs/evaluation.md. mtpb.py
imports the rest.

Standard library only: numpy and pandas values are recognised when the
program imported them.
"""
import ast
import builtins
import contextlib
import functools
import importlib.util
import io
import json
import os
import random
import re
import reprlib
import signal
import sys
from pathlib import Path

# mtpb_exec.py check_equivalence: abs(o1 - o2) < 1e-6
FLOAT_TOLERANCE = 1e-6
# seconds the sandbox allows beyond the in-process alarm of reference
# semantics
REFERENCE_GRACE = 3.0
# prompt word -> module (problems 6, 14, 38, 46)
LIBRARIES = {"pandas": "pandas", "sklearn": "sklearn"}
# the CSVs of problems 38 and 46, shipped nowhere
_DATASET = re.compile(r"\./datasets/[\w.-]+")


# -------------------------------------------------- in the sandbox

def _loaded(name):
    """The module `name` when the program imported it, else None: a value
    can only be a numpy array or a pandas Series if its module is loaded,
    and importing either costs time."""
    return sys.modules.get(name)


def print_last_statement(code):
    """The reference's AST rewrite (mtpb_exec.py `rewrite_ast_with_print`):
    unless the last top-level statement is a call of a name starting with
    `print`, wrap that statement's `.value` in print(...). It acts on any
    statement with a `.value`: `y = x + 1` becomes `y = print(x + 1)`.
    Code whose last statement has no `.value` (for, if, import) or does
    not parse is kept as is (the reference prints the error and runs the
    code unchanged)."""
    try:
        tree = ast.parse(code)
        last = tree.body[-1]
        try:
            if last.value.func.id.startswith("print"):
                return code
        except AttributeError:
            pass
        print_name = ast.Name(id="print", ctx=ast.Load())
        last.value = ast.Call(func=print_name, args=[last.value],
                              keywords=[])
        return ast.unparse(ast.fix_missing_locations(tree))
    except Exception:
        return code


def to_plain(x):
    """numpy scalars and arrays, pandas Series and tuples as Python scalars
    and lists, recursively; subclasses of the plain types (Counter, a str
    subclass) as exactly those types, their own __eq__ and __str__ left
    behind."""
    np = _loaded("numpy")
    pd = _loaded("pandas")
    if pd is not None and isinstance(x, pd.Series):
        x = x.to_numpy()
    if np is not None and isinstance(x, (np.ndarray, np.generic)):
        x = x.tolist()
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    if isinstance(x, dict):
        plain = {}
        for k, v in dict.items(x):
            if np is not None and isinstance(k, np.generic):
                k = k.item()
            plain[_exact(k)] = to_plain(v)
        return plain
    return _exact(x)


def _exact(x):
    """A scalar of a subclass of int, float or str as exactly that type;
    else x."""
    converters = {int: int.__int__, float: float.__float__, str: str.__str__}
    for kind, convert in converters.items():
        if isinstance(x, kind) and type(x) not in (bool, kind):
            return convert(x)
    return x


def same(value, gold):
    """Structural equality with gold (a JSON value): same kinds all the way
    down, numbers within FLOAT_TOLERANCE, bools only equal to bools."""
    if gold is None or isinstance(gold, (bool, str)):
        return type(value) is type(gold) and value == gold
    if isinstance(gold, (int, float)):
        number = isinstance(value, (int, float))
        return (number and not isinstance(value, bool)
                and abs(value - gold) < FLOAT_TOLERANCE)
    if isinstance(gold, list):
        return (isinstance(value, list) and len(value) == len(gold)
                and all(same(v, g) for v, g in zip(value, gold)))
    if isinstance(gold, dict):
        return (isinstance(value, dict) and value.keys() == gold.keys()
                and all(same(value[k], gold[k]) for k in gold))
    return False


def equivalent(value, gold):
    """The default rule: numpy/pandas/tuples converted as the reference
    does, then `same`. Between top-level scalars the printed text decides,
    as in the reference's casts (True vs "True", 5 vs "5", None vs "None",
    2.5 vs "2.5"); nothing is ever cast into a container ("ab" is not
    ['a', 'b']), and dict and None compare like any other value."""
    value = to_plain(value)
    if same(value, gold):
        return True
    scalars = (type(None), bool, int, float, str)
    if not (isinstance(gold, scalars) and isinstance(value, scalars)):
        return False
    number_gold = isinstance(gold, (int, float)) and not isinstance(gold, bool)
    if number_gold and isinstance(value, str):
        try:
            return abs(float(value) - gold) < FLOAT_TOLERANCE
        except ValueError:
            return False
    return str(value) == str(gold)


def reference_equivalent(o1, o2):
    """mtpb_exec.py `check_equivalence(o1=printed, o2=gold)`, rule for
    rule, its exact type tests included: a few numpy types become Python
    ones, a list of tuples a list of lists; on a type mismatch a bool gold
    compares as text and anything else is cast `type(gold)(printed)`
    ("ab" -> ['a', 'b']); dict and None are unsupported types and raise
    ValueError."""
    return reference_compare(*reference_plain(o1), o2)


def reference_plain(o1):
    """The printed side of reference_equivalent, in the program's process:
    (kind, value) with kind 'series' (a pandas Series, compared with
    allclose), 'value' (plain data) or 'text' (anything else, which only a
    cast to str can match)."""
    np = _loaded("numpy")
    pd = _loaded("pandas")
    if pd is not None and isinstance(o1, pd.Series):
        return "series", o1.to_numpy().tolist()
    if type(o1) == list and len(o1) > 0 and type(o1[0]) == tuple:
        o1 = [list(t) for t in o1]
    elif np is not None and type(o1) in (np.uint8, np.int16, np.int32,
                                         np.int64):
        o1 = int(o1)
    elif np is not None and type(o1) in (np.float16, np.float32,
                                         np.float64):
        o1 = float(o1)
    elif np is not None and type(o1) == np.bool_:
        o1 = bool(o1)
    elif np is not None and type(o1) == np.ndarray:
        o1 = o1.tolist()
    return ("value", o1) if _is_plain(o1) else ("text", str(o1))


def _is_plain(x):
    if type(x) in (list, tuple, set):
        return all(_is_plain(v) for v in x)
    if type(x) is dict:
        return all(_is_plain(k) and _is_plain(v) for k, v in x.items())
    return x is None or type(x) in (bool, int, float, str)


def reference_compare(kind, o1, o2):
    """The gold side of reference_equivalent, on what reference_plain sent."""
    if kind == "series":
        import numpy as np
        return bool(np.allclose(np.array(o1), np.array(o2)))
    if type(o1) != type(o2):
        if type(o2) == bool:
            o1, o2 = str(o1), str(o2)
        else:
            o1 = type(o2)(o1)
    if type(o1) in (str, int, set, list, bool, tuple):
        return o1 == o2
    if type(o1) == float:
        return abs(o1 - o2) < FLOAT_TOLERANCE
    raise ValueError(f"Unsupported type {type(o1)}")


class _Discard(io.TextIOBase):
    """Standard output of the checked program: the reference captured
    it, nothing reads it."""

    def write(self, s):
        return len(s)


def check_program(program, reference_semantics, time_limit):
    """Run `program` with a print hook and return the first argument of
    its last print call; AssertionError when there is none.

    Default: any exception (the program's included) fails. Reference
    semantics (mtpb_exec.py `do_exec`): the program's exceptions are
    swallowed, and an in-process alarm after `time_limit` seconds raises
    one, so a crash or a hang after the right print still passes."""
    # the positional arguments of every print call (the reference's
    # print_stack)
    printed = []
    real_print = builtins.print

    # the program's `print`, put in its globals like the reference's hook
    def print(*args, **kwargs):
        printed.append(args)
        return real_print(*args, **kwargs)

    code = print_last_statement(program)
    env = {"__name__": "__main__", "print": print}
    with contextlib.redirect_stdout(_Discard()):
        if reference_semantics:
            # an Exception, as the reference's TimeoutException
            def alarm(signum, frame):
                raise TimeoutError("Timed out!")
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
    return printed[-1][0]


_LAST = []  # in the program's process: what last_printed answers


def main(case_json):
    """Run one case as the program's process: one BLAS thread (many
    programs run side by side), and `random` and numpy seeded with 0 so the
    random problems (20, 23) score the same every time. The value to judge
    is kept, as plain data, for `last_printed`."""
    case = json.loads(case_json)
    os.environ.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                      MKL_NUM_THREADS="1")
    random.seed(0)
    try:
        import numpy
        numpy.random.seed(0)
    except ImportError:
        pass
    reference = case["reference_semantics"]
    value = check_program(case["program"], reference, case["time_limit"])
    if reference:
        _LAST.append(reference_plain(value))
    else:
        _LAST.append(("value", to_plain(value)))


def last_printed():
    """(kind, value) of the last print: what the check's process asks for."""
    return _LAST[-1]


def judge(gold_json, reference_semantics):
    """In the check's process: AssertionError unless the program's last
    printed value, received as plain data, matches the gold output."""
    gold = json.loads(gold_json)
    # the sandbox puts `remote` in the check's globals
    ask = globals()["remote"]("last_printed")
    kind, value = ask()
    if reference_semantics:
        match = reference_compare(kind, value, gold)
    else:
        match = equivalent(value, gold)
    if not match:
        raise AssertionError(f"printed {reprlib.repr(value)}, "
                             f"expected {reprlib.repr(gold)}")


# -------------------------------------------------- in the evaluating process

def program_for(program, gold, reference_semantics=False, time_limit=10.0):
    """What the sandbox runs to check one sample: (the program: this
    file, then `main` on the case without its gold; the check: this file,
    then `judge` with the gold)."""
    reference = bool(reference_semantics)
    case = json.dumps({"program": program,
                       "reference_semantics": reference,
                       "time_limit": float(time_limit)})
    gold_json = json.dumps(gold)
    check = f"{_own_source()}\n\njudge({gold_json!r}, {reference})\n"
    return f"{_own_source()}\n\nmain({case!r})\n", check


@functools.cache
def _own_source():
    return Path(__file__).read_text(encoding="utf-8")


@functools.cache
def _installed(module):
    return importlib.util.find_spec(module) is not None


def missing_requirement(record):
    """'missing pandas' (etc.) when the record's prompts need what this
    machine cannot give the program, else None. The prompts are the odd
    pieces of `prompts_completions`; records without them are judged by
    their whole program text."""
    pieces = record.get("prompts_completions")
    if isinstance(pieces, list):
        text = "".join(pieces[1::2])
    else:
        text = record["completions"]
    for word, module in LIBRARIES.items():
        if re.search(rf"\b{word}\b", text) and not _installed(module):
            return f"missing {module}"
    found = _DATASET.search(text)
    return f"missing file {found.group()}" if found else None


def summarize(results, categories=None):
    """{problem id: {'category', 'passed', 'scored', 'skipped'}} from
    results records; the category comes from the record, else from
    `categories` (id -> category)."""
    categories = categories or {}
    per = {}
    for r in results:
        pid = str(r["id"])
        if pid not in per:
            category = r.get("category") or categories.get(pid, "?")
            per[pid] = {"category": category, "passed": 0, "scored": 0,
                        "skipped": None}
        p = per[pid]
        if str(r.get("result", "")).startswith("skipped"):
            p["skipped"] = r["result"]
        else:
            p["scored"] += 1
            p["passed"] += bool(r["passed"])

    def by_id(item):
        pid = item[0]
        return int(pid) if pid.isdigit() else pid
    return dict(sorted(per.items(), key=by_id))


def _rates(summary):
    """{row label: (passed, scored, problems)} per category and 'overall'
    (passes / scored programs, the reference's aggregate)."""
    rows = {}
    for p in summary.values():
        if not p["scored"]:
            continue
        for label in (p["category"], "overall"):
            passed, scored, problems = rows.get(label, (0, 0, 0))
            rows[label] = (passed + p["passed"], scored + p["scored"],
                           problems + 1)

    def overall_last(item):
        return item[0] == "overall", item[0]
    return dict(sorted(rows.items(), key=overall_last))


def _pct(passed, scored):
    return f"{100 * passed / scored:6.2f}" if scored else "   n/a"


def format_report(summary, title):
    """The pass rate of every problem, then per category and overall."""
    lines = [title]
    lines.append(f"{'problem':>8} {'category':<13} {'passed':>9} {'rate %':>7}")
    skipped = []
    for pid, p in summary.items():
        if p["scored"]:
            pct = _pct(p["passed"], p["scored"])
            rate = f"{p['passed']:>4}/{p['scored']:<4} {pct}"
        else:
            rate = p["skipped"]
            skipped.append(f"{pid} ({p['skipped']})")
        lines.append(f"{pid:>8} {p['category']:<13} {rate}")
    lines.append(f"\n{'category':<13} {'problems':>8} {'rate %':>7}")
    for label, (passed, scored, count) in _rates(summary).items():
        lines.append(f"{label:<13} {count:>8} {_pct(passed, scored)}")
    if skipped:
        lines.append("not scored: " + "; ".join(skipped))
    return "\n".join(lines)


def format_compare(a, b, label_a, label_b):
    """Two runs side by side per category and overall, over the problems
    both scored."""
    both = [pid for pid in a
            if pid in b and a[pid]["scored"] and b[pid]["scored"]]
    rates_a = _rates({p: a[p] for p in both})
    rates_b = _rates({p: b[p] for p in both})
    a_higher = 0
    b_higher = 0
    for p in both:
        diff = (a[p]["passed"] / a[p]["scored"]
                - b[p]["passed"] / b[p]["scored"])
        a_higher += diff > 0
        b_higher += diff < 0
    lines = [f"MTPB pass rate % over {len(both)} problems scored in both",
             f"{'category':<13} {'problems':>8} {label_a:>12} {label_b:>12}"]
    for label, (passed, scored, count) in rates_a.items():
        pct_a = _pct(passed, scored)
        pct_b = _pct(*rates_b[label][:2])
        lines.append(f"{label:<13} {count:>8} {pct_a:>12} {pct_b:>12}")
    lines.append(f"problems where {label_a} is higher: {a_higher}, "
                 f"{label_b} is higher: {b_higher}")
    lines.append("paper, CodeGen-Mono multi vs single turn: "
                 "350M 16.98 vs 5.75; 16.1B 47.34 vs 38.74")
    return "\n".join(lines)
