"""MTPB, the Multi-Turn Programming Benchmark (CodeGen paper §3, arXiv
2203.13474): multi-turn and single-turn program synthesis, sandboxed
scoring, prompt perplexity, and a chat that writes a program turn by turn
with the same protocol. The protocol (salesforce/CodeGen
`benchmark/mtpb_sample.py`), for each test input of a problem and each of
`--n` samples:

    program = PREFIX
    for each turn:
        program += "# {turn prompt}\n"
        program += truncate(model(program)) + "\n\n"

A program passes when the first argument of its last `print` call equals
the gold output (as `mtpb_exec.py`; mtpb_check.py decides it inside the
sandbox); a problem's pass rate is passed / (n x 5). `--single-turn` is
the paper's baseline: all turn prompts at once. Scoring rules, perplexity
and file formats: docs/evaluation.md.

    # generate + score
    python mtpb.py --init-from DIR --problems mtpb.jsonl [--single-turn]
    # score a samples file
    python mtpb.py --samples DIR/mtpb_multi.jsonl [--reference-semantics]
    python mtpb.py --compare DIR/mtpb_multi_results.jsonl \\
                             DIR/mtpb_single_results.jsonl
    python mtpb.py --init-from DIR --samples DIR/mtpb_multi.jsonl --perplexity
    # write a program
    python mtpb.py --init-from DIR --chat
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
from common import (DECODE_DTYPES, ArgumentParser, Progress, beside,
                    check_fields, check_made_by, check_writable,
                    checkpoint_dir, checkpoint_identity, flag_names,
                    generate_jsonl,
                    made_by_path, on_first_process, read_jsonl,
                    results_path, run_main, sha256_of, write_jsonl)
from mtpb_check import (REFERENCE_GRACE, format_compare, format_report,
                        missing_requirement, program_for, summarize)

# -------------------------------------------------- the protocol

# mtpb_sample.py: once atop every program
PREFIX = "# Import libraries.\n\nimport numpy as np\n\n"
# mtpb_sample.py default; problems 39-45 lack the field
DEFAULT_MAX_GEN_LENGTH = 256

# Where sampling may stop early. sample.complete cuts the text *before*
# the first stop string, so a stop changes nothing only where `truncate`
# cuts exactly there too: "\n\n\n" is the one terminal of truncate with
# that property (it keeps the "\n" before a column-0 "#", which a cut
# before "\n#" would lose). <|endoftext|> always stops.
STOPS = ("\n\n\n",)


def wrap(prompt):
    """A turn's prompt becomes one comment line (mtpb_sample.py `wrap`)."""
    return f"# {prompt}\n"


def truncate(completion):
    """The paper's cut of one turn's code (mtpb_sample.py and
    jaxformer/hf/sample.py `truncate`): at the 2nd line starting with
    `print`, then at the 2nd line starting with `def`, then at the
    earliest column-0 `#`, `'''` or `\"\"\"`, `<|endoftext|>`, or three
    newlines in a row."""
    for head in ("print", "def"):
        found = re.finditer(f"^{head}", completion, re.MULTILINE)
        starts = [m.start() for m in found]
        if len(starts) > 1:
            completion = completion[:starts[1]]
    terminals = ("^#", re.escape("<|endoftext|>"), "^'''", '^"""', "\n\n\n")
    hits = []
    for terminal in terminals:
        m = re.search(terminal, completion, re.MULTILINE)
        if m:
            hits.append(m.start())
    return completion[:min(hits)] if hits else completion


# -------------------------------------------------- problems

# one test input, its gold output, the prompts filled from the input
Case = collections.namedtuple("Case", "input output prompts")
# max_gen_length: the budget of new tokens per turn
Problem = collections.namedtuple("Problem", "id category max_gen_length cases")

PROBLEM_FIELDS = {"id": (str, int), "prompts": list, "inputs": list,
                  "outputs": list, "category": str}


def _cases(where, row):
    """The Case of each test input of a problems file's row, every
    template filled (str.format, as the reference: lists appear as
    reprs). Inputs and outputs are zipped like the reference's: problem
    57's 6th output has no input and is ignored."""
    cases = []
    for inp, out in zip(row["inputs"], row["outputs"]):
        prompts = []
        for template in row["prompts"]:
            try:
                prompts.append(template.format(**inp))
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(
                    f"{where}: template {template!r} cannot be filled "
                    f"from input {inp!r} ({type(e).__name__}: {e})") from None
        cases.append(Case(inp, out, tuple(prompts)))
    return tuple(cases)


def load_problems(path, ids=None):
    """Problems of an MTPB jsonl, sorted by id, every template filled for
    every test input (_cases). A one-line ValueError, with the line, for
    anything malformed."""
    problems = {}
    for lineno, row in read_jsonl(path, "problems file"):
        check_fields(f"{path}:{lineno}", row, "problem", PROBLEM_FIELDS)
        pid = str(row["id"])
        where = f"{path}:{lineno}: problem {pid}"
        if pid in problems:
            raise ValueError(f"{where} appears twice")
        for key, kind in (("prompts", str), ("inputs", dict)):
            if not row[key] or not all(isinstance(x, kind) for x in row[key]):
                raise ValueError(f"{where}: {key!r} must be a non-empty "
                                 f"list of {kind.__name__}")
        if len(row["outputs"]) < len(row["inputs"]):
            raise ValueError(f"{where}: {len(row['inputs'])} inputs but "
                             f"only {len(row['outputs'])} outputs")
        budget = row.get("max_gen_length", DEFAULT_MAX_GEN_LENGTH)
        if not isinstance(budget, int) or budget <= 0:
            raise ValueError(f"{where}: max_gen_length must be a positive "
                             f"integer")
        cases = _cases(where, row)
        problems[pid] = Problem(pid, row["category"], budget, cases)
    if ids is not None:
        unknown = [i for i in ids if i not in problems]
        if unknown:
            raise ValueError(f"unknown problem id(s) {', '.join(unknown)} "
                             f"(not in {path})")
        problems = {i: problems[i] for i in ids}
    if not problems:
        raise ValueError(f"{path}: no problems")

    def order(p):
        return int(p.id) if p.id.isdigit() else p.id
    return sorted(problems.values(), key=order)


# -------------------------------------------------- generation

def generate_problem(problem, complete, n, single_turn=False, seed=16):
    """The n x 5 programs of one problem as samples records, all rows
    advanced together.

    `complete(texts, max_new_tokens, *, stop, num_samples, seed) ->
    list[str]` returns, prompt-major, `num_samples` completions per text.
    Row r writes the program of test case r // n, sample r % n; on the
    first turn the n rows of a case share one history, which is
    prefilled once. Sampling seeds are fixed per (seed, problem, turn),
    so a resumed run writes what an uninterrupted one would.
    """
    cases = problem.cases
    if single_turn:
        # all turns as consecutive comment lines, one generation with
        # all the budgets
        turns = [["".join(wrap(p) for p in case.prompts)] for case in cases]
        budget = problem.max_gen_length * len(cases[0].prompts)
    else:
        turns = [[wrap(p) for p in case.prompts] for case in cases]
        budget = problem.max_gen_length
    # each row's pieces: prefix, prompt, code, prompt, code, ...
    rows = [[PREFIX] for _ in range(len(cases) * n)]
    for t in range(len(turns[0])):
        for r, pieces in enumerate(rows):
            pieces.append(turns[r // n][t])
        histories = ["".join(pieces) for pieces in rows]
        first = t == 0
        turn_seed = zlib.crc32(f"{seed}/{problem.id}/{t}".encode())
        completions = complete(histories[::n] if first else histories,
                               budget,
                               stop=STOPS,
                               num_samples=n if first else 1,
                               seed=turn_seed)
        for pieces, completion in zip(rows, completions, strict=True):
            pieces.append(truncate(completion) + "\n\n")
    records = []
    for r, pieces in enumerate(rows):
        case = cases[r // n]
        records.append({"id": problem.id,
                        "input": case.input,
                        "gold_output": case.output,
                        "completions": "".join(pieces),
                        "prompts_completions": pieces,
                        "mode": "single" if single_turn else "multi",
                        "case": r // n,
                        "sample": r % n,
                        "category": problem.category})
    return records


def generate(problems, complete, out_path, n=1, single_turn=False, seed=16,
             share=None, made_by=None):
    """Append to `out_path` the programs it lacks, a problem at a time
    (resumable; `share`: each process its own; `made_by` (describe): a
    file made otherwise is refused, common.check_made_by)."""
    mode = "single" if single_turn else "multi"
    by_id = {p.id: p for p in problems}

    def key(row):
        if row.get("mode") != mode:
            raise ValueError(f"{out_path} holds {row.get('mode')!r} samples "
                             f"and this run makes {mode!r} ones; "
                             f"pass another --out")
        return str(row["id"]), row["case"], row["sample"]

    def produce(keys, first):
        problem = by_id[keys[0][0]]
        rows = generate_problem(problem, complete, n, single_turn, seed)
        return [r for r in rows if key(r) in keys]

    def problem_id(key):
        return key[0]

    wanted = [(p.id, c, s) for p in problems for c in range(len(p.cases))
              for s in range(n)]
    generate_jsonl(out_path, wanted, key, produce, len(wanted),
                   group=problem_id, unit="programs", share=share,
                   made_by=made_by)


def describe(init_from, problems, args):
    """What makes a samples file: the checkpoint (step, weights digest),
    the problems (their filled prompts, cases and budgets) and every
    sampling flag (common.check_made_by)."""
    return {**checkpoint_identity(init_from),
            "dtype": args.dtype,
            "problems": len(problems),
            "problems_sha256": sha256_of(problems),
            "turns": "single" if args.single_turn else "multi",
            "prefix": PREFIX,
            "stop": list(STOPS),
            "n": args.n,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "seed": args.seed}


# -------------------------------------------------- chat

CHAT_HELP = """\
Type what the program should do next, one line per turn; the model writes the code.
  :show        print the whole program      :run         run it in the sandbox (10 s)
  :undo        drop the last turn           :save FILE   write the program to FILE
  :help        this text                    :quit        end (so does end of input)"""


def _run_program(program, say):
    """The chat's :run: the program in the sandbox, its output shown."""
    result = sandbox.run(program, timeout=10)
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        if text.strip():
            say(f"--- {name}\n{text.rstrip()}")
    reason = f": {result.reason}" if result.reason else ""
    say(f"({result.status}{reason}; {result.seconds:.2f} s)")


def _save_program(program, name, say):
    """The chat's :save FILE."""
    try:
        Path(name).write_text(program)
    except OSError as e:  # an empty name included
        say(f"(could not save: {e.strerror}: {name!r}; usage: :save FILE)")
        return
    say(f"(saved {len(program.splitlines())} lines to {name})")


def chat(write_turn, lines, say=print):
    """The MTPB protocol as a conversation, driven by `lines` (user
    input): a line L appends `# L\\n`, then `write_turn(program)` returns
    the model's continuation, which is cut with `truncate`, appended with
    two newlines, and shown. Returns the final program."""
    turns = []                                    # (comment, code) pairs

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
        elif command == ":undo" and turns:
            say(f"(dropped: {turns.pop()[0].strip()})")
        elif command == ":undo":
            say("(nothing to undo)")
        elif command == ":save":
            _save_program(program(), arg.strip(), say)
        elif command == ":run":
            _run_program(program(), say)
        elif command.startswith(":"):
            say(f"(unknown command {command}; :help lists them)")
        else:
            try:
                code = truncate(write_turn(program() + wrap(line)))
            except ValueError as e:          # the program fills the context
                say(f"(turn not added: {e})")
                continue
            turns.append((wrap(line), code))
            say(f"{wrap(line)}{code}\n")
    return program()


# -------------------------------------------------- scoring

# The CodeGen reference samples format; the fields a record must have.
RECORD_FIELDS = {"id": (str, int), "input": None, "gold_output": None,
                 "completions": str}


def read_samples(path):
    """Records of a samples file (CodeGen reference format: id, input,
    gold_output, completions, the program as one string)."""
    records = []
    for lineno, r in read_jsonl(path, "samples file"):
        check_fields(f"{path}:{lineno}", r, "record", RECORD_FIELDS)
        records.append({**r, "id": str(r["id"])})
    if not records:
        raise ValueError(f"{path}: no samples; generate some with "
                         f"--init-from DIR --problems FILE")
    return records


def _pair(record):
    """What a verdict depends on: the program and the gold output."""
    gold = json.dumps(record["gold_output"], sort_keys=True)
    return record["completions"], gold


def _verdict(run):
    """A sandbox run's result field: 'passed', 'timed out' or
    '<status>: <reason>'."""
    if run.status in ("passed", "timed out"):
        return run.status
    return f"{run.status}: {run.reason}"


def score(records, reference_semantics=False, timeout=10.0, workers=None,
          memory_mb=2048, cache=None):
    """Records with `passed` (bool), `result` ('passed', 'failed:
    <reason>', 'timed out', 'skipped: missing X') and `semantics` added.
    Identical (program, gold) pairs run once; `cache` maps such a pair
    (`_pair`) to a result already known."""
    semantics = "reference" if reference_semantics else "fixed"
    verdicts = dict(cache or {})
    jobs = {}
    skips = [missing_requirement(r) for r in records]
    for r, skip in zip(records, skips):
        pair = _pair(r)
        if skip is None and pair not in verdicts and pair not in jobs:
            jobs[pair] = program_for(r["completions"], r["gold_output"],
                                     reference_semantics, timeout)
    if jobs:
        print(f"running {len(jobs)} programs ({len(records)} samples, "
              f"{semantics} semantics)", flush=True)
        progress = Progress("ran", "programs", len(jobs))

        def report(done, total):
            progress(done)
        grace = REFERENCE_GRACE * reference_semantics
        runs = sandbox.run_many(list(jobs.values()),
                                timeout=timeout + grace,
                                workers=workers,
                                memory_mb=memory_mb,
                                progress=report)
        for pair, run in zip(jobs, runs):
            verdicts[pair] = _verdict(run)
    scored = []
    for r, skip in zip(records, skips):
        result = f"skipped: {skip}" if skip else verdicts[_pair(r)]
        scored.append({**r, "passed": result == "passed", "result": result,
                       "semantics": semantics})
    return scored


def _earlier_verdicts(path, semantics):
    """The verdicts of an earlier scoring with the same rules, but for
    sandbox trouble (run again)."""
    if not os.path.exists(path):
        return {}
    verdicts = {}
    for _, r in read_jsonl(path, "results file"):
        same_rules = r.get("semantics") == semantics
        whole = "completions" in r and "gold_output" in r
        result = str(r.get("result"))
        trouble = result.startswith(("skipped", "error"))
        if same_rules and whole and not trouble:
            verdicts[_pair(r)] = r["result"]
    return verdicts


def _load_results(path):
    """Results records of FILE_results.jsonl, or of the results beside
    samples file FILE."""
    p = str(path)
    if not p.endswith("_results.jsonl"):
        p = results_path(path)
    if not os.path.exists(p) and p != str(path):
        raise ValueError(f"{path} has not been scored yet ({p} is missing); "
                         f"run --samples {path} first")
    fields = {"id": None, "passed": None}
    results = []
    for lineno, r in read_jsonl(p, "results file"):
        check_fields(f"{p}:{lineno}", r, "results record", fields)
        results.append(r)
    return results


# -------------------------------------------------- prompt perplexity

def _token_nll(params, tokens_BT, config):
    """-log p(token t | tokens < t) for t = 1..T-1, (B, T-1). Run by the
    decoding forward (model_fast.forward), which takes the weights as
    sample.load returns them."""
    import jax
    import jax.numpy as jnp
    import model_fast
    cache = model_fast.init_cache(config, *tokens_BT.shape)
    logits_BTV, _ = model_fast.forward(params, tokens_BT, config,
                                       cache=cache)
    logp_BTV = jax.nn.log_softmax(logits_BTV[:, :-1], axis=-1)
    next_BT1 = tokens_BT[:, 1:, None]
    return -jnp.take_along_axis(logp_BTV, next_BT1, axis=-1)[..., 0]


Sequence = collections.namedtuple("Sequence", "id format ids is_prompt")


def _prompt_sequences(records, tokenizer):
    """A Sequence per record and format: the token ids of its pieces
    and, per token, whether it belongs to a prompt (perplexities)."""
    sequences = []
    for r in records:
        pieces = r.get("prompts_completions")
        if not isinstance(pieces, list) or len(pieces) < 2:
            raise ValueError(f"problem {r['id']}: record has no "
                             f"'prompts_completions'; perplexity needs them")
        formats = [("single", [pieces[0], "".join(pieces[1::2])])]
        if r.get("mode", "multi") == "multi":
            up_to_last_prompt = pieces[:len(pieces) // 2 * 2]
            formats.insert(0, ("multi", up_to_last_prompt))
        for fmt, text_pieces in formats:
            ids = []
            is_prompt = []
            for k, piece in enumerate(text_pieces):
                piece_ids = tokenizer.encode(piece).ids
                ids += piece_ids
                is_prompt += [k % 2 == 1] * len(piece_ids)
            sequences.append(Sequence(r["id"], fmt, ids, is_prompt))
    return sequences


def perplexities(records, params, config, tokenizer, batch_size=4):
    """{problem id: {'multi': ppl or None, 'single': ppl, 'skipped':
    count}}: exp(mean NLL) of the prompt tokens of all the problem's
    records, in two formats. Multi-turn: the record's pieces (prefix,
    prompt, code, ...) up to its last prompt, each prompt conditioned on
    the code this model wrote for the earlier ones (paper RQ4; multi-turn
    records only). Single-turn: the prefix, then all prompts as one
    piece. Pieces are tokenized separately, so exactly the prompts'
    tokens are scored; sequences longer than the context are skipped
    (counted)."""
    import jax
    import numpy as np
    sequences = _prompt_sequences(records, tokenizer)
    # problem id -> format -> [summed NLL, prompt tokens]
    totals = {}
    for s in sequences:
        totals[s.id] = {"multi": [0.0, 0], "single": [0.0, 0]}
    # sorted by length: batches of like lengths, less padding
    fits = [s for s in sequences if 1 < len(s.ids) <= config.n_ctx]
    fits.sort(key=lambda s: len(s.ids))
    counts = collections.Counter(s.id for s in sequences)
    skipped = counts - collections.Counter(s.id for s in fits)
    nll_fn = jax.jit(functools.partial(_token_nll, config=config))
    for start in range(0, len(fits), batch_size):
        batch = fits[start:start + batch_size]
        # lengths rounded up to 64: few compiled shapes
        T = min(config.n_ctx, -(-len(batch[-1].ids) // 64) * 64)
        tokens_BT = np.zeros((batch_size, T), np.int32)
        prompt_BT = np.zeros((batch_size, T), np.float64)
        for b, s in enumerate(batch):      # right padding: causal, harmless
            tokens_BT[b, :len(s.ids)] = s.ids
            prompt_BT[b, :len(s.ids)] = s.is_prompt
        nll_BT1 = np.asarray(nll_fn(params, tokens_BT), np.float64)
        nll_BT1 = nll_BT1 * prompt_BT[:, 1:]
        for b, s in enumerate(batch):
            total = totals[s.id][s.format]
            total[0] += nll_BT1[b].sum()
            total[1] += int(prompt_BT[b, 1:].sum())

    def ppl(nll, count):
        return math.exp(nll / count) if count else None
    result = {}
    for pid, t in totals.items():
        result[pid] = {"multi": ppl(*t["multi"]),
                       "single": ppl(*t["single"]),
                       "skipped": skipped[pid]}
    return result


def _ppl_points(ppl, summary, mode):
    """(perplexity in the `mode` format, pass rate) of every problem
    that has both."""
    points = []
    for pid, p in ppl.items():
        scored = summary[pid]["scored"] if pid in summary else 0
        if p[mode] is not None and scored:
            points.append((p[mode], summary[pid]["passed"] / scored))
    return points


def format_perplexity(ppl, summary, mode):
    """Means over problems and the correlation of the `mode` format's
    perplexity with the pass rate (paper RQ4: lower prompt perplexity,
    higher pass rate)."""
    lines = []
    for f in ("multi", "single"):
        values = [p[f] for p in ppl.values() if p[f] is not None]
        if values:
            lines.append(f"mean {f}-turn prompt perplexity over "
                         f"{len(values)} problems: "
                         f"{statistics.mean(values):.3f}")
    points = _ppl_points(ppl, summary, mode)
    try:
        r = f"{statistics.correlation(*zip(*points)):+.3f}"
    except (statistics.StatisticsError, TypeError):
        # fewer than 2 problems, or no spread
        r = "n/a (too few problems or no spread)"
    lines.append(f"Pearson r ({mode}-turn perplexity, pass rate) over "
                 f"{len(points)} problems: {r}")
    lines.append("paper, CodeGen-Mono 16.1B: mean prompt perplexity 8.05 "
                 "multi-turn vs 10.25 single-turn")
    too_long = sum(p["skipped"] for p in ppl.values())
    if too_long:
        lines.append(f"{too_long} sequences longer than the context "
                     f"were left out")
    return "\n".join(lines)


def plot_perplexity(ppl, summary, mode, path):
    """Scatter of pass rate against prompt perplexity as a PNG; False
    when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points = _ppl_points(ppl, summary, mode)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter([x for x, _ in points], [100 * y for _, y in points], s=12)
    ax.set(xscale="log",
           xlabel=f"{mode}-turn prompt perplexity",
           ylabel="pass rate %",
           title="MTPB: pass rate vs prompt perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# -------------------------------------------------- command line

def model_completer(params, config, tokenizer, args, mesh=None):
    """generate_problem's `complete`: sample.complete with the model and
    the sampling flags bound. A call gets at most the room its longest
    history leaves in the context (a note the first time that cuts a
    budget); a history that fills the context gets "" (the reference
    asserted and stopped)."""
    import sample
    noted = False

    def complete(texts, max_new_tokens, *, stop, num_samples, seed):
        nonlocal noted
        lengths = [len(tokenizer.encode(t).ids) for t in texts]
        fits = [t for t, n in zip(texts, lengths) if n < config.n_ctx]
        longest = max((n for n in lengths if n < config.n_ctx), default=0)
        room = config.n_ctx - longest
        if room < max_new_tokens and not noted:
            print(f"note: the model's {config.n_ctx}-token context cuts "
                  f"turns short of their {max_new_tokens}-token budget",
                  flush=True)
            noted = True
        got = []
        if fits:
            got = sample.complete(params, config, fits,
                                  min(max_new_tokens, room),
                                  stop=stop,
                                  seed=seed,
                                  temperature=args.temperature,
                                  top_p=args.top_p,
                                  top_k=args.top_k,
                                  num_samples=num_samples,
                                  mesh=mesh)
        got = iter(got)
        completions = []
        for n in lengths:
            for _ in range(num_samples):
                completions.append(next(got) if n < config.n_ctx else "")
        return completions
    return complete


def run_chat(complete, config, tokenizer, args):
    """`chat` on stdin: a turn may take DEFAULT_MAX_GEN_LENGTH new tokens,
    sampled with seed --seed + turn."""
    seeds = itertools.count(args.seed)

    def write_turn(program):
        if len(tokenizer.encode(program).ids) >= config.n_ctx:
            raise ValueError(f"the program fills the {config.n_ctx}-token "
                             f"context; :undo, or :save and start over")
        texts = complete([program], DEFAULT_MAX_GEN_LENGTH, stop=STOPS,
                         num_samples=1, seed=next(seeds))
        return texts[0]

    def typed():
        while True:
            yield input("> ")

    if sys.stdin.isatty():
        print(CHAT_HELP + "\n\n" + PREFIX.rstrip("\n"))
        lines = typed()
    else:
        lines = sys.stdin
    try:
        chat(write_turn, lines)
    except (EOFError, KeyboardInterrupt):
        print()                # end of input or Ctrl-C: the session ends


def build_parser():
    """mtpb.py's command line, every flag with its default."""
    ap = ArgumentParser(description="MTPB (CodeGen paper §3): generate, "
                                    "score, prompt perplexity, chat.")
    arg = ap.add_argument
    arg("--init-from", metavar="DIR",
        help="Hugging Face CodeGen dir or ours (to generate, --perplexity, "
             "--chat)")
    arg("--problems", metavar="FILE",
        help="MTPB problems (codegen1/benchmark/mtpb.jsonl); with "
             "--samples: categories")
    arg("--ids", help="comma-separated problem ids, e.g. 1,2,5; None: all")
    arg("--out", metavar="FILE", help="generation: samples jsonl to write "
        "(resumable; results beside it); None: INIT_FROM/mtpb_multi.jsonl "
        "(or _single). With --samples: the results file")
    gen = ap.add_argument_group("generation").add_argument
    gen("--single-turn", action="store_true",
        help="all turn prompts at once, one generation of the summed "
             "budgets")
    gen("--n", type=int, default=1, help="programs per test case")
    gen("--temperature", type=float, default=0.2, help="mtpb_sample.py --t; 0 = greedy")
    gen("--top-p", type=float, default=0.95, help="mtpb_sample.py --p")
    gen("--top-k", type=int, default=50,
        help="HF generate's default, which the reference kept; 0 = off")
    gen("--seed", type=int, default=16, help="mtpb_sample.py --seed")
    gen("--dtype", choices=DECODE_DTYPES, default="float32",
        help="weights while decoding (docs/sampling.md)")
    gen("--mesh", help="DPxFSDPxMP mesh of each process's devices "
                       "(tpu.py); multi-host: each samples its share")
    scoring = ap.add_argument_group("scoring").add_argument
    scoring("--samples", metavar="FILE", help="score this samples file "
            "(id, input, gold_output, completions)")
    scoring("--reference-semantics", action="store_true",
            help="score with mtpb_exec.py's rules, bugs included")
    scoring("--timeout", type=float, default=10.0,
            help="seconds per program (the reference: 20)")
    scoring("--workers", type=int, default=os.cpu_count(),
            help="programs run in parallel")
    scoring("--memory-mb", type=int, default=2048, help="memory limit per program")
    scoring("--compare", nargs=2, metavar=("A", "B"),
            help="two scored runs side by side (results or samples files)")
    more = ap.add_argument_group("perplexity and chat").add_argument
    more("--perplexity", action="store_true",
         help="prompt perplexity, multi- vs single-turn, vs pass rate")
    more("--batch-size", type=int, default=4, help="sequences per forward "
         "pass for --perplexity")
    more("--chat", action="store_true",
         help="write a program turn by turn from lines on stdin")
    return ap


def check_ranges(ap, args):
    """One line for a flag out of range."""
    in_range = {"n": args.n >= 1,
                "temperature": args.temperature >= 0,
                "top_p": 0 < args.top_p <= 1,
                "top_k": args.top_k >= 0,
                "timeout": args.timeout > 0,
                "workers": args.workers >= 1,
                "memory_mb": args.memory_mb >= 64,
                "batch_size": args.batch_size >= 1}
    for flag, ok in in_range.items():
        if not ok:
            value = getattr(args, flag)
            ap.error(f"{flag_names([flag])} {value} is out of range")


def check_inputs(ap, args):
    """One line for a run without its inputs, or with --out naming the
    samples file; returns the --ids as a list (None: all)."""
    ids = None
    if args.ids is not None:
        ids = [i.strip() for i in args.ids.split(",") if i.strip()]
        if not ids:
            ap.error(f"--ids {args.ids!r} names no problem; "
                     f"give ids like 1,2,5")
    if args.samples and args.out:
        if os.path.abspath(args.out) == os.path.abspath(args.samples):
            ap.error("--out names the results file and must not be the "
                     "--samples file")
    if not (args.samples or args.chat or (args.problems and args.init_from)):
        raise ValueError("give --init-from DIR and --problems FILE to "
                         "generate, or --samples FILE to score (or "
                         "--compare A B, or --init-from DIR --chat)")
    if (args.chat or args.perplexity) and not args.init_from:
        flag = "chat" if args.chat else "perplexity"
        raise ValueError(f"--{flag} needs the model: add --init-from DIR")
    return ids


def compare(paths):
    """--compare A B: two scored runs side by side, labelled by their
    mode (multi, single), or by file name when both have the same."""
    runs = [_load_results(p) for p in paths]
    labels = []
    for rows, path in zip(runs, paths):
        modes = [r["mode"] for r in rows if "mode" in r]
        labels.append(modes[0] if modes else Path(path).name)
    if labels[0] == labels[1]:
        labels = [Path(p).name for p in paths]
    a = summarize(runs[0])
    b = summarize(runs[1])
    print(format_compare(a, b, *labels))


def score_records(args, records, problems, ids, samples_path, out_path):
    """Score the records (those of --ids), write the results to
    `out_path`, print the report; returns the results, their summary
    (mtpb_check.summarize) and their mode (multi or single)."""
    if ids is not None:
        unknown = sorted(set(ids) - {r["id"] for r in records})
        if unknown:
            raise ValueError(f"problem id(s) {', '.join(unknown)} not in "
                             f"{samples_path}")
        records = [r for r in records if r["id"] in ids]
    semantics = "reference" if args.reference_semantics else "fixed"
    cache = _earlier_verdicts(out_path, semantics)
    results = score(records, args.reference_semantics, args.timeout,
                    args.workers, args.memory_mb, cache)
    write_jsonl(out_path, results)
    categories = {p.id: p.category for p in problems or ()}
    summary = summarize(results, categories)
    modes = [r["mode"] for r in results if "mode" in r]
    mode = modes[0] if modes else "multi"
    title = (f"MTPB {mode}-turn, {semantics} semantics: {samples_path} "
             f"({len(results)} programs) -> {out_path}")
    print(format_report(summary, title))
    return results, summary, mode


def main(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    check_ranges(ap, args)
    if args.compare:
        return compare(args.compare)
    ids = check_inputs(ap, args)
    problems = None
    if args.problems:
        problems = load_problems(args.problems, ids)
    records = read_samples(args.samples) if args.samples else None
    turns = "single" if args.single_turn else "multi"
    samples_path = args.samples or args.out or os.path.join(
        args.init_from, f"mtpb_{turns}.jsonl")
    # with --samples, --out names the results file; pictures go beside it
    results_named = args.samples and args.out
    out_path = args.out if results_named else results_path(samples_path)
    png_beside = out_path if results_named else samples_path
    png = beside(png_beside, "_perplexity.png")
    generating = records is None and not args.chat
    outputs = []
    if generating:
        outputs += [samples_path, made_by_path(samples_path)]
    if not args.chat:
        outputs.append(out_path)
    if args.perplexity:
        outputs.append(png)

    # process 0, before the model is loaded: every output, and what made
    # the file
    def prepare():
        check_writable(outputs)
        if not generating:
            return None
        made_by = describe(args.init_from, problems, args)
        check_made_by(samples_path, made_by)
        return made_by
    needs_model = args.chat or args.perplexity or not args.samples
    if args.init_from and needs_model:
        checkpoint_dir(args.init_from)     # a missing checkpoint is said first
        import jax      # imported here: scoring alone needs no JAX
        import data
        import sample
        import tpu
        tpu.init_distributed()
        share = tpu.process_share()
        made_by = on_first_process(share, prepare)
        mesh = None
        if args.mesh:
            mesh = tpu.make_mesh(args.mesh, jax.local_devices())
        config, params = sample.load(args.init_from, args.dtype, mesh)
        tokenizer = data.get_tokenizer()
        complete = model_completer(params, config, tokenizer, args, mesh)
    else:
        prepare()
    if args.chat:
        return run_chat(complete, config, tokenizer, args)
    if records is None:
        generate(problems, complete, samples_path, args.n, args.single_turn,
                 args.seed, share, made_by)
        if share is not None and share.index > 0:
            return None             # process 0 scores what all sampled
        records = read_samples(samples_path)
    results, summary, mode = score_records(args, records, problems, ids,
                                           samples_path, out_path)
    if args.perplexity:
        ppl = perplexities(results, params, config, tokenizer,
                           args.batch_size)
        print(format_perplexity(ppl, summary, mode))
        if plot_perplexity(ppl, summary, mode, png):
            print(f"plot: {png}")
        else:
            print("(install matplotlib for a plot)")


if __name__ == "__main__":
    run_main(main)
