"""MTPB, the Multi-Turn Programming Benchmark (CodeGen paper §3, arXiv 2203.13474): multi-turn and
single-turn program synthesis, sandboxed scoring, prompt perplexity, and a chat that writes a program
turn by turn with the same protocol. The protocol (salesforce/CodeGen `benchmark/mtpb_sample.py`),
for each test input of a problem and each of `--n` samples:

    program = PREFIX
    for each turn:  program += "# {turn prompt}\n";  program += truncate(model(program)) + "\n\n"

A program passes when the first argument of its last `print` call equals the gold output (as
`mtpb_exec.py`; mtpb_check.py decides it inside the sandbox); a problem's pass rate is passed / (n x 5).
`--single-turn` is the paper's baseline: all turn prompts at once. Scoring rules, perplexity and file
formats: docs/evaluation.md.

    python mtpb.py --init-from DIR --problems mtpb.jsonl [--single-turn]      # generate + score
    python mtpb.py --samples DIR/mtpb_multi.jsonl [--reference-semantics]    # score a samples file
    python mtpb.py --compare DIR/mtpb_multi_results.jsonl DIR/mtpb_single_results.jsonl
    python mtpb.py --init-from DIR --samples DIR/mtpb_multi.jsonl --perplexity
    python mtpb.py --init-from DIR --chat                                     # write a program
"""
import collections
import functools
import itertools
import json
import math
import os
import re
import statistics
import sys
import zlib
from pathlib import Path

import sandbox
from common import (ArgumentParser, Progress, beside, check_made_by, check_writable, checkpoint_dir, flag_names,
                    checkpoint_identity, generate_jsonl, made_by_path, on_first_process, read_jsonl, results_path,
                    run_main, sha256_of, write_jsonl)
from mtpb_check import REFERENCE_GRACE, format_compare, format_report, missing_requirement, program_for, summarize

# ----------------------------------------------------------------------------- the protocol

PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"  # mtpb_sample.py: once atop every program
DEFAULT_MAX_GEN_LENGTH = 256  # mtpb_sample.py default; problems 39-45 lack the field

# Where sampling may stop early. sample.complete cuts the text *before* the first stop string, so a
# stop changes nothing only where `truncate` cuts exactly there too: "\n\n\n" is the one terminal of
# truncate with that property (it keeps the "\n" before a column-0 "#", which a cut before "\n#"
# would lose). <|endoftext|> always stops.
STOPS = ("\n\n\n",)


def wrap(prompt):
    """A turn's prompt becomes one comment line (mtpb_sample.py `wrap`)."""
    return f"# {prompt}\n"


def truncate(completion):
    """The paper's cut of one turn's code (mtpb_sample.py and jaxformer/hf/sample.py `truncate`):
    at the 2nd line starting with `print`, then at the 2nd line starting with `def`, then at the
    earliest column-0 `#`, `'''` or `\"\"\"`, `<|endoftext|>`, or three newlines in a row."""
    for head in ("print", "def"):
        starts = [m.start() for m in re.finditer(f"^{head}", completion, re.MULTILINE)]
        if len(starts) > 1:
            completion = completion[:starts[1]]
    terminals = ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")
    hits = [m.start() for m in (re.search(t, completion, re.MULTILINE) for t in terminals) if m]
    return completion[:min(hits)] if hits else completion


# ----------------------------------------------------------------------------- problems

Case = collections.namedtuple("Case", "input output prompts")     # one test input, its gold output, filled prompts
Problem = collections.namedtuple("Problem", "id category max_gen_length cases")  # budget: new tokens per turn


def load_problems(path, ids=None):
    """Problems of an MTPB jsonl, sorted by id, every template filled (str.format, as the reference)
    for every test input. Inputs and outputs are zipped like the reference's: problem 57's 6th
    output has no input and is ignored. A one-line ValueError, with the line, for anything malformed."""
    problems = {}
    for lineno, row in read_jsonl(path, "problems file"):
        where = f"{path}:{lineno}"
        for key, kind in ("id", (str, int)), ("prompts", list), ("inputs", list), ("outputs", list), ("category", str):
            if not isinstance(row.get(key), kind):
                raise ValueError(f"{where}: field {key!r} is missing or of the wrong type")
        pid, budget = str(row["id"]), row.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)
        if pid in problems:
            raise ValueError(f"{where}: problem {pid} appears twice")
        for key, kind in (("prompts", str), ("inputs", dict)):
            if not row[key] or not all(isinstance(x, kind) for x in row[key]):
                raise ValueError(f"{where}: problem {pid}: {key!r} must be a non-empty list of {kind.__name__}")
        if len(row["outputs"]) < len(row["inputs"]):
            raise ValueError(f"{where}: problem {pid}: {len(row['inputs'])} inputs but only "
                             f"{len(row['outputs'])} outputs")
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"{where}: problem {pid}: max_gen_length must be a positive integer")
        cases = []
        for inp, out in zip(row["inputs"], row["outputs"]):
            prompts = []
            for template in row["prompts"]:
                try:
                    prompts.append(template.format(**inp))  # str.format, as the reference: lists appear as reprs
                except (KeyError, IndexError, ValueError) as e:
                    raise ValueError(f"{where}: problem {pid}: template {template!r} cannot be filled from "
                                     f"input {inp!r} ({type(e).__name__}: {e})") from None
            cases.append(Case(inp, out, tuple(prompts)))
        problems[pid] = Problem(pid, row["category"], budget, tuple(cases))
    if ids is not None:
        unknown = [i for i in ids if i not in problems]
        if unknown:
            raise ValueError(f"unknown problem id(s) {', '.join(unknown)} (not in {path})")
        problems = {i: problems[i] for i in ids}
    if not problems:
        raise ValueError(f"{path}: no problems")
    return sorted(problems.values(), key=lambda p: int(p.id) if p.id.isdigit() else p.id)


# ----------------------------------------------------------------------------- generation

def generate_problem(problem, complete, n, single_turn=False, seed=16):
    """The n x 5 programs of one problem as samples records, all rows advanced together.

    `complete(texts, max_new_tokens, *, stop, num_samples, seed) -> list[str]` returns, prompt-major,
    `num_samples` completions per text. Row r writes the program of test case r // n, sample r % n;
    on the first turn the n rows of a case share one history, which is prefilled once. Sampling
    seeds are fixed per (seed, problem, turn), so a resumed run writes what an uninterrupted one would.
    """
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
        completions = complete(histories[::n] if t == 0 else histories, budget, stop=STOPS,
                               num_samples=n if t == 0 else 1, seed=zlib.crc32(f"{seed}/{problem.id}/{t}".encode()))
        for pieces, completion in zip(rows, completions, strict=True):
            pieces.append(truncate(completion) + "\n\n")
    return [{"id": problem.id, "input": problem.cases[r // n].input, "gold_output": problem.cases[r // n].output,
             "completions": "".join(pieces), "prompts_completions": pieces,
             "mode": "single" if single_turn else "multi", "case": r // n, "sample": r % n,
             "category": problem.category} for r, pieces in enumerate(rows)]


def generate(problems, complete, out_path, n=1, single_turn=False, seed=16, share=None, made_by=None):
    """Append to `out_path` the programs it lacks, a problem at a time (resumable; `share`: each process its own;
    `made_by` (describe): a file made otherwise is refused, common.check_made_by)."""
    mode, by_id = "single" if single_turn else "multi", {p.id: p for p in problems}

    def key(row):
        if row.get("mode") != mode:
            raise ValueError(f"{out_path} holds {row.get('mode')!r} samples and this run makes {mode!r} ones; "
                             f"pass another --out")
        return str(row["id"]), row["case"], row["sample"]

    def produce(keys, first):
        return [r for r in generate_problem(by_id[keys[0][0]], complete, n, single_turn, seed) if key(r) in keys]
    wanted = [(p.id, c, s) for p in problems for c in range(len(p.cases)) for s in range(n)]
    generate_jsonl(out_path, wanted, key, produce, len(wanted), group=lambda k: k[0], unit="programs", share=share,
                   made_by=made_by)


def describe(init_from, problems, args):
    """What makes a samples file: the checkpoint (step, weights digest), the problems (their filled
    prompts, cases and budgets) and every sampling flag (common.check_made_by)."""
    return {**checkpoint_identity(init_from), "dtype": args.dtype,
            "problems": len(problems), "problems_sha256": sha256_of(problems),
            "turns": "single" if args.single_turn else "multi", "prefix": PREFIX, "stop": list(STOPS),
            "n": args.n, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k,
            "seed": args.seed}


# ----------------------------------------------------------------------------- chat

CHAT_HELP = """\
Type what the program should do next, one line per turn; the model writes the code.
  :show        print the whole program      :run         run it in the sandbox (10 s)
  :undo        drop the last turn           :save FILE   write the program to FILE
  :help        this text                    :quit        end (so does end of input)"""


def chat(write_turn, lines, say=print):
    """The MTPB protocol as a conversation, driven by `lines` (user input): a line L appends
    `# L\\n`, then `write_turn(program)` returns the model's continuation, which is cut with
    `truncate`, appended with two newlines, and shown. Returns the final program."""
    turns = []                                                     # (comment, code) pairs

    def program():
        return PREFIX + "".join(f"{c}{code}\n\n" for c, code in turns)

    for line in map(str.strip, lines):
        command, _, arg = line.partition(" ")
        if not line:
            continue
        elif command in (":quit", ":exit", ":q"):
            break
        elif command == ":help":
            say(CHAT_HELP)
        elif command == ":show":
            say(program().rstrip("\n"))
        elif command == ":undo":
            say(f"(dropped: {turns.pop()[0].strip()})" if turns else "(nothing to undo)")
        elif command == ":save":
            try:
                Path(arg.strip()).write_text(program())
                say(f"(saved {len(program().splitlines())} lines to {arg.strip()})")
            except OSError as e:  # an empty name included
                say(f"(could not save: {e.strerror}: {arg.strip()!r}; usage: :save FILE)")
        elif command == ":run":
            result = sandbox.run(program(), timeout=10)
            for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
                if text.strip():
                    say(f"--- {name}\n{text.rstrip()}")
            say(f"({result.status}{': ' + result.reason if result.reason else ''}; {result.seconds:.2f} s)")
        elif command.startswith(":"):
            say(f"(unknown command {command}; :help lists them)")
        else:
            try:
                code = truncate(write_turn(program() + wrap(line)))
            except ValueError as e:                                # the program fills the context
                say(f"(turn not added: {e})")
                continue
            turns.append((wrap(line), code))
            say(f"{wrap(line)}{code}\n")
    return program()


# ----------------------------------------------------------------------------- scoring

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
    if not records:
        raise ValueError(f"{path}: no samples; generate some with --init-from DIR --problems FILE")
    return records


def _pair(record):
    """What a verdict depends on: the program and the gold output."""
    return record["completions"], json.dumps(record["gold_output"], sort_keys=True)


def score(records, reference_semantics=False, timeout=10.0, workers=None, memory_mb=2048, cache=None):
    """Records with `passed` (bool), `result` ('passed', 'failed: <reason>', 'timed out',
    'skipped: missing X') and `semantics` added. Identical (program, gold) pairs run once;
    `cache` maps such a pair (`_pair`) to a result already known."""
    semantics = "reference" if reference_semantics else "fixed"
    verdicts, jobs = dict(cache or {}), {}
    skips = [missing_requirement(r) for r in records]
    for r, skip in zip(records, skips):
        if skip is None and _pair(r) not in verdicts and _pair(r) not in jobs:
            jobs[_pair(r)] = program_for(r["completions"], r["gold_output"], reference_semantics, timeout)
    if jobs:
        print(f"running {len(jobs)} programs ({len(records)} samples, {semantics} semantics)", flush=True)
        progress = Progress("ran", "programs", len(jobs))
        runs = sandbox.run_many(list(jobs.values()), timeout=timeout + REFERENCE_GRACE * reference_semantics,
                                workers=workers, memory_mb=memory_mb, progress=lambda done, total: progress(done))
        for pair, run in zip(jobs, runs):
            verdicts[pair] = run.status if run.status in ("passed", "timed out") else f"{run.status}: {run.reason}"
    results = [f"skipped: {skip}" if skip else verdicts[_pair(r)] for r, skip in zip(records, skips)]
    return [{**r, "passed": result == "passed", "result": result, "semantics": semantics}
            for r, result in zip(records, results)]


def _earlier_verdicts(path, semantics):
    """The verdicts of an earlier scoring with the same rules, but for sandbox trouble (run again)."""
    rows = read_jsonl(path, "results file") if os.path.exists(path) else ()
    return {_pair(r): r["result"] for _, r in rows
            if r.get("semantics") == semantics and "completions" in r and "gold_output" in r
            and not str(r.get("result")).startswith(("skipped", "error"))}


def _load_results(path):
    """Results records of FILE_results.jsonl, or of the results beside samples file FILE."""
    p = str(path) if str(path).endswith("_results.jsonl") else results_path(path)
    if not os.path.exists(p) and p != str(path):
        raise ValueError(f"{path} has not been scored yet ({p} is missing); run --samples {path} first")
    rows = list(read_jsonl(p, "results file"))
    for lineno, r in rows:
        if "id" not in r or "passed" not in r:
            raise ValueError(f"{p}:{lineno}: a results record needs 'id' and 'passed'")
    return [r for _, r in rows]


# ----------------------------------------------------------------------------- prompt perplexity

def _token_nll(params, tokens_BT, config):
    """-log p(token t | tokens < t) for t = 1..T-1, (B, T-1). Run by the decoding forward
    (model_fast.forward), which takes the weights as sample.load returns them."""
    import jax
    import jax.numpy as jnp
    import model_fast
    cache = model_fast.init_cache(config, *tokens_BT.shape)
    logits_BTV, _ = model_fast.forward(params, tokens_BT, config, cache=cache)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp_BTV, tokens_BT[:, 1:, None], axis=-1)[..., 0]


def perplexities(records, params, config, tokenizer, batch_size=4):
    """{problem id: {'multi': ppl or None, 'single': ppl, 'skipped': count}}: exp(mean NLL) of the
    prompt tokens of all the problem's records, in two formats. Multi-turn: the record's pieces
    (prefix, prompt, code, ...) up to its last prompt, each prompt conditioned on the code this model
    wrote for the earlier ones (paper RQ4; multi-turn records only). Single-turn: the prefix, then all
    prompts as one piece. Pieces are tokenized separately, so exactly the prompts' tokens are scored;
    sequences longer than the context are skipped (counted)."""
    import jax
    import numpy as np
    sequences = []                                             # (problem id, format, ids, is_prompt)
    for r in records:
        pieces = r.get("prompts_completions")
        if not isinstance(pieces, list) or len(pieces) < 2:
            raise ValueError(f"problem {r['id']}: record has no 'prompts_completions'; perplexity needs them")
        formats = [("single", [pieces[0], "".join(pieces[1::2])])]
        if r.get("mode", "multi") == "multi":
            formats.insert(0, ("multi", pieces[:len(pieces) // 2 * 2]))
        for fmt, text_pieces in formats:
            ids = [tokenizer.encode(piece).ids for piece in text_pieces]
            sequences.append((r["id"], fmt, sum(ids, []), [k % 2 == 1 for k, p in enumerate(ids) for _ in p]))
    totals = {pid: {"multi": [0.0, 0], "single": [0.0, 0]} for pid, *_ in sequences}
    fits = sorted((s for s in sequences if 1 < len(s[2]) <= config.n_ctx), key=lambda s: len(s[2]))  # less padding
    skipped = collections.Counter(s[0] for s in sequences) - collections.Counter(s[0] for s in fits)
    nll_fn = jax.jit(functools.partial(_token_nll, config=config))
    for start in range(0, len(fits), batch_size):
        batch = fits[start:start + batch_size]
        T = min(config.n_ctx, -(-len(batch[-1][2]) // 64) * 64)  # lengths rounded to 64: few compiled shapes
        tokens_BT, prompt_BT = np.zeros((batch_size, T), np.int32), np.zeros((batch_size, T), np.float64)
        for b, (_, _, ids, is_prompt) in enumerate(batch):        # right padding: causal, so harmless
            tokens_BT[b, :len(ids)], prompt_BT[b, :len(ids)] = ids, is_prompt
        nll_BT1 = np.asarray(nll_fn(params, tokens_BT), np.float64) * prompt_BT[:, 1:]
        for b, (pid, fmt, _, _) in enumerate(batch):
            t = totals[pid][fmt]
            t[0], t[1] = t[0] + nll_BT1[b].sum(), t[1] + int(prompt_BT[b, 1:].sum())
    ppl = lambda nll, count: math.exp(nll / count) if count else None
    return {pid: {"multi": ppl(*t["multi"]), "single": ppl(*t["single"]), "skipped": skipped[pid]}
            for pid, t in totals.items()}


def _ppl_points(ppl, summary, mode):
    """(perplexity in the `mode` format, pass rate) of every problem that has both."""
    return [(p[mode], summary[pid]["passed"] / summary[pid]["scored"]) for pid, p in ppl.items()
            if p[mode] is not None and pid in summary and summary[pid]["scored"]]


def format_perplexity(ppl, summary, mode):
    """Means over problems and the correlation of the `mode` format's perplexity with the pass
    rate (paper RQ4: lower prompt perplexity, higher pass rate)."""
    lines = []
    for f in ("multi", "single"):
        values = [p[f] for p in ppl.values() if p[f] is not None]
        if values:
            lines.append(f"mean {f}-turn prompt perplexity over {len(values)} problems: {statistics.mean(values):.3f}")
    points = _ppl_points(ppl, summary, mode)
    try:
        r = f"{statistics.correlation(*zip(*points)):+.3f}"
    except (statistics.StatisticsError, TypeError):           # fewer than 2 problems, or no spread
        r = "n/a (too few problems or no spread)"
    lines.append(f"Pearson r ({mode}-turn perplexity, pass rate) over {len(points)} problems: {r}")
    lines.append("paper, CodeGen-Mono 16.1B: mean prompt perplexity 8.05 multi-turn vs 10.25 single-turn")
    too_long = sum(p["skipped"] for p in ppl.values())
    return "\n".join(lines + ([f"{too_long} sequences longer than the context were left out"] if too_long else []))


def plot_perplexity(ppl, summary, mode, path):
    """Scatter of pass rate against prompt perplexity as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = _ppl_points(ppl, summary, mode)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([x for x, _ in points], [100 * y for _, y in points], s=12)
    ax.set(xscale="log", xlabel=f"{mode}-turn prompt perplexity", ylabel="pass rate %",
           title="MTPB: pass rate vs prompt perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- command line

def model_completer(params, config, tokenizer, args, mesh=None):
    """generate_problem's `complete`: sample.complete with the model and the sampling flags bound.
    A call gets at most the room its longest history leaves in the context (a note the first time
    that cuts a budget); a history that fills the context gets "" (the reference asserted and stopped)."""
    import sample
    noted = False

    def complete(texts, max_new_tokens, *, stop, num_samples, seed):
        nonlocal noted
        lengths = [len(tokenizer.encode(t).ids) for t in texts]
        fits = [t for t, n in zip(texts, lengths) if n < config.n_ctx]
        room = config.n_ctx - max((n for n in lengths if n < config.n_ctx), default=0)
        if room < max_new_tokens and not noted:
            print(f"note: the model's {config.n_ctx}-token context cuts turns short of their {max_new_tokens}-token "
                  f"budget", flush=True)
            noted = True
        got = iter(sample.complete(params, config, fits, min(max_new_tokens, room), stop=stop, seed=seed,
                                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   num_samples=num_samples, mesh=mesh) if fits else [])
        return [next(got) if n < config.n_ctx else "" for n in lengths for _ in range(num_samples)]
    return complete


def run_chat(complete, config, tokenizer, args):
    """`chat` on stdin: a turn may take DEFAULT_MAX_GEN_LENGTH new tokens, sampled with seed --seed + turn."""
    def write_turn(program, seeds=itertools.count(args.seed)):
        if len(tokenizer.encode(program).ids) >= config.n_ctx:
            raise ValueError(f"the program fills the {config.n_ctx}-token context; :undo, or :save and start over")
        return complete([program], DEFAULT_MAX_GEN_LENGTH, stop=STOPS, num_samples=1, seed=next(seeds))[0]
    if sys.stdin.isatty():
        print(CHAT_HELP + "\n\n" + PREFIX.rstrip("\n"))
    try:
        chat(write_turn, iter(lambda: input("> "), None) if sys.stdin.isatty() else sys.stdin)
    except (EOFError, KeyboardInterrupt):                          # end of input or Ctrl-C: the session ends
        print()


def build_parser():
    """mtpb.py's command line, every flag with its default."""
    ap = ArgumentParser(description="MTPB (CodeGen paper §3): generate, score, prompt perplexity, chat.")
    arg = ap.add_argument
    arg("--init-from", metavar="DIR", help="Hugging Face CodeGen dir or ours (to generate, --perplexity, --chat)")
    arg("--problems", metavar="FILE", help="MTPB problems (codegen1/benchmark/mtpb.jsonl); with --samples: categories")
    arg("--ids", help="comma-separated problem ids, e.g. 1,2,5; None: all")
    arg("--out", metavar="FILE", help="generation: samples jsonl to write (resumable; results beside it); None: "
                                      "INIT_FROM/mtpb_multi.jsonl (or _single). With --samples: the results file")
    arg("--single-turn", action="store_true", help="all turn prompts at once, one generation of the summed budgets")
    arg("--n", type=int, default=1, help="programs per test case")
    arg("--temperature", type=float, default=0.2, help="mtpb_sample.py --t; 0 = greedy")
    arg("--top-p", type=float, default=0.95, help="mtpb_sample.py --p")
    arg("--top-k", type=int, default=50, help="HF generate's default, which the reference kept; 0 = off")
    arg("--seed", type=int, default=16, help="mtpb_sample.py --seed")
    arg("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype for the model")
    arg("--mesh", help="DPxFSDPxMP mesh of each process's devices (tpu.py); multi-host: each samples its share")
    arg("--samples", metavar="FILE", help="score this samples file (id, input, gold_output, completions)")
    arg("--reference-semantics", action="store_true", help="score with mtpb_exec.py's rules, bugs included")
    arg("--timeout", type=float, default=10.0, help="seconds per program (the reference: 20)")
    arg("--workers", type=int, default=os.cpu_count(), help="programs run in parallel")
    arg("--memory-mb", type=int, default=2048, help="memory limit per program")
    arg("--compare", nargs=2, metavar=("A", "B"), help="two scored runs side by side (results or samples files)")
    arg("--perplexity", action="store_true", help="prompt perplexity, multi- vs single-turn, vs pass rate")
    arg("--batch-size", type=int, default=4, help="sequences per forward pass for --perplexity")
    arg("--chat", action="store_true", help="write a program turn by turn from lines on stdin")
    return ap


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    for flag, ok in (("n", args.n >= 1), ("temperature", args.temperature >= 0), ("top_p", 0 < args.top_p <= 1),
                     ("top_k", args.top_k >= 0), ("timeout", args.timeout > 0), ("workers", args.workers >= 1),
                     ("memory_mb", args.memory_mb >= 64), ("batch_size", args.batch_size >= 1)):
        if not ok:
            ap.error(f"{flag_names([flag])} {getattr(args, flag)} is out of range")
    if args.compare:
        runs = [_load_results(p) for p in args.compare]
        labels = [next((r["mode"] for r in rs if "mode" in r), Path(p).name) for rs, p in zip(runs, args.compare)]
        labels = labels if labels[0] != labels[1] else [Path(p).name for p in args.compare]
        return print(format_compare(summarize(runs[0]), summarize(runs[1]), *labels))
    ids = [i.strip() for i in args.ids.split(",") if i.strip()] if args.ids is not None else None
    if ids == []:
        ap.error(f"--ids {args.ids!r} names no problem; give ids like 1,2,5")
    if args.samples and args.out and os.path.abspath(args.out) == os.path.abspath(args.samples):
        ap.error("--out names the results file and must not be the --samples file")
    if not (args.samples or args.chat or (args.problems and args.init_from)):
        raise ValueError("give --init-from DIR and --problems FILE to generate, or --samples FILE to score "
                         "(or --compare A B, or --init-from DIR --chat)")
    if (args.chat or args.perplexity) and not args.init_from:
        raise ValueError(f"--{'chat' if args.chat else 'perplexity'} needs the model: add --init-from DIR")
    problems = load_problems(args.problems, ids) if args.problems else None
    records = read_samples(args.samples) if args.samples else None
    mode = "single" if args.single_turn else "multi"
    samples_path = args.samples or args.out or os.path.join(args.init_from, f"mtpb_{mode}.jsonl")
    out_path = args.out if args.samples and args.out else results_path(samples_path)
    png = beside(out_path if args.samples and args.out else samples_path, "_perplexity.png")
    generating = records is None and not args.chat
    outputs = [samples_path, made_by_path(samples_path)] if generating else []
    if not args.chat:
        outputs.append(out_path)
    if args.perplexity:
        outputs.append(png)

    def prepare():  # process 0, before the model is loaded: every output, and what made the file
        check_writable(outputs)
        if not generating:
            return None
        made_by = describe(args.init_from, problems, args)
        check_made_by(samples_path, made_by)
        return made_by
    if args.init_from and (args.chat or args.perplexity or not args.samples):
        checkpoint_dir(args.init_from)                              # a missing checkpoint is said first
        import data, jax, sample, tpu  # noqa: E401  (scoring alone needs no JAX)
        tpu.init_distributed()
        share = tpu.process_share()
        made_by = on_first_process(share, prepare)
        mesh = tpu.make_mesh(args.mesh, jax.local_devices()) if args.mesh else None
        (config, params), tokenizer = sample.load(args.init_from, args.dtype, mesh), data.get_tokenizer()
        complete = model_completer(params, config, tokenizer, args, mesh)
    else:
        prepare()
    if args.chat:
        return run_chat(complete, config, tokenizer, args)
    if records is None:
        generate(problems, complete, samples_path, args.n, args.single_turn, args.seed, share, made_by)
        if share is not None and share.index > 0:
            return None                                             # process 0 scores what all sampled
        records = read_samples(samples_path)
    if ids is not None:
        unknown = sorted(set(ids) - {r["id"] for r in records})
        if unknown:
            raise ValueError(f"problem id(s) {', '.join(unknown)} not in {samples_path}")
        records = [r for r in records if r["id"] in ids]
    semantics = "reference" if args.reference_semantics else "fixed"
    results = score(records, args.reference_semantics, args.timeout, args.workers, args.memory_mb,
                    _earlier_verdicts(out_path, semantics))
    write_jsonl(out_path, results)
    summary = summarize(results, {p.id: p.category for p in problems or ()})
    mode = next((r["mode"] for r in records if "mode" in r), "multi")
    print(format_report(summary, f"MTPB {mode}-turn, {semantics} semantics: {samples_path} ({len(records)} "
                                 f"programs) -> {out_path}"))
    if args.perplexity:
        ppl = perplexities(records, params, config, tokenizer, args.batch_size)
        print(format_perplexity(ppl, summary, mode))
        print(f"plot: {png}" if plot_perplexity(ppl, summary, mode, png) else "(install matplotlib for a plot)")


if __name__ == "__main__":
    run_main(main)
